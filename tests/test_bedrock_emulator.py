"""The Bedrock batch-inference / InvokeModel stand-in behaves as aws-facts.md and botocore's models say.

moto (ThreadedMotoServer) holds S3 and IAM; the emulator runs with `serve`; the tests talk to it through boto3.
"""

from __future__ import annotations

import base64
import json
import math
import os
import struct
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer

from tests.standins import serve
from tests.standins.bedrock import NOVA_MME, TERMINAL, make_app, unauthorized_accesses
from tests.standins.embedding import embed_image, embed_text

ACCOUNT = "123456789012"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/BedrockBatchInferenceRole"
MAGIC = {"jpeg": b"\xff\xd8\xff\xe0", "png": b"\x89PNG\r\n\x1a\n", "gif": b"GIF89a",
         "webp": b"RIFF\x00\x00\x00\x00WEBP"}


@dataclass
class Stack:
    moto_url: str
    url: str  # the emulator without IAM
    iam_url: str  # an emulator that checks the role in IAM


@pytest.fixture(scope="module")
def stack():
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    moto_url = f"http://{host}:{port}"
    plain = serve(make_app(s3_endpoint_url=moto_url, options={"step_seconds": 0.05}))
    with_iam = serve(make_app(s3_endpoint_url=moto_url, iam_endpoint_url=moto_url, options={"step_seconds": 0.05}))
    yield Stack(moto_url, plain.url, with_iam.url)
    plain.stop()
    with_iam.stop()
    moto.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def control(url: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(f"{url}/_emulator/{path}", method="GET" if body is None else "POST",
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())


@pytest.fixture(autouse=True)
def fresh(stack):
    control(stack.url, "reset", {})
    control(stack.iam_url, "reset", {})


@pytest.fixture
def s3(stack):
    return boto3.client("s3", endpoint_url=stack.moto_url)


@pytest.fixture
def bedrock(stack):
    return boto3.client("bedrock", endpoint_url=stack.url)


@pytest.fixture
def buckets(s3):
    src, out = f"src-{uuid.uuid4().hex[:10]}", f"out-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=src)
    s3.create_bucket(Bucket=out)
    return src, out


def image_bytes(name: str, fmt: str = "jpeg") -> bytes:
    return MAGIC[fmt] + name.encode() + bytes(48)


def put_images(s3, bucket: str, keys: list[str], fmt: str = "jpeg") -> dict[str, bytes]:
    images = {key: image_bytes(f"{bucket}/{key}", fmt) for key in keys}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: s3.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), images.items()))
    return images


def model_input(uri: str, fmt: str = "jpeg", dimension: int = 256, **image) -> dict:
    return {"taskType": "SINGLE_EMBEDDING",
            "singleEmbeddingParams": {"embeddingPurpose": "GENERIC_INDEX", "embeddingDimension": dimension,
                                      "image": {"format": fmt, "source": {"s3Location": {"uri": uri}}, **image}}}


def put_jsonl(s3, bucket: str, key: str, records: list[dict]) -> None:
    s3.put_object(Bucket=bucket, Key=key, Body="".join(json.dumps(r) + "\n" for r in records).encode())


def image_job_input(s3, bucket: str, folder: str, n: int, *, jsonl: str = "batch_input_X.jsonl",
                    dimension: int = 256) -> dict[str, bytes]:
    """n images under folder/ (some in a sub-folder) and one JSONL next to them; returns {recordId: bytes}."""
    keys = [f"{folder}/{'sub/' if i % 3 == 0 else ''}img{i:04d}.jpg" for i in range(n)]
    images = put_images(s3, bucket, keys)
    records = [{"recordId": f"IMG{i:04d}", "modelInput": model_input(f"s3://{bucket}/{key}", dimension=dimension)}
               for i, key in enumerate(keys)]
    put_jsonl(s3, bucket, f"{folder}/{jsonl}", records)
    return {f"IMG{i:04d}": images[key] for i, key in enumerate(keys)}


def create(bedrock, src: str, out: str, folder: str = "2024", **extra):
    params = dict(jobName=f"nova-mme-{uuid.uuid4().hex[:8]}", roleArn=ROLE_ARN, modelId=NOVA_MME,
                  inputDataConfig={"s3InputDataConfig": {"s3Uri": f"s3://{src}/{folder}/", "s3InputFormat": "JSONL"}},
                  outputDataConfig={"s3OutputDataConfig": {"s3Uri": f"s3://{out}/output/"}})
    params.update(extra)
    return bedrock.create_model_invocation_job(**params)["jobArn"]


def wait(bedrock, arn: str, statuses=TERMINAL, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = bedrock.get_model_invocation_job(jobIdentifier=arn)
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, f"job still {job['status']}"
        time.sleep(0.02)


def outputs(s3, bucket: str, job_id: str) -> dict[str, bytes]:
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"output/{job_id}/").get("Contents", [])
    return {o["Key"][len(f"output/{job_id}/"):]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            for o in listed}


