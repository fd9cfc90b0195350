"""Run a script with tracemalloc and report what Python had allocated at its peak, by source line.

    python benchmark/trace_memory.py OUT_FILE SCRIPT [ARGS...]

A thread polls the traced size every 20 ms and takes a snapshot whenever it passes the previous peak by 4 MB;
at exit the largest snapshot is written to OUT_FILE as text (top 25 lines by size, then top 10 tracebacks).
tracemalloc slows the script down and sees only Python's allocations (not the allocator's unreturned pages):
compare its peak with the RSS figure to tell live objects from fragmentation.
"""

from __future__ import annotations

import runpy
import sys
import threading
import time
import tracemalloc
from pathlib import Path


def main() -> int:
    out, script = sys.argv[1], sys.argv[2]
    sys.argv = sys.argv[2:]
    sys.path.insert(0, str(Path(script).resolve().parent))
    tracemalloc.start(8)
    best = {"size": 0, "snapshot": None, "at": 0.0}
    started = time.monotonic()
    done = threading.Event()

    def poll() -> None:
        while not done.wait(0.02):
            size, _ = tracemalloc.get_traced_memory()
            if size > best["size"] + 4 * 1024 * 1024:
                best.update(size=size, snapshot=tracemalloc.take_snapshot(), at=time.monotonic() - started)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    code: object = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    finally:
        done.set()
        poller.join()
        _, peak = tracemalloc.get_traced_memory()
        with open(out, "w") as fh:
            fh.write(f"tracemalloc peak {peak / 2**20:.1f} MiB; largest snapshot {best['size'] / 2**20:.1f} MiB "
                     f"at {best['at']:.2f}s\n")
            snapshot = best["snapshot"]
            if snapshot is not None:
                snapshot = snapshot.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
                for stat in snapshot.statistics("lineno")[:25]:
                    fh.write(f"{stat.size / 2**20:8.1f} MiB {stat.count:7d} blocks  {stat.traceback[0]}\n")
                fh.write("\nlargest by traceback:\n")
                for stat in snapshot.statistics("traceback")[:10]:
                    fh.write(f"{stat.size / 2**20:8.1f} MiB {stat.count:7d} blocks\n")
                    for frame in stat.traceback.format()[-12:]:
                        fh.write(f"      {frame}\n")
    return code if isinstance(code, int) else (0 if code is None else 1)


if __name__ == "__main__":
    sys.exit(main())
