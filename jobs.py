"""Jobs sized to Bedrock's quotas: planning a run's jobs over a folder tree, and submitting them as slots free up.

Bedrock reads *every* `.jsonl` under a job's input folder, and a record's image must sit under that folder. So
two jobs whose input folders nest (one is the other or inside it) must never have manifests in S3 at the same
time. The plan gives each job the highest folder it can have: a folder whose whole subtree fits one job becomes
one job; a folder too large is split among its sub-folders, and what lies directly in it (plus sub-folders too
small for a job of their own) is cut into balanced jobs rooted at it. Jobs whose folders nest run one after
another; jobs in separate folders run side by side, at most MAX_CONCURRENT_JOBS at a time. A job's manifest is
uploaded only when the job is submitted and removed when it ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import common

# An allocation: the direct images of `folder` with listing index start <= i < end.
Allocation = tuple[str, int, int]


@dataclass
class Folder:
    images: int = 0  # directly in this folder
    bytes: int = 0  # their manifest lines
    children: set[str] = field(default_factory=set)


@dataclass
class PlannedJob:
    root: str  # the job's input folder (a prefix ending in "/", or "" for the bucket)
    allocations: list[Allocation]

    @property
    def records(self) -> int:
        return sum(end - start for _, start, end in self.allocations)


def parent_folder(folder: str) -> str:
    return folder[: folder.rstrip("/").rfind("/") + 1] if folder else ""


def folder_of(key: str) -> str:
    return key[: key.rfind("/") + 1]


def folder_tree(counts: dict[str, tuple[int, int]], root: str) -> dict[str, Folder]:
    """Folders under `root` with their direct image counts, every intermediate folder included."""
    tree = {root: Folder()}
    for folder, (images, size) in counts.items():
        node = tree.setdefault(folder, Folder())
        node.images, node.bytes = images, size
        while folder != root:
            parent = parent_folder(folder)
            tree.setdefault(parent, Folder()).children.add(folder)
            folder = parent
    return tree


def plan_jobs(counts: dict[str, tuple[int, int]], root: str, quotas: common.Quotas, can_root) -> list[PlannedJob]:
    """Partition the images under `root` into jobs within the quotas.

    `counts` maps each folder to (images directly in it, bytes of their manifest lines); `can_root(folder)` says
    whether Bedrock accepts the folder as an input s3Uri. Every image lands in exactly one job.
    """
    tree = folder_tree(counts, root)
    totals: dict[str, tuple[int, int]] = {}

    def total(folder: str) -> tuple[int, int]:
        if folder not in totals:
            node = tree[folder]
            n, b = node.images, node.bytes
            for child in node.children:
                cn, cb = total(child)
                n, b = n + cn, b + cb
            totals[folder] = (n, b)
        return totals[folder]

    def subtree(folder: str) -> list[Allocation]:
        node = tree[folder]
        own = [(folder, 0, node.images)] if node.images else []
        return own + [a for child in sorted(node.children) for a in subtree(child)]

    def fits_one_job(n: int, b: int) -> bool:
        return quotas.min_records_per_job <= n <= quotas.max_records_per_job and b <= quotas.max_job_bytes

    def visit(folder: str) -> tuple[list[PlannedJob], list[Allocation]]:
        n, b = total(folder)
        if can_root(folder) and fits_one_job(n, b):
            return [PlannedJob(folder, subtree(folder))], []
        if n < quotas.min_records_per_job:
            return [], subtree(folder)
        jobs: list[PlannedJob] = []
        node = tree[folder]
        leftover = [(folder, 0, node.images)] if node.images else []
        for child in sorted(node.children):
            child_jobs, child_leftover = visit(child)
            jobs += child_jobs
            leftover += child_leftover
        left = sum(end - start for _, start, end in leftover)
        if can_root(folder) and left >= quotas.min_records_per_job:
            jobs += [PlannedJob(folder, chunk) for chunk in split(leftover, _chunks(leftover, left, tree, quotas))]
            leftover = []
        return jobs, leftover

    jobs, leftover = visit(root)
    if leftover:
        jobs = absorb(jobs, leftover, root, quotas)
    return jobs


def _chunks(leftover: list[Allocation], n: int, tree: dict[str, Folder], quotas: common.Quotas) -> int:
    size = sum(tree[f].bytes * (end - start) / max(tree[f].images, 1) for f, start, end in leftover)
    return max(math.ceil(n / quotas.max_records_per_job), math.ceil(size * 1.05 / quotas.max_job_bytes), 1)


def split(allocations: list[Allocation], parts: int) -> list[list[Allocation]]:
    """Cut allocations into `parts` runs of nearly equal size, in order."""
    n = sum(end - start for _, start, end in allocations)
    sizes = [n // parts + (1 if i < n % parts else 0) for i in range(parts)]
    chunks, current, need = [], [], sizes[0]
    queue = list(allocations)
    while queue:
        folder, start, end = queue.pop(0)
        take = min(end - start, need)
        current.append((folder, start, start + take))
        need -= take
        if start + take < end:
            queue.insert(0, (folder, start + take, end))
        if need == 0:
            chunks.append(current)
            current = []
            if len(chunks) < parts:
                need = sizes[len(chunks)]
    return chunks


def absorb(jobs: list[PlannedJob], leftover: list[Allocation], root: str, quotas: common.Quotas) -> list[PlannedJob]:
    """Give images too few for a job of their own to a job rooted at `root`; nothing is dropped."""
    left = sum(end - start for _, start, end in leftover)
    if not jobs:
        return [PlannedJob(root, leftover)]  # fewer than the minimum in all: the caller reports it
    roomy = [j for j in jobs if j.records + left <= quotas.max_records_per_job]
    if roomy:
        target = min(roomy, key=lambda j: j.records)
        target.root = root  # moved up to the run's folder, which holds both
        target.allocations += leftover
        return jobs
    # Every job is full: lend the leftover enough images from the largest job to make a job of its own.
    donor = max(jobs, key=lambda j: j.records)
    want = quotas.min_records_per_job - left
    keep, lent = _take_last(donor.allocations, want)
    donor.allocations = keep
    return jobs + [PlannedJob(root, leftover + lent)]


def _take_last(allocations: list[Allocation], count: int) -> tuple[list[Allocation], list[Allocation]]:
    keep, lent = list(allocations), []
    while count:
        folder, start, end = keep.pop()
        take = min(count, end - start)
        lent.insert(0, (folder, end - take, end))
        if end - take > start:
            keep.append((folder, start, end - take))
        count -= take
    return keep, lent


# --------------------------------------------------------------------------------------------------------------
# Submitting
# --------------------------------------------------------------------------------------------------------------


def nested(a: str, b: str) -> bool:
    """Whether two input folders overlap: one of them would read the other's manifests."""
    return a.startswith(b) or b.startswith(a)