def lines_of(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines()]


def error_code(exc_info) -> str:
    return exc_info.value.response["Error"]["Code"]


# ------------------------------------------------------------------------------------------------------------


def test_embeddings_are_deterministic_unit_float32_vectors():
    for dimension in (256, 384, 1024, 3072):
        vector = embed_image(b"\xff\xd8\xffabc", dimension)
        assert len(vector) == dimension and any(vector)
        assert vector == embed_image(b"\xff\xd8\xffabc", dimension)
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, abs_tol=1e-6)
        assert all(struct.unpack("<f", struct.pack("<f", x))[0] == x for x in vector)
    assert embed_image(b"a", 256) != embed_image(b"b", 256)
    assert embed_text("a cat", 256) != embed_image(b"a cat", 256)
    with pytest.raises(ValueError):
        embed_text("x", 512)


def test_120_image_job_completes_with_lines_and_manifest(bedrock, s3, buckets, stack):
    src, out = buckets
    images = image_job_input(s3, src, "2024", 120, dimension=3072)
    arn = create(bedrock, src, out)
    job_id = arn.rsplit("/", 1)[1]
    assert arn == f"arn:aws:bedrock:us-east-1:{ACCOUNT}:model-invocation-job/{job_id}" and len(job_id) == 12
    assert bedrock.get_model_invocation_job(jobIdentifier=arn)["status"] == "Submitted"

    job = wait(bedrock, job_id)  # Get accepts the id as well as the ARN
    assert job["status"] == "Completed", job.get("message")
    assert (job["totalRecordCount"], job["processedRecordCount"], job["successRecordCount"],
            job["errorRecordCount"]) == (120, 120, 120, 0)
    assert job["endTime"] >= job["submitTime"] and job["jobExpirationTime"] > job["submitTime"]

    files = outputs(s3, out, job_id)
    assert set(files) == {"batch_input_X.jsonl.out", "manifest.json.out"}
    raw_lines = files["batch_input_X.jsonl.out"].decode().splitlines()
    assert 60_000 < len(raw_lines[0]) < 80_000  # a 3072-float line is about 69 KB
    lines = [json.loads(line) for line in raw_lines]
    assert [line["recordId"] for line in lines] != sorted(images)  # order is not guaranteed: shuffled
    assert sorted(line["recordId"] for line in lines) == sorted(images)
    for line in lines:
        assert line["modelInput"]["singleEmbeddingParams"]["image"]["format"] == "jpeg"
        (embedding,) = line["modelOutput"]["embeddings"]
        assert embedding["embeddingType"] == "IMAGE"
        assert embedding["embedding"] == embed_image(images[line["recordId"]], 3072)
    assert json.loads(files["manifest.json.out"]) == {
        "totalRecordCount": 120, "processedRecordCount": 120, "successRecordCount": 120, "errorRecordCount": 0,
        "inputTokenCount": 0, "outputTokenCount": 0}


def test_bad_records_become_error_lines(bedrock, s3, buckets):
    src, out = buckets
    image_job_input(s3, src, "2024", 100)
    put_images(s3, src, ["2024/png-as-jpeg.jpg"], fmt="png")
    put_images(s3, src, ["2023/elsewhere.jpg", "2024/ok-again.jpg"])
    bad = {
        "WRONGMAGIC": model_input(f"s3://{src}/2024/png-as-jpeg.jpg"),
        "JPGFORMAT": model_input(f"s3://{src}/2024/ok-again.jpg", fmt="jpg"),
        "MISSING": model_input(f"s3://{src}/2024/no-such.jpg"),
        "OUTSIDE": model_input(f"s3://{src}/2023/elsewhere.jpg"),
        "OTHERBUCKET": model_input(f"s3://{out}/2024/ok-again.jpg"),
        "OWNER": model_input(f"s3://{src}/2024/ok-again.jpg"),
        "DIMENSION": model_input(f"s3://{src}/2024/ok-again.jpg", dimension=512),
        "PURPOSE": model_input(f"s3://{src}/2024/ok-again.jpg"),
        "TWOMODALITIES": model_input(f"s3://{src}/2024/ok-again.jpg"),
    }
    bad["OWNER"]["singleEmbeddingParams"]["image"]["source"]["s3Location"]["bucketOwner"] = "111122223333"
    bad["PURPOSE"]["singleEmbeddingParams"]["embeddingPurpose"] = "INDEX"
    bad["TWOMODALITIES"]["singleEmbeddingParams"]["text"] = {"truncationMode": "END", "value": "x"}
    put_jsonl(s3, src, "2024/more.jsonl", [{"recordId": k, "modelInput": v} for k, v in bad.items()])

    job = wait(bedrock, create(bedrock, src, out))
    assert job["status"] == "Completed", job.get("message")
    assert (job["totalRecordCount"], job["successRecordCount"], job["errorRecordCount"]) == (109, 100, 9)
    lines = {line["recordId"]: line for line in lines_of(outputs(s3, out, job["jobArn"][-12:])["more.jsonl.out"])}
    assert set(lines) == set(bad)
    for record_id, line in lines.items():
        assert "modelOutput" not in line and line["modelInput"] == bad[record_id]
        assert line["error"]["errorCode"] == 400, record_id
    assert "png" in lines["WRONGMAGIC"]["error"]["errorMessage"]
    assert "jpg" in lines["JPGFORMAT"]["error"]["errorMessage"]
    assert "does not exist" in lines["MISSING"]["error"]["errorMessage"]
    assert "outside" in lines["OUTSIDE"]["error"]["errorMessage"]
    assert "outside" in lines["OTHERBUCKET"]["error"]["errorMessage"]


