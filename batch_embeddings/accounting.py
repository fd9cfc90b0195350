"""The account of a run: every image of every manifest ends loaded, failed (with Bedrock's reason) or missing.

"Loaded" is asked of the index itself (GetVectors on the image's key), so nothing counts as loaded that is not
there. The images not loaded are written to `runs/<stamp>/not_loaded.jsonl` beside the job-info file, one JSON
line each:
`{"source_uri", "recordId", "job_name", "status": "failed"|"missing", "error_code", "error_message"}` — the list
`01_create_job.py --retry-failed` submits again.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import orjson

import common
from batch_embeddings import failed_permanently, jobinfo, naming, nova

GET_VECTORS_KEYS = 100  # S3 Vectors' limit per GetVectors
THREADS = 8
NOT_LOADED_NAME = "not_loaded.jsonl"


SHOWN = 10  # images named on the console; the file lists all


def latest_not_loaded(job_info_file: Path) -> Path | None:
    """The newest run's account (`runs/<stamp>/not_loaded.jsonl`), or the one an earlier version wrote beside the
    job-info file; None when there is none."""
    found = sorted(jobinfo.runs_folder(job_info_file).glob(f"*/{NOT_LOADED_NAME}"))
    if found:
        return found[-1]
    legacy = Path(job_info_file).resolve().parent / NOT_LOADED_NAME
    return legacy if legacy.exists() else None


def print_not_loaded(entries: list[dict], path: Path, total: int | None = None) -> None:
    """Name the first images not loaded, with their reason, and the file that lists them all."""
    total = len(entries) if total is None else total
    print(f"! {total} image(s) not loaded — all listed in {path}:")
    for entry in entries[:SHOWN]:
        print(f"  {entry['source_uri']}: {entry['status']} ({entry['error_code']}: {entry['error_message']})")
    if total > SHOWN:
        print(f"  ... and {total - SHOWN} more")


def file_records(path: Path) -> Iterator[dict]:
    """Every record of one local manifest."""
    with open(path, "rb") as fh:
        for line in fh:
            if line.strip():
                yield orjson.loads(line)


def job_records(job: dict, gone: str) -> Iterator[dict]:
    """Every record of the job's local manifests; a manifest that is gone is a StepError ending with `gone`."""
    for manifest in job["manifests"]:
        path = Path(manifest["local_path"])
        if not path.exists():
            raise common.StepError(f"manifest {path} of {job['job_name']} is gone: {gone}")
        yield from file_records(path)


def manifest_file_records(path: Path) -> Iterator[tuple[str, str]]:
    """(recordId, image URI) of every record of one local manifest."""
    for record in file_records(path):
        yield record["recordId"], nova.image_uri(record)


def manifest_records(job: dict) -> Iterator[tuple[str, str]]:
    """(recordId, image URI) of every record of the job's local manifests."""
    for record in job_records(job, "its images cannot be accounted for — keep the manifests until "
                                   "04_remove_completed_task.py"):
        yield record["recordId"], nova.image_uri(record)


def failures(report: Path) -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]]]:
    """A job's load report joined to images: (vector key of the line's image URI -> (error code, message),
    recordId -> (error code, message) for the lines that name no image URI)."""
    by_key, by_record_id = {}, {}
    if report.exists():
        with open(report, "rb") as fh:
            for line in fh:
                entry = orjson.loads(line)
                found = (str(entry.get("error_code")), entry.get("error_message", ""))
                if isinstance(entry.get("source_uri"), str):
                    by_key[naming.vector_key(entry["source_uri"])] = found
                elif isinstance(entry.get("recordId"), str):
                    by_record_id[entry["recordId"]] = found
    return by_key, by_record_id


class Presence:
    """Asks the index which keys it holds, 100 at a time on a few threads: one GetIndex and one thread pool for
    every question of a run (a run may have hundreds of jobs)."""

    def __init__(self, s3v, bucket: str, index: str, threads: int = THREADS):
        self.s3v, self.bucket, self.index, self.threads = s3v, bucket, index, threads
        self.exists: bool | None = None
        self.pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> "Presence":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def keys(self, keys: list[str]) -> set[str]:
        """The keys that are in the index."""
        if not keys:
            return set()
        if self.exists is None:
            try:
                self.s3v.get_index(vectorBucketName=self.bucket, indexName=self.index)
                self.exists = True
            except self.s3v.exceptions.NotFoundException:
                self.exists = False  # no index yet: nothing is loaded
        if not self.exists:
            return set()
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.threads)
        batches = [keys[i:i + GET_VECTORS_KEYS] for i in range(0, len(keys), GET_VECTORS_KEYS)]
        return {key for found in self.pool.map(self._ask, batches) for key in found}

    def _ask(self, batch: list[str]) -> list[str]:
        response = self.s3v.get_vectors(vectorBucketName=self.bucket, indexName=self.index, keys=batch)
        return [v["key"] for v in response.get("vectors", [])]


