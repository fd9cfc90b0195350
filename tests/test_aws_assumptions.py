"""What AWS may do differently from the stand-ins, in both worlds: each unverified behaviour is an option of a
stand-in, and the flow reaches the same end either way (docs/aws-assumptions.md)."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request

import pytest
from botocore.stub import Stubber

import common
from batch_embeddings import jobs, manifests, naming, nova
from tests.conftest import import_step
from tests.standins import serve
from tests.standins.faulty import BucketOwnerCheck, FaultyProxy

FAST_FAIL = {"AWS_MAX_ATTEMPTS": "2"}
OWNER = "123456789012"  # moto's account: the owner of every bucket


@pytest.fixture
def proxy():
    started = []

    def start(app) -> str:
        served = serve(app)
        started.append(served)
        return served.url

    yield start
    for served in started:
        served.stop()


@pytest.fixture
def vectors_config(world):
    """Change the S3 Vectors stand-in's options for one test (it is shared by the session), restored after."""
    url = world.stack.s3vectors_url + "/_standin/config"

    def call(changes: dict | None = None) -> dict:
        data = None if changes is None else json.dumps(changes).encode()
        request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request) as response:
            return json.loads(response.read())

    before = call()
    yield call
    call({k: before[k] for k in ("max_list_response_bytes", "list_bytes_count_stored_data", "default_index_mode")})


def one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def account(world) -> list[dict]:
    return world.account()


def manifest_lines(world) -> list[dict]:
    job = world.job_info()["jobs"][0]
    return [json.loads(line) for m in job["manifests"] for line in open(m["local_path"], encoding="utf-8")]


def uri_of(record: dict) -> str:
    return nova.image_uri(record)


def jsonl_in_bucket(world) -> list[str]:
    return [o["Key"] for o in world.client("s3").list_objects_v2(Bucket=world.source_bucket).get("Contents", [])
            if o["Key"].endswith(".jsonl")]


def index_keys(world) -> set[str]:
    """The index's keys; none while the vector bucket or index does not exist."""
    try:
        return world.index_keys()
    except world.client("s3vectors").exceptions.NotFoundException:
        return set()


def wait_for(condition, what: str, timeout: float = 60):
    """Poll a condition on the stand-ins (an event, not a timing: the deadline only ends a broken test)."""
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)
    return found


# ------------------------------------------------------------------------------------------------ recordId


def test_record_ids_are_twelve_alphanumerics_of_the_uri_and_unique():
    uri = "s3://bucket/2024/photo 1.jpg"
    rid = naming.record_id(uri)
    assert re.fullmatch(r"[A-Za-z0-9]{12}", rid) and rid == naming.record_id(uri)
    assert rid != naming.record_id("s3://bucket/2024/photo 2.jpg")
    others = {naming.record_id(uri, attempt) for attempt in range(1, naming.RECORD_ID_ATTEMPTS)}
    assert rid not in others and len(others) == naming.RECORD_ID_ATTEMPTS - 1
    assert all(re.fullmatch(r"[A-Za-z0-9]{12}", other) for other in others)
    # Pinned: manifests written by an earlier version keep their ids (a resubmit finds its job by them).
    assert [naming.record_id("s3://b/k0"), naming.record_id("s3://b/k0", 1), naming.record_id("s3://b/k2", 1)] == \
        ["TxqJcwUV8Hoh", "e0eGbs3Rc5c2", "bNrmQaEBGLOJ"]
    assert naming.vector_key(uri) == __import__("hashlib").sha256(uri.encode()).hexdigest()[:32]  # unchanged

    ids = naming.RecordIds()
    ids.used.add(rid)  # another image of the job took this URI's id
    second = ids.assign(uri)
    assert second == naming.record_id(uri, 1) and ids.collisions == 1
    assert naming.record_id_matches(second, uri) and naming.record_id_matches(rid, uri)
    assert not naming.record_id_matches(naming.record_id("s3://bucket/other.jpg"), uri)
    assert not naming.record_id_matches(None, uri)


