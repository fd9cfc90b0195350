"""Images embedded on demand: InvokeModel with a batch record's own request body, loaded into the index the way
step 3 loads a job's results (same keys, same metadata, same PutVectors sender).

Used for a run's on-demand part (a remainder too small for a batch job that would otherwise cost a wave of its
own, or a day with fewer new images than a job's minimum: 01 writes their manifest, step 3 embeds and loads them
with the batch results) and for `01_create_job.py --retry-failed --on-demand`. On demand costs about twice batch
per image (aws-facts.md), so it is kept to ON_DEMAND_MAX_IMAGES.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import orjson

import accounting
import common
import vectors

JOB_ID = "on-demand"  # the `job_id` metadata of vectors embedded on demand
THREADS = 4  # InvokeModel calls in flight
# Seconds before each new try of an image whose InvokeModel answered ModelTimeoutException (408, which botocore's
# standard retry mode does not retry); after the last, the image has failed.
TIMEOUT_RETRY_DELAYS = (1.0, 2.0, 4.0)
# What an image's own refusal may carry: the model could not read its S3 object (an answer that names S3).
_NAMES_S3 = re.compile(r"s3://|arn:aws[-a-z]*:s3:|\bS3\b")


def is_part(job: dict) -> bool:
    """Whether a job-info entry is a run's on-demand part (no Bedrock job: step 3 embeds its manifest)."""
    return bool(job.get("on_demand"))


def part_records(job: dict) -> Iterator[tuple[str, dict]]:
    """(image URI, InvokeModel body) of every record of an on-demand part's local manifest."""
    for record in accounting.job_records(job, "its images cannot be embedded — run 01_create_job.py again (they "
                                              "are not in the index)"):
        yield common.image_uri(record), record["modelInput"]


def embed_and_load(requests: Iterable[tuple[str, dict]], config: common.Config, runtime, s3v, dimension: int,
                   index_ready: Callable[[], object] = lambda: None, *, limiter: vectors.RateLimiter | None = None,
                   sleep: Callable[[float], None] = time.sleep) -> tuple[set[str], list[dict]]:
    """Embed each (image URI, request body) with InvokeModel and put the vectors into the index.

    Returns the keys the index confirmed and the images that failed, as account entries (`source_uri`,
    `recordId`, `status`, `error_code`, `error_message`). `s3v` sends PutVectors (the sender paces and retries
    them itself); `limiter` paces them to the index's quota (step 3 passes its own, set by --vectors-per-second
    and --requests-per-second; None: the quota of an index, 2,500 vectors and 1,000 requests a second).

    One image's failure does not stop the others: the model refuses the request (ValidationException, which is also
    how Bedrock answers for an S3 object it cannot read, missing or denied; ModelErrorException); it timed out
    (ModelTimeoutException) on each of 1 + len(TIMEOUT_RETRY_DELAYS) tries, `sleep`ing in between; the index would
    refuse the embedding; or AccessDeniedException about the image. An AccessDeniedException is about the image
    when its message names S3 (the model may not read that object), or when an InvokeModel call of this step has
    already answered (the caller may call the model). Otherwise it is about InvokeModel itself (the caller lacks
    bedrock:InvokeModel, or access to the model): every image would be refused the same way, so it stops the step
    with one line instead of listing them all. Any other AWS error stops the step too.
    """
    from botocore.exceptions import ClientError

    answered = threading.Event()  # the model answered a call of this step: the caller may call it

    def invoke(body: dict) -> list[float]:
        for delay in TIMEOUT_RETRY_DELAYS:
            try:
                return common.embed(runtime, config.model_id, body)
            except ClientError as exc:
                if common.error_code(exc) != "ModelTimeoutException":
                    raise
            sleep(delay)
        return common.embed(runtime, config.model_id, body)  # the last try: a timeout now is the image's failure

    stopping = threading.Event()  # an image's error stops the step: the model is asked about no image after it

    def embed(item):
        if stopping.is_set():
            return None  # an image after the one that stops the step (they start in order): never read
        try:
            return embed_one(item)
        except BaseException:
            stopping.set()
            raise

    def embed_one(item):
        uri, body = item
        key = common.vector_key(uri)
        try:
            embedding = invoke(body)
        except ClientError as exc:
            code, message = common.error_code(exc), exc.response["Error"].get("Message", "")
            if code == "AccessDeniedException" and not (_NAMES_S3.search(message) or answered.is_set()):
                raise common.StepError(
                    f"AccessDeniedException: {message} — InvokeModel on {config.model_id} was refused before any "
                    "image was embedded: the caller needs bedrock:InvokeModel on the model (iam/caller-policy.json) "
                    f"and access to it in {config.region}") from None
            if code not in ("ValidationException", "ModelErrorException", "ModelTimeoutException",
                            "AccessDeniedException"):
                raise
            if code != "AccessDeniedException":
                answered.set()
            return key, None, failure(uri, code, message)
        answered.set()
        try:
            return key, vectors.encode_vector(key, embedding, dimension, {"source_uri": uri, "job_id": JOB_ID}), None
        except vectors.VectorError as exc:
            return key, None, failure(uri, "InvalidEmbedding", str(exc))

    confirmed: set[str] = set()
    failed: list[dict] = []
    if limiter is None:
        limiter = vectors.RateLimiter(2500, 1000)

    def done(batch: vectors.Batch) -> None:
        confirmed.update(batch.keys)
        failed.extend(failure(vector.source_uri, "ValidationException", f"S3 Vectors refused the vector: "
                              f"{vector.message}") for vector in batch.refused if vector.source_uri)

    sender = vectors.PutVectorsSender(s3v, config.vector_bucket, config.vector_index, limiter, threads=2,
                                      on_done=done)
    batcher = vectors.Batcher(config.vector_bucket, config.vector_index)
    pool = ThreadPoolExecutor(THREADS)
    try:
        for key, part, failure_entry in pool.map(embed, requests):
            if failure_entry is not None:
                failed.append(failure_entry)
                continue
            index_ready()
            batch = batcher.add(part, dict, key)
            if batch is not None:
                sender.submit(batch)
        index_ready()
        sender.submit(batcher.flush({}, allow_empty=True))
    finally:
        pool.shutdown(cancel_futures=True)
        sender.close()
    return confirmed, failed


