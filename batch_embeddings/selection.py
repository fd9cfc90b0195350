"""Choosing a run's images: what a listing or an S3 Inventory report holds under the prefix, kept in a sorted file,
less what is not an image the model takes, what the index already holds and what Bedrock rejected for good."""

from __future__ import annotations

import bisect
import itertools
import os
from collections import defaultdict
from concurrent.futures.process import BrokenProcessPool
from hashlib import sha256
from pathlib import Path

import numpy as np
import orjson

import common
from batch_embeddings import failed_permanently, forking, inventory, jobs, keyset, lease, mirror, naming, nova
from batch_embeddings import listing as listing_module
from common import StepError

EXAMPLES_PER_REASON = 5
LOOKUP_CHUNK = 4096  # images checked against the index's keys at once


def classify(key: str, size: int) -> tuple[str | None, str | None]:
    """(image format, None) for an image the model takes, else (None, reason it is skipped)."""
    if key.endswith("/"):
        return None, "folder marker"
    slash, dot = key.rfind("/"), key.rfind(".")
    fmt = nova.IMAGE_FORMATS.get(key[dot:].lower()) if slash + 1 < dot < len(key) - 1 else None  # Path.suffix
    if fmt is None:
        return None, "not an image"
    if size == 0:
        return None, "empty"
    if size > nova.MAX_IMAGE_BYTES:
        return None, "over the model's 50 MB"
    return fmt, None


class Listing:
    """Pass 1: what is under the prefix, with the images kept in a sorted temporary file (memory stays flat)."""

    def __init__(self, workdir: Path, indexed: int = 0):
        self.path = workdir / "images.jsonl"
        self.seen = np.zeros(indexed, dtype=bool)  # the index's keys (mirror.IndexState) whose image was listed
        self.changed = 0  # images in the index whose object changed since (their ETag or size)
        self.counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # folder -> [images, manifest bytes]
        self.skipped: dict[str, int] = defaultdict(int)  # reason -> objects skipped for it
        self.examples: dict[str, list[str]] = defaultdict(list)  # reason -> the first few keys
        self.own_manifests: list[str] = []
        self.foreign: list[str] = []
        self.left_out: dict[str, int] = defaultdict(int)
        self.images = 0

    def images_in_order(self):
        """(key, image format) of every image, sorted: the same order whatever order the listing came in."""
        for key, fmt, *_ in self.images_with_sources():
            yield key, fmt

    def images_with_sources(self):
        """(key, image format, ETag or None, size, changed) of every image, in the order of images_in_order."""
        with open(self.path, "rb") as fh:
            for line in fh:
                yield orjson.loads(line)

    def summary(self) -> dict:
        """What another process hands back of its listing (its sorted file stays where it is)."""
        return {"path": self.path, "counts": dict(self.counts), "skipped": dict(self.skipped),
                "examples": dict(self.examples), "own_manifests": self.own_manifests, "foreign": self.foreign,
                "left_out": dict(self.left_out), "images": self.images, "changed": self.changed,
                "seen": (np.packbits(self.seen).tobytes(), len(self.seen))}

    @classmethod
    def merged(cls, parts: list[dict], workdir: Path, indexed: int = 0) -> "Listing":
        """One listing of several (`summary()`s of listings of parts of the input), its file merged in order."""
        listing = cls(workdir, indexed)
        for part in parts:
            bits, n = part["seen"]
            listing.seen |= np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=n).astype(bool)
            listing.changed += part["changed"]
            for folder, (images, size) in part["counts"].items():
                listing.counts[folder][0] += images
                listing.counts[folder][1] += size
            for reason, n in part["skipped"].items():
                listing.skipped[reason] += n
            for reason, keys in part["examples"].items():
                listing.examples[reason] = sorted(listing.examples[reason] + keys)[:EXAMPLES_PER_REASON]
            for why, n in part["left_out"].items():
                listing.left_out[why] += n
            listing.own_manifests += part["own_manifests"]
            listing.foreign += part["foreign"]
            listing.images += part["images"]
        listing_module.merge_runs([part["path"] for part in parts], listing.path)
        return listing


