"""Loading vectors into an S3 Vectors index at the speed the index accepts.

PutVectors takes at most 500 vectors and a 20 MiB body. boto3's own validation and serialisation of float lists
costs about a second per 250 vectors at 3072 dimensions, so the request body is built here instead: each vector
is turned into float32 once (numpy) and written as JSON text with orjson (float32 shortest form, which is what
the index stores, so nothing is lost). The body is then sent through botocore's own PutVectors call — same
endpoint resolution, credentials, SigV4 signing and retries — by swapping the serialised body in the
`before-call` event. Requests are paced to the index's write quota and back off when it answers 429.
"""

from __future__ import annotations

import math
import mmap
import queue
import random
import struct
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterator, NamedTuple

import numpy as np
import orjson
import simdjson

import common

MAX_VECTORS_PER_PUT = 500
MAX_REQUEST_BYTES = 20 * 1024 * 1024
# Room left in a request for the envelope and for what botocore may add; the body itself is measured exactly.
REQUEST_BYTES_MARGIN = 4 * 1024
# After this many 503 answers in a row for one request, the index is taken to be short of capacity for that many
# vectors ("too many vectors for the resource capacity", botocore's PutVectorsInput.vectors) and the request is split.
SPLIT_AFTER_503 = 3
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


@lru_cache(maxsize=8)
def _float32_packer(dimension: int) -> struct.Struct:
    return struct.Struct(f"={dimension}f")


def encode_vector(key: str, embedding, dimension: int, metadata: dict) -> bytes:
    """One element of PutVectors' `vectors` list as JSON bytes, checked as the index would check it."""
    data = None
    if type(embedding) is list and len(embedding) == dimension:
        try:  # a third of numpy's time from a list; the same rounding (C's cast to float)
            data = np.frombuffer(_float32_packer(dimension).pack(*embedding), dtype=np.float32)
        except OverflowError:
            raise VectorError("embedding holds NaN or infinite values (beyond float32)") from None
        except (TypeError, struct.error):
            pass  # not all numbers: numpy says what they are
    if data is None:
        with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, refused below
            data = np.asarray(embedding, dtype=np.float32)
    return _encode_float32(key, data, dimension, metadata)


def _encode_float32(key: str, data: np.ndarray, dimension: int, metadata: dict) -> bytes:
    if data.ndim != 1 or data.shape[0] != dimension:
        raise VectorError(f"embedding has {data.size} values, the index takes {dimension}")
    if not np.isfinite(data).all():
        raise VectorError("embedding holds NaN or infinite values")
    if not data.any():
        raise VectorError("embedding is all zeros, which a cosine index refuses")
    return orjson.dumps(
        {"key": key, "data": {"float32": data}, "metadata": metadata}, option=orjson.OPT_SERIALIZE_NUMPY
    )


# Text copied into a request as it is must keep 500 vectors of 3072 dimensions (and their metadata) under 20 MiB:
# float32 shortest text takes ≈ 12.6 bytes a value with its comma; Python's float text ≈ 22, which is re-formatted.
COPY_MAX_BYTES_PER_VALUE = 13
_FLT_MAX = 3.4028234663852886e38  # the largest finite float32
_FLT_TINY = 1e-30  # a vector this short may round to zeros in float32: judged on the float32 values instead
_CUT = b'"\\u0000embedding"'  # stands in for the embedding's array in what is left of a line
CUT_VALUE = "\x00embedding"


def cut_embedding(line: bytes) -> tuple[bytes, bytes] | None:
    """Split an output line into (the line with its first `"embedding": [...]` replaced by a placeholder string,
    the array's text), so that only a few hundred bytes are parsed as JSON. None when there is no such array."""
    find = line.find
    at = find(b'"embedding"')
    while at >= 0:
        i = at + 11
        while line[i:i + 1] in (b" ", b"\t"):
            i += 1
        if line[i:i + 1] == b":":
            i += 1
            while line[i:i + 1] in (b" ", b"\t"):
                i += 1
            if line[i:i + 1] == b"[":
                end = find(b"]", i)
                if end < 0:
                    return None
                return line[:i] + _CUT + line[end + 1:], line[i:end + 1]
        at = find(b'"embedding"', at + 11)
    return None


