"""Amazon S3 Vectors stand-in with the service's limits, ListVectors pagination, QueryVectors and a write quota.

moto implements S3 Vectors without its limits and without QueryVectors; this WSGI app follows the "S3 Vectors"
section of /work/shared/aws-facts.md and botocore's `s3vectors` model (rest-json: every operation is
`POST /<OperationName>` with a JSON body; errors carry `x-amzn-ErrorType` and `{"message": ...}`).

Run it in a thread with `tests.standins.serve(make_app())`, or as its own process:

    uv run python -m tests.standins.s3vectors --port 0 [--vectors-per-second 2500 --requests-per-second 1000
                                                        --fault-rate 0.1 --seed 1]

which prints its URL on the first stdout line and serves until killed.

Every limit is an option (see DEFAULT_OPTIONS) whose default is the real service's value. Quota rates of 0 (or
None) mean "no quota". Control API (JSON), for tests and benchmarks:

    GET  /_standin/stats    per-index counters (see _IndexStats) plus global counters and the current config
    GET  /_standin/config   current options
    POST /_standin/config   {"vectors_per_second": .., "requests_per_second": .., "fault_rate": .., "seed": ..,
                             "max_request_bytes": .., <any other option>} -> the new options
    POST /_standin/reset    drop every bucket, index, vector and counter; {"stats_only": true} keeps the data

Not verified against the real service (cheap to change, each is an option or one line):
  * duplicate keys inside one PutVectors -> ValidationException (option reject_duplicate_keys);
  * metadata size = length of the compact JSON encoding of the metadata object (filterable size: the same for
    the object without the non-filterable keys); KB taken as 1024 bytes; metadata values must be string, number,
    boolean or a list of those;
  * ListVectors stops a page early once the returned keys+data+metadata pass 1 MiB (the model documents "1 MB");
    with list_bytes_count_stored_data, data and metadata count even when not returned;
  * GetIndex returns indexMode (the bucket's defaultIndexMode when the index was created: option
    default_index_mode, ENHANCED as for buckets created from 2026-09-30) and the index's encryptionConfiguration
    (the bucket's unless CreateIndex names one);
    segments partition keys by crc32(key) % segmentCount; pages are in key order;
  * $ne / $nin match a vector that lacks the key; $gt.. on an array value match if any element does;
  * euclidean distance is the plain L2 distance (not squared); cosine distance is 1 - cos;
  * a request over the body limit gets ValidationException (400), not 413;
  * a vector over the filterable metadata limit fails the request with the message users of the service report,
    "Invalid record for key 'K': Filterable metadata must have at most 2048 bytes"; the other validation messages
    are this stand-in's own. Options refuse_keys and refused_keys_unnamed refuse chosen keys with that message
    (or one that names no key), whatever their metadata;
  * the write quota's burst is one second's worth of each rate; DeleteVectors keys count as vectors;
  * an indexArn for another region/account -> NotFoundException;
  * PutVectors answers on demand (options put_capacity_vectors, vector_quota, deny_put_vectors): 503
    ServiceUnavailableException "too many vectors for the resource capacity" for a request of more vectors than
    the capacity (the threshold the service uses is not documented), 402 ServiceQuotaExceededException when the
    index would hold more vectors than the quota, 403 AccessDeniedException naming s3vectors:PutVectors.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import heapq
import itertools
import math
import random
import re
import sys
import threading
import time
import zlib
from array import array
from typing import Any, Callable

import numpy as np
import orjson
import simdjson
from werkzeug.wrappers import Request, Response

DEFAULT_OPTIONS: dict[str, Any] = {
    # PutVectors / DeleteVectors
    "max_vectors_per_put": 500,
    "max_keys_per_delete": 500,
    "max_request_bytes": 20 * 1024 * 1024,  # checked on every request body as received
    "reject_duplicate_keys": True,  # unverified
    # index / vector shape
    "max_dimension": 4096,
    "max_key_length": 1024,
    "max_metadata_bytes": 40 * 1024,
    "max_filterable_metadata_bytes": 2 * 1024,
    "max_metadata_keys": 50,
    "max_non_filterable_keys": 10,
    "max_indexes_per_bucket": 10_000,
    # reads
    "max_get_keys": 100,
    "max_list_results": 1000,
    "default_list_results": 500,
    "max_list_response_bytes": 1024 * 1024,
    # unverified: whether ListVectors' 1 MB of "processed" data counts each vector's stored data and metadata even
    # when returnData/returnMetadata leave them out (True: pages of 3072-dimension vectors hold about 80 keys)
    "list_bytes_count_stored_data": False,
    "max_segment_count": 16,
    "max_top_k": 100,
    # QueryVectors answers at most this many results a page, the rest behind nextToken (the user guide: "when topK
    # exceeds the page size, results are returned across multiple pages"); the real page size is unverified: 0 = one
    # page whatever topK
    "query_page_size": 30,
    "max_list_buckets_results": 500,
    # write quota per index (token buckets, burst = one second's worth); 0/None disables
    "vectors_per_second": 2500,
    "requests_per_second": 1000,
    # fault injection on PutVectors: share answered 429 TooManyRequests or 503 ServiceUnavailable (half each)
    "fault_rate": 0.0,
    # PutVectors answers on demand (see _put_vectors_refusal): 503 for a request of more vectors than this
    # ("too many vectors for the resource capacity"); 402 once the index would hold more vectors than this (the
    # account's vector quota); 403 AccessDenied for s3vectors:PutVectors. None/False = off.
    "put_capacity_vectors": None,
    "vector_quota": None,
    "deny_put_vectors": False,
    # PutVectors refuses the whole request, 400 ValidationException, when it holds one of these keys, as the service
    # refuses a request with one invalid vector: "Invalid record for key 'K': Filterable metadata must have at most
    # 2048 bytes" (the wording langchain-aws and llama-index users report), or with refused_keys_unnamed a message
    # that names no key. None = off.
    "refuse_keys": None,
    "refused_keys_unnamed": False,
    # 429 for any PutVectors that would take the index past this many vectors: a load held still at a known point
    # (to be killed there), as a long throttling would. None = off.
    "hold_beyond_vectors": None,
    "seed": None,
    # keep vector data (False saves memory in long benchmarks; Get/List then return no data, Query is refused)
    "store_data": True,
    # indexMode of new indexes (the bucket's defaultIndexMode): ENHANCED for vector buckets created from 2026-09-30,
    # CLASSIC before
    "default_index_mode": "ENHANCED",
}
_INDEX_MODES = ("CLASSIC", "ENHANCED")

_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]\Z")
_INDEX_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")
_BUCKET_ARN = re.compile(r"arn:aws[-a-z0-9]*:s3vectors:([a-z0-9-]+):([0-9]{12}):bucket/([^/]+)\Z")
_INDEX_ARN = re.compile(r"arn:aws[-a-z0-9]*:s3vectors:([a-z0-9-]+):([0-9]{12}):bucket/([^/]+)/index/([^/]+)\Z")

_JSON = "application/json"
_FLT_MAX = 3.4028234663852886e38  # largest finite float32
_FLT_TINY = 1e-30  # below this norm, float32 rounding may zero the vector: recompute on the stored values


class ApiError(Exception):
    def __init__(self, code: str, status: int, message: str):
        super().__init__(message)
        self.code, self.status, self.message = code, status, message


def _validation(message: str) -> ApiError:
    return ApiError("ValidationException", 400, message)


def _not_found(message: str) -> ApiError:
    return ApiError("NotFoundException", 404, message)


def _conflict(message: str) -> ApiError:
    return ApiError("ConflictException", 409, message)


# ----------------------------------------------------------------------------------------------------- state


class _TokenBucket:
    """Capacity = one second's worth of `rate`; rate 0/None = unlimited."""

    __slots__ = ("rate", "tokens", "stamp")

    def __init__(self, rate: float | None):
        self.rate = float(rate) if rate else 0.0
        self.tokens = self.rate
        self.stamp = time.monotonic()

    def available(self, now: float) -> float:
        if self.rate <= 0:
            return math.inf
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.tokens

    def take(self, n: float) -> None:
        if self.rate > 0:
            self.tokens -= n


