"""The job-info file (`batch_job_info.json`): the one owner of the state the steps pass to each other.

It loads the file and checks the type of every field (a damaged file is one line and exit 2, never a
traceback), saves it atomically (a reader never sees half of it), and holds the lock that lets one step at a
time work on a run: `<job-info file>.lock`, held for the step's life and released by the operating system when
the process ends, however it ends. A second step started meanwhile says who holds the lock and exits 7, or
waits with `--wait-lock`. The lock is re-entrant within a process, so `daily_run.py` holds it across the steps.

A run's other files live beside it: `runs/<stamp>/` holds the run's local manifests and its reports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import threading
import time
from pathlib import Path

import orjson

import common
from common import Config
from batch_embeddings import lease, naming

RUNS_FOLDER = "runs"
TERMINAL_STATUSES = frozenset({"Completed", "PartiallyCompleted", "Failed", "Stopped", "Expired"})
# Statuses whose output folder holds results worth loading.
LOADABLE_STATUSES = frozenset({"Completed", "PartiallyCompleted", "Stopped"})
STATUSES = TERMINAL_STATUSES | {"Submitted", "Validating", "Scheduled", "InProgress", "Stopping"}

_held: dict[str, "_Hold"] = {}  # lock path -> this process's hold of it


# --------------------------------------------------------------------------------------------------------------
# Where a run's files live
# --------------------------------------------------------------------------------------------------------------


def runs_folder(path: Path) -> Path:
    """The folder beside the job-info file that holds one sub-folder per run."""
    return Path(path).resolve().parent / RUNS_FOLDER


def run_folder(path: Path, info: dict) -> Path:
    """Where the run's local manifests and reports are written: `runs/<stamp>/` beside the job-info file."""
    return runs_folder(path) / info.get("run", "earlier")


def lock_file(path: Path) -> Path:
    path = Path(path).resolve()
    return path.with_name(path.name + ".lock")


# --------------------------------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------------------------------


class _Hold:
    """This process's hold of a lock: how many `locked` blocks hold it, its file, and the leases on source prefixes
    taken under it (released when the outermost block ends)."""

    def __init__(self, fd: int, about: dict, previous: dict):
        self.count, self.fd, self.about = 1, fd, about
        self.leases: dict[tuple[str, str], lease.Lease] = {}
        # The leases the lock's previous holder wrote in the lock file and did not release (it died): ours to take.
        self.left = frozenset(previous.get("leases", [])) if isinstance(previous.get("leases"), list) else frozenset()

    def write(self) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(dict(self.about, leases=[x.id for x in self.leases.values()])).encode(), 0)


@contextlib.contextmanager
def locked(path: Path, step: str, wait: bool = False, poll: float = 1.0, sleep=time.sleep):
    """Hold the run's lock while the block runs; StepError (exit 7) when another process holds it.

    `wait`: wait until the lock is free instead (polling, so Ctrl-C stops the wait). A lock file that cannot be
    opened or written (a read-only folder, a full disk, a folder in its place) is one line, exit 2.
    """
    target = lock_file(path)
    key = str(target)
    if key in _held:
        _held[key].count += 1
        try:
            yield
        finally:
            _held[key].count -= 1
        return
    with _local(target, "the lock file"):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _holder(fd)
                if not wait:
                    raise common.StepError(
                        f"{holder} is working on {Path(path)} (lock {target.name}) — let it finish, or run this step "
                        "with --wait-lock to wait for it", common.EXIT_LOCKED) from None
                if not announced:
                    print(f"Waiting for {holder} to finish with {Path(path)} (lock {target.name})...", flush=True)
                    announced = True
                sleep(poll)
        hold = _Hold(fd, {"pid": os.getpid(), "step": step, "since": common.now_iso()}, _content(fd))
        try:
            with _local(target, "the lock file"):
                hold.write()
            _held[key] = hold
            yield
        finally:
            _held.pop(key, None)
            try:
                for taken in hold.leases.values():
                    taken.release()
            finally:
                with contextlib.suppress(OSError):  # the lock goes with the file handle whatever happens here
                    os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _local(path: Path, what: str):
    """A local file that cannot be written: one line naming it and what to do, exit 2."""
    try:
        yield
    except OSError as exc:
        raise common.StepError(f"cannot write {what} {path}: {exc.strerror or exc} — "
                               f"{common.local_remedy(exc)}", common.EXIT_USAGE) from None


