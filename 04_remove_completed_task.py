"""Step 4: remove the run's manifests (local and in S3) and the local job file, so nothing is processed twice.

    uv run 04_remove_completed_task.py [--force]

Only what 01_create_job.py created is removed, with the embeddings step 3 kept of the run's on-demand part. Kept:
the results in the result bucket, and in runs/<stamp>/ the run's load reports and the list of images not loaded
(the run's folder goes when nothing is left in it).
Refuses (exit 6) while the job has not ended, or while its results are not loaded yet, unless --force.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common
from batch_embeddings import jobinfo, jobs, naming, ondemand
from batch_embeddings import manifests as manifest_files
from common import StepError, ok

SETTINGS = ("AWS_REGION", "JOB_INFO_FILE", "EXPECTED_BUCKET_OWNER")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1] + "\n" + common.EXIT_CODES_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="clean up even if the job runs or is not loaded")
    jobinfo.lock_args(parser)
    common.add_settings(parser, SETTINGS)
    return parser.parse_args(argv)


def check_can_remove(bedrock, info: dict) -> None:
    state = jobs.refresh(bedrock, info)
    for job in state.queued:
        raise StepError(f"job {job['job_name']} is still queued — let 02_monitor_job.py --wait submit it, "
                        "or pass --force", common.EXIT_REFUSED)
    for job in state.running:
        raise StepError(f"job {job['job_name']} is still {job['status']} — wait for it (02_monitor_job.py --wait) "
                        "or pass --force", common.EXIT_REFUSED)
    for job in state.unloaded:
        raise StepError(f"the results of job {job['job_name']} are not loaded yet — run "
                        "03_load_result_to_s3_vector_bucket.py first, or pass --force", common.EXIT_REFUSED)


def run(argv) -> int:
    args = parse_args(argv)
    config = common.load_config(args)
    common.banner("Bedrock Batch Inference - Remove Completed Task Files")
    with jobinfo.locked(config.job_info_file, "04_remove_completed_task.py", wait=args.wait_lock):
        return remove(args, config)


def remove(args, config: common.Config) -> int:
    info = jobinfo.load(config.job_info_file)
    config = jobinfo.in_job_region(config, info)
    print(f"Loaded job info from {config.job_info_file}")
    for job in info["jobs"]:
        print(f"Job Name: {job['job_name']}")
        if job.get("job_arn"):
            print(f"Job ID: {naming.job_id_from_arn(job['job_arn'])}")
    s3 = common.make_client("s3", config)
    if not args.force:
        check_can_remove(common.make_client("bedrock", config), info)
    owner = common.bucket_owner(config, info["account_id"])
    bucket = info["source_bucket"]
    # One run at a time on the source prefix, whatever machine or job-info file: held until the lock is released.
    jobinfo.claim(config.job_info_file, s3, bucket, info.get("source_prefix", ""), owner)
    manifests = [m for job in info["jobs"] for m in job["manifests"]]  # only this tool's (jobinfo.load checks)

    print(f"Removing S3 JSONL files from {common.s3_uri(bucket, info.get('source_prefix', ''))}...")
    removed_s3 = 0
    for manifest in manifests:
        if common.object_exists(s3, bucket, manifest["s3_key"], owner):
            common.delete_object(s3, bucket, manifest["s3_key"], owner)
            ok(f"Deleted: {common.s3_uri(bucket, manifest['s3_key'])}")
            removed_s3 += 1
    if not removed_s3:
        print("(No S3 JSONL files left to remove)")

    print("Removing local files...")
    removed_local = 0
    for manifest in manifests:
        local = Path(manifest["local_path"])
        if local.exists():
            local.unlink()
            ok(f"Deleted: {local.name}")
            removed_local += 1
    for job in info["jobs"]:  # the sources 01 listed beside the manifests (batch_embeddings/manifests.py)
        sources = manifest_files.sources_path(job)
        if sources is not None and sources.exists():
            sources.unlink()
            ok(f"Deleted: {sources.name}")
            removed_local += 1
    run_dir = jobinfo.run_folder(config.job_info_file, info)
    embedded = ondemand.kept_file(run_dir)  # the on-demand part's embeddings: loaded by 03 (or given up: --force)
    if embedded.exists():
        embedded.unlink()
        ok(f"Deleted: {embedded.name}")
        removed_local += 1
    kept = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if run_dir.is_dir() and not kept:
        run_dir.rmdir()
    config.job_info_file.unlink()  # last: until here a re-run can finish the clean-up
    ok(f"Deleted: {config.job_info_file}")
    removed_local += 1

    common.banner("Cleanup Summary")
    print(f"Local files removed: {removed_local}")
    print(f"S3 JSONL files removed: {removed_s3}")
    print(common.RULE)
    ok("Cleanup completed successfully!")
    print("Task files have been removed from local and S3.")
    if kept:
        print(f"Kept in {run_dir}: {', '.join(kept)}")
    return common.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return common.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
