"""daily_run.py's exit status and order of steps when an earlier day's run is still there, with the steps played
by stand-ins that answer each day's exit codes: cron must never report success over images that were not loaded,
and one bad day must not stop the chain."""

from __future__ import annotations

import fcntl
import io
import json
import os
import sys
import types
from pathlib import Path

import pytest

import common
import daily_run
from batch_embeddings import jobinfo


class Steps:
    """The numbered steps as daily_run.py runs them: each answers its next exit code; 01 writes a job-info file
    when it plans a run, 04 removes it."""

    def __init__(self, path, codes: dict[int, list[int]], new_run: bool):
        self.path, self.new_run, self.ran, self.argv = path, new_run, [], []
        self.codes = {number: list(answers) for number, answers in codes.items()}  # the caller's lists stay whole

    def __call__(self, number: int, *argv: str) -> int:
        self.ran.append(number)
        self.argv.append((number, *argv))
        code = self.codes[number].pop(0)
        if number == 1 and code == common.EXIT_OK and self.new_run:
            self.path.write_text("{}")
        if number == 4 and code == common.EXIT_OK:
            self.path.unlink(missing_ok=True)
        return code


@pytest.fixture
def daily(tmp_path, monkeypatch):
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    settings = {"AWS_REGION": "us-east-1", "SOURCE_BUCKET": "images", "RESULT_BUCKET": "results",
                "ROLE_ARN": "arn:aws:iam::123456789012:role/BedrockBatchInferenceRole", "VECTOR_BUCKET": "vectors",
                "VECTOR_INDEX": "images"}  # every setting a run needs: checked before any step
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "batch_job_info.json"
    monkeypatch.setenv("JOB_INFO_FILE", str(path))

    def run(codes: dict[int, list[int]], *, earlier: bool, new_run: bool, args=("--interval", "0"),
            steps_seen: list | None = None) -> tuple[int, list[int]]:
        if earlier:
            path.write_text("{}")
        steps = Steps(path, codes, new_run)
        monkeypatch.setattr(daily_run, "step", steps)
        code = daily_run.main(list(args))
        if steps_seen is not None:
            steps_seen.extend(steps.argv)
        return code, steps.ran

    return run


def test_an_incomplete_earlier_run_does_not_stop_todays_run(daily):
    code, ran = daily({2: [0, 0], 3: [common.EXIT_INCOMPLETE, 0], 4: [0, 0], 1: [0]}, earlier=True, new_run=True)
    assert ran == [2, 3, 4, 1, 2, 3, 4]  # yesterday finished, then today's run in full
    assert code == common.EXIT_INCOMPLETE  # yesterday's missing images are still reported


def test_nothing_new_today_after_an_incomplete_earlier_run_is_not_a_success(daily):
    code, ran = daily({2: [0], 3: [common.EXIT_INCOMPLETE], 4: [0], 1: [0]}, earlier=True, new_run=False)
    assert ran == [2, 3, 4, 1]
    assert code == common.EXIT_INCOMPLETE


def test_a_complete_day_does_not_hide_the_earlier_runs_missing_images(daily):
    code, _ = daily({2: [0, 0], 3: [common.EXIT_INCOMPLETE, 0], 4: [0, 0], 1: [0]}, earlier=True, new_run=True)
    assert code == common.EXIT_INCOMPLETE


def test_an_incomplete_day_after_a_complete_earlier_run_is_incomplete(daily):
    code, _ = daily({2: [0, 0], 3: [0, common.EXIT_INCOMPLETE], 4: [0, 0], 1: [0]}, earlier=True, new_run=True)
    assert code == common.EXIT_INCOMPLETE


def test_both_runs_complete_is_a_success(daily):
    code, ran = daily({2: [0, 0], 3: [0, 0], 4: [0, 0], 1: [0]}, earlier=True, new_run=True)
    assert (code, ran) == (common.EXIT_OK, [2, 3, 4, 1, 2, 3, 4])


