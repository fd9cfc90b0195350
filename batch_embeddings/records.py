"""What step 3 makes of each line of a job's output: a PutVectors part for the index, or a failure and its reason.

`examine` is pure, so lines can be examined in other processes. Turning an embedding's 3,072 numbers of text into
float32 JSON costs about as much CPU as everything else step 3 does together (≈ 0.23 ms a line of Python float
text): at the index's write quota (2,500 vectors/s) it takes more than half a core. `examined` hands the output
stream, a slot of shared memory at a time, to a pool of worker processes (`pool`) that find and examine its lines,
and gives the results back in order; without a pool it examines them in this process.
"""

from __future__ import annotations

import mmap
import pickle
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import NamedTuple

import orjson

import common
from batch_embeddings import forking, naming, nova, streams, vectors
from common import StepError

OK, FAIL = "ok", "fail"
SLOT_BYTES = 1 << 20  # lines handed to a worker at once (about 15 output lines at 3,072 dimensions)
MIN_RECORDS = 2000  # below this a pool costs more to start (forking, importing) than it saves


def examine(raw: bytes, job_id: str, dimension: int) -> tuple | None:
    """One output line: None when blank; (OK, vector key, PutVectors part, recordId mismatched) for a vector the
    index takes; (FAIL, recordId, image URI, error code, message, recordId mismatched) for anything else.

    The embedding's array (nearly all of the line) is cut out and encoded from its text; only the rest of the line
    is parsed as JSON. A line that does not look as expected is parsed whole."""
    if not raw.strip():
        return None
    record = text = None
    cut = vectors.cut_embedding(raw)
    if cut is not None:
        try:
            record = orjson.loads(cut[0])
            if record["modelOutput"]["embeddings"][0]["embedding"] == vectors.CUT_VALUE:
                text = cut[1]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
            record = None
    if text is None:
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return FAIL, None, None, "MalformedLine", f"not JSON: {exc}", False
        if not isinstance(record, dict):
            return FAIL, None, None, "MalformedLine", "not a JSON object", False
    record_id, uri = record.get("recordId"), nova.image_uri(record)
    mismatched = uri is not None and not naming.record_id_matches(record_id, uri)  # joined by the URI: reported
    if "error" in record:
        err = record["error"] if isinstance(record["error"], dict) else {"errorMessage": str(record["error"])}
        return FAIL, record_id, uri, err.get("errorCode", "Error"), err.get("errorMessage", ""), mismatched
    metadata = {"source_uri": uri, "job_id": job_id}
    try:
        if uri is None:
            raise KeyError("modelInput image s3Location uri")
        key = naming.vector_key(uri)
        if text is not None:
            try:
                part = vectors.encode_text(key, text, dimension, metadata)
            except orjson.JSONDecodeError as exc:
                return FAIL, record_id, uri, "MalformedLine", f"not JSON: {exc}", mismatched
        else:
            embedding = record["modelOutput"]["embeddings"][0]["embedding"]
            part = vectors.encode_vector(key, embedding, dimension, metadata)
    except (KeyError, IndexError, TypeError) as exc:
        return FAIL, record_id, uri, "MalformedLine", f"no {exc} in the record", mismatched
    except vectors.VectorError as exc:
        return FAIL, record_id, uri, "InvalidEmbedding", str(exc), mismatched
    return OK, key, part, mismatched


class Pool(NamedTuple):
    conns: list[Connection]  # one a worker: slot k goes to worker k % workers, which answers in the order it is sent
    processes: list[BaseProcess]
    shared: mmap.mmap  # 2 * workers slots, each SLOT_BYTES of lines in and SLOT_BYTES of requests out

    @property
    def workers(self) -> int:
        return len(self.conns)


_shared: mmap.mmap | None = None  # the pool's shared memory, as a forked worker inherits it


def _examine_chunk(slot: int, length: int, job_id: str, dimension: int) -> list[tuple[tuple | None, int]]:
    """In a worker: examine the lines the main process put in the first `length` bytes of `slot` (whole lines; the
    last one without its newline only at the end of the file) and write each part into the slot's second half.
    Returns (result, the line's length with its newline) for each line, the part's (offset, length) in place of the
    part (a part that does not fit is returned as it is)."""
    shared = _shared
    pos = slot * 2 * SLOT_BYTES
    stop = pos + length
    out = end = pos + SLOT_BYTES
    end += SLOT_BYTES
    find = shared.find
    results: list[tuple[tuple | None, int]] = []
    while pos < stop:
        newline = find(b"\n", pos, stop)
        line_end = stop if newline < 0 else newline
        result = examine(shared[pos:line_end], job_id, dimension)
        if result is not None and result[0] == OK and out + len(result[2]) <= end:
            part = result[2]
            shared[out:out + len(part)] = part
            result = (OK, result[1], (out, len(part)), result[3])
            out += len(part)
        following = stop if newline < 0 else newline + 1
        results.append((result, following - pos))
        pos = following
    return results


def _serve(conn: Connection) -> None:
    """A worker's loop: examine the chunks it is sent, in order, until the step closes its end of the pipe."""
    while True:
        try:
            slot, length, job_id, dimension = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):  # the step closed its end (a reset, when it left an answer unread)
            return
        try:
            results = _examine_chunk(slot, length, job_id, dimension)
        except Exception as exc:  # a bug: raised in the step, which reports it
            results = RuntimeError(f"examining output lines failed: {exc!r}")
        try:
            conn.send_bytes(pickle.dumps(results, pickle.HIGHEST_PROTOCOL))
        except OSError:  # the step has stopped reading
            return


class WorkerStopped(Exception):
    """A worker process ended while it had lines to examine."""