def create_in_process(world, monkeypatch) -> None:
    """Step 1 in this process (so that a patched naming.record_id applies), then the patches undone."""
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in world.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(world.cwd)
    assert import_step(1).main(["--new-index"]) == 0
    monkeypatch.undo()


def test_ids_that_share_only_their_start_keep_their_first_id(world, monkeypatch):
    """01 keeps the first 8 bytes of each id to find a repeat: a repeat of those alone has the manifests written
    again with every id checked whole, and no image loses its first id."""
    uris = world.put_images([f"img-{i:03d}.png" for i in range(110)], prefix="2024/")
    first_id = naming.record_id
    ids_of = {uri: f"SameHead{i:04d}" for i, uri in enumerate(uris)}
    monkeypatch.setattr(naming, "record_id",
                        lambda uri, attempt=0: ids_of[uri] if attempt == 0 else first_id(uri, attempt))
    rewritten = []
    write = manifests.write

    def watched(*args, **kwargs):
        rewritten.append(kwargs.get("exact_ids", False))
        return write(*args, **kwargs)
    monkeypatch.setattr(manifests, "write", watched)
    create_in_process(world, monkeypatch)
    assert rewritten == [False, True]
    assert sorted(r["recordId"] for r in manifest_lines(world)) == sorted(ids_of.values())


def test_a_collision_in_a_job_takes_the_next_id_and_the_flow_loads_everything(world, monkeypatch):
    uris = world.put_images([f"img-{i:03d}.png" for i in range(110)], prefix="2024/")
    first_id = naming.record_id
    # Every image's first id is the same: each after the first must take another one, deterministically.
    monkeypatch.setattr(naming, "record_id", lambda uri, attempt=0: "Collide" if attempt == 0 else first_id(uri, attempt))
    create_in_process(world, monkeypatch)
    records = manifest_lines(world)
    ids = [r["recordId"] for r in records]
    assert len(set(ids)) == len(ids) == 110 and ids.count("Collide") == 1
    assert all(rid == "Collide" or naming.record_id_matches(rid, uri_of(r)) for rid, r in zip(ids, records))

    assert world.step(2, "--wait", "--interval", "0.05", "--timeout", "60").returncode == 0
    loaded = world.step(3)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert world.index_keys() == {naming.vector_key(u) for u in uris}
    # "Collide" is no id of its image's URI: the cross-check reports that one line, and only it
    assert "! 1 output line(s) carry a recordId that 01 did not give their image" in loaded.stdout


def test_the_flow_with_record_ids_limited_to_12_alphanumerics(world):
    uris = world.put_images([f"img-{i:03d}.png" for i in range(120)], prefix="2024/")
    world.emulator("/_emulator/config", {"max_record_id_length": 12, "record_id_alphanumeric": True,
                                         "fail_keys_regex": r"img-00[0-2]\.png$"})
    created = world.step(1)
    assert created.returncode == 0, created.stderr
    assert all(re.fullmatch(r"[A-Za-z0-9]{1,12}", r["recordId"]) for r in manifest_lines(world))
    assert world.step(2, "--wait", "--interval", "0.05", "--timeout", "60").returncode == 0
    loaded = world.step(3)
    assert loaded.returncode == 4
    assert "Images loaded: 117, failed: 3, missing: 0" in loaded.stdout
    assert "carry a recordId" not in loaded.stdout
    failed = {a["source_uri"]: a for a in account(world)}
    assert set(failed) == set(uris[:3])
    assert all(a["status"] == "failed" and a["error_code"] == "500" and a["recordId"] == naming.record_id(u)
               for u, a in failed.items())
    assert world.index_keys() == {naming.vector_key(u) for u in uris[3:]}


