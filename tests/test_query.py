"""05_query_vectors.py against an index loaded as a user loads it (steps 1-3 as processes), and its bad inputs."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest

import common
from tests import sample_images
from tests.conftest import ROOT, STEPS, World, import_step, make_role
from tests.standins.embedding import embed_image, embed_text

EXTENSIONS = ["png", "jpg", "gif", "webp"]
KEYS = [f"img-{i:03d}.{EXTENSIONS[i % 4]}" for i in range(100)] + ["tricky/with space+plus.png", "tricky/中文.jpg"]
DIMENSION = 256
ROW = re.compile(r"^\s*(\d+)\s+(\d+\.\d{4})\s+(s3://\S.*)$")


@pytest.fixture(scope="module")
def loaded(stack, tmp_path_factory) -> World:
    """One index for the module, loaded by steps 1-3 as processes, with buckets of its own (set up as conftest's
    `world` sets up a test's). The tests only read it: step 5 writes nothing, and each test runs it afresh."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(stack.env)
    w = World(stack=stack, cwd=tmp_path_factory.mktemp("query"), env=env, source_bucket="query-source",
              result_bucket="query-result", vector_bucket="query-vectors", vector_index="query-images", role_arn="")
    s3 = w.client("s3")
    s3.create_bucket(Bucket=w.source_bucket)
    s3.create_bucket(Bucket=w.result_bucket)
    w.role_arn = make_role(w.client("iam"), "BedrockBatchRoleQuery", w.source_bucket, w.result_bucket)
    env.update(SOURCE_BUCKET=w.source_bucket, SOURCE_PREFIX="2024/", RESULT_BUCKET=w.result_bucket,
               RESULT_PREFIX="output/", VECTOR_BUCKET=w.vector_bucket, VECTOR_INDEX=w.vector_index,
               ROLE_ARN=w.role_arn, EMBEDDING_DIMENSION=str(DIMENSION), PYTHONIOENCODING="utf-8")
    w.emulator("/_emulator/config", {"step_seconds": 0.02, "fail_keys_regex": None, "drop_keys_regex": None,
                                     "final_status": None})
    w.put_images(KEYS, prefix="2024/")
    for number, args in ((1, ()), (2, ("--wait", "--interval", "0.05", "--timeout", "60")), (3, ())):
        result = w.step(number, *args)
        assert result.returncode == 0, result.stdout + result.stderr
    return w


def uri_of(world: World, key: str) -> str:
    return f"s3://{world.source_bucket}/2024/{key}"


def image_bytes(world: World, key: str) -> bytes:
    return world.client("s3").get_object(Bucket=world.source_bucket, Key=f"2024/{key}")["Body"].read()


def query_json(world: World, *args: str, env: dict | None = None) -> list[dict]:
    result = world.step(5, *args, "--json", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    return json.loads(result.stdout)


def one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def cosine_distance(a: list[float], b: list[float]) -> float:
    dot = math.fsum(x * y for x, y in zip(a, b))
    return 1.0 - dot / math.sqrt(math.fsum(x * x for x in a) * math.fsum(y * y for y in b))


# ---------------------------------------------------------------------------------------------------- searching


def test_an_image_in_s3_finds_itself_first(loaded):
    uri = uri_of(loaded, "img-007.webp")
    result = loaded.step(5, "--image", uri, "--top-k", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Bedrock Batch Inference - Query Vectors" in out
    assert f"Query: image {uri}" in out
    assert f"(GENERIC_RETRIEVAL, {DIMENSION} dimensions)" in out
    assert "✓ 3 hit(s)" in out
    rows = [m.groups() for m in map(ROW.match, out.splitlines()) if m]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    assert rows[0] == ("1", "0.0000", uri)
    assert all(float(r[1]) > 0.5 for r in rows[1:])  # unrelated images are far away


@pytest.mark.parametrize("key, local_name", [("img-012.png", "copy.png"), ("img-013.jpg", "COPY.JPG"),
                                             ("tricky/中文.jpg", "中文 copy.jpeg")])
def test_a_local_copy_of_an_image_finds_it_first(loaded, tmp_path, key, local_name):
    local = tmp_path / local_name
    local.write_bytes(image_bytes(loaded, key))
    hits = query_json(loaded, "--image", str(local), "--top-k", "5")
    assert len(hits) == 5
    assert hits[0]["source_uri"] == uri_of(loaded, key)
    assert hits[0]["key"] == common.vector_key(uri_of(loaded, key))
    assert hits[0]["distance"] == pytest.approx(0.0, abs=1e-5)
    assert hits[1]["distance"] > 0.5


def test_a_text_finds_the_nearest_images_in_order(loaded):
    top_k = 7
    result = loaded.step(5, "a red sports car", "--top-k", str(top_k))
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'Query: text "a red sports car"' in result.stdout
    assert f"(IMAGE_RETRIEVAL, {DIMENSION} dimensions)" in result.stdout
    rows = [m.groups() for m in map(ROW.match, result.stdout.splitlines()) if m]

    hits = query_json(loaded, "a red sports car", "--top-k", str(top_k))
    job_id = loaded.job_info()["jobs"][0]["job_id"]
    assert [h["rank"] for h in hits] == list(range(1, top_k + 1))
    distances = [h["distance"] for h in hits]
    assert distances == sorted(distances)
    for hit in hits:
        assert set(hit) == {"rank", "key", "distance", "source_uri", "metadata"}
        assert hit["metadata"] == {"source_uri": hit["source_uri"], "job_id": job_id}
        assert hit["key"] == common.vector_key(hit["source_uri"])
    assert [(str(h["rank"]), f"{h['distance']:.4f}", h["source_uri"]) for h in hits] == rows

    # The same ranking, worked out here from the images themselves: the query embedded the text at the index's size.
    query = embed_text("a red sports car", DIMENSION)
    expected = sorted((cosine_distance(query, embed_image(image_bytes(loaded, key), DIMENSION)), uri_of(loaded, key))
                      for key in KEYS)[:top_k]
    assert [h["source_uri"] for h in hits] == [uri for _, uri in expected]
    assert distances == pytest.approx([d for d, _ in expected], abs=1e-5)


def test_a_filter_narrows_the_hits_to_exactly_those_images(loaded):
    wanted = [uri_of(loaded, k) for k in ("img-001.jpg", "img-050.gif", "tricky/with space+plus.png")]
    flt = json.dumps({"source_uri": {"$in": wanted}})
    hits = query_json(loaded, "a red sports car", "--filter", flt, "--top-k", "10")
    assert sorted(h["source_uri"] for h in hits) == sorted(wanted)
    distances = [h["distance"] for h in hits]
    assert distances == sorted(distances)

    by_job = query_json(loaded, "--image", wanted[0], "--top-k", "100",
                        "--filter", json.dumps({"job_id": {"$eq": loaded.job_info()["jobs"][0]["job_id"]}}))
    assert len(by_job) == 100 and by_job[0]["source_uri"] == wanted[0]

    nothing = loaded.step(5, "a red sports car", "--filter", '{"source_uri": "s3://elsewhere/x.png"}')
    assert nothing.returncode == 0, nothing.stderr
    assert "No hits match the filter." in nothing.stdout
    assert query_json(loaded, "car", "--filter", '{"source_uri": "s3://elsewhere/x.png"}') == []


def test_presign_adds_a_working_link_to_each_image(loaded):
    secret = "do-not-print-this-secret-0123456789"
    env = {"AWS_SECRET_ACCESS_KEY": secret}
    tricky = uri_of(loaded, "tricky/with space+plus.png")
    flt = json.dumps({"source_uri": {"$in": [tricky, uri_of(loaded, "img-002.gif")]}})
    hits = query_json(loaded, "a red sports car", "--presign", "60", "--filter", flt, env=env)
    assert len(hits) == 2
    for hit in hits:
        url = hit["url"]
        assert url.startswith(("https://", "http://"))
        _, key = common.parse_s3_uri(hit["source_uri"])
        assert urllib.parse.quote(key) in url
        assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url and "X-Amz-Expires=60" in url
        assert secret not in url
        with urllib.request.urlopen(url) as response:  # the link gets the image itself
            assert response.read() == image_bytes(loaded, key[len("2024/"):])

    shown = loaded.step(5, "a red sports car", "--presign", "60", "--top-k", "2", env=env)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count("X-Amz-Signature=") == 2
    assert "Links are valid for 60 s" in shown.stdout
    assert secret not in shown.stdout + shown.stderr


def test_help():
    result = subprocess.run([sys.executable, str(ROOT / STEPS[5]), "--help"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: 05_query_vectors.py")
    for flag in ("--image", "--top-k", "--filter", "--presign", "--json", "--purpose", "--vector-index",
                 "IMAGE_RETRIEVAL", "GENERIC_RETRIEVAL", "$in"):
        assert flag in result.stdout


def test_the_request_bodies():
    step = import_step(5)
    text = step.read_query(step.parse_args(["a red sports car"]))
    assert text.request(1024, None) == {
        "taskType": "SINGLE_EMBEDDING",
        "singleEmbeddingParams": {"embeddingPurpose": "IMAGE_RETRIEVAL", "embeddingDimension": 1024,
                                  "text": {"truncationMode": "END", "value": "a red sports car"}}}
    s3_image = step.read_query(step.parse_args(["--image", "s3://my-bucket/2024/Cat.JPG"]))
    assert s3_image.request(256, "111122223333")["singleEmbeddingParams"] == {
        "embeddingPurpose": "GENERIC_RETRIEVAL", "embeddingDimension": 256,
        "image": {"format": "jpeg", "source": {"s3Location": {"uri": "s3://my-bucket/2024/Cat.JPG",
                                                              "bucketOwner": "111122223333"}}}}
    override = step.read_query(step.parse_args(["cat", "--purpose", "TEXT_RETRIEVAL"]))
    assert override.request(256, None)["singleEmbeddingParams"]["embeddingPurpose"] == "TEXT_RETRIEVAL"


def test_a_local_image_is_sent_inline(tmp_path):
    step = import_step(5)
    (tmp_path / "a.webp").write_bytes(sample_images.webp(3))
    query = step.read_query(step.parse_args(["--image", str(tmp_path / "a.webp")]))
    image = query.request(384, None)["singleEmbeddingParams"]["image"]
    assert image["format"] == "webp"
    assert base64.b64decode(image["source"]["bytes"]) == sample_images.webp(3)


# ---------------------------------------------------------------------------------------------------- bad input


def _files(cwd):
    (cwd / "notes.bmp").write_bytes(b"BM not supported")
    (cwd / "empty.png").write_bytes(b"")
    (cwd / "folder.png").mkdir()
    with open(cwd / "huge.png", "wb") as fh:  # sparse: no disk used
        fh.truncate(common.MAX_IMAGE_BYTES + 1)
    with open(cwd / "big.jpg", "wb") as fh:
        fh.truncate(19_000_000)


BAD_INPUT = [
    ([""], "the text to search for is empty"),
    (["   "], "the text to search for is empty"),
    ([], "give a text to search for, or --image"),
    (["car", "--image", "empty.png"], "not both"),
    (["--image", "missing.png"], "missing.png: no such file"),
    (["--image", "notes.bmp"], "notes.bmp: unsupported image type '.bmp'"),
    (["--image", "s3://my-bucket/2024/photo.tiff"], "unsupported image type '.tiff'"),
    (["--image", "s3://my-bucket/2024/"], "is not an S3 object URI"),
    (["--image", "empty.png"], "empty.png: the file is empty"),
    (["--image", "folder.png"], "folder.png: not a file"),
    (["--image", "huge.png"], "the model takes images up to 50 MB"),
    (["--image", "big.jpg"], "upload it to S3 and pass --image s3://"),
    (["car", "--top-k", "0"], "--top-k must be between 1 and 100, not 0"),
    (["car", "--top-k", "101"], "--top-k must be between 1 and 100, not 101"),
    (["car", "--top-k", "ten"], "argument --top-k: invalid int value: 'ten'"),
    (["car", "--filter", "{source_uri: 1}"], "--filter is not valid JSON"),
    (["car", "--filter", '["s3://b/k.png"]'], "--filter must be a non-empty JSON object"),
    (["car", "--filter", "{}"], "--filter must be a non-empty JSON object"),
    (["car", "--presign", "0"], "--presign must be between 1 and 604800 seconds"),
    (["car", "--presign", "604801"], "--presign must be between 1 and 604800 seconds"),
    (["car", "--purpose", "SEARCH"], "argument --purpose: invalid choice: 'SEARCH'"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=[" ".join(a) or "(none)" for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2_before_any_call(world, args, message):
    # This world has no vector bucket at all: an AWS call made before the input was checked would answer
    # NotFoundException (exit 1) instead of this message.
    _files(world.cwd)
    result = world.step(5, *args)
    assert result.returncode == 2, result.stdout + result.stderr
    line = one_line(result)
    assert line.startswith("error: ") and message in line
    assert "NotFoundException" not in line
    assert result.stdout == ""


def test_missing_settings(world):
    result = world.step(5, "car", env={"VECTOR_BUCKET": "", "VECTOR_INDEX": ""})
    assert result.returncode == 2
    line = one_line(result)
    assert "VECTOR_BUCKET is not set" in line and "VECTOR_INDEX is not set" in line


def test_a_vector_bucket_that_does_not_exist(world):
    result = world.step(5, "car")
    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith("error: NotFoundException:") and world.vector_bucket in line
    assert "check VECTOR_BUCKET and VECTOR_INDEX" in line


def test_an_index_that_does_not_exist(world):
    world.client("s3vectors").create_vector_bucket(vectorBucketName=world.vector_bucket)
    result = world.step(5, "car")
    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith("error: NotFoundException:") and f"Vector index {world.vector_index} not found" in line


def test_an_index_of_another_dimension(world):
    s3v = world.client("s3vectors")
    s3v.create_vector_bucket(vectorBucketName=world.vector_bucket)
    s3v.create_index(vectorBucketName=world.vector_bucket, indexName=world.vector_index, dataType="float32",
                     dimension=384, distanceMetric="cosine")
    result = world.step(5, "car")  # the world's EMBEDDING_DIMENSION is 256
    assert result.returncode == 2
    line = one_line(result)
    assert "holds 384-dimension vectors but EMBEDDING_DIMENSION is 256" in line
    assert "EMBEDDING_DIMENSION=384" in line
    assert world.step(5, "car", "--dimension", "384", "--json").stdout.strip() == "[]"  # empty index: no hits


def test_a_filter_the_index_refuses(loaded):
    result = loaded.step(5, "car", "--filter", '{"source_uri": {"$regex": "^s3://"}}')
    assert result.returncode == 2
    line = one_line(result)
    assert "ValidationException" in line and "check --filter" in line


def test_an_s3_image_that_does_not_exist(loaded):
    result = loaded.step(5, "--image", uri_of(loaded, "no-such-image.png"))
    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith("error: ValidationException:") and "does not exist" in line
