"""Listing at scale: parallel listing equals sequential listing, the sorted listing file, manifests written with a
few files open whatever the number of jobs, and nothing left behind when writing fails."""

from __future__ import annotations

import argparse
import csv
import errno
import io
import os
import random
import resource
import subprocess
import sys
import threading
import time

import orjson
import pytest
from botocore.exceptions import ClientError

import common
from batch_embeddings import jobs, listing, manifests, nova, selection
from tests.standins import s3 as s3_standin
from tests.conftest import ROOT, STEPS, import_step



def put_empty(s3, bucket: str, keys) -> None:
    s3_standin.put_objects(bucket, ((key, b"x" * (len(key) % 7)) for key in keys))


TREE = (
    [f"2024/top-{i}.jpg" for i in range(5)]  # directly in the prefix
    + [f"2024/a/x{i}.png" for i in range(10)]
    + [f"2024/a/b/c/y{i}.jpg" for i in range(7)]  # nested, with empty folders between
    + [f"2024/many/f{f:02d}/i{i}.jpg" for f in range(listing.SPREAD + 4) for i in range(3)]  # listed whole
    + [f"2024/many/direct-{i}.gif" for i in range(4)]
    + ["2024/a/", "2024/d//double.jpg", "2024/e f/space+plus.jpg", "2024/é/accent.png", "2024/a/R&D <1> \"x\".jpg"]
    + ["2023/outside.jpg", "2024x/outside.jpg"]  # not under 2024/
)


def test_parallel_listing_equals_sequential_listing(world):
    s3 = world.client("s3")
    put_empty(s3, world.source_bucket, TREE)
    calls = []
    s3.meta.events.register("before-parameter-build.s3.ListObjectsV2", lambda params, **_: calls.append(dict(params)))
    lean = listing.fast_listing_client(world.client("s3"))
    lean.meta.events.register("before-parameter-build.s3.ListObjectsV2", lambda params, **_: calls.append(dict(params)))
    owner = "123456789012"

    sequential = list(listing.list_sequential(s3, world.source_bucket, "2024/", owner))
    assert len(sequential) == len(TREE) - 2 and all("LastModified" in o for o in sequential)
    calls.clear()
    parallel = list(listing.list_in_parallel(lean, world.source_bucket, "2024/", owner, threads=4, page_size=3))

    assert sorted((o["Key"], o["Size"]) for o in parallel) == [(o["Key"], o["Size"]) for o in sequential]
    assert all(set(o) == {"Key", "Size", "ETag"} for o in parallel)  # the unused fields were never parsed
    assert sorted((o["Key"], o["ETag"]) for o in parallel) == [(o["Key"], o["ETag"]) for o in sequential]
    assert any(c.get("Delimiter") == "/" for c in calls) and any("Delimiter" not in c for c in calls)
    assert any("ContinuationToken" in c for c in calls)  # folders of more than one page
    # Sub-folders of a folder with many of them are listed whole, each with a listing of its own.
    assert {c["Prefix"] for c in calls if "Delimiter" not in c} >= {f"2024/many/f{f:02d}/"
                                                                       for f in range(listing.SPREAD + 4)}


def test_an_error_in_a_200_answer_is_still_an_error():
    """S3 may answer 200 with an <Error> body; the lean reading leaves it to botocore, which makes it a 500."""
    response = {"status_code": 200, "headers": {}, "body": b'<?xml version="1.0"?><Error><Code>InternalError</Code>'
                                                            b"<Message>We encountered an internal error</Message></Error>"}
    s3 = listing.fast_listing_client(__import__("boto3").client("s3", region_name="us-east-1"))
    model = s3.meta.service_model.operation_model("ListObjectsV2")
    customized = {}
    listing._parse_lean(response_dict=response, customized_response_dict=customized, operation_model=model)
    assert response["status_code"] == 500 and customized == {}


