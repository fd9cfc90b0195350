"""A run's manifests: the JSONL files of Nova Multimodal Embeddings requests that 01 writes for each planned job,
split at Bedrock's per-file quotas with a few files open at once, and the clientRequestToken derived from them.
Beside each job's manifests, a local file of its images' sources (`sources_path`: each image's S3 key, the
ETag and size it was listed with, and whether it replaces a changed image) for 03 to record in the metadata."""

from __future__ import annotations

import hashlib
from collections import OrderedDict, defaultdict
from pathlib import Path

import numpy as np
import orjson

import common
from batch_embeddings import jobs, naming, nova
from common import StepError

SOURCES_SUFFIX = ".sources.jsonl"
SEEN_ID_BYTES = 8  # of each image's recordId, kept while the manifests are written to find a repeat
OPEN_MANIFESTS = 4  # manifest files open at once while writing, whatever the number of jobs


def write(listing, planned: list[jobs.PlannedJob], config: common.Config, owner: str,
                    stamp: str, manifest_dir: Path, exact_ids: bool = False) -> list[dict]:
    """Pass 2 of 01: stream the listing (its images_in_order()) into each planned job's manifest files in `manifest_dir` (split at the per-file
    quotas), with at most OPEN_MANIFESTS files open. On any failure (Ctrl-C included) every manifest written so far
    is removed before the error goes on.

    Each image gets its URI's first recordId, and the first SEEN_ID_BYTES of each id are kept; if two images of a
    job share them (about one chance in 200,000 at 50,000 images; a whole id, one in 10¹³), the manifests
    are written again with naming.RecordIds, which gives an image whose id is taken its URI's next id. A set of a
    million ids as strings would take ~90 MB; this takes 8 MB."""
    ranges: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for number, job in enumerate(planned):
        for folder, start, end in job.allocations:
            ranges[folder].append((start, end, number))
    seen: dict[str, int] = defaultdict(int)
    single = len(planned) == 1
    records = [
        {
            "job_name": f"nova-mme-embedding-{stamp}" + ("" if single else f"-{n + 1:02d}"),
            "input_folder": job.root,
            "input_s3_uri": common.s3_uri(config.source_bucket, job.root),
            "output_s3_uri": common.s3_uri(config.result_bucket, config.result_prefix),
            "model_id": config.model_id,
            "role_arn": config.role_arn,
            "embedding_dimension": config.embedding_dimension,
            "embedding_purpose": config.embedding_purpose,
            "output_kms_key_id": config.output_kms_key_id,
            "record_count": job.records,
            "manifests": [],
            "created": common.now_iso(),
        }
        for n, job in enumerate(planned)
    ]
    files = OpenFiles(OPEN_MANIFESTS)
    last_folder, start, end, number, writer = None, 0, 0, 0, None
    writers = [ManifestWriter(record, stamp, None if single else n + 1, config.quotas, manifest_dir, files)
               for n, record in enumerate(records)]
    record_ids = [naming.RecordIds() for _ in records] if exact_ids else None  # recordIds unique within each job
    given = [bytearray(SEEN_ID_BYTES * job.records) for job in planned]  # checked for repeats at the end
    filled = [0] * len(planned)
    try:
        try:
            for key, fmt, etag, size, changed in listing.images_with_sources():
                folder = key[: key.rfind("/") + 1]  # jobs.folder_of
                index = seen[folder]
                seen[folder] = index + 1
                if folder != last_folder or not start <= index < end:
                    start, end, number = next(r for r in ranges[folder] if r[0] <= index < r[1])
                    if writer is not None and writer is not writers[number]:
                        writer.flush()  # only the writer in use holds lines not written yet
                    writer, last_folder = writers[number], folder
                uri = common.s3_uri(config.source_bucket, key)
                if record_ids is None:
                    rid = naming.record_id(uri)
                    at = filled[number]
                    given[number][at:at + SEEN_ID_BYTES] = rid.encode()[:SEEN_ID_BYTES].ljust(SEEN_ID_BYTES, b"\0")
                    filled[number] = at + SEEN_ID_BYTES
                else:
                    rid = record_ids[number].assign(uri)
                record = nova.image_record(uri, fmt, owner, config.embedding_dimension, config.embedding_purpose,
                                             rid)
                writer.write(orjson.dumps(record) + b"\n")
                writer.source(orjson.dumps([key, etag and etag.strip('"'), size if etag else None, changed]) + b"\n")
            for writer in writers:
                writer.flush()
        finally:
            files.close_all()
        if record_ids is None and any(_repeats(memoryview(ids)[:n]) for ids, n in zip(given, filled)):
            files.remove_all()
            return write(listing, planned, config, owner, stamp, manifest_dir, exact_ids=True)
        for record in records:
            record["client_request_token"] = token(record)
    except BaseException as exc:
        files.remove_all()
        if isinstance(exc, OSError):
            raise StepError(f"cannot write the manifests in {manifest_dir}: {exc.strerror or exc} — free space "
                            "or file handles there and run 01 again", common.EXIT_USAGE) from None
        raise
    return records


