"""Local trouble is one line and a documented exit code, never a traceback, and leaves no half-written state: a
folder in place of the lock file, a read-only work folder, a full disk while the lock is taken, the job file
saved or step 3 loads, a symlinked job file, `--interval nan` / `--timeout nan`, a bad byte or size in an
inventory CSV, S3 keys that hold terminal escape codes, and --help on an 80-column terminal."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys

import orjson
import pytest

import common
from batch_embeddings import jobinfo, monitor
from tests.conftest import ROOT, STEPS, import_step
from tests.test_inventory import KEYS, bucket, publish  # noqa: F401 (bucket is a fixture)

INFO = {"region": "us-east-1", "account_id": "123456789012", "source_bucket": "source-x", "source_prefix": "2024/",
        "result_bucket": "result-x", "jobs": [{
            "job_name": "nova-mme-embedding-20261201-030000", "input_folder": "2024/",
            "input_s3_uri": "s3://source-x/2024/", "output_s3_uri": "s3://result-x/output/",
            "model_id": "amazon.nova-2-multimodal-embeddings-v1:0",
            "role_arn": "arn:aws:iam::123456789012:role/BedrockBatchInferenceRole", "embedding_dimension": 256,
            "record_count": 100, "client_request_token": "t0", "status": "Completed",
            "job_arn": "arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/abcdefghijkl",
            "manifests": [{"local_path": "runs/x/batch_input_20261201-030000.jsonl",
                           "s3_key": "2024/batch_input_20261201-030000.jsonl"}]}]}


def one_line(result) -> str:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    return result.stderr.strip()


def enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_folder_in_place_of_the_lock_file_is_one_line(world):
    (world.cwd / "batch_job_info.json").write_text(json.dumps(INFO))
    (world.cwd / "batch_job_info.json.lock").mkdir()
    for number in (1, 3, 4):
        result = world.step(number)
        assert result.returncode == common.EXIT_USAGE, result.stderr
        assert one_line(result) == (f"error: cannot write the lock file {world.cwd / 'batch_job_info.json.lock'}: "
                                    "Is a directory — move what is in its place out of the way, then run the step "
                                    "again")


@pytest.mark.parametrize("code, remedy", [(errno.EROFS, "run the step from a writable folder"),
                                          (errno.EACCES, "check the folder's permissions")])
def test_a_read_only_work_folder_is_one_line(tmp_path, monkeypatch, capsys, code, remedy):
    """The tests run as root, whom a read-only mode does not stop: the folder's answer is injected."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "batch_job_info.json").write_text(json.dumps(INFO))
    real = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise OSError(code, os.strerror(code), str(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(jobinfo.os, "open", read_only)
    assert import_step(4).main([]) == common.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: cannot write the lock file {tmp_path}/batch_job_info"
                                                   f".json.lock: {os.strerror(code)} — {remedy}")


def test_a_full_disk_while_the_lock_is_taken_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "batch_job_info.json").write_text(json.dumps(INFO))
    monkeypatch.setattr(jobinfo.os, "pwrite", enospc)
    assert import_step(3).main(["--vector-bucket", "vectors-x", "--vector-index", "images-x"]) == common.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "batch_job_info.json.lock: No space left on device — free some disk space" in err
    monkeypatch.undo()
    with jobinfo.locked(tmp_path / "batch_job_info.json", "next"):  # the lock was let go
        pass


def test_a_full_disk_while_saving_leaves_the_job_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "batch_job_info.json"
    jobinfo.save(path, INFO)
    before = path.read_bytes()
    monkeypatch.setattr(os, "fsync", enospc)  # the disk fills while the new version is written
    changed = dict(INFO, jobs=[dict(INFO["jobs"][0], status="Failed")])
    with pytest.raises(common.StepError) as caught:
        jobinfo.save(path, changed)
    assert caught.value.exit_code == common.EXIT_USAGE
    assert str(caught.value) == (f"cannot save {path}: No space left on device — free some disk space, then run the "
                                 "step again (files are written whole or not at all) "
                                 f"({path} still holds the state before this change)")
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_full_disk_during_03_stops_it_in_one_line_and_a_rerun_loads_everything(world, monkeypatch, capsys):
    world.put_images([f"a/img-{i:03d}.png" for i in range(100)], prefix="2024/")
    assert world.step(1).returncode == 0
    waited = world.step(2, "--wait", "--interval", "0.05", "--timeout", "120")
    assert waited.returncode == 0, waited.stdout + waited.stderr
    path = world.cwd / "batch_job_info.json"
    before = path.read_bytes()
    for name, value in world.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(world.cwd)
    monkeypatch.setattr(os, "fsync", enospc)
    assert import_step(3).main([]) == common.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot save batch_job_info.json: No space left on device "
                                                   "— free some disk space"), err
    assert path.read_bytes() == before  # no checkpoint half-written
    assert not [p for p in world.cwd.rglob("*.tmp")]
    monkeypatch.undo()
    loaded = world.step(3)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert len(world.index_keys()) == 100


