"""A run's on-demand part under throttling and after a settings change: a throttled InvokeModel is tried again
(botocore's retries) and its image loaded; one that stays throttled stops the step instead of writing the image
off as failed; the part is embedded at the run's dimension, whatever EMBEDDING_DIMENSION says on the day step 3
runs. In this process, image by image: a refusal of the image (the model's, or the index's) is that image's failure
with its code and message, a refusal of InvokeModel itself stops the step before the model is asked about another
image; kept embeddings are loaded again without calling the model, and a kept file survives a kill; step 3 prints,
counts and reports the part as it does a job."""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import functools
import io
import json
import os
import threading
import time
import types
import urllib.request
from pathlib import Path

import boto3
import numpy as np
import orjson
import pytest
from botocore.exceptions import ClientError

import common
from batch_embeddings import naming, nova, ondemand, vectors
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
    assert world.index_keys() == {naming.vector_key(u) for u in uris}
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
                          keys=[naming.vector_key(u) for u in uris], returnData=True)["vectors"]
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
    assert confirmed == {naming.vector_key(uris[0]), naming.vector_key(uris[2])}
    assert [(f["source_uri"], f["error_code"]) for f in failed] == [(uris[1], "ValidationException")]


# ---------------------------------------------------------------------------------------------------------------
# Each image's answer, in this process: a model that answers by image, the S3 Vectors stand-in's index of 8
# dimensions, InvokeModel called one image after the other (THREADS = 1) so that "before any image" is exact
# ---------------------------------------------------------------------------------------------------------------

MODEL = "amazon.nova-2-multimodal-embeddings-v1:0"


@dataclasses.dataclass(frozen=True)
class Settings:
    model_id: str = MODEL
    region: str = "us-east-1"
    vector_bucket: str = "bucket"
    vector_index: str = "index"
    embedding_dimension: int = 8


def error(code: str, message: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}}, "InvokeModel")


def embedding_of(uri: str) -> list[float]:
    n = int(uri.rsplit("-", 1)[1].split(".")[0])
    return [float(n + 1)] + [0.25 * i for i in range(1, 8)]


class Model:
    """bedrock-runtime's InvokeModel: the embedding of an image is embedding_of(its URI); `answers` gives, by image
    name, what the next calls about it answer instead (an error to raise, or an embedding)."""

    def __init__(self, answers: dict[str, list] | None = None):
        self.answers = {name: list(queue) for name, queue in (answers or {}).items()}
        self.calls: list[str] = []
        self.models: set[str] = set()

    def invoke_model(self, modelId, body, contentType, accept):
        request = json.loads(body)
        uri = request["singleEmbeddingParams"]["image"]["source"]["s3Location"]["uri"]
        self.calls.append(uri.rsplit("/", 1)[1])
        self.models.add(modelId)
        queue = self.answers.get(uri.rsplit("/", 1)[1])
        answer = queue.pop(0) if queue else embedding_of(uri)
        if isinstance(answer, Exception):
            raise answer
        body = {"embeddings": [{"embeddingType": "IMAGE", "embedding": answer}]}
        return {"body": io.BytesIO(json.dumps(body).encode())}


def images(n: int, dimension: int = 8) -> list[tuple[str, dict]]:
    uris = [f"s3://images/2024/img-{i}.png" for i in range(n)]
    return [(uri, nova.image_request(uri, "png", "111122223333", dimension, "GENERIC_INDEX")) for uri in uris]


def stored(index, uris) -> dict[str, tuple[list[float], dict]]:
    got = index.client.get_vectors(vectorBucketName="bucket", indexName="index",
                                            keys=[naming.vector_key(u) for u in uris], returnData=True,
                                            returnMetadata=True)["vectors"]
    return {v["key"]: (v["data"]["float32"], v["metadata"]) for v in got}


@pytest.fixture(scope="module")
def served_index():
    """One S3 Vectors stand-in for this file's in-process tests (each starts it afresh: see `index`)."""
    from tests.standins import s3vectors, serve

    served = serve(s3vectors.make_app())
    yield served
    served.stop()


