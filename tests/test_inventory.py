"""01 --inventory: an S3 Inventory report (CSV, gzipped CSV, Parquet) gives the same images, plan and manifests as
listing the bucket; ORC, a report without Size, of another bucket or with a damaged file stop with one line; Ctrl-C
while worker processes read the data files stops 01 and leaves the files not yet handed out unread."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from urllib.parse import quote_plus

import duckdb
import orjson
import pytest

import common
from batch_embeddings import inventory, keyset, listing, naming, nova, selection
from tests.standins import s3 as s3_standin
from tests.conftest import ROOT
from tests.test_listing import config_for, plan_and_write, plan_and_write_listing, written

SCHEMA = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, StorageClass"
KEYS = ([f"2024/a/img-{i:03d}.png" for i in range(60)] + [f"2024/b/c/photo-{i:03d}.jpg" for i in range(45)]
        + [f"2024/top-{i}.webp" for i in range(10)]
        + ["2024/a/my photo+1.jpg", "2024/a/café, \"quoted\".png", "2024/notes.txt", "2024/b/old.jsonl.txt"])


@pytest.fixture
def bucket(world):
    s3 = world.client("s3")
    s3_standin.put_objects(world.source_bucket, ((key, b"\xff" * (n + 1)) for n, key in enumerate(KEYS)))
    s3.put_object(Bucket=world.source_bucket, Key="2024/empty.jpg", Body=b"")
    s3.put_object(Bucket=world.source_bucket, Key="2023/outside.jpg", Body=b"x")
    return world


def rows(world) -> list[list[str]]:
    """The report's rows: every object of the bucket, plus an old version and a deleted object (versions: All)."""
    s3 = world.client("s3")
    out = []
    for obj in listing.list_sequential(s3, world.source_bucket, "", "123456789012"):
        out.append([world.source_bucket, obj["Key"], "v2", "true", "false", str(obj["Size"]), "2026-12-01T00:00:00Z",
                    "etag", "STANDARD"])
    out.append([world.source_bucket, "2024/a/img-000.png", "v1", "false", "false", "7", "2026-11-01T00:00:00Z",
                "etag", "STANDARD"])
    out.append([world.source_bucket, "2024/a/deleted.png", "v3", "true", "true", "", "2026-11-01T00:00:00Z",
                "", ""])
    out.reverse()  # a report is in no particular order
    return out


def publish(world, fmt: str, tmp_path, manifest_extra: dict | None = None, bucket: str | None = None) -> str:
    """Upload a report in `fmt` (csv, csv.gz, parquet) in two data files to `bucket` (default: the result bucket),
    and return its manifest's URI."""
    s3 = world.client("s3")
    bucket = bucket or world.result_bucket
    data = rows(world)
    halves = [data[: len(data) // 2], data[len(data) // 2:]]
    files = []
    for n, part in enumerate(halves):
        if fmt.startswith("csv"):
            text = io.StringIO()
            csv.writer(text, lineterminator="\n").writerows(
                [r[0], quote_plus(r[1], safe="/"), *r[2:]] for r in part)  # keys URL-encoded, as S3 writes them
            body = text.getvalue().encode()
            body = gzip.compress(body) if fmt == "csv.gz" else body
        else:
            path = tmp_path / f"part{n}.parquet"
            con = duckdb.connect()
            con.execute("CREATE TABLE t (bucket VARCHAR, key VARCHAR, version_id VARCHAR, is_latest BOOLEAN, "
                        "is_delete_marker BOOLEAN, size BIGINT, last_modified_date TIMESTAMP, e_tag VARCHAR, "
                        "storage_class VARCHAR)")
            con.executemany("INSERT INTO t VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            [[r[0], r[1], r[2], r[3] == "true", r[4] == "true", int(r[5]) if r[5] else None,
                              r[6][:-1], r[7], r[8]] for r in part])
            con.execute(f"COPY t TO '{path}' (FORMAT PARQUET)")
            con.close()
            body = path.read_bytes()
        key = f"inventory/{world.source_bucket}/daily/data/part{n}.{fmt}"
        s3.put_object(Bucket=bucket, Key=key, Body=body)
        files.append({"key": key, "size": len(body), "MD5checksum": hashlib.md5(body).hexdigest()})
    manifest = {"sourceBucket": world.source_bucket, "destinationBucket": f"arn:aws:s3:::{bucket}",
                "version": "2016-11-30", "creationTimestamp": "1764547200000",
                "fileFormat": "Parquet" if fmt == "parquet" else "CSV", "files": files,
                **({"fileSchema": SCHEMA} if fmt != "parquet" else
                   {"fileSchema": "message s3.inventory { required binary bucket (STRING); ... }"}),
                **(manifest_extra or {})}
    key = f"inventory/{world.source_bucket}/daily/2026-12-01T00-00Z/manifest.json"
    s3.put_object(Bucket=bucket, Key=key, Body=orjson.dumps(manifest))
    return f"s3://{bucket}/{key}"


