"""Step 1: list the images under an S3 prefix, write JSONL manifests of Nova Multimodal Embeddings requests,
upload them next to the images and submit Bedrock batch inference jobs.

    uv run 01_create_job.py [--dry-run] [--all] [--force] [--new-index] [--inventory s3://bucket/.../manifest.json]

Images the vector index holds unchanged (same ETag and size) are left out, changed ones embedded again (--all embeds
everything again); the vectors of images gone from the prefix are deleted after the run's loads, unless they are
more than MAX_DELETE_FRACTION or MAX_DELETE_COUNT allow (exit 10; --allow-mass-delete once; see docs/mirror.md).
More images than one job takes are split into several jobs by folder (see jobs.py); those the concurrent-job quota
does not let start yet stay queued in batch_job_info.json, and 02_monitor_job.py --wait submits them as slots free
up. A few images that would need a job of their own (up to ON_DEMAND_MAX_IMAGES) are left to step 3, which embeds
them on demand.

Before anything is uploaded: every setting step 3 needs is set (VECTOR_BUCKET, VECTOR_INDEX; --dry-run plans without
them), the vector index exists (a missing one is named with the indexes the bucket holds; a new index is started
only with --new-index, or `y` at the prompt on a terminal: unwatched, 01 refuses, exit 6), the service role exists,
and the results of a finished run are loaded (--force does not discard them: 03 loads them, 04 --force discards them).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import orjson

import common
from batch_embeddings import (accounting, cost, failed_permanently, jobinfo, jobs, keyset, lease, listing, manifests,
                              mirror, naming, nova, ondemand, pacing, preflight, selection, vectors)
from common import StepError, ok

SETTINGS = (
    "AWS_REGION",
    "SOURCE_BUCKET",
    "SOURCE_PREFIX",
    "RESULT_BUCKET",
    "RESULT_PREFIX",
    "VECTOR_BUCKET",
    "VECTOR_INDEX",
    "ROLE_ARN",
    "MODEL_ID",
    "EMBEDDING_DIMENSION",
    "EMBEDDING_PURPOSE",
    "JOB_INFO_FILE",
    "EXPECTED_BUCKET_OWNER",
    "OUTPUT_KMS_KEY_ID",
    "INVENTORY_BUCKET_OWNER",
    *common.QUOTA_SETTINGS,
    "ON_DEMAND_MAX_IMAGES",
    *common.COST_SETTINGS,
    *common.MIRROR_SETTINGS,
)
REQUIRED = common.RUN_REQUIRED  # a run that step 3 could not load is never started
DRY_RUN_REQUIRED = ("SOURCE_BUCKET", "RESULT_BUCKET", "ROLE_ARN")  # a dry run plans without the vector index
NEW_INDEX_PROMPT = "Start a new index {index} in vector bucket {bucket} (step 3 creates it)? (y/n): "


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2] + "\n\n" + common.EXIT_CODES_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="list and plan the jobs; upload and submit nothing")
    parser.add_argument("--all", action="store_true", help="embed every image, even those already in the index")
    parser.add_argument("--force", action="store_true",
                        help="start a new run although the last one's jobs are queued or still running (never over "
                             "results not loaded yet: 03 loads them, 04 --force discards them)")
    parser.add_argument("--new-index", action="store_true",
                        help="VECTOR_BUCKET/VECTOR_INDEX may name an index that does not exist yet: step 3 creates it "
                             "(the first run; without it 01 asks on a terminal and refuses unwatched, exit 6)")
    parser.add_argument("--retry-failed", nargs="?", const="", metavar="FILE",
                        help="submit exactly the images the last run did not load (runs/<stamp>/not_loaded.jsonl, "
                             "which 03 writes, or FILE) and those that failed permanently")
    parser.add_argument("--inventory", metavar="S3_URI",
                        help="read the objects from this S3 Inventory report (s3://bucket/.../manifest.json; CSV, "
                             "gzipped CSV or Parquet) instead of listing SOURCE_PREFIX")
    parser.add_argument("--allow-mass-delete", action="store_true",
                        help="delete the vectors of the images gone from SOURCE_PREFIX even when they are more than "
                             "MAX_DELETE_FRACTION or MAX_DELETE_COUNT allow (once: the next run checks again)")
    parser.add_argument("--no-delete", action="store_true",
                        help="delete no vector this run, whatever is gone from SOURCE_PREFIX (MIRROR_DELETES=false: "
                             "never)")
    parser.add_argument("--reembed-without-etag", action="store_true",
                        help="embed again the images whose vector records no ETag (written before vectors recorded "
                             "one; by default they are taken as current)")
    parser.add_argument("--on-demand", action="store_true",
                        help="with --retry-failed: when they are fewer than a job's minimum, embed them with "
                             "InvokeModel and load them straight away")
    jobinfo.lock_args(parser)
    common.add_settings(parser, SETTINGS)
    args = parser.parse_args(argv)
    if args.on_demand and args.retry_failed is None:
        parser.error("--on-demand goes with --retry-failed")
    if args.inventory is not None and args.retry_failed is not None:
        parser.error("--inventory and --retry-failed do not go together")
    return args


def embed_on_demand(chosen: selection.Listing, config: common.Config, owner: str, out_dir: Path) -> int:
    """Embed a few images with InvokeModel (the batch record's own request body) and load them like step 3."""
    if not (config.vector_bucket and config.vector_index):
        raise common.ConfigError("VECTOR_BUCKET and VECTOR_INDEX are needed to load images embedded on demand")
    runtime = common.make_client("bedrock-runtime", config, max_pool_connections=ondemand.THREADS + 2)
    s3v = common.make_client("s3vectors", config)
    dimension = config.embedding_dimension
    vectors.ensure_index(s3v, config.vector_bucket, config.vector_index, dimension)
    print(f"Embedding {chosen.images} image(s) on demand with {config.model_id}")
    requests = ((uri, nova.image_request(uri, fmt, owner, dimension, config.embedding_purpose))
                for uri, fmt in ((common.s3_uri(config.source_bucket, key), fmt)
                                 for key, fmt in chosen.images_in_order()))
    provenance = mirror.Provenance({}, config.model_id, config.embedding_purpose, common.now_iso()[:10],
                                   mirror.folder_of(config.job_info_file))  # a retry's images: ETags not known
    loaded, failed = ondemand.embed_and_load(requests, config, runtime, s3v, dimension, forget_done=True,
                                             kept=ondemand.retry_kept_file(out_dir.parent), provenance=provenance)
    failed = [dict(f, job_name=ondemand.JOB_ID) for f in failed]
    path = out_dir / accounting.NOT_LOADED_NAME
    if failed:
        common.atomic_write(path, lambda fh: fh.write(b"".join(orjson.dumps(f) + b"\n" for f in failed)))
    ok(f"Embedded and loaded {len(loaded)} image(s) on demand into {config.vector_index}")
    if failed:
        accounting.print_not_loaded(failed, path)
        return common.EXIT_INCOMPLETE
    return common.EXIT_OK


def index_keys(s3v, config: common.Config) -> keyset.KeySet:
    """Every key in the vector index (empty when it does not exist yet), read in parallel segments."""
    try:
        s3v.get_index(vectorBucketName=config.vector_bucket, indexName=config.vector_index)
    except s3v.exceptions.NotFoundException:
        return keyset.KeySet()
    keys = keyset.index_keys(s3v, config.vector_bucket, config.vector_index)
    print(f"  {len(keys)} key(s) in the index" + (f", {len(keys.foreign)} of them not written by this tool"
                                                  if keys.foreign else ""))
    return keys


def print_skipped(chosen: selection.Listing, rejects_file: Path | None = None) -> None:
    if chosen.skipped:
        print(f"Skipped {sum(chosen.skipped.values())} object(s) that are not images the model takes:")
        for reason, count in sorted(chosen.skipped.items()):
            print(f"  {reason}: {count}")
            for key in chosen.examples[reason]:
                print(f"    - {common.printable(key)}")
            if count > selection.EXAMPLES_PER_REASON:
                print(f"    ... and {count - selection.EXAMPLES_PER_REASON} more")
    for reason, n in sorted(chosen.left_out.items()):
        more = f" — see {rejects_file}; --retry-failed tries them again" if reason.startswith("failed perm") else ""
        print(f"Left out {n} image(s) that {reason}{more}" if more else f"Left out {n} image(s): {reason}")


def previous_run(bedrock, path: Path, force: bool) -> tuple[dict | None, dict | None, set[str]]:
    """What the job-info file's run means for this one: (the run to go on submitting, or None; the run this one
    replaces, or None; the vector keys of the images of a replaced run's jobs still running, which must not be
    submitted twice).

    A run with queued jobs (never submitted, or whose submit got no answer) is resumed. A run with jobs still
    running or not yet loaded is refused (exit 6) unless --force. Results that exist and are not loaded are never
    discarded, not even with --force (03 loads them; 04 --force discards them on purpose); jobs still running are
    left running by --force (a stuck run can be replaced), and said so. Nothing is changed here: the replaced run's
    files are removed by `retire` once this run is ready to be submitted.
    """
    if not jobinfo.exists(path):
        return None, None, set()
    info = jobinfo.load(path)
    if any(jobs.queued(job) for job in info["jobs"]) and not force:
        return info, None, set()
    state = jobs.refresh(bedrock, info)
    unfinished = [f"{job['job_name']} is {job['status']}" for job in state.running]
    unfinished += [f"{job['job_name']} " + (f"ended {job['status']}" if job.get("status") else "(on demand)")
                   + " but is not loaded" for job in state.unloaded]
    results = [job for job in state.unloaded if not job.get("on_demand")]  # an on-demand part is not paid for yet
    if unfinished and not force:
        raise StepError(f"{path} holds a run that has not finished ({'; '.join(unfinished[:3])}) — finish it with "
                        "02_monitor_job.py --wait, 03 and 04 (daily_run.py does all three)"
                        + ("" if results else ", or pass --force to start a new run"), common.EXIT_REFUSED)
    if results:
        names = "; ".join(f"{job['job_name']} ended {job['status']}" for job in results[:3])
        raise StepError(f"{path} holds results not loaded yet ({names}) — --force does not discard them: run "
                        "03_load_result_to_s3_vector_bucket.py first, or 04_remove_completed_task.py --force to "
                        "discard them on purpose", common.EXIT_REFUSED)
    in_flight: set[str] = set()
    for job in state.running:
        for manifest in job["manifests"]:
            if Path(manifest["local_path"]).exists():
                in_flight.update(naming.vector_key(uri) for _, uri in
                                 accounting.manifest_file_records(Path(manifest["local_path"])))
    if unfinished:
        print(f"Replacing the unfinished run in {path} (--force): {'; '.join(unfinished[:3])}")
    for job in state.running:
        print(f"! {job['job_name']} keeps running: this tool will not load what it writes to "
              f"{job['output_s3_uri']}{job.get('job_id', '')}/ (its images are left out of this run; "
              f"stop it with: aws bedrock stop-model-invocation-job --job-identifier {job['job_arn']})")
    return None, info, in_flight


def retire(old: dict | None, path: Path) -> None:
    """Remove the local manifests of the run this one replaces (its reports stay in its runs/ folder)."""
    if old is None:
        return
    print(f"Replacing the finished run in {path}")
    for job in old["jobs"]:
        for manifest in job["manifests"]:
            local = Path(manifest["local_path"])
            if naming.is_own_manifest(local.name):
                local.unlink(missing_ok=True)
        sources = manifests.sources_path(job)
        if sources is not None:
            sources.unlink(missing_ok=True)


def check_before_paying(s3, s3v, config: common.Config, owner: str, args) -> None:
    """What would make the jobs fail or their results unloadable, checked before anything is uploaded or paid for:
    the output s3Uri Bedrock must accept, the result bucket, the vector index (it exists, or the user means to
    start a new one) and the dimension of an existing index."""
    output = common.s3_uri(config.result_bucket, config.result_prefix)
    if len(output) > common.MAX_S3_URI or not common.S3_URI_RE.fullmatch(output):
        raise common.ConfigError(f"RESULT_PREFIX {config.result_prefix!r} cannot be a Bedrock output location: its "
                                 f"s3Uri {output[:80]} must be at most {common.MAX_S3_URI} characters of letters, "
                                 "digits and -!_*'(). in folder names")
    from botocore.exceptions import ClientError

    try:
        s3.list_objects_v2(Bucket=config.result_bucket, Prefix=config.result_prefix, MaxKeys=1,
                           ExpectedBucketOwner=owner)
    except ClientError as exc:
        if common.error_code(exc) == "NoSuchBucket":
            raise StepError(f"RESULT_BUCKET {config.result_bucket} does not exist — create it or fix RESULT_BUCKET; "
                            "nothing was uploaded", common.EXIT_USAGE) from None
        raise
    if s3v is None:
        return
    lookup = preflight.find_index(s3v, config.vector_bucket, config.vector_index, config.region)
    if lookup.denied:
        raise StepError(f"{lookup.problem} — check VECTOR_BUCKET and VECTOR_INDEX: the caller policy (bash "
                        "iam/setup_service_role.sh --user-policy) allows the ones it was made for; nothing was "
                        "uploaded", common.EXIT_ERROR)
    if lookup.index is None:
        confirm_new_index(lookup.problem, config, args)
        return  # step 3 creates it with EMBEDDING_DIMENSION
    index = lookup.index
    if index["dimension"] != config.embedding_dimension:
        raise StepError(f"index {config.vector_index} in {config.vector_bucket} holds {index['dimension']}-dimension "
                        f"vectors but EMBEDDING_DIMENSION={config.embedding_dimension} — set EMBEDDING_DIMENSION="
                        f"{index['dimension']} or choose another VECTOR_INDEX; nothing was uploaded", common.EXIT_USAGE)


def confirm_new_index(problem: str, config: common.Config, args) -> None:
    """Go on with a vector index that does not exist only when the user means to start one: --new-index, or `y` at
    a prompt on a terminal. Unwatched (cron, daily_run.py, no terminal) the run is refused, exit 6."""
    print(f"! {problem}")
    if args.new_index:
        print(f"  --new-index: step 3 creates index {config.vector_index} ({config.embedding_dimension} dimensions) "
              f"in vector bucket {config.vector_bucket}")
        return
    if args.dry_run:
        print("  a run refuses this unless VECTOR_BUCKET/VECTOR_INDEX are fixed, or --new-index starts a new index")
        return
    if sys.stdin is not None and sys.stdin.isatty():
        try:
            answer = input(NEW_INDEX_PROMPT.format(index=config.vector_index, bucket=config.vector_bucket))
        except EOFError:
            answer = ""
        if answer.strip().lower() in ("y", "yes"):
            return
    raise StepError(f"{problem} — fix VECTOR_BUCKET/VECTOR_INDEX, or pass --new-index to start a new index (step 3 "
                    "creates it); nothing was uploaded", common.EXIT_REFUSED)


def print_plan(job_records: list[dict], config: common.Config) -> None:
    """The plan: each job with its records, its wave and the jobs it waits for; the part embedded on demand."""
    quotas = config.quotas
    batch = [job for job in job_records if not job.get("on_demand")]
    roots = [job["input_folder"] for job in batch]
    waves = jobs.waves(roots, quotas.max_concurrent_jobs)
    wave_of = {i: w for w, members in enumerate(waves) for i in members}
    waits = jobs.waits_for(roots, waves)
    print(f"Planned {len(batch)} job(s) in {len(waves)} wave(s) (quotas: {quotas.min_records_per_job}-"
          f"{quotas.max_records_per_job} records per job, {quotas.max_records_per_file} per file, "
          f"{quotas.max_concurrent_jobs} at a time):")
    short = lambda i: batch[i]["job_name"].rsplit("-", 1)[-1] if len(batch) > 1 else batch[i]["job_name"]  # noqa
    for i, job in enumerate(batch):
        files = len(job["manifests"])
        if i not in waits:
            after = "starts at once"
        elif waits[i]:
            names = [short(j) for j in waits[i]]
            after = "after " + ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "") + \
                    " (folders nest)"
        else:
            after = f"when a slot frees ({quotas.max_concurrent_jobs} at a time)"
        print(f"  {job['job_name']}: wave {wave_of[i] + 1}, {job['record_count']} records in {files} file(s), "
              f"input {job['input_s3_uri']}, {after}")
    for job in job_records:
        if job.get("on_demand"):
            print(f"  {job['job_name']}: {job['record_count']} image(s) embedded on demand (InvokeModel) by step 3 "
                  f"instead of a job below the minimum of {quotas.min_records_per_job} "
                  f"(ON_DEMAND_MAX_IMAGES={config.on_demand_max_images})")