def encode_text(key: str, text: bytes, dimension: int, metadata: dict) -> bytes:
    """Like encode_vector, from the JSON text of the embedding's array as it appears in the output line.

    When the text is short enough (float32 shortest text is), it is copied into the request as it is: the index
    reads each number as the float32 nearest to it, which is what encode_vector would have sent. Longer text (a
    float64 repr) is turned into float32 and re-formatted. Either way the vector is checked as the index checks it.

    simdjson reads the numbers straight into a float64 array, without making a Python float of each (measured
    alone: 0.10 ms a 3,072-number line, against 0.26 for orjson.loads and a pack into float32). Text it does not
    read as a flat array of `dimension` numbers takes the reference path, which says what is wrong. Raises
    orjson.JSONDecodeError when the text is not a JSON array.
    """
    values = _numbers(text, dimension)
    if values is None:
        return _encode_parsed_text(key, text, dimension, metadata)
    if len(text) <= COPY_MAX_BYTES_PER_VALUE * dimension + 2:
        with np.errstate(over="ignore", under="ignore"):
            norm = math.sqrt(values @ values)  # inf beyond float32, 0 when tiny: both judged in float32 below
        if _FLT_TINY <= norm <= _FLT_MAX:  # every value a finite float32, at least one not zero
            return _with_text(key, text, metadata)
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, refused below
        return _encode_float32(key, values.astype(np.float32), dimension, metadata)


_local = threading.local()  # a simdjson parser per thread: it keeps its buffers from one line to the next


def _numbers(text: bytes, dimension: int) -> np.ndarray | None:
    """The float64 values of a flat JSON array of `dimension` numbers; None for anything else."""
    parser = getattr(_local, "parser", None)
    if parser is None:
        parser = _local.parser = simdjson.Parser()
    try:
        array = parser.parse(text)
        if type(array) is not simdjson.Array or len(array) != dimension or text.find(b"[", 1) >= 0:
            return None  # as_buffer would flatten a nested array: the reference path refuses it
        buffer = array.as_buffer(of_type="d")
    except (ValueError, TypeError, RuntimeError):
        # not JSON, a number beyond float64, an element that is not a number, or an integer beyond 64 bits (which
        # orjson reads as a float)
        return None
    finally:
        array = None  # the parser refuses to parse again while a proxy of its last document lives
    return np.frombuffer(buffer, dtype=np.float64)


def _encode_parsed_text(key: str, text: bytes, dimension: int, metadata: dict) -> bytes:
    """encode_text through orjson's Python objects: the reference for the fast path, and what says why a text is
    refused."""
    values = orjson.loads(text)
    if type(values) is not list or len(values) != dimension:
        n = len(values) if type(values) is list else "no"
        raise VectorError(f"embedding has {n} values, the index takes {dimension}")
    if len(text) <= COPY_MAX_BYTES_PER_VALUE * dimension + 2 and b"t" not in text and b"f" not in text:
        try:
            norm = math.hypot(*values)  # one C pass: TypeError for what is not a number
        except TypeError:
            raise VectorError("embedding holds values that are not numbers") from None
        if _FLT_TINY <= norm <= _FLT_MAX:  # every value a finite float32, at least one not zero
            return _with_text(key, text, metadata)
    try:
        return encode_vector(key, values, dimension, metadata)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, VectorError):
            raise
        raise VectorError("embedding holds values that are not numbers") from None


def _with_text(key: str, text: bytes, metadata: dict) -> bytes:
    return b"".join((b'{"key":', orjson.dumps(key), b',"data":{"float32":', text, b'},"metadata":',
                     orjson.dumps(metadata), b"}"))