@pytest.fixture
def index(served_index):
    """The stand-in emptied, with one 8-dimension index `bucket/index`, and a client without botocore's retries."""
    from botocore.config import Config

    from tests.sending import IndexEndpoint

    for path, options in (("/_standin/reset", {}), ("/_standin/config", {"refuse_keys": None,
                                                                         "deny_put_vectors": False})):
        urllib.request.urlopen(urllib.request.Request(served_index.url + path, data=json.dumps(options).encode(),
                                                      method="POST")).close()
    client = boto3.client("s3vectors", region_name="us-east-1", endpoint_url=served_index.url,
                          aws_access_key_id="testing", aws_secret_access_key="testing",
                          config=Config(retries={"total_max_attempts": 1}))
    client.create_vector_bucket(vectorBucketName="bucket")
    client.create_index(vectorBucketName="bucket", indexName="index", dataType="float32", dimension=8,
                        distanceMetric="cosine")
    return IndexEndpoint(None, served_index.url, client)


def standin_options(index, **options) -> None:
    request = urllib.request.Request(index.url + "/_standin/config", data=json.dumps(options).encode(),
                                     method="POST")
    urllib.request.urlopen(request).close()


@pytest.fixture
def one_at_a_time(monkeypatch):
    monkeypatch.setattr(ondemand, "THREADS", 1)


def load(index, model, requests, **options):
    sleeps: list[float] = []
    confirmed, failed = ondemand.embed_and_load(requests, Settings(), model, index.client, 8,
                                                sleep=sleeps.append, **options)
    return confirmed, failed, sleeps


def test_every_image_is_stored_as_the_model_embedded_it_with_its_uri(index, one_at_a_time):
    requests = images(3)
    ready = []
    model = Model()
    confirmed, failed, sleeps = load(index, model, requests, index_ready=lambda: ready.append(1))
    uris = [uri for uri, _ in requests]
    assert confirmed == {naming.vector_key(u) for u in uris} and failed == [] and sleeps == []
    assert stored(index, uris) == {naming.vector_key(u): (embedding_of(u), {"source_uri": u,
                                                                                    "job_id": "on-demand"})
                                            for u in uris}
    assert model.calls == ["img-0.png", "img-1.png", "img-2.png"] and model.models == {MODEL}
    assert ready  # the index was made ready before anything was sent to it


def test_a_model_timeout_is_tried_after_each_delay_and_then_fails_the_image(index, one_at_a_time):
    timeout = error("ModelTimeoutException", "Model has timed out in processing the request")
    model = Model({"img-0.png": [timeout] * 2, "img-1.png": [timeout] * 4})
    confirmed, failed, sleeps = load(index, model, images(3))
    uris = [uri for uri, _ in images(3)]
    assert sleeps == [1.0, 2.0] + [1.0, 2.0, 4.0]
    assert model.calls.count("img-0.png") == 3 and model.calls.count("img-1.png") == 4
    assert confirmed == {naming.vector_key(uris[0]), naming.vector_key(uris[2])}
    assert failed == [{"source_uri": uris[1], "recordId": naming.vector_key(uris[1]), "status": "failed",
                       "error_code": "ModelTimeoutException",
                       "error_message": "Model has timed out in processing the request"}]


@pytest.mark.parametrize("code", ["ValidationException", "ModelErrorException"])
def test_an_image_the_model_refuses_fails_alone_with_its_code_and_message(index, one_at_a_time, code):
    model = Model({"img-0.png": [error(code, "The provided image is not valid")]})
    confirmed, failed, sleeps = load(index, model, images(2))
    uri0, uri1 = (uri for uri, _ in images(2))
    assert confirmed == {naming.vector_key(uri1)} and sleeps == []
    assert failed == [{"source_uri": uri0, "recordId": naming.vector_key(uri0), "status": "failed",
                       "error_code": code, "error_message": "The provided image is not valid"}]


DENIED = ("User: arn:aws:iam::111122223333:user/u is not authorized to perform: bedrock:InvokeModel on resource: "
          f"arn:aws:bedrock:us-east-1::foundation-model/{MODEL}")