def run(argv) -> int:
    args = parse_args(argv)
    config = common.load_config(args, DRY_RUN_REQUIRED if args.dry_run else REQUIRED)
    common.banner("Bedrock Batch Inference - Create Job")
    prefix = config.source_prefix
    input_uri = common.s3_uri(config.source_bucket, prefix)
    if not common.S3_URI_RE.fullmatch(input_uri):
        raise StepError(
            f"SOURCE_PREFIX {prefix!r} cannot be a Bedrock input folder: its s3Uri {input_uri} may hold only letters, "
            "digits and -!_*'(). in folder names — move the images under such a folder",
            common.EXIT_USAGE,
        )
    if args.dry_run:  # changes nothing, so it needs no lock
        return create(args, config)
    with jobinfo.locked(config.job_info_file, "01_create_job.py", wait=args.wait_lock):
        return create(args, config)


def create(args, config: common.Config) -> int:
    """Step 1 as the article tells it: list the images, write the JSONL manifests, upload them, submit the jobs.

    What it decides, in order: whether this machine may start a run on the prefix (one run at a time, lease.py);
    whether an unfinished submission is resumed or a finished run replaced (previous_run); whether the run could be
    paid for and loaded (check_before_paying); which images are left out (already_done: already in the index, in a
    replaced run's job still running; failed for good, failed_permanently.py); and how the rest is split into jobs
    and an on-demand part (jobs.plan_jobs), under the cost limit (cost.guard)."""
    input_uri = common.s3_uri(config.source_bucket, config.source_prefix)
    sts = common.make_client("sts", config)
    s3 = common.make_client("s3", config)
    bedrock = common.make_client("bedrock", config)
    save = lambda info: jobinfo.save(config.job_info_file, info)  # noqa: E731
    replaced, in_flight = None, set()
    if not args.dry_run:
        claim_the_prefix(config, s3, sts, bedrock)
        unfinished, replaced, in_flight = previous_run(bedrock, config.job_info_file, args.force)
        if unfinished is not None:
            print(f"Resuming the submission of the run in {config.job_info_file}")
            preflight.check_role(common.make_client("iam", config), config.role_arn, common.caller_account(sts))
            jobs.submit_ready(s3, bedrock, unfinished, jobinfo.in_job_region(config, unfinished), save,
                              config.quotas.max_concurrent_jobs)
            return finish(unfinished, config)

    account_id = common.caller_account(sts)
    owner = common.bucket_owner(config, account_id)
    indexed = bool(config.vector_bucket and config.vector_index)
    s3v = keyset.fast_keys_client(common.make_client("s3vectors", config, max_pool_connections=keyset.THREADS + 2)) \
        if indexed else None
    check_before_paying(s3, s3v, config, owner, args)
    if not args.dry_run:
        preflight.check_role(common.make_client("iam", config), config.role_arn, account_id)

    rejects_file = failed_permanently.file_for(config.job_info_file)
    rejected = failed_permanently.load(rejects_file)
    retry = None
    if args.retry_failed is not None:
        retry = images_to_retry(args.retry_failed, config, rejected, rejects_file)
        if not retry:
            ok("Nothing to retry: the last run loaded every image and none failed permanently")
            return common.EXIT_OK
        rejected = {}  # --retry-failed tries the permanently failed images again
    exclude, state = already_done(args, config, s3v, retry, in_flight)

    stamp = new_run_stamp(config.job_info_file)
    run_dir = jobinfo.runs_folder(config.job_info_file) / stamp
    with tempfile.TemporaryDirectory(prefix="bedrock-batch-") as workdir:
        chosen = choose_images(args, config, s3, owner, retry, exclude, Path(workdir), rejected, state)
        ok(f"Found {chosen.images} images")
        print_skipped(chosen, rejects_file)
        refuse_foreign_manifests(chosen, config)
        gone = images_gone(args, config, state, chosen)
        print_mirror_counts(chosen, gone, state)
        if chosen.images == 0:
            if len(gone) and not args.dry_run:
                delete_now(s3v, config, gone, run_dir)
            ok("Nothing to do: no new images to embed")
            return common.EXIT_OK
        if retry is not None and chosen.images < config.quotas.min_records_per_job:
            return retry_on_demand(chosen, config, owner, run_dir, args.on_demand)
        if config.on_demand_max_images < chosen.images < config.quotas.min_records_per_job:
            raise StepError(
                f"found {chosen.images} images to embed under {input_uri}; a batch job needs at least "
                f"{config.quotas.min_records_per_job} — add images, use a larger prefix, or set "
                f"ON_DEMAND_MAX_IMAGES={chosen.images} to embed them on demand", common.EXIT_REFUSED
            )
        planned, on_demand_part = plan_run(chosen, config)
        cost.guard((common.s3_uri(config.source_bucket, k) for k, _ in chosen.images_in_order()), config)
        job_records = write_manifests(chosen, planned, config, owner, stamp, Path(workdir) if args.dry_run else run_dir,
                                      on_demand_part=on_demand_part, dry_run=args.dry_run)
        if len(gone) and not args.dry_run:  # 03 deletes them after the run's loads
            mirror.save_candidates(run_dir / mirror.TO_DELETE_NAME, gone)
        print_plan(job_records, config)
        if args.dry_run:
            print_dry_run(job_records, chosen.images, config)
            return common.EXIT_OK

    retire(replaced, config.job_info_file)
    remove_old_manifests(s3, chosen.own_manifests, config, owner)
    info = {
        "version": 2,
        "region": config.region,
        "account_id": account_id,
        "source_bucket": config.source_bucket,
        "source_prefix": config.source_prefix,
        "result_bucket": config.result_bucket,
        "result_prefix": config.result_prefix,
        "created": common.now_iso(),
        "run": stamp,
        "jobs": job_records,
    }
    if state is not None:
        info["mirror"] = {"new": chosen.images - chosen.changed, "changed": chosen.changed,
                          "unchanged": chosen.left_out.get("already in the vector index", 0), "to_delete": len(gone),
                          "deleted": 0, "deletions_done": False}
    save(info)  # the whole run, queued, before anything is submitted
    jobs.submit_ready(s3, bedrock, info, config, save, config.quotas.max_concurrent_jobs)
    return finish(info, config)


