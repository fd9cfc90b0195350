"""Loading vectors into an S3 Vectors index at the speed the index accepts.

PutVectors takes at most 500 vectors and a 20 MiB body. boto3's own validation and serialisation of float lists
costs about a second per 250 vectors at 3072 dimensions, so the request body is built here instead: each vector
is turned into float32 once (numpy) and written as JSON text with orjson (float32 shortest form, which is what
the index stores, so nothing is lost). The body is then sent through botocore's own PutVectors call — same
endpoint resolution, credentials, SigV4 signing and retries — by swapping the serialised body in the
`before-call` event. Requests are paced to the index's write quota and back off when it answers 429.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import orjson

import common

MAX_VECTORS_PER_PUT = 500
MAX_REQUEST_BYTES = 20 * 1024 * 1024
# Room left in a request for the envelope and for what botocore may add; the body itself is measured exactly.
REQUEST_BYTES_MARGIN = 4 * 1024
RETRYABLE_CODES = frozenset(
    {"TooManyRequestsException", "ThrottlingException", "ServiceUnavailableException", "InternalServerException",
     "RequestTimeoutException", "SlowDown"}
)


def ensure_index(s3vectors, bucket: str, index: str, dimension: int, create: bool = True) -> None:
    """Create the vector bucket and index when missing, and say so (`create=False`: refuse instead); refuse an
    index of another dimension."""
    def missing(what: str) -> None:
        if not create:
            raise common.StepError(f"{what} does not exist — check VECTOR_BUCKET and VECTOR_INDEX, or run without "
                                   "--no-create to create it", common.EXIT_USAGE)

    try:
        s3vectors.get_vector_bucket(vectorBucketName=bucket)
    except s3vectors.exceptions.NotFoundException:
        missing(f"vector bucket {bucket}")
        print(f"! Vector bucket {bucket} does not exist: creating it (--no-create refuses instead)")
        try:
            s3vectors.create_vector_bucket(vectorBucketName=bucket)
        except s3vectors.exceptions.ConflictException:
            pass  # created meanwhile
    try:
        existing = s3vectors.get_index(vectorBucketName=bucket, indexName=index)["index"]
    except s3vectors.exceptions.NotFoundException:
        missing(f"index {index} in vector bucket {bucket}")
        print(f"! Index {index} does not exist: creating it (float32, {dimension} dimensions, cosine; --no-create "
              "refuses instead)")
        try:
            s3vectors.create_index(vectorBucketName=bucket, indexName=index, dataType="float32",
                                   dimension=dimension, distanceMetric="cosine")
        except s3vectors.exceptions.ConflictException:
            pass
        return
    if existing["dimension"] != dimension:
        raise common.StepError(
            f"index {index} in {bucket} holds {existing['dimension']}-dimension vectors but the run's vectors have "
            f"{dimension} — load them into another index (VECTOR_INDEX=<new name>, step 3 creates it)",
            common.EXIT_USAGE,
        )


class VectorError(ValueError):
    """A vector the index would refuse; the record is reported instead of sent."""


def encode_vector(key: str, embedding, dimension: int, metadata: dict) -> bytes:
    """One element of PutVectors' `vectors` list as JSON bytes, checked as the index would check it."""
    data = np.asarray(embedding, dtype=np.float32)
    if data.ndim != 1 or data.shape[0] != dimension:
        raise VectorError(f"embedding has {data.size} values, the index takes {dimension}")
    if not np.isfinite(data).all():
        raise VectorError("embedding holds NaN or infinite values")
    if not data.any():
        raise VectorError("embedding is all zeros, which a cosine index refuses")
    return orjson.dumps(
        {"key": key, "data": {"float32": data}, "metadata": metadata}, option=orjson.OPT_SERIALIZE_NUMPY
    )


def envelope(bucket: str, index: str) -> tuple[bytes, bytes]:
    head = orjson.dumps({"vectorBucketName": bucket, "indexName": index})[:-1] + b',"vectors":['
    return head, b"]}"


@dataclass
class Batch:
    """A PutVectors request ready to send, and what it stands for in the input (for the checkpoint)."""

    body: bytes | bytearray
    count: int
    seq: int
    mark: dict = field(default_factory=dict)  # the loader's position after this batch
    keys: list[str] = field(default_factory=list)


