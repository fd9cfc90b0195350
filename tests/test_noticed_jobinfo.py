"""The job-info file as a step meets it after trouble: a save cut short (disk full, a kill) leaves the earlier file
whole; a file with negative counts or offsets is damaged (one line, exit 2); the lock names its holder even after
a holder was killed with a longer line in the lock file."""

from __future__ import annotations

import argparse
import copy
import errno
import fcntl
import json
import locale
import os
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone

import boto3
import pytest

import common
from batch_embeddings import jobinfo, lease
from tests.conftest import ROOT

# A job-info file as 01 and 03 write it, half-way through a load.
VALID = {
    "version": 2,
    "region": "us-east-1",
    "account_id": "123456789012",
    "source_bucket": "source-x",
    "source_prefix": "2024/",
    "result_bucket": "result-x",
    "result_prefix": "output/",
    "created": "2026-12-01T10:00:00+00:00",
    "run": "20261201-100000",
    "account_file": "/tmp/runs/20261201-100000/not_loaded.jsonl",
    "jobs": [{
        "job_name": "nova-mme-embedding-20261201-100000",
        "input_folder": "2024/",
        "input_s3_uri": "s3://source-x/2024/",
        "output_s3_uri": "s3://result-x/output/",
        "model_id": "amazon.nova-2-multimodal-embeddings-v1:0",
        "role_arn": "arn:aws:iam::123456789012:role/BedrockBatchInferenceRole",
        "embedding_dimension": 256,
        "embedding_purpose": "GENERIC_INDEX",
        "output_kms_key_id": None,
        "record_count": 100,
        "manifests": [{"local_path": "/tmp/runs/20261201-100000/batch_input_20261201-100000.jsonl",
                       "s3_key": "2024/batch_input_20261201-100000.jsonl", "records": 100}],
        "created": "2026-12-01T10:00:00+00:00",
        "client_request_token": "0" * 64,
        "uploaded": True,
        "job_arn": "arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/abcdefabcdef",
        "job_id": "abcdefabcdef",
        "status": "Completed",
        "counts": {"totalRecordCount": 100, "processedRecordCount": 100},
        "message": "done",
        "input_removed": True,
        "load": {"files": {"output/abcdefabcdef/batch_input_20261201-100000.jsonl.out": {"offset": 10, "done": False}},
                 "counts": {"total": 1, "success": 1, "error": 0, "inserted": 1}, "report_bytes": 0,
                 "finished": False, "vector_bucket": "vectors-x", "vector_index": "images-x"},
    }],
}

# A save under a file-size limit: what a full disk (or a kill half-way) does to a write. The limit is set in a
# process of its own, which prints the error its save ended with.
SAVE_UNDER_LIMIT = """
import json, resource, signal, sys
path, limit, info = sys.argv[1], int(sys.argv[2]), json.loads(sys.stdin.read())
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    jobinfo.save(path, info)
except Exception as exc:  # OSError (EFBIG), or the step's one line about it
    print("failed:", exc)
"""


def test_a_save_cut_short_leaves_the_earlier_file_whole(tmp_path):
    path = tmp_path / "batch_job_info.json"
    jobinfo.save(path, VALID)
    before = path.read_bytes()
    bigger = copy.deepcopy(VALID)
    bigger["jobs"][0]["message"] = "x" * 200_000  # far past the limit below: the save cannot finish
    limit = len(before) + 4096
    cut = subprocess.run([sys.executable, "-c", SAVE_UNDER_LIMIT, str(path), str(limit)], cwd=ROOT,
                         input=json.dumps(bigger), capture_output=True, text=True, timeout=60)
    assert cut.returncode == 0, cut.stderr
    assert cut.stdout.startswith("failed: "), cut.stdout  # the save could not finish
    assert path.read_bytes() == before
    assert jobinfo.load(path) == VALID  # the next step resumes from the last good save
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no half-written file left beside it


def test_a_reader_never_sees_the_file_change_under_it(tmp_path):
    """A step that opened the file before another step saved it reads the whole earlier file, not a mix."""
    path = tmp_path / "batch_job_info.json"
    jobinfo.save(path, VALID)
    changed = copy.deepcopy(VALID)
    changed["jobs"][0]["status"] = "Stopped"
    with open(path, encoding="utf-8") as reader:
        jobinfo.save(path, changed)
        assert json.loads(reader.read()) == VALID
    assert jobinfo.load(path) == changed


