"""The index as a mirror of the bucket: which listed images are new, changed or unchanged against what the index
holds, and which vectors belong to images that are no longer under SOURCE_PREFIX.

Every vector this tool writes records its image's ETag and size in its metadata (`etag`, `size`, beside
`source_uri`, `job_id`, `model_id`, `purpose` and the date `embedded`; see `provenance`). Reading that metadata for
every vector every day would cost a ListVectors pass with metadata over the whole index, so 01 keeps a compact
cache beside the job-info file (index_state.bin: each key's 16 bytes, a 4-byte digest of its ETag and size, and
whether its source_uri is under SOURCE_PREFIX of SOURCE_BUCKET), and every step that writes or deletes vectors
appends them to a journal (index_state.journal). 01 uses the cache (with the journal) only when it accounts for
exactly the keys the index lists that day; otherwise it reads the index again, with metadata, and says which it
did. A vector written before provenance existed has no ETag: it is taken as current (01 --reembed-without-etag
embeds such images again).

Deletions: after a complete listing, the vectors of this prefix whose image was not listed are candidates. More
than MAX_DELETE_FRACTION of the prefix's vectors or MAX_DELETE_COUNT of them is refused (exit 10) unless
--allow-mass-delete says so once. Each candidate is asked again (GetVectors) and deleted only when its source_uri
is under SOURCE_PREFIX of SOURCE_BUCKET, after the day's loads, in DeleteVectors requests of up to 500 keys paced
like the loads; each deleted vector is a line of runs/<stamp>/deleted.jsonl.
"""

from __future__ import annotations

import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import orjson

import common
from batch_embeddings import keyset
from common import StepError

CACHE_NAME = "index_state.bin"
JOURNAL_NAME = "index_state.journal"
TO_DELETE_NAME = "to_delete.keys"  # in the run's folder: the keys 03 deletes after its loads
DELETED_NAME = "deleted.jsonl"  # in the run's folder: one line a deleted vector
UNKNOWN = 0  # the state of a vector without an ETag (written before provenance), or of an object without one
GONE = 0xFFFFFFFF  # in the journal: the key was deleted
GET_BATCH = 100  # GetVectors keys a request
DELETE_BATCH = 500  # DeleteVectors keys a request
CHUNK = 1 << 16  # cache keys aligned with the index's at once (more costs memory, not time)
_MAGIC = b"bedrock-batch-embeddings index state 1\n"
_RECORD = np.dtype([("key", f"V{keyset.KEY_BYTES}"), ("state", "<u4")])
_STATE_BYTES = 4  # a 32-bit digest: two states of one image collide once in 4 billion changes


def state_of(etag: str | None, size: int | None) -> int:
    """A 32-bit digest of an object's ETag and size (CRC-32, never UNKNOWN or GONE); UNKNOWN without an ETag."""
    if not etag or size is None:
        return UNKNOWN
    value = zlib.crc32(b"%s\0%d" % (etag.strip('"').encode(), int(size)))
    return min(max(value, 1), GONE - 1)


def provenance(etag: str | None, size: int | None, model_id: str, purpose: str, embedded: str) -> dict:
    """The metadata a vector carries besides source_uri and job_id: what it was embedded from, with what, when."""
    found = {"etag": etag.strip('"'), "size": int(size)} if etag and size is not None else {}
    return {**found, "model_id": model_id, "purpose": purpose, "embedded": embedded}


class Provenance:
    """What the vectors of a job (or of an on-demand part) record besides source_uri and job_id, from the sources
    01 listed (manifests.read_sources: vector key -> (ETag, size, changed)); and the journal entry of what the index
    confirmed (`written`), when `folder` holds the cache."""

    def __init__(self, sources: dict, model_id: str, purpose: str, embedded: str, folder: Path | None):
        self.sources, self.folder = sources, folder
        self.model_id, self.purpose, self.embedded = model_id, purpose, embedded

    def metadata(self, key: str) -> dict:
        etag, size, _ = self.sources.get(key, (None, None, False))
        return provenance(etag, size, self.model_id, self.purpose, self.embedded)

    def suffix(self, key: str) -> bytes:
        """metadata(key) as the members to append to a vector's JSON metadata object."""
        return b"," + orjson.dumps(self.metadata(key))[1:-1]

    def written(self, keys: list[str]) -> None:
        if self.folder is not None and keys:
            journal(self.folder, keys, [state_of(*self.sources.get(key, (None, None, False))[:2]) for key in keys])


