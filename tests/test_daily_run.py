"""The daily run from cron: each kind of day of the README's table, run twice in a row (day one, day two), ends as
the table says with no manual step; two processes at once never make two jobs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import date

import pytest

from tests.standins import s3 as s3_standin
from tests.conftest import ROOT, STEPS

LOCK_HELD = re.compile(r"error: (daily_run|01_create_job)\.py \(pid \d+, since [0-9T:+-]+\) is working on "
                       r"batch_job_info\.json \(lock batch_job_info\.json\.lock\) — let it finish, or run this step "
                       r"with --wait-lock to wait for it\n")


def jobs(world) -> list[dict]:
    return world.emulator("/_emulator/jobs")["jobs"]


def s3_manifests(world) -> list[str]:
    listed = world.client("s3").list_objects_v2(Bucket=world.source_bucket).get("Contents", [])
    return [o["Key"] for o in listed if o["Key"].endswith(".jsonl")]


def uris(world, keys) -> set[str]:
    return {f"s3://{world.source_bucket}/2024/{key}" for key in keys}


def index_uris(world) -> set[str]:
    return {meta["source_uri"] for meta in world.index_metadata().values()}


def assert_clean(world) -> None:
    """What a finished day leaves: no job file, no manifest anywhere."""
    assert not (world.cwd / "batch_job_info.json").exists()
    assert s3_manifests(world) == []
    assert not list(world.cwd.rglob("batch_input_*.jsonl"))


def test_a_day_with_new_images_then_a_day_with_none(world):
    keys = [f"a/img-{i:03d}.png" for i in range(120)]
    world.put_images(keys, prefix="2024/")
    day1 = world.daily()
    assert day1.returncode == 0, day1.stdout + day1.stderr
    assert "✓ Results loaded successfully!" in day1.stdout and "✓ Cleanup completed successfully!" in day1.stdout
    assert index_uris(world) == uris(world, keys)
    assert_clean(world)
    assert not (world.cwd / "runs").exists() or not any((world.cwd / "runs").iterdir())  # no empty reports

    day2 = world.daily()
    assert day2.returncode == 0, day2.stdout + day2.stderr
    assert "✓ Nothing to do: no new images to embed" in day2.stdout
    assert "Left out 120 image(s): already in the vector index" in day2.stdout
    assert len(jobs(world)) == 1
    assert_clean(world)


def test_a_permanently_bad_image_is_submitted_once_then_left_out_then_retried(world):
    keys = [f"a/img-{i:03d}.png" for i in range(120)]
    world.put_images(keys, prefix="2024/")
    s3 = world.client("s3")
    s3.put_object(Bucket=world.source_bucket, Key="2024/a/notes.png", Body=b"a text file named .png")
    bad = f"s3://{world.source_bucket}/2024/a/notes.png"

    day1 = world.daily()
    assert day1.returncode == 4, day1.stdout + day1.stderr
    assert f"  {bad}: failed (400: " in day1.stdout
    assert "1 image(s) failed permanently (Bedrock refused the image itself)" in day1.stdout
    rejected = [json.loads(line) for line in (world.cwd / "failed_permanently.jsonl").read_text().splitlines()]
    assert [(r["source_uri"], r["failed_on"], r["size"]) for r in rejected] == [(bad, date.today().isoformat(), 22)]
    assert index_uris(world) == uris(world, keys)
    assert_clean(world)

    day2 = world.daily()
    assert day2.returncode == 0, day2.stdout + day2.stderr
    assert (f"Left out 1 image(s) that failed permanently on {date.today().isoformat()} — see "
            f"{world.cwd / 'failed_permanently.jsonl'}; --retry-failed tries them again") in day2.stdout
    assert "✓ Nothing to do: no new images to embed" in day2.stdout
    assert len(jobs(world)) == 1  # not submitted again

    retried = world.step(1, "--retry-failed", "--on-demand")
    assert retried.returncode == 4, retried.stdout + retried.stderr
    assert "Retrying the 1 image(s) the last runs did not load" in retried.stdout
    assert "Embedding 1 image(s) on demand" in retried.stdout
    assert f"  {bad}: failed (ValidationException: " in retried.stdout


def test_a_job_where_every_record_failed_is_not_remembered_as_permanent(world):
    """When every record of a job fails, the trouble is the job's (a model or role change), not each image's: no
    image is left out of later runs for it."""
    s3_standin.put_objects(world.source_bucket, ((f"2024/a/notes-{i:03d}.png", b"a text file named .png")
                                                 for i in range(120)))
    day1 = world.daily()
    assert day1.returncode == 4, day1.stdout + day1.stderr
    assert "Images loaded: 0, failed: 120, missing: 0" in day1.stdout
    assert "failed permanently" not in day1.stdout
    assert not (world.cwd / "failed_permanently.jsonl").exists()


def test_a_changed_image_that_failed_permanently_is_tried_again(world):
    keys = [f"a/img-{i:03d}.png" for i in range(120)]
    world.put_images(keys, prefix="2024/")
    s3 = world.client("s3")
    s3.put_object(Bucket=world.source_bucket, Key="2024/a/notes.png", Body=b"a text file named .png")
    assert world.daily().returncode == 4
    # The same size, another content: only the ETag tells it changed.
    s3.put_object(Bucket=world.source_bucket, Key="2024/a/notes.png", Body=b"A TEXT FILE NAMED .PNG")
    listed = world.step(1, "--dry-run")
    assert listed.returncode == 0  # one image to embed, no longer left out: too few for a job, so on demand
    assert "1 image(s) embedded on demand" in listed.stdout and "failed permanently" not in listed.stdout


def test_a_partially_completed_day_is_loaded_and_its_missing_images_go_into_the_next_run(world):
    done = [f"a/img-{i:03d}.png" for i in range(100)]
    dropped = [f"b/img-{i:03d}.png" for i in range(100)]
    world.put_images(done + dropped, prefix="2024/")
    world.emulator("/_emulator/config", {"drop_keys_regex": "2024/b/"})
    day1 = world.daily()
    assert day1.returncode == 4, day1.stdout + day1.stderr
    assert "PartiallyCompleted" in day1.stdout
    assert f"  s3://{world.source_bucket}/2024/b/img-000.png: missing (Missing: not in the output of job" \
           in day1.stdout
    assert index_uris(world) == uris(world, done)
    assert_clean(world)
    assert not (world.cwd / "failed_permanently.jsonl").exists()  # missing is not permanent

    world.emulator("/_emulator/config", {"drop_keys_regex": None})
    day2 = world.daily()
    assert day2.returncode == 0, day2.stdout + day2.stderr
    assert index_uris(world) == uris(world, done + dropped)
    assert [job["totalRecordCount"] for job in jobs(world)][-1] == 100
    assert_clean(world)


@pytest.mark.parametrize("status", ["Failed", "Expired"])
def test_a_failed_or_expired_job_is_run_again_the_next_day(world, status):
    keys = [f"a/img-{i:03d}.png" for i in range(110)]
    world.put_images(keys, prefix="2024/")
    world.emulator("/_emulator/config", {"final_status": status})
    day1 = world.daily()
    assert day1.returncode == 4, day1.stdout + day1.stderr
    assert f"ended {status}" in day1.stdout
    assert "Images loaded: 0, failed: 0, missing: 110" in day1.stdout
    assert_clean(world)

    world.emulator("/_emulator/config", {"final_status": None})
    day2 = world.daily()
    assert day2.returncode == 0, day2.stdout + day2.stderr
    assert index_uris(world) == uris(world, keys)
    assert_clean(world)


def start_daily(world, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "daily_run.py"), "--interval", "0.05", "--new-index", *args],
                            cwd=world.cwd, env=world.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(process: subprocess.Popen, text: str) -> str:
    """Read the process's output until a line holds `text` (the process tells us where it is: no clock)."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"{text!r} never printed:\n{''.join(seen)}{process.stderr.read()}")