class _IndexStats:
    FIELDS = (
        "put_requests_accepted",
        "put_vectors_accepted",
        "delete_requests_accepted",
        "delete_keys_accepted",
        "rejected_quota",
        "rejected_fault_429",
        "rejected_fault_503",
        "rejected_validation",
        "rejected_denied",
        "rejected_capacity_503",
        "rejected_quota_402",
        "rejected_held_429",
        "largest_request_vectors",
        "largest_request_bytes",
        "bytes_accepted",
    )

    def __init__(self) -> None:
        for f in self.FIELDS:
            setattr(self, f, 0)

    def as_dict(self) -> dict[str, int]:
        d = {f: getattr(self, f) for f in self.FIELDS}
        d["rejected_fault"] = self.rejected_fault_429 + self.rejected_fault_503
        return d


class _Index:
    __slots__ = (
        "bucket", "name", "arn", "created", "dimension", "metric", "metadata_configuration", "non_filterable",
        "vectors", "version", "sorted_cache", "segment_cache", "q_vectors", "q_requests", "mode", "encryption",
    )

    def __init__(self, bucket: str, name: str, arn: str, dimension: int, metric: str,
                 metadata_configuration: dict | None, options: dict):
        self.bucket, self.name, self.arn = bucket, name, arn
        self.created = time.time()
        self.dimension, self.metric = dimension, metric
        self.metadata_configuration = metadata_configuration
        self.mode, self.encryption = "CLASSIC", None  # set by S3VectorsStandin._index_mode_and_encryption
        self.non_filterable = frozenset((metadata_configuration or {}).get("nonFilterableMetadataKeys") or ())
        # key -> (array('f') | None, norm, metadata | None)
        self.vectors: dict[str, tuple[array | None, float, dict | None]] = {}
        self.version = 0  # bumped whenever the key set changes
        self.sorted_cache: tuple[int, list[str]] | None = None
        self.segment_cache: dict[tuple[int, int], tuple[int, list[str]]] = {}
        self.reset_quota(options)

    def reset_quota(self, options: dict) -> None:
        self.q_vectors = _TokenBucket(options["vectors_per_second"])
        self.q_requests = _TokenBucket(options["requests_per_second"])

    def sorted_keys(self, segment_count: int, segment_index: int) -> list[str]:
        if self.sorted_cache is None or self.sorted_cache[0] != self.version:
            self.sorted_cache = (self.version, sorted(self.vectors))
            self.segment_cache.clear()
        keys = self.sorted_cache[1]
        if segment_count == 1:
            return keys
        cached = self.segment_cache.get((segment_count, segment_index))
        if cached is None or cached[0] != self.version:
            seg = [k for k in keys if zlib.crc32(k.encode("utf-8")) % segment_count == segment_index]
            cached = (self.version, seg)
            self.segment_cache[(segment_count, segment_index)] = cached
        return cached[1]


class _Bucket:
    __slots__ = ("name", "arn", "created", "encryption", "indexes", "default_mode")

    def __init__(self, name: str, arn: str, encryption: dict | None, default_mode: str = "ENHANCED"):
        self.name, self.arn, self.created = name, arn, time.time()
        self.encryption = encryption or {"sseType": "AES256"}
        self.indexes: dict[str, _Index] = {}
        self.default_mode = default_mode


# ------------------------------------------------------------------------------------------ input helpers


def _opt_bool(body: dict, name: str) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if type(v) is not bool:
        raise _validation(f"{name} must be a boolean")
    return v


