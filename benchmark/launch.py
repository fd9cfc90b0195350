"""Run a command and report its own peak RSS, CPU time and wall time.

    python -I -S benchmark/launch.py REPORT.json COMMAND [ARGS...]

Why not `os.wait4` on the harness's own child: Linux carries the RSS high-water mark of the process that forked
(or vforked) over to the child's ru_maxrss when the child execs, so a child of a 250 MB harness reports at least
250 MB whatever it uses itself. This launcher is a tiny process (a few MB): it forks, the child execs COMMAND, and
the launcher waits for it with wait4, so ru_maxrss is COMMAND's own (plus at most the launcher's few MB).

Writes the child's pid as the first line of REPORT.json.pid at once (so the caller can signal it), and
REPORT.json when the child ends: {"pid", "exit_code", "seconds", "maxrss_kb", "utime", "stime"}. Exits with
COMMAND's exit status (128 + N when a signal N ended it).
"""

import json
import os
import sys
import time


def main() -> int:
    report, cmd = sys.argv[1], sys.argv[2:]
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            os.execv(cmd[0], cmd)
        finally:
            os._exit(127)
    with open(report + ".pid", "w") as fh:
        fh.write(f"{pid}\n{started!r}\n")
    _, status, usage = os.wait4(pid, 0)
    ended = time.monotonic()
    code = os.waitstatus_to_exitcode(status)
    with open(report + ".tmp", "w") as fh:
        json.dump({"pid": pid, "exit_code": code, "started": started, "ended": ended, "seconds": ended - started,
                   "maxrss_kb": usage.ru_maxrss, "utime": usage.ru_utime, "stime": usage.ru_stime}, fh)
    os.replace(report + ".tmp", report)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