def claim_the_prefix(config: common.Config, s3, sts, bedrock) -> None:
    """One run at a time on the prefix, whatever machine or job-info file (lease.py): the lease while the step
    works; between its steps a run holds no lease, its jobs still running show it."""
    prefix = config.source_prefix
    jobinfo.claim(config.job_info_file, s3, config.source_bucket, prefix,
                  common.bucket_owner(config, common.caller_account(sts)))
    lease.refuse_other_runs(bedrock, config.source_bucket, prefix, jobinfo.job_ids(config.job_info_file))


def images_to_retry(retry_failed: str, config: common.Config, rejected: dict, rejects_file: Path) -> list[dict]:
    """--retry-failed: the images the last run did not load (its not_loaded.jsonl, or the file named) and those
    that failed permanently."""
    not_loaded_path = Path(retry_failed) if retry_failed else accounting.latest_not_loaded(config.job_info_file)
    retry = accounting.read_not_loaded(not_loaded_path) if not_loaded_path else []
    known = {entry["source_uri"] for entry in retry}
    failed_for_good = [entry for entry in rejected.values() if entry["source_uri"] not in known]
    retry += failed_for_good
    if retry:
        sources = [str(not_loaded_path)] if not_loaded_path else []
        sources += [str(rejects_file)] if failed_for_good else []
        print(f"Retrying the {len(retry)} image(s) the last runs did not load (from {' and '.join(sources)})")
    return retry