def test_fewer_than_100_records_fails_validation(bedrock, s3, buckets):
    src, out = buckets
    image_job_input(s3, src, "2024", 99)
    job = wait(bedrock, create(bedrock, src, out))
    assert job["status"] == "Failed"
    assert "99 records" in job["message"] and "100" in job["message"]
    assert "endTime" in job and "processedRecordCount" not in job
    assert outputs(s3, out, job["jobArn"][-12:]) == {}


@pytest.mark.parametrize("case", ["no-jsonl", "not-json", "no-model-input", "no-bucket", "per-file", "file-bytes"])
def test_validation_failures(bedrock, s3, buckets, stack, case):
    src, out = buckets
    folder = "2024"
    if case != "no-jsonl":
        image_job_input(s3, src, folder, 100)
    if case == "not-json":
        s3.put_object(Bucket=src, Key="2024/sub/extra.jsonl", Body=b'{"recordId": "A", "modelInput": {}}\nnot json\n')
    if case == "no-model-input":
        s3.put_object(Bucket=src, Key="2024/extra.jsonl", Body=b'{"recordId": "A"}\n')
    if case == "no-bucket":
        src = "no-such-bucket-here"
    if case == "per-file":
        control(stack.url, "config", {"max_records_per_file": 99})
    if case == "file-bytes":
        control(stack.url, "config", {"max_input_file_bytes": 1000})
    job = wait(bedrock, create(bedrock, src, out, folder))
    assert job["status"] == "Failed"
    expected = {"no-jsonl": ".jsonl", "not-json": "line 2", "no-model-input": "modelInput", "no-bucket": "input S3",
                "per-file": "99", "file-bytes": "1000 bytes"}[case]
    assert expected.lower() in job["message"].lower(), job["message"]


def test_every_jsonl_under_the_folder_is_input(bedrock, s3, buckets):
    src, out = buckets
    first = image_job_input(s3, src, "2024", 60, jsonl="batch_input_A.jsonl")
    keys = [f"2024/nested/deeper/b{i}.jpg" for i in range(60)]
    images = put_images(s3, src, keys)
    put_jsonl(s3, src, "2024/nested/batch_input_B.jsonl",
              [{"recordId": f"B{i}", "modelInput": model_input(f"s3://{src}/{k}")} for i, k in enumerate(keys)])
    job = wait(bedrock, create(bedrock, src, out))
    assert job["status"] == "Completed" and job["successRecordCount"] == 120
    files = outputs(s3, out, job["jobArn"][-12:])
    assert set(files) == {"batch_input_A.jsonl.out", "nested/batch_input_B.jsonl.out", "manifest.json.out"}
    assert {line["recordId"] for line in lines_of(files["batch_input_A.jsonl.out"])} == set(first)
    b_lines = lines_of(files["nested/batch_input_B.jsonl.out"])
    assert {line["recordId"] for line in b_lines} == {f"B{i}" for i in range(60)}
    assert b_lines[0]["modelOutput"]["embeddings"][0]["embedding"] == embed_image(
        images[keys[int(b_lines[0]["recordId"][1:])]], 256)


def test_a_record_without_record_id_gets_one(bedrock, s3, buckets, stack):
    src, out = buckets
    image_job_input(s3, src, "2024", 100)
    put_images(s3, src, ["2024/anon.jpg"])
    put_jsonl(s3, src, "2024/anon.jsonl", [{"modelInput": model_input(f"s3://{src}/2024/anon.jpg")}])
    job = wait(bedrock, create(bedrock, src, out))
    assert job["status"] == "Completed"
    (line,) = lines_of(outputs(s3, out, job["jobArn"][-12:])["anon.jsonl.out"])
    assert line["recordId"] and "modelOutput" in line

    control(stack.url, "config", {"require_record_id": True})
    job = wait(bedrock, create(bedrock, src, out))
    assert job["status"] == "Failed" and "recordId" in job["message"]


