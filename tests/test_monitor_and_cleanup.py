"""02_monitor_job.py and 04_remove_completed_task.py: statuses, the y/n prompt, exit codes, what is removed."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

import common
from batch_embeddings import jobinfo, jobs, monitor
from tests.conftest import ROOT, STEPS, import_step

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
    job = submit(world, hold_scheduled=True)  # still running when the prompt comes, until released below
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, str(ROOT / STEPS[2]), "--interval", "0.2"], cwd=world.cwd,
                               env=world.env, stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 60
    answered = released = False
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
        if not released and b"[Poll #2]" in seen:  # polled while it ran: now let it end
            world.emulator("/_emulator/config", {"hold_scheduled": False})
            released = True
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
    assert status_of(world, job) not in jobinfo.TERMINAL_STATUSES


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
    assert status_of(world, job) not in jobinfo.TERMINAL_STATUSES
    assert (world.cwd / "batch_job_info.json").exists()


def test_01_refuses_to_replace_a_running_job_unless_forced(world):
    job = submit(world, step_seconds=5.0)
    again = world.step(1)
    assert again.returncode == common.EXIT_REFUSED
    assert f"holds a run that has not finished ({job['job_name']} is" in again.stderr
    assert world.job_info()["jobs"][0]["job_arn"] == job["job_arn"]


def test_01_refuses_to_replace_a_run_whose_results_are_not_loaded(world):
    job = submit(world)
    assert world.step(2, "--wait", "--interval", "0.05", "--timeout", "60").returncode == 0
    again = world.step(1)
    assert again.returncode == common.EXIT_REFUSED
    assert f"{job['job_name']} ended Completed but is not loaded" in again.stderr
    assert world.job_info()["jobs"][0]["job_arn"] == job["job_arn"]


def test_04_refuses_while_the_job_runs_unless_forced(world):
    job = submit(world, step_seconds=5.0)
    running = world.step(4)
    assert running.returncode == common.EXIT_REFUSED and "is still" in running.stderr
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
    assert not_loaded.returncode == common.EXIT_REFUSED and "not loaded yet" in not_loaded.stderr
    assert (world.cwd / "batch_job_info.json").exists()
    assert world.step(3).returncode == 0
    cleaned = world.step(4)
    assert cleaned.returncode == 0, cleaned.stderr
    assert "(No S3 JSONL files left to remove)" in cleaned.stdout  # 02 removed it when the job ended
    assert "Local files removed: 3" in cleaned.stdout  # the manifest, its sources, the job file


# ---------------------------------------------------------------------------------------------------------------
# 02 at hundreds of jobs: ListModelInvocationJobs, a compact table, elapsed time, a block redrawn on a terminal
# ---------------------------------------------------------------------------------------------------------------

ONE_IMAGE_JOBS = {"MIN_RECORDS_PER_JOB": "1", "MAX_RECORDS_PER_JOB": "2", "ON_DEMAND_MAX_IMAGES": "0"}


def count_calls(monkeypatch) -> Counter:
    """Every AWS operation the step's clients call, by name (each page of a listing counts)."""
    calls: Counter = Counter()
    real = common.make_client

    def counting(service, config, **kwargs):
        client = real(service, config, **kwargs)
        client.meta.events.register("before-call", lambda model, **_: calls.update([model.name]))
        return client

    monkeypatch.setattr(common, "make_client", counting)
    return calls


def in_process(world, monkeypatch) -> None:
    for name, value in world.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(world.cwd)


class FakeClock:
    def __init__(self):
        self.now, self.sleeps = 1000.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        time.sleep(0.2)  # the emulator's jobs move on in real time; the step only counts this clock