@pytest.mark.parametrize("codes, stopped_at, expected", [
    ({2: [common.EXIT_RUNNING]}, [2], common.EXIT_RUNNING),  # still running at --timeout: kept for tomorrow
    ({2: [0], 3: [common.EXIT_ERROR]}, [2, 3], common.EXIT_ERROR),
    ({2: [0], 3: [0], 4: [common.EXIT_ERROR]}, [2, 3, 4], common.EXIT_ERROR),
])
def test_an_earlier_run_that_did_not_end_stops_the_day_with_its_status(daily, codes, stopped_at, expected):
    code, ran = daily(codes, earlier=True, new_run=True)
    assert (code, ran) == (expected, stopped_at)


def test_a_day_without_an_earlier_run(daily):
    code, ran = daily({1: [0], 2: [common.EXIT_INCOMPLETE], 3: [common.EXIT_INCOMPLETE], 4: [0]}, earlier=False,
                      new_run=True)
    assert (code, ran) == (common.EXIT_INCOMPLETE, [1, 2, 3, 4])
    code, ran = daily({1: [0]}, earlier=False, new_run=False)
    assert (code, ran) == (common.EXIT_OK, [1])
    code, ran = daily({1: [common.EXIT_OVER_BUDGET]}, earlier=False, new_run=True)
    assert (code, ran) == (common.EXIT_OVER_BUDGET, [1])


def test_each_step_gets_the_days_settings(daily, capsys):
    seen: list[tuple] = []
    code, _ = daily({2: [0, 0], 3: [0, 0], 4: [0, 0], 1: [0]}, earlier=True, new_run=True,
                    args=("--timeout", "90", "--interval", "2.5", "--new-index"), steps_seen=seen)
    assert code == common.EXIT_OK
    wait = (2, "--wait", "--timeout", "90", "--interval", "2.5")
    assert seen == [wait, (3,), (4,), (1, "--new-index"), wait, (3,), (4,)]
    assert "batch_job_info.json holds a run from an earlier day: finishing it first\n" in capsys.readouterr().out
    seen.clear()
    daily({1: [0]}, earlier=False, new_run=False, steps_seen=seen)
    assert seen == [(1,)]  # no --new-index unless asked: a typo never starts a new index unwatched


@pytest.mark.parametrize("args", [("--timeout", "0"), ("--timeout", "-5"), ("--interval", "-1")])
def test_a_bad_timeout_or_interval_is_refused_with_exit_2(daily, capsys, args):
    with pytest.raises(SystemExit) as caught:
        daily({}, earlier=False, new_run=False, args=args)
    assert caught.value.code == common.EXIT_USAGE
    err = capsys.readouterr().err
    assert "error: --timeout must be" in err and "--interval" in err.splitlines()[-1]


def test_the_defaults_reach_step_02(daily):
    """Without flags, 02 waits up to 23 hours and looks at the jobs every 30 seconds."""
    seen: list[tuple] = []
    code, _ = daily({1: [0], 2: [0], 3: [0], 4: [0]}, earlier=False, new_run=True, args=(), steps_seen=seen)
    assert code == common.EXIT_OK
    assert seen[1] == (2, "--wait", "--timeout", "82800", "--interval", "30")


def test_a_timeout_under_a_second_is_accepted(daily):
    seen: list[tuple] = []
    code, _ = daily({1: [0], 2: [0], 3: [0], 4: [0]}, earlier=False, new_run=True,
                    args=("--timeout", "0.5", "--interval", "0"), steps_seen=seen)
    assert code == common.EXIT_OK
    assert seen[1] == (2, "--wait", "--timeout", "0.5", "--interval", "0")


@pytest.mark.parametrize("args", [("--timeout", "inf"), ("--interval", "inf"), ("--timeout", "nan"),
                                  ("--interval", "nan")])
def test_an_endless_or_nan_timeout_or_interval_is_refused(daily, capsys, args):
    with pytest.raises(SystemExit) as caught:
        daily({}, earlier=False, new_run=False, args=args)
    assert caught.value.code == common.EXIT_USAGE
    assert "error: --timeout must be a positive number of seconds and --interval 0 or more" in capsys.readouterr().err