def test_output_lines_join_their_images_by_uri_whatever_their_record_id(world):
    uris = world.put_images([f"img-{i:03d}.png" for i in range(120)], prefix="2024/")
    world.emulator("/_emulator/config", {"rewrite_record_ids": True, "fail_keys_regex": r"img-00[0-2]\.png$"})
    assert world.step(1).returncode == 0
    assert world.step(2, "--wait", "--interval", "0.05", "--timeout", "60").returncode == 0
    loaded = world.step(3)
    assert loaded.returncode == 4
    assert "! 120 output line(s) carry a recordId that 01 did not give their image" in loaded.stdout
    assert "Images loaded: 117, failed: 3, missing: 0" in loaded.stdout
    failed = {a["source_uri"]: a for a in account(world)}
    assert set(failed) == set(uris[:3]) and {a["error_code"] for a in failed.values()} == {"500"}
    assert world.index_keys() == {naming.vector_key(u) for u in uris[3:]}


# ------------------------------------------------------------------------------- repeated clientRequestToken


@pytest.mark.parametrize("answer", [None, "ConflictException", "ValidationException"])
def test_a_lost_answer_is_resubmitted_whatever_bedrock_answers_the_repeat(world, proxy, answer):
    uris = world.put_images([f"img-{i:03d}.png" for i in range(120)], prefix="2024/")
    world.emulator("/_emulator/config", {"repeated_token_answer": answer})
    url = proxy(FaultyProxy(world.stack.bedrock_url,
                            lambda method, path: "drop" if method == "POST" and path == "/model-invocation-job"
                            else None))
    failed = world.step(1, env={"AWS_ENDPOINT_URL_BEDROCK": url, **FAST_FAIL})
    assert failed.returncode == 1 and one_line(failed).startswith("error: ")

    resumed = world.step(1)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    created = [j for j in world.emulator("/_emulator/jobs")["jobs"] if j["roleArn"] == world.role_arn]
    assert len(created) == 1 and world.job_info()["jobs"][0]["job_arn"] == created[0]["jobArn"]
    assert "was already submitted (the answer was lost)" in resumed.stdout  # found by name before a resubmit
    if answer == "ConflictException":  # the run carries on to the end with the job found
        assert world.step(2, "--wait", "--interval", "0.05", "--timeout", "60").returncode == 0
        assert world.step(3).returncode == 0
        assert world.index_keys() == {naming.vector_key(u) for u in uris}


def _summary(name: str, token: str, arn_id: str) -> dict:
    return {"jobArn": f"arn:aws:bedrock:us-east-1:{OWNER}:model-invocation-job/{arn_id}", "jobName": name,
            "modelId": "amazon.nova-2-multimodal-embeddings-v1:0", "clientRequestToken": token,
            "roleArn": f"arn:aws:iam::{OWNER}:role/R", "submitTime": "2026-12-01T10:00:00Z",
            "inputDataConfig": {"s3InputDataConfig": {"s3Uri": "s3://src/2024/"}},
            "outputDataConfig": {"s3OutputDataConfig": {"s3Uri": "s3://out/output/"}}}


