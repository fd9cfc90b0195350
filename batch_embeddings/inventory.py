"""An S3 Inventory report as 01's input instead of a listing: how buckets of ten million objects and more are read.

The report's `manifest.json` names its data files and their format:

    {"sourceBucket": "my-images", "destinationBucket": "arn:aws:s3:::my-inventory", "version": "2016-11-30",
     "fileFormat": "CSV", "fileSchema": "Bucket, Key, Size, LastModifiedDate, ...",
     "files": [{"key": "my-images/daily/data/5c3a....csv.gz", "size": 2147483647, "MD5checksum": "..."}]}

CSV files are gzipped (a plain one is read too); their columns are in `fileSchema`'s order, and a CSV report's
keys are URL-encoded. Parquet files name their columns (`key`, `size`, ...) and are read with DuckDB, an optional
dependency (`uv sync --extra parquet`). ORC is refused. With every version listed, only current objects count
(IsLatest true, not a delete marker). An ETag in the report lets 01 recognise an image that failed permanently
and has not changed since (a report's ETag is put in double quotes, as ListObjectsV2 gives it). The report must have the Size field, which 01 needs to skip empty and
oversized images, and must be of SOURCE_BUCKET; only objects under SOURCE_PREFIX are read.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import zlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote_plus

import orjson

import common
from common import StepError

BATCH = 50_000  # Parquet rows fetched at once
_REDO = ("is this file an S3 Inventory report's data file? Use the next day's report, or run 01 without --inventory "
         "to list the prefix")


def data_files(s3, manifest_uri: str, bucket: str, owner: str, workdir: Path) -> tuple[dict, list[Path]]:
    """The report's manifest and every one of its data files, downloaded into `workdir` (to be read side by side)."""
    manifest = read_manifest(s3, manifest_uri, bucket, owner)
    report_bucket, _ = common.parse_s3_uri(manifest_uri)
    paths = []
    for n, entry in enumerate(manifest["files"]):
        paths.append(workdir / f"inventory-{n}")
        download(s3, report_bucket, entry, owner, paths[-1])
    return manifest, paths


def file_objects(path: Path, manifest: dict, bucket: str, prefix: str) -> Iterator[tuple[str, int, str | None]]:
    """(key, size, ETag or None) of every current object under `prefix` in one downloaded data file."""
    if manifest["fileFormat"] == "CSV":
        return csv_objects(path, manifest["fileSchema"], bucket, prefix)
    return parquet_objects(path, bucket, prefix)


def read_manifest(s3, manifest_uri: str, bucket: str, owner: str) -> dict:
    try:
        report_bucket, key = common.parse_s3_uri(manifest_uri)
    except ValueError:
        report_bucket, key = "", ""
    if not key.endswith("manifest.json"):
        raise StepError(f"--inventory {manifest_uri}: give the s3:// URI of an S3 Inventory report's manifest.json",
                        common.EXIT_USAGE)
    body = s3.get_object(Bucket=report_bucket, Key=key, ExpectedBucketOwner=owner)["Body"].read()
    try:
        manifest = orjson.loads(body)
        fmt, files = manifest["fileFormat"], manifest["files"]
        source = manifest["sourceBucket"]
        if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(f.get("key"), str)
                                                  for f in files):
            raise TypeError
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise StepError(f"{manifest_uri} is not an S3 Inventory manifest.json (it needs sourceBucket, fileFormat "
                        "and files)", common.EXIT_USAGE) from None
    if source != bucket:
        raise StepError(f"{manifest_uri} is a report of bucket {source}, not of SOURCE_BUCKET {bucket}",
                        common.EXIT_USAGE)
    if fmt == "ORC":
        raise StepError(f"{manifest_uri} is an ORC report, which 01 does not read — set the inventory's format to "
                        "CSV or Parquet (or list the bucket: run 01 without --inventory)", common.EXIT_USAGE)
    if fmt not in ("CSV", "Parquet"):
        raise StepError(f"{manifest_uri}: unknown fileFormat {fmt!r} (CSV or Parquet)", common.EXIT_USAGE)
    if fmt == "CSV":
        columns = csv_columns(manifest.get("fileSchema", ""))
        missing = [c for c in ("Key", "Size") if c not in columns]
        if missing:
            raise StepError(f"{manifest_uri}: the report has no {' or '.join(missing)} field — add Size to the "
                            "inventory's optional fields (01 needs it to skip empty and oversized images)",
                            common.EXIT_USAGE)
    return manifest


