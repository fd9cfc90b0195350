"""What step 3 makes of a job's output while it loads it: the account of every record (Loader), the checkpoint the
index confirmed (Checkpoint, saved in the job-info file so a killed load resumes), and the progress it shows."""

from __future__ import annotations

import shutil
import sys
import threading
import time
from pathlib import Path

import orjson

from batch_embeddings import jobinfo, records, vectors


def failure(record_id, uri, code, message, file_key, offset) -> dict:
    """A line of a job's load report: a record step 3 could not load, and why."""
    return {"recordId": record_id, "source_uri": uri, "error_code": code, "error_message": message,
            "file": file_key, "offset": offset}


class Loader:
    """Turns result lines into PutVectors batches and keeps the account of every record."""

    def __init__(self, job_id: str, dimension: int, batcher: vectors.Batcher, report, start: dict):
        self.job_id = job_id
        self.dimension = dimension
        self.batcher = batcher
        self.report = report
        self.counts = dict(start.get("counts") or {"total": 0, "success": 0, "error": 0, "inserted": 0})
        self.mismatched_ids = 0  # lines read by this process whose recordId is not their image's (only reported)
        self.provenance = None  # a mirror.Provenance: what each vector records of its image besides its URI

    def mark(self, file_key: str, offset: int, counts: dict | None = None, done: bool = False) -> dict:
        """The position to resume from: the file and byte offset, the counts and the report's size there."""
        self.report.flush()
        return {"file": file_key, "offset": offset, "done": done, "counts": dict(counts or self.counts),
                "report_bytes": self.report.tell()}

    def fail(self, record_id, uri, code, message, file_key, offset) -> None:
        self.counts["error"] += 1
        self.report.write(orjson.dumps(failure(record_id, uri, code, message, file_key, offset)) + b"\n")

    def take(self, result: tuple | None, file_key: str, start: int, offset: int) -> vectors.Batch | None:
        """Account for one output line (bytes start..offset) from records.examine's `result`; returns a batch when
        this line closed one."""
        if result is None:
            return None
        before = dict(self.counts)
        self.counts["total"] += 1
        self.mismatched_ids += result[-1]
        if result[0] == records.FAIL:
            self.fail(*result[1:5], file_key, offset)
            return None
        _, key, part, _ = result
        if self.provenance is not None:  # its metadata object closes the vector's: `...}}`
            part = b"".join((part[:-2], self.provenance.suffix(key), b"}}"))
        self.counts["success"] += 1
        # A batch this vector closes ends just before this line: on resume, reading starts again here.
        return self.batcher.add(part, lambda: self.mark(file_key, start, before), key)

    def line(self, raw: bytes, file_key: str, start: int, offset: int) -> vectors.Batch | None:
        """take() of one line examined in this process."""
        return self.take(records.examine(raw, self.job_id, self.dimension), file_key, start, offset)


class Checkpoint:
    """How far the index has confirmed every record: batches complete out of order, the mark moves in order.

    Saved into the job-info file (after every confirmed batch, and at the end), so a killed load resumes
    after the last confirmed batch instead of from the start. It names the vector bucket and index it was made
    against: it means nothing for another index.

    The vectors the index refused in the batches confirmed so far are kept in it too (`refused`, as load report
    lines): the checkpoint moves past them, and they are written at the end of the job's load report, each time
    the job is loaded (the report's lines before `report_bytes` are those of the output lines read).
    """

    def __init__(self, info: dict, job: dict, path: Path, where: dict):
        self.info, self.job, self.path, self.where = info, job, path, where
        self.done: dict[int, vectors.Batch] = {}
        self.next_seq = 0
        self.state = dict(job.get("load") or {"files": {}}, **where)
        self.inserted = self.state.get("counts", {}).get("inserted", 0)
        self.refused: list[dict] = [entry for entry in self.state.get("refused") or [] if isinstance(entry, dict)]
        self.lock = threading.Lock()
        self.save_lock = threading.Lock()
        self.confirmed_keys: set[str] = set()  # what the index confirmed to this process: no need to ask again

    def confirm(self, batch: vectors.Batch) -> None:
        with self.lock:
            self.done[batch.seq] = batch
            self.confirmed_keys.update(batch.keys)
            while self.next_seq in self.done:
                confirmed = self.done.pop(self.next_seq)
                self.next_seq += 1
                self.inserted += confirmed.count
                mark = confirmed.mark
                if confirmed.refused:  # a new list: a saved state is never mutated
                    self.refused = self.refused + [
                        failure(None, vector.source_uri, "ValidationException",
                                f"S3 Vectors refused the vector: {vector.message}", mark["file"], None)
                        for vector in confirmed.refused]
                files = dict(self.state.get("files", {}))
                files[mark["file"]] = {"offset": mark["offset"], "done": mark["done"]}
                self.state = {"files": files, "counts": dict(mark["counts"], inserted=self.inserted),
                              "report_bytes": mark["report_bytes"], **self.where}
                if self.refused:
                    self.state["refused"] = self.refused

    def save(self) -> None:
        with self.save_lock:
            with self.lock:
                self.job["load"] = self.state  # replaced, never mutated, by confirm()
            jobinfo.save(self.path, self.info)


def duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds > 359_999:
        return "--:--"
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Vectors confirmed by the index, of the job's records, with the rate and time left of this run only (vectors
    confirmed before a resume are not counted in the rate).

    On a terminal: one bar redrawn in place, never as wide as the terminal (a wrapped line cannot be redrawn with
    \\r), at most every `every` seconds. Elsewhere (a log, cron): one line every `every` seconds. Called when a batch
    is confirmed, never per record. Other messages go through `print`, so they never share the bar's line.
    """

    def __init__(self, expected: int, tty: bool, *, already: int = 0, out=None, clock=time.monotonic,
                 width=None, every: float | None = None):
        self.expected, self.tty = max(expected, 1), tty
        self.already = self.inserted = already
        self.out = out if out is not None else sys.stdout
        self.clock = clock
        self.width = width or (lambda: shutil.get_terminal_size().columns)
        self.every = every if every is not None else (0.2 if tty else 5.0)
        self.started = clock()
        self.next_show = self.started + (0 if tty else self.every)
        self.on_screen = False  # a bar is on the current line
        self.lock = threading.Lock()

    def figures(self) -> tuple[float, str, str]:
        elapsed = self.clock() - self.started
        rate = (self.inserted - self.already) / elapsed if elapsed > 0 else 0.0
        left = (self.expected - self.inserted) / rate if rate > 0 and self.inserted < self.expected else None
        return min(1.0, self.inserted / self.expected), f"{rate:,.0f} vectors/s", duration(left)

    def bar(self) -> str:
        done, rate, left = self.figures()
        text = f" {done:4.0%} {self.inserted:,}/{self.expected:,} vectors, {rate}, {left} left"
        room = max(self.width() - 1, 1)  # the last column would wrap on some terminals
        cells = min(40, room - len(text) - 2)
        if cells >= 10:
            filled = int(done * cells)
            text = "[" + "#" * filled + " " * (cells - filled) + "]" + text
        return text[:room]

    def update(self, inserted: int, force: bool = False) -> None:
        with self.lock:
            self.inserted = inserted
            if not force and self.clock() < self.next_show:
                return
            self.next_show = self.clock() + self.every
            if self.tty:
                self._clear()
                self.out.write(self.bar())
                self.on_screen = True
            else:
                done, rate, left = self.figures()
                self.out.write(f"Inserted {self.inserted:,} of {self.expected:,} vectors ({done:.0%}), "
                               f"{rate} this run, {left} left\n")
            self.out.flush()

    def _clear(self) -> None:
        if self.on_screen:
            self.out.write("\r" + " " * max(self.width() - 1, 0) + "\r")
            self.on_screen = False

    def print(self, message: str) -> None:
        """A line of its own; on a terminal the bar is cleared first and drawn again below it."""
        with self.lock:
            redraw = self.on_screen
            self._clear()
            self.out.write(message + "\n")
            if redraw:
                self.out.write(self.bar())
                self.on_screen = True
            self.out.flush()

    def close(self) -> None:
        if self.tty:
            self.update(self.inserted, force=True)
            with self.lock:
                self.out.write("\n")
                self.on_screen = False
        elif self.inserted > self.already:
            self.update(self.inserted, force=True)
