"""An S3 Inventory CSV report read as 01 reads it: a key with a space (written `+`, with no `%` in it) is the
image's key, and a report's ETag (without quotes) matches ListObjectsV2's, so an unchanged image that failed for
good is still recognised. A manifest, data file or row 01 cannot use stops it with one line that says why and
exit 2 (a data file that does not match its checksum: exit 1); only current objects of SOURCE_BUCKET under the
prefix are images, in CSV and Parquet alike."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import sys
from pathlib import Path
from urllib.parse import quote_plus

import boto3
import orjson
import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber

import common
from batch_embeddings import failed_permanently, inventory, naming

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
    remembered = {"source_uri": uri, "key": naming.vector_key(uri), "etag": '"9b2cf535f27731c974343645a3985328"',
                  "size": 22}
    key, size, etag = found[0]
    assert failed_permanently.unchanged(remembered, {"ETag": etag, "Size": size})  # left out, not paid for again


# ---------------------------------------------------------------------------------------------------------------
# The report's manifest and data files as 01 fetches them (S3 stubbed: botocore checks every parameter)
# ---------------------------------------------------------------------------------------------------------------

OWNER = "111122223333"
MANIFEST_URI = "s3://reports/images/daily/2026-12-01T00-00Z/manifest.json"


def served(*objects: tuple[str, str, bytes]):
    """An S3 client that answers GetObject for each (bucket, key, body) in turn, only with the report's owner."""
    s3 = boto3.client("s3", region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    stub = Stubber(s3)
    for bucket, key, body in objects:
        stub.add_response("get_object", {"Body": StreamingBody(io.BytesIO(body), len(body))},
                          {"Bucket": bucket, "Key": key, "ExpectedBucketOwner": OWNER})
    stub.activate()
    return s3, stub


def manifest_of(**fields) -> bytes:
    manifest = {"sourceBucket": BUCKET, "destinationBucket": "arn:aws:s3:::reports", "version": "2016-11-30",
                "fileFormat": "CSV", "fileSchema": SCHEMA, "files": [{"key": "images/daily/data/a.csv.gz"}]}
    manifest.update(fields)
    return orjson.dumps({k: v for k, v in manifest.items() if v is not None})


def refusal(body: bytes, uri: str = MANIFEST_URI) -> tuple[str, int]:
    s3, stub = served(("reports", uri.split("/", 3)[-1], body))
    with pytest.raises(common.StepError) as caught:
        inventory.read_manifest(s3, uri, BUCKET, OWNER)
    stub.assert_no_pending_responses()
    return str(caught.value), caught.value.exit_code


@pytest.mark.parametrize("uri", ["reports/manifest.json", "s3://reports/images/daily/data/a.csv.gz",
                                 "s3://reports"])
def test_an_inventory_uri_that_is_not_a_manifest_is_refused_before_any_call(uri):
    s3, stub = served()
    with pytest.raises(common.StepError) as caught:
        inventory.read_manifest(s3, uri, BUCKET, OWNER)
    assert str(caught.value) == f"--inventory {uri}: give the s3:// URI of an S3 Inventory report's manifest.json"
    assert caught.value.exit_code == common.EXIT_USAGE
    stub.assert_no_pending_responses()


NOT_A_MANIFEST = (f"{MANIFEST_URI} is not an S3 Inventory manifest.json (it needs sourceBucket, fileFormat and "
                  "files)")


@pytest.mark.parametrize("body", [
    b"<html>not json</html>",
    manifest_of(sourceBucket=None),
    manifest_of(fileFormat=None),
    manifest_of(files=None),
    manifest_of(files="images/daily/data/a.csv.gz"),
    manifest_of(files=[{"key": 7}]),  # a list, but not of data files
    manifest_of(files=[{"size": 3, "MD5checksum": "x"}]),
    manifest_of(files=["images/daily/data/a.csv.gz"]),
])
def test_a_manifest_without_its_fields_is_one_line(body):
    assert refusal(body) == (NOT_A_MANIFEST, common.EXIT_USAGE)


@pytest.mark.parametrize(("fields", "message"), [
    ({"sourceBucket": "other-images"}, f"{MANIFEST_URI} is a report of bucket other-images, not of SOURCE_BUCKET "
                                       f"{BUCKET}"),
    ({"fileFormat": "ORC"}, f"{MANIFEST_URI} is an ORC report, which 01 does not read — set the inventory's format "
                            "to CSV or Parquet (or list the bucket: run 01 without --inventory)"),
    ({"fileFormat": "JSON"}, f"{MANIFEST_URI}: unknown fileFormat 'JSON' (CSV or Parquet)"),
    ({"fileFormat": "csv"}, f"{MANIFEST_URI}: unknown fileFormat 'csv' (CSV or Parquet)"),
    ({"fileSchema": "Bucket, Key, LastModifiedDate"},
     f"{MANIFEST_URI}: the report has no Size field — add Size to the inventory's optional fields (01 needs it to "
     "skip empty and oversized images)"),
    ({"fileSchema": "Bucket, VersionId"},
     f"{MANIFEST_URI}: the report has no Key or Size field — add Size to the inventory's optional fields (01 needs "
     "it to skip empty and oversized images)"),
    ({"fileSchema": None},
     f"{MANIFEST_URI}: the report has no Key or Size field — add Size to the inventory's optional fields (01 needs "
     "it to skip empty and oversized images)"),
])
def test_a_report_01_cannot_read_is_one_line_that_says_why(fields, message):
    assert refusal(manifest_of(**fields)) == (message, common.EXIT_USAGE)


def test_a_parquet_manifest_needs_no_csv_schema():
    s3, stub = served(("reports", MANIFEST_URI.split("/", 3)[-1], manifest_of(fileFormat="Parquet", fileSchema=None)))
    assert inventory.read_manifest(s3, MANIFEST_URI, BUCKET, OWNER)["fileFormat"] == "Parquet"
    stub.assert_no_pending_responses()


def test_the_data_files_are_fetched_from_the_reports_bucket_and_checked(tmp_path):
    first, second = gzip.compress(b"images,2024/a.png,1,e\n"), b"images,2024/b.png,2,f\n"
    files = [{"key": "images/daily/data/a.csv.gz", "MD5checksum": hashlib.md5(first).hexdigest()},
             {"key": "images/daily/data/b.csv"}]  # no checksum: taken as it comes
    s3, stub = served(("reports", MANIFEST_URI.split("/", 3)[-1], manifest_of(files=files)),
                      ("reports", files[0]["key"], first), ("reports", files[1]["key"], second))
    manifest, paths = inventory.data_files(s3, MANIFEST_URI, BUCKET, OWNER, tmp_path)
    stub.assert_no_pending_responses()
    assert paths == [tmp_path / "inventory-0", tmp_path / "inventory-1"]
    assert [p.read_bytes() for p in paths] == [first, second]
    found = [list(inventory.file_objects(p, manifest, BUCKET, "2024/")) for p in paths]
    assert found == [[("2024/a.png", 1, '"e"')], [("2024/b.png", 2, '"f"')]]


def test_a_data_file_that_does_not_match_its_checksum_stops_01(tmp_path):
    body = gzip.compress(b"images,2024/a.png,1,e\n")
    entry = {"key": "images/daily/data/a.csv.gz", "MD5checksum": hashlib.md5(body + b"more").hexdigest()}
    s3, stub = served(("reports", entry["key"], body))
    with pytest.raises(common.StepError) as caught:
        inventory.download(s3, "reports", entry, OWNER, tmp_path / "inventory-0")
    stub.assert_no_pending_responses()
    assert str(caught.value) == ("s3://reports/images/daily/data/a.csv.gz does not match the MD5 checksum in the "
                                 "report's manifest.json (changed or cut short) — run 01 again, or with a newer report")
    assert caught.value.exit_code == common.EXIT_ERROR


# ---------------------------------------------------------------------------------------------------------------
# CSV data files: which rows are current images under the prefix, and one line for a file that is not a report's
# ---------------------------------------------------------------------------------------------------------------

VERSIONED = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, ETag"
REDO = ("is this file an S3 Inventory report's data file? Use the next day's report, or run 01 without --inventory "
        "to list the prefix")


def csv_file(tmp_path, rows, gzipped: bool = False) -> Path:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    body = text.getvalue().encode()
    path = tmp_path / "inventory-3"
    path.write_bytes(gzip.compress(body) if gzipped else body)
    return path


def read(path, schema: str = VERSIONED, prefix: str = "2024/") -> list[tuple[str, int, str | None]]:
    return list(inventory.csv_objects(path, schema, BUCKET, prefix))


def csv_refusal(path, schema: str = VERSIONED) -> tuple[str, int]:
    with pytest.raises(common.StepError) as caught:
        read(path, schema)
    return str(caught.value), caught.value.exit_code


@pytest.mark.parametrize("gzipped", [False, True])
def test_only_current_objects_of_the_source_bucket_under_the_prefix_are_images(tmp_path, gzipped):
    path = csv_file(tmp_path, [
        [BUCKET, "2024/a.png", "v2", "true", "false", "10", "e1"],
        [BUCKET, "2024/a.png", "v1", "false", "false", "9", "e0"],  # an older version
        [BUCKET, "2024/gone.png", "v3", "true", "true", "", ""],  # deleted: its delete marker is the latest
        ["other-images", "2024/theirs.png", "v1", "true", "false", "5", "e2"],  # another bucket's row
        [BUCKET, "2023/old.png", "v1", "true", "false", "5", "e3"],  # outside the prefix
        [BUCKET, "2024/empty.png", "v1", "true", "false", "", "e4"],  # no size: empty
        [BUCKET, "2024/50%25.png", "v1", "true", "false", "7", "e5"],  # URL-encoded, no +
    ], gzipped)
    assert read(path) == [("2024/a.png", 10, '"e1"'), ("2024/empty.png", 0, '"e4"'), ("2024/50%.png", 7, '"e5"')]


def test_a_report_without_bucket_version_or_etag_columns_gives_every_row(tmp_path):
    path = csv_file(tmp_path, [["2024/a.png", "3"], ["2024/b c.png", "4"], ["2023/x.png", "5"]])
    assert read(path, "Key, Size") == [("2024/a.png", 3, None), ("2024/b c.png", 4, None)]


def test_a_quoted_key_keeps_its_carriage_return(tmp_path):
    path = tmp_path / "inventory-3"
    path.write_bytes(b'images,"2024/a\rb.png",v1,true,false,3,e\r\n')
    assert read(path) == [("2024/a\rb.png", 3, '"e"')]


def test_a_row_of_another_width_is_one_line(tmp_path):
    path = csv_file(tmp_path, [[BUCKET, "2024/a.png", "v1", "true", "false", "3", "e"], [BUCKET, "2024/b.png"]])
    assert csv_refusal(path) == ("inventory-3: a row with 2 fields where fileSchema names 7", common.EXIT_USAGE)


def test_a_size_that_is_not_a_number_names_the_row_and_the_key(tmp_path):
    key = "2024/" + "k" * 250 + ".png"
    path = csv_file(tmp_path, [[BUCKET, "2024/a.png", "v1", "true", "false", "3", "e"],
                               [BUCKET, "2024/b.png", "v1", "false", "false", "x", "e"],  # not current: not read
                               [BUCKET, key, "v1", "true", "false", "12.5e+3 bytes, about 12 kB", "e"]])
    assert csv_refusal(path) == (f"inventory-3 row 3: Size '12.5e+3 bytes, about' is not a number of bytes (key "
                                 f"{key[:200]}) — {REDO}", common.EXIT_USAGE)


def test_a_byte_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "inventory-3"
    path.write_bytes(b"images,2024/a.png,1\nimages,2024/caf\xe9.png,2\n")
    assert csv_refusal(path, "Bucket, Key, Size") == (
        f"inventory-3: a byte that is not UTF-8 (b'\\xe9'; S3 writes inventory CSV in UTF-8) — {REDO}",
        common.EXIT_USAGE)


def test_a_damaged_gzip_file_is_one_line(tmp_path):
    path = tmp_path / "inventory-3"
    path.write_bytes(gzip.compress(b"images,2024/a.png,1\n" * 100)[:-12])
    assert csv_refusal(path, "Bucket, Key, Size") == (
        f"inventory-3: the gzipped CSV is damaged (Compressed file ended before the end-of-stream marker was "
        f"reached) — {REDO}", common.EXIT_USAGE)


@pytest.mark.parametrize("row", [1, 3])
def test_a_file_that_is_not_csv_names_the_row(tmp_path, row):
    rows = [[BUCKET, f"2024/{n}.png", "1"] for n in range(1, 4)]
    rows[row - 1][1] = "x" * 200_000  # longer than any S3 key: past the csv module's field limit
    assert csv_refusal(csv_file(tmp_path, rows), "Bucket, Key, Size") == (
        f"inventory-3 row {row}: not CSV (field larger than field limit (131072)) — {REDO}", common.EXIT_USAGE)


# ---------------------------------------------------------------------------------------------------------------
# Parquet data files
# ---------------------------------------------------------------------------------------------------------------

PARQUET_COLUMNS = {"bucket": "VARCHAR", "key": "VARCHAR", "is_latest": "BOOLEAN", "is_delete_marker": "BOOLEAN",
                   "size": "BIGINT", "e_tag": "VARCHAR"}


def parquet_file(tmp_path, rows: list[dict], columns: list[str]) -> Path:
    import duckdb

    path = tmp_path / "inventory-5"
    con = duckdb.connect()
    con.execute(f"CREATE TABLE t ({', '.join(f'{c} {PARQUET_COLUMNS[c]}' for c in columns)})")
    con.executemany(f"INSERT INTO t VALUES ({', '.join('?' for _ in columns)})",
                    [[row.get(c) for c in columns] for row in rows])
    con.execute(f"COPY t TO '{path}' (FORMAT PARQUET)")
    con.close()
    return path


def parquet_read(path, prefix: str = "2024/") -> list[tuple[str, int, str | None]]:
    return sorted(inventory.file_objects(path, {"fileFormat": "Parquet"}, BUCKET, prefix))


def test_a_parquet_report_gives_current_objects_of_the_source_bucket_with_their_etags(tmp_path):
    rows = [{"bucket": BUCKET, "key": "2024/a.png", "is_latest": True, "is_delete_marker": False, "size": 10,
             "e_tag": "e1"},
            {"bucket": BUCKET, "key": "2024/a.png", "is_latest": False, "is_delete_marker": False, "size": 9},
            {"bucket": BUCKET, "key": "2024/gone.png", "is_latest": True, "is_delete_marker": True},
            {"bucket": "other-images", "key": "2024/theirs.png", "is_latest": True, "size": 5, "e_tag": "e2"},
            {"bucket": BUCKET, "key": "2023/old.png", "is_latest": True, "size": 5, "e_tag": "e3"},
            {"bucket": BUCKET, "key": "2024/b.png", "size": None, "e_tag": '"e4"'}]  # versions not listed: nulls
    path = parquet_file(tmp_path, rows, list(PARQUET_COLUMNS))
    assert parquet_read(path) == [("2024/a.png", 10, '"e1"'), ("2024/b.png", 0, '"e4"')]


def test_a_parquet_report_of_key_and_size_only_gives_every_object_under_the_prefix(tmp_path):
    path = parquet_file(tmp_path, [{"key": "2024/a.png", "size": 3}, {"key": "2023/b.png", "size": 4}],
                        ["key", "size"])
    assert parquet_read(path) == [("2024/a.png", 3, None)]


def test_a_parquet_report_without_size_is_one_line(tmp_path):
    path = parquet_file(tmp_path, [{"bucket": BUCKET, "key": "2024/a.png", "e_tag": "e"}], ["bucket", "key", "e_tag"])
    with pytest.raises(common.StepError) as caught:
        parquet_read(path)
    assert str(caught.value) == ("inventory-5: the Parquet report has no key or size column — add Size to the "
                                 "inventory's optional fields")
    assert caught.value.exit_code == common.EXIT_USAGE


def test_a_parquet_report_without_duckdb_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "duckdb", None)
    with pytest.raises(common.StepError) as caught:
        parquet_read(tmp_path / "inventory-5")
    assert str(caught.value) == ("reading a Parquet inventory report needs DuckDB: uv sync --extra parquet (or use a "
                                 "CSV report)")
    assert caught.value.exit_code == common.EXIT_USAGE