class Batcher:
    """Packs encoded vectors into PutVectors bodies of at most `max_vectors` and `max_bytes`.

    Each body is written once, into the buffer that is then sent: a ~20 MB request is never copied.
    """

    def __init__(self, bucket: str, index: str, *, max_vectors: int = MAX_VECTORS_PER_PUT,
                 max_bytes: int = MAX_REQUEST_BYTES - REQUEST_BYTES_MARGIN):
        self.head, self.tail = envelope(bucket, index)
        self.max_vectors = max_vectors
        self.max_bytes = max_bytes
        self.seq = 0
        self._start()

    def _start(self) -> None:
        self.buffer = bytearray(self.head)
        self.keys: list[str] = []

    def fits(self, part: bytes) -> bool:
        return len(self.keys) < self.max_vectors and len(self.buffer) + len(part) + 1 + len(self.tail) <= self.max_bytes

    def add(self, part: bytes, mark_before: Callable[[], dict], key: str = "") -> Batch | None:
        """Add a vector; when it does not fit, first close the current batch, marked with `mark_before()` (the
        position just before this vector), and return it."""
        closed = None
        if self.keys and not self.fits(part):
            closed = self.flush(mark_before())
        if len(self.head) + len(self.tail) + len(part) > self.max_bytes:
            raise VectorError(f"one vector takes {len(part)} bytes, more than a request may hold")
        if self.keys:
            self.buffer += b","
        self.buffer += part
        self.keys.append(key)
        return closed

    def flush(self, mark: dict, allow_empty: bool = False) -> Batch | None:
        """Close the current batch; with allow_empty, an empty one that only carries `mark` forward."""
        if not self.keys and not allow_empty:
            return None
        if self.keys:
            self.buffer += self.tail
            batch = Batch(body=self.buffer, count=len(self.keys), seq=self.seq, mark=mark, keys=self.keys)
        else:
            batch = Batch(body=b"", count=0, seq=self.seq, mark=mark)
        self.seq += 1
        self._start()
        return batch


class RateLimiter:
    """Paces requests to the index's write quota: vectors per second and requests per second.

    Each request reserves its share of time, so the rate at the index stays smooth; after a pause, up to
    `burst_seconds` of credit may be spent at once (whether the index grants such a burst is unverified: if it does
    not, the first requests meet 429 and the pacer slows down). After a throttling answer the vector rate drops by a
    quarter and recovers by 5 % a second, so a smaller or shared quota is found rather than hammered.
    """

    def __init__(self, vectors_per_second: float, requests_per_second: float, clock=time.monotonic,
                 sleep=time.sleep, burst_seconds: float = 1.0):
        self.max_rate = float(vectors_per_second)
        self.rate = float(vectors_per_second)
        self.requests_per_second = float(requests_per_second)
        self.burst = burst_seconds  # credit after a pause, as a token bucket of one second's worth gives
        self.clock, self.sleep = clock, sleep
        self.lock = threading.Lock()
        self.last = clock()
        self.next_free = self.last  # when the work reserved so far has been paid for at the rate

    def acquire(self, vectors: int) -> None:
        """Wait until sending `vectors` keeps the reserved backlog within the burst, then reserve them."""
        with self.lock:
            now = self.clock()
            self.rate = min(self.max_rate, self.rate * 1.05 ** (now - self.last))
            self.last = now
            cost = max(vectors / self.rate, 1 / self.requests_per_second)
            self.next_free = max(self.next_free, now) + cost
            wait = self.next_free - self.burst - now
        if wait > 0:
            self.sleep(wait)

    def throttled(self) -> None:
        with self.lock:
            self.rate = max(self.max_rate * 0.05, self.rate * 0.75)


