"""Images embedded on demand: InvokeModel with a batch record's own request body, loaded into the index the way
step 3 loads a job's results (same keys, same metadata, same PutVectors sender).

Used for a run's on-demand part (a remainder too small for a batch job that would otherwise cost a wave of its
own, or a day with fewer new images than a job's minimum: 01 writes their manifest, step 3 embeds and loads them
with the batch results) and for `01_create_job.py --retry-failed --on-demand`. On demand costs about twice batch
per image (aws-facts.md), so it is kept to ON_DEMAND_MAX_IMAGES.

Nothing paid is thrown away: each embedding is kept in a file as the model answers (`Kept`), and a step that did
not finish loading (PutVectors denied, a kill) is run again without calling the model for the images kept there.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import orjson

import common
from batch_embeddings import accounting, naming, nova, pacing, vectors

JOB_ID = "on-demand"  # the `job_id` metadata of vectors embedded on demand
THREADS = 4  # InvokeModel calls in flight
# Seconds before each new try of an image whose InvokeModel answered ModelTimeoutException (408, which botocore's
# standard retry mode does not retry); after the last, the image has failed.
TIMEOUT_RETRY_DELAYS = (1.0, 2.0, 4.0)
# What an image's own refusal may carry: the model could not read its S3 object (an answer that names S3).
_NAMES_S3 = re.compile(r"s3://|arn:aws[-a-z]*:s3:|\bS3\b")
KEPT_NAME = "embedded_on_demand.jsonl"  # in the run's folder: the embeddings of its on-demand part (04 removes it)
RETRY_KEPT_NAME = "embedded_on_demand_retry.jsonl"  # in runs/: those of `01 --retry-failed --on-demand` not loaded


def kept_file(run_dir: Path) -> Path:
    """Where step 3 keeps the embeddings of a run's on-demand part."""
    return Path(run_dir) / KEPT_NAME


def retry_kept_file(runs_dir: Path) -> Path:
    """Where `01 --retry-failed --on-demand` keeps its embeddings until the index holds them: each retry is a run
    of its own, so they live beside the runs' folders, not in one."""
    return Path(runs_dir) / RETRY_KEPT_NAME


