"""The lease on a source prefix: one run at a time on the images under SOURCE_PREFIX, whatever machine or job-info
file it starts from.

The lock beside the job-info file (jobinfo.py) keeps two steps of one checkout apart; it cannot see a second
checkout, or a second job-info file, on the same prefix, which would delete the first run's manifests while its job
waits and embed the same images again. The lease is a small object in S3 next to the images,
`<SOURCE_PREFIX>.bedrock-batch-embeddings.lease` (01's listing skips it: not an image, not a `.jsonl` that Bedrock
would read as input):

    {"owner": "<a random id of this hold>", "host": "...", "job_info": "/path/to/batch_job_info.json",
     "step": "02_monitor_job.py", "pid": 1234, "since": "2026-12-01T03:00:00+00:00", "until": "..."}

It is created with a conditional write (PutObject If-None-Match: *: S3 answers 412 when it exists, 409 when another
write races it), renewed while the step runs by replacing exactly the version written (If-Match: its ETag), and
deleted at the end. A lease whose `until` has passed (its holder died, or lost its network) is taken over, with a
message. Every function takes the S3 client; the clock is injected.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import common

NAME = ".bedrock-batch-embeddings.lease"
TTL = 6 * 3600  # seconds a lease lasts unless renewed: longer than any stretch of a step without a renewal
RENEW_EVERY = 15 * 60  # a lease held this long since its last write is renewed at the step's next chance
RETRY_AFTER = 60  # a renewal that failed (network) is tried again this much later
TAKE_ATTEMPTS = 4  # conditional writes tried before another machine's racing writes make us give up


def key_for(prefix: str) -> str:
    """The lease's key for a source prefix (`2024/` or '' for the whole bucket)."""
    return f"{prefix}{NAME}"


def is_lease(key: str) -> bool:
    return key.rsplit("/", 1)[-1] == NAME


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def _seconds(iso: str) -> float | None:
    try:
        return datetime.fromisoformat(iso).timestamp()
    except (TypeError, ValueError):
        return None


def describe(holder: dict) -> str:
    """Who holds a lease, from its content: host, job-info file, since and until."""
    return (f"{holder.get('step') or 'a step'} on {holder.get('host') or '?'} for {holder.get('job_info') or '?'} "
            f"(since {holder.get('since') or '?'}, until {holder.get('until') or '?'})")


class Lost(common.StepError):
    """The lease is held by someone else: exit 7."""

    def __init__(self, message: str):
        super().__init__(message, common.EXIT_LOCKED)


