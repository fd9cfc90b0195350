"""One exit-code table: the same in README.md and in every script's --help, and each documented code produced by a
case that a user meets."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest

import common
from tests.conftest import ROOT, STEPS
from tests.test_daily_run import wait_for_line

SCRIPTS = [*STEPS.values(), "daily_run.py"]


def readme_table() -> dict[int, str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Exit status", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| (.+?) \|$", section, re.M)
    return {int(code): meaning.replace("`", "") for code, meaning in rows}


def help_table() -> dict[int, str]:
    rows = re.findall(r"^  (\d+) +(.+)$", common.EXIT_CODES_HELP, re.M)
    return {int(code): meaning for code, meaning in rows}


def test_the_readme_and_help_tables_are_one_table():
    assert readme_table() == help_table()
    assert set(help_table()) == {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 130}
    for script in SCRIPTS:
        shown = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                               env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
        assert shown.returncode == 0, shown.stderr
        assert common.EXIT_CODES_HELP in shown.stdout, script


def images(world, n=100):
    world.put_images([f"a/img-{i:03d}.png" for i in range(n)], prefix="2024/")


def held_run(world):
    """A run whose job waits in Scheduled until the test lets it go."""
    images(world)
    world.emulator("/_emulator/config", {"hold_scheduled": True})
    assert world.step(1).returncode == 0


def case_0(world):
    images(world)
    return world.step(1, "--dry-run")


def case_1(world):
    images(world)
    return world.step(1, env={"SOURCE_BUCKET": "no-such-source-bucket"})


def case_2(world):
    return world.step(1, env={"ROLE_ARN": ""})


def case_3(world):
    held_run(world)
    return world.step(2, "--no-wait")


def case_4(world):
    images(world)
    world.emulator("/_emulator/config", {"drop_keys_regex": "img-00[0-9]"})  # ten images never processed
    assert world.step(1).returncode == 0
    assert world.step(2, "--wait", "--interval", "0.05").returncode == common.EXIT_INCOMPLETE
    return world.step(3)


def case_5(world):
    images(world)
    world.emulator("/_emulator/config", {"final_status": "Failed"})
    assert world.step(1).returncode == 0
    return world.step(2, "--wait", "--interval", "0.05")


def case_6(world):
    images(world)
    assert world.step(1).returncode == 0
    assert world.step(2, "--wait", "--interval", "0.05").returncode == 0
    return world.step(4)  # results not loaded yet


def case_7(world):
    held_run(world)
    monitor = subprocess.Popen([sys.executable, str(ROOT / STEPS[2]), "--wait", "--interval", "0.05"],
                               cwd=world.cwd, env=world.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_line(monitor, "Next check in")
    try:
        return world.step(3)
    finally:
        monitor.kill()
        monitor.communicate()


def case_8(world):
    images(world)
    return world.step(1, env={"MAX_RUN_COST_USD": "0.000001"})


def case_9(world):
    return world.step(0, env={"SOURCE_BUCKET": "no-such-source-bucket"})


def case_10(world):
    images(world)
    assert world.daily().returncode == 0
    world.client("s3").delete_object(Bucket=world.source_bucket, Key="2024/a/img-000.png")
    return world.step(1, env={"MAX_DELETE_COUNT": "0"})  # one image gone: more than none may be deleted


def case_130(world):
    held_run(world)
    monitor = subprocess.Popen([sys.executable, str(ROOT / STEPS[2]), "--wait", "--interval", "0.05"],
                               cwd=world.cwd, env=world.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_line(monitor, "Next check in")
    monitor.send_signal(signal.SIGINT)
    out, err = monitor.communicate(timeout=60)
    return subprocess.CompletedProcess(monitor.args, monitor.returncode, out, err)


CASES = {0: case_0, 1: case_1, 2: case_2, 3: case_3, 4: case_4, 5: case_5, 6: case_6, 7: case_7, 8: case_8,
         9: case_9, 10: case_10, 130: case_130}


def test_every_documented_code_has_a_case():
    assert set(CASES) == set(help_table())


@pytest.mark.parametrize("code", sorted(CASES))
def test_each_documented_code(world, code):
    done = CASES[code](world)
    assert done.returncode == code, done.stdout + done.stderr
    if code not in (common.EXIT_OK, common.EXIT_RUNNING, common.EXIT_INCOMPLETE, common.EXIT_JOB_FAILED,
                    common.EXIT_INTERRUPTED):
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
