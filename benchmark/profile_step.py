"""Run a script under cProfile in *every* thread: `python -m cProfile` sees only the main thread, and step 03
sends its requests from worker threads. The clock is each thread's CPU time (`time.thread_time`), so waiting on
the network or on a lock costs nothing and other processes on a busy machine do not inflate the figures.

    python benchmark/profile_step.py OUT_PREFIX SCRIPT [ARGS...]

writes OUT_PREFIX.main.prof (the main thread) and OUT_PREFIX.threads.prof (all other threads merged), and exits
with the script's exit status. Read them with `python -m pstats FILE` or `benchmark/bench_load.py --profile`.
"""

from __future__ import annotations

import cProfile
import pstats
import runpy
import sys
import threading
import time
from pathlib import Path


def main() -> int:
    out, script = sys.argv[1], sys.argv[2]
    sys.argv = sys.argv[2:]
    sys.path.insert(0, str(Path(script).resolve().parent))
    thread_profiles: list[cProfile.Profile] = []
    original_run = threading.Thread.run

    def profiled_run(self):
        profile = cProfile.Profile(time.thread_time)
        thread_profiles.append(profile)
        profile.enable()
        try:
            original_run(self)
        finally:
            profile.disable()

    threading.Thread.run = profiled_run
    main_profile = cProfile.Profile(time.thread_time)
    code: object = 0
    main_profile.enable()
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    finally:
        main_profile.disable()
        main_profile.dump_stats(f"{out}.main.prof")
        if thread_profiles:
            merged = pstats.Stats(thread_profiles[0])
            for profile in thread_profiles[1:]:
                merged.add(profile)
            merged.dump_stats(f"{out}.threads.prof")
    return code if isinstance(code, int) else (0 if code is None else 1)


if __name__ == "__main__":
    sys.exit(main())
