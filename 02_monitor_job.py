"""Step 2: show the batch job's status and statistics and, on `y`, poll until it ends.

    uv run 02_monitor_job.py            # asks whether to keep polling (on a terminal)
    uv run 02_monitor_job.py --wait     # polls without asking (cron, scripts)
    uv run 02_monitor_job.py --no-wait  # prints the status once

--no-wait only looks: it takes no lock (it runs while daily_run.py waits for the jobs), reads the job-info file as
it is and saves nothing. The prompt is asked without the lock; the answer `y` takes it and reads the file again.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import time
from datetime import datetime

import common
from batch_embeddings import jobinfo, jobs, lease, monitor, naming
from common import ok

SETTINGS = ("AWS_REGION", "JOB_INFO_FILE", "EXPECTED_BUCKET_OWNER", "MAX_CONCURRENT_JOBS")
EXIT_RUNNING = common.EXIT_RUNNING
EXIT_PARTIAL = common.EXIT_INCOMPLETE
EXIT_FAILED = common.EXIT_JOB_FAILED
PROMPT = "Job is still running. Monitor until completion? (y/n): "
STEP = "02_monitor_job.py"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1] + "\n" + common.EXIT_CODES_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--wait", action="store_true", help="poll until the job ends, without asking")
    mode.add_argument("--no-wait", action="store_true", help="print the status once and exit")
    parser.add_argument("--interval", type=float, default=30.0, metavar="SECONDS", help="seconds between polls (30)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="stop polling after this long")
    jobinfo.lock_args(parser)
    common.add_settings(parser, SETTINGS)
    args = parser.parse_args(argv)
    for flag, value in (("--interval", args.interval), ("--timeout", args.timeout)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            parser.error(f"{flag} {value:g} is not a number of seconds: give 0 or more, like {flag} 30")
    return args


def token_counts(s3, job: dict, job_id: str, owner: str) -> dict | None:
    """The job's manifest.json.out (token counts live there, not in the API), or None while it does not exist."""
    bucket, prefix = common.parse_s3_uri(job["output_s3_uri"])
    body = common.read_if_present(s3, bucket, f"{prefix}{job_id}/manifest.json.out", owner)
    try:
        return None if body is None else json.loads(body)
    except json.JSONDecodeError:
        return None


def print_status(job: dict, manifest: dict | None, name: str) -> None:
    """The article's status block; `name` is the job-info record's, shown when Bedrock leaves jobName out (the
    response model does not require it)."""
    common.banner("Batch Inference Job Status")
    print(f">>> STATUS: {job['status']} <<<")
    print("Job Information:")
    print(f"Job Name: {job.get('jobName') or name}")
    print(f"Job ARN: {job['jobArn']}")
    print(f"Submit Time: {job.get('submitTime')}")
    print(f"Last Modified: {job.get('lastModifiedTime')}")
    if job.get("endTime"):
        print(f"End Time: {job['endTime']}")
    total = job.get("totalRecordCount")
    if total is None:
        print("Status: Waiting for processing to begin...")
        print("(Processing statistics will appear once job starts)")
    else:
        processed = job.get("processedRecordCount", 0)
        print("Processing Statistics:")
        print(f"Total Records: {total}")
        print(f"Processed Records: {processed}")
        print(f"Success Records: {job.get('successRecordCount', 0)}")
        print(f"Error Records: {job.get('errorRecordCount', 0)}")
        if manifest:
            print(f"Input Tokens: {manifest.get('inputTokenCount', 0)}")
            print(f"Output Tokens: {manifest.get('outputTokenCount', 0)}")
        percent = 100.0 * processed / total if total else 0.0
        print(f"Progress: {percent:.1f}% ({processed}/{total})")
    if job.get("message"):
        print(f"Message: {job['message']}")
    print(f"Output Location: {job['outputDataConfig']['s3OutputDataConfig']['s3Uri']}")
    print(common.RULE)


def remove_input(s3, info: dict, job: dict, owner: str) -> None:
    """Delete the manifests the job read, so the folder is clean for the next job and the next run."""
    print(f"Cleaning up input JSONL files of {job['job_name']}...")
    removed = 0
    for manifest in job["manifests"]:
        if common.object_exists(s3, info["source_bucket"], manifest["s3_key"], owner):
            common.delete_object(s3, info["source_bucket"], manifest["s3_key"], owner)
            ok(f"Deleted: {common.printable(common.s3_uri(info['source_bucket'], manifest['s3_key']))}")
            removed += 1
    if not removed:
        print("(No JSONL files found to clean up)")
    job["input_removed"] = True


