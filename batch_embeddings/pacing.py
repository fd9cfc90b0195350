"""Sending PutVectors requests at the speed the index accepts: the pacer (RateLimiter) that keeps to the index's
write quota, and the sender threads (PutVectorsSender) that back off on 429, retry what may be retried, and set
aside a vector the index refuses so the rest of its request is sent again."""

from __future__ import annotations

import queue
import random
import threading
import time
from typing import Callable

import orjson

import common
from batch_embeddings.vectors import Batch, Refused, envelope

# After this many 503 answers in a row for one request, the index is taken to be short of capacity for that many
# vectors ("too many vectors for the resource capacity", botocore's PutVectorsInput.vectors) and the request is split.
SPLIT_AFTER_503 = 3
RETRYABLE_CODES = frozenset(
    {"TooManyRequestsException", "ThrottlingException", "ServiceUnavailableException", "InternalServerException",
     "RequestTimeoutException", "SlowDown"}
)

# One index's write quota (S3 Vectors): vectors and Put/Delete requests a second.
INDEX_VECTORS_PER_SECOND = 2500
INDEX_REQUESTS_PER_SECOND = 1000


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

    @classmethod
    def at_index_quota(cls) -> RateLimiter:
        """Paced to one index's write quota."""
        return cls(INDEX_VECTORS_PER_SECOND, INDEX_REQUESTS_PER_SECOND)

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