def damaged(tmp_path, change) -> str:
    info = copy.deepcopy(VALID)
    change(info["jobs"][0])
    path = tmp_path / "batch_job_info.json"
    path.write_text(json.dumps(info))
    with pytest.raises(common.StepError) as caught:
        jobinfo.load(path)
    assert caught.value.exit_code == common.EXIT_USAGE
    message = str(caught.value)
    assert message.startswith(f"{path} is damaged: jobs[0]") and "\n" not in message
    return message


def test_a_negative_record_count_is_damage(tmp_path):
    message = damaged(tmp_path, lambda job: job.update(record_count=-1))
    assert "record_count -1" in message


@pytest.mark.parametrize("name", ["total", "success", "error", "inserted"])
def test_a_negative_load_count_is_damage(tmp_path, name):
    message = damaged(tmp_path, lambda job: job["load"]["counts"].update({name: -3}))
    assert f"jobs[0].load.counts.{name} is not a whole number" in message


def test_a_negative_file_offset_is_damage(tmp_path):
    def change(job):
        (position,) = job["load"]["files"].values()
        position["offset"] = -10

    assert "jobs[0].load has a negative offset" in damaged(tmp_path, change)


def test_a_negative_report_size_is_damage(tmp_path):
    assert "jobs[0].load has a negative offset" in damaged(tmp_path, lambda job: job["load"].update(report_bytes=-1))


def test_zero_counts_and_offsets_are_not_damage(tmp_path):
    info = copy.deepcopy(VALID)
    job = info["jobs"][0]
    job["record_count"] = 0
    job["load"].update(report_bytes=0, counts={"total": 0, "success": 0, "error": 0, "inserted": 0})
    for position in job["load"]["files"].values():
        position["offset"] = 0
    path = tmp_path / "batch_job_info.json"
    path.write_text(json.dumps(info))
    assert jobinfo.load(path) == info


def test_the_holder_is_named_after_a_killed_holder_left_a_longer_line(tmp_path):
    """A holder killed with the lock held leaves its line in the lock file; the next holder's shorter line must
    not be read with the end of the old one."""
    path = tmp_path / "batch_job_info.json"
    jobinfo.lock_file(path).write_text(json.dumps({"pid": 4_000_000, "step": "daily_run.py " + "x" * 200,
                                                   "since": "2026-12-01T10:00:00+00:00"}))
    with jobinfo.locked(path, "01_create_job.py"):
        code = (f"from batch_embeddings import jobinfo\ntry:\n    with jobinfo.locked({str(path)!r}, '02'):\n        pass\n"
                "except Exception as exc:\n    print(exc)\n")
        other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert other.stdout.startswith(f"01_create_job.py (pid {os.getpid()}, since "), other.stdout + other.stderr
    assert "x" * 10 not in other.stdout


@pytest.mark.parametrize("field, value, problem", [
    ("local_path", "/home/me/precious.txt", "names local file '/home/me/precious.txt', not a manifest of this tool"),
    ("local_path", "/home/me/batch_input_x.json", "names local file"),
    ("s3_key", "2024/victim/precious.jpg", "names s3 key '2024/victim/precious.jpg', not a manifest of this tool"),
    ("s3_key", "2023/batch_input_20261201-100000.jsonl", "not a manifest of this tool in '2024/'"),
])
def test_a_manifest_entry_naming_a_file_this_tool_did_not_write_is_damage(tmp_path, field, value, problem):
    """02 and 04 delete what the entries name: a hand-edited entry must not make them delete another file."""
    message = damaged(tmp_path, lambda job: job["manifests"][0].update({field: value}))
    assert message.startswith(f"{tmp_path / 'batch_job_info.json'} is damaged: jobs[0].manifests[0] names ")
    assert problem in message


# ------------------------------------------------------------------------------------------------------------------
# What a damaged file's one line says, field by field
# ------------------------------------------------------------------------------------------------------------------


