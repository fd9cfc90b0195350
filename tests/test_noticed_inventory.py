"""An S3 Inventory CSV report read as 01 reads it: a key with a space (written `+`, with no `%` in it) is the
image's key, and a report's ETag (without quotes) matches ListObjectsV2's, so an unchanged image that failed for
good is still recognised."""

from __future__ import annotations

import csv
import gzip
import io
from urllib.parse import quote_plus

import common
import inventory
import rejects

SCHEMA = "Bucket, Key, Size, ETag"
BUCKET = "images"


def report(tmp_path, rows) -> list[tuple[str, int, str | None]]:
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    path = tmp_path / "inventory-0"
    path.write_bytes(gzip.compress(text.getvalue().encode()))
    return list(inventory.csv_objects(path, SCHEMA, BUCKET, "2024/"))


def test_a_key_with_a_space_and_no_percent_is_the_images_key(tmp_path):
    keys = ["2024/my cat.jpg", "2024/a b/c d.png", "2024/plain.jpg", "2024/50% off+more.jpg"]
    found = report(tmp_path, [[BUCKET, quote_plus(key, safe="/"), "10", "abc"] for key in keys])
    assert [key for key, _, _ in found] == keys
    assert "+" in quote_plus("2024/my cat.jpg", safe="/") and "%" not in quote_plus("2024/my cat.jpg", safe="/")


def test_a_reports_etag_matches_the_listings(tmp_path):
    """S3 Inventory writes an ETag without the double quotes ListObjectsV2 gives it."""
    found = report(tmp_path, [[BUCKET, "2024/bad.png", "22", "9b2cf535f27731c974343645a3985328"],
                              [BUCKET, "2024/quoted.png", "5", '"0cc175b9c0f1b6a831c399e269772661"'],
                              [BUCKET, "2024/none.png", "5", ""]])
    assert found == [("2024/bad.png", 22, '"9b2cf535f27731c974343645a3985328"'),
                     ("2024/quoted.png", 5, '"0cc175b9c0f1b6a831c399e269772661"'),
                     ("2024/none.png", 5, None)]
    # The image failed for good on an earlier day, remembered with the ETag and size its listing gave.
    uri = common.s3_uri(BUCKET, "2024/bad.png")
    remembered = {"source_uri": uri, "key": common.vector_key(uri), "etag": '"9b2cf535f27731c974343645a3985328"',
                  "size": 22}
    key, size, etag = found[0]
    assert rejects.unchanged(remembered, {"ETag": etag, "Size": size})  # left out, not paid for again