def active(job: dict) -> bool:
    """Submitted (or being submitted) and not ended: its manifests are in S3."""
    return bool(job.get("uploaded")) and job.get("status") not in common.TERMINAL_STATUSES


def queued(job: dict) -> bool:
    return not job.get("job_arn")


@dataclass
class RunState:
    """The jobs of a run that keep it from being finished, by reason."""

    queued: list[dict] = field(default_factory=list)
    running: list[dict] = field(default_factory=list)
    unloaded: list[dict] = field(default_factory=list)  # ended with results that step 3 has not loaded


def refresh(bedrock, info: dict) -> RunState:
    """Ask Bedrock for every submitted job's status (kept in its record) and sort out what is unfinished."""
    state = RunState()
    for job in info["jobs"]:
        if queued(job):
            state.queued.append(job)
            continue
        job["status"] = bedrock.get_model_invocation_job(jobIdentifier=job["job_arn"])["status"]
        if job["status"] not in common.TERMINAL_STATUSES:
            state.running.append(job)
        elif job["status"] in common.LOADABLE_STATUSES and not common.job_loaded(job):
            state.unloaded.append(job)
    return state


def submit_ready(s3, bedrock, info: dict, config: common.Config, save, max_concurrent: int) -> list[dict]:
    """Submit the queued jobs that may start now; returns those submitted.

    A job waits while MAX_CONCURRENT_JOBS jobs run or while a job whose folder nests with its own runs.
    ServiceQuotaExceeded and throttling leave it queued for the next call (02 --wait calls again).
    """
    from botocore.exceptions import ClientError

    owner = common.bucket_owner(config, info["account_id"])
    submitted = []
    for job in info["jobs"]:
        if not queued(job):
            continue
        running = [j for j in info["jobs"] if j is not job and active(j)]
        if not job.get("uploaded"):
            if len(running) >= max_concurrent or any(nested(job["input_folder"], j["input_folder"]) for j in running):
                continue
            upload_manifests(s3, info["source_bucket"], job, owner)
            job["uploaded"] = True
            save(info)  # before the submit: a lost answer is resubmitted with the same token
        try:
            job["job_arn"] = create_job(bedrock, owner, job)
        except ClientError as exc:
            found = earlier_submit(bedrock, job, exc)
            if found:
                print(f"Job {job['job_name']} was already submitted (the answer was lost): {found}")
                job["job_arn"] = found
            elif common.error_code(exc) in ("ValidationException", "AccessDeniedException"):
                raise common.StepError(f"{common.describe_aws_error(exc)} — fix the cause, then "
                                       "01_create_job.py --force plans the run again") from None
            elif common.error_code(exc) not in ("ServiceQuotaExceededException", "ThrottlingException"):
                raise
            else:
                print(f"Job {job['job_name']} stays queued: {common.describe_aws_error(exc)}")
                break
        job["job_id"] = common.job_id_from_arn(job["job_arn"])
        job["status"] = "Submitted"
        save(info)
        submitted.append(job)
    return submitted


