"""The parallel listing gives every page's credit back (a page taken by the caller, a page with no objects): a
listing of many more pages than it may keep ahead ends, and a lost credit fails here in seconds, not at the
suite's timeout."""

from __future__ import annotations

import itertools
import queue
import random
import threading
import types

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.config import Config
from botocore.exceptions import ClientError

import common
from batch_embeddings import listing
from tests.test_listing_reader import _client, _Raw, assert_equal, used

BOUND = 20  # seconds: a listing of a few hundred pages from memory takes well under one


class TreeS3:
    """ListObjectsV2 of a tree: `folders` sub-folders under the prefix, each with `pages` pages of one object; the
    delimiter listing of the prefix gives the sub-folders only (pages without objects), one per page."""

    def __init__(self, folders: int, pages: int):
        self.folders, self.pages = folders, pages

    def list_objects_v2(self, Bucket, Prefix, ExpectedBucketOwner, ContinuationToken=None, Delimiter=None, **_):
        n = int(ContinuationToken or 0)
        if Prefix == "p/":
            more = n + 1 < self.folders
            return {"CommonPrefixes": [{"Prefix": f"p/{n:03d}/"}], "IsTruncated": more,
                    **({"NextContinuationToken": str(n + 1)} if more else {})}
        more = n + 1 < self.pages
        return {"Contents": [{"Key": f"{Prefix}k{n}.jpg", "Size": 1, "ETag": '"e"'}], "IsTruncated": more,
                **({"NextContinuationToken": str(n + 1)} if more else {})}


def listed_within_bound(s3, prefix: str = "p/", bound: float = BOUND, **options) -> list[str]:
    """The keys of the whole listing, read on a thread that must end within `bound` seconds."""
    keys: list[str] = []
    failed: list[BaseException] = []

    def read():
        try:
            keys.extend(o["Key"] for o in listing.list_in_parallel(s3, "b", prefix, "123456789012", **options))
        except BaseException as exc:
            failed.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=bound)
    if failed:
        raise failed[0]
    assert not reader.is_alive(), f"the listing hung after {len(keys)} objects"
    return keys


def test_a_listing_of_many_more_pages_than_it_keeps_ahead_ends():
    keys = listed_within_bound(TreeS3(folders=3, pages=40), threads=2, ahead=2)
    assert sorted(keys) == sorted(f"p/{f:03d}/k{n}.jpg" for f in range(3) for n in range(40))


def test_pages_without_objects_give_their_credit_back():
    """The prefix's own pages hold only sub-folders: many more of them than the listing keeps ahead."""
    keys = listed_within_bound(TreeS3(folders=30, pages=1), threads=2, ahead=2)
    assert sorted(keys) == [f"p/{f:03d}/k0.jpg" for f in range(30)]


# ---------------------------------------------------------------------------------------------------------------
# The lean reader: what botocore would read, on every lean client, and S3's errors in a 200 answer still errors
# ---------------------------------------------------------------------------------------------------------------

NS = 'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'


def test_a_lone_carriage_return_in_a_key_reads_as_botocore_reads_it():
    """XML reads a literal CR, alone or before a LF, as a LF (S3 itself writes it as &#13;)."""
    body = (f"<ListBucketResult {NS}><Name>bucket</Name><Prefix>2024/</Prefix><IsTruncated>false</IsTruncated>"
            "<Contents><Key>2024/a\rb.jpg</Key><Size>1</Size></Contents>"
            "<Contents><Key>2024/c\r\nd\r.jpg</Key><Size>2</Size></Contents></ListBucketResult>")
    page = assert_equal(body)
    assert [key for key, _, _ in page["Contents"]] == ["2024/a\nb.jpg", "2024/c\nd\n.jpg"]


def test_an_object_without_a_size_reads_as_empty_as_botocore_reads_it():
    body = (f"<ListBucketResult {NS}><Name>bucket</Name><Prefix>2024/</Prefix><IsTruncated>false</IsTruncated>"
            "<Contents><Key>2024/a.jpg</Key><ETag>&quot;e&quot;</ETag></Contents>"
            "<Contents><Key>2024/b.jpg</Key><Size>7</Size></Contents></ListBucketResult>")
    assert assert_equal(body)["Contents"] == [("2024/a.jpg", 0, '"e"'), ("2024/b.jpg", 7, None)]


