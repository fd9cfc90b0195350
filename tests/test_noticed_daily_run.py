"""daily_run.py's exit status and order of steps when an earlier day's run is still there, with the steps played
by stand-ins that answer each day's exit codes: cron must never report success over images that were not loaded,
and one bad day must not stop the chain."""

from __future__ import annotations

import os

import pytest

import common
import daily_run


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