@pytest.mark.parametrize("fmt", ["csv", "csv.gz", "parquet"])
def test_an_inventory_gives_the_same_manifests_as_listing(bucket, tmp_path, fmt):
    world = bucket
    uri = publish(world, fmt, tmp_path)
    config = config_for(world, MIN_RECORDS_PER_JOB="20", MAX_RECORDS_PER_JOB="50", MAX_RECORDS_PER_FILE="30")
    s3 = world.client("s3")
    results = []
    for name in ("listed", "inventory"):
        work, out = tmp_path / f"work-{name}", tmp_path / f"out-{name}"
        work.mkdir()
        out.mkdir()
        if name == "listed":
            objects = listing.list_in_parallel(listing.fast_listing_client(s3), world.source_bucket, "2024/", "123456789012")
            records = plan_and_write(objects, config, work, out)
        else:
            found = selection.list_inventory(s3, uri, config, "123456789012", [], work, None)
            records = plan_and_write_listing(found, config, out)
        results.append(([(r["job_name"], r["input_folder"], r["record_count"], r["client_request_token"])
                         for r in records], written(records)))
        assert not list(work.glob("inventory-*"))  # the downloaded report files are gone
    assert results[0] == results[1]
    lines = [orjson.loads(line) for body in results[0][1].values() for line in body.splitlines()]
    uris = {nova.image_uri(line) for line in lines}
    assert len(lines) == 117 and f"s3://{world.source_bucket}/2024/a/my photo+1.jpg" in uris
    assert f"s3://{world.source_bucket}/2024/a/café, \"quoted\".png" in uris


def test_01_dry_run_from_an_inventory_says_what_a_listing_says(bucket, tmp_path):
    world = bucket
    uri = publish(world, "csv.gz", tmp_path)
    listed = world.step(1, "--dry-run")
    from_report = world.step(1, "--dry-run", "--inventory", uri)
    assert listed.returncode == from_report.returncode == 0, listed.stderr + from_report.stderr
    assert "Found 117 images" in from_report.stdout and "Reading the images under" in from_report.stdout
    if (os.cpu_count() or 1) > 1:  # the report's two data files are read side by side, and merged
        assert "Read its 2 data files in 2 worker processes" in from_report.stdout

    def summary(out: str) -> list[str]:
        return [re.sub(r"\d{8}-\d{6}", "STAMP", line) for line in out.splitlines() if line.startswith(("✓ Found", "Skipped", "  ", "    -", "Planned",
                                                                      "Records:", "First record"))]
    assert summary(listed.stdout) == summary(from_report.stdout)


def one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.mark.parametrize(("extra", "message"), [
    ({"fileFormat": "ORC"}, "is an ORC report, which 01 does not read"),
    ({"fileSchema": "Bucket, Key, LastModifiedDate"}, "has no Size field"),
    ({"sourceBucket": "another-bucket"}, "is a report of bucket another-bucket"),
    ({"files": "nope"}, "is not an S3 Inventory manifest.json"),
])
def test_a_report_01_cannot_use_stops_it_with_one_line(bucket, tmp_path, extra, message):
    uri = publish(bucket, "csv", tmp_path, extra)
    result = bucket.step(1, "--dry-run", "--inventory", uri)
    assert result.returncode == common.EXIT_USAGE
    assert message in one_line(result)


def test_a_damaged_data_file_stops_01(bucket, tmp_path):
    uri = publish(bucket, "csv.gz", tmp_path)
    key = f"inventory/{bucket.source_bucket}/daily/data/part1.csv.gz"
    bucket.client("s3").put_object(Bucket=bucket.result_bucket, Key=key, Body=b"cut short")
    result = bucket.step(1, "--dry-run", "--inventory", uri)
    assert result.returncode == common.EXIT_ERROR
    assert "does not match the MD5 checksum" in one_line(result)
    assert not list(bucket.cwd.rglob("batch_input_*"))


def test_a_bad_row_in_a_data_file_read_by_a_worker_stops_01_with_one_line(bucket, tmp_path):
    uri = publish(bucket, "csv", tmp_path)
    s3 = bucket.client("s3")
    manifest_key = uri.split("/", 3)[3]
    manifest = orjson.loads(s3.get_object(Bucket=bucket.result_bucket, Key=manifest_key)["Body"].read())
    body = b'"a","b"\n'  # two fields where the schema names nine
    s3.put_object(Bucket=bucket.result_bucket, Key=manifest["files"][1]["key"], Body=body)
    manifest["files"][1].update(size=len(body), MD5checksum=hashlib.md5(body).hexdigest())
    s3.put_object(Bucket=bucket.result_bucket, Key=manifest_key, Body=orjson.dumps(manifest))
    result = bucket.step(1, "--dry-run", "--inventory", uri)
    assert result.returncode == common.EXIT_USAGE  # the exit code a worker's error carries
    assert one_line(result).endswith("inventory-1: a row with 2 fields where fileSchema names 9")
    assert not list(bucket.cwd.rglob("batch_input_*"))