def test_02_reads_many_jobs_with_a_few_list_calls(world, monkeypatch, capsys):
    world.env.update(ONE_IMAGE_JOBS, MAX_CONCURRENT_JOBS="500")
    world.emulator("/_emulator/config", {"min_records_per_job": 1, "max_concurrent_jobs": 500, "step_seconds": 0.02})
    world.put_images([f"f{i:03d}/img.png" for i in range(45)], prefix="2024/")
    created = world.step(1, timeout=900)
    assert created.returncode == 0, created.stdout[-2000:] + created.stderr
    assert "Planned 45 job(s) in 1 wave(s)" in created.stdout
    assert all(job.get("job_arn") for job in world.job_info()["jobs"])

    step2 = import_step(2)
    monkeypatch.setattr(monitor, "LIST_PAGE_SIZE", 9)  # 5 pages a poll: the paging is exercised
    calls = count_calls(monkeypatch)
    in_process(world, monkeypatch)
    clock = FakeClock()
    display = monitor.Display(tty=False, size=lambda: os.terminal_size((100, 30)))
    code = step2.run(["--wait", "--interval", "30", "--timeout", "86400"], sleep=clock.sleep, clock=clock,
                     display=display)
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    polls = len(clock.sleeps) + 1
    # One listing of 5 pages a poll instead of 45 GetModelInvocationJob; Get only once fewer than 4 jobs are left.
    assert calls["ListModelInvocationJobs"] % 5 == 0
    assert calls["ListModelInvocationJobs"] // 5 + (1 if calls["GetModelInvocationJob"] else 0) >= polls - 1
    assert calls["ListModelInvocationJobs"] + calls["GetModelInvocationJob"] <= 5 * polls
    assert calls["GetModelInvocationJob"] <= 3 * (polls - calls["ListModelInvocationJobs"] // 5)
    blocks = out.split("Batch Inference Run: 45 jobs")[1:]
    assert len(blocks) == polls
    last = blocks[-1].split("[Poll #")[0].splitlines()  # the block, from its title to its footer
    assert len(last) + 2 <= 30  # a screenful, with its first line (title) and the footer
    assert "... and 26 more job(s)" in last  # 21 rows: the header, 19 jobs, this line
    assert "Jobs: Completed 45" in last
    assert "Overall progress: 100.0% (45/45 records)" in last
    assert f"[Poll #{polls}] " in blocks[-1] and f"elapsed {monitor.elapsed_text(30 * (polls - 1))}" in blocks[-1]
    assert "\x1b[" not in out  # no cursor movement off a terminal
    assert {job["status"] for job in world.job_info()["jobs"]} == {"Completed"}


def test_statuses_the_list_misses_are_asked_for_one_by_one():
    jobs_ = [{"job_name": f"nova-mme-embedding-20261201-100000-{n:02d}",
              "job_arn": f"arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/{n:012d}"} for n in range(6)]

    class Bedrock:
        def __init__(self):
            self.queries, self.gets = [], []

        def get_paginator(self, name):
            assert name == "list_model_invocation_jobs"
            return self

        def paginate(self, **query):
            self.queries.append(query)
            yield {"invocationJobSummaries": [{"jobArn": j["job_arn"], "status": "InProgress"} for j in jobs_[:3]]}
            yield {"invocationJobSummaries": [{"jobArn": jobs_[4]["job_arn"], "status": "Completed"},
                                              {"jobArn": "arn:aws:bedrock:us-east-1:123456789012:"
                                                         "model-invocation-job/otherrun0000", "status": "Failed"}]}

        def get_model_invocation_job(self, jobIdentifier):
            self.gets.append(jobIdentifier)
            return {"jobArn": jobIdentifier, "status": "Scheduled"}

    bedrock = Bedrock()
    found = monitor.job_statuses(bedrock, jobs_, "2026-12-01T10:00:00+00:00")
    assert {arn[-2:]: s["status"] for arn, s in found.items()} == {
        "00": "InProgress", "01": "InProgress", "02": "InProgress", "03": "Scheduled", "04": "Completed",
        "05": "Scheduled"}
    assert bedrock.gets == [jobs_[3]["job_arn"], jobs_[5]["job_arn"]]
    (query,) = bedrock.queries
    assert query["nameContains"] == "nova-mme-embedding-20261201-100000-0"  # what the names have in common
    assert query["submitTimeAfter"].isoformat() == "2026-11-30T10:00:00+00:00"
    bedrock = Bedrock()
    monitor.job_statuses(bedrock, jobs_[:3], None)  # a few jobs: a Get each is cheaper than a listing
    assert bedrock.queries == [] and len(bedrock.gets) == 3


def test_jobs_that_had_ended_are_not_asked_about_again():
    arn = "arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/{}".format
    ended = [{"job_name": "loaded", "job_arn": arn("loaded000000"), "status": "Completed", "load": {"finished": True}},
             {"job_name": "stopped", "job_arn": arn("stopped00000"), "status": "Stopped"}]
    info = {"jobs": ended + [
        {"job_name": "running", "job_arn": arn("running00000"), "status": "InProgress"},
        {"job_name": "unanswered", "job_arn": arn("unanswered00")},  # submitted, its status never read
        {"job_name": "queued"},
        {"job_name": "part", "on_demand": True},
    ]}

    class Bedrock:
        def __init__(self):
            self.asked = []

        def get_model_invocation_job(self, jobIdentifier):
            self.asked.append(jobIdentifier)
            return {"status": "Completed"}

    assert [j["job_name"] for j in info["jobs"] if jobs.needs_status(j)] == ["running", "unanswered"]
    bedrock = Bedrock()
    state = jobs.refresh(bedrock, info)
    assert bedrock.asked == [arn("running00000"), arn("unanswered00")]
    assert [j["job_name"] for j in state.unloaded] == ["stopped", "running", "unanswered", "part"]
    assert [j["job_name"] for j in state.queued] == ["queued"] and state.running == []
    # A run whose jobs had all ended is sorted out without a client (03 makes none).
    assert [j["job_name"] for j in jobs.refresh(None, {"jobs": ended}).unloaded] == ["stopped"]


def run_info(statuses: list[str | None]) -> dict:
    return {"jobs": [{"job_name": f"nova-mme-embedding-20261201-100000-{n:02d}", "input_folder": f"2024/f{n}/",
                      "record_count": 10, **({"status": s, "job_arn": "x", "uploaded": True,
                                              "counts": {"processedRecordCount": 10 if s == "Completed" else 4}}
                                             if s else {})}
                     for n, s in enumerate(statuses)]}


def test_the_run_table_shows_the_most_telling_jobs_first_within_a_screenful():
    info = run_info(["Completed"] * 20 + ["InProgress", "Failed"] + [None] * 5)
    lines = monitor.run_lines(info, rows=6)
    assert lines[0].split() == ["job", "status", "processed", "input", "folder"]
    assert lines[1].split() == ["21", "Failed", "4/10", "2024/f21/"]
    assert lines[2].split() == ["20", "InProgress", "4/10", "2024/f20/"]
    assert lines[3].split()[1] == "Queued" and lines[4].split()[1] == "Queued"
    assert lines[5] == "... and 23 more job(s)"
    assert lines[6] == "Jobs: Completed 20, Failed 1, InProgress 1, Queued 5"
    assert lines[7] == "Overall progress: 77.0% (208/270 records)"
    assert len(monitor.run_lines(info, rows=100)) == 1 + 27 + 2


def test_on_a_terminal_the_block_is_redrawn_in_place():
    out = io.StringIO()
    display = monitor.Display(out=out, tty=True, size=lambda: os.terminal_size((20, 10)))
    display.show("", ["a" * 50, "second"])
    display.show("Deleted: s3://b/k\n", ["third", "fourth", "fifth"])
    display.forget()  # a prompt was printed below the block
    display.show("", ["sixth"])
    assert out.getvalue() == (
        "a" * 18 + "…\nsecond\n"  # cut to the width with a mark: a wrapped line could not be redrawn
        "\x1b[2F\x1b[J" "Deleted: s3://b/k\n" "third\nfourth\nfifth\n"  # up 2 lines, clear, then the news
        "sixth\n"
    )
    plain = io.StringIO()
    display = monitor.Display(out=plain, tty=False, size=lambda: os.terminal_size((20, 10)))
    display.show("", ["a" * 50])
    display.show("", ["b"])
    assert plain.getvalue() == "a" * 50 + "\nb\n"


def test_02_wait_shows_the_elapsed_time_and_redraws_on_a_terminal(world, monkeypatch, capsys):
    submit(world, step_seconds=0.3)
    step2 = import_step(2)
    in_process(world, monkeypatch)
    clock = FakeClock()
    display = monitor.Display(tty=True, size=lambda: os.terminal_size((80, 40)))
    code = step2.run(["--wait", "--interval", "45"], sleep=clock.sleep, clock=clock, display=display)
    out = capsys.readouterr().out
    assert code == 0, out
    polls = len(clock.sleeps) + 1
    assert polls >= 2
    assert out.count("\x1b[J") == polls - 1  # every block after the first replaces the one before
    blocks = re.split(r"\x1b\[(\d+)F\x1b\[J", out.split("Job ARN: ", 1)[1].split("\n", 1)[1])
    for block, up in zip(blocks[::2], blocks[1::2]):
        assert int(up) == block.count("\n")  # up exactly as many lines as the block took
    assert out.count(">>> STATUS:") == polls
    assert f"[Poll #{polls}]" in out and f"elapsed {monitor.elapsed_text(45 * (polls - 1))}" in out
    assert "· next check in 45 seconds" in out
    assert "Next check in" not in out  # no scrolling line between blocks on a terminal
    assert all(len(line) < 80 for line in out.splitlines() if line.startswith(("[Poll #", "Output", "Last Modified")))


def test_max_concurrent_jobs_decides_when_the_quota_is_higher(world):
    world.env.update(ONE_IMAGE_JOBS, MAX_CONCURRENT_JOBS="3")
    # The emulator's quota (50) never answers ServiceQuotaExceeded here: only the steps' own limit holds jobs back.
    world.emulator("/_emulator/config", {"min_records_per_job": 1, "max_concurrent_jobs": 50, "step_seconds": 0.05})
    world.put_images([f"f{i}/img.png" for i in range(8)], prefix="2024/")
    created = world.step(1)
    assert created.returncode == 0, created.stdout + created.stderr
    assert len(world.emulator("/_emulator/jobs")["jobs"]) == 3
    assert "stays queued" not in created.stdout
    monitored = world.step(2, "--wait", "--interval", "0.05", "--timeout", "120")
    assert monitored.returncode == 0, monitored.stdout[-3000:] + monitored.stderr
    emulated = world.emulator("/_emulator/jobs")["jobs"]
    assert len(emulated) == len(world.job_info()["jobs"]) >= 4
    # Replay the emulator's own submit and end times: at most 3 at once, exactly 3 at some point, none nested.
    events = sorted([(j["submitTime"], 1, j) for j in emulated] + [(j["endTime"], 0, j) for j in emulated],
                    key=lambda e: e[:2])  # at the same millisecond, an end comes before a start
    folder = lambda j: j["inputDataConfig"]["s3InputDataConfig"]["s3Uri"]  # noqa: E731
    active, most = [], 0
    for _, starts, job in events:
        if starts:
            assert not any(folder(job).startswith(folder(j)) or folder(j).startswith(folder(job)) for j in active)
            active.append(job)
            most = max(most, len(active))
        else:
            active.remove(job)
    assert most == 3