def test_invoke_model_refused_before_any_answer_stops_the_step_and_asks_the_model_no_more(index,
                                                                                          one_at_a_time):
    model = Model({"img-0.png": [error("AccessDeniedException", DENIED)]})
    with pytest.raises(common.StepError) as caught:
        load(index, model, images(4))
    assert str(caught.value) == (
        f"AccessDeniedException: {DENIED} — InvokeModel on {MODEL} was refused before any image was embedded: the "
        "caller needs bedrock:InvokeModel on the model (iam/caller-policy.json) and access to it in us-east-1")
    assert caught.value.exit_code == common.EXIT_ERROR
    assert model.calls == ["img-0.png"]
    assert stored(index, [uri for uri, _ in images(4)]) == {}


@pytest.mark.parametrize(("first", "message"), [
    (None, DENIED),  # another image was embedded first: the caller may call the model
    (error("ValidationException", "The provided image is not valid"), DENIED),  # the model answered about one
    (error("AccessDeniedException", "Unable to access s3://images/2024/img-0.png"), DENIED),
    (None, "Access denied to s3://images/2024/img-1.png"),
])
def test_an_access_denied_about_the_image_is_that_images_failure(index, one_at_a_time, first, message):
    answers = {"img-1.png": [error("AccessDeniedException", message)]}
    if first is not None:
        answers["img-0.png"] = [first]
    if "s3://" in str(first):  # the first refusal names S3: about that image, and says nothing of the caller
        answers["img-1.png"] = [error("AccessDeniedException", "Access denied to s3://images/2024/img-1.png")]
    confirmed, failed, _ = load(index, Model(answers), images(3))
    uris = [uri for uri, _ in images(3)]
    assert naming.vector_key(uris[2]) in confirmed
    assert [f["source_uri"] for f in failed] == ([uris[0]] if first is not None else []) + [uris[1]]
    assert failed[-1]["error_code"] == "AccessDeniedException"


@pytest.mark.parametrize(("answer", "message"), [
    ([0.0] * 8, "embedding is all zeros, which a cosine index refuses"),
    ([1.0] * 7, "embedding has 7 values, the index takes 8"),
])
def test_an_embedding_the_index_would_refuse_fails_its_image(index, one_at_a_time, tmp_path, answer,
                                                            message):
    kept = tmp_path / "kept.jsonl"
    confirmed, failed, _ = load(index, Model({"img-0.png": [answer]}), images(2), kept=kept)
    uri0, uri1 = (uri for uri, _ in images(2))
    assert confirmed == {naming.vector_key(uri1)}
    assert failed == [{"source_uri": uri0, "recordId": naming.vector_key(uri0), "status": "failed",
                       "error_code": "InvalidEmbedding", "error_message": message}]
    assert [json.loads(line)["source_uri"] for line in kept.read_bytes().splitlines()] == [uri1]  # not kept


def test_a_vector_the_index_refuses_fails_its_image(index, one_at_a_time):
    uris = [uri for uri, _ in images(3)]
    standin_options(index, refuse_keys=[naming.vector_key(uris[1])])
    confirmed, failed, _ = load(index, Model(), images(3))
    assert confirmed == {naming.vector_key(uris[0]), naming.vector_key(uris[2])}
    (entry,) = failed
    assert (entry["source_uri"], entry["status"], entry["error_code"]) == (uris[1], "failed", "ValidationException")
    assert entry["error_message"].startswith("S3 Vectors refused the vector: ")
    assert naming.vector_key(uris[1]) in entry["error_message"]


# ---------------------------------------------------------------------------------------------------------------
# Kept embeddings: what was paid for is loaded again without calling the model
# ---------------------------------------------------------------------------------------------------------------


def test_kept_embeddings_are_loaded_again_without_calling_the_model(index, one_at_a_time, tmp_path,
                                                                   capsys):
    kept = tmp_path / "runs" / "run-1" / ondemand.KEPT_NAME
    requests = images(3)
    standin_options(index, deny_put_vectors=True)
    with pytest.raises(common.StepError, match="needs s3vectors:PutVectors"):
        load(index, Model(), requests, kept=kept)
    standin_options(index, deny_put_vectors=False)
    assert len(kept.read_bytes().splitlines()) == 3
    capsys.readouterr()

    model = Model()
    confirmed, failed, _ = load(index, model, images(4), kept=kept)
    uris = [uri for uri, _ in images(4)]
    assert model.calls == ["img-3.png"]  # only the image never embedded
    assert confirmed == {naming.vector_key(u) for u in uris} and failed == []
    assert capsys.readouterr().out == (f"3 of the 4 image(s) were embedded by an earlier try and kept in {kept}: "
                                       "loaded from there, without calling the model again\n")
    assert {k: v for k, (v, _) in stored(index, uris).items()} == \
        {naming.vector_key(u): embedding_of(u) for u in uris}
    assert len(kept.read_bytes().splitlines()) == 4  # kept until the run's folder goes (04)