def test_url_encoded_keys_are_decoded_as_botocore_would():
    """S3 answers keys URL-encoded (a space as + or %20) and XML-escaped; the lean reading decodes both itself."""
    body = (b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>b</Name><Prefix>p%2F</Prefix>'
            b"<Contents><Key>p/a+b%2Bc%20d.jpg</Key><Size>3</Size><ETag>&quot;e1&quot;</ETag></Contents>"
            b"<Contents><Key>p/R%26D+%3C1%3E.png</Key><Size>4</Size><ETag>&quot;e2&quot;</ETag></Contents>"
            b"<Contents><Key>p/plain.jpg</Key><Size>5</Size></Contents>"
            b"<CommonPrefixes><Prefix>p/sub+dir/</Prefix></CommonPrefixes>"
            b"<EncodingType>url</EncodingType><IsTruncated>false</IsTruncated></ListBucketResult>")
    response = {"status_code": 200, "headers": {}, "body": body}
    customized = {}
    listing._parse_lean(response_dict=response, customized_response_dict=customized)
    assert customized["Contents"] == [{"Key": "p/a b+c d.jpg", "Size": 3, "ETag": '"e1"'},
                                      {"Key": "p/R&D <1>.png", "Size": 4, "ETag": '"e2"'},
                                      {"Key": "p/plain.jpg", "Size": 5, "ETag": None}]
    assert customized["CommonPrefixes"] == [{"Prefix": "p/sub dir/"}]
    assert "EncodingType" not in customized and customized["IsTruncated"] is False  # botocore decodes nothing more


class FailingS3:
    """A stand-in S3 client whose listing pages go on for ever, and fail at the `fail_at`-th request."""

    def __init__(self, fail_at: int):
        self.fail_at, self.calls, self.lock = fail_at, 0, threading.Lock()

    def list_objects_v2(self, **params):
        with self.lock:
            self.calls += 1
            n = self.calls
        if n == self.fail_at:
            raise ClientError({"Error": {"Code": "InternalError", "Message": "boom"}}, "ListObjectsV2")
        prefixes = [{"Prefix": f"{params['Prefix']}{i}/"} for i in range(3)] if "Delimiter" in params else []
        return {"Contents": [{"Key": f"{params['Prefix']}k{n}.jpg", "Size": 1}], "CommonPrefixes": prefixes,
                "IsTruncated": True, "NextContinuationToken": str(n)}


def listing_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("list-")]


def test_a_failure_on_any_thread_ends_the_listing_and_every_thread():
    fake = FailingS3(fail_at=25)
    with pytest.raises(ClientError, match="boom"):
        for _ in listing.list_in_parallel(fake, "b", "p/", "123456789012", threads=4):
            pass
    assert listing_threads() == []
    calls = fake.calls
    assert calls < 25 + 2 * 4  # the other threads stopped at their next page


def test_leaving_the_listing_early_stops_its_threads():
    fake = FailingS3(fail_at=-1)
    objects = listing.list_in_parallel(fake, "b", "p/", "123456789012", threads=4)
    next(objects)
    objects.close()  # what Ctrl-C in the consumer does
    assert listing_threads() == []


def test_a_slow_caller_keeps_at_most_ahead_pages_listed_and_waiting():
    fake = FailingS3(fail_at=-1)  # one folder whose pages never end: a single thread lists it, page after page
    objects = listing.list_in_parallel(fake, "b", "p/", "123456789012", threads=4, ahead=3)
    taken = []
    reader = threading.Thread(target=lambda: taken.extend(next(objects) for _ in range(5)), daemon=True)
    reader.start()
    reader.join(timeout=30)
    assert len(taken) == 5  # each page taken gave its credit back
    deadline = time.monotonic() + 30
    while fake.calls < 5 + 3 and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    threading.Event().wait(0.3)  # a lister that ignored the bound would have asked for many more by now
    assert fake.calls == 5 + 3  # the five pages taken and three ahead, not one more
    objects.close()
    assert listing_threads() == []


class CountingOpen:
    """`open` for the listing module, counting the files it has open at once."""

    def __init__(self):
        self.now = self.most = 0

    def __call__(self, *args, **kwargs):
        counter, fh = self, open(*args, **kwargs)
        counter.now += 1
        counter.most = max(counter.most, counter.now)
        close = fh.close

        def counted_close():
            if not fh.closed:
                counter.now -= 1
            close()
        fh.close = counted_close
        return fh