def already_done(args, config: common.Config, s3v, retry: list[dict] | None,
                 in_flight: set[str]) -> tuple[list[tuple[keyset.KeySet, str]], mirror.IndexState | None]:
    """The vector keys to leave out, each set with the reason 01 gives (a retry's images already in the index, and
    those in a job of the replaced run that is still running); and what the index holds (mirror.py), against which
    the listing tells new, changed and unchanged images apart and finds the images gone."""
    exclude: list[tuple[keyset.KeySet, str]] = []
    state = None
    if retry is not None and not args.all and s3v is not None:
        keys = [naming.vector_key(entry["source_uri"]) for entry in retry]
        exclude.append((keyset.KeySet.of(accounting.present_keys(s3v, config.vector_bucket, config.vector_index,
                                                                  keys)), "already in the vector index"))
    elif retry is None and s3v is not None:
        print(f"Checking which images are already in index {config.vector_index}")
        state = mirror.read(s3v, config, index_keys(s3v, config), mirror.folder_of(config.job_info_file))
    elif not args.all:  # a dry run only: a run needs them
        print("VECTOR_BUCKET/VECTOR_INDEX not set: every image is planned (a run needs them: step 3 loads into them)")
    if in_flight:
        exclude.append((keyset.KeySet.of(in_flight), "in a job of the replaced run still running"))
    return exclude, state


