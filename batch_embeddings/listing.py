"""Listing an S3 prefix fast, and keeping what was listed in a sorted file rather than in memory.

- Lean pages: 01 reads only an object's Key, Size and ETag. botocore parses every field of every object (most of the
  CPU goes to LastModified's datetimes and to walking the model for each field), so the listing client reads a
  ListObjectsV2 page's keys, sizes and paging fields itself with a few regular expressions and hands botocore an
  empty result (botocore's `before-parse` hook and its customized response); errors go through botocore as usual.
- Parallel: a delimiter listing finds a folder's sub-folders; they are listed side by side on a few threads
  (folders with few sub-folders are explored the same way, so a deep tree spreads too), and the pages are handed
  to the caller as they come; a thread asks for a page only while fewer than AHEAD_PAGES wait for the caller, so
  memory stays flat whatever the number of objects and however slow the caller is.
- Sorted: pages come in any order, so what 01 keeps of the listing goes through `sort_lines` (runs sorted in
  memory, then merged a few files at a time): the plan and the manifests never depend on the order of arrival.
"""

from __future__ import annotations

import heapq
import html
import itertools
import os
import queue
import re
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import unquote_plus

try:
    import resource
except ImportError:  # Windows: no open-file limit to read
    resource = None

LIST_THREADS = 16
AHEAD_PAGES = 8  # pages listed but not yet taken by the caller: the threads wait past this (memory stays flat)
SPREAD = LIST_THREADS  # a folder with at least this many sub-folders has them listed whole, each on its own
RUN_LINES = 100_000  # lines sorted in memory at once (about 8 MB)
MERGE_FILES = 128  # sorted runs merged at once, fewer when the open-file limit is low: 10⁷ images in one pass

_RESULT = re.compile(rb"\s*(<\?xml[^>]*\?>)?\s*<ListBucketResult[\s>]")
_CONTENTS = re.compile(rb"<Contents>(.*?)</Contents>", re.S)
_KEY = re.compile(rb"<Key>([^<]*)</Key>")
_SIZE = re.compile(rb"<Size>([0-9]+)</Size>")
_ETAG = re.compile(rb"<ETag>([^<]*)</ETag>")
_PREFIXES = re.compile(rb"<CommonPrefixes>\s*<Prefix>([^<]*)</Prefix>\s*</CommonPrefixes>")
_FIELDS = {name: re.compile(rb"<%s>([^<]*)</%s>" % (name.encode(), name.encode()))
           for name in ("IsTruncated", "NextContinuationToken", "EncodingType")}
_EMPTY = b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult></ListBucketResult>'


def _text(raw: bytes) -> str:
    """An element's text as an XML parser gives it: line ends normalised, then entities replaced."""
    text = raw.decode("utf-8")
    if "\r" in text:  # XML reads a literal CR (or CR LF) as LF; S3 writes a CR in a key as &#13;
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "&" not in text:
        return text
    if text.count("&") == text.count("&quot;"):  # an ETag: a quarter of html.unescape's CPU
        return text.replace("&quot;", '"')
    return html.unescape(text)


def _url_name(raw: bytes) -> str:
    text = _text(raw)
    return unquote_plus(text) if "%" in text or "+" in text else text


def _parse_lean(response_dict, customized_response_dict, **kwargs):
    """Read a ListObjectsV2 page's Key, Size, ETag (and what paging needs) with a few regular expressions, and hand
    botocore an empty result to parse. Anything but a 200 ListBucketResult (an error, or S3's error in a 200) is
    left to botocore."""
    from botocore import handlers

    body = response_dict.get("body")
    if response_dict.get("status_code") != 200 or not isinstance(body, bytes) or not _RESULT.match(body):
        handlers._handle_200_error(response_dict=response_dict, **kwargs)
        return
    parsed: dict = {}
    # S3 writes these before the first <Contents> (the API reference's examples), moto after the last: their place
    # is not part of the answer's form, and no element inside <Contents> or <CommonPrefixes> bears their names.
    for name, pattern in _FIELDS.items():
        found = pattern.search(body)
        if found:
            parsed[name] = _text(found.group(1))
    parsed["IsTruncated"] = parsed.get("IsTruncated") == "true"
    # Keys come URL-encoded (botocore asks for it); they are decoded here, only those with a % or a +, and
    # botocore, which would decode every one, is not told the encoding.
    name = _url_name if parsed.pop("EncodingType", None) == "url" else _text
    contents = []
    for block in _CONTENTS.findall(body):
        key, size, etag = _KEY.search(block), _SIZE.search(block), _ETAG.search(block)
        contents.append({"Key": name(key.group(1)), "Size": int(size.group(1)) if size else 0,
                         "ETag": _text(etag.group(1)) if etag else None})
    parsed["Contents"] = contents
    parsed["CommonPrefixes"] = [{"Prefix": name(p)} for p in _PREFIXES.findall(body)]
    customized_response_dict.update(parsed)
    response_dict["body"] = _EMPTY


def fast_listing_client(s3):
    """The S3 client, with its ListObjectsV2 pages read for Key, Size and ETag only (see the module's docstring)."""
    from botocore import handlers

    # botocore parses every S3 answer once more to find an error in a 200; for ListObjectsV2 _parse_lean does it.
    s3.meta.events.unregister("before-parse.s3.*", handlers._handle_200_error)
    s3.meta.events.register_first("before-parse.s3.*", _error_in_200, unique_id="listing-error-in-200")
    s3.meta.events.register_first("before-parse.s3.ListObjectsV2", _parse_lean, unique_id="listing-parse-lean")
    return s3


