"""Images Bedrock rejected for good (failed_permanently.jsonl): only an error about the image itself puts an image
there; a passing trouble (a 5xx, throttling, access) leaves it to the next run, and what was remembered stays."""

from __future__ import annotations

import json
import types
from datetime import date

import pytest

import common
from batch_embeddings import accounting, failed_permanently, naming

OWNER = "123456789012"
BUCKET = "images"


class FakeS3:
    """ListObjectsV2 of a bucket whose objects are given as key -> (ETag, size)."""

    def __init__(self, objects: dict[str, tuple[str, int]]):
        self.objects = objects

    def list_objects_v2(self, Bucket, Prefix, MaxKeys, ExpectedBucketOwner):
        assert Bucket == BUCKET and ExpectedBucketOwner == OWNER
        keys = sorted(k for k in self.objects if k.startswith(Prefix))[:MaxKeys]
        if not keys:
            return {"KeyCount": 0}  # S3 (and botocore) give no Contents at all for an empty page
        return {"Contents": [{"Key": k, "ETag": self.objects[k][0], "Size": self.objects[k][1]} for k in keys]}


class EmptyIndex:
    """An index that holds none of the remembered images."""

    def get_index(self, **_):
        return {}

    def get_vectors(self, keys, **_):
        return {"vectors": []}


def failed(key: str, code: str, message: str) -> dict:
    """A line of the run's account for an image that failed, as accounting.account_run gives it."""
    uri = common.s3_uri(BUCKET, key)
    return {"source_uri": uri, "recordId": "r" + key[-5:], "job_name": "job", "status": "failed",
            "error_code": code, "error_message": message}


def remember(tmp_path, account: list[dict], objects: dict[str, tuple[str, int]]) -> list[dict]:
    """Step 3's end of run: the account's permanent failures written beside the job-info file; what the file holds."""
    config = types.SimpleNamespace(job_info_file=tmp_path / "batch_job_info.json", vector_bucket="vectors",
                                   vector_index="images")
    permanent = [entry for entry in account if failed_permanently.is_permanent(entry["error_code"], entry["error_message"])]
    accounting.remember_permanent_failures(FakeS3(objects), EmptyIndex(), config, OWNER, permanent)
    path = tmp_path / failed_permanently.FILE_NAME
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("code, message", [
    ("500", "Internal server error"),
    ("503", "Service unavailable"),
    ("429", "Too many requests, please wait before trying again."),
    ("408", "The request timed out"),
    ("403", "Access Denied"),
    ("400", "Access Denied when reading the S3 object"),
    ("400", "PERMISSION to read the object was refused"),
    ("400", "The S3 object Does Not Exist"),
    ("400", "Rate exceeded: Throttled"),
    ("400", "Quota reached for the account"),
    ("ThrottlingException", "Too many requests"),
])
def test_a_passing_trouble_does_not_bury_the_image(tmp_path, code, message):
    """After one service hiccup, throttling or an access problem, the image is not written to
    failed_permanently.jsonl: the next run submits it again by itself."""
    account = [failed("2024/a.png", code, message)]
    assert remember(tmp_path, account, {"2024/a.png": ('"e1"', 10)}) == []
    assert not failed_permanently.is_permanent(code, message)


@pytest.mark.parametrize("code, message", [
    ("400", "Unsupported image format"),
    ("400", "The image is too large"),
    ("ValidationException", "Malformed input request: the image could not be decoded"),
])
def test_an_error_about_the_image_itself_is_remembered_with_its_etag_and_size(tmp_path, code, message):
    account = [failed("2024/bad.png", code, message), failed("2024/flaky.png", "500", "Internal server error")]
    kept = remember(tmp_path, account, {"2024/bad.png": ('"e1"', 22), "2024/flaky.png": ('"e2"', 5)})
    assert kept == [{"source_uri": f"s3://{BUCKET}/2024/bad.png", "key": naming.vector_key(f"s3://{BUCKET}/2024/bad.png"),
                     "etag": '"e1"', "size": 22, "error_code": code, "error_message": message,
                     "failed_on": date.today().isoformat()}]


