"""Faults in the middle of each step: after each, running the same step again reaches the undisturbed end state."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import sys
import time

import pytest

from batch_embeddings import naming
from tests.conftest import ROOT, STEPS

FAST_FAIL = {"AWS_MAX_ATTEMPTS": "2"}


def one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def jsonl_in_bucket(world) -> list[str]:
    return [o["Key"] for o in world.client("s3").list_objects_v2(Bucket=world.source_bucket).get("Contents", [])
            if o["Key"].endswith(".jsonl")]


def interrupt_while_stalled(world, step: int, s3_url: str, marker: str, released: threading.Event) -> None:
    """Run a step with S3 behind a stalling proxy, press Ctrl-C once it prints `marker` and is waiting on S3, then
    let S3 answer again (`released`): the proxy answers one request at a time, and the step's clean-up on the way
    out (the lease's release) needs S3."""
    new_index = ["--new-index"] if step == 1 else []  # the world has no index yet: 01 asks for leave to create it
    process = subprocess.Popen([sys.executable, str(ROOT / STEPS[step]), *new_index], cwd=world.cwd,
                               env={**world.env, "AWS_ENDPOINT_URL_S3": s3_url}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    out = ""
    while marker not in out:
        line = process.stdout.readline()
        if not line:  # the step ended (or closed its output) before it reached the stall: fail now, not at the timeout
            _, err = process.communicate(timeout=60)
            pytest.fail(f"the step ended with exit {process.returncode} before printing {marker!r}:\n{out}{err}")
        out += line
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    released.set()
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err


def finish_run(world, expect_load: int = 0):
    monitored = world.step(2, "--wait", "--interval", "0.05", "--timeout", "60")
    assert monitored.returncode in (0, 4, 5), monitored.stdout + monitored.stderr
    loaded = world.step(3)
    assert loaded.returncode == expect_load, loaded.stdout[-2000:] + loaded.stderr
    return loaded


def test_network_failing_in_the_middle_of_the_listing(world, proxy):
    uris = world.put_images([f"img-{i:04d}.png" for i in range(1100)], prefix="2024/")  # two listing pages
    url = proxy(world.stack.moto_url, lambda method, path: "refuse" if "continuation-token" in path else None)
    failed = world.step(1, env={"AWS_ENDPOINT_URL_S3": url, **FAST_FAIL})
    assert failed.returncode == 1
    assert one_line(failed).startswith("error: ")
    assert not (world.cwd / "batch_job_info.json").exists() and not list(world.cwd.rglob("batch_input_*"))
    assert jsonl_in_bucket(world) == []

    assert world.step(1).returncode == 0
    finish_run(world)
    assert world.index_keys() == {naming.vector_key(u) for u in uris}


def test_network_failing_during_the_upload(world, proxy):
    uris = world.put_images([f"img-{i:03d}.png" for i in range(120)], prefix="2024/")
    url = proxy(world.stack.moto_url,
                lambda method, path: "refuse" if method == "PUT" and "batch_input_" in path else None)
    failed = world.step(1, env={"AWS_ENDPOINT_URL_S3": url, **FAST_FAIL})
    assert failed.returncode == 1 and one_line(failed).startswith("error: ")
    assert all(not job.get("job_arn") for job in world.job_info()["jobs"])  # the run is saved, queued

    resumed = world.step(1)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming the submission" in resumed.stdout
    finish_run(world)
    assert world.index_keys() == {naming.vector_key(u) for u in uris}


@pytest.mark.parametrize("forget_tokens", [False, True], ids=["token-remembered", "token-forgotten"])
def test_a_lost_answer_to_the_submit_never_makes_a_second_job(world, proxy, forget_tokens):
    world.put_images([f"img-{i:03d}.png" for i in range(120)], prefix="2024/")
    # A Bedrock that has forgotten the token starts a second job for a repeated submit: the job is looked for first.
    # The job stays Scheduled: still running when 01 comes back, it must be known as this job file's own job.
    world.emulator("/_emulator/config", {"forget_tokens": forget_tokens, "hold_scheduled": True})
    url = proxy(world.stack.bedrock_url,
                lambda method, path: "drop" if method == "POST" and path == "/model-invocation-job" else None)
    # One attempt: botocore's own retry would repeat the token at once, which a forgetful Bedrock takes as new.
    failed = world.step(1, env={"AWS_ENDPOINT_URL_BEDROCK": url, "AWS_MAX_ATTEMPTS": "1"})
    assert failed.returncode == 1 and one_line(failed).startswith("error: ")
    created = [j for j in world.emulator("/_emulator/jobs")["jobs"] if j["roleArn"] == world.role_arn]
    assert len(created) == 1  # it did reach Bedrock

    resumed = world.step(1)
    assert resumed.returncode == 0, resumed.stderr
    jobs = [j for j in world.emulator("/_emulator/jobs")["jobs"] if j["roleArn"] == world.role_arn]
    assert len(jobs) == 1 and world.job_info()["jobs"][0]["job_arn"] == jobs[0]["jobArn"]
    assert f"was already submitted (the answer was lost): {jobs[0]['jobArn']}" in resumed.stdout
    assert world.job_info()["jobs"][0]["status"] == "Submitted"


def test_network_failing_in_the_middle_of_the_load(world, proxy):
    uris = world.put_images([f"img-{i:04d}.png" for i in range(1200)], prefix="2024/")
    assert world.step(1).returncode == 0
    assert world.step(2, "--wait", "--interval", "0.05", "--timeout", "60").returncode == 0
    puts = []

    def fail(method, path):
        if path == "/PutVectors":
            puts.append(path)
            return "refuse" if len(puts) > 1 else None
        return None

    url = proxy(world.stack.s3vectors_url, fail)
    failed = world.step(3, "--retry-for", "1", env={"AWS_ENDPOINT_URL_S3VECTORS": url, **FAST_FAIL})
    assert failed.returncode == 1
    assert "nothing was dropped — run the step again to resume" in one_line(failed)
    confirmed = world.job_info()["jobs"][0]["load"]["counts"]["inserted"]
    assert confirmed == 500

    resumed = world.step(3)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"Resuming: {confirmed} vectors already confirmed" in resumed.stdout
    assert world.index_keys() == {naming.vector_key(u) for u in uris}
    assert world.vectors_accepted() == 1200  # the confirmed batch was not sent again


def test_credentials_expiring_mid_load(world, proxy):
    uris = world.put_images([f"img-{i:03d}.png" for i in range(120)], prefix="2024/")
    assert world.step(1).returncode == 0
    assert world.step(2, "--wait", "--interval", "0.05", "--timeout", "60").returncode == 0
    url = proxy(world.stack.moto_url,
                lambda method, path: "ExpiredToken" if method == "GET" and ".jsonl.out" in path else None)
    failed = world.step(3, env={"AWS_ENDPOINT_URL_S3": url})
    assert failed.returncode == 1
    assert "ExpiredToken" in one_line(failed) and "refresh your AWS credentials" in failed.stderr
    assert world.step(3).returncode == 0
    assert world.index_keys() == {naming.vector_key(u) for u in uris}


def test_ctrl_c_during_the_load_then_resume(world):
    uris = world.put_images([f"img-{i:04d}.png" for i in range(1500)], prefix="2024/")
    assert world.step(1).returncode == 0
    assert world.step(2, "--wait", "--interval", "0.05", "--timeout", "60").returncode == 0
    process = subprocess.Popen([sys.executable, str(ROOT / STEPS[3]), "--vectors-per-second", "300"],
                               cwd=world.cwd, env=world.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if world.job_info()["jobs"][0].get("load", {}).get("counts", {}).get("inserted", 0) >= 500:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "interrupted" in err and "Traceback" not in err
    resumed = world.step(3)
    assert resumed.returncode == 0 and "Resuming: " in resumed.stdout
    assert world.index_keys() == {naming.vector_key(u) for u in uris}


def test_a_truncated_last_line_is_accounted_for_and_retried(world):
    uris = world.put_images([f"img-{i:03d}.png" for i in range(120)], prefix="2024/")
    assert world.step(1).returncode == 0
    assert world.step(2, "--wait", "--interval", "0.05", "--timeout", "60").returncode == 0
    job = world.job_info()["jobs"][0]
    s3 = world.client("s3")
    key = next(o["Key"] for o in s3.list_objects_v2(Bucket=world.result_bucket)["Contents"]
               if o["Key"].endswith(".jsonl.out"))
    lines = s3.get_object(Bucket=world.result_bucket, Key=key)["Body"].read().splitlines(keepends=True)
    cut = json.loads(lines[-1])["modelInput"]["singleEmbeddingParams"]["image"]["source"]["s3Location"]["uri"]
    s3.put_object(Bucket=world.result_bucket, Key=key, Body=b"".join(lines[:-1]) + lines[-1][:500])

    loaded = world.step(3)
    assert loaded.returncode == 4
    assert "Images loaded: 119, failed: 0, missing: 1" in loaded.stdout
    account = world.account()
    assert [a["source_uri"] for a in account] == [cut]
    report = [json.loads(line) for line in (world.run_dir() / f"load_report_{job['job_id']}.jsonl").read_text().splitlines()]
    assert [r["error_code"] for r in report] == ["MalformedLine"]

    retried = world.step(1, "--retry-failed", "--on-demand")
    assert retried.returncode == 0, retried.stderr
    assert world.index_keys() == {naming.vector_key(u) for u in uris}


@pytest.mark.parametrize("final", ["Failed", "Expired"])
def test_a_job_that_produced_nothing_is_retried_whole(world, final):
    uris = world.put_images([f"img-{i:03d}.png" for i in range(110)], prefix="2024/")
    world.emulator("/_emulator/config", {"final_status": final})
    assert world.step(1).returncode == 0
    loaded = finish_run(world, expect_load=4)
    assert "Images loaded: 0, failed: 0, missing: 110" in loaded.stdout
    account = world.account()
    assert {a["status"] for a in account} == {"missing"} and all(final in a["error_message"] for a in account)

    world.emulator("/_emulator/config", {"final_status": None})
    assert world.step(1, "--retry-failed").returncode == 0
    finish_run(world)
    assert world.index_keys() == {naming.vector_key(u) for u in uris}


def test_throttled_submits_stay_queued_until_02_submits_them(world):
    uris = world.put_images([f"img-{i:03d}.png" for i in range(110)], prefix="2024/")
    world.emulator("/_emulator/config", {"throttle_create": 3})
    created = world.step(1, env=FAST_FAIL)
    assert created.returncode == 0, created.stderr
    assert "stays queued: ThrottlingException" in created.stdout
    assert not world.job_info()["jobs"][0].get("job_arn")
    finish_run(world)
    assert world.index_keys() == {naming.vector_key(u) for u in uris}


def test_a_hand_edited_job_info_stops_01_without_touching_anything(world):
    world.put_images([f"img-{i:03d}.png" for i in range(110)], prefix="2024/")
    (world.cwd / "batch_job_info.json").write_text('{"jobs": [{"job_name": "x"}]}')
    result = world.step(1)
    assert result.returncode == 2
    assert re.search(r"batch_job_info.json is damaged", one_line(result))
    assert jsonl_in_bucket(world) == []


def test_ctrl_c_during_the_listing_leaves_nothing_behind(world, proxy):
    world.put_images([f"img-{i:04d}.png" for i in range(1100)], prefix="2024/")
    released = threading.Event()

    def stall(method, path):
        if "continuation-token" in path:
            released.wait(60)  # until the step was interrupted: S3 answers no more meanwhile
        return None

    try:
        interrupt_while_stalled(world, 1, proxy(world.stack.moto_url, stall), "Listing images", released)
    finally:
        released.set()
    assert not (world.cwd / "batch_job_info.json").exists() and not list(world.cwd.rglob("batch_input_*"))
    assert jsonl_in_bucket(world) == []
    assert world.step(1).returncode == 0


def test_a_stopped_job_loads_what_it_produced_and_lists_the_rest(world):
    uris = world.put_images([f"img-{i:03d}.png" for i in range(150)], prefix="2024/")
    world.emulator("/_emulator/config", {"record_seconds": 0.02})
    assert world.step(1).returncode == 0
    job = world.job_info()["jobs"][0]
    bedrock = world.client("bedrock")
    deadline = time.monotonic() + 60
    while bedrock.get_model_invocation_job(jobIdentifier=job["job_arn"]).get("processedRecordCount", 0) < 20:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    bedrock.stop_model_invocation_job(jobIdentifier=job["job_arn"])
    assert world.step(2, "--wait", "--interval", "0.05", "--timeout", "60").returncode == 5
    loaded = world.step(3)
    assert loaded.returncode == 4
    done = len(world.index_keys())
    assert 20 <= done < 150
    assert f"Images loaded: {done}, failed: 0, missing: {150 - done}" in loaded.stdout
    account = world.account()
    assert all(a["status"] == "missing" and "Stopped" in a["error_message"] for a in account)
    assert {a["source_uri"] for a in account} | {u for u in uris if naming.vector_key(u) in world.index_keys()} \
        == set(uris)


def test_ctrl_c_during_the_clean_up_then_run_it_again(world, proxy):
    world.put_images([f"img-{i:03d}.png" for i in range(100)], prefix="2024/")
    assert world.step(1).returncode == 0
    finish_run(world)

    released = threading.Event()

    def stall(method, path):
        if method == "GET" and "batch_input_" in path:  # 04 asks whether the uploaded manifest is still there
            released.wait(60)  # until the step was interrupted
        return None

    try:
        interrupt_while_stalled(world, 4, proxy(world.stack.moto_url, stall), "Removing S3 JSONL files", released)
    finally:
        released.set()
    assert (world.cwd / "batch_job_info.json").exists()  # removed last: the clean-up can be run again
    cleaned = world.step(4)
    assert cleaned.returncode == 0, cleaned.stderr
    assert not (world.cwd / "batch_job_info.json").exists() and not list(world.cwd.rglob("batch_input_*"))