def list_images(objects, config: common.Config, exclude: list[tuple[keyset.KeySet, str]], workdir: Path,
                rejected: dict[str, dict] | None = None, state: mirror.IndexState | None = None,
                reembed_unknown: bool = False, everything: bool = False) -> Listing:
    """Sort the objects, (key, size, ETag) triples in any order; images whose vector key is in one of the `exclude`
    sets are left out, counted by the reason paired with the set, and so are images that failed permanently
    (`rejected`) while their object is unchanged.

    With the index's `state`, an image whose vector is there is left out while its ETag and size are those the
    vector records (or the vector records none and not `reembed_unknown`), and counted as changed otherwise (with
    `everything`, none is left out); every indexed key whose image is listed is marked in `seen` (what is not
    marked is gone from the prefix)."""
    listing = Listing(workdir, len(state.keys.packed) if state is not None else 0)

    def skip(key: str, size: int) -> str | None:
        """The image format of an object that is not the common case, after counting it if it is skipped."""
        if lease.is_lease(key):
            return None  # the lease on the prefix: not an object of the run
        if key[-6:].lower() == ".jsonl":
            (listing.own_manifests if naming.is_own_manifest(key) else listing.foreign).append(key)
            return None
        fmt, reason = classify(key, size)
        if fmt is None:
            listing.skipped[reason] += 1
            examples = listing.examples[reason]  # the first few in key order, whatever order they come in
            if len(examples) < EXAMPLES_PER_REASON or key < examples[-1]:
                bisect.insort(examples, key)
                del examples[EXAMPLES_PER_REASON:]
        return fmt

    formats, max_bytes = nova.IMAGE_FORMATS, nova.MAX_IMAGE_BYTES
    uri = common.s3_uri(config.source_bucket)

    def images():
        for chunk in iter(lambda: list(itertools.islice(objects, LOOKUP_CHUNK)), []):
            # The common case a chunk at a time (classify's rules inlined): a name, an image format's suffix and a
            # size the model takes. Everything else goes through skip() one object at a time.
            fmts = [formats.get(key[dot:].lower()) if 0 < size <= max_bytes and
                    (dot := key.rfind(".")) > key.rfind("/") + 1 else None for key, size, _ in chunk]
            candidates = [(key, fmt, size, etag) for (key, size, etag), fmt in zip(chunk, fmts) if fmt is not None]
            if len(candidates) < len(chunk):
                for (key, size, etag), fmt in zip(chunk, fmts):
                    if fmt is None and (fmt := skip(key, size)) is not None:
                        candidates.append((key, fmt, size, etag))
            keep = np.ones(len(candidates), dtype=bool)
            changed = np.zeros(len(candidates), dtype=bool)
            if (exclude or rejected or state is not None) and candidates:
                # keyset.digest of each image's URI, inlined
                digests = [sha256((uri + c[0]).encode()).digest()[:keyset.KEY_BYTES] for c in candidates]
                if state is not None:
                    changed = compare(state, digests, candidates, keep, listing, reembed_unknown, everything)
                for keys, why in exclude:
                    hit = keys.contains(digests) & keep
                    if hit.any():
                        keep &= ~hit
                        listing.left_out[why] += int(hit.sum())
                for i in keep.nonzero()[0].tolist() if rejected else ():
                    entry = rejected.get(digests[i].hex())
                    _, _, size, etag = candidates[i]
                    if entry and failed_permanently.unchanged(entry, {"ETag": etag, "Size": size}):
                        keep[i] = False
                        listing.left_out[f"failed permanently on {entry.get('failed_on', '?')}"] += 1
            for i in keep.nonzero()[0].tolist():
                key, fmt, size, etag = candidates[i]
                folder = jobs.folder_of(key)
                listing.counts[folder][0] += 1
                listing.counts[folder][1] += 400 + 2 * len(key.encode())  # a generous estimate of its manifest line
                listing.images += 1
                listing.changed += bool(changed[i])
                yield orjson.dumps([key, fmt, etag, size, bool(changed[i])]) + b"\n"

    objects = iter(objects)
    listing_module.sort_lines(images(), listing.path)
    return listing