def test_the_earlier_submit_is_found_by_its_exact_name_across_pages():
    import boto3
    from botocore.exceptions import ClientError

    bedrock = boto3.client("bedrock", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    job = {"job_name": "nova-mme-embedding-20261201-100000-01", "client_request_token": "abc123",
           "input_s3_uri": "s3://src/2024/", "output_s3_uri": "s3://out/output/"}
    conflict = ClientError({"Error": {"Code": "ConflictException", "Message": "name taken"}}, "CreateModelInvocationJob")
    with Stubber(bedrock) as stub:
        stub.add_response("list_model_invocation_jobs", {
            "invocationJobSummaries": [_summary(job["job_name"] + "0", "other", "aaaaaaaaaaaa")], "nextToken": "p2"},
            {"nameContains": job["job_name"], "maxResults": jobs.LIST_PAGE_SIZE})
        stub.add_response("list_model_invocation_jobs", {
            "invocationJobSummaries": [_summary(job["job_name"], "abc123", "bbbbbbbbbbbb")]},
            {"nameContains": job["job_name"], "nextToken": "p2", "maxResults": jobs.LIST_PAGE_SIZE})
        assert jobs.earlier_submit(bedrock, job, conflict).endswith("/bbbbbbbbbbbb")
        stub.assert_no_pending_responses()
    with Stubber(bedrock) as stub:  # the same name with another token: someone else's job
        stub.add_response("list_model_invocation_jobs", {
            "invocationJobSummaries": [_summary(job["job_name"], "not-ours", "cccccccccccc")]},
            {"nameContains": job["job_name"], "maxResults": jobs.LIST_PAGE_SIZE})
        assert jobs.earlier_submit(bedrock, job, conflict) is None
        stub.assert_no_pending_responses()
    unrelated = ClientError({"Error": {"Code": "ValidationException", "Message": "bad roleArn"}},
                            "CreateModelInvocationJob")
    with Stubber(bedrock):  # no lookup at all: a validation error that names neither token nor job
        assert jobs.earlier_submit(bedrock, job, unrelated) is None


def test_the_client_request_token_is_a_function_of_the_manifests(tmp_path):
    def job(name: str, *contents: bytes) -> dict:
        files = []
        for i, content in enumerate(contents):
            path = tmp_path / f"{name}-{i}-{len(list(tmp_path.iterdir()))}.jsonl"
            path.write_bytes(content)
            files.append({"local_path": str(path), "s3_key": f"2024/{path.name}"})
        return {"job_name": name, "manifests": files}

    a = manifests.token(job("run-1", b'{"recordId": "A"}\n', b'{"recordId": "B"}\n'))
    assert re.fullmatch(r"[a-zA-Z0-9]{1,256}(-*[a-zA-Z0-9]){0,256}", a)  # Bedrock's pattern for the token
    assert manifests.token(job("run-1", b'{"recordId": "A"}\n', b'{"recordId": "B"}\n')) == a
    assert manifests.token(job("run-1", b'{"recordId": "A"}\n', b'{"recordId": "C"}\n')) != a
    assert manifests.token(job("run-1", b'{"recordId": "A"}\n')) != a
    assert manifests.token(job("run-2", b'{"recordId": "A"}\n', b'{"recordId": "B"}\n')) != a


def test_the_submitted_token_is_the_manifests_token(world):
    world.put_images([f"img-{i:03d}.png" for i in range(100)], prefix="2024/")
    assert world.step(1).returncode == 0
    job = world.job_info()["jobs"][0]
    (created,) = [j for j in world.emulator("/_emulator/jobs")["jobs"] if j["roleArn"] == world.role_arn]
    assert created["clientRequestToken"] == manifests.token(job) == job["client_request_token"]


# ------------------------------------------------------------------------------------------ ExpectedBucketOwner


def test_the_owner_check_answers_403_to_another_expected_owner(world, proxy):
    import boto3
    from botocore.exceptions import ClientError

    check = BucketOwnerCheck(world.stack.moto_url)
    s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=proxy(check), aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    s3.put_object(Bucket=world.source_bucket, Key="a.txt", Body=b"a", ExpectedBucketOwner=OWNER)
    assert s3.get_object(Bucket=world.source_bucket, Key="a.txt")["Body"].read() == b"a"  # no header: no check
    with pytest.raises(ClientError) as exc_info:
        s3.list_objects_v2(Bucket=world.source_bucket, ExpectedBucketOwner="111122223333")
    assert exc_info.value.response["Error"]["Code"] == "AccessDenied"
    assert exc_info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert check.refused == [("GET", f"/{world.source_bucket}?list-type=2&encoding-type=url")]


def test_a_wrong_expected_bucket_owner_stops_01_before_anything_is_uploaded(world, proxy):
    world.put_images([f"img-{i:03d}.png" for i in range(100)], prefix="2024/")
    check = BucketOwnerCheck(world.stack.moto_url)
    url = proxy(check)
    wrong = world.step(1, env={"AWS_ENDPOINT_URL_S3": url, "EXPECTED_BUCKET_OWNER": "111122223333", **FAST_FAIL})
    assert wrong.returncode == 1
    line = one_line(wrong)
    assert line.startswith("error: AccessDenied: ") and "EXPECTED_BUCKET_OWNER" in line
    assert check.refused and jsonl_in_bucket(world) == []
    assert not (world.cwd / "batch_job_info.json").exists() and not list(world.cwd.rglob("batch_input_*"))
    assert world.emulator("/_emulator/jobs")["jobs"] == []

    right = world.step(1, env={"AWS_ENDPOINT_URL_S3": url, "EXPECTED_BUCKET_OWNER": OWNER})
    assert right.returncode == 0, right.stderr
    assert len(jsonl_in_bucket(world)) == 1 and len(check.refused) == len(set(check.refused)) == 1


# --------------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize("name, value, accepted", [
    ("VECTOR_BUCKET", "my-vectors-01", True),
    ("VECTOR_BUCKET", "my.vectors", False),  # an S3 bucket may hold dots, a vector bucket may not
    ("VECTOR_BUCKET", "My-Vectors", False),
    ("VECTOR_BUCKET", "-vectors", False),
    ("VECTOR_BUCKET", "ab", False),
    ("VECTOR_INDEX", "images.v1", True),  # an index may
    ("VECTOR_INDEX", "images_v1", False),
    ("VECTOR_INDEX", "images.", False),
    ("VECTOR_INDEX", "x" * 64, False),
])
def test_vector_bucket_and_index_name_rules(name, value, accepted):
    import argparse

    env = {"VECTOR_BUCKET": "vectors", "VECTOR_INDEX": "images", name: value}
    if accepted:
        assert getattr(common.load_config(argparse.Namespace(), env=env), name.lower()) == value
    else:
        with pytest.raises(common.ConfigError, match=f"{name}='{re.escape(value)}'"):
            common.load_config(argparse.Namespace(), env=env)