class Lease:
    """The lease on `prefix` of `bucket` (owned by account `owner`), for the job-info file `job_info`."""

    def __init__(self, s3, bucket: str, prefix: str, owner: str, job_info: Path, step: str, *,
                 clock=time.time, ttl: float = TTL, renew_every: float = RENEW_EVERY, say=print):
        self.s3, self.bucket, self.key, self.owner = s3, bucket, key_for(prefix), owner
        self.job_info, self.step, self.clock, self.ttl, self.renew_every, self.say = \
            str(Path(job_info).resolve()), step, clock, ttl, renew_every, say
        self.id = uuid.uuid4().hex
        self.etag: str | None = None
        self.since = ""
        self.renew_at = 0.0
        self.lost: str | None = None  # why the lease is no longer ours, found by a renewal
        self.guard = threading.Lock()  # 03 saves its checkpoint (and so renews) from its sender threads

    @property
    def uri(self) -> str:
        return common.s3_uri(self.bucket, self.key)

    def body(self) -> bytes:
        now = self.clock()
        return json.dumps({"owner": self.id, "host": socket.gethostname(), "job_info": self.job_info,
                           "step": self.step, "pid": os.getpid(), "since": self.since or _iso(now),
                           "until": _iso(now + self.ttl)}, indent=1).encode()

    def _put(self, **condition) -> None:
        answer = self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=self.body(), ContentType="application/json",
                                    ExpectedBucketOwner=self.owner, **condition)
        self.etag = answer["ETag"]
        self.renew_at = self.clock() + self.renew_every

    def read(self) -> tuple[dict, str] | None:
        """The lease's content and ETag as S3 has it now, or None when there is none. A missing key answers 404,
        or 403 to a caller without s3:ListBucket on it."""
        from botocore.exceptions import ClientError

        try:
            answer = self.s3.get_object(Bucket=self.bucket, Key=self.key, ExpectedBucketOwner=self.owner)
        except ClientError as exc:
            code = common.error_code(exc)
            if code in ("NoSuchKey", "404") or (code in ("AccessDenied", "403") and not common.object_exists(
                    self.s3, self.bucket, self.key, self.owner)):
                return None
            raise
        raw = answer["Body"].read()
        try:
            holder = json.loads(raw)
            if not isinstance(holder, dict):
                raise ValueError
        except ValueError:
            holder = {}  # not ours to read: treated as held, until its object is a day old
            holder["until"] = _iso(answer["LastModified"].timestamp() + 24 * 3600)
        return holder, answer["ETag"]

    def take(self, previous_ids: frozenset[str] = frozenset()) -> None:
        """Create the lease, or take over one that expired or that an earlier process of this job-info file left
        (its id in `previous_ids`); Lost (exit 7) naming the holder when another holds it."""
        from botocore.exceptions import ClientError

        self.since = _iso(self.clock())
        for _ in range(TAKE_ATTEMPTS):
            try:
                self._put(IfNoneMatch="*")
                return
            except ClientError as exc:
                if common.error_code(exc) not in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                    raise
            found = self.read()
            if found is None:
                continue  # released meanwhile: create it again
            holder, etag = found
            until = _seconds(holder.get("until", ""))
            left_by_us = holder.get("owner") in previous_ids
            if not left_by_us and until is not None and until > self.clock():
                raise Lost(f"{describe(holder)} is working on the images under "
                           f"{common.s3_uri(self.bucket, self.key[:-len(NAME)])} (lease {self.uri}) — one run at a "
                           "time on a prefix: let it finish, then run this step again")
            try:
                self._put(IfMatch=etag)
            except ClientError as exc:
                if common.error_code(exc) not in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey",
                                                  "412", "409", "404"):
                    raise
                continue  # another took it (or renewed it) first: look again
            why = "that an earlier step of this job-info file left" if left_by_us else "that expired"
            self.say(f"Took over the lease {self.uri} {why}: {describe(holder)}")
            return
        raise Lost(f"the lease {self.uri} kept changing while this step tried to take it (another machine on the "
                   "same prefix?) — run this step again in a minute")

    def keep(self, now_or_never: bool = False) -> None:
        """Renew the lease when it is due (or at once): replace exactly the version written, so a lease taken over
        by another is never overwritten. A network failure is tried again later; a lease lost is noted in `lost`."""
        from botocore.exceptions import BotoCoreError, ClientError

        with self.guard:
            if self.lost or self.etag is None or (not now_or_never and self.clock() < self.renew_at):
                return
            try:
                self._put(IfMatch=self.etag)
            except ClientError as exc:
                code = common.error_code(exc)
                if code in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                    found = self.read()
                    self.lost = describe(found[0]) if found else "nobody (it was deleted)"
                    self.etag = None
                    return
                self.renew_at = self.clock() + RETRY_AFTER
            except BotoCoreError:
                self.renew_at = self.clock() + RETRY_AFTER

    def check(self) -> None:
        """Lost (exit 7) when a renewal found the lease in another's hands."""
        if self.lost:
            raise Lost(f"the lease {self.uri} is now held by {self.lost}: it expired while this step ran — stop the "
                       "other run or this one, then run this step again")

    def release(self) -> None:
        """Delete the lease if it is still this one (its ETag unchanged)."""
        from botocore.exceptions import BotoCoreError, ClientError

        with self.guard:
            if self.etag is None:
                return
            try:
                found = self.read()
                if found is not None and found[1] == self.etag:
                    common.delete_object(self.s3, self.bucket, self.key, self.owner)
            except (ClientError, BotoCoreError) as exc:  # the step's work is done: the lease just lasts longer
                print(f"warning: could not release the lease {self.uri} ({common.describe_aws_error(exc)}); it "
                      f"expires by itself within {self.ttl / 3600:g} h", file=sys.stderr)
            self.etag = None


# --------------------------------------------------------------------------------------------------------------
# Between the steps: another run's jobs
# --------------------------------------------------------------------------------------------------------------

ACTIVE = ("Submitted", "Validating", "Scheduled", "InProgress", "Stopping")  # a job that will still read its input


def other_runs_jobs(bedrock, bucket: str, prefix: str, ours: set[str]) -> list[dict]:
    """Jobs Bedrock has not finished whose input folder holds the images under s3://bucket/prefix, or lies inside
    it, and that are not `ours` (the ARNs and names of the jobs the job-info file names): another machine's or
    job-info file's run on these images. The lease covers a run only while one of its steps works; between its
    steps (a job Scheduled for hours) its manifests and its job are what show it."""
    found = []
    for status in ACTIVE:
        for page in bedrock.get_paginator("list_model_invocation_jobs").paginate(statusEquals=status):
            for job in page.get("invocationJobSummaries", []):
                uri = job.get("inputDataConfig", {}).get("s3InputDataConfig", {}).get("s3Uri", "")
                try:
                    job_bucket, folder = common.parse_s3_uri(uri)
                except ValueError:
                    continue
                folder = common.normalize_prefix(folder)
                overlaps = folder.startswith(prefix) or prefix.startswith(folder)
                if job_bucket == bucket and overlaps and not {job.get("jobArn"), job.get("jobName")} & ours:
                    found.append(job)
    return found


def refuse_other_runs(bedrock, bucket: str, prefix: str, ours: set[str]) -> None:
    """Lost (exit 7) naming the first job of another run that still reads the images under the prefix."""
    others = other_runs_jobs(bedrock, bucket, prefix, ours)
    if others:
        job = others[0]
        more = f" (and {len(others) - 1} more)" if len(others) > 1 else ""
        raise Lost(f"job {job.get('jobName', job.get('jobArn'))} ({job.get('status')}, submitted "
                   f"{job.get('submitTime')}){more} of another run reads "
                   f"{job['inputDataConfig']['s3InputDataConfig']['s3Uri']} — one run at a time on a prefix: carry "
                   "on with the job-info file that started it, or wait until it ends")