def _content(fd: int) -> dict:
    try:
        about = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return about if isinstance(about, dict) else {}
    except (OSError, ValueError):
        return {}


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it: 'another step' when it cannot be read."""
    about = _content(fd)
    try:
        return f"{about['step']} (pid {about['pid']}, since {about['since']})"
    except KeyError:
        return "another step"


def claim(path: Path, s3, bucket: str, prefix: str, owner: str, step: str | None = None, **options) -> None:
    """Take the lease on the run's source prefix in S3 (lease.py) for as long as this process holds the lock on
    `path`: a step that changes S3 or the index calls it once it knows the prefix. StepError (exit 7) naming the
    holder when another machine or job-info file works on the prefix. Re-entrant, like the lock."""
    hold = _held.get(str(lock_file(path)))
    if hold is None:
        raise RuntimeError("jobinfo.claim needs the lock on the job-info file")
    if (bucket, prefix) in hold.leases:
        return
    taken = lease.Lease(s3, bucket, prefix, owner, Path(path), step or hold.about["step"], **options)
    taken.take(hold.left)
    hold.leases[(bucket, prefix)] = taken
    with _local(lock_file(path), "the lock file"):
        hold.write()  # a process that dies holding the lease leaves its id here for the next holder of the lock


def keep_leases(raise_lost: bool = True) -> None:
    """Renew this process's leases that are due; StepError (exit 7) when one was taken over meanwhile."""
    for hold in list(_held.values()):
        for taken in list(hold.leases.values()):
            taken.keep()
            if raise_lost:
                taken.check()


def lock_args(parser) -> None:
    """The `--wait-lock` flag every step that touches the job-info file takes."""
    parser.add_argument("--wait-lock", action="store_true",
                        help="when another step is working on the run, wait for it instead of exiting 7")


# --------------------------------------------------------------------------------------------------------------
# Loading and saving
# --------------------------------------------------------------------------------------------------------------


def save(path: Path, info: dict) -> None:
    """Write the job-info file whole (a full disk leaves the previous version as it was: StepError, exit 2), and
    renew the leases this process holds when they are due."""
    # orjson, not json: a run of hundreds of jobs is saved twice a job, and json's indented encoder took ≈ 17 ms a
    # save of a 210-job file (half of 01's time submitting them), orjson well under one.
    data = orjson.dumps(info, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)
    try:
        common.atomic_write(path, lambda fh: fh.write(data))
    except OSError as exc:
        raise common.StepError(f"cannot save {path}: {exc.strerror or exc} — {common.local_remedy(exc)} ({path} "
                               "still holds the state before this change)", common.EXIT_USAGE) from None
    keep_leases(raise_lost=threading.current_thread() is threading.main_thread())


def exists(path: Path) -> bool:
    return Path(path).exists()


def job_ids(path: Path) -> set[str]:
    """The ARNs and names of the jobs the job-info file names (none when there is no file). The name counts too: a
    job whose submit answer was lost has no ARN in the file yet, and is still this file's job."""
    if not Path(path).exists():
        return set()
    return {value for job in load(path)["jobs"] for value in (job.get("job_arn"), job.get("job_name")) if value}


def load(path: Path) -> dict:
    """Read and check the job-info file; a missing, unreadable or damaged file is a StepError (exit 2)."""
    path = Path(path)
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise common.StepError(f"{path} not found — run 01_create_job.py first", common.EXIT_USAGE) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise common.StepError(f"{path} is not valid JSON ({exc}) — restore it, or remove it and run "
                               "01_create_job.py again", common.EXIT_USAGE) from None
    problem = problems(info)
    if problem:
        raise common.StepError(f"{path} is damaged: {problem} — restore it, or remove it and run 01_create_job.py "
                               "again (04_remove_completed_task.py --force cannot read it either)", common.EXIT_USAGE)
    return info


# Field -> (accepted types, required). None as a type: the field may be null.
_STR, _INT, _BOOL, _DICT, _LIST = (str,), (int,), (bool,), (dict,), (list,)
RUN_FIELDS = {
    "version": (_INT, False),
    "region": (_STR, True),
    "account_id": (_STR, True),
    "source_bucket": (_STR, True),
    "source_prefix": (_STR, False),
    "result_bucket": (_STR, True),
    "result_prefix": (_STR, False),
    "created": (_STR, False),
    "run": (_STR, False),
    "account_file": (_STR, False),
    "mirror": (_DICT, False),  # what 01 found against the index (mirror.py), and 03's deletions
    "jobs": (_LIST, True),
}
MIRROR_COUNTS = ("new", "changed", "unchanged", "to_delete", "deleted")
JOB_FIELDS = {
    "job_name": (_STR, True),
    "input_folder": (_STR, True),
    "input_s3_uri": (_STR, True),
    "output_s3_uri": (_STR, True),
    "model_id": (_STR, True),
    "role_arn": (_STR, True),
    "embedding_dimension": (_INT, True),
    "embedding_purpose": (_STR, False),
    "output_kms_key_id": ((str, type(None)), False),
    "record_count": (_INT, True),
    "manifests": (_LIST, True),
    "created": (_STR, False),
    "client_request_token": (_STR, True),
    "uploaded": (_BOOL, False),
    "job_arn": (_STR, False),
    "job_id": (_STR, False),
    "status": (_STR, False),
    "counts": (_DICT, False),
    "message": (_STR, False),
    "input_removed": (_BOOL, False),
    "load": (_DICT, False),
    "on_demand": (_BOOL, False),  # the run's on-demand part: no Bedrock job, step 3 embeds its manifest
}
MANIFEST_FIELDS = {"local_path": (_STR, True), "s3_key": (_STR, True), "records": (_INT, False)}
LOAD_FIELDS = {
    "files": (_DICT, False),
    "counts": (_DICT, False),
    "report_bytes": (_INT, False),
    "finished": (_BOOL, False),
    "vector_bucket": (_STR, False),
    "vector_index": (_STR, False),
    "refused": (_LIST, False),  # load-report lines of the vectors the index refused (03 writes them at the end)
}
FILE_FIELDS = {"offset": (_INT, True), "done": (_BOOL, True)}
LOAD_COUNTS = {"total", "success", "error", "inserted"}


