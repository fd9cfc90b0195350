"""The job-info file's owner: every field's type checked (a damaged file of any shape is one line and exit 2, never a
traceback, in every step), atomic saves, and the lock that lets one step at a time work on a run."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

import common
from batch_embeddings import jobinfo
from tests.conftest import ROOT, import_step

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
OTHER_VALUES = [None, -1, 1.5, True, "text", [1], {"a": 1}]


def paths(node, prefix=()):
    """Every (path) to a value in the JSON tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield prefix + (key,)
            yield from paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield prefix + (i,)
            yield from paths(value, prefix + (i,))


def mutations():
    """The valid file changed one field at a time: removed, or given a value of another shape; and truncated."""
    for path in paths(VALID):
        parent_path, last = path[:-1], path[-1]
        removed = copy.deepcopy(VALID)
        parent = removed
        for part in parent_path:
            parent = parent[part]
        del parent[last]
        yield "/".join(map(str, path)) + " removed", json.dumps(removed)
        for value in OTHER_VALUES:
            changed = copy.deepcopy(VALID)
            parent = changed
            for part in parent_path:
                parent = parent[part]
            if type(parent[last]) is type(value) and parent[last] == value:
                continue
            parent[last] = value
            yield f"{'/'.join(map(str, path))}={json.dumps(value)}", json.dumps(changed)
    text = json.dumps(VALID, indent=2)
    for cut in range(0, len(text), max(1, len(text) // 25)):
        yield f"truncated at {cut}", text[:cut]
    yield "not JSON", "\x00\xff garbage"
    yield "a list", "[]"


def test_the_valid_file_loads(tmp_path):
    path = tmp_path / "batch_job_info.json"
    jobinfo.save(path, VALID)
    assert jobinfo.load(path) == VALID
    assert path.read_text().endswith("}\n")


@pytest.mark.parametrize("field, value, problem", [
    ("load", [], "jobs[0].load is [], not an object"),
    ("job_arn", 12, "jobs[0].job_arn is 12, not a string"),
    ("record_count", "100", 'jobs[0].record_count is "100", not a whole number'),
    ("embedding_dimension", 3000, "jobs[0] has embedding_dimension 3000 and record_count 100"),
    ("output_s3_uri", None, "jobs[0].output_s3_uri is null, not a string"),
    ("uploaded", 1, "jobs[0].uploaded is 1, not true/false"),
    ("record_count", True, "jobs[0].record_count is true, not a whole number"),
])
def test_a_wrong_type_names_the_field(tmp_path, field, value, problem):
    info = copy.deepcopy(VALID)
    info["jobs"][0][field] = value
    path = tmp_path / "batch_job_info.json"
    path.write_text(json.dumps(info))
    with pytest.raises(common.StepError) as caught:
        jobinfo.load(path)
    assert caught.value.exit_code == common.EXIT_USAGE
    assert str(caught.value) == (f"{path} is damaged: {problem} — restore it, or remove it and run 01_create_job.py "
                                 "again (04_remove_completed_task.py --force cannot read it either)")


def test_a_load_checkpoint_without_its_counts_is_damaged(tmp_path):
    info = copy.deepcopy(VALID)
    info["jobs"][0]["load"]["counts"] = {"inserted": 1}
    path = tmp_path / "batch_job_info.json"
    path.write_text(json.dumps(info))
    with pytest.raises(common.StepError, match="jobs\\[0\\].load.counts must hold error, inserted, success, total"):
        jobinfo.load(path)


@pytest.fixture
def dead_aws(monkeypatch, tmp_path):
    """Settings for the steps, with every AWS endpoint a closed port: a step that gets past the file fails fast."""
    monkeypatch.chdir(tmp_path)
    for name in [n for n in list(__import__("os").environ) if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    settings = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "AWS_MAX_ATTEMPTS": "1",
        "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "SOURCE_BUCKET": "source-x", "RESULT_BUCKET": "result-x", "VECTOR_BUCKET": "vectors-x",
        "VECTOR_INDEX": "images-x", "ROLE_ARN": "arn:aws:iam::123456789012:role/BedrockBatchInferenceRole",
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    return tmp_path


STEP_ARGS = {1: [], 2: ["--no-wait"], 3: [], 4: []}


def test_a_damaged_file_of_any_shape_never_gives_a_traceback(dead_aws, capsys):
    steps = {number: import_step(number) for number in STEP_ARGS}
    path = dead_aws / "batch_job_info.json"
    refused = accepted = 0
    for name, text in mutations():
        path.write_text(text)
        try:
            jobinfo.load(path)
        except common.StepError as exc:
            assert exc.exit_code == common.EXIT_USAGE, name
            refused += 1
            numbers = [2]  # every step reads the file through jobinfo.load first: one stands for all
        else:
            accepted += 1
            numbers = list(STEP_ARGS)
        for number in numbers:
            code = steps[number].main(STEP_ARGS[number])  # an unexpected exception fails the test here
            out, err = capsys.readouterr()
            assert "Traceback" not in out + err, name
            if numbers == [2]:  # refused by the file check: exit 2 and its one line
                assert code == common.EXIT_USAGE and err.startswith("error: batch_job_info.json "), (name, number, err)
            # 02 --no-wait only looks: a run with a job not yet submitted is still going (3), without asking AWS
            assert code in (common.EXIT_OK, common.EXIT_ERROR, common.EXIT_USAGE, common.EXIT_REFUSED) or \
                (number == 2 and code == common.EXIT_RUNNING), (name, code)
            assert code in (common.EXIT_OK, common.EXIT_RUNNING) or (err.count("\n") == 1 and err.startswith("error: ")), \
                (name, number, err)
    assert refused > 150 and accepted > 20  # both kinds were exercised


def hold_lock(path, step="a test"):
    """A process that holds the run's lock until its stdin closes; returns once the lock is held."""
    code = ("import sys\nfrom batch_embeddings import jobinfo\n"
            f"with jobinfo.locked({str(path)!r}, {step!r}):\n"
            "    print('held', flush=True)\n"
            "    sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_the_lock_names_its_holder_and_goes_with_the_process(tmp_path):
    path = tmp_path / "batch_job_info.json"
    holder = hold_lock(path, "02_monitor_job.py")
    with pytest.raises(common.StepError) as caught:
        with jobinfo.locked(path, "03"):
            pass
    assert caught.value.exit_code == common.EXIT_LOCKED == 7
    assert str(caught.value).startswith(f"02_monitor_job.py (pid {holder.pid}, since ")
    holder.kill()  # however the holder ends, the lock goes with it
    holder.wait()
    with jobinfo.locked(path, "03"):
        with jobinfo.locked(path, "03 again, in the same process"):  # re-entrant: daily_run.py holds it for its steps
            pass


def test_wait_lock_waits_until_the_holder_ends(tmp_path):
    path = tmp_path / "batch_job_info.json"
    holder = hold_lock(path)
    waits = []

    def sleep(seconds):  # the lock is polled: the holder ends during the first wait
        waits.append(seconds)
        holder.stdin.close()
        holder.wait()

    with jobinfo.locked(path, "04", wait=True, sleep=sleep):
        pass
    assert len(waits) >= 1