def folder_of(job_info_file: Path) -> Path:
    """Where the cache and its journal live: beside the job-info file."""
    return Path(job_info_file).resolve().parent


def source_uri_prefix(config: common.Config) -> str:
    return common.s3_uri(config.source_bucket, config.source_prefix)


@dataclass
class IndexState:
    """What the index holds, aligned with `keys.packed`: each vector's state and whether it is this prefix's."""

    keys: keyset.KeySet
    states: np.ndarray  # uint32
    ours: np.ndarray  # bool

    @classmethod
    def empty(cls, keys: keyset.KeySet) -> IndexState:
        return cls(keys, np.zeros(len(keys.packed), dtype=np.uint32), np.zeros(len(keys.packed), dtype=bool))


# ---------------------------------------------------------------------------------------------- the local cache


def _identity(config: common.Config) -> dict:
    return {"vector_bucket": config.vector_bucket, "vector_index": config.vector_index,
            "source": source_uri_prefix(config)}


def save(folder: Path, config: common.Config, state: IndexState) -> None:
    """The cache, written whole (atomically); the journal it now holds is removed."""
    packed = state.keys.packed
    header = orjson.dumps({**_identity(config), "count": len(packed)}) + b"\n"

    def write(fh) -> None:  # the arrays as they are in memory, without a copy
        fh.write(_MAGIC + header)
        fh.write(np.ascontiguousarray(packed).data)
        fh.write(np.ascontiguousarray(state.states, dtype="<u4").data)
        fh.write(np.ascontiguousarray(state.ours).view(np.uint8).data)

    common.atomic_write(Path(folder) / CACHE_NAME, write)
    (Path(folder) / JOURNAL_NAME).unlink(missing_ok=True)


def journal(folder: Path, keys: list[str], states: list[int]) -> None:
    """Append what a step wrote (a state) or deleted (GONE) to the journal, on disk before the step goes on."""
    records = np.zeros(len(keys), dtype=_RECORD)
    records["key"] = np.frombuffer(bytes.fromhex("".join(keys)), dtype=f"V{keyset.KEY_BYTES}")
    records["state"] = np.asarray(states, dtype=np.uint32)
    with open(Path(folder) / JOURNAL_NAME, "ab") as fh:
        fh.write(records.tobytes())
        fh.flush()
        os.fsync(fh.fileno())


def _journal(folder: Path) -> np.ndarray:
    """The journal's records, the last of each key only."""
    try:
        data = (Path(folder) / JOURNAL_NAME).read_bytes()
    except FileNotFoundError:
        return np.zeros(0, dtype=_RECORD)
    records = np.frombuffer(data[: len(data) - len(data) % _RECORD.itemsize], dtype=_RECORD)[::-1]
    _, first = np.unique(records["key"], return_index=True)
    return records[np.sort(first)]


