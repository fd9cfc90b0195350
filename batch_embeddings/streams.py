"""Reading a job's output file as it streams from S3: a thread that reads blocks ahead (Prefetch), and the lines
with their byte offsets (read_lines), so a load resumes at a line's start."""

from __future__ import annotations

import queue
import threading
from typing import Iterator


class Prefetch:
    """A streaming body read `depth` blocks ahead by a thread of its own: a socket read releases the GIL, so the
    network's share of the work (most of it on a slow system call path) overlaps the caller's. `read` gives the
    blocks in order, b"" at the end, and raises what the reading raised. Close it to stop the thread early."""

    def __init__(self, body, block: int = 1000 << 10, depth: int = 2):  # below glibc's mmap threshold: reused
        self.blocks: queue.Queue = queue.Queue(depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(body, block), daemon=True, name="prefetch")
        self.thread.start()

    def _run(self, body, block: int) -> None:
        try:
            while not self.stop.is_set():
                data = body.read(block)
                self._put(data)
                if not data:
                    return
        except BaseException as exc:  # handed to the reader, raised there
            self._put(exc)

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.blocks.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def read(self, _n: int = -1) -> bytes:
        item = self.blocks.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)  # a read in progress ends with its timeout; nobody waits for it


def read_lines(body, start: int = 0, chunk_size: int = 4 << 20) -> Iterator[tuple[bytes, int, int]]:
    """Lines of a streaming body as (line without newline, its start offset, the offset just after it), in flat
    memory. The body is read in large blocks and each line is sliced out once (a line split across two blocks is
    joined alone, the blocks are never concatenated). A last line without a newline is yielded too; the caller
    decides whether it is whole."""
    pending = b""  # the start of a line that continues in the next block
    offset = start
    read = body.read
    while True:
        block = read(chunk_size)
        if not block:
            break
        find = block.find
        pos = 0
        if pending:
            newline = find(b"\n")
            if newline < 0:
                pending += block
                continue
            line = pending + block[:newline]
            pending = b""
            end = offset + len(line) + 1
            yield line, offset, end
            offset = end
            pos = newline + 1
        while True:
            newline = find(b"\n", pos)
            if newline < 0:
                break
            end = offset + newline - pos + 1
            yield block[pos:newline], offset, end
            offset = end
            pos = newline + 1
        pending = block[pos:]
    if pending:
        yield pending, offset, offset + len(pending)