def failure(uri: str, code: str, message: str) -> dict:
    return {"source_uri": uri, "recordId": common.vector_key(uri), "status": "failed", "error_code": code,
            "error_message": message}


def load_part(job: dict, config: common.Config, runtime, s3v, report: Path, index_ready, *,
              limiter: vectors.RateLimiter | None = None, reader=None, sleep: Callable[[float], None] = time.sleep
              ) -> dict:
    """Step 3 for a run's on-demand part: embed and load its images, list the failures in `report` (a load
    report, as for a job), and mark the part loaded. Returns its counts like a job's.

    `s3v` and `limiter` send the vectors as in `embed_and_load`; `reader` (default `s3v`) is the client, with
    botocore's retries, that asks the index which of the images it holds already (GetVectors)."""
    dimension = int(job.get("embedding_dimension", config.embedding_dimension))
    config = dataclasses.replace(config, model_id=job.get("model_id") or config.model_id)
    requests = list(part_records(job))
    keys = [common.vector_key(uri) for uri, _ in requests]
    # A step 3 stopped half-way (Ctrl-C, a lost connection) left some of them in the index: not paid for again.
    loaded = accounting.present_keys(reader or s3v, config.vector_bucket, config.vector_index, keys)
    if loaded:
        requests = [request for request, key in zip(requests, keys) if key not in loaded]
        print(f"{len(loaded)} image(s) of {job['job_name']} are in the index already (embedded by an earlier "
              "step 3): not embedded again")
    print(f"Embedding {len(requests)} image(s) on demand with {config.model_id} ({job['job_name']})")
    confirmed, failed = embed_and_load(requests, config, runtime, s3v, dimension, index_ready, limiter=limiter,
                                       sleep=sleep)
    embedded = len(confirmed)
    confirmed |= loaded
    common.atomic_write(report, lambda fh: fh.write(b"".join(orjson.dumps(f) + b"\n" for f in failed)))
    counts = {"total": len(confirmed) + len(failed), "success": len(confirmed), "error": len(failed),
              "inserted": embedded}
    job["load"] = {"finished": True, "counts": counts}
    common.ok(f"Embedded and loaded {embedded} image(s) on demand into {config.vector_index}"
              + (f"; {len(failed)} failed" if failed else ""))
    return dict(counts, confirmed_keys=confirmed)