def envelope(bucket: str, index: str) -> tuple[bytes, bytes]:
    head = orjson.dumps({"vectorBucketName": bucket, "indexName": index})[:-1] + b',"vectors":['
    return head, b"]}"


class Refused(NamedTuple):
    """A vector the index refused: PutVectors answered 400 ValidationException naming it, or it was alone in a
    request so refused. The rest of its request is loaded."""

    key: str
    source_uri: str | None  # from the vector's metadata
    message: str  # the index's


@dataclass
class Batch:
    """A PutVectors request ready to send, and what it stands for in the input (for the checkpoint)."""

    body: bytes | bytearray | memoryview
    count: int
    seq: int
    mark: dict = field(default_factory=dict)  # the loader's position after this batch
    keys: list[str] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # where each vector's JSON starts in the body
    buffer: mmap.mmap | None = field(default=None, repr=False)  # what body is a view of, until Batcher.recycle
    # Once sent: the vectors the index refused. They are no longer in `keys` and `count`, which then say what the
    # index holds.
    refused: list[Refused] = field(default_factory=list)

    def vector(self, i: int, tail: bytes) -> bytes:
        """The JSON of the i-th vector, as it is in the body."""
        end = self.starts[i + 1] - 1 if i + 1 < self.count else len(self.body) - len(tail)
        return bytes(self.body[self.starts[i]:end])

    def regroup(self, groups: list, head: bytes, tail: bytes) -> list["Batch"]:
        """A request for each group of vector positions (of this batch): the same seq and mark."""
        body = memoryview(self.body)
        ends = [start - 1 for start in self.starts[1:]] + [len(body) - len(tail)]
        parts = []
        for group in groups:
            buffer = bytearray(head)
            starts = []
            for i in group:
                if starts:
                    buffer += b","
                starts.append(len(buffer))
                buffer += body[self.starts[i]:ends[i]]
            buffer += tail
            parts.append(Batch(body=buffer, count=len(starts), seq=self.seq, mark=self.mark,
                               keys=[self.keys[i] for i in group], starts=starts))
        return parts

    def halves(self, head: bytes, tail: bytes) -> tuple["Batch", "Batch"]:
        """Two requests of half the vectors each (for an index short of capacity, or to find a refused vector)."""
        middle = self.count // 2
        first, second = self.regroup([range(middle), range(middle, self.count)], head, tail)
        return first, second

    def without(self, i: int, head: bytes, tail: bytes) -> "Batch":
        """The request without its i-th vector."""
        return self.regroup([[j for j in range(self.count) if j != i]], head, tail)[0]