def test_a_client_made_lean_twice_lists_what_it_lists_once():
    body = (f"<ListBucketResult {NS}><Name>bucket</Name><Prefix>2024/</Prefix><IsTruncated>false</IsTruncated>"
            "<Contents><Key>2024/a.jpg</Key><Size>3</Size><ETag>&quot;e&quot;</ETag></Contents></ListBucketResult>")
    twice = listing.fast_listing_client(_client(True, body.encode()))
    assert used(twice.list_objects_v2(Bucket="bucket", Prefix="2024/"))["Contents"] == [("2024/a.jpg", 3, '"e"')]


def answering(s3, operation: str, status: int, body: bytes):
    s3.meta.events.register_first(
        f"before-send.s3.{operation}",
        lambda request, **_: AWSResponse(request.url, status, {"Content-Type": "application/xml"}, _Raw(body)))
    return s3


@pytest.mark.parametrize("lean", [False, True], ids=["botocore", "lean"])
def test_an_error_in_a_200_answer_to_another_call_of_a_lean_client_is_still_an_error(lean):
    """S3 may answer CopyObject 200 with an <Error> body: the lean client still raises it, as botocore does."""
    s3 = boto3.client("s3", region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing",
                      config=Config(retries={"total_max_attempts": 1}))
    if lean:
        listing.fast_listing_client(s3)
    answering(s3, "CopyObject", 200, b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
                                     b"<Message>We encountered an internal error. Please try again.</Message></Error>")
    with pytest.raises(ClientError) as caught:
        s3.copy_object(Bucket="bucket", Key="b.jpg", CopySource={"Bucket": "bucket", "Key": "a.jpg"})
    assert common.error_code(caught.value) == "InternalError"


# ---------------------------------------------------------------------------------------------------------------
# Paging: every page is asked for with the previous page's token and the bucket's owner, and a listing ends
# ---------------------------------------------------------------------------------------------------------------


class PagedS3:
    """ListObjectsV2 of one folder in pages: `pages[n]` holds the objects of page n; page n+1 is asked for with
    token "t<n+1>". ExpectedBucketOwner must be given (S3 refuses a request for a bucket of another owner)."""

    def __init__(self, pages: list[list[str]], truncated_last: bool = False, limit: int = 20):
        self.pages, self.truncated_last, self.limit = pages, truncated_last, limit
        self.calls: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()

    def list_objects_v2(self, *, Bucket, Prefix, ExpectedBucketOwner, ContinuationToken=None, Delimiter=None,
                        MaxKeys=None):
        with self.lock:
            self.calls.append((Bucket, ExpectedBucketOwner, ContinuationToken))
            if len(self.calls) > self.limit:
                raise RuntimeError("the same pages asked for again and again")
        n = int(ContinuationToken[1:]) if ContinuationToken else 0
        page = {"IsTruncated": n + 1 < len(self.pages) or self.truncated_last}
        if n + 1 < len(self.pages):
            page["NextContinuationToken"] = f"t{n + 1}"
        if self.pages[n]:  # S3 leaves Contents out of a page without objects
            page["Contents"] = [{"Key": f"{Prefix}{name}", "Size": len(name), "ETag": '"e"'} for name in self.pages[n]]
        return page


def test_the_sequential_listing_reads_every_page_with_the_previous_pages_token():
    s3 = PagedS3([["a.jpg", "b.jpg"], [], ["c.jpg"]])
    found = list(listing.list_sequential(s3, "images", "2024/", "111122223333"))
    assert [(o["Key"], o["Size"]) for o in found] == [("2024/a.jpg", 5), ("2024/b.jpg", 5), ("2024/c.jpg", 5)]
    assert s3.calls == [("images", "111122223333", None), ("images", "111122223333", "t1"),
                        ("images", "111122223333", "t2")]