def _repeats(ids: memoryview) -> bool:
    """Whether the start of a recordId (SEEN_ID_BYTES each) appears twice in `ids`."""
    values = np.frombuffer(ids, dtype=f"V{SEEN_ID_BYTES}")
    return len(np.unique(values)) < len(values)


class OpenFiles:
    """Files written a piece at a time, at most `limit` open at once: the least recently written one is closed
    and opened again (to append) when its turn comes. Remembers every file it created, to remove them all."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open: OrderedDict[Path, object] = OrderedDict()
        self.created: list[Path] = []

    def create(self, path: Path) -> None:
        self.created.append(path)
        self._open(path, "wb")

    def write(self, path: Path, data: bytes) -> None:
        fh = self.open.get(path)
        if fh is None:
            fh = self._open(path, "ab")
        else:
            self.open.move_to_end(path)
        fh.write(data)

    def close(self, path: Path) -> None:
        fh = self.open.pop(path, None)
        if fh is not None:
            fh.close()

    def _open(self, path: Path, mode: str):
        while len(self.open) >= self.limit:
            self.open.popitem(last=False)[1].close()
        fh = self.open[path] = open(path, mode)
        return fh

    def close_all(self) -> None:
        while self.open:
            self.open.popitem()[1].close()

    def remove_all(self) -> None:
        self.close_all()
        for path in self.created:
            path.unlink(missing_ok=True)


class ManifestWriter:
    """A job's manifest files: a new part when the next line would pass the records or bytes per file."""

    def __init__(self, job: dict, stamp: str, number: int | None, quotas: common.Quotas, manifest_dir: Path,
                 files: OpenFiles):
        self.job, self.stamp, self.number, self.quotas = job, stamp, number, quotas
        self.manifest_dir, self.files = manifest_dir, files
        self.path: Path | None = None
        self.pending: list[bytes] = []  # lines not written yet
        self.sources_path = (manifest_dir / _sources_name(job)).resolve()
        self.sources: list[bytes] = []  # its sources' lines not written yet
        self.sources_created = False
        self.records = self.bytes = 0

    def source(self, line: bytes) -> None:
        if not self.sources_created:
            self.files.create(self.sources_path)
            self.sources_created = True
        self.sources.append(line)

    def write(self, line: bytes) -> None:
        if self.path is None or self.records >= self.quotas.max_records_per_file or \
                self.bytes + len(line) > self.quotas.max_input_file_bytes:
            self.open_next()
        self.pending.append(line)
        if len(self.pending) >= 512:
            self.flush()
        self.records += 1
        self.bytes += len(line)
        self.job["manifests"][-1]["records"] = self.records

    def flush(self) -> None:
        if self.pending:
            self.files.write(self.path, b"".join(self.pending))
            self.pending.clear()
        if self.sources:
            self.files.write(self.sources_path, b"".join(self.sources))
            self.sources.clear()

    def open_next(self) -> None:
        if self.path is not None:
            self.flush()
            self.files.close(self.path)
        part = len(self.job["manifests"]) + 1
        name = f"{naming.MANIFEST_PREFIX}{self.stamp}"
        name += "" if self.number is None else f"-{self.number:02d}"
        name += "" if part == 1 else f"-part{part}"
        name += naming.MANIFEST_SUFFIX
        self.path = (self.manifest_dir / name).resolve()
        self.job["manifests"].append({"local_path": str(self.path), "s3_key": self.job["input_folder"] + name,
                                      "records": 0})
        self.files.create(self.path)
        self.records = self.bytes = 0


def sources_path(job: dict) -> Path | None:
    """The local file of the job's images' sources, beside its manifests (None for a job without manifests)."""
    if not job.get("manifests"):
        return None
    return Path(job["manifests"][0]["local_path"]).parent / _sources_name(job)


def _sources_name(job: dict) -> str:
    return f"{Path(job['job_name']).name}{SOURCES_SUFFIX}"


def read_sources(job: dict) -> dict[str, tuple[str | None, int | None, bool]]:
    """Vector key -> (ETag, size, changed) of the job's images; empty when the file is gone (a run of an earlier
    version: its vectors get no ETag). The file names each image by its S3 key: the vector keys are worked out
    here, a job at a time, not in 01's pass over every image."""
    path = sources_path(job)
    if path is None:
        return {}
    bucket = common.parse_s3_uri(job["input_s3_uri"])[0]
    try:
        with open(path, "rb") as fh:
            return {naming.vector_key(common.s3_uri(bucket, key)): (etag, size, changed)
                    for key, etag, size, changed in map(orjson.loads, fh)}
    except FileNotFoundError:
        return {}


def token(job: dict) -> str:
    """Deterministic clientRequestToken: the job's name and its manifests' content."""
    digest = hashlib.sha256(job["job_name"].encode())
    for manifest in job["manifests"]:
        with open(manifest["local_path"], "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