class Batcher:
    """Packs encoded vectors into PutVectors bodies of at most `max_vectors` and `max_bytes`.

    Each body is written once, into the buffer that is then sent: a ~20 MB request is never copied. A buffer given
    back with `recycle` once its request is sent is written again: its pages stay mapped, where a new buffer pays a
    page fault for every 4 KiB written (measured: 45 µs a 40 KB vector on a new buffer, 10 µs on a used one).
    """

    def __init__(self, bucket: str, index: str, *, max_vectors: int = MAX_VECTORS_PER_PUT,
                 max_bytes: int = MAX_REQUEST_BYTES - REQUEST_BYTES_MARGIN):
        self.head, self.tail = envelope(bucket, index)
        self.max_vectors = max_vectors
        self.max_bytes = max_bytes
        self.seq = 0
        self.spare: list[mmap.mmap] = []
        self.spare_lock = threading.Lock()
        self._start()

    def _start(self) -> None:
        with self.spare_lock:
            spare = self.spare.pop() if self.spare else None
        if spare is None:  # an anonymous mapping: only the pages written take memory
            spare = mmap.mmap(-1, max(self.max_bytes, len(self.head) + len(self.tail)))
        self.buffer = spare
        self.pos = 0
        self._write(self.head)
        self.keys: list[str] = []
        self.starts: list[int] = []

    def _write(self, data) -> None:
        end = self.pos + len(data)
        self.buffer[self.pos:end] = data
        self.pos = end

    def fits(self, part: bytes) -> bool:
        return len(self.keys) < self.max_vectors and self.pos + len(part) + 1 + len(self.tail) <= self.max_bytes

    def add(self, part: bytes, mark_before: Callable[[], dict], key: str = "") -> Batch | None:
        """Add a vector; when it does not fit, first close the current batch, marked with `mark_before()` (the
        position just before this vector), and return it."""
        closed = None
        if self.keys and not self.fits(part):
            closed = self.flush(mark_before())
        if len(self.head) + len(self.tail) + len(part) > self.max_bytes:
            raise VectorError(f"one vector takes {len(part)} bytes, more than a request may hold")
        if self.keys:
            self._write(b",")
        self.starts.append(self.pos)
        self._write(part)
        self.keys.append(key)
        return closed

    def flush(self, mark: dict, allow_empty: bool = False) -> Batch | None:
        """Close the current batch; with allow_empty, an empty one that only carries `mark` forward."""
        if not self.keys and not allow_empty:
            return None
        if self.keys:
            self._write(self.tail)
            batch = Batch(body=memoryview(self.buffer)[:self.pos], count=len(self.keys), seq=self.seq, mark=mark,
                          keys=self.keys, starts=self.starts, buffer=self.buffer)
            self._start()
        else:
            batch = Batch(body=b"", count=0, seq=self.seq, mark=mark)
        self.seq += 1
        return batch

    def recycle(self, batch: Batch) -> None:
        """Take back the buffer of a batch that is sent (its body must not be read after this)."""
        if batch.buffer is not None:
            batch.body, buffer, batch.buffer = b"", batch.buffer, None
            with self.spare_lock:
                self.spare.append(buffer)


class RateLimiter:
    """Paces requests to the index's write quota: vectors per second and requests per second.

    Each request reserves its share of time, so the rate at the index stays smooth; after a pause, up to
    `burst_seconds` of credit may be spent at once (whether the index grants such a burst is unverified: if it does
    not, the first requests meet 429 and the pacer slows down). After a throttling answer the vector rate drops by a
    quarter and climbs back as the AWS SDKs' adaptive retry mode does (CUBIC): quickly at first, to the rate it was
    throttled at within `recover_seconds`, then slowly past it. A stray 429 costs little: ≈ 0.16 s of a load at the
    quota, where a recovery of 5 % a second cost 0.75 s. A 429 met again on the way back means a limit near that
    rate (a quota shared with another writer, or smaller than the pacer was told): each doubles the time to climb
    back, up to MAX_RECOVER, so the limit is found rather than hammered. Only the first 429 of the requests reserved
    before a cut counts: the others were paced at the old rate.
    """

    CUT = 0.75  # the share of the rate kept after a 429
    MAX_RECOVER = 16.0  # seconds: how slowly the pacer may climb back under a limit it keeps meeting

    def __init__(self, vectors_per_second: float, requests_per_second: float, clock=time.monotonic,
                 sleep=time.sleep, burst_seconds: float = 1.0, recover_seconds: float = 2.0):
        self.max_rate = float(vectors_per_second)
        self.requests_per_second = float(requests_per_second)
        self.burst = burst_seconds  # credit after a pause, as a token bucket of one second's worth gives
        self.recover = self.base_recover = recover_seconds
        self.clock, self.sleep = clock, sleep
        self.lock = threading.Lock()
        self.next_free = clock()  # when the work reserved so far has been paid for at the rate
        self.throttled_at: float | None = None  # when the rate was last cut
        self.cut_from = self.max_rate  # the rate it was cut from

    @property
    def rate(self) -> float:
        """The vector rate paced to now."""
        with self.lock:
            return self._rate(self.clock())

    def _rate(self, now: float) -> float:
        if self.throttled_at is None:
            return self.max_rate
        climbed = (now - self.throttled_at) / self.recover - 1  # -1 at the cut, 0 once back at cut_from
        rate = self.cut_from * (1 + (1 - self.CUT) * climbed ** 3)
        return min(self.max_rate, max(self.max_rate * 0.05, rate))

    def acquire(self, vectors: int) -> float:
        """Wait until sending `vectors` keeps the reserved backlog within the burst, then reserve them; returns
        when they were reserved (for `throttled`)."""
        with self.lock:
            now = self.clock()
            cost = max(vectors / self._rate(now), 1 / self.requests_per_second)
            self.next_free = max(self.next_free, now) + cost
            wait = self.next_free - self.burst - now
        if wait > 0:
            self.sleep(wait)
        return now

    def throttled(self, reserved_at: float | None = None) -> None:
        """A request reserved at `reserved_at` (by default: now) met a 429."""
        with self.lock:
            now = self.clock()
            if reserved_at is not None and self.throttled_at is not None and reserved_at <= self.throttled_at:
                return  # paced before the last cut: that cut already answers it
            self.cut_from = self._rate(now)
            since = None if self.throttled_at is None else now - self.throttled_at
            if since is None or since >= 2 * self.recover:
                self.recover = self.base_recover  # a stray 429: climb back quickly
            elif since >= self.recover / 2:  # throttled again on the way back: a limit near the last cut's rate
                self.recover = min(self.recover * 2, self.MAX_RECOVER)
            self.throttled_at = now