@pytest.mark.parametrize("override, member", [
    ({"jobName": "nova_mme_job"}, "jobName"),
    ({"jobName": "x" * 64}, "jobName"),
    ({"roleArn": "arn:aws:iam::12345:role/R"}, "roleArn"),
    ({"inputDataConfig": {"s3InputDataConfig": {"s3Uri": "s3://bucket-name/my folder/"}}}, "s3Uri"),
    ({"outputDataConfig": {"s3OutputDataConfig": {"s3Uri": "s3://Bucket/out/"}}}, "s3Uri"),
    ({"inputDataConfig": {"s3InputDataConfig": {"s3Uri": "s3://bucket-name/a/", "s3InputFormat": "CSV"}}},
     "s3InputFormat"),
    ({"inputDataConfig": {"s3InputDataConfig": {"s3Uri": "s3://bucket-name/a/", "s3BucketOwner": "1234"}}},
     "s3BucketOwner"),
    ({"clientRequestToken": "token_with_underscore"}, "clientRequestToken"),
    ({"timeoutDurationInHours": 169}, "timeoutDurationInHours"),
    ({"modelId": "amazon.titan-embed-text-v2:0"}, "model identifier"),
])
def test_parameter_validation(bedrock, override, member):
    with pytest.raises(ClientError) as exc_info:
        create(bedrock, "bucket-name", "bucket-name", **override)
    assert error_code(exc_info) == "ValidationException"
    assert exc_info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert member in exc_info.value.response["Error"]["Message"]
    assert bedrock.list_model_invocation_jobs()["invocationJobSummaries"] == []


def test_client_request_token_is_idempotent_and_names_are_unique(bedrock, s3, buckets):
    src, out = buckets
    first = create(bedrock, src, out, jobName="nightly-1", clientRequestToken="run-20251121-002057")
    again = create(bedrock, src, out, jobName="nightly-1", clientRequestToken="run-20251121-002057")
    assert again == first
    assert len(bedrock.list_model_invocation_jobs()["invocationJobSummaries"]) == 1
    with pytest.raises(ClientError) as exc_info:
        create(bedrock, src, out, jobName="nightly-1", clientRequestToken="another-token")
    assert error_code(exc_info) == "ConflictException"


def test_concurrent_job_quota(bedrock, stack, buckets):
    src, out = buckets
    control(stack.url, "config", {"max_concurrent_jobs": 2, "step_seconds": 5})
    arns = [create(bedrock, src, out) for _ in range(2)]
    with pytest.raises(ClientError) as exc_info:
        create(bedrock, src, out)
    assert error_code(exc_info) == "ServiceQuotaExceededException"
    assert exc_info.value.response["ResponseMetadata"]["RetryAttempts"] == 0  # botocore does not retry it
    for arn in arns:
        bedrock.stop_model_invocation_job(jobIdentifier=arn)
        assert bedrock.get_model_invocation_job(jobIdentifier=arn)["status"] == "Stopping"


def test_stop_and_not_found(bedrock, s3, buckets, stack):
    src, out = buckets
    image_job_input(s3, src, "2024", 100)
    control(stack.url, "config", {"record_seconds": 0.01})
    arn = create(bedrock, src, out)
    running = wait(bedrock, arn, statuses=("InProgress",))
    while running["processedRecordCount"] < 10:  # the counts grow while InProgress
        running = bedrock.get_model_invocation_job(jobIdentifier=arn)
    bedrock.stop_model_invocation_job(jobIdentifier=arn.rsplit("/", 1)[1])
    assert bedrock.get_model_invocation_job(jobIdentifier=arn)["status"] == "Stopping"
    job = wait(bedrock, arn)
    assert job["status"] == "Stopped" and "endTime" in job
    assert 10 <= job["processedRecordCount"] < 100
    files = outputs(s3, out, arn[-12:])
    manifest = json.loads(files["manifest.json.out"])
    assert manifest["processedRecordCount"] == job["processedRecordCount"] == len(
        lines_of(files["batch_input_X.jsonl.out"]))
    with pytest.raises(ClientError) as exc_info:
        bedrock.stop_model_invocation_job(jobIdentifier=arn)
    assert error_code(exc_info) == "ValidationException"

    for identifier in ("abcdefabcdef", f"arn:aws:bedrock:us-east-1:{ACCOUNT}:model-invocation-job/abcdefabcdef"):
        with pytest.raises(ClientError) as exc_info:
            bedrock.get_model_invocation_job(jobIdentifier=identifier)
        assert error_code(exc_info) == "ResourceNotFoundException"
        assert exc_info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    with pytest.raises(ClientError) as exc_info:
        bedrock.get_model_invocation_job(jobIdentifier="not-a-job-id")
    assert error_code(exc_info) == "ValidationException"