def test_a_symlinked_job_file_stays_a_link_and_keeps_its_lock(tmp_path):
    target = tmp_path / "state" / "batch_job_info.json"
    target.parent.mkdir()
    jobinfo.save(target, INFO)
    link = tmp_path / "batch_job_info.json"
    link.symlink_to(target)
    lock = jobinfo.lock_file(link)
    with jobinfo.locked(link, "02"):
        jobinfo.save(link, dict(INFO, run="20261202-030000"))
    assert link.is_symlink() and jobinfo.load(target)["run"] == "20261202-030000"
    assert jobinfo.lock_file(link) == lock == target.with_name("batch_job_info.json.lock")


@pytest.mark.parametrize("script, flag", [(STEPS[2], "--interval"), (STEPS[2], "--timeout"),
                                          ("daily_run.py", "--interval"), ("daily_run.py", "--timeout")])
def test_nan_seconds_are_refused_before_anything_runs(tmp_path, script, flag):
    result = subprocess.run([sys.executable, str(ROOT / script), flag, "nan"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert result.returncode == common.EXIT_USAGE
    assert "Traceback" not in result.stderr and result.stdout == ""
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"{script}: error: ") and flag in last and ("nan" in last or "number of seconds" in last)
    assert not list(tmp_path.iterdir())  # no lock file, no job file


def replace_data_file(world, uri: str, body: bytes) -> None:
    s3 = world.client("s3")
    manifest_key = uri.split("/", 3)[3]
    manifest = orjson.loads(s3.get_object(Bucket=world.result_bucket, Key=manifest_key)["Body"].read())
    s3.put_object(Bucket=world.result_bucket, Key=manifest["files"][1]["key"], Body=body)
    manifest["files"][1].update(size=len(body), MD5checksum=hashlib.md5(body).hexdigest())
    s3.put_object(Bucket=world.result_bucket, Key=manifest_key, Body=orjson.dumps(manifest))


@pytest.mark.parametrize("row, message", [
    (b'"{b}","2024/a/caf\xe9.png","v1","true","false","12","2026-12-01T00:00:00Z","etag","STANDARD"\n',
     "inventory-1: a byte that is not UTF-8 (b'\\xe9'; S3 writes inventory CSV in UTF-8)"),
    (b'"{b}","2024/a/x.png","v1","true","false","12 KB","2026-12-01T00:00:00Z","etag","STANDARD"\n',
     "inventory-1 row 2: Size '12 KB' is not a number of bytes (key 2024/a/x.png)"),
])
def test_a_bad_byte_or_size_in_an_inventory_csv_is_one_line(bucket, tmp_path, row, message):  # noqa: F811
    uri = publish(bucket, "csv", tmp_path)
    good = f'"{bucket.source_bucket}","2024/a/ok.png","v1","true","false","12","2026-12-01T00:00:00Z","e","S"\n'
    replace_data_file(bucket, uri, good.encode() + row.replace(b"{b}", bucket.source_bucket.encode()))
    result = bucket.step(1, "--dry-run", "--inventory", uri)
    assert result.returncode == common.EXIT_USAGE, result.stdout + result.stderr
    assert message in one_line(result)
    assert not list(bucket.cwd.rglob("batch_input_*"))


def test_keys_with_terminal_escape_codes_are_printed_escaped(world):
    world.put_images([f"a/img-{i:03d}.png" for i in range(100)], prefix="2024/")
    s3 = world.client("s3")
    s3.put_object(Bucket=world.source_bucket, Key="2024/\x1b[2J\x1b]0;owned\x07notes.txt", Body=b"text")
    planned = world.step(1, "--dry-run")
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert "\x1b" not in planned.stdout and "\x07" not in planned.stdout
    assert "    - 2024/\\x1b[2J\\x1b]0;owned\\x07notes.txt" in planned.stdout.splitlines()


@pytest.mark.parametrize("script", [*(STEPS[n] for n in sorted(STEPS)), "daily_run.py"])
def test_help_fits_an_80_column_terminal(script):
    shown = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                           timeout=60, env={**os.environ, "COLUMNS": "80"})
    assert shown.returncode == 0
    text = shown.stdout.split("\n\n", 1)[1]  # after the usage block, whose long metavars argparse cannot break
    too_long = [line for line in text.splitlines() if len(line) > 80]
    assert not too_long, too_long
    assert "exit status (the same for every step):" in text and "  7    another step holds the lock" in text


def test_02_s_status_block_marks_a_cut_line():
    import io

    out = io.StringIO()
    display = monitor.Display(out=out, tty=True, size=lambda: os.terminal_size((30, 10)))
    display.show("", ["Message: " + "x" * 60, "short"])
    assert out.getvalue() == "Message: " + "x" * 19 + "…\nshort\n"
    assert all(len(line) <= 29 for line in out.getvalue().splitlines())
