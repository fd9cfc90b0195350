"""Bedrock API keys: with AWS_BEARER_TOKEN_BEDROCK set, every step signs its Bedrock and Bedrock Runtime calls with
the key (`Authorization: Bearer ...`), and with SigV4 when it is not set. The whole flow runs against the stand-ins
with the Bedrock emulator on HTTPS (botocore sends a bearer token only to https endpoints), trusted through
AWS_CA_BUNDLE; S3 and S3 Vectors (plain http here) keep using the ordinary credentials."""

from __future__ import annotations

import json
import os
import urllib.request

import pytest

from batch_embeddings import naming
from tests.conftest import World, make_role
from tests.standins import stack as standins

API_KEY = "ABSKQmVkcm9ja0FQSUtleS10ZXN0LWF0LTEyMzQ1Njc4OTAxMjpzZWNyZXQ="  # made up; the stand-in does not check it
IMAGES = [f"img-{i:03d}.png" for i in range(100)]  # Bedrock's minimum for a job
ON_BEDROCK = {"CreateModelInvocationJob", "GetModelInvocationJob", "InvokeModel"}


@pytest.fixture(scope="module")
def tls_stack():
    running = standins.start(bedrock_options={"step_seconds": 0.02}, tls=True)
    yield running
    running.stop()


def emulator(stack: standins.Stack, path: str, payload: dict | None = None):
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(stack.bedrock_url + path, data=data, method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, context=stack.certificates.client_context()) as response:
        return json.loads(response.read() or b"null")


@pytest.mark.parametrize("with_key", [True, False], ids=["api-key", "sigv4"])
def test_the_whole_flow_with_and_without_an_api_key(tls_stack, tmp_path, with_key):
    assert tls_stack.bedrock_url.startswith("https://")
    name = "key" if with_key else "sig"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(tls_stack.env)
    w = World(stack=tls_stack, cwd=tmp_path, env=env, source_bucket=f"apikey-source-{name}",
              result_bucket=f"apikey-result-{name}", vector_bucket=f"apikey-vectors-{name}", vector_index="images",
              role_arn="")
    s3 = w.client("s3")
    s3.create_bucket(Bucket=w.source_bucket)
    s3.create_bucket(Bucket=w.result_bucket)
    w.role_arn = make_role(w.client("iam"), f"BedrockBatchRoleApiKey{name}", w.source_bucket, w.result_bucket)
    env.update(SOURCE_BUCKET=w.source_bucket, SOURCE_PREFIX="2024/", RESULT_BUCKET=w.result_bucket,
               VECTOR_BUCKET=w.vector_bucket, VECTOR_INDEX=w.vector_index, ROLE_ARN=w.role_arn,
               EMBEDDING_DIMENSION="256", PYTHONIOENCODING="utf-8")
    if with_key:
        env["AWS_BEARER_TOKEN_BEDROCK"] = API_KEY
    emulator(tls_stack, "/_emulator/reset", {})
    uris = w.put_images(IMAGES, prefix="2024/")

    for number, args in ((1, ()), (2, ("--wait", "--interval", "0.05", "--timeout", "60")), (3, ()),
                         (5, ("--image", uris[7], "--top-k", "3", "--json"))):
        result = w.step(number, *args)
        assert result.returncode == 0, f"step {number}: {result.stdout}{result.stderr}"
    assert json.loads(result.stdout)[0]["source_uri"] == uris[7]
    assert w.index_keys() == {naming.vector_key(u) for u in uris}

    calls = emulator(tls_stack, "/_emulator/auth")["calls"]
    assert ON_BEDROCK <= {c["operation"] for c in calls}  # each of them was called
    assert all(c["https"] for c in calls)
    if with_key:
        assert {(c["scheme"], c["credential"]) for c in calls} == {("Bearer", API_KEY)}
    else:
        assert {(c["scheme"], c["credential"]) for c in calls} == {("AWS4-HMAC-SHA256", "testing")}


def test_a_key_is_never_sent_over_plain_http(world):
    # The session's stand-ins serve Bedrock over http: botocore refuses to send the key there, and the step says so
    # in one line (exit 1) rather than sending it in the clear.
    result = world.step(5, "car", env={"AWS_BEARER_TOKEN_BEDROCK": API_KEY, "VECTOR_BUCKET": "", "VECTOR_INDEX": ""})
    assert result.returncode == 2  # settings first: nothing sent
    world.client("s3vectors").create_vector_bucket(vectorBucketName=world.vector_bucket)
    world.client("s3vectors").create_index(vectorBucketName=world.vector_bucket, indexName=world.vector_index,
                                           dataType="float32", dimension=256, distanceMetric="cosine")
    result = world.step(5, "car", env={"AWS_BEARER_TOKEN_BEDROCK": API_KEY})
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Bearer authorization requires an HTTPS endpoint" in lines[0]
    assert API_KEY not in result.stdout + result.stderr
    assert world.emulator("/_emulator/auth")["calls"] == []