def test_sort_lines_merges_at_most_half_the_open_file_limit_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(listing.resource, "getrlimit", lambda which: (52, 4096))
    assert listing.merge_width() == 10  # (52 - 32) // 2: room left for sockets, manifests, the runtime
    counting = CountingOpen()
    monkeypatch.setattr(listing, "open", counting, raising=False)
    lines = [orjson.dumps([f"k/{random.random()}", "png"]) + b"\n" for _ in range(300)]
    target = tmp_path / "sorted"
    assert listing.sort_lines(iter(lines), target, run_lines=5) == 300  # 60 runs, merged 10 at a time
    assert target.read_bytes() == b"".join(sorted(lines))
    assert counting.most == 10 + 1 and counting.now == 0
    assert [p.name for p in tmp_path.iterdir()] == ["sorted"]
    monkeypatch.setattr(listing.resource, "getrlimit", lambda which: (1 << 20, 1 << 20))
    assert listing.merge_width() == listing.MERGE_FILES == 128


def test_sort_lines_merges_runs_a_few_files_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr(listing, "MERGE_FILES", 3)
    lines = [orjson.dumps([f"k/{random.random()}", "png"]) + b"\n" for _ in range(500)]
    target = tmp_path / "sorted"
    assert listing.sort_lines(iter(lines), target, run_lines=7) == 500
    assert target.read_bytes() == b"".join(sorted(lines))
    assert [p.name for p in tmp_path.iterdir()] == ["sorted"]  # no run left behind


def config_for(world, **env) -> common.Config:
    return common.load_config(argparse.Namespace(), common.RUN_REQUIRED, env={**world.env, **env})


def synthetic(folders: int, per_folder: int, seed: int = 0) -> list[dict]:
    objects = [{"Key": f"2024/f{f:04d}/img-{i:03d}.jpg", "Size": 100 + i} for f in range(folders)
               for i in range(per_folder)]
    objects += [{"Key": f"2024/loose-{i}.png", "Size": 5} for i in range(per_folder)]
    random.Random(seed).shuffle(objects)
    return objects


def plan_and_write(objects, config, workdir, manifest_dir, stamp="20261201-000000"):
    pairs = ((o["Key"], o["Size"], o.get("ETag")) if isinstance(o, dict) else o for o in objects)
    return plan_and_write_listing(selection.list_images(pairs, config, [], workdir), config, manifest_dir, stamp)


def plan_and_write_listing(found, config, manifest_dir, stamp="20261201-000000"):
    can_root = lambda folder: True  # noqa: E731
    planned = jobs.plan_jobs({f: tuple(c) for f, c in found.counts.items()}, config.source_prefix, config.quotas,
                             can_root).jobs
    return manifests.write(found, planned, config, "123456789012", stamp, manifest_dir)


def written(records) -> dict[str, bytes]:
    from pathlib import Path

    return {Path(m["local_path"]).name: Path(m["local_path"]).read_bytes() for r in records for m in r["manifests"]}


def test_the_order_of_the_listing_does_not_change_the_manifests(world, tmp_path):
    config = config_for(world, MIN_RECORDS_PER_JOB="5", MAX_RECORDS_PER_JOB="12", MAX_RECORDS_PER_FILE="5")
    runs = []
    for seed in (1, 2):
        (tmp_path / f"w{seed}").mkdir()
        (tmp_path / f"m{seed}").mkdir()
        records = plan_and_write(synthetic(20, 17, seed), config, tmp_path / f"w{seed}", tmp_path / f"m{seed}")
        runs.append(([(r["job_name"], r["record_count"], r["client_request_token"]) for r in records],
                     written(records)))
    assert runs[0] == runs[1]
    assert len(runs[0][1]) > 20 and sum(n for _, n, _ in runs[0][0]) == 20 * 17 + 17


