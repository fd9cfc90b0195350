"""Step 2: show the batch job's status and statistics and, on `y`, poll until it ends.

    uv run 02_monitor_job.py            # asks whether to keep polling (on a terminal)
    uv run 02_monitor_job.py --wait     # polls without asking (cron, scripts)
    uv run 02_monitor_job.py --no-wait  # prints the status once

Exit status: 0 Completed; 3 still running (or --timeout reached); 4 PartiallyCompleted;
5 Failed, Stopped or Expired; 1 an AWS error; 2 a setting or the job-info file is wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime

import common
from common import ok

SETTINGS = ("AWS_REGION", "JOB_INFO_FILE", "EXPECTED_BUCKET_OWNER")
EXIT_RUNNING = 3
EXIT_PARTIAL = 4
EXIT_FAILED = 5
PROMPT = "Job is still running. Monitor until completion? (y/n): "


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--wait", action="store_true", help="poll until the job ends, without asking")
    mode.add_argument("--no-wait", action="store_true", help="print the status once and exit")
    parser.add_argument("--interval", type=float, default=30.0, metavar="SECONDS", help="seconds between polls (30)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="stop polling after this long")
    common.add_settings(parser, SETTINGS)
    args = parser.parse_args(argv)
    if args.interval < 0 or (args.timeout is not None and args.timeout < 0):
        parser.error("--interval and --timeout must not be negative")
    return args


def token_counts(s3, job: dict, job_id: str, owner: str) -> dict | None:
    """The job's manifest.json.out (token counts live there, not in the API), or None while it does not exist."""
    bucket, prefix = common.parse_s3_uri(job["output_s3_uri"])
    try:
        body = s3.get_object(Bucket=bucket, Key=f"{prefix}{job_id}/manifest.json.out", ExpectedBucketOwner=owner)["Body"]
        return json.loads(body.read())
    except s3.exceptions.NoSuchKey:
        return None
    except json.JSONDecodeError:
        return None


def print_status(job: dict, manifest: dict | None) -> None:
    common.banner("Batch Inference Job Status")
    print(f">>> STATUS: {job['status']} <<<")
    print("Job Information:")
    print(f"Job Name: {job['jobName']}")
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


def check(bedrock, s3, job: dict, owner: str) -> dict:
    """Fetch the job's status and print the article's status block."""
    status = bedrock.get_model_invocation_job(jobIdentifier=job["job_arn"])
    manifest = token_counts(s3, job, common.job_id_from_arn(job["job_arn"]), owner) if status.get("totalRecordCount") is not None else None
    print_status(status, manifest)
    return status


def remove_input(s3, info: dict, job: dict, owner: str) -> None:
    """Delete the manifest the job read, so the folder is clean for the next run (as in the article)."""
    print("Cleaning up input JSONL files...")
    key = job["manifest_s3_key"]
    if not common.object_exists(s3, info["source_bucket"], key, owner):
        print("(No JSONL files found to clean up)")
        return
    common.delete_object(s3, info["source_bucket"], key, owner)
    ok(f"Deleted: {common.s3_uri(info['source_bucket'], key)}")


def ask_to_wait() -> bool:
    try:
        return input(PROMPT).strip().lower() in ("y", "yes")
    except EOFError:
        return False


def finish(status: str, message: str | None) -> int:
    if status == "Completed":
        ok("Job completed successfully!")
        print("Next step: uv run 03_load_result_to_s3_vector_bucket.py")
        return common.EXIT_OK
    if status == "PartiallyCompleted":
        print("! Job partially completed: not every record was processed in time.")
        print("Next step: uv run 03_load_result_to_s3_vector_bucket.py (loads what was produced and lists the rest)")
        return EXIT_PARTIAL
    print(f"✗ Job ended {status}" + (f": {message}" if message else ""))
    if status == "Stopped":
        print("Next step: uv run 03_load_result_to_s3_vector_bucket.py loads what was produced before the stop")
    else:
        print("Next step: fix the cause, then uv run 04_remove_completed_task.py and uv run 01_create_job.py")
    return EXIT_FAILED


def run(argv, sleep=time.sleep, clock=time.monotonic) -> int:
    args = parse_args(argv)
    config = common.load_config(args)
    common.banner("Bedrock Batch Inference - Monitor Job")
    info = common.load_job_info(config.job_info_file)
    print(f"Loaded job info from {config.job_info_file}")
    jobs = common.submitted_jobs(info)
    if not jobs:
        raise common.StepError(f"{config.job_info_file} holds no submitted job — run 01_create_job.py again")
    job = jobs[0]
    print(f"Job ARN: {job['job_arn']}")
    config = common.in_job_region(config, info)
    bedrock = common.make_client("bedrock", config)
    s3 = common.make_client("s3", config)
    owner = common.bucket_owner(config, info["account_id"])

    status = check(bedrock, s3, job, owner)
    waiting = args.wait
    if status["status"] not in common.TERMINAL_STATUSES and not args.wait and not args.no_wait and sys.stdin.isatty():
        waiting = ask_to_wait()
    started, poll = clock(), 1
    try:
        while status["status"] not in common.TERMINAL_STATUSES:
            if not waiting:
                print(f"Job is {status['status']}. Run 02_monitor_job.py again later (or with --wait).")
                return EXIT_RUNNING
            if args.timeout is not None and clock() - started + args.interval > args.timeout:
                print(f"Timed out after {args.timeout:g}s; the job is still {status['status']} and keeps running.")
                return EXIT_RUNNING
            print(f"Next check in {args.interval:g} seconds...")
            sleep(args.interval)
            poll += 1
            print(f"\n[Poll #{poll}] {datetime.now().strftime('%Y-%m-%d %H:%M:%S')}")
            status = check(bedrock, s3, job, owner)
    except KeyboardInterrupt:
        print("\nStopped monitoring; the job keeps running. Run 02_monitor_job.py again to check on it.")
        return common.EXIT_INTERRUPTED
    remove_input(s3, info, job, owner)
    return finish(status["status"], status.get("message"))


def main(argv: list[str] | None = None) -> int:
    return common.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
