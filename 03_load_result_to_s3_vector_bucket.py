"""Step 3: read the batch job's `.jsonl.out` results and load the vectors, with each image's S3 URI as metadata,
into an S3 Vectors index.

    uv run 03_load_result_to_s3_vector_bucket.py

Loads every job of the run. Results are streamed (memory stays flat whatever their size) and loaded at the
index's write quota. Interrupted, the step resumes where the index last confirmed. It ends with the account of
every image of every manifest — loaded, failed or missing — and lists those not loaded in
runs/<stamp>/not_loaded.jsonl; images Bedrock rejected for good go to failed_permanently.jsonl, which 01 reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import orjson

import common
from batch_embeddings import (accounting, jobinfo, jobs, loading, manifests, mirror, naming, ondemand, pacing, records,
                              streams, vectors)
from common import StepError, ok

SETTINGS = ("AWS_REGION", "VECTOR_BUCKET", "VECTOR_INDEX", "JOB_INFO_FILE", "EXPECTED_BUCKET_OWNER")
REQUIRED = ("VECTOR_BUCKET", "VECTOR_INDEX")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1] + "\n" + common.EXIT_CODES_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reload", action="store_true", help="load everything again, ignoring earlier progress")
    parser.add_argument("--accept-failures", action="store_true",
                        help="exit 0 even when some records failed (they are still reported)")
    parser.add_argument("--report", metavar="FILE",
                        help="where the images not loaded are listed (default: runs/<stamp>/not_loaded.jsonl)")
    parser.add_argument("--no-create", action="store_true",
                        help="refuse (exit 2) instead of creating a vector bucket or index that does not exist")
    parser.add_argument("--vectors-per-second", type=float, default=pacing.INDEX_VECTORS_PER_SECOND,
                        help=f"the index's write quota ({pacing.INDEX_VECTORS_PER_SECOND})")
    parser.add_argument("--requests-per-second", type=float, default=pacing.INDEX_REQUESTS_PER_SECOND,
                        help=f"the index's request quota ({pacing.INDEX_REQUESTS_PER_SECOND})")
    parser.add_argument("--threads", type=int, default=3, help="PutVectors requests in flight (3)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="processes that turn output lines into requests (default: the number of CPUs, at most "
                             f"4, for a run of {records.MIN_RECORDS:,} records or more on 2 CPUs or more; 0: in this "
                             "process)")
    parser.add_argument("--retry-for", type=float, default=900, metavar="SECONDS",
                        help="keep retrying a PutVectors the index does not accept for this long (900)")
    parser.add_argument("--verbose", action="store_true", help="print every batch")
    jobinfo.lock_args(parser)
    common.add_settings(parser, SETTINGS)
    args = parser.parse_args(argv)
    if args.vectors_per_second <= 0 or args.requests_per_second <= 0 or args.threads < 1:
        parser.error("--vectors-per-second, --requests-per-second and --threads must be positive")
    if args.workers is not None and args.workers < 0:
        parser.error("--workers must be 0 or more")
    return args


def output_files(s3, bucket: str, prefix: str, owner: str) -> list[dict]:
    return [o for o in common.objects_under(s3, bucket, prefix, owner) if o["Key"].endswith(".jsonl.out")]


def read_manifest(s3, bucket: str, key: str, owner: str) -> dict | None:
    body = common.read_if_present(s3, bucket, key, owner)
    try:
        return None if body is None else orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def load_job(job: dict, info: dict, clients, config: common.Config, args, limiter, workers) -> dict:
    """Stream one job's output files into the index; returns the job's counts.

    Where it starts: at the job's checkpoint when that was made against this vector bucket and index (a file
    done is skipped, a file begun is read from the byte after the last record the index confirmed), otherwise at
    the beginning. Each batch the index confirms moves the checkpoint; what the index refuses and what cannot be
    read go to the job's load report, which is cut back to the checkpoint on a resume."""
    s3, s3v, put_client, owner = clients
    job_id = naming.job_id_from_arn(job["job_arn"])
    print(f"Job Name: {job['job_name']}")
    print(f"Job ARN: {job['job_arn']}")
    print(f"Job ID: {job_id}")
    result_bucket, result_prefix = common.parse_s3_uri(job["output_s3_uri"])
    print(f"Batch Result Bucket: {result_bucket}")
    job_prefix = f"{result_prefix}{job_id}/"
    print(f"Listing output files from {common.s3_uri(result_bucket, job_prefix)}")
    files = output_files(s3, result_bucket, job_prefix, owner)
    ok(f"Found {len(files)} output files")

    where = {"vector_bucket": config.vector_bucket, "vector_index": config.vector_index}
    state = checkpoint_state(job, where)
    report_path = report_file(config.job_info_file, info, job_id)
    report = open_report(report_path, state)
    if state:
        print(f"Resuming: {state.get('counts', {}).get('inserted', 0)} vectors already confirmed")

    dimension = int(job.get("embedding_dimension", config.embedding_dimension))
    checkpoint = loading.Checkpoint(info, job, config.job_info_file, where)
    batcher = vectors.Batcher(config.vector_bucket, config.vector_index)
    loader = loading.Loader(job_id, dimension, batcher, report, state)
    loader.provenance = provenance_of(job, config)
    progress = loading.Progress(int(job.get("record_count") or 0), sys.stdout.isatty(), already=checkpoint.inserted)

    def on_done(batch: vectors.Batch) -> None:
        refused = {vector.key for vector in batch.refused}
        loader.provenance.written([key for key in batch.keys if key not in refused])  # before the checkpoint moves
        batcher.recycle(batch)
        checkpoint.confirm(batch)
        checkpoint.save()
        for vector in batch.refused:
            progress.print(f"! S3 Vectors refused the vector of {vector.source_uri or vector.key}: {vector.message} "
                           "— left out of the load, listed in the run's not_loaded.jsonl")
        if args.verbose and batch.count:
            progress.print(f"✓ Batch {batch.seq + 1}: Inserted {batch.count} vectors")
        progress.update(checkpoint.inserted)

    print("Inserting vectors to S3 Vectors...")
    print(f"Vector Bucket: {config.vector_bucket}")
    print(f"Index Name: {config.vector_index}")
    print(f"Batch Size: up to {vectors.MAX_VECTORS_PER_PUT} vectors / 20 MiB per request, "
          f"paced to {args.vectors_per_second:g} vectors/s")
    sender = pacing.PutVectorsSender(put_client, config.vector_bucket, config.vector_index, limiter,
                                      threads=args.threads, on_done=on_done, give_up_after=args.retry_for)
    started = time.monotonic()
    try:
        for obj in files:
            key = obj["Key"]
            done = state.get("files", {}).get(key, {})
            if done.get("done"):
                progress.print(f"Already loaded: {key}")
                continue
            offset = done.get("offset", 0)
            name = key.rsplit("/", 1)[-1]
            progress.print(f"Processing {name}..." + (f" (from byte {offset})" if offset else ""))
            extra = {"Range": f"bytes={offset}-"} if offset else {}
            body = s3.get_object(Bucket=result_bucket, Key=key, ExpectedBucketOwner=owner, **extra)["Body"]
            counted = loader.counts["total"]
            prefetch = streams.Prefetch(body)
            try:
                for result, start, end in records.examined(prefetch, offset, job_id, dimension, workers):
                    batch = loader.take(result, key, start, end)
                    if batch is not None:
                        sender.submit(batch)
            finally:
                prefetch.close()
            sender.submit(batcher.flush(loader.mark(key, obj["Size"], done=True), allow_empty=True))
            progress.print(f"✓ Processed {name} ({loader.counts['total'] - counted} records read)")
        sender.close()
    except BaseException:
        # Whatever stopped the load, keep what the index confirmed so the next run resumes there.
        checkpoint.save()
        report.close()
        progress.close()
        raise
    progress.close()
    close_report(report, report_path, checkpoint.refused)
    with checkpoint.lock:
        checkpoint.state = dict(checkpoint.state, finished=True)
    checkpoint.save()
    counts = dict(checkpoint.state.get("counts", loader.counts))
    refused = len(checkpoint.refused)  # read as vectors, refused by the index: failed records
    counts.update(success=counts["success"] - refused, error=counts["error"] + refused)
    elapsed = time.monotonic() - started
    ok(f"Total vectors inserted: {counts['inserted']} in {elapsed:.1f}s "
       f"({sender.stats['requests']} requests, {sender.stats['throttled']} throttled)")
    if loader.mismatched_ids:
        print(f"! {loader.mismatched_ids} output line(s) carry a recordId that 01 did not give their image; "
              "they were joined to their image by the URI in modelInput")
    cross_check(read_manifest(s3, result_bucket, f"{job_prefix}manifest.json.out", owner), job, counts)
    counts["confirmed_keys"] = checkpoint.confirmed_keys
    return counts