def test_fault_injection(bedrock, s3, buckets, stack):
    src, out = buckets
    image_job_input(s3, src, "2024", 120)

    control(stack.url, "config", {"fail_keys_regex": r"img000[0-4]\.jpg$"})
    job = wait(bedrock, create(bedrock, src, out))
    assert (job["status"], job["successRecordCount"], job["errorRecordCount"]) == ("Completed", 115, 5)
    failed = [line for line in lines_of(outputs(s3, out, job["jobArn"][-12:])["batch_input_X.jsonl.out"])
              if "error" in line]
    assert {line["error"]["errorCode"] for line in failed} == {500}
    assert {line["recordId"] for line in failed} == {f"IMG000{i}" for i in range(5)}

    control(stack.url, "config", {"fail_keys_regex": None, "drop_keys_regex": r"/sub/"})
    job = wait(bedrock, create(bedrock, src, out))
    assert job["status"] == "PartiallyCompleted"
    assert (job["totalRecordCount"], job["processedRecordCount"]) == (120, 80)
    assert len(lines_of(outputs(s3, out, job["jobArn"][-12:])["batch_input_X.jsonl.out"])) == 80

    control(stack.url, "config", {"drop_keys_regex": None, "final_status": "Failed", "final_message": "boom"})
    job = wait(bedrock, create(bedrock, src, out))
    assert (job["status"], job["message"]) == ("Failed", "boom")
    assert outputs(s3, out, job["jobArn"][-12:]) == {}

    control(stack.url, "config", {"final_status": "Expired", "final_message": None})
    arn = create(bedrock, src, out)
    seen = set()
    while (job := bedrock.get_model_invocation_job(jobIdentifier=arn))["status"] not in TERMINAL:
        seen.add(job["status"])
        time.sleep(0.01)
    assert job["status"] == "Expired" and "InProgress" not in seen and "message" in job

    control(stack.url, "config", {"final_status": None, "throttle_create": 1})
    no_retry = boto3.client("bedrock", endpoint_url=stack.url, config=Config(retries={"total_max_attempts": 1}))
    with pytest.raises(ClientError) as exc_info:
        create(no_retry, src, out)
    assert error_code(exc_info) == "ThrottlingException"
    assert exc_info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429
    control(stack.url, "config", {"throttle_create": 2})
    assert create(bedrock, src, out)  # botocore's retries get through
    assert control(stack.url, "config")["throttle_create"] == 0


def test_invoke_model_gives_the_batch_vector(bedrock, s3, buckets, stack):
    src, out = buckets
    images = image_job_input(s3, src, "2024", 100)
    job = wait(bedrock, create(bedrock, src, out))
    line = lines_of(outputs(s3, out, job["jobArn"][-12:])["batch_input_X.jsonl.out"])[0]
    batch_vector = line["modelOutput"]["embeddings"][0]["embedding"]
    uri = line["modelInput"]["singleEmbeddingParams"]["image"]["source"]["s3Location"]["uri"]

    runtime = boto3.client("bedrock-runtime", endpoint_url=stack.url)

    def invoke(body: dict) -> dict:
        response = runtime.invoke_model(modelId=NOVA_MME, body=json.dumps(body), contentType="application/json",
                                        accept="application/json")
        return json.loads(response["body"].read())

    by_uri = model_input(uri)
    by_bytes = model_input(uri)
    by_bytes["singleEmbeddingParams"]["image"]["source"] = {
        "bytes": base64.b64encode(images[line["recordId"]]).decode()}
    for body in (by_uri, by_bytes):
        body["singleEmbeddingParams"]["embeddingPurpose"] = "GENERIC_RETRIEVAL"
        (embedding,) = invoke(body)["embeddings"]
        assert embedding == {"embeddingType": "IMAGE", "embedding": batch_vector}

    text = invoke({"taskType": "SINGLE_EMBEDDING", "singleEmbeddingParams": {
        "embeddingPurpose": "IMAGE_RETRIEVAL", "embeddingDimension": 384,
        "text": {"truncationMode": "END", "value": "a red bicycle"}}})
    assert text["embeddings"] == [{"embeddingType": "TEXT", "embedding": embed_text("a red bicycle", 384)}]

    for broken in (model_input(uri, fmt="jpg"), model_input(f"s3://{src}/2024/missing.jpg"),
                   {"taskType": "SEGMENTED_EMBEDDING", "singleEmbeddingParams": {}}):
        with pytest.raises(ClientError) as exc_info:
            invoke(broken)
        assert error_code(exc_info) == "ValidationException"
    with pytest.raises(ClientError) as exc_info:
        runtime.invoke_model(modelId="amazon.titan-embed-image-v1", body=json.dumps(by_uri))
    assert error_code(exc_info) == "ValidationException"


