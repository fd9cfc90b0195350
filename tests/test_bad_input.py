"""Bad input gets one clear line on stderr, a non-zero exit, and no lost or half-written state."""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import common

ACCOUNT = "123456789012"


def one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_every_missing_setting_is_named_at_once(world):
    result = world.step(1, env={"SOURCE_BUCKET": "", "ROLE_ARN": "", "RESULT_BUCKET": ""})
    assert result.returncode == 2
    line = one_line(result)
    for name in ("SOURCE_BUCKET", "RESULT_BUCKET", "ROLE_ARN"):
        assert f"{name} is not set" in line


def test_invalid_settings_are_named(world):
    result = world.step(1, env={"EMBEDDING_DIMENSION": "512", "ROLE_ARN": "not-an-arn"})
    assert result.returncode == 2
    line = one_line(result)
    assert "EMBEDDING_DIMENSION='512'" in line and "ROLE_ARN='not-an-arn'" in line


def test_dotenv_is_read_and_environment_and_flags_win(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("SOURCE_BUCKET=from-dotenv\nEMBEDDING_DIMENSION=384\nVECTOR_INDEX=dotenv-index\n")
    monkeypatch.chdir(tmp_path)
    for name in common.SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EMBEDDING_DIMENSION", "1024")
    parser = argparse.ArgumentParser()
    common.add_settings(parser, common.SETTINGS)
    config = common.load_config(parser.parse_args(["--vector-index", "flag-index"]))
    assert config.source_bucket == "from-dotenv"  # only in .env
    assert config.embedding_dimension == 1024  # the environment beats .env
    assert config.vector_index == "flag-index"  # a flag beats both
    assert config.result_prefix == "output/" and config.job_info_file.name == "batch_job_info.json"


@pytest.mark.parametrize("step", [2, 3, 4])
def test_missing_job_info(world, step):
    result = world.step(step)
    assert result.returncode == 2
    assert "batch_job_info.json not found — run 01_create_job.py first" in one_line(result)


@pytest.mark.parametrize("content", ["{not json", "[]", '{"jobs": []}', '{"jobs": [{"job_name": "x"}]}'])
@pytest.mark.parametrize("step", [2, 3, 4])
def test_malformed_job_info(world, step, content):
    (world.cwd / "batch_job_info.json").write_text(content)
    result = world.step(step)
    assert result.returncode == 2
    line = one_line(result)
    assert "batch_job_info.json" in line and ("is damaged: " in line or "not valid JSON" in line)
    assert (world.cwd / "batch_job_info.json").read_text() == content  # left as it was


def test_missing_source_bucket(world):
    result = world.step(1, env={"SOURCE_BUCKET": "no-such-bucket-here"})
    assert result.returncode == 1
    assert one_line(result).startswith("error: NoSuchBucket:")
    assert not list(world.cwd.rglob("batch_input_*"))
    assert not (world.cwd / "batch_job_info.json").exists()


class _Denied(BaseHTTPRequestHandler):
    def _deny(self):
        body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                b"<Message>Access Denied</Message></Error>")
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _deny

    def log_message(self, *args):
        pass


@pytest.fixture
def denying_s3():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Denied)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)  # a stop waits 0.02 s, not 0.5
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_access_denied_is_one_line_with_a_hint(world, denying_s3):
    result = world.step(1, env={"AWS_ENDPOINT_URL_S3": denying_s3})
    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith("error: AccessDenied: Access Denied (PutObject)")  # the first S3 call: the prefix's lease
    assert "--user-policy" in line
    assert not (world.cwd / "batch_job_info.json").exists()


def test_no_credentials(world):
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SESSION_TOKEN": ""}
    result = world.step(1, env=env)
    assert result.returncode == 1
    assert "no AWS credentials found" in one_line(result)


