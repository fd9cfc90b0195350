"""Step 3's output lines examined in worker processes: the same results in the same order as in this process, the
shared-memory slots reused, a line longer than a slot, a worker that dies, a bug in a worker, workers that stop with
the step (also when it is killed), a worker that leaves Ctrl-C to the step; and the recycled request buffers."""

from __future__ import annotations

import gc
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import orjson
import pytest

import common
from batch_embeddings import forking, naming, records, streams, vectors

DIMENSION = 256


def line(i: int, rng, *, text: str = "double", **changes) -> bytes:
    uri = f"s3://images/2024/img-{i:05d}.jpg"
    values = rng.standard_normal(DIMENSION).astype(np.float32)
    embedding = [float(v) for v in values]  # Python's float text; "float32": the shortest float32 text
    if text != "double":
        embedding = orjson.loads(orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY))
    record = {"recordId": naming.record_id(uri),
              "modelInput": {"taskType": "SINGLE_EMBEDDING",
                             "singleEmbeddingParams": {"image": {"source": {"s3Location": {"uri": uri}}}}},
              "modelOutput": {"embeddings": [{"embeddingType": "IMAGE", "embedding": embedding}]}}
    record.update(changes)
    return json.dumps(record).encode() if text == "double" else orjson.dumps(record)


def sample_lines() -> list[bytes]:
    rng = np.random.default_rng(7)
    lines = [line(i, rng, text="double" if i % 3 else "float32") for i in range(400)]
    lines[3] = b""  # blank
    lines[10] = b"not json"
    lines[11] = line(11, rng, error={"errorCode": 400, "errorMessage": "bad image"})
    lines[12] = line(12, rng, recordId="someone-else")  # joined by the URI, reported
    lines[13] = lines[13].replace(b"]}]}", b",1.0]}]}")  # one value too many
    lines[50] = line(50, rng) + b" " * (70 << 10)  # longer than a slot: examined in the main process, in its turn
    return lines


class Blocks:
    """`data` as a stream whose reads give blocks of these sizes in turn, whatever was asked (as the prefetch does)."""

    def __init__(self, data: bytes, sizes=(1000 << 10,)):
        self.data, self.sizes, self.pos, self.reads = data, sizes, 0, 0

    def read(self, _n: int = -1) -> bytes:
        size = self.sizes[self.reads % len(self.sizes)]
        self.reads += 1
        block = self.data[self.pos:self.pos + size]
        self.pos += len(block)
        return block


def stream(lines: list[bytes], **kw) -> Blocks:
    return Blocks(b"\n".join(lines) + b"\n", **kw)


def plain(results):
    return [(tuple(bytes(x) if isinstance(x, memoryview) else x for x in r) if r else r, start, end)
            for r, start, end in results]


