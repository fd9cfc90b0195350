"""Step 2: show the batch job's status and statistics and, on `y`, poll until it ends.

    uv run 02_monitor_job.py            # asks whether to keep polling (on a terminal)
    uv run 02_monitor_job.py --wait     # polls without asking (cron, scripts)
    uv run 02_monitor_job.py --no-wait  # prints the status once
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime

import common
import jobinfo
import jobs
from common import ok

SETTINGS = ("AWS_REGION", "JOB_INFO_FILE", "EXPECTED_BUCKET_OWNER", "MAX_CONCURRENT_JOBS")
EXIT_RUNNING = common.EXIT_RUNNING
EXIT_PARTIAL = common.EXIT_INCOMPLETE
EXIT_FAILED = common.EXIT_JOB_FAILED
PROMPT = "Job is still running. Monitor until completion? (y/n): "


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


def check(bedrock, s3, job: dict, owner: str, verbose: bool) -> dict:
    """Fetch the job's status into the job-info record; print the article's status block when `verbose`."""
    status = bedrock.get_model_invocation_job(jobIdentifier=job["job_arn"])
    job["status"] = status["status"]
    job["counts"] = {k: status.get(k) for k in ("totalRecordCount", "processedRecordCount", "successRecordCount",
                                                 "errorRecordCount") if status.get(k) is not None}
    if status.get("message"):
        job["message"] = status["message"]
    if verbose:
        manifest = token_counts(s3, job, common.job_id_from_arn(job["job_arn"]), owner) \
            if status.get("totalRecordCount") is not None else None
        print_status(status, manifest, job["job_name"])
    return status


def print_run(info: dict) -> None:
    """One line a job and the run's overall progress."""
    common.banner(f"Batch Inference Run: {len(info['jobs'])} jobs")
    total = processed = 0
    for job in info["jobs"]:
        counts = job.get("counts", {})
        status = job.get("status") or ("Submitting" if job.get("uploaded") else "Queued")
        total += job["record_count"]
        processed += counts.get("processedRecordCount", 0) if status not in ("Queued", "Submitting") else 0
        stats = f"{counts.get('processedRecordCount', 0)}/{job['record_count']}" if counts else f"-/{job['record_count']}"
        print(f"{job['job_name']:<40} {status:<18} {stats:>13}  {job['input_s3_uri']}")
    by_status: dict[str, int] = {}
    for job in info["jobs"]:
        key = job.get("status") or "Queued"
        by_status[key] = by_status.get(key, 0) + 1
    print("Jobs: " + ", ".join(f"{status} {n}" for status, n in sorted(by_status.items())))
    print(f"Overall progress: {100.0 * processed / max(total, 1):.1f}% ({processed}/{total} records)")
    print(common.RULE)


def remove_input(s3, info: dict, job: dict, owner: str) -> None:
    """Delete the manifests the job read, so the folder is clean for the next job and the next run."""
    print(f"Cleaning up input JSONL files of {job['job_name']}...")
    removed = 0
    for manifest in job["manifests"]:
        if common.object_exists(s3, info["source_bucket"], manifest["s3_key"], owner):
            common.delete_object(s3, info["source_bucket"], manifest["s3_key"], owner)
            ok(f"Deleted: {common.s3_uri(info['source_bucket'], manifest['s3_key'])}")
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
    if code == common.EXIT_OK:
        ok("Job completed successfully!" if len(info["jobs"]) == 1 else "All jobs completed successfully!")
        print("Next step: uv run 03_load_result_to_s3_vector_bucket.py")
        return code
    for job in info["jobs"]:
        if job.get("status") == "PartiallyCompleted":
            print(f"! Job {job['job_name']} partially completed: not every record was processed in time.")
        elif job.get("status") != "Completed":
            print(f"✗ Job {job['job_name']} ended {job.get('status')}"
                  + (f": {job['message']}" if job.get("message") else ""))
    print("Next step: uv run 03_load_result_to_s3_vector_bucket.py loads what was produced and lists every image "
          "that was not; then 01_create_job.py --retry-failed")
    return code


class Run:
    """The run in the job-info file: polls its jobs, removes the inputs of those that ended, submits queued ones."""

    def __init__(self, info: dict, config: common.Config, path):
        self.info, self.config, self.path = info, config, path
        self.bedrock = common.make_client("bedrock", config)
        self.s3 = common.make_client("s3", config)
        self.owner = common.bucket_owner(config, info["account_id"])

    def save(self) -> None:
        jobinfo.save(self.path, self.info)

    def poll(self) -> bool:
        """Check every job once; True when the whole run has ended."""
        single = len(self.info["jobs"]) == 1
        for job in common.submitted_jobs(self.info):
            if job.get("status") in common.TERMINAL_STATUSES and job.get("input_removed"):
                continue
            check(self.bedrock, self.s3, job, self.owner, verbose=single)
            if job["status"] in common.TERMINAL_STATUSES and not job.get("input_removed"):
                remove_input(self.s3, self.info, job, self.owner)
        self.save()
        jobs.submit_ready(self.s3, self.bedrock, self.info, self.config, lambda _: self.save(),
                          self.config.quotas.max_concurrent_jobs)
        if not single:
            print_run(self.info)
        return all(job.get("job_arn") and job.get("status") in common.TERMINAL_STATUSES for job in self.info["jobs"])


def run(argv, sleep=time.sleep, clock=time.monotonic) -> int:
    args = parse_args(argv)
    config = common.load_config(args)
    common.banner("Bedrock Batch Inference - Monitor Job")
    with jobinfo.locked(config.job_info_file, "02_monitor_job.py", wait=args.wait_lock):
        return monitor(args, config, sleep, clock)


def monitor(args, config: common.Config, sleep, clock) -> int:
    info = jobinfo.load(config.job_info_file)
    print(f"Loaded job info from {config.job_info_file}")
    if len(info["jobs"]) == 1 and info["jobs"][0].get("job_arn"):
        print(f"Job ARN: {info['jobs'][0]['job_arn']}")
    the_run = Run(info, common.in_job_region(config, info), config.job_info_file)

    ended = the_run.poll()
    waiting = args.wait
    if not ended and not args.wait and not args.no_wait and sys.stdin.isatty():
        waiting = ask_to_wait()
    started, poll = clock(), 1
    try:
        while not ended:
            if not waiting:
                print("The run is still going. Run 02_monitor_job.py again later (or with --wait).")
                return EXIT_RUNNING
            if args.timeout is not None and clock() - started + args.interval > args.timeout:
                print(f"Timed out after {args.timeout:g}s; the jobs keep running.")
                return EXIT_RUNNING
            print(f"Next check in {args.interval:g} seconds...")
            sleep(args.interval)
            poll += 1
            print(f"\n[Poll #{poll}] {datetime.now().strftime('%Y-%m-%d %H:%M:%S')}")
            ended = the_run.poll()
    except KeyboardInterrupt:
        print("\nStopped monitoring; the job keeps running. Run 02_monitor_job.py again to check on it.")
        return common.EXIT_INTERRUPTED
    return finish(info)


def main(argv: list[str] | None = None) -> int:
    return common.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