def test_prefix_that_bedrock_cannot_take_stops_before_upload(world):
    world.put_images([f"img{i}.png" for i in range(120)], prefix="my photos/")
    result = world.step(1, env={"SOURCE_PREFIX": "my photos/"})
    assert result.returncode == 2
    assert "cannot be a Bedrock input folder" in one_line(result)
    keys = [o["Key"] for o in world.client("s3").list_objects_v2(Bucket=world.source_bucket)["Contents"]]
    assert not [k for k in keys if k.endswith(".jsonl")]


def test_fewer_than_100_images_uploads_nothing(world):
    world.put_images([f"img{i}.png" for i in range(99)], prefix="2024/")
    result = world.step(1, env={"ON_DEMAND_MAX_IMAGES": "50"})  # within it, they go on demand (test_on_demand)
    assert result.returncode == common.EXIT_REFUSED
    assert "found 99 images" in one_line(result) and "at least 100" in result.stderr
    keys = [o["Key"] for o in world.client("s3").list_objects_v2(Bucket=world.source_bucket)["Contents"]]
    assert not [k for k in keys if k.endswith(".jsonl")]
    assert not list(world.cwd.rglob("batch_input_*")) and not (world.cwd / "batch_job_info.json").exists()
    jobs = world.client("bedrock").list_model_invocation_jobs()["invocationJobSummaries"]
    assert not [j for j in jobs if j["inputDataConfig"]["s3InputDataConfig"]["s3Uri"].startswith(
        f"s3://{world.source_bucket}/")]


def test_foreign_jsonl_is_named_and_never_deleted(world):
    world.put_images([f"img{i}.png" for i in range(100)], prefix="2024/")
    s3 = world.client("s3")
    s3.put_object(Bucket=world.source_bucket, Key="2024/sub/their-data.jsonl", Body=b"{}\n")
    s3.put_object(Bucket=world.source_bucket, Key="2024/batch_input_20240101-000000.jsonl", Body=b"{}\n")
    result = world.step(1)
    assert result.returncode == common.EXIT_REFUSED
    assert f"s3://{world.source_bucket}/2024/sub/their-data.jsonl" in one_line(result)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=world.source_bucket)["Contents"]}
    assert {"2024/sub/their-data.jsonl", "2024/batch_input_20240101-000000.jsonl"} <= keys


def test_dry_run_submits_nothing(world):
    world.put_images([f"a/img{i}.webp" for i in range(100)], prefix="2024/")
    result = world.step(1, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "Dry run: nothing uploaded, no job submitted" in result.stdout
    assert "Records: 100" in result.stdout
    first = json.loads(result.stdout.split("First record: ", 1)[1].splitlines()[0])
    assert first["modelInput"]["singleEmbeddingParams"]["image"]["format"] == "webp"
    assert first["modelInput"]["singleEmbeddingParams"]["image"]["source"]["s3Location"]["bucketOwner"] == ACCOUNT
    keys = [o["Key"] for o in world.client("s3").list_objects_v2(Bucket=world.source_bucket)["Contents"]]
    assert not [k for k in keys if k.endswith(".jsonl")]
    assert not list(world.cwd.rglob("batch_input_*")) and not (world.cwd / "batch_job_info.json").exists()


def test_a_role_bedrock_cannot_use_stops_01_with_what_to_do(world):
    world.put_images([f"img{i}.png" for i in range(100)], prefix="2024/")
    missing_role = "arn:aws:iam::123456789012:role/NoSuchRole"
    result = world.step(1, env={"ROLE_ARN": missing_role})
    assert result.returncode == 2  # checked before the upload (iam:GetRole): nothing uploaded, no job file
    line = one_line(result)
    assert line.startswith(f"error: ROLE_ARN {missing_role}: account 123456789012 has no role NoSuchRole — fix "
                           "ROLE_ARN")
    assert not (world.cwd / "batch_job_info.json").exists()
    fixed = world.step(1)  # with the right role from the environment, no --force needed
    assert fixed.returncode == 0, fixed.stderr
    assert world.job_info()["jobs"][0]["role_arn"] == world.role_arn