def test_new_permanent_failures_are_added_to_those_remembered(tmp_path):
    """Yesterday's poison image stays out of later runs when today brings another one."""
    objects = {"2024/old.png": ('"e0"', 7), "2024/new.png": ('"e1"', 9)}
    first = remember(tmp_path, [failed("2024/old.png", "400", "Unsupported image format")], objects)
    assert [e["source_uri"] for e in first] == [f"s3://{BUCKET}/2024/old.png"]
    second = remember(tmp_path, [failed("2024/new.png", "400", "Unsupported image format")], objects)
    assert sorted(e["source_uri"] for e in second) == [f"s3://{BUCKET}/2024/new.png", f"s3://{BUCKET}/2024/old.png"]
    assert failed_permanently.load(tmp_path / failed_permanently.FILE_NAME).keys() == {naming.vector_key(e["source_uri"]) for e in second}


def test_only_failed_images_about_themselves_are_remembered_and_a_gone_one_is_skipped():
    """failed_permanently.remember on the account's lines: a missing image, a passing trouble and an image deleted since are
    left out; the images after a deleted one are still remembered."""
    account = [failed("2024/gone.png", "400", "Unsupported image format"),
               dict(failed("2024/missing.png", "400", "Unsupported image format"), status="missing"),
               failed("2024/denied.png", "400", "Access Denied"),
               failed("2024/flaky.png", "500", "Internal server error"),
               {k: v for k, v in failed("2024/bad.png", "ValidationException", "").items() if k != "error_message"}]
    objects = {k: ('"e"', 3) for k in ("2024/missing.png", "2024/denied.png", "2024/flaky.png", "2024/bad.png")}
    found = failed_permanently.remember(FakeS3(objects), OWNER, account, today=date(2026, 12, 1))
    uri = f"s3://{BUCKET}/2024/bad.png"
    assert found == {naming.vector_key(uri): {"source_uri": uri, "key": naming.vector_key(uri), "etag": '"e"',
                                              "size": 3, "error_code": "ValidationException", "error_message": "",
                                              "failed_on": "2026-12-01"}}


def test_a_remembered_image_is_left_out_only_while_unchanged():
    entry = {"source_uri": "s3://b/k", "key": "k", "etag": '"e1"', "size": 10}
    assert failed_permanently.unchanged(entry, {"Key": "k", "ETag": '"e1"', "Size": 10})
    assert not failed_permanently.unchanged(entry, {"Key": "k", "ETag": '"e2"', "Size": 10})  # rewritten, same size
    assert not failed_permanently.unchanged(entry, {"Key": "k", "ETag": '"e1"', "Size": 11})


@pytest.mark.parametrize("text", [b'{"key": "k"}\n', b'{"source_uri": "s3://b/k"}\n', b"[1, 2]\n", b"{not json\n",
                                  b'{"key": "k", "source_uri": 3}\n'])
def test_a_damaged_file_is_one_line_and_exit_2(tmp_path, text):
    path = tmp_path / failed_permanently.FILE_NAME
    path.write_bytes(b'{"key": "a", "source_uri": "s3://b/a"}\n\n' + text)
    with pytest.raises(common.StepError) as caught:
        failed_permanently.load(path)
    assert caught.value.exit_code == common.EXIT_USAGE
    assert str(caught.value).startswith(f"{path} is damaged (") and "\n" not in str(caught.value)
    assert "removing it tries those images again" in str(caught.value)
    if text.startswith(b'{"'):
        assert "(line 3 lacks key or source_uri)" in str(caught.value)  # the blank line 2 is counted


def test_the_file_reads_back_what_was_saved_and_an_empty_list_removes_it(tmp_path):
    path = tmp_path / failed_permanently.FILE_NAME
    entries = {"a": {"key": "a", "source_uri": "s3://b/a", "etag": '"e"'},
               "b": {"key": "b", "source_uri": "s3://b/中文 b.png", "etag": None}}
    failed_permanently.save(path, entries)
    assert failed_permanently.load(path) == entries
    assert len(path.read_bytes().splitlines()) == 2  # one JSON line an image
    failed_permanently.save(path, {})
    assert not path.exists() and failed_permanently.load(path) == {}
    failed_permanently.save(path, {})  # nothing to remove: no error
    assert failed_permanently.file_for(tmp_path / "sub" / ".." / "batch_job_info.json") == tmp_path.resolve() / failed_permanently.FILE_NAME