def test_a_retry_forgets_the_images_it_loaded_and_keeps_the_others(index, one_at_a_time, tmp_path):
    kept = tmp_path / ondemand.RETRY_KEPT_NAME
    other = ondemand.Kept(kept, 8)
    other.add("k-other", "s3://images/2023/other.png", "d", [1.0] * 8)  # an image of another retry, not loaded
    other.close()
    confirmed, failed, _ = load(index, Model(), images(2), kept=kept, forget_done=True)
    assert len(confirmed) == 2 and failed == []
    assert [json.loads(line)["key"] for line in kept.read_bytes().splitlines()] == ["k-other"]
    ondemand.embed_and_load([], Settings(), Model(), index.client, 8, kept=kept, forget_done=True)
    assert kept.exists()  # its image was not in this retry
    ondemand.Kept(kept, 8).forget({"k-other"})
    assert not kept.exists()


def test_a_kept_embedding_the_index_would_refuse_fails_its_image_without_calling_the_model(index,
                                                                                           one_at_a_time, tmp_path):
    kept = tmp_path / ondemand.KEPT_NAME
    (uri, body), = images(1)
    zeros = ondemand.Kept(kept, 8)
    zeros.add(naming.vector_key(uri), uri, ondemand.request_digest(MODEL, body), [0.0] * 8)
    zeros.close()
    model = Model()
    confirmed, failed, _ = load(index, model, [(uri, body)], kept=kept)
    assert model.calls == [] and confirmed == set()
    assert failed == [{"source_uri": uri, "recordId": naming.vector_key(uri), "status": "failed",
                       "error_code": "InvalidEmbedding",
                       "error_message": "embedding is all zeros, which a cosine index refuses"}]


def kept_line(key: str, values, digest: str = "d", **extra) -> bytes:
    entry = {"key": key, "source_uri": f"s3://images/{key}.png", "request": digest,
             "float32": base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode(), **extra}
    return orjson.dumps(entry) + b"\n"


def test_a_kept_file_reads_its_whole_lines_and_drops_the_end_a_kill_cut(tmp_path):
    path = tmp_path / "kept.jsonl"
    whole = [kept_line("a", [1.0] * 4), kept_line("b", [2.0] * 4)]
    damaged = [b"not json\n", kept_line("c", [1.0] * 3),  # another dimension
               orjson.dumps({"key": "d", "request": "d", "float32": "@@@"}) + b"\n",  # not base64
               orjson.dumps({"key": 5, "request": "d", "float32": kept_line("x", [1.0] * 4)[-20:].decode()}) + b"\n",
               orjson.dumps({"key": "e", "float32": ""}) + b"\n", b"[1, 2]\n"]
    path.write_bytes(whole[0] + b"".join(damaged) + whole[1] + kept_line("f", [3.0] * 4)[:30])
    kept = ondemand.Kept(path, 4)
    assert sorted(kept.found) == ["a", "b"]
    assert kept.get("a", "d").tolist() == [1.0] * 4 and kept.get("b", "d").dtype == np.dtype("<f4")
    assert kept.get("a", "another request") is None and kept.get("f", "d") is None
    assert path.read_bytes() == whole[0] + b"".join(damaged) + whole[1]  # the cut end is gone
    kept.add("f", "s3://images/f.png", "d", [3.0] * 4)
    kept.close()
    assert path.read_bytes().splitlines(keepends=True)[-1] == kept_line("f", [3.0] * 4)  # one whole line
    assert sorted(ondemand.Kept(path, 4).found) == ["a", "b", "f"]