def refusal(tmp_path, content) -> str:
    """The problem named by the one line a step prints for this file content (an object, or text as it is)."""
    path = tmp_path / "batch_job_info.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    with pytest.raises(common.StepError) as caught:
        jobinfo.load(path)
    assert caught.value.exit_code == common.EXIT_USAGE
    prefix, suffix = f"{path} is damaged: ", (" — restore it, or remove it and run 01_create_job.py again "
                                              "(04_remove_completed_task.py --force cannot read it either)")
    message = str(caught.value)
    assert message.startswith(prefix) and message.endswith(suffix), message
    return message[len(prefix):-len(suffix)]


def changed(change) -> dict:
    info = copy.deepcopy(VALID)
    change(info)
    return info


def _set(obj, **fields):
    obj.update(fields)


FILE_PROBLEMS = [
    ("[]", "the file is not an object"),
    (changed(lambda i: _set(i, region=5)), "region is 5, not a string"),
    (changed(lambda i: (i.pop("source_prefix"), _set(i, result_bucket=5))), "result_bucket is 5, not a string"),
    (changed(lambda i: i.pop("account_id")), "the file lacks 'account_id'"),
    (changed(lambda i: _set(i, jobs=[])), "'jobs' is empty"),
    (changed(lambda i: _set(i, jobs={})), "jobs is {}, not a list"),
    (changed(lambda i: _set(i["jobs"][0], output_kms_key_id=5)),
     "jobs[0].output_kms_key_id is 5, not a string or null"),
    (changed(lambda i: _set(i["jobs"][0], status="Running")), "jobs[0].status 'Running' is not a batch job status"),
    (changed(lambda i: _set(i["jobs"][0], job_arn="abcdefabcdef")), "jobs[0].job_arn is not a job ARN"),
    (changed(lambda i: i["jobs"][0]["manifests"][0].pop("s3_key")), "jobs[0].manifests[0] lacks 's3_key'"),
    (changed(lambda i: _set(i["jobs"][0], counts={"processedRecordCount": "100"})),
     "jobs[0].counts.processedRecordCount is not a whole number"),
    (changed(lambda i: _set(i["jobs"][0], counts={"processedRecordCount": True})),
     "jobs[0].counts.processedRecordCount is not a whole number"),
    (changed(lambda i: _set(i["jobs"][0], counts=list(range(30)))),
     "jobs[0].counts is [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 1, not an object"),  # a long value is cut short
    (changed(lambda i: _set(i["jobs"][0]["load"], finished=1)), "jobs[0].load.finished is 1, not true/false"),
    (changed(lambda i: next(iter(i["jobs"][0]["load"]["files"].values())).pop("done")),
     "jobs[0].load.files['output/abcdefabcdef/batch_input_20261201-100000.jsonl.out'] lacks 'done'"),
]


@pytest.mark.parametrize("content, problem", FILE_PROBLEMS)
def test_a_damaged_file_names_what_is_wrong(tmp_path, content, problem):
    assert refusal(tmp_path, content) == problem