class _RefusedRequest(Exception):
    """PutVectors answered 400 ValidationException: the index refuses something in the request."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def refused_position(message: str, keys: list[str]) -> int | None:
    """The position in `keys` of the vector a ValidationException's message names ("Invalid record for key 'K':
    ..."); None when it names none of them.

    A key may hold quotes, and the message may quote other words: every quoted span that follows the word "key" is
    tried (as it is, and with escaped quotes unescaped), and the longest that is a key of the request is the one."""
    position: dict[str, int] = {}
    for i, key in enumerate(keys):
        position.setdefault(key, i)
    best = None
    lower = message.lower()
    at = lower.find("key")
    while at >= 0:
        opening = at + 3
        while opening < len(message) and message[opening] in " :=":
            opening += 1
        quote = message[opening:opening + 1]
        if quote in ("'", '"'):
            end = message.find(quote, opening + 1)
            while end >= 0:
                span = message[opening + 1:end]
                for candidate in (span, span.replace("\\" + quote, quote)):
                    if candidate in position and (best is None or len(candidate) > len(best)):
                        best = candidate
                end = message.find(quote, end + 1)
        at = lower.find("key", at + 3)
    return None if best is None else position[best]


def _source_uri(vector: bytes) -> str | None:
    """The `source_uri` of a vector's metadata (None when it has none)."""
    try:
        metadata = orjson.loads(vector).get("metadata")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    uri = metadata.get("source_uri") if isinstance(metadata, dict) else None
    return uri if isinstance(uri, str) else None