def test_a_dotted_vector_bucket_stops_01_at_the_configuration_check(world):
    world.put_images([f"img-{i:03d}.png" for i in range(100)], prefix="2024/")
    result = world.step(1, env={"VECTOR_BUCKET": "my.vectors"})
    assert result.returncode == 2
    assert "VECTOR_BUCKET='my.vectors' must be 3-63 lowercase letters, digits or '-' (no dots)" in one_line(result)
    assert jsonl_in_bucket(world) == [] and not (world.cwd / "batch_job_info.json").exists()


@pytest.mark.parametrize("omit", [False, True])
def test_02_shows_the_job_whether_or_not_bedrock_names_it(world, omit):
    world.put_images([f"img-{i:03d}.png" for i in range(100)], prefix="2024/")
    world.emulator("/_emulator/config", {"omit_job_name": omit})
    assert world.step(1).returncode == 0
    name = world.job_info()["jobs"][0]["job_name"]
    monitored = world.step(2, "--wait", "--interval", "0.05", "--timeout", "60")
    assert monitored.returncode == 0, monitored.stdout + monitored.stderr
    assert f"Job Name: {name}" in monitored.stdout and ">>> STATUS: Completed <<<" in monitored.stdout


# ------------------------------------------------------------------------------------- S3 Vectors since GA


