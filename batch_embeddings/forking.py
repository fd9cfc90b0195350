"""Worker processes forked from a step, for CPU-bound work the GIL would otherwise serialise (step 3's output lines,
01's inventory data files). Forking shares what the step already holds (the index's key set, shared memory)
without copying it, but it is safe only while the step runs no other thread (a thread's held lock would be copied
locked), and only where the system has fork: otherwise the caller does the work in its own process."""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess


def can_fork() -> bool:
    """Whether this process may fork workers now."""
    return threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods()


def executor(workers: int) -> ProcessPoolExecutor:
    """A pool of `workers` forked processes that leave Ctrl-C to the step (it reaches the whole process group) and
    end with it, even when it is killed outright: an executor's worker would otherwise wait for work forever.

    What the step holds by now (modules, boto3's service models) lives until it exits: frozen, the garbage collector
    no longer walks it, in the step or in the workers, whose pages it would otherwise copy, and not at exit either
    (measured: about 0.3 s of CPU at exit with boto3's clients; Python's advice for a fork without exec)."""
    gc.freeze()
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_end_with,
                               initargs=(os.getpid(),))


def _end_with(step: int) -> None:
    """In an executor's worker: Ctrl-C is left to the step, and the kernel kills the worker when the step ends
    (Linux's PR_SET_PDEATHSIG; elsewhere nothing is set)."""
    import ctypes

    _ignore_ctrl_c()
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != step:  # the step ended before the request was made
        os._exit(1)


def start(workers: int, serve: Callable[[Connection], None]) -> list[tuple[BaseProcess, Connection]]:
    """`workers` forked processes, each running `serve` on its end of a pipe of its own, with this process's end.

    A pool without an executor's threads: the caller talks to each worker over its pipe itself (measured in step 3:
    an executor's manager and feeder threads took 0.045 ms of CPU a line, about what the main thread now spends on
    each line). Closing this process's end tells the worker to stop; a worker that dies closes the other end
    (EOFError). Frozen as in `executor`."""
    gc.freeze()
    context = multiprocessing.get_context("fork")
    started: list[tuple[BaseProcess, Connection]] = []
    for _ in range(workers):
        ours, theirs = context.Pipe()
        process = context.Process(target=_serve, args=(serve, theirs, ours), daemon=True)
        process.start()
        theirs.close()
        started.append((process, ours))
    return started


def _serve(serve: Callable[[Connection], None], conn: Connection, ours: Connection) -> None:
    _ignore_ctrl_c()
    ours.close()  # the copy of this process's end: while it lives, the worker would never see its pipe close
    serve(conn)


def _ignore_ctrl_c() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
