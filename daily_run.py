"""The daily run: the four steps in order, unattended, safe to start every day from cron.

    uv run daily_run.py [--timeout SECONDS] [--interval SECONDS] [--wait-lock] [--new-index] [--allow-mass-delete]

1. A run left by an earlier day (batch_job_info.json still there) is finished first: 02 --wait, 03, 04.
2. 01 embeds today's new and changed images (none: "nothing to do", exit 0); the vectors of images gone are deleted
   after the loads (more than MAX_DELETE_FRACTION or MAX_DELETE_COUNT: nothing is deleted or submitted, exit 10,
   until a run with --allow-mass-delete).
3. 02 --wait polls the jobs to their end (--timeout: give up waiting, exit 3; the next day's run goes on with
   them), 03 loads whatever they produced and names every image not loaded, 04 removes the run's manifests.
Every image not loaded comes back by itself: the next day's 01 picks up the images that are missing from the
index, except those Bedrock rejected for good (failed_permanently.jsonl; 01 --retry-failed tries them again).
The lock on the job-info file is held from start to end: a second daily_run.py (or any step) started meanwhile
exits 7 and changes nothing. The exit status is the table below: 0 all loaded (or nothing to do); 4 some images
not loaded this time (named in the output); 3 the jobs still run at --timeout; anything else a step's error.
Every setting a run needs (SOURCE_BUCKET, RESULT_BUCKET, ROLE_ARN, VECTOR_BUCKET, VECTOR_INDEX) is checked before
anything runs (exit 2). A vector index that does not exist is refused (exit 6, nothing uploaded): a typo must not
start a new index unwatched. The first run, which starts the index, passes --new-index (01 gets it).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import common
from batch_embeddings import jobinfo

SETTINGS = ("JOB_INFO_FILE",)
REQUIRED = common.RUN_REQUIRED  # 01's, which include 03's: checked before an earlier run is finished
DEFAULT_TIMEOUT = 23 * 3600  # ends before the next day's run starts
STEPS = {1: "01_create_job", 2: "02_monitor_job", 3: "03_load_result_to_s3_vector_bucket",
         4: "04_remove_completed_task"}
RUN_ENDED = (common.EXIT_OK, common.EXIT_INCOMPLETE, common.EXIT_JOB_FAILED)  # 02: every job has ended


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1] + "\n" + common.EXIT_CODES_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"stop waiting for the jobs after this long (default {DEFAULT_TIMEOUT}: 23 h)")
    parser.add_argument("--interval", type=float, default=30.0, metavar="SECONDS",
                        help="seconds between two looks at the jobs (30)")
    parser.add_argument("--new-index", action="store_true",
                        help="01 may start VECTOR_INDEX when it does not exist yet (the first run; without it a "
                             "missing index is refused, exit 6)")
    parser.add_argument("--allow-mass-delete", action="store_true",
                        help="01 deletes the vectors of the images gone from SOURCE_PREFIX even when they are more "
                             "than MAX_DELETE_FRACTION or MAX_DELETE_COUNT allow (without it such a day exits 10)")
    jobinfo.lock_args(parser)
    common.add_settings(parser, SETTINGS)
    args = parser.parse_args(argv)
    if not (0 < args.timeout < float("inf") and 0 <= args.interval < float("inf")):  # nan fails both
        parser.error("--timeout must be a positive number of seconds and --interval 0 or more")
    return args


def step(number: int, *argv: str) -> int:
    """Run a numbered step in this process (it shares the lock this process holds); its exit status."""
    root = str(Path(__file__).resolve().parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    print(f"\n>>> daily_run: {STEPS[number]}.py {' '.join(argv)}".rstrip(), flush=True)
    code = importlib.import_module(STEPS[number]).main(list(argv))
    sys.stdout.flush()
    return code


def finish_run(args) -> int:
    """Wait for the run's jobs, load what they produced and clean up: 0, or 4 when some images were not loaded."""
    waited = step(2, "--wait", "--timeout", f"{args.timeout:g}", "--interval", f"{args.interval:g}")
    if waited not in RUN_ENDED:
        return waited
    loaded = step(3)
    if loaded not in (common.EXIT_OK, common.EXIT_INCOMPLETE):
        return loaded
    cleaned = step(4)
    return cleaned if cleaned != common.EXIT_OK else loaded


def run(argv) -> int:
    args = parse_args(argv)
    config = common.load_config(args, REQUIRED)
    path = config.job_info_file
    with jobinfo.locked(path, "daily_run.py", wait=args.wait_lock):
        earlier = common.EXIT_OK
        if jobinfo.exists(path):
            print(f"{path} holds a run from an earlier day: finishing it first")
            earlier = finish_run(args)
            if earlier not in (common.EXIT_OK, common.EXIT_INCOMPLETE):
                return earlier
        created = step(1, *(["--new-index"] if args.new_index else []),
                       *(["--allow-mass-delete"] if args.allow_mass_delete else []))
        if created != common.EXIT_OK:
            return created
        if not jobinfo.exists(path):
            return earlier  # nothing new to embed today
        today = finish_run(args)
        return today if today != common.EXIT_OK else earlier


def main(argv: list[str] | None = None) -> int:
    return common.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