class PutVectorsSender:
    """Sends prebuilt PutVectors bodies through a boto3 s3vectors client, from a few threads.

    botocore builds, signs and retries the request; only its serialised body is replaced by ours.
    """

    def __init__(self, client, bucket: str, index: str, limiter: RateLimiter, *, threads: int = 4,
                 on_done: Callable[[Batch], None], sleep=time.sleep, max_backoff: float = 20.0,
                 give_up_after: float = 900.0, clock=time.monotonic, jitter=random.random):
        self.client = client
        self.bucket, self.index = bucket, index
        self.head, self.tail = envelope(bucket, index)
        self.clock, self.jitter = clock, jitter
        self.limiter = limiter
        self.on_done = on_done
        self.sleep = sleep
        self.max_backoff = max_backoff
        self.give_up_after = give_up_after
        self.local = threading.local()
        self.queue: queue.Queue = queue.Queue()
        self.idle = threading.Semaphore(threads)  # bodies are ~20 MB: one is handed on only when a thread is free
        self.error: BaseException | None = None
        self.stats = {"requests": 0, "retries": 0, "throttled": 0, "unavailable": 0, "split": 0, "refused": 0,
                      "max_vectors": 0, "max_bytes": 0}
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
        """Hand `batch` to a sending thread, waiting until one is free."""
        while True:
            if self.error is not None:
                raise self.error
            if self.idle.acquire(timeout=0.2):
                break
        self.queue.put(batch)

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
            try:
                if self.error is None:  # after an error, what is queued is dropped: the main thread stops
                    if batch.count:
                        self.send(batch)
                    self.on_done(batch)
            except BaseException as exc:  # handed to the main thread, which reports it
                self.error = exc
            finally:
                self.idle.release()

    def send(self, batch: Batch) -> None:
        """Send one batch until the index accepts all of it: throttling, 5xx and a failing network are retried with
        backoff for up to `give_up_after` seconds, a request the index keeps answering 503 is split in halves (down
        to one vector); anything else the index refuses is raised (402 and 403 as a StepError that names the fix).

        A vector the index refuses (400 ValidationException) is left out and the rest sent again: the one the
        message names ("Invalid record for key 'K': ..."), or, when it names none of the request, the one found by
        sending halves until a refused request holds one vector (log2 of the batch's size levels at most). The
        refused vectors are listed in `batch.refused` and taken out of its keys and count. When the index refuses
        every vector of a batch of more than one, the trouble is the index or the request, not a vector: that
        stops the load."""
        started = self.clock()
        pending = [batch]
        refused: list[Refused] = []
        while pending:
            part = pending.pop(0)
            try:
                if self._put(part, started):
                    continue
                pending[0:0] = part.halves(self.head, self.tail)  # short of capacity
                self._count("split")
            except _RefusedRequest as refusal:
                named = refused_position(refusal.message, part.keys)
                if named is None and part.count > 1:
                    pending[0:0] = part.halves(self.head, self.tail)  # to find the vector the index refuses
                    self._count("split")
                    continue
                i = 0 if named is None else named  # named, or alone in its request
                refused.append(Refused(part.keys[i], _source_uri(part.vector(i, self.tail)), refusal.message))
                self._count("refused")
                if part.count > 1:
                    pending.insert(0, part.without(i, self.head, self.tail))
        if refused:
            if len(refused) == batch.count > 1:
                raise common.StepError(
                    f"PutVectors refused every vector of a request of {batch.count} (ValidationException: "
                    f"{refused[0].message}) — the trouble is index {self.index} in vector bucket {self.bucket} or "
                    "the request, not one vector: check the index's dimension and metadata configuration, then run "
                    "the step again to resume")
            keys = list(batch.keys)
            for vector in refused:
                keys.remove(vector.key)
            batch.keys, batch.count, batch.refused = keys, len(keys), refused

    def _put(self, batch: Batch, started: float) -> bool:
        """One request until accepted (True), or False when it should be split; _RefusedRequest when the index
        answers 400 ValidationException."""
        from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError

        attempt = unavailable = 0
        while True:
            reserved_at = self.limiter.acquire(batch.count)
            self.local.body = batch.body
            try:
                # The same bucket and index as the body: what botocore sees is what the index gets.
                self.client.put_vectors(vectorBucketName=self.bucket, indexName=self.index,
                                        vectors=[{"key": "placeholder", "data": {"float32": [0.0]}}])
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                refusal = self._refusal(code, status, exc)
                if refusal is not None:
                    raise refusal from None
                if code == "ValidationException":
                    raise _RefusedRequest(exc.response.get("Error", {}).get("Message", "")) from None
                if code not in RETRYABLE_CODES and status < 500 and status != 429:
                    raise
                if code in ("TooManyRequestsException", "ThrottlingException", "SlowDown") or status == 429:
                    self.limiter.throttled(reserved_at)
                    self._count("throttled")
                    unavailable = 0
                elif code == "ServiceUnavailableException" or status == 503:
                    self._count("unavailable")
                    unavailable += 1
                    if unavailable >= SPLIT_AFTER_503 and batch.count > 1:
                        self._count("retries")  # sent again, as two halves
                        return False
                else:
                    unavailable = 0
                last = f"{code or status}"
            except (BotoConnectionError, HTTPClientError) as exc:
                last = type(exc).__name__
            else:
                with self.stats_lock:
                    self.stats["requests"] += 1
                    self.stats["max_vectors"] = max(self.stats["max_vectors"], batch.count)
                    self.stats["max_bytes"] = max(self.stats["max_bytes"], len(batch.body))
                return True
            finally:
                self.local.body = None
            attempt += 1
            self._count("retries")
            if self.clock() - started > self.give_up_after:
                raise common.StepError(f"PutVectors kept failing for {self.give_up_after:g}s (last: {last}); "
                                       "nothing was dropped — run the step again to resume")
            self.sleep(min(self.max_backoff, 0.25 * 2 ** min(attempt, 7)) * (0.5 + self.jitter() / 2))

    def _refusal(self, code: str, status: int, exc) -> common.StepError | None:
        """The one-line error for an answer that no retry can fix."""
        message = exc.response.get("Error", {}).get("Message", "")
        where = f"index {self.index} in vector bucket {self.bucket}"
        if code == "ServiceQuotaExceededException" or status == 402:
            return common.StepError(
                f"PutVectors refused: the account's S3 Vectors quota on vectors is reached "
                f"(ServiceQuotaExceededException: {message}) — ask for a higher quota in Service Quotas "
                f"(service S3 Vectors) or remove vectors from {where}, then run the step again to resume")
        if code in ("AccessDeniedException", "AccessDenied"):
            return common.StepError(
                f"PutVectors refused: AccessDenied ({message}) — the caller needs s3vectors:PutVectors on {where}, "
                "then run the step again to resume")
        return None

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


