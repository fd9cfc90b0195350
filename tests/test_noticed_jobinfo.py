"""The job-info file as a step meets it after trouble: a save cut short (disk full, a kill) leaves the earlier file
whole; a file with negative counts or offsets is damaged (one line, exit 2); the lock names its holder even after
a holder was killed with a longer line in the lock file."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

import common
import jobinfo
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
import jobinfo
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
        code = (f"import jobinfo\ntry:\n    with jobinfo.locked({str(path)!r}, '02'):\n        pass\n"
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