def request_digest(model_id: str, body: dict) -> str:
    """What a kept embedding answers: the model and the InvokeModel body (a body asking for another dimension or
    purpose, or another model, is another request)."""
    return hashlib.sha256(model_id.encode() + b"\0" + orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


class Kept:
    """Embeddings the model gave, kept in an append-only file as they come, so that a load that fails after them
    (PutVectors denied, a kill) does not pay for them again.

    One JSON line an image: `{"key", "source_uri", "request" (request_digest), "float32"}`, the embedding as the
    base64 of its little-endian float32 values — what the index stores, exactly, in 16.5 KB a line at 3,072
    dimensions (1.66 MB for 100 images, against 3.9 MB as float32 text). Each line is one unbuffered write; the file
    is fsync-ed before the sender sends any of them (`sync`) and at the end (`close`). A line cut by a kill does not
    parse and is ignored (its image is embedded again); the cut end is dropped before anything is appended.
    """

    def __init__(self, path: Path, dimension: int):
        self.path = Path(path)
        self.found: dict[str, tuple[str, bytes, bytes]] = {}  # key -> (request digest, float32 bytes, its line)
        self.lock = threading.Lock()
        self.fh = None
        self.unsynced = False
        try:
            with open(self.path, "r+b") as fh:
                data = fh.read()
                whole = data.rfind(b"\n") + 1
                if whole < len(data):  # the end of a line a kill cut
                    fh.truncate(whole)
        except FileNotFoundError:
            return
        for line in data[:whole].splitlines():
            try:
                entry = orjson.loads(line)
                values = base64.b64decode(entry["float32"], validate=True)
                key, digest = entry["key"], entry["request"]
            except (orjson.JSONDecodeError, TypeError, KeyError, ValueError):
                continue  # a damaged line: its image is embedded again
            if len(values) == 4 * dimension and isinstance(key, str) and isinstance(digest, str):
                self.found[key] = (digest, values, line + b"\n")

    def get(self, key: str, digest: str) -> np.ndarray | None:
        """The kept embedding of this image for this request, or None."""
        kept = self.found.get(key)
        if kept is None or kept[0] != digest:
            return None
        return np.frombuffer(kept[1], dtype="<f4")

    def add(self, key: str, uri: str, digest: str, embedding) -> None:
        """Keep one embedding (any thread): written at once, one line, one write."""
        values = np.asarray(embedding, dtype="<f4").tobytes()
        line = orjson.dumps({"key": key, "source_uri": uri, "request": digest,
                             "float32": base64.b64encode(values).decode()}) + b"\n"
        with self.lock:
            if self.fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.fh = open(self.path, "ab", buffering=0)
            self.fh.write(line)
            self.found[key] = (digest, values, line)
            self.unsynced = True

    def sync(self) -> None:
        """Make what was written durable (before the index is sent any of it)."""
        with self.lock:
            if self.unsynced:
                os.fsync(self.fh.fileno())
                self.unsynced = False

    def close(self) -> None:
        self.sync()
        with self.lock:
            if self.fh is not None:
                self.fh.close()
                self.fh = None

    def forget(self, keys: set[str]) -> None:
        """Drop the lines of these images (the index holds them, or their failure is listed); the file goes when
        nothing is left in it."""
        self.close()
        left = {key: kept for key, kept in self.found.items() if key not in keys}
        if not left:
            self.path.unlink(missing_ok=True)
        elif len(left) < len(self.found):
            common.atomic_write(self.path, lambda fh: fh.writelines(line for _, _, line in left.values()))
        self.found = left


def is_part(job: dict) -> bool:
    """Whether a job-info entry is a run's on-demand part (no Bedrock job: step 3 embeds its manifest)."""
    return bool(job.get("on_demand"))


def part_records(job: dict) -> Iterator[tuple[str, dict]]:
    """(image URI, InvokeModel body) of every record of an on-demand part's local manifest."""
    for record in accounting.job_records(job, "its images cannot be embedded — run 01_create_job.py again (they "
                                              "are not in the index)"):
        yield nova.image_uri(record), record["modelInput"]


def embed_and_load(requests: Iterable[tuple[str, dict]], config: common.Config, runtime, s3v, dimension: int,
                   index_ready: Callable[[], object] = lambda: None, *, limiter: pacing.RateLimiter | None = None,
                   sleep: Callable[[float], None] = time.sleep, kept: Path | None = None,
                   forget_done: bool = False, provenance=None) -> tuple[set[str], list[dict]]:
    """Embed each (image URI, request body) with InvokeModel and put the vectors into the index.

    `kept`: the file the embeddings are kept in as they come (`Kept`); an image whose embedding for the same request
    is there already is loaded from it, without calling the model. `forget_done`: once the load has ended, drop the
    lines of these images from it (the index holds them, or their failure is returned) — for a file that outlives
    the run. `provenance` (a mirror.Provenance): what each vector records of its image besides its URI, and the
    journal of what the index confirmed.

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
    requests = list(requests)  # a few hundred at most (ON_DEMAND_MAX_IMAGES)
    keep = Kept(kept, dimension) if kept is not None else None
    digests = [request_digest(config.model_id, body) for _, body in requests]
    if keep is not None:
        reused = sum(keep.get(naming.vector_key(uri), digest) is not None
                     for (uri, _), digest in zip(requests, digests))
        if reused:
            print(f"{reused} of the {len(requests)} image(s) were embedded by an earlier try and kept in {kept}: "
                  "loaded from there, without calling the model again")

    def invoke(body: dict) -> list[float]:
        for delay in TIMEOUT_RETRY_DELAYS:
            try:
                return nova.embed(runtime, config.model_id, body)
            except ClientError as exc:
                if common.error_code(exc) != "ModelTimeoutException":
                    raise
            sleep(delay)
        return nova.embed(runtime, config.model_id, body)  # the last try: a timeout now is the image's failure

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
        (uri, body), digest = item
        key = naming.vector_key(uri)
        metadata = {"source_uri": uri, "job_id": JOB_ID, **(provenance.metadata(key) if provenance else {})}
        embedding = keep.get(key, digest) if keep is not None else None
        if embedding is not None:
            try:
                return key, vectors.encode_vector(key, embedding, dimension, metadata), None
            except vectors.VectorError as exc:
                return key, None, failure(uri, "InvalidEmbedding", str(exc))
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
            part = vectors.encode_vector(key, embedding, dimension, metadata)
        except vectors.VectorError as exc:
            return key, None, failure(uri, "InvalidEmbedding", str(exc))
        if keep is not None:
            keep.add(key, uri, digest, embedding)
        return key, part, None

    confirmed: set[str] = set()
    failed: list[dict] = []
    if limiter is None:
        limiter = pacing.RateLimiter.at_index_quota()

    def done(batch: vectors.Batch) -> None:
        if provenance is not None:
            refused = {vector.key for vector in batch.refused}
            provenance.written([key for key in batch.keys if key not in refused])
        confirmed.update(batch.keys)
        failed.extend(failure(vector.source_uri, "ValidationException", f"S3 Vectors refused the vector: "
                              f"{vector.message}") for vector in batch.refused if vector.source_uri)

    sender = pacing.PutVectorsSender(s3v, config.vector_bucket, config.vector_index, limiter, threads=2,
                                      on_done=done)
    batcher = vectors.Batcher(config.vector_bucket, config.vector_index)
    pool = ThreadPoolExecutor(THREADS)

    def submit(batch: vectors.Batch) -> None:
        if keep is not None:
            keep.sync()  # what the index is sent is on disk first
        sender.submit(batch)

    try:
        for key, part, failure_entry in pool.map(embed, zip(requests, digests)):
            if failure_entry is not None:
                failed.append(failure_entry)
                continue
            index_ready()
            batch = batcher.add(part, dict, key)
            if batch is not None:
                submit(batch)
        index_ready()
        submit(batcher.flush({}, allow_empty=True))
    finally:
        pool.shutdown(cancel_futures=True)
        try:
            sender.close()
        finally:
            if keep is not None:
                keep.close()
    if keep is not None and forget_done:
        keep.forget({naming.vector_key(uri) for uri, _ in requests})
    return confirmed, failed


def failure(uri: str, code: str, message: str) -> dict:
    return {"source_uri": uri, "recordId": naming.vector_key(uri), "status": "failed", "error_code": code,
            "error_message": message}


def load_part(job: dict, config: common.Config, runtime, s3v, report: Path, kept: Path, index_ready, *,
              limiter: pacing.RateLimiter | None = None, reader=None, sleep: Callable[[float], None] = time.sleep,
              provenance=None) -> dict:
    """Step 3 for a run's on-demand part: embed and load its images, list the failures in `report` (a load
    report, as for a job; none when nothing failed), and mark the part loaded. Returns its counts like a job's.

    `s3v` and `limiter` send the vectors as in `embed_and_load`; `reader` (default `s3v`) is the client, with
    botocore's retries, that asks the index which of the images it holds already (GetVectors). `kept` is the file
    the embeddings are kept in as they come (kept_file of the run's folder): a step 3 that did not finish loads
    them from there again, without calling the model. `provenance` as for `embed_and_load`."""
    dimension = int(job.get("embedding_dimension", config.embedding_dimension))
    config = dataclasses.replace(config, model_id=job.get("model_id") or config.model_id)
    requests = list(part_records(job))
    changed = {key for key, (_, _, was_changed) in (provenance.sources if provenance else {}).items() if was_changed}
    keys = [naming.vector_key(uri) for uri, _ in requests]
    # A step 3 stopped half-way (Ctrl-C, a lost connection) left some of them in the index: not paid for again. A
    # changed image's old vector is there too: it is embedded again (from the kept file, if an earlier try did).
    loaded = accounting.present_keys(reader or s3v, config.vector_bucket, config.vector_index,
                                     [key for key in keys if key not in changed])
    if loaded:
        requests = [request for request, key in zip(requests, keys) if key not in loaded]
        print(f"{len(loaded)} image(s) of {job['job_name']} are in the index already (embedded by an earlier "
              "step 3): not embedded again")
    print(f"Embedding {len(requests)} image(s) on demand with {config.model_id} ({job['job_name']})")
    confirmed, failed = embed_and_load(requests, config, runtime, s3v, dimension, index_ready, limiter=limiter,
                                       sleep=sleep, kept=kept, provenance=provenance)
    embedded = len(confirmed)
    confirmed |= loaded
    if failed:
        common.atomic_write(report, lambda fh: fh.write(b"".join(orjson.dumps(f) + b"\n" for f in failed)))
    else:
        report.unlink(missing_ok=True)  # nothing failed: no empty report (nor one of an earlier --reload)
    counts = {"total": len(confirmed) + len(failed), "success": len(confirmed), "error": len(failed),
              "inserted": embedded}
    job["load"] = {"finished": True, "counts": counts}
    common.ok(f"Embedded and loaded {embedded} image(s) on demand into {config.vector_index}"
              + (f"; {len(failed)} failed" if failed else ""))
    return dict(counts, confirmed_keys=confirmed)