def compare(state: mirror.IndexState, digests: list[bytes], candidates: list, keep: np.ndarray, listing: Listing,
            reembed_unknown: bool, everything: bool = False) -> np.ndarray:
    """Mark the listed images the index holds as seen; leave out (in `keep`) those whose vector records their ETag
    and size as they are now; return which are changed."""
    at = state.keys.positions_of(np.frombuffer(b"".join(digests), dtype=f"V{keyset.KEY_BYTES}"))
    present = (at >= 0).nonzero()[0]
    changed = np.zeros(len(candidates), dtype=bool)
    if not len(present):
        return changed
    listing.seen[at[present]] = True
    listed = np.fromiter((mirror.state_of(candidates[i][3], candidates[i][2]) for i in present.tolist()),
                         dtype=np.uint32, count=len(present))
    stored = state.states[at[present]]
    same = (stored == listed) | (listed == mirror.UNKNOWN) | ((stored == mirror.UNKNOWN) & (not reembed_unknown))
    changed[present[~same]] = True
    if not everything:
        keep[present[same]] = False
        listing.left_out["already in the vector index"] += int(same.sum())
    return changed


_forked: dict = {}  # what list_inventory's worker processes inherit (the key sets are not copied)


def list_inventory(s3, manifest_uri: str, config: common.Config, owner: str, exclude: list[tuple[keyset.KeySet, str]],
                   workdir: Path, rejected: dict[str, dict] | None, state: mirror.IndexState | None = None,
                   reembed_unknown: bool = False, everything: bool = False) -> Listing:
    """list_images over an S3 Inventory report: its data files downloaded, then read side by side in worker
    processes (one a CPU) forked with the index's keys, each into a sorted file; the files are merged in order.
    Without fork, or while this process runs threads (forking would copy a held lock), the files are read here,
    one after the other."""
    # The report often lies in another account's bucket (INVENTORY_BUCKET_OWNER); its objects are of `owner`'s.
    manifest, paths = inventory.data_files(s3, manifest_uri, config.source_bucket,
                                           config.inventory_bucket_owner or owner, workdir)
    workers = min(len(paths), os.cpu_count() or 1)
    folders = [workdir / f"part-{n}" for n in range(len(paths))]
    for folder in folders:
        folder.mkdir()
    _forked.update(paths=paths, folders=folders, manifest=manifest, config=config, exclude=exclude,
                   rejected=rejected, state=state, reembed_unknown=reembed_unknown, everything=everything)
    try:
        if workers > 1 and forking.can_fork():
            pool = forking.executor(workers)
            try:
                parts = list(pool.map(_list_data_file, range(len(paths))))
            finally:  # on an error or Ctrl-C, files not yet started are not read
                pool.shutdown(wait=True, cancel_futures=True)
            print(f"Read its {len(paths)} data files in {workers} worker processes")
        else:
            parts = [_list_data_file(n) for n in range(len(paths))]
    except BrokenProcessPool:
        raise StepError("a worker process reading the inventory report stopped (out of memory?) — run 01 again",
                        common.EXIT_ERROR) from None
    finally:
        _forked.clear()
    for path in paths:
        path.unlink(missing_ok=True)
    return Listing.merged(parts, workdir, len(state.keys.packed) if state is not None else 0)


def _list_data_file(n: int) -> dict:
    f = _forked
    objects = inventory.file_objects(f["paths"][n], f["manifest"], f["config"].source_bucket,
                                     f["config"].source_prefix)
    return list_images(objects, f["config"], f["exclude"], f["folders"][n], f["rejected"], f["state"],
                       f["reembed_unknown"], f["everything"]).summary()


def retry_objects(entries: list[dict], config: common.Config):
    """The images of an account file as listing entries; each must be under the configured source folder."""
    for entry in entries:
        bucket, key = common.parse_s3_uri(entry["source_uri"])
        if bucket != config.source_bucket or not key.startswith(config.source_prefix):
            folder = common.s3_uri(config.source_bucket, config.source_prefix)
            raise StepError(f"{entry['source_uri']} is not under {folder} — retry with the settings of the run that "
                            "produced the account", common.EXIT_USAGE)
        yield key, 1, None