@pytest.mark.parametrize("mode, cut_pages", [("ENHANCED", False), ("CLASSIC", True)])
def test_the_flow_is_indifferent_to_index_mode_and_list_page_size(world, vectors_config, mode, cut_pages):
    vectors_config({"default_index_mode": mode})
    first = world.put_images([f"old-{i:03d}.png" for i in range(110)], prefix="2024/")
    assert world.step(1).returncode == 0
    assert world.step(2, "--wait", "--interval", "0.05", "--timeout", "60").returncode == 0
    assert world.step(3).returncode == 0
    index = world.client("s3vectors").get_index(vectorBucketName=world.vector_bucket, indexName=world.vector_index)
    assert index["index"]["indexMode"] == mode
    assert world.step(4).returncode == 0

    world.put_images([f"new-{i:03d}.png" for i in range(100)], prefix="2024/")
    if cut_pages:  # a page stops at 1 KB of stored data: one 256-dimension vector a page
        vectors_config({"max_list_response_bytes": 1000, "list_bytes_count_stored_data": True})
    planned = world.step(1, "--dry-run")
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert "Left out 110 image(s): already in the vector index" in planned.stdout
    assert "✓ Found 100 images" in planned.stdout
    assert len(world.index_keys()) == len(first)


# ------------------------------------------------------------------------------ Stopped and InProgress output


def test_a_stopped_job_without_output_accounts_every_image_as_missing(world):
    uris = world.put_images([f"img-{i:03d}.png" for i in range(150)], prefix="2024/")
    world.emulator("/_emulator/config", {"hold_after_records": 20, "stopped_output": "none"})
    assert world.step(1).returncode == 0
    arn = world.job_info()["jobs"][0]["job_arn"]
    bedrock = world.client("bedrock")
    wait_for(lambda: bedrock.get_model_invocation_job(jobIdentifier=arn).get("processedRecordCount", 0) >= 20,
             "20 records processed")
    bedrock.stop_model_invocation_job(jobIdentifier=arn)
    assert world.step(2, "--wait", "--interval", "0.05", "--timeout", "60").returncode == 5
    loaded = world.step(3)
    assert loaded.returncode == 4, loaded.stdout + loaded.stderr
    assert "Traceback" not in loaded.stderr and "✓ Found 0 output files" in loaded.stdout
    assert "Images loaded: 0, failed: 0, missing: 150" in loaded.stdout
    entries = account(world)
    assert {a["source_uri"] for a in entries} == set(uris)
    assert all(a["status"] == "missing" and "Stopped" in a["error_message"] for a in entries)
    assert world.index_keys() == set()


def test_output_present_while_in_progress_is_not_loaded_before_the_job_ends(world):
    uris = world.put_images([f"img-{i:03d}.png" for i in range(150)], prefix="2024/")
    world.emulator("/_emulator/config", {"hold_after_records": 30, "progress_output_every": 10})
    assert world.step(1).returncode == 0
    job = world.job_info()["jobs"][0]
    s3 = world.client("s3")

    def output_lines() -> int:
        listed = s3.list_objects_v2(Bucket=world.result_bucket, Prefix=f"output/{job['job_id']}/").get("Contents", [])
        return sum(len(s3.get_object(Bucket=world.result_bucket, Key=o["Key"])["Body"].read().splitlines())
                   for o in listed if o["Key"].endswith(".jsonl.out"))

    wait_for(lambda: output_lines() == 30, "30 output lines while InProgress")
    bedrock = world.client("bedrock")
    assert bedrock.get_model_invocation_job(jobIdentifier=job["job_arn"])["status"] == "InProgress"

    refused = world.step(3)
    assert refused.returncode == common.EXIT_REFUSED
    assert "has not ended" in one_line(refused) and "InProgress" in refused.stderr
    assert index_keys(world) == set()
    assert not list(world.cwd.rglob("not_loaded.jsonl")) and not list(world.cwd.rglob("load_report_*"))
    assert "load" not in world.job_info()["jobs"][0]

    bedrock.stop_model_invocation_job(jobIdentifier=job["job_arn"])
    assert world.step(2, "--wait", "--interval", "0.05", "--timeout", "60").returncode == 5
    loaded = world.step(3)
    assert loaded.returncode == 4, loaded.stdout + loaded.stderr
    assert "Images loaded: 30, failed: 0, missing: 120" in loaded.stdout
    assert len(world.index_keys()) == 30 and world.index_keys() <= {naming.vector_key(u) for u in uris}