def test_a_missing_setting_is_refused_before_any_step(daily, monkeypatch, capsys):
    monkeypatch.delenv("ROLE_ARN")
    monkeypatch.delenv("VECTOR_INDEX")
    code, ran = daily({}, earlier=True, new_run=False)
    assert (code, ran) == (common.EXIT_USAGE, [])
    err = capsys.readouterr().err
    assert err.startswith("error: ROLE_ARN is not set; VECTOR_INDEX is not set — set them in .env"), err
    assert len(err.splitlines()) == 1


def test_the_job_info_file_flag_wins_over_the_environment(daily, tmp_path, monkeypatch, capsys):
    """--job-info-file names the run to finish: its earlier run is finished first, the environment's file is not
    looked at."""
    other = tmp_path / "elsewhere.json"
    other.write_text("{}")
    ran = []

    def step(number, *argv):
        ran.append(number)
        if number == 4:
            other.unlink()
        return common.EXIT_OK

    monkeypatch.setattr(daily_run, "step", step)
    assert daily_run.main(["--interval", "0", "--job-info-file", str(other)]) == common.EXIT_OK
    assert ran == [2, 3, 4, 1]
    assert capsys.readouterr().out == f"{other} holds a run from an earlier day: finishing it first\n"


def test_the_lock_names_daily_run_while_the_steps_run(tmp_path, monkeypatch, daily):
    """What a second step started meanwhile reads in the lock file: daily_run.py and this process."""
    holders = []

    def step(number, *argv):
        holders.append(json.loads(jobinfo.lock_file(tmp_path / "batch_job_info.json").read_text()))
        return common.EXIT_OK

    monkeypatch.setattr(daily_run, "step", step)
    assert daily_run.main(["--interval", "0"]) == common.EXIT_OK
    assert [(h["step"], h["pid"]) for h in holders] == [("daily_run.py", os.getpid())]


@pytest.fixture
def held_lock(tmp_path):
    """Another step holding the run's lock (its own open file: flock tells it apart from this process's)."""
    target = jobinfo.lock_file(tmp_path / "batch_job_info.json")
    fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, json.dumps({"pid": 4242, "step": "02_monitor_job.py", "since": "2026-12-01T10:00:00+00:00"}).encode())
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    yield fd
    os.close(fd)


def test_a_held_lock_stops_the_day_before_any_step(daily, held_lock, capsys):
    code, ran = daily({}, earlier=True, new_run=False)
    assert (code, ran) == (common.EXIT_LOCKED, [])
    err = capsys.readouterr().err
    assert err.startswith("error: 02_monitor_job.py (pid 4242, since 2026-12-01T10:00:00+00:00) is working on "), err
    assert "--wait-lock" in err


def test_wait_lock_waits_for_the_other_step_then_runs_the_day(daily, held_lock, monkeypatch, capsys):
    waits = []

    def other_step_finishes(seconds):  # the lock's poll sleep: the holder lets go meanwhile
        waits.append(seconds)
        fcntl.flock(held_lock, fcntl.LOCK_UN)

    locked = jobinfo.locked.__wrapped__  # daily_run takes jobinfo.locked's own sleep: swap it for this one
    monkeypatch.setattr(locked, "__defaults__", (False, 1.0, other_step_finishes))
    code, ran = daily({1: [0]}, earlier=False, new_run=False, args=("--interval", "0", "--wait-lock"))
    assert (code, ran) == (common.EXIT_OK, [1])
    assert waits == [1.0]
    assert "Waiting for 02_monitor_job.py (pid 4242, since 2026-12-01T10:00:00+00:00) to finish with" in \
        capsys.readouterr().out


