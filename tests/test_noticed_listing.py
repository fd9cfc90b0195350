"""The parallel listing gives every page's credit back (a page taken by the caller, a page with no objects): a
listing of many more pages than it may keep ahead ends, and a lost credit fails here in seconds, not at the
suite's timeout."""

from __future__ import annotations

import threading

import listing

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


def listed_within_bound(s3, **options) -> list[str]:
    """The keys of the whole listing, read on a thread that must end within BOUND seconds."""
    keys: list[str] = []
    reader = threading.Thread(target=lambda: keys.extend(o["Key"] for o in listing.list_objects(
        s3, "b", "p/", "123456789012", **options)), daemon=True)
    reader.start()
    reader.join(timeout=BOUND)
    assert not reader.is_alive(), f"the listing hung after {len(keys)} objects"
    return keys


def test_a_listing_of_many_more_pages_than_it_keeps_ahead_ends():
    keys = listed_within_bound(TreeS3(folders=3, pages=40), threads=2, ahead=2)
    assert sorted(keys) == sorted(f"p/{f:03d}/k{n}.jpg" for f in range(3) for n in range(40))


def test_pages_without_objects_give_their_credit_back():
    """The prefix's own pages hold only sub-folders: many more of them than the listing keeps ahead."""
    keys = listed_within_bound(TreeS3(folders=30, pages=1), threads=2, ahead=2)
    assert sorted(keys) == [f"p/{f:03d}/k0.jpg" for f in range(30)]