@contextmanager
def pool(workers: int):
    """A Pool of `workers` processes to examine lines in, stopped on the way out; None when workers is 0 or when
    this process cannot fork safely (it runs other threads, or the system has no fork): lines are then examined in
    this process.

    Lines and requests go through shared memory: a pipe costs more CPU than the work it would carry (measured:
    0.16 ms a line on the main side, 0.26 on the worker side); a worker's pipe carries only which slot to read and
    how far, and the results. The workers are forked at once, before the caller starts threads of its own."""
    global _shared
    if workers <= 0 or not forking.can_fork():
        yield None
        return
    _shared = mmap.mmap(-1, 2 * workers * 2 * SLOT_BYTES)  # anonymous and shared: the forked workers see it
    started = forking.start(workers, _serve)
    try:
        yield Pool([conn for _, conn in started], [process for process, _ in started], _shared)
    except WorkerStopped:
        raise StepError("a worker process examining output lines stopped (out of memory?) — run step 3 again; "
                        "it resumes where the index last confirmed, or give --workers 0", common.EXIT_ERROR) from None
    finally:
        for _, conn in started:
            conn.close()  # the worker ends once it has answered what it holds
        for process, _ in started:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        try:
            _shared.close()
        except BufferError:
            pass  # a view of a part is still referenced (an error on its way out): freed with the process
        _shared = None


class _Sent:
    """A chunk sent to a worker; its results are the next the worker answers."""

    def __init__(self, conn: Connection, slot: int, length: int, job_id: str, dimension: int):
        self.conn = conn
        try:
            conn.send_bytes(pickle.dumps((slot, length, job_id, dimension), pickle.HIGHEST_PROTOCOL))
        except OSError:
            raise WorkerStopped from None

    def result(self) -> list:
        try:
            results = pickle.loads(self.conn.recv_bytes())
        except (EOFError, OSError):
            raise WorkerStopped from None
        if isinstance(results, BaseException):
            raise results
        return results


class _Done:
    """A line examined in this process, in the queue of the chunks the workers have."""

    def __init__(self, results: list):
        self.results = results

    def result(self) -> list:
        return self.results


def examined(body, start: int, job_id: str, dimension: int,
             workers: Pool | None) -> Iterator[tuple[tuple | None, int, int]]:
    """(examine's result, start, end) for each line of `body` (a stream read with `read`, from byte `start` of its
    file), in order; a last line without its newline is examined too.

    With a pool, the stream's blocks are copied into shared memory as they come, a slot at a time; each slot's whole
    lines go to a worker, which finds the lines itself, and the start of the next line is moved to the next slot:
    this process never touches a line on its own. Two chunks a worker are in flight (memory stays flat); a line
    longer than a slot is examined here, in its turn."""
    if workers is None:
        for raw, line_start, end in streams.read_lines(body, start):
            yield examine(raw, job_id, dimension), line_start, end
        return
    shared, view, slots = workers.shared, memoryview(workers.shared), 2 * workers.workers
    in_flight: deque[tuple[_Sent | _Done, int, int | None]] = deque()  # (results, where they start, slot), oldest first
    busy: set[int] = set()
    slot = base = fill = 0  # the slot being filled: its first byte and the end of what it holds
    offset = start  # of the slot's first byte in the file
    long: bytearray | None = None  # a line longer than a slot, while it is read

    def oldest() -> Iterator[tuple[tuple | None, int, int]]:
        results, at, done_slot = in_flight.popleft()
        busy.discard(done_slot)
        for result, length in results.result():
            if result is not None and result[0] == OK and type(result[2]) is tuple:
                part_at, part_length = result[2]
                result = (OK, result[1], view[part_at:part_at + part_length], result[3])  # copied once, into the batch
            yield result, at, at + length
            at += length

    def send(length: int) -> Iterator[tuple[tuple | None, int, int]]:
        """Hand the slot's first `length` bytes to its worker and move what follows them to the next slot."""
        nonlocal slot, base, fill, offset
        in_flight.append((_Sent(workers.conns[slot % workers.workers], slot, length, job_id, dimension), offset, slot))
        busy.add(slot)
        offset += length
        rest, rest_end = base + length, fill
        slot = (slot + 1) % slots
        while slot in busy:  # the next slot still holds a chunk in flight: take its results first
            yield from oldest()
        base = slot * 2 * SLOT_BYTES
        fill = base + rest_end - rest
        view[base:fill] = view[rest:rest_end]  # the start of a line: the chunk sent does not reach it

    def examine_here(line: bytearray, length: int) -> None:
        nonlocal offset
        in_flight.append((_Done([(examine(bytes(line), job_id, dimension), length)]), offset, None))
        offset += length

    while block := body.read(SLOT_BYTES):
        data = memoryview(block)
        pos = 0
        while pos < len(block):
            if long is not None:
                newline = block.find(b"\n", pos)
                if newline < 0:
                    long += data[pos:]
                    break
                long += data[pos:newline]
                examine_here(long, len(long) + 1)
                long, pos = None, newline + 1
                continue
            taken = min(base + SLOT_BYTES - fill, len(block) - pos)
            view[fill:fill + taken] = data[pos:pos + taken]
            fill += taken
            pos += taken
            if fill == base + SLOT_BYTES:
                newline = shared.rfind(b"\n", base, fill)
                if newline >= 0:
                    yield from send(newline + 1 - base)
                else:  # the slot holds the start of one line, longer than a slot
                    long, fill = bytearray(view[base:fill]), base
    if long is not None:
        examine_here(long, len(long))
    elif fill > base:
        yield from send(fill - base)
    while in_flight:
        yield from oldest()