def provenance_of(job: dict, config: common.Config, today: bool = False) -> mirror.Provenance:
    """What the job's vectors record of their images (the sources 01 listed), and the journal they go into. The
    date: the job's (its batch ran after it was created), or today's for what is embedded on demand now."""
    embedded = common.now_iso() if today or not job.get("created") else job["created"]
    return mirror.Provenance(manifests.read_sources(job), job.get("model_id") or config.model_id,
                             job.get("embedding_purpose") or config.embedding_purpose, embedded[:10],
                             mirror.folder_of(config.job_info_file))


def checkpoint_state(job: dict, where: dict) -> dict:
    """The job's load checkpoint, when it was made against the vector bucket and index of `where`; else {} (the
    job is loaded from the start, and says why)."""
    state = job.get("load") or {}
    if state and {k: state.get(k) for k in where} != where:
        made = f"{state.get('vector_bucket', '?')}/{state.get('vector_index', '?')}"
        print(f"The load checkpoint of {job['job_name']} was made against {made}, not "
              f"{where['vector_bucket']}/{where['vector_index']}: loading this job from the start")
        job.pop("load")
        return {}
    return state


def open_report(path: Path, state: dict):
    """The job's load report, open for appending: cut back to what the checkpoint counted (the lines written
    after it are written again), or new when the job is loaded from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    report = open(path, "r+b" if state and path.exists() else "wb")
    report.truncate(state.get("report_bytes", 0))
    report.seek(0, 2)
    return report


def close_report(report, path: Path, refused: list[dict]) -> None:
    """The vectors the index refused go last; a report with nothing in it is removed."""
    report.writelines(orjson.dumps(entry) + b"\n" for entry in refused)
    report.close()
    if path.stat().st_size == 0:
        path.unlink()


def cross_check(manifest: dict | None, job: dict, counts: dict) -> None:
    """The records read against the count Bedrock's manifest.json.out gives; a difference goes into `counts`."""
    if manifest is None:
        print("(manifest.json.out not found: counts not cross-checked)")
    elif manifest.get("totalRecordCount") not in (None, counts["total"]):
        counts["mismatch"] = (f"manifest.json.out of {job['job_name']} counts {manifest['totalRecordCount']} "
                              f"records but the output holds {counts['total']}")
    else:
        ok("Counts match manifest.json.out")