def present_keys(s3v, bucket: str, index: str, keys: list[str]) -> set[str]:
    """The keys that are in the index (one question: see Presence for many)."""
    with Presence(s3v, bucket, index) as presence:
        return presence.keys(keys)


def account_run(info: dict, s3v, config: common.Config, report_file: Callable[[str], Path], out: Path,
                confirmed: set[str] = frozenset()) -> dict:
    """Account for every image of the run; the images not loaded go to `out` (written atomically).

    Keys the index confirmed to this process (`confirmed`) count as loaded; the index is asked about the rest.
    """
    totals = {"loaded": 0, "failed": 0, "missing": 0, "jobs": [], "shown": [], "permanent": []}

    def entries():
        for job in info["jobs"]:
            records = list(manifest_records(job))
            keys = [naming.vector_key(uri) for _, uri in records]
            present = {key for key in keys if key in confirmed}
            unknown = [key for key in keys if key not in present]
            present |= presence.keys(unknown)
            job_id = naming.job_id_from_arn(job["job_arn"]) if job.get("job_arn") else None
            job_id = job["job_name"] if job.get("on_demand") else job_id  # its load report, written by step 3
            failed, failed_without_uri = failures(report_file(job_id)) if job_id else ({}, {})
            status = job.get("status") or ("on demand" if job.get("on_demand") else "never submitted")
            counts = {"job_name": job["job_name"], "status": status, "loaded": 0, "failed": 0, "missing": 0}
            permanent: list[dict] = []
            for (record_id, uri), key in zip(records, keys):
                if key in present:
                    counts["loaded"] += 1
                    continue
                entry = {"source_uri": uri, "recordId": record_id, "job_name": job["job_name"]}
                # Joined by the image URI (step 3 cross-checks the recordId); a line without a URI, by its recordId.
                failure = failed.get(key) or failed_without_uri.get(record_id)
                if failure is not None:
                    code, message = failure
                    entry.update(status="failed", error_code=code, error_message=message)
                    counts["failed"] += 1
                else:
                    reason = f"not in the output of job {job['job_name']} ({status}"
                    reason += f": {job['message']})" if job.get("message") else ")"
                    entry.update(status="missing", error_code="Missing", error_message=reason)
                    counts["missing"] += 1
                if len(totals["shown"]) < SHOWN:
                    totals["shown"].append(entry)
                if entry["status"] == "failed" and failed_permanently.is_permanent(entry["error_code"], entry["error_message"]):
                    permanent.append(entry)
                yield entry
            if counts["failed"] < len(records):  # every record failed: the job's trouble, not each image's
                totals["permanent"] += permanent
            for key in ("loaded", "failed", "missing"):
                totals[key] += counts[key]
            totals["jobs"].append(counts)

    def write(fh):
        for entry in entries():
            fh.write(orjson.dumps(entry) + b"\n")

    with Presence(s3v, config.vector_bucket, config.vector_index) as presence:
        common.atomic_write(out, write)
    return totals


def print_account(account: dict) -> None:
    print("Account of every image of the run:")
    for job in account["jobs"]:
        print(f"  {job['job_name']} ({job['status']}): loaded {job['loaded']}, failed {job['failed']}, "
              f"missing {job['missing']}")
    print(f"Images loaded: {account['loaded']}, failed: {account['failed']}, missing: {account['missing']}")


def read_not_loaded(path: Path) -> list[dict]:
    """The images a run did not load, from its account file."""
    try:
        with open(path, encoding="utf-8") as fh:
            entries = [json.loads(line) for line in fh if line.strip()]
    except FileNotFoundError:
        raise common.StepError(f"{path} not found — run 03_load_result_to_s3_vector_bucket.py first (it lists the "
                               "images a run did not load)", common.EXIT_USAGE) from None
    except json.JSONDecodeError as exc:
        raise common.StepError(f"{path} is not valid JSON lines ({exc})", common.EXIT_USAGE) from None
    if not all(isinstance(e, dict) and isinstance(e.get("source_uri"), str) for e in entries):
        raise common.StepError(f"{path} is malformed: every line needs a source_uri", common.EXIT_USAGE)
    return entries


def remember_permanent_failures(s3, s3v, config: common.Config, owner: str, permanent: list[dict]) -> None:
    """Keep the images Bedrock rejected for good out of later runs, and forget those now in the index."""
    path = failed_permanently.file_for(config.job_info_file)
    known = failed_permanently.load(path)
    found = failed_permanently.remember(s3, owner, permanent)
    loaded = present_keys(s3v, config.vector_bucket, config.vector_index, list(known)) if known else set()
    if not found and not loaded:
        return
    merged = {key: entry for key, entry in known.items() if key not in loaded}
    merged.update(found)
    failed_permanently.save(path, merged)
    if found:
        print(f"{len(found)} image(s) failed permanently (Bedrock refused the image itself): later runs leave them "
              f"out while they are unchanged — see {path}")
