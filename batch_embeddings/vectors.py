"""What goes into an S3 Vectors index: the index itself (created when missing), and PutVectors request bodies
built fast (Batcher, Batch); pacing.py sends them at the index's pace.

PutVectors takes at most 500 vectors and a 20 MiB body. boto3's own validation and serialisation of float lists
costs about a second per 250 vectors at 3072 dimensions, so the request body is built here instead: each vector
is turned into float32 once (numpy) and written as JSON text with orjson (float32 shortest form, which is what
the index stores, so nothing is lost). The body is then sent through botocore's own PutVectors call — same
endpoint resolution, credentials, SigV4 signing and retries — by swapping the serialised body in the
`before-call` event (pacing.PutVectorsSender).
"""

from __future__ import annotations

import math
import mmap
import struct
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, NamedTuple

import numpy as np
import orjson
import simdjson

import common

# Metadata keys a vector carries that nobody filters on (mirror.provenance): declared when an index is created, so
# that they do not count against the 2 KB of filterable metadata a vector may hold.
NON_FILTERABLE = ["etag", "size", "model_id", "purpose"]
MAX_VECTORS_PER_PUT = 500
MAX_REQUEST_BYTES = 20 * 1024 * 1024
# Room left in a request for the envelope and for what botocore may add; the body itself is measured exactly.
REQUEST_BYTES_MARGIN = 4 * 1024


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
                                   dimension=dimension, distanceMetric="cosine",
                                   metadataConfiguration={"nonFilterableMetadataKeys": NON_FILTERABLE})
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


