"""Make docs/results-page.png: the quick start's flow (tests/local_run.py) on the local stand-ins, then the page its
query wrote (results.html), rendered by headless Chromium.

    uv run python -m tests.docs_screenshot [--out docs/results-page.png]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from tests import local_run
from tests.browser import Browser, find_chromium
from tests.standins import stack as standins

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results-page.png")
    args = parser.parse_args(argv)
    executable = find_chromium()
    if executable is None:
        sys.exit("Chromium is not installed (apt-get install chromium)")
    workdir = Path(tempfile.mkdtemp(prefix="bedrock-batch-docs-"))
    running = standins.start(bedrock_options={"step_seconds": 0.05})
    try:
        env = local_run.setup(running, workdir, 150)
        for step in local_run.STEPS:  # the quick start, its query included
            code = subprocess.run([sys.executable, str(ROOT / step[0]), *step[1:]], cwd=workdir, env=env).returncode
            if code != 0:
                return code
        with Browser(executable) as browser:
            page = browser.page(width=1100, height=300)  # the page decides the height
            page.open((workdir / "results.html").resolve().as_uri())
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(args.out)
        print(f"Wrote {args.out}")
        return 0
    finally:
        running.stop()


if __name__ == "__main__":
    sys.exit(main())