def _error_in_200(operation_model, **kwargs):
    from botocore import handlers

    if operation_model.name != "ListObjectsV2":
        handlers._handle_200_error(operation_model=operation_model, **kwargs)


def list_sequential(s3, bucket: str, prefix: str, owner: str) -> Iterator[dict]:
    """Every object under `prefix`, one page after the other (the reference the parallel listing must equal)."""
    token = None
    while True:
        page = s3.list_objects_v2(Bucket=bucket, Prefix=prefix, ExpectedBucketOwner=owner,
                                  **({"ContinuationToken": token} if token else {}))
        yield from page.get("Contents", [])
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return


_DONE = object()


def list_in_parallel(s3, bucket: str, prefix: str, owner: str, threads: int = LIST_THREADS,
                 page_size: int | None = None, ahead: int = AHEAD_PAGES) -> Iterator[dict]:
    """Every object under `prefix` (sub-folders included), listed on `threads` threads; in no particular order.
    At most `ahead` pages are asked for or waiting beyond the one the caller is reading.

    An error on any thread stops the others and is raised here; so is Ctrl-C (the threads stop at their next page).
    """
    out: queue.Queue = queue.Queue()
    credits = threading.Semaphore(ahead)  # one for each page asked for and not yet taken by the caller
    tasks: queue.Queue = queue.Queue()
    stop = threading.Event()
    lock = threading.Lock()
    pending = [1]

    def pages(folder: str, delimiter: bool) -> Iterator[dict]:
        token = None
        while not stop.is_set():
            if not credits.acquire(timeout=0.1):
                continue
            page = s3.list_objects_v2(Bucket=bucket, Prefix=folder, ExpectedBucketOwner=owner,
                                      **({"Delimiter": "/"} if delimiter else {}),
                                      **({"MaxKeys": page_size} if page_size else {}),
                                      **({"ContinuationToken": token} if token else {}))
            yield page
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def run(folder: str, explore: bool) -> None:
        children: list[str] = []
        for page in pages(folder, explore):
            if page.get("Contents"):
                out.put(page["Contents"])  # its credit comes back when the caller takes it
            else:
                credits.release()
            children += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        whole = len(children) >= SPREAD
        with lock:
            pending[0] += len(children)
        for child in children:
            tasks.put((child, not whole))

    def worker() -> None:
        while not stop.is_set():
            try:
                folder, explore = tasks.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                run(folder, explore)
            except BaseException as exc:  # handed to the caller, who raises it
                out.put(exc)
                stop.set()
                return
            with lock:
                pending[0] -= 1
                finished = pending[0] == 0
            if finished:
                out.put(_DONE)

    tasks.put((prefix, True))
    pool = [threading.Thread(target=worker, name=f"list-{i}", daemon=True) for i in range(threads)]
    for thread in pool:
        thread.start()
    try:
        while True:
            item = out.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            credits.release()
            yield from item
    finally:
        stop.set()
        for thread in pool:
            thread.join()


# --------------------------------------------------------------------------------------------------------------
# Sorting a listing that does not fit in memory
# --------------------------------------------------------------------------------------------------------------


def merge_width() -> int:
    """How many sorted runs to merge at once: MERGE_FILES, or fewer so that they take at most half the files this
    process may open."""
    if resource is None:
        return MERGE_FILES
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MERGE_FILES
    return max(2, min(MERGE_FILES, (soft - 32) // 2))


def sort_lines(lines: Iterable[bytes], path: Path, run_lines: int = RUN_LINES) -> int:
    """Write `lines` (each ending in a newline) to `path` sorted, keeping at most `run_lines` in memory and at
    most merge_width() + 1 files open. Returns the number of lines."""
    runs: list[Path] = []
    count = 0
    lines = iter(lines)
    while True:
        chunk = sorted(itertools.islice(lines, run_lines))
        if not chunk:
            break
        count += len(chunk)
        run = path.with_name(f"{path.name}.run{len(runs)}")
        with open(run, "wb") as fh:
            fh.writelines(chunk)
        runs.append(run)
        del chunk
    merge_runs(runs, path)
    return count


def merge_runs(runs: list[Path], path: Path) -> None:
    """Merge sorted files into `path` (removing them), at most merge_width() at a time."""
    level, width = 0, merge_width()
    while len(runs) > width:
        merged = []
        for n in range(0, len(runs), width):
            target = path.with_name(f"{path.name}.merge{level}-{n}")
            _merge(runs[n:n + width], target)
            merged.append(target)
        runs, level = merged, level + 1
    if runs:
        _merge(runs, path)
    else:
        path.write_bytes(b"")


def _merge(runs: list[Path], target: Path) -> None:
    if len(runs) == 1:
        os.replace(runs[0], target)
        return
    files = [open(run, "rb") for run in runs]
    try:
        with open(target, "wb") as out:
            out.writelines(heapq.merge(*files))
    finally:
        for fh in files:
            fh.close()
        for run in runs:
            run.unlink(missing_ok=True)