def images_gone(args, config: common.Config, state: mirror.IndexState | None, chosen: selection.Listing):
    """The keys of this prefix's vectors whose image the listing (complete: it got here) did not find; none when
    deletions are off. Too many of them stop the run before anything is paid for (exit 10), unless
    --allow-mass-delete; a dry run only says so."""
    if state is None or not config.mirror_deletes or args.no_delete:
        return mirror.no_keys()
    gone = mirror.deletions(state, chosen.seen)
    refusal = mirror.guard(len(gone), int(state.ours.sum()), config, args.allow_mass_delete)
    if refusal is not None:
        if not args.dry_run:
            mirror.refuse(refusal)
        print(f"! A run would refuse: {refusal}")
    return gone


def print_mirror_counts(chosen: selection.Listing, gone, state: mirror.IndexState | None) -> None:
    if state is None:
        return
    unchanged = chosen.left_out.get("already in the vector index", 0)
    print(f"Against the index: {chosen.images - chosen.changed} new, {chosen.changed} changed, {unchanged} "
          f"unchanged, {len(gone)} gone from the bucket (their vectors are deleted after the loads), "
          f"{sum(chosen.left_out.values()) - unchanged} left out for other reasons")


def delete_now(s3v, config: common.Config, gone, run_dir: Path) -> None:
    """A day with no image to embed: the vectors of the images gone are deleted at once (there is no load to wait
    for), listed in the run's folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    keys = [key.hex() for key in gone.tolist()]
    out = run_dir / mirror.DELETED_NAME
    print(f"Deleting the vectors of {len(keys)} image(s) no longer under "
          f"{common.s3_uri(config.source_bucket, config.source_prefix)}")
    deleted = mirror.delete(s3v, config, keys, pacing.RateLimiter.at_index_quota(),
                            mirror.folder_of(config.job_info_file), out)
    ok(f"Deleted {deleted} vector(s) of images no longer in the bucket (listed in {out})")


def new_run_stamp(job_info_file: Path) -> str:
    """The run's stamp (its runs/<stamp>/ folder): the time, made unique when two runs start within a second."""
    stamp = base = common.timestamp()
    while (jobinfo.runs_folder(job_info_file) / stamp).exists():
        stamp = f"{base}-{len(stamp) - len(base) + 2}"
    return stamp


