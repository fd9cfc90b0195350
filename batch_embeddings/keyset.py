"""The set of vector keys already in the index, kept small: 01's incremental check at ten million images.

A key 01 writes is the first 32 hex digits of a SHA-256 (naming.vector_key), so it is held as 16 bytes in one
sorted numpy array (plus an 8-byte copy of each key's first half to search on): 24 bytes a key, where a Python
set of strings takes about 250. Keys of any other shape (vectors another tool put in the index) are kept as they
are in a small set and counted.
"""

from __future__ import annotations

import binascii
import hashlib
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import orjson


KEY_BYTES = 16
MAX_SEGMENTS = 16  # ListVectors' segmentCount limit
THREADS = 8  # a page costs ~4 ms of the GIL in botocore: more threads than ~8 wait for it, at any latency
PAGE = 1000  # ListVectors' maxResults limit
_HEX = frozenset("0123456789abcdef")
_HEX_RUN = re.compile("[0-9a-f]*")


def digest(source_uri: str) -> bytes:
    """The binary form of naming.vector_key(source_uri)."""
    return hashlib.sha256(source_uri.encode("utf-8")).digest()[:KEY_BYTES]


def _add(keys, packed: bytearray, foreign: set) -> None:
    """Pack each 32-hex-digit key as 16 bytes; keep any other key as it is in `foreign`."""
    for key in keys:
        binary = _binary(key)
        if binary is None:
            foreign.add(key)
        else:
            packed += binary


def _binary(key: str) -> bytes | None:
    return bytes.fromhex(key) if len(key) == 2 * KEY_BYTES and _HEX.issuperset(key) else None


class KeySet:
    """A frozen set of vector keys; `contains` answers for many binary keys at once."""

    def __init__(self, packed: bytes | bytearray = b"", foreign: set[str] | None = None):
        buffer = packed if isinstance(packed, bytearray) else bytearray(packed)  # sorted in place
        keys = np.frombuffer(buffer, dtype=f"V{KEY_BYTES}")
        keys.sort()
        twice = keys[1:] == keys[:-1]
        if twice.any():  # a key listed twice (a page read again) is kept once
            keys = keys[np.concatenate(([True], ~twice))]
        del twice
        self._keys = keys
        self._first = keys.view(">u8")[::2].astype(np.uint64)  # native copy of each key's first 8 bytes
        self.foreign = foreign or set()

    @classmethod
    def of(cls, keys) -> KeySet:
        """From vector keys as text (a small set: the keys of a retry, of jobs still running)."""
        packed, foreign = bytearray(), set()
        _add(keys, packed, foreign)
        return cls(packed, foreign)

    def __len__(self) -> int:
        return len(self._keys) + len(self.foreign)

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._first.nbytes

    def contains(self, digests: list[bytes]) -> np.ndarray:
        """For each 16-byte key, whether it is in the set (a boolean array)."""
        return self.positions(digests) >= 0

    @property
    def packed(self) -> np.ndarray:
        """The 32-hex-digit keys as sorted 16-byte values (`positions` index into it)."""
        return self._keys

    def positions(self, digests: list[bytes]) -> np.ndarray:
        """For each 16-byte key, its position in `packed`, or -1 when it is not in the set."""
        if not digests or not len(self._keys):
            return np.full(len(digests), -1, dtype=np.intp)
        return self.positions_of(np.frombuffer(b"".join(digests), dtype=f"V{KEY_BYTES}"))

    def positions_of(self, query: np.ndarray) -> np.ndarray:
        """`positions` of keys given as an array of 16-byte values."""
        if not len(query) or not len(self._keys):
            return np.full(len(query), -1, dtype=np.intp)
        query = np.ascontiguousarray(query)
        first = query.view(">u8")[::2].astype(np.uint64)
        order = np.argsort(first)  # searchsorted goes faster through sorted queries
        at = np.empty(len(first), dtype=np.intp)
        at[order] = np.searchsorted(self._first, first[order])
        found = np.full(len(query), -1, dtype=np.intp)
        n = len(self._keys)
        # Keys sharing their first 8 bytes are next to each other: look along the run (almost always length 1).
        pending = np.nonzero(at < n)[0]
        while len(pending):
            pos = at[pending]
            same_first = self._first[pos] == first[pending]
            pending, pos = pending[same_first], pos[same_first]
            hit = self._keys[pos] == query[pending]
            found[pending[hit]] = pos[hit]
            pending = pending[~hit]
            at[pending] += 1
            pending = pending[at[pending] < n]
        return found

    def __contains__(self, key: str) -> bool:
        binary = _binary(key)
        return key in self.foreign if binary is None else bool(self.contains([binary])[0])