def _fields(obj, spec: dict, where: str) -> str:
    if not isinstance(obj, dict):
        return f"{where} is not an object"
    for name, (types, required) in spec.items():
        if name not in obj:
            if required:
                return f"{where} lacks '{name}'"
            continue
        value = obj[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            field = f"{where}.{name}" if where != "the file" else name
            return f"{field} is {json.dumps(value)[:40]}, not {_type_names(types)}"
    return ""


def _type_names(types) -> str:
    names = {str: "a string", int: "a whole number", bool: "true/false", dict: "an object", list: "a list",
             type(None): "null"}
    return " or ".join(names[t] for t in types)


def problems(info) -> str:
    """What is wrong with a job-info file's content, or '' when every field has its type."""
    found = _fields(info, RUN_FIELDS, "the file")
    if found:
        return found
    if not info["jobs"]:
        return "'jobs' is empty"
    for name, value in (info.get("mirror") or {}).items():
        if name == "deletions_done" and not isinstance(value, bool):
            return "mirror.deletions_done is not true or false"
        if name in MIRROR_COUNTS and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            return f"mirror.{name} is not a whole number"
    for i, job in enumerate(info["jobs"]):
        where = f"jobs[{i}]"
        found = _fields(job, JOB_FIELDS, where)
        if found:
            return found
        if job["embedding_dimension"] not in common.DIMENSIONS or job["record_count"] < 0:
            return f"{where} has embedding_dimension {job['embedding_dimension']} and record_count {job['record_count']}"
        if job.get("status") is not None and job["status"] not in STATUSES:
            return f"{where}.status {job['status']!r} is not a batch job status"
        for name in ("input_s3_uri", "output_s3_uri"):
            if not job[name].startswith("s3://"):
                return f"{where}.{name} is not an s3:// URI"
        if "job_arn" in job and "/" not in job["job_arn"]:
            return f"{where}.job_arn is not a job ARN"
        for m, manifest in enumerate(job["manifests"]):
            found = _fields(manifest, MANIFEST_FIELDS, f"{where}.manifests[{m}]")
            if found:
                return found
            found = _foreign(manifest, job)
            if found:
                return f"{where}.manifests[{m}] {found}"
        for name, value in job.get("counts", {}).items():
            if not isinstance(value, int) or isinstance(value, bool):
                return f"{where}.counts.{name} is not a whole number"
        if "load" in job:
            found = _load_problems(job["load"], f"{where}.load")
            if found:
                return found
    return ""


def _foreign(manifest: dict, job: dict) -> str:
    """Why a manifest entry names a file this tool did not write ('' when it is one of ours): 02 and 04 delete
    what the entries name, so an entry edited by hand must not make them delete an image or another file."""
    key, name = manifest["s3_key"], Path(manifest["local_path"]).name
    if not (naming.is_own_manifest(key) and key[:key.rfind("/") + 1] == job["input_folder"]):
        return f"names s3 key {key!r}, not a manifest of this tool in {job['input_folder']!r}"
    if not naming.is_own_manifest(name):
        return f"names local file {manifest['local_path']!r}, not a manifest of this tool"
    return ""


def _load_problems(load: dict, where: str) -> str:
    found = _fields(load, LOAD_FIELDS, where)
    if found:
        return found
    for key, position in load.get("files", {}).items():
        found = _fields(position, FILE_FIELDS, f"{where}.files[{key!r}]")
        if found:
            return found
    counts = load.get("counts", {})
    if "counts" in load and set(counts) != LOAD_COUNTS:
        return f"{where}.counts must hold {', '.join(sorted(LOAD_COUNTS))}"
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"{where}.counts.{name} is not a whole number"
    if load.get("report_bytes", 0) < 0 or any(p["offset"] < 0 for p in load.get("files", {}).values()):
        return f"{where} has a negative offset"
    return ""


def in_job_region(config: Config, info: dict) -> Config:
    """The config with the region the jobs were created in: later steps must talk to that region."""
    return dataclasses.replace(config, region=info["region"])


def submitted_jobs(info: dict) -> list[dict]:
    return [job for job in info["jobs"] if job.get("job_arn")]


def job_loaded(job: dict) -> bool:
    """Whether step 3 has loaded every output file of the job."""
    load = job.get("load") or {}
    return bool(load.get("finished"))