def test_parquet_without_duckdb_says_how_to_install_it(bucket, tmp_path, monkeypatch):
    uri = publish(bucket, "parquet", tmp_path)
    monkeypatch.setitem(sys.modules, "duckdb", None)
    with pytest.raises(common.StepError, match="uv sync --extra parquet"):
        manifest, paths = inventory.data_files(bucket.client("s3"), uri, bucket.source_bucket, "123456789012", tmp_path)
        list(inventory.file_objects(paths[0], manifest, bucket.source_bucket, "2024/"))


def test_listings_of_parts_merge_into_the_listing_of_the_whole(tmp_path):
    """What list_inventory's workers hand back (one listing a data file) merges into what one listing of every
    object gives: counts, skipped objects and their first examples, the tool's own manifests, foreign .jsonl files,
    images left out, and the sorted file."""
    rng = random.Random(3)
    objects = ([(f"2024/{f}/img-{i:03d}.{rng.choice(['png', 'jpg'])}", 10 + i, None) for f in "abc" for i in range(40)]
               + [(f"2024/{f}/notes-{i}.txt", 5, None) for f in "ab" for i in range(4)]  # skipped in every part
               + [(f"2024/{f}/empty-{i}.png", 0, None) for f in "bc" for i in range(3)]
               + [("2024/a/batch_input_20260101-000000.jsonl", 9, None), ("2024/c/batch_input_x.jsonl", 9, None),
                  ("2024/b/theirs.jsonl", 9, None)])
    rng.shuffle(objects)
    indexed = keyset.KeySet.of([naming.vector_key(f"s3://b/{key}") for key, _, _ in objects[::7]])
    config = types.SimpleNamespace(source_bucket="b")
    exclude = [(indexed, "already in the vector index")]

    def listed(part, name):
        (tmp_path / name).mkdir()
        return selection.list_images(iter(part), config, exclude, tmp_path / name, None)

    whole = listed(objects, "whole")
    parts = [listed(objects[n::3], f"part{n}").summary() for n in range(3)]
    merged = selection.Listing.merged(parts, tmp_path)
    for field in ("counts", "skipped", "examples", "left_out"):
        assert dict(getattr(merged, field)) == dict(getattr(whole, field)), field
    assert sorted(merged.own_manifests) == sorted(whole.own_manifests) and len(merged.own_manifests) == 2
    assert merged.foreign == whole.foreign == ["2024/b/theirs.jsonl"]
    assert merged.images == whole.images > 0 and whole.left_out["already in the vector index"] > 0
    assert merged.path.read_bytes() == whole.path.read_bytes()
    assert not [p for p in tmp_path.glob("part*/*")]  # the parts' files were merged away


# ------------------------------------------------------------------------------------- Ctrl-C while workers read

_PARENT = {}


def _read_until_interrupted(n: int) -> dict:
    """Stands in for 01's reading of data file n in a worker: file 0 presses Ctrl-C (in 01, not in its workers),
    and every file read waits until 01 has seen it."""
    folder = selection._forked["folders"][n]
    (folder / "read").touch()
    if n == 0:
        os.kill(_PARENT["pid"], signal.SIGINT)
    while not (folder.parent / "interrupted").exists():
        time.sleep(0.01)
    return {}


_read_until_interrupted.__module__, _read_until_interrupted.__qualname__ = selection.__name__, "_list_data_file"


def ctrl_c_while_workers_read(tmp: str) -> dict:
    """In a fresh interpreter (`python -m tests.test_inventory TMP`): 01 reads 12 data files with workers, one of
    which presses Ctrl-C."""
    tmp = Path(tmp)
    _PARENT["pid"] = os.getpid()

    def on_ctrl_c(signum, frame):
        (tmp / "interrupted").touch()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_ctrl_c)
    paths = [tmp / f"data-{n}.csv.gz" for n in range(12)]
    inventory.data_files = lambda *args: ({}, paths)
    selection._list_data_file = _read_until_interrupted  # forked workers find it by this name
    config = types.SimpleNamespace(source_bucket="images", source_prefix="", inventory_bucket_owner=None)
    try:
        selection.list_inventory(None, "s3://images/inventory/manifest.json", config, "111122223333", [], tmp, None)
    except KeyboardInterrupt:
        return {"interrupted": True, "read": sorted(int(p.parent.name.split("-")[1]) for p in tmp.glob("part-*/read")),
                "workers left": len(multiprocessing.active_children())}
    return {"interrupted": False}


def test_ctrl_c_while_workers_read_the_inventory_leaves_the_other_files_unread(tmp_path):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("01 reads an inventory in worker processes only with 2 CPUs or more")
    # its own interpreter: 01 forks only from a process that runs one thread, and a hung pool cannot hang the suite
    done = subprocess.run([sys.executable, "-m", "tests.test_inventory", str(tmp_path)], cwd=ROOT, timeout=120,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = orjson.loads(done.stdout.splitlines()[-1])
    assert result["interrupted"], "Ctrl-C did not stop 01"
    assert 0 in result["read"] and len(result["read"]) < 12  # the files not yet handed to a worker are never read
    assert result["workers left"] == 0


if __name__ == "__main__":
    print(orjson.dumps(ctrl_c_while_workers_read(sys.argv[1])).decode())