_PAGE_KEY = re.compile(rb'\{"key":"([0-9a-f]{32})"\}')  # a key 01 writes, in a compact page
_PAGE_TOKEN = re.compile(rb'"nextToken":"([^"\\]*)"')


def _parse_keys(response_dict, customized_response_dict, **_):
    """Read a ListVectors page's keys and token and hand botocore an empty object to parse: botocore walks the model
    for every vector, 9 million times for an index of 9 million. Errors go through botocore.

    A compact page whose every key is 32 hex digits (what 01 writes) is read with two regular expressions into
    `packedKeys`, the keys as 16 bytes each; any other page is parsed with orjson into `vectors`."""
    body = response_dict.get("body")
    if response_dict.get("status_code") != 200 or not isinstance(body, bytes):
        return
    found = _PAGE_KEY.findall(body)
    token = _PAGE_TOKEN.findall(body)
    if body.startswith(b'{"vectors":[') and body.endswith(b"}") and len(found) == body.count(b'"key"') and \
            len(token) == body.count(b'"nextToken"') <= 1:
        customized_response_dict["packedKeys"] = binascii.unhexlify(b"".join(found))
        if token and token[0]:
            customized_response_dict["nextToken"] = token[0].decode()
        response_dict["body"] = b"{}"
        return
    try:
        page = orjson.loads(body)
        vectors = page.get("vectors", [])  # [{"key": ...}], as botocore would give them
        if not isinstance(vectors, list):
            raise TypeError
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        return  # botocore's own parser says what is wrong
    customized_response_dict["vectors"] = vectors
    if page.get("nextToken"):
        customized_response_dict["nextToken"] = page["nextToken"]
    response_dict["body"] = b"{}"


def page_keys(page: dict, packed: bytearray, foreign: set) -> str | None:
    """Add a ListVectors page's keys (as a lean client or botocore gives them) to `packed` and `foreign`; returns
    the token of the next page, None after the last."""
    if "packedKeys" in page:
        packed += page["packedKeys"]
    keys = [vector["key"] for vector in page.get("vectors", [])]
    joined = "".join(keys)
    if keys and min(map(len, keys)) == max(map(len, keys)) == 2 * KEY_BYTES and _HEX_RUN.fullmatch(joined):
        packed += bytes.fromhex(joined)  # the whole page at once: every key is 32 hex digits
    else:
        _add(keys, packed, foreign)
    return page.get("nextToken") or None


def fast_keys_client(s3v):
    """The S3 Vectors client, with its ListVectors pages read for keys and paging only."""
    s3v.meta.events.register_first("before-parse.s3vectors.ListVectors", _parse_keys, unique_id="keyset-parse-keys")
    return s3v


def index_keys(s3v, bucket: str, index: str, segments: int = MAX_SEGMENTS) -> KeySet:
    """Every key in the index, read with `segments` ListVectors streams (THREADS at a time), every page of each
    (`s3v` is best a `fast_keys_client`)."""

    def segment(i: int) -> tuple[bytearray, set[str]]:
        packed, foreign, token = bytearray(), set(), None
        while True:
            page = s3v.list_vectors(vectorBucketName=bucket, indexName=index, maxResults=PAGE,
                                    segmentCount=segments, segmentIndex=i, **({"nextToken": token} if token else {}))
            token = page_keys(page, packed, foreign)
            if token is None:
                return packed, foreign

    with ThreadPoolExecutor(min(segments, THREADS)) as pool:
        parts = list(pool.map(segment, range(segments)))
    packed, foreign = bytearray(), set()
    while parts:
        part, other = parts.pop()
        packed += part
        foreign |= other
        del part
    return KeySet(packed, foreign)