def choose_images(args, config: common.Config, s3, owner: str, retry: list[dict] | None,
                  exclude: list[tuple[keyset.KeySet, str]], workdir: Path, rejected: dict,
                  state: mirror.IndexState | None) -> selection.Listing:
    """The run's images: those to retry, or those an S3 Inventory report lists, or those a listing of the prefix
    finds; less what `exclude` and `rejected` leave out, and those the index holds unchanged (`state`)."""
    if retry is not None:
        return selection.list_images(selection.retry_objects(retry, config), config, exclude, workdir, rejected)
    input_uri = common.s3_uri(config.source_bucket, config.source_prefix)
    compare = {"state": state, "reembed_unknown": args.reembed_without_etag, "everything": args.all}
    if args.inventory:
        print(f"Reading the images under {input_uri} from the S3 Inventory report {args.inventory}")
        return selection.list_inventory(s3, args.inventory, config, owner, exclude, workdir, rejected, **compare)
    print(f"Listing images from {input_uri} (including subdirectories)")
    client = common.make_client("s3", config, max_pool_connections=listing.LIST_THREADS + 2)
    lister = listing.fast_listing_client(client)
    objects = ((o["Key"], o["Size"], o.get("ETag")) for o in
               listing.list_in_parallel(lister, config.source_bucket, config.source_prefix, owner))
    return selection.list_images(objects, config, exclude, workdir, rejected, **compare)


