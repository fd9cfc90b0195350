"""The README's quick start works as printed: the local run goes through all five steps, and with --serve the two
lines it prints make the scripts in the checkout reach the stand-ins."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys

from tests.conftest import ROOT
from tests.test_daily_run import wait_for_line


def exports(path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        found[name] = shlex.split(value)[0] if value else ""
    return found


def test_local_run_with_serve_then_a_query_from_the_checkout(tmp_path):
    # A shell with some of the settings already set (another run's): the printed line must still win.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, "SOURCE_BUCKET": "from-elsewhere"}
    local = subprocess.Popen([sys.executable, "-m", "tests.local_run", "--images", "120", "--workdir", str(tmp_path),
                              "--serve", "--step-seconds", "0.05"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        shown = wait_for_line(local, "Ctrl-C to stop.")
        assert "$ uv run 05_query_vectors.py a red sports car --top-k 5" in shown
        assert "✓ 5 hit(s)" in shown
        assert "All five steps ran against the local stand-ins." in shown
        source_line = f"  source {shlex.quote(str(tmp_path / 'standins.env'))}"
        assert source_line in shown.splitlines()
        # In another shell, in the checkout, as printed: the environment the file sets.
        query = subprocess.run([sys.executable, str(ROOT / "05_query_vectors.py"), "beach at night"], cwd=ROOT,
                               env={**env, **exports(tmp_path / "standins.env")}, capture_output=True, text=True,
                               timeout=120)
        assert query.returncode == 0, query.stdout + query.stderr
        assert "Index Name: my-image-index (1024 dimensions, cosine)" in query.stdout
        assert "✓ 10 hit(s)" in query.stdout
        # The first command of "Run it on AWS", in the same world: every row, none failing.
        checked = subprocess.run([sys.executable, str(ROOT / "00_check_setup.py")], cwd=ROOT,
                                 env={**env, **exports(tmp_path / "standins.env")}, capture_output=True, text=True,
                                 timeout=120)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        rows = [line for line in checked.stdout.splitlines() if line[:2] in ("✓ ", "✗ ", "? ")]
        assert len(rows) >= 17 and not [row for row in rows if row.startswith("✗")], checked.stdout
        assert "16 ✓, 0 ✗, 1 ?" in checked.stdout  # ?: moto's default caller is no IAM user to simulate
    finally:
        local.send_signal(signal.SIGINT)
        local.communicate(timeout=60)
    assert local.returncode == 130