def test_manifests_written_with_a_few_files_open(world, tmp_path, monkeypatch):
    config = config_for(world, MIN_RECORDS_PER_JOB="5", MAX_RECORDS_PER_JOB="10", MAX_RECORDS_PER_FILE="4")
    real, open_files = nova.image_record, []

    def counting(*args, **kwargs):
        open_files.append(len(os.listdir("/proc/self/fd")))
        return real(*args, **kwargs)

    monkeypatch.setattr(nova, "image_record", counting)
    before = len(os.listdir("/proc/self/fd"))
    records = plan_and_write(synthetic(60, 10), config, tmp_path, tmp_path)
    assert len(records) >= 60 and all(len(r["manifests"]) == 3 for r in records[:60])  # 4 + 4 + 2 records
    assert max(open_files) - before <= manifests.OPEN_MANIFESTS + 1  # + the listing being read
    lines = [line for m in written(records).values() for line in m.splitlines()]
    assert len(lines) == 610 and len(set(lines)) == 610


def test_hundreds_of_jobs_under_a_low_open_file_limit(world):
    """400 jobs with at most 64 files open: 01 --dry-run from an inventory of 400 folders of 10 images."""
    keys = [f"2024/f{f:03d}/img-{i}.jpg" for f in range(400) for i in range(10)]
    body = io.StringIO()
    csv.writer(body).writerows([world.source_bucket, key, "1234"] for key in keys)
    s3 = world.client("s3")
    s3.put_object(Bucket=world.result_bucket, Key="inv/data/a.csv", Body=body.getvalue().encode())
    manifest = {"sourceBucket": world.source_bucket, "fileFormat": "CSV", "fileSchema": "Bucket, Key, Size",
                "files": [{"key": "inv/data/a.csv"}]}
    s3.put_object(Bucket=world.result_bucket, Key="inv/manifest.json", Body=orjson.dumps(manifest))

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    result = subprocess.run(
        [sys.executable, str(ROOT / STEPS[1]), "--dry-run", "--inventory", f"s3://{world.result_bucket}/inv/manifest.json"],
        cwd=world.cwd, capture_output=True, text=True, timeout=300, preexec_fn=low_limit,
        env={**world.env, "MIN_RECORDS_PER_JOB": "5", "MAX_RECORDS_PER_JOB": "10"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert "Found 4000 images" in result.stdout
    assert "Planned 400 job(s)" in result.stdout
    assert result.stdout.count("Created batch_input_") == 400
    assert not list(world.cwd.rglob("batch_input_*"))


class Fail:
    """nova.image_record that fails on its `at`-th call."""

    def __init__(self, at: int, exc: BaseException):
        self.at, self.exc, self.calls, self.real = at, exc, 0, nova.image_record

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise self.exc
        return self.real(*args, **kwargs)


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")])
def test_a_failure_while_writing_removes_every_manifest(world, tmp_path, monkeypatch, exc):
    config = config_for(world, MIN_RECORDS_PER_JOB="5", MAX_RECORDS_PER_JOB="10", MAX_RECORDS_PER_FILE="4")
    (tmp_path / "work").mkdir()
    monkeypatch.setattr(nova, "image_record", Fail(300, exc))
    expected = KeyboardInterrupt if isinstance(exc, KeyboardInterrupt) else common.StepError
    with pytest.raises(expected) as raised:
        plan_and_write(synthetic(60, 10), config, tmp_path / "work", tmp_path)
    assert not list(tmp_path.glob("batch_input_*"))
    if expected is common.StepError:
        assert raised.value.exit_code == common.EXIT_USAGE
        assert "No space left on device" in str(raised.value) and "\n" not in str(raised.value)


def test_ctrl_c_while_writing_manifests_is_one_line_and_leaves_none(world, monkeypatch, capsys):
    put_empty(world.client("s3"), world.source_bucket,
              [f"2024/f{f}/img-{i:03d}.png" for f in range(3) for i in range(110)])
    for name, value in {**world.env, "MIN_RECORDS_PER_JOB": "100", "MAX_RECORDS_PER_JOB": "200"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(world.cwd)
    monkeypatch.setattr(nova, "image_record", Fail(150, KeyboardInterrupt()))
    assert import_step(1).main(["--new-index"]) == common.EXIT_INTERRUPTED  # step 1 as a user runs it
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("interrupted")
    assert not list(world.cwd.rglob("batch_input_*")) and not (world.cwd / "batch_job_info.json").exists()