class PutVectorsSender:
    """Sends prebuilt PutVectors bodies through a boto3 s3vectors client, from a few threads.

    botocore builds, signs and retries the request; only its serialised body is replaced by ours.
    """

    def __init__(self, client, bucket: str, index: str, limiter: RateLimiter, *, threads: int = 4,
                 on_done: Callable[[Batch], None], sleep=time.sleep, max_backoff: float = 20.0,
                 give_up_after: float = 900.0):
        self.client = client
        self.bucket, self.index = bucket, index
        self.limiter = limiter
        self.on_done = on_done
        self.sleep = sleep
        self.max_backoff = max_backoff
        self.give_up_after = give_up_after
        self.local = threading.local()
        self.queue: queue.Queue = queue.Queue(maxsize=1)  # bodies are ~20 MB: few wait
        self.error: BaseException | None = None
        self.stats = {"requests": 0, "retries": 0, "throttled": 0, "max_vectors": 0, "max_bytes": 0}
        self.stats_lock = threading.Lock()
        client.meta.events.register("before-call.s3vectors.PutVectors", self._swap_body)
        self.workers = [threading.Thread(target=self._work, daemon=True) for _ in range(threads)]
        for worker in self.workers:
            worker.start()

    def _swap_body(self, params, **kwargs):
        body = getattr(self.local, "body", None)
        if body is not None:
            params["body"] = body

    def submit(self, batch: Batch) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(batch, timeout=0.2)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Wait for every queued batch; raises what stopped a worker."""
        for _ in self.workers:
            self.queue.put(None)
        for worker in self.workers:
            worker.join()
        if self.error is not None:
            raise self.error

    def _work(self) -> None:
        while True:
            batch = self.queue.get()
            if batch is None:
                return
            if self.error is not None:
                continue
            try:
                if batch.count:
                    self.send(batch)
                self.on_done(batch)
            except BaseException as exc:  # handed to the main thread, which reports it
                self.error = exc

    def send(self, batch: Batch) -> None:
        """Send one batch until the index accepts it: throttling, 5xx and a failing network are retried with
        backoff for up to `give_up_after` seconds; anything else the index refuses is raised."""
        from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError

        started, attempt = time.monotonic(), 0
        while True:
            self.limiter.acquire(batch.count)
            self.local.body = batch.body
            try:
                # The same bucket and index as the body: what botocore sees is what the index gets.
                self.client.put_vectors(vectorBucketName=self.bucket, indexName=self.index,
                                        vectors=[{"key": "placeholder", "data": {"float32": [0.0]}}])
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if code not in RETRYABLE_CODES and status < 500 and status != 429:
                    raise
                if code in ("TooManyRequestsException", "ThrottlingException", "SlowDown") or status == 429:
                    self.limiter.throttled()
                    self._count("throttled")
                last = f"{code or status}"
            except (BotoConnectionError, HTTPClientError) as exc:
                last = type(exc).__name__
            else:
                with self.stats_lock:
                    self.stats["requests"] += 1
                    self.stats["max_vectors"] = max(self.stats["max_vectors"], batch.count)
                    self.stats["max_bytes"] = max(self.stats["max_bytes"], len(batch.body))
                return
            finally:
                self.local.body = None
            attempt += 1
            self._count("retries")
            if time.monotonic() - started > self.give_up_after:
                raise common.StepError(f"PutVectors kept failing for {self.give_up_after:g}s (last: {last}); "
                                       "nothing was dropped — run the step again to resume")
            self.sleep(min(self.max_backoff, 0.25 * 2 ** min(attempt, 7)) * (0.5 + np.random.random() / 2))

    def _count(self, name: str) -> None:
        with self.stats_lock:
            self.stats[name] += 1


def keep_memory_flat() -> None:
    """Have glibc return large freed buffers (request bodies) to the system at once.

    By default glibc raises its mmap threshold after freeing a large mmapped block, so later ~20 MB bodies come
    from the heap, which keeps the high-water mark: peak RSS then grows with the length of the load.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: blocks of 1 MiB and more are mmapped, and unmapped on free
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def read_lines(body, start: int = 0, chunk_size: int = 1 << 20) -> Iterator[tuple[bytes, int, int]]:
    """Lines of a streaming body as (line without newline, its start offset, the offset just after it), in flat
    memory. A last line without a newline is yielded too; the caller decides whether it is whole."""
    pending = b""
    offset = start
    for chunk in iter(lambda: body.read(chunk_size), b""):
        pending += chunk
        lines = pending.split(b"\n")
        pending = lines.pop()
        for line in lines:
            yield line, offset, offset + len(line) + 1
            offset += len(line) + 1
    if pending:
        yield pending, offset, offset + len(pending)
