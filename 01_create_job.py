"""Step 1: list the images under an S3 prefix, write a JSONL manifest of Nova Multimodal Embeddings requests,
upload it next to the images and submit a Bedrock batch inference job.

    uv run 01_create_job.py [--dry-run] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import common
from common import StepError, ok

SETTINGS = (
    "AWS_REGION",
    "SOURCE_BUCKET",
    "SOURCE_PREFIX",
    "RESULT_BUCKET",
    "RESULT_PREFIX",
    "ROLE_ARN",
    "MODEL_ID",
    "EMBEDDING_DIMENSION",
    "EMBEDDING_PURPOSE",
    "JOB_INFO_FILE",
    "EXPECTED_BUCKET_OWNER",
    "OUTPUT_KMS_KEY_ID",
)
REQUIRED = ("SOURCE_BUCKET", "RESULT_BUCKET", "ROLE_ARN")
EXAMPLES_PER_REASON = 5


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="list and build the manifest; upload and submit nothing")
    parser.add_argument("--force", action="store_true", help="replace a job-info file whose job has not ended")
    common.add_settings(parser, SETTINGS)
    return parser.parse_args(argv)


def classify(obj: dict) -> tuple[str | None, str | None]:
    """(image format, None) for an image the model takes, else (None, reason it is skipped)."""
    key = obj["Key"]
    if key.endswith("/"):
        return None, "folder marker"
    suffix = Path(key).suffix.lower()
    fmt = common.IMAGE_FORMATS.get(suffix)
    if fmt is None:
        return None, "not an image"
    if obj["Size"] == 0:
        return None, "empty"
    if obj["Size"] > common.MAX_IMAGE_BYTES:
        return None, "over the model's 50 MB"
    return fmt, None


def write_manifest(objects, config: common.Config, owner: str, path: Path):
    """Stream the listing into a JSONL manifest; returns (records, skipped by reason, own manifests, foreign .jsonl).

    The manifest is written through a temporary file, so an interrupted listing leaves no partial manifest.
    """
    skipped: dict[str, list[str]] = defaultdict(list)
    own_manifests: list[str] = []
    foreign: list[str] = []
    count = 0

    def write(fh):
        nonlocal count
        for obj in objects:
            key = obj["Key"]
            if key.lower().endswith(".jsonl"):
                (own_manifests if common.is_own_manifest(key) else foreign).append(key)
                continue
            fmt, reason = classify(obj)
            if fmt is None:
                skipped[reason].append(key)
                continue
            record = common.image_record(
                common.s3_uri(config.source_bucket, key),
                fmt,
                owner,
                config.embedding_dimension,
                config.embedding_purpose,
            )
            fh.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n")
            count += 1

    common.atomic_write(path, write)
    return count, skipped, own_manifests, foreign


def print_skipped(skipped: dict[str, list[str]]) -> None:
    if not skipped:
        return
    total = sum(len(keys) for keys in skipped.values())
    print(f"Skipped {total} object(s) that are not images the model takes:")
    for reason, keys in sorted(skipped.items()):
        print(f"  {reason}: {len(keys)}")
        for key in keys[:EXAMPLES_PER_REASON]:
            print(f"    - {key}")
        if len(keys) > EXAMPLES_PER_REASON:
            print(f"    ... and {len(keys) - EXAMPLES_PER_REASON} more")


def check_previous_run(bedrock, path: Path, force: bool) -> dict | None:
    """The previous run's job info when its submit never got an answer (to be retried as it was), else None.

    Refuses to replace a job that has not ended unless --force.
    """
    if not path.exists():
        return None
    info = common.load_job_info(path)
    pending = [job for job in info["jobs"] if not job.get("job_arn")]
    if pending:
        return info
    for job in common.submitted_jobs(info):
        status = bedrock.get_model_invocation_job(jobIdentifier=job["job_arn"])["status"]
        if status not in common.TERMINAL_STATUSES and not force:
            raise StepError(
                f"{path} holds job {job['job_name']} which is still {status} — monitor it with "
                "02_monitor_job.py, or pass --force to replace it"
            )
        print(f"Replacing {path} (job {job['job_name']} is {status})")
    return None


def submit(bedrock, config: common.Config, account: str, job: dict) -> str:
    """Submit the job; the clientRequestToken makes a repeated submit of the same job return the same ARN."""
    output = {"s3Uri": job["output_s3_uri"], "s3BucketOwner": common.bucket_owner(config, account)}
    if config.output_kms_key_id:
        output["s3EncryptionKeyId"] = config.output_kms_key_id
    response = bedrock.create_model_invocation_job(
        jobName=job["job_name"],
        roleArn=job["role_arn"],
        clientRequestToken=job["client_request_token"],
        modelId=job["model_id"],
        inputDataConfig={
            "s3InputDataConfig": {
                "s3Uri": job["input_s3_uri"],
                "s3InputFormat": "JSONL",
                "s3BucketOwner": common.bucket_owner(config, account),
            }
        },
        outputDataConfig={"s3OutputDataConfig": output},
    )
    return response["jobArn"]


def resume_submit(s3, bedrock, config: common.Config, info: dict) -> int:
    """Finish a run whose submit may or may not have reached Bedrock: same manifest, same token, same job."""
    job = info["jobs"][0]
    owner = common.bucket_owner(config, info["account_id"])
    print(f"Resuming the submit of {job['job_name']} from {config.job_info_file}")
    if not common.object_exists(s3, info["source_bucket"], job["manifest_s3_key"], owner):
        local = Path(job["manifest_local_path"])
        if not local.exists():
            raise StepError(f"manifest {local} is gone — delete {config.job_info_file} and run 01 again") from None
        upload(s3, local, info["source_bucket"], job["manifest_s3_key"], owner)
    return finish_submit(bedrock, config, info)


def upload(s3, local: Path, bucket: str, key: str, owner: str) -> None:
    print(f"Uploading JSONL to {common.s3_uri(bucket, key)}")
    s3.upload_file(str(local), bucket, key, ExtraArgs={"ExpectedBucketOwner": owner, "ContentType": "application/jsonl"})
    ok(f"Uploaded to {common.s3_uri(bucket, key)}")


def finish_submit(bedrock, config: common.Config, info: dict) -> int:
    job = info["jobs"][0]
    print(f"Creating batch inference job: {job['job_name']}")
    print(f"Model: {job['model_id']}")
    print(f"Input: {job['input_s3_uri']}")
    print(f"Output: {job['output_s3_uri']}")
    print(f"Role: {job['role_arn']}")
    job["job_arn"] = submit(bedrock, config, info["account_id"], job)
    job["job_id"] = common.job_id_from_arn(job["job_arn"])
    ok("Batch job created successfully!")
    print(f"Job ID: {job['job_id']}")
    print(f"Job ARN: {job['job_arn']}")
    print(f"Saving job information to {config.job_info_file}")
    common.save_job_info(config.job_info_file, info)
    ok("Job information saved")
    common.banner("✓ Batch Job Created Successfully!")
    print("Next steps:")
    print("1. Monitor job status: uv run 02_monitor_job.py")
    print("2. Load results to vector bucket: uv run 03_load_result_to_s3_vector_bucket.py")
    return common.EXIT_OK


def run(argv) -> int:
    args = parse_args(argv)
    config = common.load_config(args, REQUIRED)
    common.banner("Bedrock Batch Inference - Create Job")
    prefix = config.source_prefix
    input_uri = common.s3_uri(config.source_bucket, prefix)
    if not common.S3_URI_RE.fullmatch(input_uri):
        raise StepError(
            f"SOURCE_PREFIX {prefix!r} cannot be a Bedrock input folder: its s3Uri {input_uri} may hold only letters, "
            "digits and -!_*'(). in folder names — move the images under such a folder",
            common.EXIT_USAGE,
        )

    sts = common.make_client("sts", config)
    s3 = common.make_client("s3", config)
    bedrock = common.make_client("bedrock", config)

    pending = check_previous_run(bedrock, config.job_info_file, args.force) if not args.dry_run else None
    if pending:
        return resume_submit(s3, bedrock, config, pending)

    account = common.caller_account(sts)
    owner = common.bucket_owner(config, account)
    stamp = common.timestamp()
    manifest_name = f"{common.MANIFEST_PREFIX}{stamp}{common.MANIFEST_SUFFIX}"
    local = Path(manifest_name)

    print(f"Listing images from {input_uri} (including subdirectories)")
    objects = common.list_objects(s3, config.source_bucket, prefix, owner)
    print(f"Creating JSONL file: {manifest_name}")
    count, skipped, own_manifests, foreign = write_manifest(objects, config, owner, local)
    ok(f"Found {count} images")
    ok(f"Created JSONL with {count} records")
    print_skipped(skipped)
    if foreign or count < common.MIN_RECORDS_PER_JOB:
        local.unlink()
    if foreign:
        raise StepError(
            f"{common.s3_uri(config.source_bucket, foreign[0])} is a .jsonl this tool did not create; Bedrock would "
            f"read it as input of the job ({len(foreign)} such file(s)) — move it out of {input_uri}"
        )
    if count < common.MIN_RECORDS_PER_JOB:
        raise StepError(
            f"found {count} images under {input_uri}; a batch job needs at least {common.MIN_RECORDS_PER_JOB} "
            "— add images or use a larger prefix"
        )
    job = {
        "job_name": f"nova-mme-embedding-{stamp}",
        "model_id": config.model_id,
        "role_arn": config.role_arn,
        "embedding_dimension": config.embedding_dimension,
        "embedding_purpose": config.embedding_purpose,
        "input_s3_uri": input_uri,
        "output_s3_uri": common.s3_uri(config.result_bucket, config.result_prefix),
        "manifest_local_path": str(local.resolve()),
        "manifest_s3_key": prefix + manifest_name,
        "record_count": count,
        "created": common.now_iso(),
    }
    job["client_request_token"] = manifest_token(local, job["job_name"])
    if args.dry_run:
        print_dry_run(job, local)
        local.unlink()
        return common.EXIT_OK

    if own_manifests:
        print(f"Cleaning up old JSONL files from {input_uri}")
        for key in own_manifests:
            common.delete_object(s3, config.source_bucket, key, owner)
            print(f"Deleted: {key}")
        ok(f"Cleaned up {len(own_manifests)} old JSONL file(s)")
    upload(s3, local, config.source_bucket, job["manifest_s3_key"], owner)
    info = {
        "version": 1,
        "region": config.region,
        "account_id": account,
        "source_bucket": config.source_bucket,
        "source_prefix": prefix,
        "result_bucket": config.result_bucket,
        "result_prefix": config.result_prefix,
        "created": job["created"],
        "jobs": [job],
    }
    # Saved before the submit: if the answer is lost, the next run submits the same job with the same token.
    common.save_job_info(config.job_info_file, info)
    return finish_submit(bedrock, config, info)


def manifest_token(path: Path, job_name: str) -> str:
    """Deterministic clientRequestToken: the job's name and the manifest's content."""
    digest = hashlib.sha256(job_name.encode())
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def print_dry_run(job: dict, local: Path) -> None:
    with open(local, encoding="utf-8") as fh:
        first = fh.readline().strip()
    common.banner("Dry run: nothing uploaded, no job submitted")
    print(f"Would upload: {job['input_s3_uri']}{Path(job['manifest_s3_key']).name} ({local.stat().st_size} bytes)")
    print(f"Would create job: {job['job_name']}")
    print(f"Model: {job['model_id']}")
    print(f"Input: {job['input_s3_uri']}")
    print(f"Output: {job['output_s3_uri']}")
    print(f"Role: {job['role_arn']}")
    print(f"Records: {job['record_count']}")
    print(f"First record: {first}")


def main(argv: list[str] | None = None) -> int:
    return common.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
