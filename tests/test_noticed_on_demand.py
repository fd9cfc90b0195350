"""A run's on-demand part under throttling and after a settings change: a throttled InvokeModel is tried again
(botocore's retries) and its image loaded; one that stays throttled stops the step instead of writing the image
off as failed; the part is embedded at the run's dimension, whatever EMBEDDING_DIMENSION says on the day step 3
runs."""

from __future__ import annotations

import io
import json
import os
import types

import pytest
from botocore.exceptions import ClientError

import common
from batch_embeddings import ondemand
from tests.conftest import import_step


def step3_in_process(world, monkeypatch, env: dict | None = None, *args: str) -> int:
    """Step 3 run in this process, with the world's settings (and `env` over them)."""
    step3 = import_step(3)
    with monkeypatch.context() as patch:
        for name in [k for k in os.environ if k.startswith("AWS_")]:
            patch.delenv(name)
        for name, value in {**world.env, **(env or {})}.items():
            patch.setenv(name, value)
        patch.chdir(world.cwd)
        return step3.main(list(args))


def invoked(world) -> int:
    return len([c for c in world.emulator("/_emulator/auth")["calls"] if c["operation"] == "InvokeModel"])


def test_a_throttled_invoke_model_is_tried_again_and_the_image_loaded(world, monkeypatch, capsys):
    uris = world.put_images([f"day2/img-{i:02d}.png" for i in range(12)], prefix="2024/")
    assert world.step(1).returncode == 0
    world.emulator("/_emulator/config", {"throttle_invoke": 2})
    before = invoked(world)
    code = step3_in_process(world, monkeypatch)
    out = capsys.readouterr().out
    assert code == common.EXIT_OK, out
    assert "Images loaded: 12, failed: 0, missing: 0" in out
    assert world.index_keys() == {common.vector_key(u) for u in uris}
    assert invoked(world) - before >= 12  # every image embedded (the throttled calls may not be counted)


def test_the_part_is_embedded_at_the_runs_dimension(world, monkeypatch, capsys):
    uris = world.put_images([f"day2/img-{i:02d}.png" for i in range(12)], prefix="2024/")
    assert world.step(1).returncode == 0  # EMBEDDING_DIMENSION=256 when the run was planned
    assert world.job_info()["jobs"][0]["embedding_dimension"] == 256
    code = step3_in_process(world, monkeypatch, {"EMBEDDING_DIMENSION": "1024"})  # changed since
    out = capsys.readouterr().out
    assert code == common.EXIT_OK, out
    assert "Images loaded: 12, failed: 0, missing: 0" in out
    s3v = world.client("s3vectors")
    assert s3v.get_index(vectorBucketName=world.vector_bucket, indexName=world.vector_index)["index"]["dimension"] == 256
    got = s3v.get_vectors(vectorBucketName=world.vector_bucket, indexName=world.vector_index,
                          keys=[common.vector_key(u) for u in uris], returnData=True)["vectors"]
    assert len(got) == 12 and {len(v["data"]["float32"]) for v in got} == {256}


class Runtime:
    """bedrock-runtime whose InvokeModel answers a unit vector, except for images it throttles every time (as an
    account's quota does once botocore's retries are spent)."""

    def __init__(self, throttled: str, dimension: int = 8):
        self.throttled, self.dimension, self.calls = throttled, dimension, 0

    def invoke_model(self, modelId, body, **_):
        self.calls += 1
        if self.throttled in body.decode():
            raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "Too many requests"}},
                              "InvokeModel")
        answer = {"embeddings": [{"embeddingType": "IMAGE", "embedding": [1.0] + [0.0] * (self.dimension - 1)}]}
        return {"body": io.BytesIO(json.dumps(answer).encode())}


def test_throttling_that_outlasts_the_retries_stops_the_step_and_fails_no_image(index_endpoint):
    config = types.SimpleNamespace(model_id="amazon.nova-2-multimodal-embeddings-v1:0", region="us-east-1",
                                   vector_bucket="bucket", vector_index="index")
    uris = [f"s3://images/img-{i}.png" for i in range(3)]
    requests = [(uri, {"image": uri}) for uri in uris]
    sleeps = []
    with pytest.raises(ClientError) as caught:
        ondemand.embed_and_load(requests, config, Runtime(throttled="img-1"), index_endpoint.client, 8,
                                sleep=sleeps.append)
    assert common.error_code(caught.value) == "ThrottlingException"  # step 3's one line: run it again later
    assert sleeps == []  # not taken for a model timeout either


def test_an_image_the_model_refuses_fails_alone(index_endpoint):
    """The counterpart: a refusal of the image itself is that image's failure, the others are loaded."""

    class Refusing(Runtime):
        def invoke_model(self, modelId, body, **kwargs):
            if "img-1" in body.decode():
                raise ClientError({"Error": {"Code": "ValidationException", "Message": "Unsupported image"}},
                                  "InvokeModel")
            return super().invoke_model(modelId, body, **kwargs)

    config = types.SimpleNamespace(model_id="m", region="us-east-1", vector_bucket="bucket", vector_index="index")
    uris = [f"s3://images/img-{i}.png" for i in range(3)]
    confirmed, failed = ondemand.embed_and_load([(uri, {"image": uri}) for uri in uris], config,
                                                Refusing(throttled="never"), index_endpoint.client, 8)
    assert confirmed == {common.vector_key(uris[0]), common.vector_key(uris[2])}
    assert [(f["source_uri"], f["error_code"]) for f in failed] == [(uris[1], "ValidationException")]