def ask_to_wait() -> bool:
    try:
        return input(PROMPT).strip().lower() in ("y", "yes")
    except EOFError:
        return False


def outcome(info: dict) -> int:
    statuses = [job.get("status") for job in info["jobs"]]
    if any(s in ("Failed", "Stopped", "Expired") for s in statuses):
        return EXIT_FAILED
    if "PartiallyCompleted" in statuses:
        return EXIT_PARTIAL
    return common.EXIT_OK


def finish(info: dict) -> int:
    code = outcome(info)
    batch = [job for job in info["jobs"] if not job.get("on_demand")]
    if code == common.EXIT_OK:
        errors = {job["job_name"]: (job.get("counts") or {}).get("errorRecordCount") or 0 for job in batch}
        if not batch:
            print("No batch job in this run: its images go on demand — step 3 embeds and loads them")
        elif not any(errors.values()):
            ok("Job completed successfully!" if len(batch) == 1 else "All jobs completed successfully!")
        for name, n in errors.items():
            if n:
                print(f"! Job {name} completed with {n} error records — 03 loads the rest and lists them")
        print("Next step: uv run 03_load_result_to_s3_vector_bucket.py")
        return code
    for job in info["jobs"]:
        if job.get("on_demand"):
            continue
        if job.get("status") == "PartiallyCompleted":
            print(f"! Job {job['job_name']} partially completed: not every record was processed in time.")
        elif job.get("status") != "Completed":
            print(f"✗ Job {job['job_name']} ended {job.get('status')}"
                  + (f": {job['message']}" if job.get("message") else ""))
    print("Next step: uv run 03_load_result_to_s3_vector_bucket.py loads what was produced and lists every image "
          "that was not; then 01_create_job.py --retry-failed")
    return code


class Run:
    """The run in the job-info file: polls its jobs, removes the inputs of those that ended, submits queued ones.
    `looking`: only polls (--no-wait): removes, submits and saves nothing."""

    def __init__(self, info: dict, config: common.Config, path, looking: bool = False):
        self.info, self.config, self.path, self.looking = info, config, path, looking
        self.bedrock = common.make_client("bedrock", config)
        self.s3 = common.make_client("s3", config)
        self.owner = common.bucket_owner(config, info["account_id"])
        self.single = len([job for job in info["jobs"] if not job.get("on_demand")]) == 1
        if not looking:  # it deletes manifests and submits jobs under the run's source prefix
            jobinfo.claim(path, self.s3, info["source_bucket"], info.get("source_prefix", ""), self.owner)

    def save(self) -> None:
        jobinfo.save(self.path, self.info)

    def pending(self) -> bool:
        """Whether the run has work a look leaves undone: inputs of ended jobs to remove, queued jobs to submit."""
        return any(not job.get("on_demand") and (not job.get("job_arn") or (
            job.get("status") in jobinfo.TERMINAL_STATUSES and not job.get("input_removed")))
            for job in self.info["jobs"])

    def poll(self) -> tuple[bool, list[str]]:
        """Check every job once; (whether the whole run has ended, the status block of a single-job run)."""
        block = []
        to_check = [job for job in jobinfo.submitted_jobs(self.info)
                    if not (job.get("status") in jobinfo.TERMINAL_STATUSES and job.get("input_removed"))]
        statuses = monitor.job_statuses(self.bedrock, to_check, self.info.get("created"))
        for job in to_check:
            status = statuses[job["job_arn"]]
            monitor.record_status(job, status)
            if self.single:
                manifest = token_counts(self.s3, job, naming.job_id_from_arn(job["job_arn"]), self.owner) \
                    if status.get("totalRecordCount") is not None else None
                with contextlib.redirect_stdout(io.StringIO()) as shown:
                    print_status(status, manifest, job["job_name"])
                block = shown.getvalue().splitlines()
            if job["status"] in jobinfo.TERMINAL_STATUSES and not job.get("input_removed") and not self.looking:
                remove_input(self.s3, self.info, job, self.owner)
        if not self.looking:
            self.save()
            jobs.submit_ready(self.s3, self.bedrock, self.info, self.config, lambda _: self.save(),
                              self.config.quotas.max_concurrent_jobs)
        ended = all(job.get("job_arn") and job.get("status") in jobinfo.TERMINAL_STATUSES
                    for job in self.info["jobs"] if not job.get("on_demand"))
        return ended, block