def refuse_foreign_manifests(images: selection.Listing, config: common.Config) -> None:
    """Bedrock reads every .jsonl under a job's input folder: one this tool did not write stops the run."""
    if images.foreign:
        raise StepError(
            f"{common.s3_uri(config.source_bucket, min(images.foreign))} is a .jsonl this tool did not create; "
            f"Bedrock would read it as input of the job ({len(images.foreign)} such file(s)) — move it out of "
            f"{common.s3_uri(config.source_bucket, config.source_prefix)}", common.EXIT_REFUSED
        )


def retry_on_demand(images: selection.Listing, config: common.Config, owner: str, run_dir: Path,
                    on_demand: bool) -> int:
    """Fewer images to retry than a job's minimum: embedded with InvokeModel when --on-demand says so."""
    if not on_demand:
        raise StepError(f"{images.images} image(s) to retry, fewer than a batch job's minimum of "
                        f"{config.quotas.min_records_per_job} — run 01_create_job.py --retry-failed "
                        "--on-demand to embed them with InvokeModel", common.EXIT_REFUSED)
    cost.guard((common.s3_uri(config.source_bucket, k) for k, _ in images.images_in_order()), config,
               on_demand=True)
    return embed_on_demand(images, config, owner, run_dir)


def plan_run(images: selection.Listing, config: common.Config) -> tuple[list[jobs.PlannedJob], bool]:
    """The run's jobs over the folder tree (jobs.plan_jobs), and its on-demand part last when it has one (then
    the second value is True)."""
    can_root = lambda folder: bool(common.S3_URI_RE.fullmatch(common.s3_uri(config.source_bucket, folder)))  # noqa
    plan = jobs.plan_jobs({f: tuple(c) for f, c in images.counts.items()}, config.source_prefix, config.quotas,
                          can_root, config.on_demand_max_images)
    if plan.on_demand:
        return [*plan.jobs, jobs.PlannedJob(config.source_prefix, plan.on_demand)], True
    return plan.jobs, False