def test_invoke_model_timeouts_and_denials_for_chosen_images(s3, buckets, stack):
    src, _ = buckets
    put_images(s3, src, ["2024/slow.jpg", "2024/secret.jpg", "2024/fine.jpg"])
    runtime = boto3.client("bedrock-runtime", endpoint_url=stack.url, config=Config(retries={"total_max_attempts": 1}))

    def invoke(name: str) -> str:
        """The error code InvokeModel answers for the image, '' for an embedding."""
        try:
            runtime.invoke_model(modelId=NOVA_MME, body=json.dumps(model_input(f"s3://{src}/2024/{name}.jpg")))
        except ClientError as exc:
            assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == {
                "ModelTimeoutException": 408, "AccessDeniedException": 403}[exc.response["Error"]["Code"]]
            return exc.response["Error"]["Code"] + ": " + exc.response["Error"]["Message"]
        return ""

    control(stack.url, "config", {"invoke_timeout_keys_regex": "slow", "invoke_timeouts": 2,
                                  "invoke_denied_keys_regex": "secret"})
    assert [invoke("slow")[:21] for _ in range(3)] == ["ModelTimeoutException"] * 2 + [""]  # twice, then embedded
    assert invoke("fine") == ""
    denied = invoke("secret")
    assert denied.startswith("AccessDeniedException") and f"s3://{src}/2024/secret.jpg" in denied
    control(stack.url, "config", {"invoke_timeouts": 0, "invoke_denied_reason": "iam"})
    assert all(invoke("slow").startswith("ModelTimeoutException") for _ in range(3))  # every time
    denied = invoke("secret")
    assert "bedrock:InvokeModel" in denied and "s3://" not in denied  # IAM's refusal names no object
    with pytest.raises(urllib.error.HTTPError):
        control(stack.url, "config", {"invoke_denied_reason": "kms"})


def test_a_text_past_8k_tokens_is_cut_and_the_answer_says_so(stack):
    runtime = boto3.client("bedrock-runtime", endpoint_url=stack.url)

    def invoke(text: str, mode: str = "END") -> dict:
        body = {"taskType": "SINGLE_EMBEDDING", "singleEmbeddingParams": {
            "embeddingPurpose": "IMAGE_RETRIEVAL", "embeddingDimension": 256,
            "text": {"truncationMode": mode, "value": text}}}
        return json.loads(runtime.invoke_model(modelId=NOVA_MME, body=json.dumps(body))["body"].read())["embeddings"][0]

    within = "word " * 2000  # 10,000 characters: past 8,192, within 8K tokens
    assert invoke(within) == {"embeddingType": "TEXT", "embedding": embed_text(within, 256)}
    long = "".join(f"{i:05d} " for i in range(7000))  # 42,000 characters
    end, start = invoke(long), invoke(long, "START")
    assert end == {"embeddingType": "TEXT", "embedding": embed_text(long[:32768], 256), "truncatedCharLength": 32768}
    assert start["embedding"] == embed_text(long[-32768:], 256) and start["truncatedCharLength"] == 32768
    with pytest.raises(ClientError) as exc_info:
        invoke(long, "NONE")
    assert error_code(exc_info) == "ValidationException"
    assert "8192 tokens" in exc_info.value.response["Error"]["Message"]


def test_list_jobs_filters_and_pages(bedrock, stack, buckets):
    src, out = buckets
    control(stack.url, "config", {"step_seconds": 5})
    arns = [create(bedrock, src, out, jobName=f"nightly-{i}") for i in range(3)]
    create(bedrock, src, out, jobName="adhoc-1")
    bedrock.stop_model_invocation_job(jobIdentifier=arns[0])
    pages = list(bedrock.get_paginator("list_model_invocation_jobs").paginate(
        nameContains="nightly", PaginationConfig={"PageSize": 2}))
    assert [len(p["invocationJobSummaries"]) for p in pages] == [2, 1]
    names = [s["jobName"] for p in pages for s in p["invocationJobSummaries"]]
    assert names == ["nightly-2", "nightly-1", "nightly-0"]  # newest first
    stopping = bedrock.list_model_invocation_jobs(statusEquals="Stopping")["invocationJobSummaries"]
    assert [s["jobArn"] for s in stopping] == [arns[0]]
    first_time = bedrock.get_model_invocation_job(jobIdentifier=arns[0])["submitTime"]
    later = bedrock.list_model_invocation_jobs(submitTimeAfter=first_time, sortOrder="Ascending")
    assert [s["jobName"] for s in later["invocationJobSummaries"]] == ["nightly-1", "nightly-2", "adhoc-1"]