def in_a_fresh_process(check, *args):
    """Run `check` in a new interpreter: a pool forks only a process that runs one thread, and the test process
    runs the stand-ins' threads."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
        return fresh.submit(check, *args).result()


BLOCK_SIZES = [(1000 << 10,), (7, 70_001, 200_000, 1 << 20), (65_536,), (3_000_000,)]


def workers_match_this_process():
    records.SLOT_BYTES = 64 << 10  # a few lines a slot: the slots go round many times
    lines = sample_lines()
    data = b"\n".join(lines) + b"\n"
    rng = np.random.default_rng(3)
    ends_long = data + line(400, rng) + b" " * (70 << 10)  # a last line longer than a slot, without its newline
    ends_short = data + line(401, rng)  # a last line without its newline
    resume_at = sum(len(raw) + 1 for raw in lines[:200])
    cases = [(text, 0) for text in (data, ends_long, ends_short, b"x")] + [(data[resume_at:], resume_at)]
    assert threading.active_count() == 1  # so the pool forks
    got = {}
    with records.pool(2) as workers:
        assert workers is not None
        for n, (text, start) in enumerate(cases):
            expected = list(records.examined(Blocks(text), start, "job-1", DIMENSION, None))
            assert [text[s - start:e - start].rstrip(b"\n") for _, s, e in expected] == text.rstrip(b"\n").split(b"\n")
            assert expected[-1][2] == start + len(text)  # to the end, with or without a last newline
            for sizes in BLOCK_SIZES:
                got[n, sizes] = plain(records.examined(Blocks(text, sizes), start, "job-1", DIMENSION, workers))
                assert got[n, sizes] == expected, (n, sizes)
    return (got[0, BLOCK_SIZES[0]], got[1, BLOCK_SIZES[1]][-1], got[2, BLOCK_SIZES[2]][-1], got[3, BLOCK_SIZES[3]],
            got[4, BLOCK_SIZES[3]][0])


def test_workers_give_the_results_of_this_process_in_order():
    # the same results and spans, whatever the blocks the stream gives: lines that straddle blocks and slots,
    # lines longer than a slot, a last line without its newline (longer than a slot, or not), a resumed stream
    got, ends_long, ends_short, one_byte, resumed = in_a_fresh_process(workers_match_this_process)
    kinds = [r[0] if r else None for r, _, _ in got]
    assert kinds.count(records.OK) == 396 and kinds.count(records.FAIL) == 3 and kinds[3] is None
    assert got[12][0][-1] is True and got[13][0][3] == "InvalidEmbedding" and got[50][0][0] == records.OK
    assert ends_long[0][0] == ends_short[0][0] == records.OK and ends_long[2] - ends_long[1] > 70 << 10
    assert [(r[0], r[3], start, end) for r, start, end in one_byte] == [(records.FAIL, "MalformedLine", 0, 1)]
    assert resumed[1:] == got[200][1:] and resumed[0][1] == got[200][0][1]


def test_no_pool_for_no_workers_or_when_threads_run():
    with records.pool(0) as workers:
        assert workers is None
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        with records.pool(2) as workers:  # forking a process that runs threads is not safe
            assert workers is None
    finally:
        stop.set()
        thread.join()


def a_worker_dies():
    lines = sample_lines() * 3
    try:
        with records.pool(1) as workers:
            os.kill(workers.processes[0].pid, signal.SIGKILL)
            list(records.examined(stream(lines), 0, "job-1", DIMENSION, workers))
    except common.StepError as exc:
        return str(exc), exc.exit_code
    return None


def _dies(raw, job_id, dimension):
    os._exit(9)  # as the kernel's OOM killer would end it: mid-chunk, without a word


def a_worker_dies_on_its_chunk():
    records.examine = _dies  # before the fork: the workers run it
    try:
        with records.pool(1) as workers:
            list(records.examined(stream(sample_lines()), 0, "job-1", DIMENSION, workers))
    except common.StepError as exc:
        return str(exc), exc.exit_code
    return None


@pytest.mark.parametrize("dies", [a_worker_dies, a_worker_dies_on_its_chunk])
def test_a_worker_that_dies_stops_with_one_line(dies):
    message, code = in_a_fresh_process(dies)
    assert "worker process" in message and "--workers 0" in message and code == common.EXIT_ERROR


def _interrupt_this_process() -> str:
    os.kill(os.getpid(), signal.SIGINT)  # delivered before kill returns: a default handler raises right here
    return "went on"


def _answer(conn, ask) -> None:  # a worker started by forking.start: answers what `ask` returns, once
    try:
        conn.send(ask())
    except KeyboardInterrupt:
        conn.send("interrupted")


def in_a_worker(started_by: str, ask):
    """What `ask` returns in a worker of forking.executor (01's inventory) or forking.start (step 3's lines)."""
    if started_by == "executor":
        with forking.executor(1) as pool:
            try:
                return pool.submit(ask).result()
            except KeyboardInterrupt:
                return "interrupted"
    [(process, conn)] = forking.start(1, lambda theirs: _answer(theirs, ask))
    try:
        return conn.recv()
    finally:
        conn.close()
        process.join()


def ctrl_c_in_a_worker(started_by: str):
    return in_a_worker(started_by, _interrupt_this_process)


@pytest.mark.parametrize("started_by", ["executor", "start"])
def test_a_worker_leaves_ctrl_c_to_the_step(started_by):
    # Ctrl-C reaches the whole process group: the step stops its workers itself, with its one line
    assert in_a_fresh_process(ctrl_c_in_a_worker, started_by) == "went on"


def collected_before_and_after_the_fork(started_by: str):
    held = {"service model": [{"shape": "PutVectorsInput"}]}  # what a step holds before its pool: boto3's models

    def walked() -> bool:  # whether a collection still visits it
        return any(o is held for o in gc.get_objects())

    before = walked()
    in_worker = in_a_worker(started_by, gc.get_freeze_count)
    return before, walked(), gc.is_tracked(held), in_worker


@pytest.mark.parametrize("started_by", ["executor", "start"])
def test_what_the_step_holds_is_frozen_before_the_workers_fork(started_by):
    # A collection (in the step, in each worker and at exit) would walk boto3's models again and again, and in a
    # worker copy every page it touches: ~0.3 s of CPU at exit alone.
    before, after, tracked, in_worker = in_a_fresh_process(collected_before_and_after_the_fork, started_by)
    assert before and not after and tracked
    assert in_worker > 0  # the worker inherits the frozen generation


def stopping_early():
    lines = sample_lines() * 3
    with records.pool(2) as workers:
        results = records.examined(stream(lines), 0, "job-1", DIMENSION, workers)
        first = next(results)  # chunks are in flight in both workers when the step stops reading
        results.close()
        processes = workers.processes
    return first[0][0], [(process.is_alive(), process.exitcode) for process in processes]


def test_workers_stop_with_the_step_when_it_stops_early():
    # each worker sees its pipe close and ends on its own: not left running, not killed
    first, ended = in_a_fresh_process(stopping_early)
    assert first == records.OK
    assert ended == [(False, 0), (False, 0)]


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"  # a zombie has ended
    except (FileNotFoundError, IndexError):
        return False


STEP_WITH_WORKERS = {  # a step that starts its workers, prints their process ids and waits to be killed
    "start": "import time\nfrom batch_embeddings import records\n"
             "with records.pool(2) as workers:\n"
             "    print(*[process.pid for process in workers.processes], flush=True)\n"
             "    time.sleep(120)\n",
    "executor": "import time\nfrom batch_embeddings import forking\n"
                "pool = forking.executor(2)\n"
                "pool.submit(time.sleep, 0).result()  # the workers are forked with the first task\n"
                "print(*pool._processes, flush=True)\n"
                "time.sleep(120)\n",
}


@pytest.mark.parametrize("started_by", ["executor", "start"])
def test_workers_do_not_outlive_a_step_that_is_killed(started_by):
    # cron's timeout or the kernel's OOM killer may end a step with SIGKILL, with no chance to stop its workers:
    # they end with it rather than wait for work forever (an executor's workers did): step 3's see their pipes
    # close, 01's are killed by the kernel
    step = subprocess.Popen([sys.executable, "-c", STEP_WITH_WORKERS[started_by]],
                            cwd=Path(records.__file__).parent.parent, stdout=subprocess.PIPE, text=True)
    pids = [int(pid) for pid in step.stdout.readline().split()]
    assert len(pids) == 2 and all(map(_running, pids))
    step.kill()
    step.wait()
    deadline = time.monotonic() + 30  # bounds only a failure: they end within milliseconds
    while any(map(_running, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [pid for pid in pids if _running(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == []


def _fails(raw, job_id, dimension):
    raise ZeroDivisionError("a bug")


def a_bug_in_a_worker():
    records.examine = _fails  # before the fork: the workers run it
    with records.pool(1) as workers:
        try:
            list(records.examined(stream(sample_lines()), 0, "job-1", DIMENSION, workers))
        except RuntimeError as exc:
            return str(exc)
    return None


def test_a_bug_in_a_worker_is_raised_in_the_step():
    assert in_a_fresh_process(a_bug_in_a_worker) == "examining output lines failed: ZeroDivisionError('a bug')"


def test_a_recycled_buffer_is_written_again_and_others_stay_intact():
    batcher = vectors.Batcher("bucket", "index", max_vectors=2)
    parts = [orjson.dumps({"key": f"k{i}", "data": {"float32": [i + 0.5]}}) for i in range(6)]

    def keys(batch) -> list[str]:
        return [v["key"] for v in orjson.loads(batch.body)["vectors"]]

    closed = [b for p in parts if (b := batcher.add(p, dict)) is not None] + [batcher.flush({})]
    assert [keys(b) for b in closed] == [["k0", "k1"], ["k2", "k3"], ["k4", "k5"]]
    first, second, third = closed
    buffer = first.buffer
    batcher.recycle(first)
    assert first.body == b"" and first.buffer is None
    again = [b for p in parts[:3] if (b := batcher.add(p, dict)) is not None] + [batcher.flush({})]
    assert [keys(b) for b in again] == [["k0", "k1"], ["k2"]]
    assert again[1].buffer is buffer  # the recycled one, written from its start
    assert keys(second) == ["k2", "k3"] and keys(third) == ["k4", "k5"]  # not recycled: left as they were


def test_prefetch_reads_ahead_in_order_and_hands_on_errors():
    data = b"".join(b"line %d\n" % i for i in range(1000))
    prefetch = streams.Prefetch(io.BytesIO(data), block=100, depth=2)
    assert b"".join(iter(lambda: prefetch.read(), b"")) == data
    prefetch.close()

    class Broken:
        def read(self, _n):
            raise ConnectionResetError("the connection dropped")

    prefetch = streams.Prefetch(Broken())
    with pytest.raises(ConnectionResetError):
        prefetch.read()
    prefetch.close()
    assert not prefetch.thread.is_alive()