def report_file(job_info_file: Path, info: dict, job_id: str) -> Path:
    """A job's load report: each output line step 3 could not load, in the run's folder."""
    return jobinfo.run_folder(job_info_file, info) / f"load_report_{job_id}.jsonl"


def run(argv) -> int:
    args = parse_args(argv)
    pacing.keep_memory_flat()
    config = common.load_config(args, REQUIRED)
    common.banner("Bedrock Batch Inference - Load Results to Vector Bucket")
    with jobinfo.locked(config.job_info_file, "03_load_result_to_s3_vector_bucket.py", wait=args.wait_lock):
        return load_run(args, config)


def load_run(args, config: common.Config) -> int:
    """Step 3 as the article tells it: load every job's results into the index, then account for every image.

    It refuses a run that has not ended (nothing is loaded from a job still running), and an index missing with
    --no-create or of another dimension, before any checkpoint is touched. It loads the jobs whose status leaves
    results (Completed, PartiallyCompleted, Stopped), then embeds and loads the run's on-demand part, then asks the
    index which images are there (accounting.account_run): exit 4 when some are not, with the list 01
    --retry-failed takes."""
    info = jobinfo.load(config.job_info_file)
    config = jobinfo.in_job_region(config, info)
    print(f"Loaded job info from {config.job_info_file}")

    # A job that had ended when last asked (02 records it) is not asked about again: then no Bedrock client.
    bedrock = common.make_client("bedrock", config) if any(map(jobs.needs_status, info["jobs"])) else None
    s3 = common.make_client("s3", config)
    s3v = common.make_client("s3vectors", config, max_pool_connections=accounting.THREADS + 2)
    # PutVectors goes out once per attempt: the sender sees every 429 and slows down itself.
    put_client = common.make_client("s3vectors", config, attempts=1, max_pool_connections=args.threads + 2)
    owner = common.bucket_owner(config, info["account_id"])
    # One run at a time on the source prefix, whatever machine or job-info file: held until the lock is released.
    jobinfo.claim(config.job_info_file, s3, info["source_bucket"], info.get("source_prefix", ""), owner)
    refuse_unfinished(jobs.refresh(bedrock, info))
    loadable = [job for job in info["jobs"] if job.get("status") in jobinfo.LOADABLE_STATUSES]
    dimension = max(int(job.get("embedding_dimension", config.embedding_dimension)) for job in info["jobs"])
    # Before any checkpoint is touched: a missing index refused (--no-create) or of another dimension changes nothing.
    vectors.ensure_index(s3v, config.vector_bucket, config.vector_index, dimension, create=not args.no_create)

    limiter = pacing.RateLimiter(args.vectors_per_second, args.requests_per_second)
    totals = {"total": 0, "success": 0, "error": 0, "inserted": 0}
    confirmed: set[str] = set()
    problems = []
    with records.pool(worker_processes(args, loadable)) as workers:  # before any thread starts
        if workers is not None:
            print(f"Output lines are read in {workers.workers} worker processes")
        for job in loadable:
            if args.reload:
                job.pop("load", None)
            counts = load_job(job, info, (s3, s3v, put_client, owner), config, args, limiter, workers)
            for key in totals:
                totals[key] += counts.get(key, 0)
            confirmed |= counts["confirmed_keys"]
            if "mismatch" in counts:
                problems.append(counts["mismatch"])
    for counts in load_on_demand_parts(info, config, args.reload, put_client, s3v, limiter):
        for key in totals:
            totals[key] += counts.get(key, 0)
        confirmed |= counts["confirmed_keys"]
    delete_gone(info, config, s3v, limiter)  # after the day's loads

    print_summary(totals, config, info.get("mirror"))
    run_dir = jobinfo.run_folder(config.job_info_file, info)
    path = Path(args.report) if args.report else run_dir / accounting.NOT_LOADED_NAME
    account = accounting.account_run(info, s3v, config, lambda job_id: report_file(config.job_info_file, info, job_id),
                                     path, confirmed)
    accounting.print_account(account)
    accounting.remember_permanent_failures(s3, s3v, config, owner, account["permanent"])
    print(common.RULE)
    if account["failed"] or account["missing"]:
        accounting.print_not_loaded(account["shown"], path, account["failed"] + account["missing"])
        problems.append("retry them with 01_create_job.py --retry-failed (the next run also picks up the missing "
                        "ones and those that failed for a passing reason)")
        info["account_file"] = str(path.resolve())
    else:
        path.unlink(missing_ok=True)
        info.pop("account_file", None)
    jobinfo.save(config.job_info_file, info)
    if not problems:
        ok("Results loaded successfully!")
        print("You can now query the vector bucket.")
        return common.EXIT_OK
    for problem in problems:
        print(f"! {problem}")
    return common.EXIT_OK if args.accept_failures else common.EXIT_INCOMPLETE