def test_a_missing_or_unreadable_file_says_what_to_do(tmp_path):
    path = tmp_path / "batch_job_info.json"
    with pytest.raises(common.StepError) as caught:
        jobinfo.load(path)
    assert (str(caught.value), caught.value.exit_code) == (f"{path} not found — run 01_create_job.py first",
                                                           common.EXIT_USAGE)
    path.write_text('{"version": 2,')
    with pytest.raises(common.StepError) as caught:
        jobinfo.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path} is not valid JSON (") and caught.value.exit_code == common.EXIT_USAGE
    assert message.endswith(") — restore it, or remove it and run 01_create_job.py again")


def test_a_run_in_a_nested_folder_is_read(tmp_path):
    """The manifests of a run on `2024/cats/` live in that folder: they are this tool's own."""
    info = copy.deepcopy(VALID)
    job = info["jobs"][0]
    job.update(input_folder="2024/cats/", input_s3_uri="s3://source-x/2024/cats/")
    job["manifests"][0]["s3_key"] = "2024/cats/batch_input_20261201-100000.jsonl"
    path = tmp_path / "batch_job_info.json"
    path.write_text(json.dumps(info))
    assert jobinfo.load(path) == info
    job["manifests"][0]["s3_key"] = "2024/batch_input_20261201-100000.jsonl"  # one folder up: not this job's
    assert "not a manifest of this tool in '2024/cats/'" in refusal(tmp_path, info)


# ------------------------------------------------------------------------------------------------------------------
# Saving: a file a person can read and edit
# ------------------------------------------------------------------------------------------------------------------


def test_the_file_is_saved_indented_with_its_characters_as_they_are(tmp_path):
    info = copy.deepcopy(VALID)
    info["source_prefix"] = "写真/été/"
    path = tmp_path / "batch_job_info.json"
    jobinfo.save(path, info)
    text = path.read_text(encoding="utf-8")
    assert text.startswith('{\n  "version": 2,\n  "region": "us-east-1",\n')
    assert '\n  "source_prefix": "写真/été/",\n' in text
    assert '\n  "jobs": [\n    {\n      "job_name": ' in text
    assert text.endswith("\n}\n")
    assert jobinfo.load(path) == info


@pytest.fixture
def ascii_locale():
    """A machine whose locale is not UTF-8 (LC_CTYPE=C without Python's coercion, as a service may start)."""
    before = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    yield
    locale.setlocale(locale.LC_CTYPE, before)


def test_the_file_is_read_as_utf_8_whatever_the_locale(tmp_path, ascii_locale):
    info = copy.deepcopy(VALID)
    info["source_prefix"] = "写真/été/"
    path = tmp_path / "batch_job_info.json"
    jobinfo.save(path, info)
    assert jobinfo.load(path)["source_prefix"] == "写真/été/"


def test_a_save_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "batch_job_info.json"
    jobinfo.save(path, VALID)

    def full_disk(target, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jobinfo.common, "atomic_write", full_disk)
    with pytest.raises(common.StepError) as caught:
        jobinfo.save(path, {"version": 3})
    assert caught.value.exit_code == common.EXIT_USAGE
    assert str(caught.value) == (f"cannot save {path}: No space left on device — free some disk space, then run the "
                                 f"step again (files are written whole or not at all) ({path} still holds the state "
                                 "before this change)")
    assert jobinfo.load(path) == VALID


# ------------------------------------------------------------------------------------------------------------------
# The run's other files, and what the steps ask of the file
# ------------------------------------------------------------------------------------------------------------------


def test_a_runs_files_live_beside_the_job_info_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert jobinfo.run_folder("batch_job_info.json", VALID) == tmp_path.resolve() / "runs" / "20261201-100000"
    assert jobinfo.run_folder(tmp_path / "state" / "x.json", {}) == tmp_path.resolve() / "state" / "runs" / "earlier"


def test_the_job_ids_are_the_arns_and_names_the_file_holds(tmp_path):
    path = tmp_path / "batch_job_info.json"
    assert jobinfo.exists(path) is False
    assert jobinfo.job_ids(path) == set()
    info = copy.deepcopy(VALID)
    second = copy.deepcopy(info["jobs"][0])
    second["job_name"] = "nova-mme-embedding-20261201-100000-2"
    for name in ("job_arn", "job_id", "status"):  # its submit answer was lost: only its name is known
        del second[name]
    info["jobs"].append(second)
    jobinfo.save(path, info)
    assert jobinfo.exists(str(path)) is True
    assert jobinfo.job_ids(str(path)) == {"arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/abcdefabcdef",
                                          "nova-mme-embedding-20261201-100000", "nova-mme-embedding-20261201-100000-2"}


def test_wait_lock_is_a_flag_with_its_help():
    parser = argparse.ArgumentParser(prog="x", formatter_class=lambda prog: argparse.HelpFormatter(prog, width=200))
    jobinfo.lock_args(parser)
    assert parser.parse_args([]).wait_lock is False
    assert parser.parse_args(["--wait-lock"]).wait_lock is True
    assert "  --wait-lock  when another step is working on the run, wait for it instead of exiting 7\n" in \
        parser.format_help()


# ------------------------------------------------------------------------------------------------------------------
# The lock as another step meets it
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def other_step(tmp_path):
    """Another step's hold of the lock (a file description of its own: flock tells it from this process's),
    with what it wrote in the lock file."""

    def hold(content: str) -> int:
        fd = os.open(tmp_path / "batch_job_info.json.lock", os.O_RDWR | os.O_CREAT, 0o644)
        opened.append(fd)
        os.write(fd, content.encode())
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd

    opened: list[int] = []
    yield hold
    for fd in opened:
        os.close(fd)


@pytest.mark.parametrize("content, holder", [
    ('{"pid": 4242, "step": "02_monitor_job.py", "since": "2026-12-01T10:00:00+00:00"}',
     "02_monitor_job.py (pid 4242, since 2026-12-01T10:00:00+00:00)"),
    ('{"pid": 4242}', "another step"), ("[1, 2]", "another step"), ('"02"', "another step"), ("", "another step"),
    ("{not json", "another step"),
])
def test_a_held_lock_names_its_holder(tmp_path, other_step, content, holder):
    path = tmp_path / "batch_job_info.json"
    other_step(content)
    with pytest.raises(common.StepError) as caught:
        with jobinfo.locked(path, "03_load_result_to_s3_vector_bucket.py"):
            pass
    assert caught.value.exit_code == common.EXIT_LOCKED
    assert str(caught.value) == (f"{holder} is working on {path} (lock batch_job_info.json.lock) — let it finish, or "
                                 "run this step with --wait-lock to wait for it")


def test_the_lock_file_names_the_step_holding_it(tmp_path):
    path = tmp_path / "batch_job_info.json"
    with jobinfo.locked(path, "01_create_job.py"):
        about = json.loads((tmp_path / "batch_job_info.json.lock").read_text())
    assert (about["step"], about["pid"], about["leases"]) == ("01_create_job.py", os.getpid(), [])
    assert (tmp_path / "batch_job_info.json.lock").read_text() == ""  # emptied when let go


# ------------------------------------------------------------------------------------------------------------------
# The lease on the source prefix, taken under the lock (S3 in this process: moto)
# ------------------------------------------------------------------------------------------------------------------

LEASE_KEY = "2024/.bedrock-batch-embeddings.lease"


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def s3(monkeypatch):
    from moto import mock_aws

    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="source-x")
        yield client