def test_recorded_s3_accesses_against_the_role_policy(bedrock, s3, buckets, stack):
    src, out = buckets
    image_job_input(s3, src, "2024", 100)
    job = wait(bedrock, create(bedrock, src, out))
    (recorded,) = [j for j in control(stack.url, "jobs")["jobs"] if j["jobArn"] == job["jobArn"]]
    accesses = recorded["s3Accesses"]
    assert {"action": "s3:ListBucket", "resource": f"arn:aws:s3:::{src}", "prefix": "2024/"} in accesses
    assert {"action": "s3:GetObject", "resource": f"arn:aws:s3:::{src}/2024/batch_input_X.jsonl"} in accesses
    assert {"action": "s3:GetObject", "resource": f"arn:aws:s3:::{src}/2024/sub/img0000.jpg"} in accesses
    assert {"action": "s3:PutObject",
            "resource": f"arn:aws:s3:::{out}/output/{job['jobArn'][-12:]}/manifest.json.out"} in accesses
    assert {a["action"] for a in accesses} == {"s3:ListBucket", "s3:GetObject", "s3:PutObject"}

    article_policy = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:ListBucket"],
        "Resource": [f"arn:aws:s3:::{b}{s}" for b in (src, out) for s in ("", "/*")]}]}
    assert unauthorized_accesses(accesses, [article_policy]) == []
    read_only = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": f"arn:aws:s3:::{src}*"}]}
    missing = unauthorized_accesses(accesses, [read_only])
    assert missing and {a["resource"].split(":::")[1].split("/")[0] for a in missing} == {out}


def _role(iam, name: str, trust_statement: dict, policy: dict | None) -> str:
    arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [trust_statement]}))["Role"]["Arn"]
    if policy is not None:
        iam.put_role_policy(RoleName=name, PolicyName="s3", PolicyDocument=json.dumps(policy))
    return arn


def test_the_role_must_be_assumable_and_allowed(stack, s3, buckets):
    src, out = buckets
    image_job_input(s3, src, "2024", 100)
    iam = boto3.client("iam", endpoint_url=stack.moto_url)
    bedrock = boto3.client("bedrock", endpoint_url=stack.iam_url)
    suffix = uuid.uuid4().hex[:8]
    trust = {"Effect": "Allow", "Principal": {"Service": "bedrock.amazonaws.com"}, "Action": "sts:AssumeRole",
             "Condition": {"StringEquals": {"aws:SourceAccount": ACCOUNT},
                           "ArnLike": {"aws:SourceArn": f"arn:aws:bedrock:us-east-1:{ACCOUNT}:model-invocation-job/*"}}}
    s3_policy = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:ListBucket"],
        "Resource": [f"arn:aws:s3:::{b}{s}" for b in (src, out) for s in ("", "/*")]}]}
    good = _role(iam, f"good-{suffix}", trust, s3_policy)
    ec2 = _role(iam, f"ec2-{suffix}", {**trust, "Principal": {"Service": "ec2.amazonaws.com"}}, s3_policy)
    other_account = _role(iam, f"acct-{suffix}", {**trust, "Condition": {
        "StringEquals": {"aws:SourceAccount": "111122223333"}}}, s3_policy)
    no_put = _role(iam, f"noput-{suffix}", trust, {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],
        "Resource": [f"arn:aws:s3:::{b}{s}" for b in (src, out) for s in ("", "/*")]}]})

    for role in (f"arn:aws:iam::{ACCOUNT}:role/missing-{suffix}", ec2, other_account):
        with pytest.raises(ClientError) as exc_info:
            create(bedrock, src, out, roleArn=role)
        assert error_code(exc_info) == "ValidationException"
        assert "bedrock.amazonaws.com" in exc_info.value.response["Error"]["Message"]

    job = wait(bedrock, create(bedrock, src, out, roleArn=good))
    assert job["status"] == "Completed", job.get("message")
    job = wait(bedrock, create(bedrock, src, out, roleArn=no_put))
    assert job["status"] == "Failed" and "s3:PutObject" in job["message"]


# ------------------------------------------------------------------------------------------------------------
# Unverified behaviours, each an option the emulator plays both ways.


def test_record_id_length_and_alphabet_options(bedrock, s3, buckets, stack):
    src, out = buckets
    keys = [f"2024/img{i:04d}.jpg" for i in range(100)]
    put_images(s3, src, keys)

    def job_with_ids(ids) -> dict:
        for old in s3.list_objects_v2(Bucket=src, Prefix="2024/").get("Contents", []):
            if old["Key"].endswith(".jsonl"):
                s3.delete_object(Bucket=src, Key=old["Key"])
        put_jsonl(s3, src, "2024/batch_input_X.jsonl",
                  [{"recordId": rid, "modelInput": model_input(f"s3://{src}/{key}")} for rid, key in zip(ids, keys)])
        return wait(bedrock, create(bedrock, src, out))

    twelve = [f"A{i:011d}" for i in range(100)]
    thirteen = [f"A{i:012d}" for i in range(100)]
    underscore = [f"IMG_{i:08X}" for i in range(100)]  # the article's form: 12 characters with an underscore
    assert job_with_ids(thirteen)["status"] == "Completed"  # by default no limit
    control(stack.url, "config", {"max_record_id_length": 12})
    failed = job_with_ids(thirteen)
    assert failed["status"] == "Failed" and "longer than 12" in failed["message"]
    assert job_with_ids(twelve)["status"] == "Completed"
    assert job_with_ids(underscore)["status"] == "Completed"
    control(stack.url, "config", {"record_id_alphanumeric": True})
    failed = job_with_ids(underscore)
    assert failed["status"] == "Failed" and "alphanumeric" in failed["message"]
    assert job_with_ids(twelve)["status"] == "Completed"