def _opt_int(body: dict, name: str, lo: int, hi: int | None, default: int | None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if type(v) is not int or v < lo or (hi is not None and v > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise _validation(f"{name} must be an integer {rng}, got {v!r}")
    return v


def _encode_token(obj: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(obj)).decode("ascii")


def _decode_token(token: Any) -> Any:
    if type(token) is not str or not token:
        raise _validation("nextToken must be a non-empty string")
    try:
        return orjson.loads(base64.urlsafe_b64decode(token.encode("ascii")))
    except Exception:
        raise _validation("invalid nextToken") from None


def _is_primitive(v: Any) -> bool:
    t = type(v)
    return t is str or t is bool or t is int or t is float


def _same(a: Any, b: Any) -> bool:
    """Typed equality: booleans never equal numbers, numbers compare across int/float."""
    ta, tb = type(a), type(b)
    if ta is bool or tb is bool:
        return ta is tb and a == b
    if ta is str or tb is str:
        return ta is tb and a == b
    return a == b


def _is_number(v: Any) -> bool:
    t = type(v)
    return t is int or t is float


# ------------------------------------------------------------------------------------------------ filters

_CMP = {
    "$gt": lambda x, y: x > y,
    "$gte": lambda x, y: x >= y,
    "$lt": lambda x, y: x < y,
    "$lte": lambda x, y: x <= y,
}
_MISSING = object()
Predicate = Callable[[dict], bool]


def compile_filter(flt: Any, non_filterable: frozenset) -> Predicate:
    """Turn a QueryVectors filter document into a predicate over a metadata dict (ValidationException if bad)."""
    if type(flt) is not dict or not flt:
        raise _validation("filter must be a non-empty JSON object")
    preds: list[Predicate] = []
    for key, value in flt.items():
        if key in ("$and", "$or"):
            if type(value) is not list or not value:
                raise _validation(f"{key} takes a non-empty array of filters")
            subs = [compile_filter(v, non_filterable) for v in value]
            if key == "$and":
                preds.append(lambda m, subs=subs: all(p(m) for p in subs))
            else:
                preds.append(lambda m, subs=subs: any(p(m) for p in subs))
        elif key.startswith("$"):
            raise _validation(f"unsupported filter operator {key} at the top level")
        else:
            if key in non_filterable:
                raise _validation(f"metadata key {key!r} is non-filterable in this index and cannot be filtered on")
            if type(value) is dict:
                if not value:
                    raise _validation(f"empty operator object for key {key!r}")
                for op, operand in value.items():
                    preds.append(_field_predicate(key, op, operand))
            else:
                preds.append(_field_predicate(key, "$eq", value))
    if len(preds) == 1:
        return preds[0]
    return lambda m: all(p(m) for p in preds)


def _field_predicate(key: str, op: str, operand: Any) -> Predicate:
    if op in ("$eq", "$ne"):
        if not _is_primitive(operand):
            raise _validation(f"{op} on {key!r} takes a string, number or boolean")

        def eq(m: dict) -> bool:
            x = m.get(key, _MISSING)
            if x is _MISSING:
                return False
            if type(x) is list:
                return any(_same(e, operand) for e in x)
            return _same(x, operand)

        if op == "$eq":
            return eq
        return lambda m: not eq(m)
    if op in _CMP:
        if not _is_number(operand):
            raise _validation(f"{op} on {key!r} takes a number")
        cmp = _CMP[op]

        def compare(m: dict) -> bool:
            x = m.get(key, _MISSING)
            if type(x) is list:
                return any(_is_number(e) and cmp(e, operand) for e in x)
            return _is_number(x) and cmp(x, operand)

        return compare
    if op in ("$in", "$nin"):
        if type(operand) is not list or not operand or not all(_is_primitive(v) for v in operand):
            raise _validation(f"{op} on {key!r} takes a non-empty array of strings, numbers or booleans")
        values = list(operand)

        def member(m: dict) -> bool:
            x = m.get(key, _MISSING)
            if x is _MISSING:
                return False
            xs = x if type(x) is list else (x,)
            return any(_same(e, v) for e in xs for v in values)

        if op == "$in":
            return member
        return lambda m: not member(m)
    if op == "$exists":
        if type(operand) is not bool:
            raise _validation(f"$exists on {key!r} takes a boolean")
        return lambda m: (key in m) == operand
    raise _validation(f"unsupported filter operator {op!r} on {key!r}")


# ---------------------------------------------------------------------------------------------------- app


class S3VectorsStandin:
    """WSGI application. All state lives here, guarded by one lock; JSON parsing and vector validation happen
    outside it."""

    def __init__(self, *, region: str = "us-east-1", account_id: str = "123456789012",
                 options: dict | None = None):
        unknown = set(options or ()) - set(DEFAULT_OPTIONS)
        if unknown:
            raise ValueError(f"unknown options: {sorted(unknown)}")
        self.region, self.account_id = region, account_id
        self.options = {**DEFAULT_OPTIONS, **(options or {})}
        if self.options["default_index_mode"] not in _INDEX_MODES:
            raise ValueError(f"default_index_mode must be one of {_INDEX_MODES}")
        self.lock = threading.Lock()
        self.buckets: dict[str, _Bucket] = {}
        self.stats: dict[str, _IndexStats] = {}
        self.global_stats = {"requests": 0, "rejected_too_large": 0, "largest_rejected_bytes": 0}
        self.rng = random.Random(self.options["seed"])
        self._request_ids = itertools.count(1)
        self.ops: dict[str, Callable[[dict, int], dict]] = {
            "CreateVectorBucket": self.create_vector_bucket,
            "GetVectorBucket": self.get_vector_bucket,
            "DeleteVectorBucket": self.delete_vector_bucket,
            "ListVectorBuckets": self.list_vector_buckets,
            "CreateIndex": self.create_index,
            "GetIndex": self.get_index,
            "DeleteIndex": self.delete_index,
            "ListIndexes": self.list_indexes,
            "PutVectors": self.put_vectors,
            "GetVectors": self.get_vectors,
            "ListVectors": self.list_vectors,
            "DeleteVectors": self.delete_vectors,
            "QueryVectors": self.query_vectors,
        }

    # ------------------------------------------------------------------------------------------ plumbing

    def __call__(self, environ, start_response):
        request = Request(environ)
        try:
            path = request.path
            if path.startswith("/_standin/"):
                response = self._control(request, path[len("/_standin/"):])
            else:
                response = self._api(request, environ, path)
        except ApiError as e:
            response = self._error(e)
        return response(environ, start_response)

    def _respond(self, obj: Any, status: int = 200) -> Response:
        return Response(orjson.dumps(obj), status=status, content_type=_JSON,
                        headers={"x-amzn-RequestId": f"standin-{next(self._request_ids)}"})

    def _error(self, e: ApiError) -> Response:
        response = self._respond({"message": e.message}, e.status)
        response.headers["x-amzn-ErrorType"] = e.code
        return response

    def _read_body(self, request: Request, environ) -> bytes:
        """Read the whole body; ValidationException (after draining it) if it exceeds max_request_bytes."""
        limit = self.options["max_request_bytes"]
        stream = environ["wsgi.input"]
        length = request.content_length
        if length is None and not environ.get("wsgi.input_terminated"):
            return b""
        if length is not None and (not limit or length <= limit):
            body = stream.read(length) if length else b""
        else:
            # chunked, or announced over the limit: read in pieces, keep at most limit + 1 bytes
            parts, total, remaining = [], 0, length
            while remaining is None or remaining > 0:
                chunk = stream.read(1 << 20 if remaining is None else min(1 << 20, remaining))
                if not chunk:
                    break
                total += len(chunk)
                if remaining is not None:
                    remaining -= len(chunk)
                if not limit or total <= limit:
                    parts.append(chunk)
            if limit and total > limit:
                with self.lock:
                    self.global_stats["rejected_too_large"] += 1
                    self.global_stats["largest_rejected_bytes"] = max(self.global_stats["largest_rejected_bytes"],
                                                                      total)
                raise _validation(f"Request body of {total} bytes exceeds the maximum of {limit} bytes")
            body = b"".join(parts)
        if limit and len(body) > limit:
            with self.lock:
                self.global_stats["rejected_too_large"] += 1
                self.global_stats["largest_rejected_bytes"] = max(self.global_stats["largest_rejected_bytes"],
                                                                  len(body))
            raise _validation(f"Request body of {len(body)} bytes exceeds the maximum of {limit} bytes")
        return body

    def _api(self, request: Request, environ, path: str) -> Response:
        op = self.ops.get(path.strip("/"))
        if op is None or request.method != "POST":
            # drain so the keep-alive connection stays usable
            self._read_body(request, environ)
            raise ApiError("UnknownOperationException", 404, f"{request.method} {path} is not an operation")
        body_bytes = self._read_body(request, environ)
        with self.lock:
            self.global_stats["requests"] += 1
        body = _read_put_vectors(body_bytes) if op == self.put_vectors else None
        if body is None:
            body = self._parse(body_bytes)
        return self._respond(op(body, len(body_bytes)))

    @staticmethod
    def _parse(body_bytes: bytes) -> dict:
        if not body_bytes.strip():
            return {}
        try:
            body = orjson.loads(body_bytes)
        except orjson.JSONDecodeError as e:
            raise _validation(f"Request body is not valid JSON (NaN/Infinity are not JSON): {e}") from None
        if type(body) is not dict:
            raise _validation("Request body must be a JSON object")
        return body

    # ---------------------------------------------------------------------------------------- control API

    def _control(self, request: Request, what: str) -> Response:
        body = self._parse(request.get_data()) if request.method == "POST" else {}
        if what == "stats" and request.method == "GET":
            return self._respond(self.snapshot_stats())
        if what == "config" and request.method == "GET":
            with self.lock:
                return self._respond(dict(self.options))
        if what == "config" and request.method == "POST":
            return self._respond(self.configure(**body))
        if what == "reset" and request.method == "POST":
            self.reset(stats_only=bool(body.get("stats_only")))
            return self._respond({})
        raise ApiError("UnknownOperationException", 404, f"{request.method} /_standin/{what} is not a control call")

    def snapshot_stats(self) -> dict:
        with self.lock:
            indexes = {}
            for name, st in self.stats.items():
                d = st.as_dict()
                bucket_name, index_name = name.split("/", 1)
                bucket = self.buckets.get(bucket_name)
                index = bucket.indexes.get(index_name) if bucket else None
                d["exists"] = index is not None
                d["vectors"] = len(index.vectors) if index else 0
                indexes[name] = d
            for bucket in self.buckets.values():
                for index in bucket.indexes.values():
                    name = f"{bucket.name}/{index.name}"
                    if name not in indexes:
                        indexes[name] = {**_IndexStats().as_dict(), "exists": True, "vectors": len(index.vectors)}
            return {"indexes": indexes, "global": dict(self.global_stats), "config": dict(self.options)}

    def configure(self, **changes: Any) -> dict:
        unknown = set(changes) - set(DEFAULT_OPTIONS)
        if unknown:
            raise _validation(f"unknown options: {sorted(unknown)}")
        if changes.get("default_index_mode", "ENHANCED") not in _INDEX_MODES:
            raise _validation(f"default_index_mode must be one of {_INDEX_MODES}")
        if "fault_rate" in changes:
            fr = changes["fault_rate"]
            if not _is_number(fr) or not 0 <= fr <= 1:
                raise _validation("fault_rate must be between 0 and 1")
        with self.lock:
            self.options.update(changes)
            if "seed" in changes:
                self.rng = random.Random(self.options["seed"])
            if "vectors_per_second" in changes or "requests_per_second" in changes:
                for bucket in self.buckets.values():
                    for index in bucket.indexes.values():
                        index.reset_quota(self.options)
            return dict(self.options)

    def reset(self, stats_only: bool = False) -> None:
        with self.lock:
            self.stats.clear()
            self.global_stats = {k: 0 for k in self.global_stats}
            self.rng = random.Random(self.options["seed"])
            if not stats_only:
                self.buckets.clear()
            for bucket in self.buckets.values():
                for index in bucket.indexes.values():
                    index.reset_quota(self.options)

    # ----------------------------------------------------------------------------------------- addressing

    def _bucket_name_from(self, body: dict) -> str:
        name, arn = body.get("vectorBucketName"), body.get("vectorBucketArn")
        if (name is None) == (arn is None):
            raise _validation("Specify exactly one of vectorBucketName and vectorBucketArn")
        if arn is not None:
            m = _BUCKET_ARN.match(arn) if type(arn) is str else None
            if not m:
                raise _validation(f"Invalid vectorBucketArn: {arn!r}")
            region, account, name = m.groups()
            if (region, account) != (self.region, self.account_id):
                raise _not_found(f"Vector bucket {arn} not found")
        _check_bucket_name(name)
        return name

    def _index_names_from(self, body: dict) -> tuple[str, str]:
        arn, bucket, index = body.get("indexArn"), body.get("vectorBucketName"), body.get("indexName")
        if arn is not None:
            if bucket is not None or index is not None:
                raise _validation("Specify either indexArn or vectorBucketName and indexName, not both")
            m = _INDEX_ARN.match(arn) if type(arn) is str else None
            if not m:
                raise _validation(f"Invalid indexArn: {arn!r}")
            region, account, bucket, index = m.groups()
            if (region, account) != (self.region, self.account_id):
                raise _not_found(f"Vector index {arn} not found")
        elif bucket is None or index is None:
            raise _validation("Specify either indexArn or both vectorBucketName and indexName")
        _check_bucket_name(bucket)
        _check_index_name(index)
        return bucket, index

    def _bucket(self, name: str) -> _Bucket:  # call with lock held
        bucket = self.buckets.get(name)
        if bucket is None:
            raise _not_found(f"Vector bucket {name} not found")
        return bucket

    def _index(self, bucket_name: str, index_name: str) -> _Index:  # call with lock held
        index = self._bucket(bucket_name).indexes.get(index_name)
        if index is None:
            raise _not_found(f"Vector index {index_name} not found in vector bucket {bucket_name}")
        return index

    def _stats(self, index: _Index) -> _IndexStats:  # call with lock held
        key = f"{index.bucket}/{index.name}"
        st = self.stats.get(key)
        if st is None:
            st = self.stats[key] = _IndexStats()
        return st

    def _bucket_arn(self, name: str) -> str:
        return f"arn:aws:s3vectors:{self.region}:{self.account_id}:bucket/{name}"

    # ------------------------------------------------------------------------------------------ buckets

    def create_vector_bucket(self, body: dict, _size: int) -> dict:
        name = body.get("vectorBucketName")
        _check_bucket_name(name)
        enc = body.get("encryptionConfiguration")
        if enc is not None and type(enc) is not dict:
            raise _validation("encryptionConfiguration must be an object")
        arn = self._bucket_arn(name)
        with self.lock:
            if name in self.buckets:
                raise _conflict(f"Vector bucket {name} already exists")
            self.buckets[name] = _Bucket(name, arn, enc, self.options["default_index_mode"])
        return {"vectorBucketArn": arn}

    def get_vector_bucket(self, body: dict, _size: int) -> dict:
        name = self._bucket_name_from(body)
        with self.lock:
            b = self._bucket(name)
            return {"vectorBucket": {"vectorBucketName": b.name, "vectorBucketArn": b.arn,
                                     "creationTime": b.created, "encryptionConfiguration": b.encryption,
                                     "defaultIndexMode": b.default_mode}}

    def delete_vector_bucket(self, body: dict, _size: int) -> dict:
        name = self._bucket_name_from(body)
        with self.lock:
            b = self._bucket(name)
            if b.indexes:
                raise _conflict(f"Vector bucket {name} is not empty: delete its {len(b.indexes)} index(es) first")
            del self.buckets[name]
        return {}

    def list_vector_buckets(self, body: dict, _size: int) -> dict:
        limit = self.options["max_list_buckets_results"]
        max_results = _opt_int(body, "maxResults", 1, limit, limit)
        prefix = body.get("prefix")
        if prefix is not None and (type(prefix) is not str or not prefix):
            raise _validation("prefix must be a non-empty string")
        after = _decode_token(body["nextToken"]) if body.get("nextToken") is not None else None
        with self.lock:
            items = sorted((b.name, b.arn, b.created) for b in self.buckets.values())
        return self._page(items, prefix, after, max_results, "vectorBuckets",
                          lambda it: {"vectorBucketName": it[0], "vectorBucketArn": it[1], "creationTime": it[2]})

    @staticmethod
    def _page(items: list, prefix: str | None, after: Any, max_results: int, field: str,
              render: Callable[[Any], dict]) -> dict:
        if after is not None and type(after) is not str:
            raise _validation("invalid nextToken")
        if prefix:
            items = [it for it in items if it[0].startswith(prefix)]
        if after is not None:
            items = items[bisect.bisect_right([it[0] for it in items], after):]
        out: dict = {field: [render(it) for it in items[:max_results]]}
        if len(items) > max_results:
            out["nextToken"] = _encode_token(items[max_results - 1][0])
        return out

    # ------------------------------------------------------------------------------------------ indexes

    def create_index(self, body: dict, _size: int) -> dict:
        bucket_name = self._bucket_name_from(body)
        name = body.get("indexName")
        _check_index_name(name)
        if body.get("dataType") != "float32":
            raise _validation(f"dataType must be 'float32', got {body.get('dataType')!r}")
        dimension = body.get("dimension")
        if type(dimension) is not int or not 1 <= dimension <= self.options["max_dimension"]:
            raise _validation(f"dimension must be an integer between 1 and {self.options['max_dimension']}")
        metric = body.get("distanceMetric")
        if metric not in ("cosine", "euclidean"):
            raise _validation(f"distanceMetric must be 'cosine' or 'euclidean', got {metric!r}")
        mc = body.get("metadataConfiguration")
        if mc is not None:
            if type(mc) is not dict:
                raise _validation("metadataConfiguration must be an object")
            keys = mc.get("nonFilterableMetadataKeys")
            if keys is not None:
                if type(keys) is not list or not all(type(k) is str and 1 <= len(k) <= 63 for k in keys):
                    raise _validation("nonFilterableMetadataKeys must be a list of 1-63 character strings")
                if len(keys) > self.options["max_non_filterable_keys"]:
                    raise _validation(f"at most {self.options['max_non_filterable_keys']} "
                                      f"nonFilterableMetadataKeys are allowed, got {len(keys)}")
            if mc.get("textSearchConfigurations"):
                raise _validation("textSearchConfigurations (full-text search) is not supported by this stand-in")
        with self.lock:
            bucket = self._bucket(bucket_name)
            if name in bucket.indexes:
                raise _conflict(f"Vector index {name} already exists in vector bucket {bucket_name}")
            if len(bucket.indexes) >= self.options["max_indexes_per_bucket"]:
                raise ApiError("ServiceQuotaExceededException", 402,
                               f"vector bucket {bucket_name} already holds {len(bucket.indexes)} indexes")
            arn = f"{bucket.arn}/index/{name}"
            bucket.indexes[name] = _Index(bucket_name, name, arn, dimension, metric, mc, self.options)
            self._index_mode_and_encryption(bucket, bucket.indexes[name], body)
        return {"indexArn": arn}

    @staticmethod
    def _index_mode_and_encryption(bucket: _Bucket, index: _Index, body: dict) -> None:
        """Since general availability an index has a mode (the bucket's default when created) and an encryption
        configuration (the bucket's unless CreateIndex names one)."""
        enc = body.get("encryptionConfiguration")
        if enc is not None and type(enc) is not dict:
            raise _validation("encryptionConfiguration must be an object")
        index.mode, index.encryption = bucket.default_mode, enc or dict(bucket.encryption)

    @staticmethod
    def _index_description(ix: _Index) -> dict:
        """GetIndex's `index`: every member of botocore's Index shape the stand-in knows."""
        out = {"vectorBucketName": ix.bucket, "indexName": ix.name, "indexArn": ix.arn, "creationTime": ix.created,
               "dataType": "float32", "dimension": ix.dimension, "distanceMetric": ix.metric,
               "indexMode": ix.mode}
        if ix.metadata_configuration is not None:
            out["metadataConfiguration"] = ix.metadata_configuration
        if ix.encryption is not None:
            out["encryptionConfiguration"] = ix.encryption
        return out

    def get_index(self, body: dict, _size: int) -> dict:
        bucket_name, index_name = self._index_names_from(body)
        with self.lock:
            return {"index": self._index_description(self._index(bucket_name, index_name))}

    def delete_index(self, body: dict, _size: int) -> dict:
        bucket_name, index_name = self._index_names_from(body)
        with self.lock:
            self._index(bucket_name, index_name)
            del self.buckets[bucket_name].indexes[index_name]
        return {}

    def list_indexes(self, body: dict, _size: int) -> dict:
        bucket_name = self._bucket_name_from(body)
        limit = self.options["max_list_buckets_results"]
        max_results = _opt_int(body, "maxResults", 1, limit, limit)
        prefix = body.get("prefix")
        if prefix is not None and (type(prefix) is not str or not prefix):
            raise _validation("prefix must be a non-empty string")
        after = _decode_token(body["nextToken"]) if body.get("nextToken") is not None else None
        with self.lock:
            items = sorted((ix.name, ix.arn, ix.created, ix.bucket) for ix in self._bucket(bucket_name).indexes.values())
        return self._page(items, prefix, after, max_results, "indexes",
                          lambda it: {"vectorBucketName": it[3], "indexName": it[0], "indexArn": it[1],
                                      "creationTime": it[2]})

    # ------------------------------------------------------------------------------------------ vectors

    def _index_snapshot(self, body: dict) -> _Index:
        bucket_name, index_name = self._index_names_from(body)
        with self.lock:
            return self._index(bucket_name, index_name)

    def _check_keys(self, keys: Any, name: str, max_count: int) -> list[str]:
        if type(keys) is not list or not 1 <= len(keys) <= max_count:
            n = len(keys) if type(keys) is list else "no"
            raise _validation(f"{name} must hold between 1 and {max_count} keys, got {n}")
        max_len = self.options["max_key_length"]
        for k in keys:
            if type(k) is not str or not 1 <= len(k) <= max_len:
                raise _validation(f"each key must be a string of 1 to {max_len} characters")
        return keys

    def _check_vector_data(self, data: Any, index: _Index, what: str) -> tuple[array, float]:
        values = data.get("float32") if type(data) is dict and len(data) == 1 else None
        if type(values) is not list and type(values) is not np.ndarray:  # an array: read by _read_put_vectors
            raise _validation(f"{what}: data must be {{\"float32\": [...]}}")
        if len(values) != index.dimension:
            raise _validation(f"{what}: vector has {len(values)} dimensions, the index has {index.dimension}")
        arr, norm = _stored_float64(values) if type(values) is np.ndarray else _stored_list(values, what)
        if not math.isfinite(norm):
            raise _validation(f"{what}: vector values must be finite float32 numbers (no NaN or Infinity)")
        if norm == 0.0 and index.metric == "cosine":
            raise _validation(f"{what}: an all-zero vector is not allowed in a cosine index")
        return arr, norm

    def _check_metadata(self, meta: Any, index: _Index, what: str, key: str) -> None:
        if type(meta) is not dict:
            raise _validation(f"{what}: metadata must be a JSON object")
        o = self.options
        if len(meta) > o["max_metadata_keys"]:
            raise _validation(f"{what}: metadata has {len(meta)} keys, the maximum is {o['max_metadata_keys']}")
        for k, v in meta.items():
            if type(v) is list:
                if not all(_is_primitive(e) for e in v):
                    raise _validation(f"{what}: metadata {k!r} must be a list of strings, numbers or booleans")
            elif not _is_primitive(v):
                raise _validation(f"{what}: metadata {k!r} must be a string, number, boolean or list")
        size = len(orjson.dumps(meta))
        if size > o["max_metadata_bytes"]:
            raise _validation(f"{what}: metadata is {size} bytes, the maximum is {o['max_metadata_bytes']}")
        if size > o["max_filterable_metadata_bytes"]:
            nf = index.non_filterable
            filterable = {k: v for k, v in meta.items() if k not in nf} if nf else meta
            fsize = len(orjson.dumps(filterable))
            if fsize > o["max_filterable_metadata_bytes"]:
                raise _validation(_invalid_record(key, o["max_filterable_metadata_bytes"]))

    def _count_rejection(self, index: _Index) -> None:
        with self.lock:
            self._stats(index).rejected_validation += 1

    def _admit_write(self, index: _Index, n_vectors: int, st: _IndexStats, fault_check: bool) -> None:
        """With the lock held: injected faults, then the per-index quota. Raises without consuming tokens."""
        if fault_check:
            rate = self.options["fault_rate"]
            if rate and self.rng.random() < rate:
                if self.rng.random() < 0.5:
                    st.rejected_fault_429 += 1
                    raise ApiError("TooManyRequestsException", 429, "Injected fault: request rate exceeded")
                st.rejected_fault_503 += 1
                raise ApiError("ServiceUnavailableException", 503, "Injected fault: service unavailable")
        now = time.monotonic()
        if index.q_requests.available(now) < 1 or index.q_vectors.available(now) < n_vectors:
            st.rejected_quota += 1
            raise ApiError("TooManyRequestsException", 429,
                           f"Write quota exceeded for index {index.name}: at most "
                           f"{index.q_requests.rate or 'unlimited'} requests/s and "
                           f"{index.q_vectors.rate or 'unlimited'} vectors/s")
        index.q_requests.take(1)
        index.q_vectors.take(n_vectors)

    def _put_vectors_refusal(self, index: _Index, staged: list, st: _IndexStats) -> None:
        """With the lock held: the PutVectors answers a test asks for with put_capacity_vectors, vector_quota,
        hold_beyond_vectors and deny_put_vectors (403 first, as the service authorises before it looks at the
        request)."""
        o = self.options
        if o["deny_put_vectors"]:
            st.rejected_denied += 1
            raise ApiError("AccessDeniedException", 403,
                           f"User: arn:aws:iam::{self.account_id}:user/tester is not authorized to perform: "
                           f"s3vectors:PutVectors on resource: {index.arn} because no identity-based policy allows "
                           "the s3vectors:PutVectors action")
        capacity = o["put_capacity_vectors"]
        if capacity and len(staged) > capacity:
            st.rejected_capacity_503 += 1
            raise ApiError("ServiceUnavailableException", 503,
                           "Please reduce the number of vectors in the request: too many vectors for the resource "
                           "capacity")
        quota, hold = o["vector_quota"], o["hold_beyond_vectors"]
        if quota is not None or hold is not None:
            new = sum(1 for key, _ in staged if key not in index.vectors)
            if quota is not None and len(index.vectors) + new > quota:
                st.rejected_quota_402 += 1
                raise ApiError("ServiceQuotaExceededException", 402,
                               f"The request would exceed the service quota of {quota} vectors")
            if hold is not None and len(index.vectors) + new > hold:
                st.rejected_held_429 += 1
                raise ApiError("TooManyRequestsException", 429, "Held: the index takes no more vectors for now")

    def put_vectors(self, body: dict, size: int) -> dict:
        index = self._index_snapshot(body)
        try:
            vectors = body.get("vectors")
            max_n = self.options["max_vectors_per_put"]
            if type(vectors) is not list or not 1 <= len(vectors) <= max_n:
                n = len(vectors) if type(vectors) is list else "no"
                raise _validation(f"PutVectors takes between 1 and {max_n} vectors, got {n}")
            max_len = self.options["max_key_length"]
            reject_dupes = self.options["reject_duplicate_keys"]
            seen: set[str] = set()
            staged: list[tuple[str, tuple[array | None, float, dict | None]]] = []
            keep_data = self.options["store_data"]
            refused = self.options["refuse_keys"]
            refused = frozenset(refused) if refused else None
            unnamed = self.options["refused_keys_unnamed"]
            for i, v in enumerate(vectors):
                what = f"vectors[{i}]"
                if type(v) is not dict:
                    raise _validation(f"{what} must be an object")
                key = v.get("key")
                if type(key) is not str or not 1 <= len(key) <= max_len:
                    raise _validation(f"{what}: key must be a string of 1 to {max_len} characters")
                if key in seen and reject_dupes:
                    raise _validation(f"{what}: duplicate key {key!r} in one request")
                seen.add(key)
                arr, norm = self._check_vector_data(v.get("data"), index, what)
                meta = v.get("metadata")
                if meta is not None:
                    self._check_metadata(meta, index, what, key)
                if refused is not None and key in refused:
                    raise _validation(_invalid_record(None if unnamed else key,
                                                      self.options["max_filterable_metadata_bytes"]))
                staged.append((key, (arr if keep_data else None, norm, meta)))
        except ApiError:
            self._count_rejection(index)
            raise
        with self.lock:
            current = self._index(index.bucket, index.name)
            if current is not index:
                raise _not_found(f"Vector index {index.name} was deleted while the request was processed")
            st = self._stats(index)
            self._put_vectors_refusal(index, staged, st)
            self._admit_write(index, len(staged), st, fault_check=True)
            store = index.vectors
            before = len(store)
            store.update(staged)
            if len(store) != before:
                index.version += 1
            st.put_requests_accepted += 1
            st.put_vectors_accepted += len(staged)
            st.bytes_accepted += size
            st.largest_request_vectors = max(st.largest_request_vectors, len(staged))
            st.largest_request_bytes = max(st.largest_request_bytes, size)
        return {}

    def delete_vectors(self, body: dict, _size: int) -> dict:
        index = self._index_snapshot(body)
        try:
            keys = self._check_keys(body.get("keys"), "keys", self.options["max_keys_per_delete"])
        except ApiError:
            self._count_rejection(index)
            raise
        with self.lock:
            current = self._index(index.bucket, index.name)
            if current is not index:
                raise _not_found(f"Vector index {index.name} was deleted while the request was processed")
            st = self._stats(index)
            self._admit_write(index, len(keys), st, fault_check=False)
            store = index.vectors
            before = len(store)
            for k in keys:
                store.pop(k, None)
            if len(store) != before:
                index.version += 1
            st.delete_requests_accepted += 1
            st.delete_keys_accepted += len(keys)
        return {}

    @staticmethod
    def _render(key: str, entry: tuple, return_data: bool, return_metadata: bool) -> dict:
        out: dict = {"key": key}
        if return_data and entry[0] is not None:
            out["data"] = {"float32": entry[0].tolist()}
        if return_metadata:
            out["metadata"] = entry[2] if entry[2] is not None else {}
        return out

    def get_vectors(self, body: dict, _size: int) -> dict:
        index = self._index_snapshot(body)
        keys = self._check_keys(body.get("keys"), "keys", self.options["max_get_keys"])
        return_data, return_metadata = _opt_bool(body, "returnData"), _opt_bool(body, "returnMetadata")
        with self.lock:
            store = index.vectors
            found = [(k, store[k]) for k in dict.fromkeys(keys) if k in store]
        return {"vectors": [self._render(k, e, return_data, return_metadata) for k, e in found]}

    def list_vectors(self, body: dict, _size: int) -> dict:
        index = self._index_snapshot(body)
        o = self.options
        max_results = _opt_int(body, "maxResults", 1, o["max_list_results"], o["default_list_results"])
        seg_count = _opt_int(body, "segmentCount", 1, o["max_segment_count"], None)
        seg_index = _opt_int(body, "segmentIndex", 0, o["max_segment_count"] - 1, None)
        if (seg_count is None) != (seg_index is None):
            raise _validation("segmentCount and segmentIndex must be given together")
        if seg_count is None:
            seg_count, seg_index = 1, 0
        elif seg_index >= seg_count:
            raise _validation(f"segmentIndex must be less than segmentCount ({seg_count})")
        after = None
        if body.get("nextToken") is not None:
            tok = _decode_token(body["nextToken"])
            if type(tok) is not list or len(tok) != 3 or type(tok[0]) is not str:
                raise _validation("invalid nextToken")
            if tok[1:] != [seg_count, seg_index]:
                raise _validation("nextToken belongs to a different segmentCount/segmentIndex")
            after = tok[0]
        return_data, return_metadata = _opt_bool(body, "returnData"), _opt_bool(body, "returnMetadata")
        budget = o["max_list_response_bytes"] or math.inf
        with self.lock:
            keys = index.sorted_keys(seg_count, seg_index)
            start = bisect.bisect_right(keys, after) if after is not None else 0
            store = index.vectors
            page: list[tuple[str, tuple]] = []
            used = 0
            pos = start
            while pos < len(keys) and len(page) < max_results:
                k = keys[pos]
                entry = store[k]
                cost = self._list_cost(k, entry, index.dimension, return_data, return_metadata)
                if page and used + cost > budget:
                    break
                used += cost
                page.append((k, entry))
                pos += 1
            more = pos < len(keys)
        out: dict = {"vectors": [self._render(k, e, return_data, return_metadata) for k, e in page]}
        if more and page:
            out["nextToken"] = _encode_token([page[-1][0], seg_count, seg_index])
        return out

    def _list_cost(self, key: str, entry: tuple, dimension: int, return_data: bool, return_metadata: bool) -> int:
        """The bytes a vector adds to a ListVectors page (a page stops after max_list_response_bytes): its key,
        plus its data and metadata when returned — or always, with list_bytes_count_stored_data (unverified)."""
        stored = self.options["list_bytes_count_stored_data"]
        cost = len(key)
        if return_data or stored:
            cost += 4 * dimension
        if (return_metadata or stored) and entry[2]:
            cost += len(orjson.dumps(entry[2]))
        return cost

    def query_vectors(self, body: dict, _size: int) -> dict:
        index = self._index_snapshot(body)
        top_k = _opt_int(body, "topK", 1, self.options["max_top_k"], None)
        if top_k is None:
            raise _validation("topK is required")
        if body.get("queryTexts") is not None:
            raise _validation("queryTexts (full-text search) needs an ENHANCED index; not supported by this stand-in")
        if body.get("queryVector") is None:
            raise _validation("queryVector is required")
        q, qnorm = self._check_vector_data(body["queryVector"], index, "queryVector")
        predicate = None
        if body.get("filter") is not None:
            predicate = compile_filter(body["filter"], index.non_filterable)
        return_metadata, return_distance = _opt_bool(body, "returnMetadata"), _opt_bool(body, "returnDistance")
        if not self.options["store_data"]:
            raise _validation("this stand-in runs with store_data=False and cannot answer QueryVectors")
        with self.lock:
            items = list(index.vectors.items())
        qn2 = qnorm * qnorm
        cosine = index.metric == "cosine"
        dist = math.dist
        scored = []
        for key, (arr, vnorm, meta) in items:
            if arr is None:
                continue
            if predicate is not None and not predicate(meta or {}):
                continue
            d = dist(q, arr)  # C-level L2 distance
            if cosine:
                # q.v = (|q|^2 + |v|^2 - |q - v|^2) / 2 -- avoids a per-float Python dot product
                cos = (qn2 + vnorm * vnorm - d * d) / (2.0 * qnorm * vnorm)
                d = min(2.0, max(0.0, 1.0 - cos))
            scored.append((d, key, meta))
        best = heapq.nsmallest(top_k, scored, key=lambda t: (t[0], t[1]))
        best, next_token = self._query_page(body, best)
        out_vectors = []
        for d, key, meta in best:
            item: dict = {"key": key}
            if return_distance:
                item["distance"] = d
            if return_metadata:
                item["metadata"] = meta if meta is not None else {}
            out_vectors.append(item)
        out: dict = {"vectors": out_vectors, "distanceMetric": index.metric}
        if next_token is not None:
            out["nextToken"] = next_token
        return out

    def _query_page(self, body: dict, ranked: list) -> tuple[list, str | None]:
        """The page of the ranked results a QueryVectors request asks for, and the token of the next page.

        A token holds the offset of the next page and a fingerprint of the query; the user guide says to repeat the
        same queryVector, topK, filter and queryMode with it, so a token sent with another query is refused. The
        ranking is computed afresh for each page (writes between pages may show; the service's snapshot semantics
        and token lifetime ("several minutes") are not modelled).
        """
        size = self.options["query_page_size"] or len(ranked) or 1
        query = {name: body.get(name) for name in ("vectorBucketName", "indexName", "indexArn", "topK", "queryVector",
                                                   "filter", "queryMode")}
        fingerprint = zlib.crc32(orjson.dumps(query, option=orjson.OPT_SORT_KEYS))
        start = 0
        if body.get("nextToken") is not None:
            token = _decode_token(body["nextToken"])
            if type(token) is not list or len(token) != 3 or token[0] != "query" or type(token[1]) is not int:
                raise _validation("invalid nextToken")
            if token[2] != fingerprint:
                raise _validation("nextToken belongs to another query: repeat the same queryVector, topK and filter")
            start = token[1]
        end = start + size
        return ranked[start:end], (_encode_token(["query", end, fingerprint]) if end < len(ranked) else None)


def _stored_list(values: list, what: str) -> tuple[array, float]:
    """The float32 values the index stores of a list orjson read, and their norm (inf for NaN, Infinity or a value
    beyond float32)."""
    try:
        # one C-level pass over the floats orjson already made: inf/nan if any value is non-finite
        norm = math.hypot(*values)
        arr = array("f", values)
    except (TypeError, OverflowError):
        raise _validation(f"{what}: vector values must be numbers") from None
    if not _FLT_TINY <= norm <= _FLT_MAX:
        # rare: a value may overflow float32 (-> inf) or underflow to 0; judge the stored float32 values
        norm = math.hypot(*arr)
    return arr, norm


def _stored_float64(values: np.ndarray) -> tuple[array, float]:
    """_stored_list for the float64 values _read_put_vectors read."""
    with np.errstate(over="ignore", under="ignore"):
        stored = values.astype(np.float32)  # C's cast, as array("f") makes it
        norm = math.sqrt(values @ values)
        if not _FLT_TINY <= norm <= _FLT_MAX:
            wide = stored.astype(np.float64)
            norm = math.sqrt(wide @ wide)
    return array("f", stored.tobytes()), norm


_simd = threading.local()  # a simdjson parser per serving thread


def _read_put_vectors(body: bytes) -> dict | None:
    """A PutVectors body as orjson reads it, except that each vector's `float32` list is a float64 numpy array read
    by simdjson: orjson would make a Python float of each of a full request's 1.5 million numbers, most of this
    stand-in's CPU, on the cores the loader under test shares. None for any other shape (an array nested anywhere,
    a list in metadata, a key twice in one object, what simdjson refuses): orjson then reads the body, and every
    refusal is decided there or by the same checks."""
    parser = getattr(_simd, "parser", None)
    if parser is None:
        parser = _simd.parser = simdjson.Parser()
    doc = vectors = item = data = values = None
    try:
        try:
            doc = parser.parse(body)
        except (ValueError, RuntimeError):  # not JSON; an integer beyond 64 bits, which orjson reads as a float
            return None
        vectors = doc.get("vectors") if type(doc) is simdjson.Object else None
        if type(vectors) is not simdjson.Array or _brackets(body, 1 + len(vectors)) != 1 + len(vectors):
            return None  # every "[" opens either the list or one vector's values: nothing nested, no lists else
        out = {key: _plain(doc[key]) for key in doc.keys() if key != "vectors"}
        read = []
        for item in vectors:
            if type(item) is not simdjson.Object:
                return None
            vector = {key: _plain(item[key]) for key in item.keys() if key != "data"}
            data = item.get("data")
            if data is not None:
                values = data.get("float32") if type(data) is simdjson.Object and len(data) == 1 else None
                if type(values) is not simdjson.Array:
                    return None
                try:
                    vector["data"] = {"float32": np.frombuffer(values.as_buffer(of_type="d"), dtype=np.float64)}
                except (TypeError, ValueError):  # an element that is not a number
                    return None
            if len(vector) != len(item):
                return None
            read.append(vector)
        if len(out) + 1 != len(doc):
            return None
        out["vectors"] = read
        return out
    finally:
        doc = vectors = item = data = values = None  # the parser reads again only once no proxy of this body lives


def _brackets(body: bytes, limit: int) -> int:
    """How many `[` the body holds, counted up to limit + 1 with find (memchr: bytes.count of one byte is about
    eight times slower over a 19 MB body)."""
    n, at = 0, body.find(b"[")
    while at >= 0 and n <= limit:
        n += 1
        at = body.find(b"[", at + 1)
    return n


def _plain(value: Any) -> Any:
    """A value of a body _read_put_vectors takes: no list is left in it but the vectors' values (the `[` count)."""
    return value.as_dict() if type(value) is simdjson.Object else value


def _invalid_record(key: str | None, limit: int) -> str:
    """The message of a request refused for one vector's filterable metadata; `key` None: one naming no key."""
    if key is None:
        return f"Invalid record: Filterable metadata must have at most {limit} bytes"
    return f"Invalid record for key '{key}': Filterable metadata must have at most {limit} bytes"


def _check_bucket_name(name: Any) -> None:
    if type(name) is not str or not _BUCKET_NAME.match(name):
        raise _validation(f"Invalid vector bucket name {name!r}: 3-63 characters, lowercase letters, digits and "
                          f"hyphens, starting and ending with a letter or digit")


def _check_index_name(name: Any) -> None:
    if type(name) is not str or not _INDEX_NAME.match(name):
        raise _validation(f"Invalid vector index name {name!r}: 3-63 characters, lowercase letters, digits, "
                          f"hyphens and dots, starting and ending with a letter or digit")


def make_app(*, region: str = "us-east-1", account_id: str = "123456789012",
             options: dict | None = None) -> S3VectorsStandin:
    """The WSGI app. `options` overrides DEFAULT_OPTIONS (unknown names raise ValueError)."""
    return S3VectorsStandin(region=region, account_id=account_id, options=options)


def main(argv: list[str] | None = None) -> None:
    from . import serve

    p = argparse.ArgumentParser(description="Amazon S3 Vectors stand-in (prints its URL, serves until killed)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = any free port")
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--account-id", default="123456789012")
    p.add_argument("--vectors-per-second", type=float, default=DEFAULT_OPTIONS["vectors_per_second"],
                   help="per-index write quota in vectors/s; 0 disables")
    p.add_argument("--requests-per-second", type=float, default=DEFAULT_OPTIONS["requests_per_second"],
                   help="per-index write quota in Put/Delete requests/s; 0 disables")
    p.add_argument("--fault-rate", type=float, default=0.0, help="share of PutVectors answered 429/503 (0..1)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_OPTIONS["max_request_bytes"])
    p.add_argument("--option", action="append", default=[], metavar="NAME=JSON",
                   help="any other option, e.g. --option store_data=false")
    args = p.parse_args(argv)
    options = {
        "vectors_per_second": args.vectors_per_second,
        "requests_per_second": args.requests_per_second,
        "fault_rate": args.fault_rate,
        "seed": args.seed,
        "max_request_bytes": args.max_request_bytes,
    }
    for item in args.option:
        name, _, value = item.partition("=")
        options[name] = orjson.loads(value)
    app = make_app(region=args.region, account_id=args.account_id, options=options)
    served = serve(app, host=args.host, port=args.port)
    print(served.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        served.stop()
        sys.exit(0)


if __name__ == "__main__":
    main()