def the_lease(s3) -> dict:
    return json.loads(s3.get_object(Bucket="source-x", Key=LEASE_KEY)["Body"].read())


def lease_keys(s3) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket="source-x").get("Contents", [])]


def test_a_claim_takes_the_lease_once_and_the_lock_lets_it_go(tmp_path, s3):
    path = tmp_path / "batch_job_info.json"
    clock = Clock(1_800_000_000.0)
    with jobinfo.locked(path, "02_monitor_job.py"):
        jobinfo.claim(path, s3, "source-x", "2024/", "123456789012", clock=clock)
        first = the_lease(s3)
        jobinfo.claim(path, s3, "source-x", "2024/", "123456789012", clock=clock)  # the same lease, not a second
        assert the_lease(s3) == first
        assert lease_keys(s3) == [LEASE_KEY]
        assert (first["step"], first["job_info"], first["until"]) == ("02_monitor_job.py", str(path.resolve()),
                                                                      "2027-01-15T14:00:00+00:00")
        assert json.loads((tmp_path / "batch_job_info.json.lock").read_text())["leases"] == [first["owner"]]
    assert lease_keys(s3) == []  # released with the lock


def test_a_claim_names_the_step_it_is_made_for(tmp_path, s3):
    path = tmp_path / "batch_job_info.json"
    with jobinfo.locked(path, "daily_run.py"):
        jobinfo.claim(path, s3, "source-x", "2024/", "123456789012", "03_load_result_to_s3_vector_bucket.py")
        assert the_lease(s3)["step"] == "03_load_result_to_s3_vector_bucket.py"


def test_a_claim_needs_the_lock(tmp_path, s3):
    with pytest.raises(RuntimeError, match="^jobinfo.claim needs the lock on the job-info file$"):
        jobinfo.claim(tmp_path / "batch_job_info.json", s3, "source-x", "2024/", "123456789012")
    assert lease_keys(s3) == []


def live_lease_left_by(s3, owner: str) -> None:
    until = datetime.now(timezone.utc) + timedelta(hours=5)
    s3.put_object(Bucket="source-x", Key=LEASE_KEY, Body=json.dumps({
        "owner": owner, "host": "builder", "job_info": "/elsewhere/batch_job_info.json", "step": "03_load.py",
        "pid": 999, "since": "2026-12-01T03:00:00+00:00", "until": until.isoformat(timespec="seconds")}))