def _from_cache(folder: Path, config: common.Config, keys: keyset.KeySet) -> tuple[IndexState | None, str]:
    """The cache and its journal, aligned with the index's keys; None (and why) when they do not account for
    exactly those keys."""
    path = Path(folder) / CACHE_NAME
    try:
        with open(path, "rb") as fh:
            if fh.read(len(_MAGIC)) != _MAGIC:
                return None, f"{path} is not a cache of this tool"
            header = orjson.loads(fh.readline())
            offset = fh.tell()
    except FileNotFoundError:
        return None, "no local cache yet"
    except (OSError, orjson.JSONDecodeError) as exc:
        return None, f"{path} cannot be read ({exc})"
    if {k: header.get(k) for k in ("vector_bucket", "vector_index", "source")} != _identity(config):
        return None, f"{path} is of another index or source prefix"
    n = header.get("count")
    width = keyset.KEY_BYTES + _STATE_BYTES + 1
    if not isinstance(n, int) or n < 0 or path.stat().st_size != offset + width * n:
        return None, f"{path} is damaged"
    state = IndexState.empty(keys)
    covered = np.zeros(len(keys.packed), dtype=bool)
    absent = []
    with open(path, "rb") as fh:  # a chunk at a time: the whole file in memory beside the index's keys costs 21 B a key
        for start in range(0, n, CHUNK):
            count = min(CHUNK, n - start)
            fh.seek(offset + keyset.KEY_BYTES * start)
            chunk = np.fromfile(fh, dtype=f"V{keyset.KEY_BYTES}", count=count)
            fh.seek(offset + keyset.KEY_BYTES * n + _STATE_BYTES * start)
            states = np.fromfile(fh, dtype="<u4", count=count)
            fh.seek(offset + (keyset.KEY_BYTES + _STATE_BYTES) * n + start)
            ours = np.fromfile(fh, dtype=np.uint8, count=count).view(bool)
            at = keys.positions_of(chunk)
            hit = at >= 0
            state.states[at[hit]] = states[hit]
            state.ours[at[hit]] = ours[hit]
            covered[at[hit]] = True
            if not hit.all():
                absent.append(chunk[~hit])
    records = _journal(folder)
    deleted = records[records["state"] == GONE]
    written = records[records["state"] != GONE]
    at = keys.positions_of(written["key"])
    if (at < 0).any():
        return None, "the index no longer holds vectors the journal says were written"
    state.states[at] = written["state"]
    state.ours[at] = True
    covered[at] = True
    if not covered.all():
        return None, f"the index holds {int((~covered).sum())} vector(s) the cache does not know"
    gone = keyset.KeySet(deleted["key"].tobytes())
    if absent and (gone.positions_of(np.concatenate(absent)) < 0).any():
        return None, "vectors the cache knows are no longer in the index"
    return state, f"from the local cache {path.name}"


# ---------------------------------------------------------------------------------------------- reading the index


def _parse(vectors: list[dict], prefix: str) -> tuple[bytearray, list[int], bytearray]:
    packed, states, ours = bytearray(), [], bytearray()
    for vector in vectors:
        key = vector.get("key", "")
        binary = keyset._binary(key)
        if binary is None:
            continue  # another tool's key: never this prefix's
        meta = vector.get("metadata") or {}
        uri = meta.get("source_uri")
        packed += binary
        states.append(state_of(meta.get("etag"), meta.get("size")) if isinstance(meta.get("size"), int) else UNKNOWN)
        ours.append(isinstance(uri, str) and uri.startswith(prefix) and keyset.digest(uri) == binary)
    return packed, states, ours


def from_index(s3v, config: common.Config, keys: keyset.KeySet) -> IndexState:
    """Every vector's metadata read from the index (ListVectors with metadata, in segments), aligned with `keys`.
    A key listed since `keys` were read is left out; one not found again stays unknown and not this prefix's (it
    is neither re-embedded for a change nor deleted)."""
    state, prefix, lock = IndexState.empty(keys), source_uri_prefix(config), threading.Lock()
    segments = keyset.MAX_SEGMENTS

    def segment(i: int) -> None:
        token = None
        while True:
            page = s3v.list_vectors(vectorBucketName=config.vector_bucket, indexName=config.vector_index,
                                    maxResults=keyset.PAGE, segmentCount=segments, segmentIndex=i,
                                    returnMetadata=True, **({"nextToken": token} if token else {}))
            packed, states, ours = _parse(page.get("vectors", []), prefix)
            at = keys.positions_of(np.frombuffer(bytes(packed), dtype=f"V{keyset.KEY_BYTES}"))
            hit = at >= 0
            with lock:
                state.states[at[hit]] = np.asarray(states, dtype=np.uint32)[hit]
                state.ours[at[hit]] = np.asarray(ours, dtype=bool)[hit]
            token = page.get("nextToken")
            if not token:
                return

    with ThreadPoolExecutor(min(segments, keyset.THREADS)) as pool:
        for done in as_completed([pool.submit(segment, i) for i in range(segments)]):
            done.result()
    return state


def read(s3v, config: common.Config, keys: keyset.KeySet, folder: Path) -> IndexState:
    """What the index holds for 01's comparison: the cache when it accounts for the index's keys, else the index
    read again (and the cache written anew). Says which."""
    if not len(keys.packed):  # an empty index, or none yet: nothing to compare with
        return IndexState.empty(keys)
    state, why = _from_cache(folder, config, keys)
    if state is not None:
        print(f"  ETags and sizes of the indexed images: {why}")
        if not (Path(folder) / JOURNAL_NAME).exists():
            return state  # the cache as it is on disk
    else:
        print(f"  ETags and sizes of the indexed images: read from the index ({why})")
        state = from_index(s3v, config, keys)
    save(folder, config, state)
    return state