def upload_manifests(s3, bucket: str, job: dict, owner: str) -> None:
    for manifest in job["manifests"]:
        if common.object_exists(s3, bucket, manifest["s3_key"], owner):
            continue
        local = manifest["local_path"]
        uri = common.s3_uri(bucket, manifest["s3_key"])
        print(f"Uploading JSONL to {uri}")
        try:
            s3.upload_file(local, bucket, manifest["s3_key"],
                           ExtraArgs={"ExpectedBucketOwner": owner, "ContentType": "application/jsonl"})
        except FileNotFoundError:
            raise common.StepError(f"manifest {local} is gone — run 04_remove_completed_task.py --force and "
                                   "01_create_job.py again") from None
        common.ok(f"Uploaded to {uri}")


def earlier_submit(bedrock, job: dict, exc) -> str | None:
    """The ARN of the job an earlier submit of `job` created, when Bedrock refused the repeat with an error.

    The API reference says a repeated clientRequestToken is ignored without an error; whether the earlier job's ARN
    comes back is unverified. If Bedrock answers ConflictException, or ValidationException naming the token or the
    job name, the job is looked up by name (nameContains matches parts of names too: the name must be equal) and
    taken when it is ours: the same token when Bedrock shows it, else the same input and output folders.
    """
    code, message = common.error_code(exc), exc.response.get("Error", {}).get("Message", "")
    if not (code == "ConflictException" or (code == "ValidationException" and (
            job["client_request_token"] in message or job["job_name"] in message))):
        return None
    for page in bedrock.get_paginator("list_model_invocation_jobs").paginate(nameContains=job["job_name"]):
        for summary in page.get("invocationJobSummaries", []):
            if summary.get("jobName") == job["job_name"] and _same_submit(summary, job):
                return summary["jobArn"]
    return None


def _same_submit(summary: dict, job: dict) -> bool:
    token = summary.get("clientRequestToken")
    if token is not None:
        return token == job["client_request_token"]
    input_uri = summary.get("inputDataConfig", {}).get("s3InputDataConfig", {}).get("s3Uri")
    output_uri = summary.get("outputDataConfig", {}).get("s3OutputDataConfig", {}).get("s3Uri")
    return input_uri == job["input_s3_uri"] and output_uri == job["output_s3_uri"]


def create_job(bedrock, owner: str, job: dict) -> str:
    """Submit one job as 01 planned it; its clientRequestToken makes a repeated submit return the same job."""
    output = {"s3Uri": job["output_s3_uri"], "s3BucketOwner": owner}
    if job.get("output_kms_key_id"):
        output["s3EncryptionKeyId"] = job["output_kms_key_id"]
    print(f"Creating batch inference job: {job['job_name']} ({job['record_count']} records, "
          f"input {job['input_s3_uri']})")
    response = bedrock.create_model_invocation_job(
        jobName=job["job_name"],
        roleArn=job["role_arn"],
        clientRequestToken=job["client_request_token"],
        modelId=job["model_id"],
        inputDataConfig={"s3InputDataConfig": {"s3Uri": job["input_s3_uri"], "s3InputFormat": "JSONL",
                                               "s3BucketOwner": owner}},
        outputDataConfig={"s3OutputDataConfig": output},
    )
    return response["jobArn"]