def test_forgetting_some_images_rewrites_the_file_with_the_others(tmp_path):
    path = tmp_path / "deep" / "kept.jsonl"
    kept = ondemand.Kept(path, 4)
    assert kept.found == {} and not path.exists()
    for key in "abc":
        kept.add(key, f"s3://images/{key}.png", "d", [1.0] * 4)
    before = path.read_bytes()
    kept.forget({"x"})  # none of its images: left as it is
    assert path.read_bytes() == before
    kept.forget({"b"})
    assert [json.loads(line)["key"] for line in path.read_bytes().splitlines()] == ["a", "c"]
    assert sorted(ondemand.Kept(path, 4).found) == ["a", "c"]
    kept.forget({"a", "c"})
    assert not path.exists()


# ---------------------------------------------------------------------------------------------------------------
# Step 3's load of a run's on-demand part
# ---------------------------------------------------------------------------------------------------------------


def part(tmp_path, n: int, dimension: int = 8, model_id: str | None = MODEL) -> dict:
    manifest = tmp_path / "batch_input_part.jsonl"
    manifest.write_bytes(b"".join(orjson.dumps({"recordId": naming.record_id(uri), "modelInput": body}) + b"\n"
                                  for uri, body in images(n, dimension)))
    job = {"job_name": "nova-mme-embedding-20261201-100000-od", "on_demand": True,
           "manifests": [{"local_path": str(manifest)}], "embedding_dimension": dimension}
    if model_id:
        job["model_id"] = model_id
    return job


def load_part(index, tmp_path, job, model, config=Settings()) -> tuple[dict, Path]:
    report = tmp_path / "load_report_od.jsonl"
    counts = ondemand.load_part(job, config, model, index.client, report, tmp_path / ondemand.KEPT_NAME,
                                lambda: None, sleep=lambda s: None)
    return counts, report


def test_step_3_embeds_the_part_counts_it_and_lists_its_failures(index, one_at_a_time, tmp_path,
                                                                capsys):
    job = part(tmp_path, 4)
    uris = [uri for uri, _ in images(4)]
    index.client.put_vectors(vectorBucketName="bucket", indexName="index", vectors=[
        {"key": naming.vector_key(uris[0]), "data": {"float32": [1.0] * 8}}])  # loaded by an earlier step 3
    model = Model({"img-2.png": [error("ValidationException", "The provided image is not valid")]})
    report = tmp_path / "load_report_od.jsonl"
    report.write_text("a report of an earlier --reload\n")
    counts, report = load_part(index, tmp_path, job, model, Settings(model_id="another-model"))
    assert model.calls == ["img-1.png", "img-2.png", "img-3.png"] and model.models == {MODEL}  # the run's model
    assert capsys.readouterr().out == (
        "1 image(s) of nova-mme-embedding-20261201-100000-od are in the index already (embedded by an earlier "
        "step 3): not embedded again\n"
        f"Embedding 3 image(s) on demand with {MODEL} (nova-mme-embedding-20261201-100000-od)\n"
        "✓ Embedded and loaded 2 image(s) on demand into index; 1 failed\n")
    keys = {naming.vector_key(u) for u in uris}
    assert counts == {"total": 4, "success": 3, "error": 1, "inserted": 2,
                      "confirmed_keys": keys - {naming.vector_key(uris[2])}}
    assert job["load"] == {"finished": True, "counts": {"total": 4, "success": 3, "error": 1, "inserted": 2}}
    assert [json.loads(line) for line in report.read_text().splitlines()] == [
        {"source_uri": uris[2], "recordId": naming.vector_key(uris[2]), "status": "failed",
         "error_code": "ValidationException", "error_message": "The provided image is not valid"}]


def test_a_part_that_loads_whole_leaves_no_report(index, one_at_a_time, tmp_path, capsys):
    job = part(tmp_path, 2, model_id=None)
    report = tmp_path / "load_report_od.jsonl"
    report.write_text("a report of an earlier --reload\n")
    model = Model()
    counts, report = load_part(index, tmp_path, job, model)
    assert not report.exists()
    assert counts["total"] == counts["success"] == counts["inserted"] == 2 and counts["error"] == 0
    assert model.models == {MODEL}  # a part planned before parts named their model: the configured one
    assert capsys.readouterr().out == (f"Embedding 2 image(s) on demand with {MODEL} "
                                       "(nova-mme-embedding-20261201-100000-od)\n"
                                       "✓ Embedded and loaded 2 image(s) on demand into index\n")