def write_manifests(images: selection.Listing, planned: list[jobs.PlannedJob], config: common.Config, owner: str,
                    stamp: str, manifest_dir: Path, *, on_demand_part: bool, dry_run: bool) -> list[dict]:
    """The JSONL manifests of every planned job, written into `manifest_dir` (the run's folder; a dry run's is
    temporary); the last is the on-demand part when `on_demand_part`. The run's folder is removed again when
    writing fails."""
    print("Creating JSONL files")
    manifest_dir.mkdir(parents=True, exist_ok=True)
    try:
        job_records = manifests.write(images, planned, config, owner, stamp, manifest_dir)
    except BaseException:
        if not dry_run:
            shutil.rmtree(manifest_dir, ignore_errors=True)
        raise
    if on_demand_part:
        mark_on_demand(job_records[-1], stamp)
    for job in job_records:
        for manifest in job["manifests"]:
            print(f"Created {Path(manifest['local_path']).name} with {manifest['records']} records")
    ok(f"Created JSONL with {images.images} records")
    return job_records


def print_dry_run(job_records: list[dict], records: int, config: common.Config) -> None:
    first = orjson.loads(Path(job_records[0]["manifests"][0]["local_path"]).read_bytes().split(b"\n", 1)[0])
    common.banner("Dry run: nothing uploaded, no job submitted")
    print(f"Model: {config.model_id}")
    print(f"Output: {job_records[0]['output_s3_uri']}")
    print(f"Role: {config.role_arn}")
    print("Vector index: " + (f"{config.vector_index} in vector bucket {config.vector_bucket}"
                              if config.vector_bucket and config.vector_index
                              else "not set (VECTOR_BUCKET, VECTOR_INDEX: a run needs them)"))
    print(f"Records: {records}")
    print(f"First record: {orjson.dumps(first).decode()}")


def remove_old_manifests(s3, keys: list[str], config: common.Config, owner: str) -> None:
    """This tool's manifests a run before left under the prefix: Bedrock would read them as input again."""
    if not keys:
        return
    print(f"Cleaning up old JSONL files from {common.s3_uri(config.source_bucket, config.source_prefix)}")
    for key in keys:
        common.delete_object(s3, config.source_bucket, key, owner)
        print(f"Deleted: {common.printable(key)}")
    ok(f"Cleaned up {len(keys)} old JSONL file(s)")


def mark_on_demand(record: dict, stamp: str) -> None:
    """The run's on-demand part: a manifest like a job's, never uploaded nor submitted; step 3 embeds it."""
    sources = manifests.sources_path(record)
    record.update(job_name=f"nova-mme-embedding-{stamp}-on-demand", on_demand=True)
    sources.rename(manifests.sources_path(record))


def finish(info: dict, config: common.Config) -> int:
    submitted = [j for j in info["jobs"] if j.get("job_arn")]
    waiting = [j for j in info["jobs"] if jobs.queued(j)]
    parts = [j for j in info["jobs"] if j.get("on_demand")]
    for job in submitted:
        print(f"Job {job['job_name']}: {job['job_arn']}")
    print(f"Saving job information to {config.job_info_file}")
    ok("Job information saved")
    if len(info["jobs"]) == 1 and submitted:
        job = submitted[0]
        ok("Batch job created successfully!")
        print(f"Job ID: {job['job_id']}")
        print(f"Job ARN: {job['job_arn']}")
    for part in parts:
        print(f"{part['record_count']} image(s) go on demand: step 3 embeds them with InvokeModel and loads them")
    common.banner(f"✓ Batch Job{'s' if len(submitted) != 1 else ''} Created Successfully!" if submitted
                  else "Jobs queued" if waiting else "No batch job: the images go on demand")
    if waiting:
        print(f"{len(waiting)} job(s) queued: 02_monitor_job.py --wait submits them as slots free up.")
    print("Next steps:")
    print("1. Monitor job status: uv run 02_monitor_job.py")
    print("2. Load results to vector bucket: uv run 03_load_result_to_s3_vector_bucket.py")
    return common.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return common.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