def refuse_unfinished(state: jobs.RunState) -> None:
    """Nothing is loaded while a job of the run is queued or still running."""
    running = [f"{job['job_name']} is queued" for job in state.queued]
    running += [f"{job['job_name']} is {job['status']}" for job in state.running]
    if running:
        raise StepError(f"the run has not ended ({'; '.join(running[:3])}) — wait for it with "
                        "02_monitor_job.py --wait", common.EXIT_REFUSED)


def worker_processes(args, loadable: list[dict]) -> int:
    """How many processes read output lines (--workers, or up to 4 when there are CPUs and lines enough)."""
    if args.workers is not None:
        return args.workers
    to_load = sum(int(job.get("record_count") or 0) for job in loadable if args.reload or not jobinfo.job_loaded(job))
    cpus = os.cpu_count() or 1  # one CPU: the main process and a worker would take turns on it
    return min(4, cpus) if cpus > 1 and to_load >= records.MIN_RECORDS else 0


def load_on_demand_parts(info: dict, config: common.Config, reload: bool, put_client, s3v, limiter):
    """The run's on-demand part (images too few for a job of their own): embedded here and loaded like a job;
    yields its counts."""
    parts = [job for job in info["jobs"] if ondemand.is_part(job) and (reload or not jobinfo.job_loaded(job))]
    if not parts:
        return
    runtime = common.make_client("bedrock-runtime", config, max_pool_connections=ondemand.THREADS + 2)
    for part in parts:
        counts = ondemand.load_part(part, config, runtime, put_client,
                                    report_file(config.job_info_file, info, part["job_name"]),
                                    ondemand.kept_file(jobinfo.run_folder(config.job_info_file, info)), lambda: None,
                                    limiter=limiter, reader=s3v, provenance=provenance_of(part, config, today=True))
        jobinfo.save(config.job_info_file, info)
        yield counts