def test_a_part_whose_manifest_is_gone_says_to_run_01_again(index, tmp_path):
    job = part(tmp_path, 2)
    Path(job["manifests"][0]["local_path"]).unlink()
    with pytest.raises(common.StepError) as caught:
        load_part(index, tmp_path, job, Model())
    assert str(caught.value) == (f"manifest {job['manifests'][0]['local_path']} of {job['job_name']} is gone: its "
                                 "images cannot be embedded — run 01_create_job.py again (they are not in the index)")


def test_the_kept_files_are_named_where_steps_3_and_4_look_for_them(tmp_path):
    assert ondemand.kept_file(str(tmp_path)) == tmp_path / "embedded_on_demand.jsonl"
    assert ondemand.retry_kept_file(str(tmp_path)) == tmp_path / "embedded_on_demand_retry.jsonl"
    assert ondemand.is_part({"on_demand": True}) and not ondemand.is_part({"job_arn": "arn"})


# ---------------------------------------------------------------------------------------------------------------
# More of what a user (or the kept file) could tell apart
# ---------------------------------------------------------------------------------------------------------------


def test_a_refusal_without_a_message_is_listed_with_an_empty_one(index, one_at_a_time):
    refusal = ClientError({"Error": {"Code": "ValidationException"}}, "InvokeModel")
    confirmed, failed, _ = load(index, Model({"img-0.png": [refusal]}), images(2))
    assert failed == [{"source_uri": images(1)[0][0], "recordId": naming.vector_key(images(1)[0][0]),
                       "status": "failed", "error_code": "ValidationException", "error_message": ""}]
    denied = ClientError({"Error": {"Code": "AccessDeniedException"}}, "InvokeModel")
    with pytest.raises(common.StepError, match="^AccessDeniedException:  — InvokeModel on "):
        load(index, Model({"img-0.png": [denied]}), images(2))


def test_an_image_the_model_may_not_read_does_not_vouch_for_the_caller(index, one_at_a_time):
    """A refusal that names the image's S3 object is the image's failure; the model has still answered no call, so
    a refusal after it that names no S3 object is the caller's: it stops the step."""
    model = Model({"img-0.png": [error("AccessDeniedException", "Unable to access s3://images/2024/img-0.png")],
                   "img-1.png": [error("AccessDeniedException", DENIED)]})
    with pytest.raises(common.StepError, match="was refused before any image was embedded"):
        load(index, model, images(3))
    assert model.calls == ["img-0.png", "img-1.png"]


def test_no_more_calls_are_in_flight_than_threads(index, monkeypatch):
    monkeypatch.setattr(ondemand, "THREADS", 2)
    lock, state = threading.Lock(), {"now": 0, "most": 0}

    class Slow(Model):
        def invoke_model(self, **kwargs):
            with lock:
                state["now"] += 1
                state["most"] = max(state["most"], state["now"])
            time.sleep(0.02)
            with lock:
                state["now"] -= 1
            return super().invoke_model(**kwargs)

    confirmed, failed, _ = load(index, Slow(), images(8))
    assert len(confirmed) == 8 and failed == [] and state["most"] <= 2


def test_vectors_go_to_the_index_in_as_many_requests_as_they_take(index, one_at_a_time, monkeypatch):
    monkeypatch.setattr(ondemand.vectors, "Batcher", functools.partial(vectors.Batcher, max_vectors=2))
    requests = images(5)
    confirmed, failed, _ = load(index, Model(), requests)
    uris = [uri for uri, _ in requests]
    assert confirmed == {naming.vector_key(u) for u in uris} and failed == []
    assert len(stored(index, uris)) == 5


class StopsBeforeCancelling(concurrent.futures.ThreadPoolExecutor):
    """The step's pool, whose shutdown lets the call in flight end only once the images not yet started are
    cancelled (or not): what is paid for after a stop does not depend on timing."""

    in_flight_may_end = threading.Event()

    def shutdown(self, wait=True, *, cancel_futures=False):
        super().shutdown(wait=False, cancel_futures=cancel_futures)
        self.in_flight_may_end.set()
        super().shutdown(wait=wait)