def test_a_stopped_job_is_accounted_and_run_again_the_next_day(world):
    keys = [f"a/img-{i:03d}.png" for i in range(100)]
    world.put_images(keys, prefix="2024/")
    world.emulator("/_emulator/config", {"hold_scheduled": True})
    day1 = start_daily(world)
    wait_for_line(day1, "Next check in")
    arn = world.job_info()["jobs"][0]["job_arn"]
    world.client("bedrock").stop_model_invocation_job(jobIdentifier=arn)
    out, err = day1.communicate(timeout=120)
    assert day1.returncode == 4, out + err
    assert "ended Stopped" in out and "missing: 100" in out
    assert_clean(world)

    world.emulator("/_emulator/config", {"hold_scheduled": False})
    day2 = world.daily()
    assert day2.returncode == 0, day2.stdout + day2.stderr
    assert index_uris(world) == uris(world, keys)


def test_a_run_still_going_from_yesterday_holds_the_lock_then_is_finished_the_next_day(world):
    keys = [f"a/img-{i:03d}.png" for i in range(100)]
    world.put_images(keys, prefix="2024/")
    world.emulator("/_emulator/config", {"hold_scheduled": True})
    yesterday = start_daily(world)
    wait_for_line(yesterday, "Next check in")

    today = world.daily()  # cron starts the next day while yesterday's run still waits
    assert today.returncode == 7
    assert LOCK_HELD.fullmatch(today.stderr), today.stderr
    assert today.stdout == ""
    yesterday.kill()  # the machine went down: the lock goes with the process
    yesterday.communicate()
    assert len(jobs(world)) == 1 and (world.cwd / "batch_job_info.json").exists()

    timed_out = world.daily("--timeout", "0.2")  # the job is still Scheduled: give up waiting, keep the run
    assert timed_out.returncode == 3, timed_out.stdout + timed_out.stderr
    assert "holds a run from an earlier day: finishing it first" in timed_out.stdout
    assert (world.cwd / "batch_job_info.json").exists()

    world.emulator("/_emulator/config", {"hold_scheduled": False})
    next_day = world.daily()
    assert next_day.returncode == 0, next_day.stdout + next_day.stderr
    assert "holds a run from an earlier day: finishing it first" in next_day.stdout
    assert "✓ Nothing to do: no new images to embed" in next_day.stdout
    assert index_uris(world) == uris(world, keys)
    assert len(jobs(world)) == 1
    assert_clean(world)