class Prefetch:
    """A streaming body read `depth` blocks ahead by a thread of its own: a socket read releases the GIL, so the
    network's share of the work (most of it on a slow system call path) overlaps the caller's. `read` gives the
    blocks in order, b"" at the end, and raises what the reading raised. Close it to stop the thread early."""

    def __init__(self, body, block: int = 1000 << 10, depth: int = 2):  # below glibc's mmap threshold: reused
        self.blocks: queue.Queue = queue.Queue(depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(body, block), daemon=True, name="prefetch")
        self.thread.start()

    def _run(self, body, block: int) -> None:
        try:
            while not self.stop.is_set():
                data = body.read(block)
                self._put(data)
                if not data:
                    return
        except BaseException as exc:  # handed to the reader, raised there
            self._put(exc)

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.blocks.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def read(self, _n: int = -1) -> bytes:
        item = self.blocks.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)  # a read in progress ends with its timeout; nobody waits for it


def read_lines(body, start: int = 0, chunk_size: int = 4 << 20) -> Iterator[tuple[bytes, int, int]]:
    """Lines of a streaming body as (line without newline, its start offset, the offset just after it), in flat
    memory. The body is read in large blocks and each line is sliced out once (a line split across two blocks is
    joined alone, the blocks are never concatenated). A last line without a newline is yielded too; the caller
    decides whether it is whole."""
    pending = b""  # the start of a line that continues in the next block
    offset = start
    read = body.read
    while True:
        block = read(chunk_size)
        if not block:
            break
        find = block.find
        pos = 0
        if pending:
            newline = find(b"\n")
            if newline < 0:
                pending += block
                continue
            line = pending + block[:newline]
            pending = b""
            end = offset + len(line) + 1
            yield line, offset, end
            offset = end
            pos = newline + 1
        while True:
            newline = find(b"\n", pos)
            if newline < 0:
                break
            end = offset + newline - pos + 1
            yield block[pos:newline], offset, end
            offset = end
            pos = newline + 1
        pending = block[pos:]
    if pending:
        yield pending, offset, offset + len(pending)