@pytest.mark.parametrize("pages", [[[]], [["a.jpg"]]], ids=["empty", "one-object"])
def test_a_truncated_page_without_a_token_ends_the_listing(pages):
    """A page that says more follow but gives no token to ask for them: the listing ends instead of starting over."""
    sequential = PagedS3(pages, truncated_last=True)
    assert [o["Key"] for o in listing.list_sequential(sequential, "images", "2024/", "111122223333")] == \
        [f"2024/{name}" for name in pages[0]]
    assert len(sequential.calls) == 1
    parallel = PagedS3(pages, truncated_last=True)
    assert listed_within_bound(parallel, prefix="2024/", threads=2) == [f"2024/{name}" for name in pages[0]]
    assert len(parallel.calls) == 1


def test_the_parallel_listing_asks_every_page_of_the_bucket_owner():
    s3 = PagedS3([["a.jpg"], ["b.jpg"], ["c.jpg"]])
    assert sorted(listed_within_bound(s3, prefix="2024/", threads=2)) == ["2024/a.jpg", "2024/b.jpg", "2024/c.jpg"]
    assert s3.calls == [("b", "123456789012", None), ("b", "123456789012", "t1"), ("b", "123456789012", "t2")]


class SlowSemaphore(threading.Semaphore):
    """A page's credit that comes late: every other wait for one times out first (a caller slower than the wait)."""

    def __init__(self, value):
        super().__init__(value)
        self.waits = itertools.count()

    def acquire(self, blocking=True, timeout=None):
        if timeout is not None and next(self.waits) % 2 == 0:
            return False
        return super().acquire(blocking, timeout)


class SlowQueue(queue.Queue):
    """A task queue where each thread's first wait for a task times out (the others were still being listed)."""

    def __init__(self):
        super().__init__()
        self.waited: set[int] = set()

    def get(self, block=True, timeout=None):
        if timeout is not None and threading.get_ident() not in self.waited:
            self.waited.add(threading.get_ident())
            raise queue.Empty
        return super().get(block, timeout)


def test_a_wait_for_a_credit_that_times_out_keeps_listing_the_folder(monkeypatch):
    monkeypatch.setattr(listing, "threading", types.SimpleNamespace(
        Semaphore=SlowSemaphore, Event=threading.Event, Lock=threading.Lock, Thread=threading.Thread))
    keys = listed_within_bound(TreeS3(folders=3, pages=5), threads=2, ahead=2)
    assert sorted(keys) == sorted(f"p/{f:03d}/k{n}.jpg" for f in range(3) for n in range(5))


def test_a_wait_for_a_folder_that_times_out_keeps_the_thread(monkeypatch):
    monkeypatch.setattr(listing, "queue", types.SimpleNamespace(Queue=SlowQueue, Empty=queue.Empty))
    keys = listed_within_bound(TreeS3(folders=3, pages=2), threads=2, bound=5)
    assert sorted(keys) == sorted(f"p/{f:03d}/k{n}.jpg" for f in range(3) for n in range(2))


def test_the_listing_threads_are_named_and_never_keep_the_process_alive():
    """They are found by name (list-N) in a thread dump and by the tests that check they end; a listing abandoned
    without being closed does not keep Python from exiting."""
    objects = listing.list_in_parallel(TreeS3(folders=3, pages=40), "b", "p/", "123456789012", threads=3, ahead=1)
    next(objects)
    running = [t for t in threading.enumerate() if t.name.startswith("list-")]
    assert sorted(t.name for t in running) == ["list-0", "list-1", "list-2"]
    assert all(t.daemon for t in running)
    objects.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("list-")]


# ---------------------------------------------------------------------------------------------------------------
# Sorting
# ---------------------------------------------------------------------------------------------------------------


def test_nothing_to_sort_is_an_empty_file(tmp_path):
    target = tmp_path / "sorted"
    target.write_bytes(b"an earlier listing\n")
    assert listing.sort_lines(iter([]), target) == 0
    assert target.read_bytes() == b""
    assert [p.name for p in tmp_path.iterdir()] == ["sorted"]


def test_under_a_tiny_open_file_limit_two_runs_are_merged_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr(listing.resource, "getrlimit", lambda which: (33, 4096))
    assert listing.merge_width() == 2
    lines = [b"%05d\n" % n for n in random.Random(1).sample(range(10_000), 40)]
    target = tmp_path / "sorted"
    assert listing.sort_lines(iter(lines), target, run_lines=3) == 40
    assert target.read_bytes() == b"".join(sorted(lines))
    assert [p.name for p in tmp_path.iterdir()] == ["sorted"]