# ---------------------------------------------------------------------------------------------- deletions


def no_keys() -> np.ndarray:
    return np.zeros(0, dtype=f"V{keyset.KEY_BYTES}")


def deletions(state: IndexState, seen: np.ndarray) -> np.ndarray:
    """The keys (16-byte values) of this prefix's vectors whose image the complete listing did not find."""
    return state.keys.packed[state.ours & ~seen]


def guard(candidates: int, of: int, config: common.Config, allowed: bool) -> str | None:
    """Why deleting `candidates` of the prefix's `of` vectors is refused (over MAX_DELETE_FRACTION or
    MAX_DELETE_COUNT without --allow-mass-delete), or None."""
    share = candidates / of if of else 0.0
    over = []
    if candidates > config.max_delete_count:
        over.append(f"MAX_DELETE_COUNT={config.max_delete_count}")
    if share > config.max_delete_fraction:
        over.append(f"MAX_DELETE_FRACTION={config.max_delete_fraction:g}")
    if not over or allowed:
        return None
    return (f"{candidates} of the {of} vectors of images under {source_uri_prefix(config)} would be deleted "
            f"({share:.0%}; over {' and '.join(over)}): nothing deleted, nothing submitted — if the images are "
            "gone for good, run 01 (or daily_run.py) with --allow-mass-delete once; to never delete, set "
            "MIRROR_DELETES=false")


def save_candidates(path: Path, keys: np.ndarray) -> None:
    common.atomic_write(path, lambda fh: fh.write(keys.tobytes()))


def load_candidates(path: Path) -> list[str]:
    data = Path(path).read_bytes()
    return [data[i:i + keyset.KEY_BYTES].hex() for i in range(0, len(data), keyset.KEY_BYTES)]


def delete(s3v, config: common.Config, keys: list[str], limiter, folder: Path, out: Path) -> int:
    """Delete the vectors of `keys` whose source_uri (asked again now) is under SOURCE_PREFIX of SOURCE_BUCKET, in
    DeleteVectors requests of up to DELETE_BATCH keys paced by `limiter`; each deleted vector is a line of `out`
    and a GONE record of the journal in `folder`. Returns how many were deleted. Safe to run again: a key already
    deleted is no longer found."""
    prefix, today, deleted = source_uri_prefix(config), date.today().isoformat(), 0
    pending: list[dict] = []

    def flush() -> None:
        nonlocal deleted
        if not pending:
            return
        limiter.acquire(len(pending))
        s3v.delete_vectors(vectorBucketName=config.vector_bucket, indexName=config.vector_index,
                           keys=[entry["key"] for entry in pending])
        with open(out, "ab") as fh:
            fh.write(b"".join(orjson.dumps(entry) + b"\n" for entry in pending))
        journal(folder, [entry["key"] for entry in pending], [GONE] * len(pending))
        deleted += len(pending)
        pending.clear()

    for start in range(0, len(keys), GET_BATCH):
        found = s3v.get_vectors(vectorBucketName=config.vector_bucket, indexName=config.vector_index,
                                keys=keys[start:start + GET_BATCH], returnMetadata=True)["vectors"]
        for vector in found:
            meta = vector.get("metadata") or {}
            uri = meta.get("source_uri")
            if isinstance(uri, str) and uri.startswith(prefix) and keyset.digest(uri).hex() == vector["key"]:
                pending.append({"key": vector["key"], "source_uri": uri, "etag": meta.get("etag"),
                                "embedded": meta.get("embedded"), "deleted": today})
            if len(pending) >= DELETE_BATCH:
                flush()
    flush()
    return deleted


def count_deleted(out: Path) -> int:
    """The vectors a run's deleted.jsonl lists."""
    try:
        with open(out, "rb") as fh:
            return sum(1 for _ in fh)
    except FileNotFoundError:
        return 0


def refuse(message: str) -> None:
    raise StepError(message, common.EXIT_MASS_DELETE)