def download(s3, bucket: str, entry: dict, owner: str, path: Path) -> None:
    """A report's data file to `path`, checked against the manifest's MD5 when it gives one."""
    digest = hashlib.md5(usedforsecurity=False)
    body = s3.get_object(Bucket=bucket, Key=entry["key"], ExpectedBucketOwner=owner)["Body"]
    with open(path, "wb") as fh:
        for chunk in body.iter_chunks(1 << 20):
            digest.update(chunk)
            fh.write(chunk)
    expected = entry.get("MD5checksum")
    if expected and expected != digest.hexdigest():
        raise StepError(f"{common.s3_uri(bucket, entry['key'])} does not match the MD5 checksum in the report's "
                        "manifest.json (changed or cut short) — run 01 again, or with a newer report",
                        common.EXIT_ERROR)


def csv_columns(schema: str) -> list[str]:
    return [c.strip() for c in schema.split(",")]


def _etag(value: str | None) -> str | None:
    """An ETag as ListObjectsV2 gives it, in double quotes (a report's may come without)."""
    if not value:
        return None
    return value if value.startswith('"') else f'"{value}"'


def csv_objects(path: Path, schema: str, bucket: str, prefix: str) -> Iterator[tuple[str, int, str | None]]:
    columns = csv_columns(schema)
    at = {name: i for i, name in enumerate(columns)}
    b, k, s = at["Bucket"] if "Bucket" in at else None, at["Key"], at["Size"]
    latest, deleted, e = at.get("IsLatest"), at.get("IsDeleteMarker"), at.get("ETag")
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    opener = gzip.open if gzipped else open
    rows = 0
    try:
        with opener(path, "rb") as binary, io.TextIOWrapper(binary, encoding="utf-8", newline="") as text:
            for rows, row in enumerate(csv.reader(text), 1):
                if len(row) != len(columns):
                    raise StepError(f"{path.name}: a row with {len(row)} fields where fileSchema names "
                                    f"{len(columns)}", common.EXIT_USAGE)
                if (b is not None and row[b] != bucket) or (latest is not None and row[latest] != "true") or \
                        (deleted is not None and row[deleted] == "true"):
                    continue
                key = row[k]
                if "%" in key or "+" in key:
                    key = unquote_plus(key)
                if key.startswith(prefix):
                    size = row[s].strip()
                    if size and not size.isdigit():  # isdigit: no sign, no point, no nan
                        raise StepError(f"{path.name} row {rows}: Size {common.printable(size[:20])!r} is not a "
                                        f"number of bytes (key {common.printable(key[:200])}) — {_REDO}",
                                        common.EXIT_USAGE)
                    yield key, int(size or 0), _etag(row[e] if e is not None else None)
    except UnicodeDecodeError as exc:
        raise StepError(f"{path.name}: a byte that is not UTF-8 ({exc.object[exc.start:exc.end]!r}; "
                        f"S3 writes inventory CSV in UTF-8) — {_REDO}", common.EXIT_USAGE) from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise StepError(f"{path.name}: the gzipped CSV is damaged ({exc or 'cut short'}) — {_REDO}",
                        common.EXIT_USAGE) from None
    except csv.Error as exc:
        raise StepError(f"{path.name} row {rows + 1}: not CSV ({exc}) — {_REDO}", common.EXIT_USAGE) from None


def parquet_objects(path: Path, bucket: str, prefix: str) -> Iterator[tuple[str, int, str | None]]:
    try:
        import duckdb
    except ImportError:
        raise StepError("reading a Parquet inventory report needs DuckDB: uv sync --extra parquet (or use a CSV "
                        "report)", common.EXIT_USAGE) from None
    con = duckdb.connect()
    try:
        names = {row[0] for row in con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [str(path)]).fetchall()}
        if not {"key", "size"} <= names:
            raise StepError(f"{path.name}: the Parquet report has no key or size column — add Size to the "
                            "inventory's optional fields", common.EXIT_USAGE)
        where = ["starts_with(key, ?)"]
        params: list = [prefix]
        if "bucket" in names:
            where.append("bucket = ?")
            params.append(bucket)
        if "is_latest" in names:
            where.append("coalesce(is_latest, true)")
        if "is_delete_marker" in names:
            where.append("NOT coalesce(is_delete_marker, false)")
        etag = "e_tag" if "e_tag" in names else "NULL"
        query = f"SELECT key, coalesce(size, 0), {etag} FROM read_parquet(?) WHERE {' AND '.join(where)}"  # noqa
        result = con.execute(query, [str(path), *params])
        while rows := result.fetchmany(BATCH):
            for key, size, tag in rows:
                yield key, size, _etag(tag)
    finally:
        con.close()