def run(argv, sleep=time.sleep, clock=time.monotonic, display: monitor.Display | None = None, ask=None) -> int:
    args = parse_args(argv)
    config = common.load_config(args)
    common.banner("Bedrock Batch Inference - Monitor Job")
    watch = Watch(args, config, sleep, clock, display or monitor.Display())
    if args.no_wait:  # only looks: no lock, nothing saved
        return watch.look()
    with jobinfo.locked(config.job_info_file, STEP, wait=args.wait_lock):
        ended = watch.start()
        if ended or args.wait or not sys.stdin.isatty():
            return watch.follow(waiting=args.wait)
    # Asked without the lock: a prompt left unanswered must not stop the next step (or the next day's run).
    if not (ask or ask_to_wait)():
        return watch.follow(waiting=False)
    watch.display.forget()
    with jobinfo.locked(config.job_info_file, STEP, wait=args.wait_lock):
        watch.start()  # the file as it is now: another step may have changed it meanwhile
        return watch.follow(waiting=True)


class Watch:
    """What 02 shows and how long: the run loaded from the job-info file, its polls, the waits between them."""

    def __init__(self, args, config: common.Config, sleep, clock, display: monitor.Display):
        self.args, self.config, self.sleep, self.clock, self.display = args, config, sleep, clock, display
        self.started, self.polls = clock(), 0
        self.info: dict = {}
        self.the_run: Run | None = None

    def load(self, looking: bool) -> None:
        path = self.config.job_info_file
        first = not self.info
        self.info = jobinfo.load(path)
        if first:
            print(f"Loaded job info from {path}")
            if len(self.info["jobs"]) == 1 and self.info["jobs"][0].get("job_arn"):
                print(f"Job ARN: {self.info['jobs'][0]['job_arn']}")
        self.the_run = Run(self.info, jobinfo.in_job_region(self.config, self.info), path, looking)

    def look(self) -> int:
        """--no-wait: one poll of the file as it is, nothing removed, submitted or saved."""
        self.load(looking=True)
        ended = self.check(waiting=False)
        if self.the_run.pending():
            print("(Only looked: 02_monitor_job.py without --no-wait, or daily_run.py, removes the inputs of the "
                  "jobs that ended and submits the queued ones.)")
        if not ended:
            print("The run is still going. Run 02_monitor_job.py again later (or with --wait).")
            return EXIT_RUNNING
        return finish(self.info)

    def start(self) -> bool:
        """Under the lock: load the file and poll once; whether the run has ended."""
        self.load(looking=False)
        return self.check(waiting=self.args.wait)

    def check(self, waiting: bool) -> bool:
        """Poll once and show it: what happened (submits, clean-ups) above the block, which a terminal redraws."""
        self.polls += 1
        with contextlib.redirect_stdout(io.StringIO()) as events:
            ended, block = self.the_run.poll()
        if not self.the_run.single:
            block = [common.RULE, f"Batch Inference Run: {len(self.info['jobs'])} jobs", common.RULE,
                     *monitor.run_lines(self.info, self.display.rows()), common.RULE]
        footer = f"[Poll #{self.polls}] {datetime.now().strftime('%Y-%m-%d %H:%M:%S')} · elapsed " \
                 f"{monitor.elapsed_text(self.clock() - self.started)}"
        if not ended and waiting and self.display.tty:
            footer += f" · next check in {self.args.interval:g} seconds"
        self.display.show(events.getvalue(), block + [footer])
        return ended

    def follow(self, waiting: bool) -> int:
        """Poll until the run ends (or --timeout), or say that it goes on when not `waiting`."""
        args, ended = self.args, all(job.get("job_arn") and job.get("status") in jobinfo.TERMINAL_STATUSES
                                     for job in self.info["jobs"] if not job.get("on_demand"))
        try:
            while not ended:
                if not waiting:
                    print("The run is still going. Run 02_monitor_job.py again later (or with --wait).")
                    return EXIT_RUNNING
                if args.timeout is not None and self.clock() - self.started + args.interval > args.timeout:
                    print(f"Timed out after {args.timeout:g}s; the jobs keep running.")
                    return EXIT_RUNNING
                if not self.display.tty:
                    print(f"Next check in {args.interval:g} seconds...")
                self.pause(args.interval)
                ended = self.check(waiting=True)
        except KeyboardInterrupt:
            print("\nStopped monitoring; the job keeps running. Run 02_monitor_job.py again to check on it.")
            return common.EXIT_INTERRUPTED
        return finish(self.info)

    def pause(self, seconds: float) -> None:
        """Sleep between polls, renewing the run's lease in S3 on the way when a long interval outlasts a renewal."""
        while seconds > 0:
            nap = min(seconds, lease.RENEW_EVERY)
            self.sleep(nap)
            seconds -= nap
            jobinfo.keep_leases()


def main(argv: list[str] | None = None) -> int:
    return common.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