def delete_gone(info: dict, config: common.Config, s3v, limiter) -> None:
    """The vectors of images gone from the source prefix, which 01 listed in the run's folder: deleted now that
    the run's vectors are loaded (once: a step 3 run again after it deletes nothing more)."""
    plan = info.get("mirror") or {}
    if not plan.get("to_delete") or plan.get("deletions_done"):
        return
    run_dir = jobinfo.run_folder(config.job_info_file, info)
    source = dataclasses.replace(config, source_bucket=info["source_bucket"],
                                 source_prefix=info.get("source_prefix", ""))
    keys = mirror.load_candidates(run_dir / mirror.TO_DELETE_NAME)
    out = run_dir / mirror.DELETED_NAME
    print(f"Deleting the vectors of {len(keys)} image(s) no longer under {mirror.source_uri_prefix(source)}")
    mirror.delete(s3v, source, keys, limiter, mirror.folder_of(config.job_info_file), out)
    plan.update(deleted=mirror.count_deleted(out), deletions_done=True)  # this run's and an interrupted one's
    info["mirror"] = plan
    jobinfo.save(config.job_info_file, info)
    ok(f"Deleted {plan['deleted']} vector(s) of images no longer in the bucket (listed in {out})")


def print_summary(totals: dict, config: common.Config, plan: dict | None = None) -> None:
    common.banner("Summary")
    if plan:
        print(f"Images: {plan.get('new', 0)} new, {plan.get('changed', 0)} changed (embedded again), "
              f"{plan.get('deleted', 0)} deleted from the index")
    print(f"Total Records Processed: {totals['total']}")
    print(f"Successful: {totals['success']}")
    print(f"Errors: {totals['error']}")
    print(f"Vectors Inserted: {totals['inserted']}")
    print(f"Vector Bucket: {config.vector_bucket}")
    print(f"Index Name: {config.vector_index}")


def main(argv: list[str] | None = None) -> int:
    return common.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