def test_two_01_started_together_make_one_job_and_one_manifest(world):
    world.put_images([f"a/img-{i:03d}.png" for i in range(150)], prefix="2024/")
    both = [subprocess.Popen([sys.executable, str(ROOT / STEPS[1]), "--new-index"], cwd=world.cwd, env=world.env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in both]
    codes = sorted(code for code, _, _ in results)
    assert codes in ([0, 6], [0, 7]), results
    loser = next(err for code, _, err in results if code)
    assert loser.count("\n") == 1 and loser.startswith("error: ")
    assert len(jobs(world)) == 1
    assert jobs(world)[0].get("totalRecordCount") in (None, 150)  # absent until the job is validated
    assert len(s3_manifests(world)) == 1
    assert len(list(world.cwd.rglob("batch_input_*.jsonl"))) == 1


def test_a_step_waits_for_the_lock_with_wait_lock(world):
    world.put_images([f"a/img-{i:03d}.png" for i in range(100)], prefix="2024/")
    world.emulator("/_emulator/config", {"hold_scheduled": True})
    assert world.step(1).returncode == 0
    monitor = subprocess.Popen([sys.executable, str(ROOT / STEPS[2]), "--wait", "--interval", "0.05"],
                               cwd=world.cwd, env=world.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_line(monitor, "Next check in")
    refused = world.step(4)
    assert refused.returncode == 7 and "02_monitor_job.py (pid" in refused.stderr
    waiting = subprocess.Popen([sys.executable, str(ROOT / STEPS[3]), "--wait-lock"], cwd=world.cwd, env=world.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_line(waiting, "Waiting for 02_monitor_job.py (pid")
    world.emulator("/_emulator/config", {"hold_scheduled": False})
    assert monitor.wait(timeout=120) == 0
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, out + err
    assert "✓ Results loaded successfully!" in out


def test_readme_cron_line_runs_a_whole_day(world):
    """The README's cron command, copied as it is, run from the checkout as cron would run it."""
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^#+ [^\n]*cron[^\n]*\n(.*?)(?=^#)", readme, re.M | re.S | re.I)
    command = re.search(r"```bash\n(.*?)```", section.group(1), re.S).group(1).strip()
    assert "\n" not in command and "daily_run.py" in command
    keys = [f"a/img-{i:03d}.png" for i in range(100)]
    world.put_images(keys, prefix="2024/")
    s3v = world.client("s3vectors")  # the first run (README: --new-index) started the index
    s3v.create_vector_bucket(vectorBucketName=world.vector_bucket)
    s3v.create_index(vectorBucketName=world.vector_bucket, indexName=world.vector_index, dataType="float32",
                     dimension=256, distanceMetric="cosine")
    world.emulator("/_emulator/config", {"answer_when_ended": True})  # 02's first look finds the job ended
    env = {**world.env, "JOB_INFO_FILE": str(world.cwd / "batch_job_info.json")}
    done = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert index_uris(world) == uris(world, keys)
    assert_clean(world)
