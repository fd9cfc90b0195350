"""Images Bedrock rejected for good: kept in `failed_permanently.jsonl` beside the job-info file.

A record that fails with a 4xx error about the image itself (not a supported image, too large, malformed) fails
again every time it is submitted. Step 3 writes such images here, each with the ETag and size its object had;
step 1 leaves them out of later runs while the object is unchanged, and says so; `01 --retry-failed` submits
them again. Transient failures (5xx, throttling, a record missing from the output) are not written here: the
next run picks those images up by itself, since they are not in the index. One JSON line an image:
`{"source_uri", "key", "etag", "size", "error_code", "error_message", "failed_on"}`.
"""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path

import orjson

import common
from batch_embeddings import naming

FILE_NAME = "failed_permanently.jsonl"
# 4xx answers that are about the job or the account (access, throttling, a vanished object), not the image.
_NOT_THE_IMAGE = re.compile(r"access|denied|permission|authori[sz]|does not exist|throttl|quota|timeout|outside",
                            re.IGNORECASE)


def file_for(job_info_file: Path) -> Path:
    return Path(job_info_file).resolve().parent / FILE_NAME


def is_permanent(error_code, message: str) -> bool:
    """Whether a failed record's error is about the image itself, so submitting it again would fail again."""
    try:
        code = int(error_code)
    except (TypeError, ValueError):
        code = 400 if error_code == "ValidationException" else 0
    return 400 <= code < 500 and code not in (408, 429) and not _NOT_THE_IMAGE.search(message or "")


def load(path: Path) -> dict[str, dict]:
    """vector key -> entry; a missing file is an empty list, a damaged one a one-line error (exit 2)."""
    entries: dict[str, dict] = {}
    try:
        with open(path, "rb") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                entry = orjson.loads(line)
                if not (isinstance(entry, dict) and isinstance(entry.get("key"), str)
                        and isinstance(entry.get("source_uri"), str)):
                    raise ValueError(f"line {number} lacks key or source_uri")
                entries[entry["key"]] = entry
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise common.StepError(f"{path} is damaged ({exc}) — fix or remove it (removing it tries those images "
                               "again)", common.EXIT_USAGE) from None
    return entries


def save(path: Path, entries: dict[str, dict]) -> None:
    if not entries:
        Path(path).unlink(missing_ok=True)
        return
    common.atomic_write(path, lambda fh: fh.write(b"".join(orjson.dumps(e) + b"\n" for e in entries.values())))


def unchanged(entry: dict, obj: dict) -> bool:
    """Whether a listed object is the one that failed (same ETag and size): a changed object is tried again."""
    return entry.get("etag") == obj.get("ETag") and entry.get("size") == obj.get("Size")


def remember(s3, owner: str, failed: list[dict], today: date | None = None) -> dict[str, dict]:
    """Entries for the account's permanent failures, with the ETag and size their objects have now."""
    found = {}
    for entry in failed:
        if entry.get("status") != "failed" or not is_permanent(entry.get("error_code"), entry.get("error_message")):
            continue
        bucket, key = common.parse_s3_uri(entry["source_uri"])
        page = s3.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1, ExpectedBucketOwner=owner)
        obj = next((o for o in page.get("Contents", []) if o["Key"] == key), None)
        if obj is None:
            continue  # gone: a later listing will not find it either
        vector_key = naming.vector_key(entry["source_uri"])
        found[vector_key] = {"source_uri": entry["source_uri"], "key": vector_key, "etag": obj.get("ETag"),
                             "size": obj.get("Size"), "error_code": str(entry.get("error_code")),
                             "error_message": entry.get("error_message", ""),
                             "failed_on": (today or date.today()).isoformat()}
    return found