def test_rewritten_record_ids(bedrock, s3, buckets, stack):
    src, out = buckets
    image_job_input(s3, src, "2024", 100)
    control(stack.url, "config", {"rewrite_record_ids": True})
    job = wait(bedrock, create(bedrock, src, out))
    lines = lines_of(outputs(s3, out, job["jobArn"][-12:])["batch_input_X.jsonl.out"])
    ids = {line["recordId"] for line in lines}
    assert len(ids) == 100 and not ids & {f"IMG{i:04d}" for i in range(100)}


@pytest.mark.parametrize("answer", [None, "ConflictException", "ValidationException"])
def test_repeated_client_request_token_answers(bedrock, s3, buckets, stack, answer):
    src, out = buckets
    control(stack.url, "config", {"repeated_token_answer": answer})
    first = create(bedrock, src, out, jobName="nightly-7", clientRequestToken="token-20261201")
    if answer is None:
        assert create(bedrock, src, out, jobName="nightly-7", clientRequestToken="token-20261201") == first
    else:
        with pytest.raises(ClientError) as exc_info:
            create(bedrock, src, out, jobName="nightly-7", clientRequestToken="token-20261201")
        assert error_code(exc_info) == answer
        named = "nightly-7" if answer == "ConflictException" else "token-20261201"
        assert named in exc_info.value.response["Error"]["Message"]
    assert len(bedrock.list_model_invocation_jobs()["invocationJobSummaries"]) == 1


def test_a_forgotten_client_request_token_starts_a_second_job(bedrock, s3, buckets, stack):
    src, out = buckets
    control(stack.url, "config", {"forget_tokens": True})
    first = create(bedrock, src, out, jobName="nightly-8", clientRequestToken="token-20261202")
    second = create(bedrock, src, out, jobName="nightly-8", clientRequestToken="token-20261202")
    assert second != first
    summaries = bedrock.list_model_invocation_jobs()["invocationJobSummaries"]
    assert sorted(s["jobArn"] for s in summaries) == sorted([first, second])
    with pytest.raises(ClientError) as exc_info:  # another request under a name taken is still refused
        create(bedrock, src, out, jobName="nightly-8", clientRequestToken="token-other")
    assert error_code(exc_info) == "ConflictException"


def test_job_name_left_out_of_get(bedrock, buckets, stack):
    src, out = buckets
    arn = create(bedrock, src, out, jobName="nameless-1")
    assert bedrock.get_model_invocation_job(jobIdentifier=arn)["jobName"] == "nameless-1"
    control(stack.url, "config", {"omit_job_name": True})
    assert "jobName" not in bedrock.get_model_invocation_job(jobIdentifier=arn)
    summaries = bedrock.list_model_invocation_jobs()["invocationJobSummaries"]
    assert [s["jobName"] for s in summaries] == ["nameless-1"]  # required in the summary


def test_output_while_in_progress_and_a_stopped_job_without_output(bedrock, s3, buckets, stack):
    src, out = buckets
    image_job_input(s3, src, "2024", 100)
    control(stack.url, "config", {"hold_after_records": 30, "progress_output_every": 10})
    arn = create(bedrock, src, out)
    job = wait(bedrock, arn, statuses=("InProgress",))
    while job.get("processedRecordCount", 0) < 30:
        job = wait(bedrock, arn, statuses=("InProgress",))
    files = outputs(s3, out, arn[-12:])
    assert set(files) == {"batch_input_X.jsonl.out"}  # no manifest.json.out before the end
    assert len(lines_of(files["batch_input_X.jsonl.out"])) == 30
    assert bedrock.get_model_invocation_job(jobIdentifier=arn)["status"] == "InProgress"  # held
    bedrock.stop_model_invocation_job(jobIdentifier=arn)
    assert wait(bedrock, arn)["status"] == "Stopped"
    assert len(lines_of(outputs(s3, out, arn[-12:])["batch_input_X.jsonl.out"])) == 30

    control(stack.url, "config", {"hold_after_records": 20, "progress_output_every": 0, "stopped_output": "none"})
    arn = create(bedrock, src, out)
    job = wait(bedrock, arn, statuses=("InProgress",))
    while job.get("processedRecordCount", 0) < 20:
        job = wait(bedrock, arn, statuses=("InProgress",))
    bedrock.stop_model_invocation_job(jobIdentifier=arn)
    job = wait(bedrock, arn)
    assert job["status"] == "Stopped" and job["processedRecordCount"] == 20
    assert outputs(s3, out, arn[-12:]) == {}  # nothing written, not even manifest.json.out
