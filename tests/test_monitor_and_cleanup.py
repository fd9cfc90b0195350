"""02_monitor_job.py and 04_remove_completed_task.py: statuses, the y/n prompt, exit codes, what is removed."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

import common
from tests.conftest import ROOT, STEPS

ACCOUNT = "123456789012"


def submit(world, images: int = 100, **emulator_options) -> dict:
    world.emulator("/_emulator/config", {"step_seconds": 0.02, **emulator_options})
    world.put_images([f"img-{i}.png" for i in range(images)], prefix="2024/")
    created = world.step(1)
    assert created.returncode == 0, created.stdout + created.stderr
    return world.job_info()["jobs"][0]


def status_of(world, job) -> str:
    return world.client("bedrock").get_model_invocation_job(jobIdentifier=job["job_arn"])["status"]


def test_prompt_answered_y_on_a_terminal_polls_until_completed(world):
    job = submit(world, step_seconds=1.0)  # still running when the prompt comes, even on a loaded machine
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, str(ROOT / STEPS[2]), "--interval", "0.2"], cwd=world.cwd,
                               env=world.env, stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 60
    answered = False
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        if not answered and b"Monitor until completion? (y/n): " in seen:
            os.write(leader, b"y\n")
            answered = True
        if process.poll() is not None and not ready:
            break
    process.wait(timeout=30)
    os.close(leader)
    text = seen.decode()
    assert answered, text
    assert process.returncode == 0, text
    assert "[Poll #2]" in text and ">>> STATUS: Completed <<<" in text
    assert "✓ Job completed successfully!" in text
    assert status_of(world, job) == "Completed"


def test_without_a_terminal_it_never_prompts(world):
    job = submit(world, step_seconds=1.0)
    result = world.step(2, input="")
    assert result.returncode == 3
    assert "Monitor until completion" not in result.stdout
    assert f"Job is {status_of(world, job)}" in result.stdout or "Run 02_monitor_job.py again later" in result.stdout
    assert common.object_exists(world.client("s3"), world.source_bucket, job["manifests"][0]["s3_key"], ACCOUNT)


def test_timeout_leaves_the_job_running(world):
    job = submit(world, step_seconds=2.0)
    result = world.step(2, "--wait", "--interval", "0.1", "--timeout", "0.5")
    assert result.returncode == 3
    assert "Timed out after 0.5s" in result.stdout
    assert status_of(world, job) not in common.TERMINAL_STATUSES


@pytest.mark.parametrize(
    "options, status, code",
    [
        ({"final_status": "Failed"}, "Failed", 5),
        ({"final_status": "Expired"}, "Expired", 5),
        ({"drop_keys_regex": "img-1[0-9]\\.png"}, "PartiallyCompleted", 4),
    ],
)
def test_every_terminal_status_ends_the_loop_with_its_exit_code(world, options, status, code):
    job = submit(world, **options)
    result = world.step(2, "--wait", "--interval", "0.05", "--timeout", "60")
    assert result.returncode == code, result.stdout + result.stderr
    assert f">>> STATUS: {status} <<<" in result.stdout
    assert not common.object_exists(world.client("s3"), world.source_bucket, job["manifests"][0]["s3_key"], ACCOUNT)
    if status == "Failed":
        assert "Message: " in result.stdout


def test_stopped_job(world):
    job = submit(world, step_seconds=1.0)
    world.client("bedrock").stop_model_invocation_job(jobIdentifier=job["job_arn"])
    result = world.step(2, "--wait", "--interval", "0.2", "--timeout", "60")
    assert result.returncode == 5
    assert ">>> STATUS: Stopped <<<" in result.stdout


def test_ctrl_c_stops_monitoring_and_leaves_the_job_running(world):
    job = submit(world, step_seconds=5.0)
    process = subprocess.Popen([sys.executable, str(ROOT / STEPS[2]), "--wait", "--interval", "30"], cwd=world.cwd,
                               env=world.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    out = ""
    while "Next check in" not in out and time.monotonic() < deadline:
        out += process.stdout.readline()
    process.send_signal(signal.SIGINT)
    rest, err = process.communicate(timeout=30)
    assert process.returncode == 130
    assert "Stopped monitoring; the job keeps running." in out + rest
    assert "Traceback" not in err
    assert status_of(world, job) not in common.TERMINAL_STATUSES
    assert (world.cwd / "batch_job_info.json").exists()


def test_01_refuses_to_replace_a_running_job_unless_forced(world):
    job = submit(world, step_seconds=5.0)
    again = world.step(1)
    assert again.returncode == 1
    assert f"holds a run that has not finished ({job['job_name']} is" in again.stderr
    assert world.job_info()["jobs"][0]["job_arn"] == job["job_arn"]


def test_01_refuses_to_replace_a_run_whose_results_are_not_loaded(world):
    job = submit(world)
    assert world.step(2, "--wait", "--interval", "0.05", "--timeout", "60").returncode == 0
    again = world.step(1)
    assert again.returncode == 1
    assert f"{job['job_name']} ended Completed but is not loaded" in again.stderr
    assert world.job_info()["jobs"][0]["job_arn"] == job["job_arn"]


def test_04_refuses_while_the_job_runs_unless_forced(world):
    job = submit(world, step_seconds=5.0)
    running = world.step(4)
    assert running.returncode == 1 and "is still" in running.stderr
    assert (world.cwd / "batch_job_info.json").exists()
    forced = world.step(4, "--force")
    assert forced.returncode == 0, forced.stderr
    assert not (world.cwd / "batch_job_info.json").exists()
    assert not list(world.cwd.glob("batch_input_*.jsonl"))
    assert not common.object_exists(world.client("s3"), world.source_bucket, job["manifests"][0]["s3_key"], ACCOUNT)
    assert common.object_exists(world.client("s3"), world.source_bucket, "2024/img-0.png", ACCOUNT)


def test_04_refuses_until_the_results_are_loaded(world):
    submit(world)
    assert world.step(2, "--wait", "--interval", "0.05", "--timeout", "60").returncode == 0
    not_loaded = world.step(4)
    assert not_loaded.returncode == 1 and "not loaded yet" in not_loaded.stderr
    assert (world.cwd / "batch_job_info.json").exists()
    assert world.step(3).returncode == 0
    cleaned = world.step(4)
    assert cleaned.returncode == 0, cleaned.stderr
    assert "(No S3 JSONL files left to remove)" in cleaned.stdout  # 02 removed it when the job ended
    assert "Local files removed: 2" in cleaned.stdout