def test_a_lease_a_killed_step_of_this_file_left_is_taken_back(tmp_path, s3, other_step, capsys):
    """The killed step's lock file still names its lease: the next step of the same file takes it over at once."""
    path = tmp_path / "batch_job_info.json"
    live_lease_left_by(s3, "deadbeef")
    fd = other_step(json.dumps({"pid": 999, "step": "03_load.py", "since": "2026-12-01T03:00:00+00:00",
                                "leases": ["deadbeef"]}))
    fcntl.flock(fd, fcntl.LOCK_UN)  # the killed step's lock went with it; its line stays in the file
    with jobinfo.locked(path, "04_remove_completed_task.py"):
        jobinfo.claim(path, s3, "source-x", "2024/", "123456789012")
        assert the_lease(s3)["step"] == "04_remove_completed_task.py"
    assert "Took over the lease s3://source-x/2024/.bedrock-batch-embeddings.lease that an earlier step of this " \
           "job-info file left: 03_load.py on builder" in capsys.readouterr().out


@pytest.mark.parametrize("leases", [None, {"deadbeef": 1}, "deadbeef", ["cafe"]])
def test_a_live_lease_not_named_in_the_lock_file_as_a_list_is_refused(tmp_path, s3, other_step, leases):
    path = tmp_path / "batch_job_info.json"
    live_lease_left_by(s3, "deadbeef")
    fd = other_step(json.dumps({"pid": 999, "step": "03_load.py", "since": "2026-12-01T03:00:00+00:00",
                                "leases": leases}))
    fcntl.flock(fd, fcntl.LOCK_UN)
    with pytest.raises(common.StepError) as caught:
        with jobinfo.locked(path, "04_remove_completed_task.py"):
            jobinfo.claim(path, s3, "source-x", "2024/", "123456789012")
    assert caught.value.exit_code == common.EXIT_LOCKED
    assert str(caught.value).startswith("03_load.py on builder for /elsewhere/batch_job_info.json (since ")
    assert the_lease(s3)["owner"] == "deadbeef"


def test_a_lock_file_that_cannot_take_the_lease_id_is_one_line(tmp_path, s3, monkeypatch):
    path = tmp_path / "batch_job_info.json"

    def full_disk(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(common.StepError) as caught:
        with jobinfo.locked(path, "02_monitor_job.py"), monkeypatch.context() as disk:
            disk.setattr(jobinfo.os, "pwrite", full_disk)
            jobinfo.claim(path, s3, "source-x", "2024/", "123456789012")
    assert caught.value.exit_code == common.EXIT_USAGE
    assert str(caught.value) == (f"cannot write the lock file {tmp_path / 'batch_job_info.json.lock'}: No space left "
                                 "on device — free some disk space, then run the step again (files are written whole "
                                 "or not at all)")
    assert lease_keys(s3) == []  # the lease taken was let go with the lock


def test_a_lease_lost_meanwhile_stops_the_step_at_its_next_save(tmp_path, s3):
    """Another run took the lease over while this step ran (it expired): the renewal finds out, and the next save
    in the step's own thread stops it (exit 7); a save from a worker thread only notes it."""
    path = tmp_path / "batch_job_info.json"
    clock = Clock(datetime.now(timezone.utc).timestamp())
    with jobinfo.locked(path, "03_load_result_to_s3_vector_bucket.py"):
        jobinfo.claim(path, s3, "source-x", "2024/", "123456789012", clock=clock)
        jobinfo.keep_leases()  # not due: nothing to do
        live_lease_left_by(s3, "another-run")
        clock.now += lease.RENEW_EVERY + 1
        worker_saw = []
        worker = threading.Thread(target=lambda: worker_saw.append(jobinfo.save(path, VALID)))
        worker.start()
        worker.join()
        assert worker_saw == [None] and jobinfo.load(path) == VALID  # saved, and no error in the worker
        with pytest.raises(common.StepError) as caught:
            jobinfo.save(path, VALID)
        assert caught.value.exit_code == common.EXIT_LOCKED
        assert str(caught.value).startswith(f"the lease s3://source-x/{LEASE_KEY} is now held by 03_load.py on builder")
        with pytest.raises(common.StepError):
            jobinfo.keep_leases()  # the steps' own renewals stop on it too
        jobinfo.keep_leases(raise_lost=False)
    assert the_lease(s3)["owner"] == "another-run"  # never overwritten, never deleted
