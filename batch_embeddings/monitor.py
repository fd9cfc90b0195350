"""What step 2 shows of a run: the jobs' statuses, read with a few paged ListModelInvocationJobs calls, as a compact
table that fits the screen, redrawn in place on a terminal."""

from __future__ import annotations

import os
import shutil
import sys
from datetime import datetime, timedelta

LIST_PAGE_SIZE = 1000  # ListModelInvocationJobs' largest page
LIST_FROM = 4  # jobs to check from which one ListModelInvocationJobs is cheaper than a GetModelInvocationJob each
STATUS_ORDER = ("Failed", "Expired", "Stopped", "Stopping", "PartiallyCompleted", "InProgress", "Scheduled",
                "Validating", "Submitted", "Submitting", "Queued", "Completed")


def record_status(job: dict, status: dict) -> None:
    """Keep a job's status, counts and failure message (from Get or List: the same fields) in its record."""
    job["status"] = status["status"]
    job["counts"] = {k: status.get(k) for k in ("totalRecordCount", "processedRecordCount", "successRecordCount",
                                                 "errorRecordCount") if status.get(k) is not None}
    if status.get("message"):
        job["message"] = status["message"]


def run_name_prefix(names: list[str]) -> str | None:
    """The jobs' common name prefix, as ListModelInvocationJobs' nameContains takes it (None: no useful one)."""
    prefix = os.path.commonprefix(names)[:63]
    while prefix and not prefix[0].isalnum():
        prefix = prefix[1:]
    return prefix or None


def job_statuses(bedrock, run_jobs: list[dict], since: str | None) -> dict[str, dict]:
    """jobArn -> status of each job, read with ListModelInvocationJobs (paged, filtered by the jobs' name prefix
    and the run's start) instead of one GetModelInvocationJob a job; a job the list misses is asked for by Get."""
    wanted = {job["job_arn"] for job in run_jobs}
    found: dict[str, dict] = {}
    if len(run_jobs) >= LIST_FROM:
        query: dict = {"PaginationConfig": {"PageSize": LIST_PAGE_SIZE}}
        prefix = run_name_prefix([job["job_name"] for job in run_jobs])
        if prefix:
            query["nameContains"] = prefix
        if since:
            # The run's start, less a day for a clock that is off: the filter only trims the list.
            query["submitTimeAfter"] = datetime.fromisoformat(since) - timedelta(days=1)
        for page in bedrock.get_paginator("list_model_invocation_jobs").paginate(**query):
            for summary in page.get("invocationJobSummaries", []):
                if summary["jobArn"] in wanted:
                    found[summary["jobArn"]] = summary
    for arn in sorted(wanted - set(found)):
        found[arn] = bedrock.get_model_invocation_job(jobIdentifier=arn)
    return found


def run_lines(info: dict, rows: int) -> list[str]:
    """The run as a compact table: one line a job (the most telling first) up to `rows` lines, then a summary
    line by status and the overall progress."""
    batch = [job for job in info["jobs"] if not job.get("on_demand")]
    label = (lambda job: job["job_name"].rsplit("-", 1)[-1]) if len(batch) > 1 else (lambda job: job["job_name"])
    total = processed = 0
    by_status: dict[str, int] = {}
    table = []
    for job in batch:
        counts = job.get("counts", {})
        status = job.get("status") or ("Submitting" if job.get("uploaded") else "Queued")
        by_status[status] = by_status.get(status, 0) + 1
        total += job["record_count"]
        done = counts.get("processedRecordCount", 0) if status not in ("Queued", "Submitting") else 0
        processed += done
        stats = f"{done}/{job['record_count']}" if counts else f"-/{job['record_count']}"
        rank = STATUS_ORDER.index(status) if status in STATUS_ORDER else 0
        table.append((rank, len(table), f"{label(job):<8} {status:<18} {stats:>15}  {job['input_folder'] or '/'}"))
    table.sort()
    lines = [f"{'job':<8} {'status':<18} {'processed':>15}  input folder"]
    room = max(rows - 1, 1)
    shown = table if len(table) <= room else table[:room - 1]
    lines += [line for _, _, line in shown]
    if len(shown) < len(table):
        lines.append(f"... and {len(table) - len(shown)} more job(s)")
    lines.append("Jobs: " + (", ".join(f"{status} {n}" for status, n in sorted(by_status.items())) or "none"))
    lines.append(f"Overall progress: {100.0 * processed / max(total, 1):.1f}% ({processed}/{total} records)")
    for part in info["jobs"]:
        if part.get("on_demand"):
            lines.append(f"On demand: {part['record_count']} image(s), embedded and loaded by step 3")
    return lines


class Display:
    """Prints what each poll shows. On a terminal, the block is redrawn in place (cursor up and clear) instead of
    scrolling, its lines cut to the terminal's width; what happened meanwhile (a job submitted, inputs removed)
    is printed above it and scrolls. Elsewhere (cron, a log file) everything is simply printed."""

    def __init__(self, out=None, tty: bool | None = None, size=shutil.get_terminal_size):
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.size = size
        self.height = 0  # lines of the block on screen, to redraw

    def rows(self) -> int:
        """Lines the table may take: a screenful, less the block's title, summary and footer (7) and a spare."""
        return max(self.size().lines - 9, 5)

    def show(self, events: str, block: list[str]) -> None:
        width = self.size().columns
        if self.height:  # only ever set on a terminal
            self.out.write(f"\x1b[{self.height}F\x1b[J")  # to the block's first line, clear to the end
        self.out.write(events)
        if self.tty:
            room = max(width - 1, 10)
            block = [line if len(line) <= room else line[:room - 1] + "…" for line in block]
        self.out.write("".join(line + "\n" for line in block))
        self.out.flush()
        self.height = len(block) if self.tty else 0

    def forget(self) -> None:
        """Something else was printed below the block (a prompt): the next block starts below it."""
        self.height = 0


def elapsed_text(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