def test_help_shows_the_documentation_the_options_and_the_exit_codes(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "120")
    with pytest.raises(SystemExit) as caught:
        daily_run.main(["--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    description = out.split("\n\n")[1]
    assert description == "The daily run: the four steps in order, unattended, safe to start every day from cron."
    flat = " ".join(out.split())
    assert flat.count("safe to start every day from cron") == flat.count("1. A run left by an earlier day") == 1
    for option in ["--timeout SECONDS stop waiting for the jobs after this long (default 82800: 23 h)",
                   "--interval SECONDS seconds between two looks at the jobs (30)",
                   "--new-index 01 may start VECTOR_INDEX when it does not exist yet (the first run; without it a "
                   "missing index is refused, exit 6)"]:
        assert option in flat
    assert ("uv run daily_run.py [--timeout SECONDS] [--interval SECONDS] [--wait-lock] [--new-index] "
            "[--allow-mass-delete] 1. A run left by an earlier day (batch_job_info.json still there) is finished "
            "first") in flat
    assert "\n2. 01 embeds today's new and changed images" in out  # the numbered list keeps its lines
    assert "passes --new-index (01 gets it).\n\nexit status (the same for every step):\n  0    done" in out
    assert out.rstrip().endswith("130  interrupted (Ctrl-C): run the step again to continue")


# ------------------------------------------------------------------------------------------------------------------
# step(): a numbered step run in this process
# ------------------------------------------------------------------------------------------------------------------


def fake_step(name: str, code: int, calls: list):
    module = types.ModuleType(name)

    def main(argv):
        calls.append(argv)
        print(f"error: {name} says no", file=sys.stderr)
        return code

    module.main = main
    return module


def test_a_step_is_announced_then_run_with_its_arguments(monkeypatch, capsys):
    calls: list = []
    monkeypatch.setitem(sys.modules, "02_monitor_job", fake_step("02_monitor_job", common.EXIT_RUNNING, calls))
    monkeypatch.setitem(sys.modules, "03_load_result_to_s3_vector_bucket",
                        fake_step("03", common.EXIT_INCOMPLETE, calls))
    assert daily_run.step(2, "--wait", "--timeout", "5") == common.EXIT_RUNNING
    assert daily_run.step(3) == common.EXIT_INCOMPLETE
    assert calls == [["--wait", "--timeout", "5"], []]
    assert capsys.readouterr().out == ("\n>>> daily_run: 02_monitor_job.py --wait --timeout 5\n"
                                       "\n>>> daily_run: 03_load_result_to_s3_vector_bucket.py\n")


def test_a_steps_banner_comes_before_its_error_in_one_log(monkeypatch):
    """cron sends stdout (buffered) and stderr to one log: the banner is written out before the step speaks."""
    log: list[str] = []

    class Buffered(io.StringIO):
        def flush(self):
            log.append(self.getvalue())
            self.seek(0)
            self.truncate()

    class Unbuffered(io.StringIO):
        def write(self, text):
            log.append(text)
            return len(text)

    monkeypatch.setitem(sys.modules, "04_remove_completed_task", fake_step("04", common.EXIT_ERROR, []))
    monkeypatch.setattr(sys, "stdout", Buffered())
    monkeypatch.setattr(sys, "stderr", Unbuffered())
    assert daily_run.step(4) == common.EXIT_ERROR
    assert "".join(log) == "\n>>> daily_run: 04_remove_completed_task.py\nerror: 04 says no\n"


def test_the_steps_come_from_daily_runs_own_folder(daily, tmp_path, monkeypatch, capsys):
    """Started from anywhere (its folder not on the import path, a same-named file in the way), daily_run runs the
    steps that sit beside it."""
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "04_remove_completed_task.py").write_text("def main(argv):\n    print('decoy')\n    return 99\n")
    root = Path(daily_run.__file__).resolve().parent
    monkeypatch.setattr(sys, "path", [str(decoy)] + [p for p in sys.path if Path(p or ".").resolve() != root])
    monkeypatch.delitem(sys.modules, "04_remove_completed_task", raising=False)
    assert daily_run.step(4) == common.EXIT_USAGE  # the real 04: no job-info file here
    out, err = capsys.readouterr()
    assert "decoy" not in out
    assert err.startswith(f"error: {tmp_path / 'batch_job_info.json'} not found — run 01_create_job.py first"), err