def test_a_step_stopped_by_the_index_asks_the_model_about_no_image_not_yet_started(index, one_at_a_time,
                                                                                    monkeypatch):
    monkeypatch.setattr(ondemand, "ThreadPoolExecutor", StopsBeforeCancelling)
    StopsBeforeCancelling.in_flight_may_end.clear()

    class Waits(Model):
        def invoke_model(self, **kwargs):
            if self.calls:  # the call in flight when the step stops
                StopsBeforeCancelling.in_flight_may_end.wait(timeout=10)
            return super().invoke_model(**kwargs)

    def index_missing():
        raise common.StepError("vector index index does not exist", common.EXIT_REFUSED)

    model = Waits()
    with pytest.raises(common.StepError, match="does not exist"):
        load(index, model, images(6), index_ready=index_missing)
    assert model.calls in (["img-0.png"], ["img-0.png", "img-1.png"])  # and the one in flight: none after it


def test_kept_embeddings_are_loaded_with_their_images_metadata(index, one_at_a_time, tmp_path):
    kept = tmp_path / ondemand.KEPT_NAME
    requests = images(2)
    earlier = ondemand.Kept(kept, 8)
    for uri, body in requests:
        earlier.add(naming.vector_key(uri), uri, ondemand.request_digest(MODEL, body), embedding_of(uri))
    earlier.close()
    model = Model()
    confirmed, failed, _ = load(index, model, requests, kept=kept)
    assert model.calls == [] and len(confirmed) == 2
    assert stored(index, [u for u, _ in requests]) == {
        naming.vector_key(u): (embedding_of(u), {"source_uri": u, "job_id": "on-demand"}) for u, _ in requests}


def test_a_retry_whose_images_all_failed_keeps_nothing(index, one_at_a_time, tmp_path):
    kept = tmp_path / ondemand.RETRY_KEPT_NAME
    refused = error("ValidationException", "The provided image is not valid")
    confirmed, failed, _ = load(index, Model({"img-0.png": [refused]}), images(1), kept=kept, forget_done=True)
    assert confirmed == set() and len(failed) == 1 and not kept.exists()


def test_a_damaged_character_in_a_kept_line_drops_the_line(tmp_path):
    path = tmp_path / "kept.jsonl"
    good = kept_line("a", [1.0] * 4)
    entry = orjson.loads(kept_line("b", [2.0] * 4))
    entry["float32"] = entry["float32"][:8] + "!" + entry["float32"][8:]  # not base64: its values cannot be trusted
    path.write_bytes(good + orjson.dumps(entry) + b"\n")
    assert sorted(ondemand.Kept(path, 4).found) == ["a"]


def test_the_same_request_written_in_another_order_is_the_same_request():
    body = {"taskType": "SINGLE_EMBEDDING", "singleEmbeddingParams": {"embeddingDimension": 8, "image": "x"}}
    reordered = {"singleEmbeddingParams": {"image": "x", "embeddingDimension": 8}, "taskType": "SINGLE_EMBEDDING"}
    assert ondemand.request_digest(MODEL, body) == ondemand.request_digest(MODEL, reordered)


def test_step_3_keeps_what_it_paid_for_and_readies_the_index_first(index, one_at_a_time, tmp_path):
    job = part(tmp_path, 3)
    job.pop("embedding_dimension")  # planned before parts recorded their dimension: the configured one
    events = []
    index.client.meta.events.register("before-call.s3vectors.PutVectors", lambda **_: events.append("put"))
    refused = error("ValidationException", "The provided image is not valid")
    model = Model({"img-0.png": [refused], "img-2.png": [error("ModelErrorException", "Model error")]})
    report = tmp_path / "load_report_od.jsonl"
    counts = ondemand.load_part(job, Settings(), model, index.client, report, tmp_path / ondemand.KEPT_NAME,
                                lambda: events.append("ready"), sleep=lambda s: None)
    assert events[0] == "ready" and "put" in events
    assert counts["inserted"] == 1 and counts["error"] == 2
    assert [json.loads(line)["error_code"] for line in report.read_bytes().splitlines()] == [
        "ValidationException", "ModelErrorException"]  # one JSON line a failure
    assert [json.loads(line)["source_uri"] for line in (tmp_path / ondemand.KEPT_NAME).read_bytes().splitlines()] \
        == [images(2)[1][0]]  # what the model embedded is kept for a step 3 that must run again
