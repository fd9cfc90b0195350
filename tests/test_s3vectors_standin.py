"""Tests of the S3 Vectors stand-in (tests/standins/s3vectors.py), through boto3 as the project's loader uses it.

Throughput of the stand-in itself (quota disabled, one stream of 500-vector PutVectors of 3072 dims, bodies
pre-serialised with 8-decimal floats, about 17 MB each, the stand-in in its own process):

    uv run python tests/test_s3vectors_standin.py [--requests 20] [--streams 1]
"""

from __future__ import annotations

import http.client
import math
import random
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

if __name__ == "__main__":  # run as a script: make `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import boto3  # noqa: E402
import orjson  # noqa: E402
import pytest  # noqa: E402
from botocore.config import Config  # noqa: E402
from botocore.exceptions import ClientError  # noqa: E402

from tests.standins import serve  # noqa: E402
from tests.standins.s3vectors import make_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUCKET, INDEX = "vb-test", "idx-test"
NO_QUOTA = {"vectors_per_second": 0, "requests_per_second": 0}


@pytest.fixture(autouse=True)
def _dummy_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3VECTORS"):
        monkeypatch.delenv(name, raising=False)


class Standin:
    def __init__(self, **options):
        self.app = make_app(options=options)
        self.served = serve(self.app)
        self.url = self.served.url
        # no retries: the tests look at every 429/503 the stand-in sends
        self.client = boto3.client("s3vectors", endpoint_url=self.url, region_name="us-east-1",
                                   config=Config(retries={"mode": "standard", "total_max_attempts": 1}))

    def control(self, method: str, what: str, body: dict | None = None):
        return raw_call(self.url, f"/_standin/{what}", body, method=method)

    def index(self, dimension=4, metric="cosine", non_filterable=None, name=INDEX, bucket=BUCKET) -> str:
        try:
            self.client.create_vector_bucket(vectorBucketName=bucket)
        except ClientError as e:
            assert e.response["Error"]["Code"] == "ConflictException"
        kwargs = {}
        if non_filterable is not None:
            kwargs["metadataConfiguration"] = {"nonFilterableMetadataKeys": non_filterable}
        return self.client.create_index(vectorBucketName=bucket, indexName=name, dataType="float32",
                                        dimension=dimension, distanceMetric=metric, **kwargs)["indexArn"]


@pytest.fixture
def standin_factory():
    started: list[Standin] = []

    def start(**options) -> Standin:
        s = Standin(**options)
        started.append(s)
        return s

    yield start
    for s in started:
        s.served.stop()


@pytest.fixture
def standin(standin_factory) -> Standin:
    return standin_factory(**NO_QUOTA)


def raw_call(url: str, path: str, body: dict | bytes | None = None, method: str = "POST"):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    data = body if isinstance(body, bytes) or body is None else orjson.dumps(body)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), (orjson.loads(payload) if payload else None)


def error_code(excinfo) -> str:
    return excinfo.value.response["Error"]["Code"]


def status(excinfo) -> int:
    return excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"]


def f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def vec(key: str, data, **metadata) -> dict:
    v = {"key": key, "data": {"float32": list(data)}}
    if metadata:
        v["metadata"] = metadata
    return v


def all_keys(client, arn, **kwargs) -> list[str]:
    keys = []
    for page in client.get_paginator("list_vectors").paginate(indexArn=arn, **kwargs):
        keys += [v["key"] for v in page["vectors"]]
    return keys


# --------------------------------------------------------------------------------------- buckets / indexes


def test_buckets_indexes_conflicts_and_addressing(standin):
    c = standin.client
    arn = standin.index(dimension=8, metric="euclidean", non_filterable=["text"])
    assert arn == f"arn:aws:s3vectors:us-east-1:123456789012:bucket/{BUCKET}/index/{INDEX}"

    with pytest.raises(ClientError) as e:
        c.create_vector_bucket(vectorBucketName=BUCKET)
    assert (error_code(e), status(e)) == ("ConflictException", 409)
    with pytest.raises(ClientError) as e:
        standin.index(dimension=8)
    assert (error_code(e), status(e)) == ("ConflictException", 409)

    by_name = c.get_index(vectorBucketName=BUCKET, indexName=INDEX)["index"]
    by_arn = c.get_index(indexArn=arn)["index"]
    assert by_name["indexArn"] == by_arn["indexArn"] == arn
    assert (by_arn["dimension"], by_arn["distanceMetric"], by_arn["dataType"]) == (8, "euclidean", "float32")
    assert by_arn["metadataConfiguration"] == {"nonFilterableMetadataKeys": ["text"]}
    assert c.get_vector_bucket(vectorBucketName=BUCKET)["vectorBucket"]["vectorBucketName"] == BUCKET
    assert [b["vectorBucketName"] for b in c.list_vector_buckets()["vectorBuckets"]] == [BUCKET]
    assert [i["indexName"] for i in c.list_indexes(vectorBucketName=BUCKET)["indexes"]] == [INDEX]

    # exactly one addressing form
    with pytest.raises(ClientError) as e:
        c.get_index(indexArn=arn, vectorBucketName=BUCKET, indexName=INDEX)
    assert error_code(e) == "ValidationException" and status(e) == 400
    with pytest.raises(ClientError) as e:
        c.get_index(vectorBucketName=BUCKET)
    assert error_code(e) == "ValidationException"

    for call in (lambda: c.get_index(vectorBucketName=BUCKET, indexName="nope"),
                 lambda: c.get_index(indexArn=arn.replace(INDEX, "nope")),
                 lambda: c.get_vector_bucket(vectorBucketName="no-such-bucket"),
                 lambda: c.put_vectors(vectorBucketName="no-such-bucket", indexName=INDEX,
                                       vectors=[vec("a", [1.0] * 8)])):
        with pytest.raises(ClientError) as e:
            call()
        assert (error_code(e), status(e)) == ("NotFoundException", 404)

    bad_creates = [
        dict(dimension=4097, distanceMetric="cosine"),
        dict(dimension=4, distanceMetric="dotproduct"),
        dict(dimension=4, distanceMetric="cosine", dataType="float16"),
        dict(dimension=4, distanceMetric="cosine",
             metadataConfiguration={"nonFilterableMetadataKeys": [f"k{i}" for i in range(11)]}),
    ]
    for kwargs in bad_creates:
        kwargs = {"dataType": "float32", **kwargs}
        with pytest.raises(ClientError) as e:
            c.create_index(vectorBucketName=BUCKET, indexName="other", **kwargs)
        assert error_code(e) == "ValidationException", kwargs
    for name in ("Upper-case", "under_score", "-dash-first"):
        with pytest.raises(ClientError) as e:
            c.create_vector_bucket(vectorBucketName=name)
        assert error_code(e) == "ValidationException", name

    with pytest.raises(ClientError) as e:  # bucket still holds an index
        c.delete_vector_bucket(vectorBucketName=BUCKET)
    assert error_code(e) == "ConflictException"
    c.delete_index(indexArn=arn)
    c.delete_vector_bucket(vectorBucketName=BUCKET)
    assert c.list_vector_buckets()["vectorBuckets"] == []


def test_error_shape_is_rest_json(standin):
    code, headers, body = raw_call(standin.url, "/GetVectorBucket", {"vectorBucketName": "missing"})
    assert code == 404
    assert headers["x-amzn-ErrorType"] == "NotFoundException"
    assert set(body) == {"message"}
    code, headers, body = raw_call(standin.url, "/CreateVectorBucket", {"vectorBucketName": "fine-name"})
    assert (code, body) == (200, {"vectorBucketArn": "arn:aws:s3vectors:us-east-1:123456789012:bucket/fine-name"})
    code, _, body = raw_call(standin.url, "/DeleteVectorBucket", {"vectorBucketName": "fine-name"})
    assert (code, body) == (200, {})


# ---------------------------------------------------------------------------------------------- vectors


def test_put_get_list_round_trip_float32(standin):
    c = standin.client
    arn = standin.index(dimension=5, metric="euclidean")
    rnd = random.Random(7)
    vectors = [vec(f"k{i}", [rnd.uniform(-1, 1) for _ in range(5)], n=i, tags=["a", "b"], name=f"v{i}")
               for i in range(20)]
    c.put_vectors(indexArn=arn, vectors=vectors)

    got = c.get_vectors(indexArn=arn, keys=["k3", "k0", "missing"], returnData=True, returnMetadata=True)
    got = {v["key"]: v for v in got["vectors"]}
    assert set(got) == {"k3", "k0"}  # missing keys are left out
    for key in ("k0", "k3"):
        sent = vectors[int(key[1:])]
        assert got[key]["data"]["float32"] == [f32(x) for x in sent["data"]["float32"]]
        assert got[key]["data"]["float32"] != sent["data"]["float32"]  # really rounded to float32
        assert got[key]["metadata"] == sent["metadata"]
    bare = c.get_vectors(indexArn=arn, keys=["k1"])["vectors"][0]
    assert bare == {"key": "k1"}

    # same key overwrites
    c.put_vectors(indexArn=arn, vectors=[vec("k1", [0.5] * 5, n=100)])
    again = c.get_vectors(indexArn=arn, keys=["k1"], returnData=True, returnMetadata=True)["vectors"][0]
    assert again["data"]["float32"] == [0.5] * 5 and again["metadata"] == {"n": 100}

    listed = c.list_vectors(indexArn=arn, returnData=True, returnMetadata=True)["vectors"]
    assert len(listed) == 20 and {v["key"] for v in listed} == {f"k{i}" for i in range(20)}
    assert all(len(v["data"]["float32"]) == 5 and "metadata" in v for v in listed)

    c.delete_vectors(indexArn=arn, keys=["k0", "k1", "nope"])
    assert len(all_keys(c, arn)) == 18
    with pytest.raises(ClientError) as e:
        c.get_vectors(indexArn=arn, keys=[f"k{i}" for i in range(101)])
    assert error_code(e) == "ValidationException"
    with pytest.raises(ClientError) as e:
        c.delete_vectors(indexArn=arn, keys=[f"k{i}" for i in range(501)])
    assert error_code(e) == "ValidationException"


def test_list_vectors_pagination_and_segments(standin):
    c = standin.client
    arn = standin.index(dimension=4)
    expected = {f"key-{i:05d}" for i in range(2500)}
    keys = sorted(expected)
    for start in range(0, 2500, 500):
        c.put_vectors(indexArn=arn, vectors=[vec(k, [1.0, 2.0, 3.0, float(i)]) for i, k in
                                             enumerate(keys[start:start + 500], start)])

    first = c.list_vectors(indexArn=arn)
    assert len(first["vectors"]) == 500 and "nextToken" in first  # default page size

    pages = list(c.get_paginator("list_vectors").paginate(indexArn=arn, PaginationConfig={"PageSize": 300}))
    assert all(len(p["vectors"]) <= 300 for p in pages) and len(pages) == 9
    listed = [v["key"] for p in pages for v in p["vectors"]]
    assert len(listed) == 2500 and set(listed) == expected

    with pytest.raises(ClientError) as e:
        c.list_vectors(indexArn=arn, maxResults=1001)
    assert error_code(e) == "ValidationException"

    seen: list[str] = []
    per_segment = []
    for seg in range(4):
        seg_keys = all_keys(c, arn, segmentCount=4, segmentIndex=seg, PaginationConfig={"PageSize": 200})
        per_segment.append(len(seg_keys))
        seen += seg_keys
    assert len(seen) == 2500 and set(seen) == expected  # every key exactly once
    assert all(400 < n < 850 for n in per_segment), per_segment
    # deterministic partition
    assert all_keys(c, arn, segmentCount=4, segmentIndex=2) == all_keys(c, arn, segmentCount=4, segmentIndex=2)
    for bad in (dict(segmentCount=17, segmentIndex=0), dict(segmentCount=4, segmentIndex=4), dict(segmentCount=4)):
        with pytest.raises(ClientError) as e:
            c.list_vectors(indexArn=arn, **bad)
        assert error_code(e) == "ValidationException", bad


def test_list_vectors_short_pages_when_response_is_large(standin_factory):
    s = standin_factory(**NO_QUOTA, max_list_response_bytes=2000)
    arn = s.index(dimension=100)
    s.client.put_vectors(indexArn=arn, vectors=[vec(f"k{i:02d}", [1.0] * 100) for i in range(50)])
    page = s.client.list_vectors(indexArn=arn, maxResults=50, returnData=True)
    assert 1 <= len(page["vectors"]) < 50 and "nextToken" in page
    assert sorted(all_keys(s.client, arn, returnData=True)) == [f"k{i:02d}" for i in range(50)]


def test_put_vectors_count_and_body_size_limits(standin_factory):
    s = standin_factory(**NO_QUOTA)
    c = s.client
    arn = s.index(dimension=4)
    with pytest.raises(ClientError) as e:
        c.put_vectors(indexArn=arn, vectors=[vec(f"k{i}", [1.0, 0, 0, 0]) for i in range(501)])
    assert error_code(e) == "ValidationException" and "500" in e.value.response["Error"]["Message"]
    c.put_vectors(indexArn=arn, vectors=[vec(f"k{i}", [1.0, 0, 0, 0]) for i in range(500)])
    assert s.control("GET", "stats")[2]["indexes"][f"{BUCKET}/{INDEX}"]["vectors"] == 500

    # byte limit, with a small limit set at run time: exactly at the limit passes, one byte more fails
    body = orjson.dumps({"indexArn": arn, "vectors": [vec("small", [1.0, 2.0, 3.0, 4.0])]})
    s.control("POST", "config", {"max_request_bytes": len(body) + 10})
    assert raw_call(s.url, "/PutVectors", body + b" " * 10)[0] == 200
    code, headers, err = raw_call(s.url, "/PutVectors", body + b" " * 11)
    assert code == 400 and headers["x-amzn-ErrorType"] == "ValidationException" and "exceeds" in err["message"]
    with pytest.raises(ClientError) as e:
        c.put_vectors(indexArn=arn, vectors=[vec("big", [1.0, 2.0, 3.0, 4.0], pad="x" * 100)])
    assert error_code(e) == "ValidationException"
    assert c.get_vectors(indexArn=arn, keys=["big"])["vectors"] == []


def test_real_size_body_over_20_mib_is_rejected(standin):
    """500 vectors x 3072 dims serialised by botocore (Python float repr) is ~34 MB: over 20 MiB."""
    c = standin.client
    arn = standin.index(dimension=3072)
    rnd = random.Random(3)
    row = [rnd.gauss(0, 0.02) for _ in range(3072)]
    vectors = [{"key": f"k{i}", "data": {"float32": row}} for i in range(500)]
    with pytest.raises(ClientError) as e:
        c.put_vectors(indexArn=arn, vectors=vectors)
    assert error_code(e) == "ValidationException"
    assert str(20 * 1024 * 1024) in e.value.response["Error"]["Message"]
    stats = standin.control("GET", "stats")[2]
    assert stats["global"]["rejected_too_large"] == 1 and stats["global"]["largest_rejected_bytes"] > 20 * 2**20
    assert stats["indexes"][f"{BUCKET}/{INDEX}"]["vectors"] == 0


def test_vector_validation(standin):
    c = standin.client
    cos = standin.index(dimension=3, metric="cosine", non_filterable=["text"])
    euc = standin.index(dimension=3, metric="euclidean", name="idx-euclid")

    def rejected(arn, vectors, fragment=""):
        with pytest.raises(ClientError) as e:
            c.put_vectors(indexArn=arn, vectors=vectors)
        assert error_code(e) == "ValidationException" and status(e) == 400
        assert fragment in e.value.response["Error"]["Message"]

    rejected(cos, [vec("a", [1.0, 2.0])], "dimensions")
    rejected(cos, [vec("a", [1.0, 2.0, 3.0, 4.0])], "dimensions")
    rejected(cos, [vec("a", [0.0, 0.0, 0.0])], "zero")
    c.put_vectors(indexArn=euc, vectors=[vec("zero", [0.0, 0.0, 0.0])])  # fine under euclidean
    rejected(cos, [vec("a", [float("nan"), 1.0, 1.0])])  # botocore sends NaN: not JSON
    rejected(cos, [vec("a", [float("inf"), 1.0, 1.0])])
    rejected(cos, [vec("a", [1e39, 1.0, 1.0])], "finite")  # overflows float32
    rejected(cos, [vec("k" * 1025, [1.0, 1.0, 1.0])], "key")
    rejected(cos, [vec("dup", [1.0, 1.0, 1.0]), vec("dup", [2.0, 1.0, 1.0])], "duplicate")

    rejected(cos, [vec("a", [1.0, 1.0, 1.0], **{f"m{i}": i for i in range(51)})], "keys")
    c.put_vectors(indexArn=cos, vectors=[vec("fifty", [1.0, 1.0, 1.0], **{f"m{i}": i for i in range(50)})])
    rejected(cos, [vec("a", [1.0, 1.0, 1.0], note="x" * 2100)],
             "Invalid record for key 'a': Filterable metadata must have at most 2048 bytes")
    c.put_vectors(indexArn=cos, vectors=[vec("big-text", [1.0, 1.0, 1.0], text="x" * 30_000, note="short")])
    rejected(cos, [vec("a", [1.0, 1.0, 1.0], text="x" * 41_000)], "metadata")
    rejected(cos, [vec("a", [1.0, 1.0, 1.0], nested={"a": 1})])

    # a bad vector anywhere rejects the whole request, nothing stored
    rejected(cos, [vec("ok", [1.0, 1.0, 1.0]), vec("bad", [0.0, 0.0, 0.0])])
    assert c.get_vectors(indexArn=cos, keys=["ok", "bad", "a"])["vectors"] == []
    assert sorted(all_keys(c, cos)) == ["big-text", "fifty"]
    stats = standin.control("GET", "stats")[2]["indexes"][f"{BUCKET}/{INDEX}"]
    assert stats["rejected_validation"] >= 10 and stats["put_requests_accepted"] == 2


# ------------------------------------------------------------------------------------------------ query


def test_query_ordering_distances_and_top_k(standin):
    c = standin.client
    cos = standin.index(dimension=2, metric="cosine")
    euc = standin.index(dimension=2, metric="euclidean", name="idx-euclid")
    points = {"east": [1.0, 0.0], "north-east": [1.0, 1.0], "north": [0.0, 2.0], "west": [-3.0, 0.0]}
    for arn in (cos, euc):
        c.put_vectors(indexArn=arn, vectors=[vec(k, v) for k, v in points.items()])

    r = c.query_vectors(indexArn=cos, topK=4, queryVector={"float32": [2.0, 0.0]}, returnDistance=True)
    assert r["distanceMetric"] == "cosine"
    assert [v["key"] for v in r["vectors"]] == ["east", "north-east", "north", "west"]
    assert [round(v["distance"], 6) for v in r["vectors"]] == [0.0, round(1 - math.sqrt(0.5), 6), 1.0, 2.0]

    r = c.query_vectors(indexArn=euc, topK=2, queryVector={"float32": [0.0, 1.0]}, returnDistance=True)
    assert r["distanceMetric"] == "euclidean"
    assert [v["key"] for v in r["vectors"]] == ["north", "north-east"]  # a tie, ordered by key
    assert [round(v["distance"], 6) for v in r["vectors"]] == [1.0, 1.0]

    r = c.query_vectors(indexArn=euc, topK=1, queryVector={"float32": [-2.0, 0.0]})
    assert r["vectors"] == [{"key": "west"}]  # no distance or metadata unless asked

    c.query_vectors(indexArn=euc, topK=100, queryVector={"float32": [0.0, 1.0]})
    with pytest.raises(ClientError) as e:
        c.query_vectors(indexArn=euc, topK=101, queryVector={"float32": [0.0, 1.0]})
    assert error_code(e) == "ValidationException"
    code, _, _ = raw_call(standin.url, "/QueryVectors", {"indexArn": euc, "topK": 0, "queryVector": {"float32": [0, 1]}})
    assert code == 400
    with pytest.raises(ClientError) as e:
        c.query_vectors(indexArn=euc, topK=3, queryVector={"float32": [0.0, 1.0, 2.0]})
    assert error_code(e) == "ValidationException"


def test_query_filters(standin):
    c = standin.client
    arn = standin.index(dimension=2, metric="euclidean", non_filterable=["text"])
    rows = {
        "a": dict(genre="drama", year=2019, tags=["x", "y"], text="t"),
        "b": dict(genre="comedy", year=2020, tags=["y"], flag=True),
        "c": dict(genre="documentary", year=2021, tags=["z"], flag=False),
        "d": dict(genre="drama", year=2024),
        "e": dict(year=2020),
    }
    c.put_vectors(indexArn=arn, vectors=[vec(k, [float(i), 0.0], **m) for i, (k, m) in enumerate(rows.items())])

    def keys(flt):
        r = c.query_vectors(indexArn=arn, topK=10, queryVector={"float32": [0.0, 0.0]}, filter=flt,
                            returnMetadata=True)
        return sorted(v["key"] for v in r["vectors"])

    assert keys({"genre": "drama"}) == ["a", "d"]
    assert keys({"genre": {"$eq": "drama"}}) == ["a", "d"]
    assert keys({"genre": {"$ne": "drama"}}) == ["b", "c", "e"]
    assert keys({"tags": "y"}) == ["a", "b"]  # array value contains
    assert keys({"tags": {"$in": ["z", "x"]}}) == ["a", "c"]
    assert keys({"genre": {"$in": ["comedy", "documentary"]}}) == ["b", "c"]
    assert keys({"genre": {"$nin": ["comedy", "documentary"]}}) == ["a", "d", "e"]
    assert keys({"year": {"$gt": 2020}}) == ["c", "d"]
    assert keys({"year": {"$gte": 2020, "$lt": 2024}}) == ["b", "c", "e"]
    assert keys({"year": {"$lte": 2019}}) == ["a"]
    assert keys({"flag": {"$exists": True}}) == ["b", "c"]
    assert keys({"genre": {"$exists": False}}) == ["e"]
    assert keys({"flag": False}) == ["c"]
    assert keys({"year": 2020}) == ["b", "e"]
    assert keys({"$and": [{"genre": "drama"}, {"year": {"$gt": 2020}}]}) == ["d"]
    assert keys({"$or": [{"genre": "comedy"}, {"year": {"$gte": 2024}}]}) == ["b", "d"]
    assert keys({"$or": [{"$and": [{"genre": "drama"}, {"year": 2019}]}, {"tags": {"$in": ["z"]}}]}) == ["a", "c"]
    assert keys({"genre": "drama", "year": 2024}) == ["d"]  # implicit AND
    assert keys({"genre": "horror"}) == []

    r = c.query_vectors(indexArn=arn, topK=1, queryVector={"float32": [0.0, 0.0]}, returnMetadata=True)
    assert r["vectors"][0]["metadata"] == rows["a"]  # non-filterable keys are still returned

    for bad in ({"text": "t"}, {"text": {"$exists": True}}, {"$or": [{"genre": "x"}, {"text": "t"}]},
                {"genre": {"$regex": "d.*"}}, {"genre": {"$in": []}}, {"$and": []}, {"year": {"$gt": "2020"}},
                {"$not": {"genre": "drama"}}, {"genre": {"$eq": ["a"]}}):
        with pytest.raises(ClientError) as e:
            c.query_vectors(indexArn=arn, topK=3, queryVector={"float32": [0.0, 0.0]}, filter=bad)
        assert error_code(e) == "ValidationException", bad


# ---------------------------------------------------------------------------------------- quota / faults


def test_write_quota_vectors_per_second(standin_factory):
    s = standin_factory(vectors_per_second=20, requests_per_second=1000)
    c = s.client
    arn = s.index(dimension=2)
    codes = []
    for r in range(4):
        try:
            c.put_vectors(indexArn=arn, vectors=[vec(f"r{r}-{i}", [1.0, float(i)]) for i in range(10)])
            codes.append(200)
        except ClientError as e:
            codes.append(e.response["ResponseMetadata"]["HTTPStatusCode"])
            assert error_code_of(e) == "TooManyRequestsException"
    assert codes[:2] == [200, 200] and 429 in codes[2:]  # burst = one second's worth = 20 vectors
    stored = set(all_keys(c, arn))
    assert {k.split("-")[0] for k in stored} == {f"r{i}" for i, code in enumerate(codes) if code == 200}
    time.sleep(0.6)  # 12 tokens back
    c.put_vectors(indexArn=arn, vectors=[vec(f"late-{i}", [1.0, 2.0]) for i in range(10)])
    stats = s.control("GET", "stats")[2]["indexes"][f"{BUCKET}/{INDEX}"]
    assert stats["rejected_quota"] == codes.count(429) and stats["put_requests_accepted"] == codes.count(200) + 1


def error_code_of(e: ClientError) -> str:
    return e.response["Error"]["Code"]


def test_write_quota_requests_per_second_and_deletes(standin_factory):
    s = standin_factory(vectors_per_second=0, requests_per_second=3)
    c = s.client
    arn = s.index(dimension=2)
    c.put_vectors(indexArn=arn, vectors=[vec("a", [1.0, 1.0])])
    c.put_vectors(indexArn=arn, vectors=[vec("b", [1.0, 1.0])])
    c.delete_vectors(indexArn=arn, keys=["a"])
    with pytest.raises(ClientError) as e:
        c.delete_vectors(indexArn=arn, keys=["b"])
    assert (error_code(e), status(e)) == ("TooManyRequestsException", 429)
    with pytest.raises(ClientError) as e:
        c.put_vectors(indexArn=arn, vectors=[vec("c", [1.0, 1.0])])
    assert error_code(e) == "TooManyRequestsException"
    assert sorted(all_keys(c, arn)) == ["b"]  # rejected writes changed nothing; reads are not limited
    # quota can be lifted at run time
    s.control("POST", "config", {"requests_per_second": 0})
    for i in range(10):
        c.put_vectors(indexArn=arn, vectors=[vec(f"x{i}", [1.0, 1.0])])


def test_fault_injection(standin_factory):
    s = standin_factory(**NO_QUOTA, fault_rate=0.5, seed=1)
    c = s.client
    arn = s.index(dimension=2)
    outcome = {}
    for i in range(40):
        try:
            c.put_vectors(indexArn=arn, vectors=[vec(f"k{i}", [1.0, float(i)])])
            outcome[f"k{i}"] = 200
        except ClientError as e:
            outcome[f"k{i}"] = (e.response["ResponseMetadata"]["HTTPStatusCode"], error_code_of(e))
    codes = list(outcome.values())
    assert (429, "TooManyRequestsException") in codes and (503, "ServiceUnavailableException") in codes
    assert 200 in codes
    assert set(all_keys(c, arn)) == {k for k, v in outcome.items() if v == 200}
    stats = s.control("GET", "stats")[2]["indexes"][f"{BUCKET}/{INDEX}"]
    assert stats["rejected_fault_429"] == codes.count((429, "TooManyRequestsException"))
    assert stats["rejected_fault_503"] == codes.count((503, "ServiceUnavailableException"))
    assert stats["rejected_fault"] + stats["put_requests_accepted"] == 40 and stats["rejected_quota"] == 0

    # same seed, same sequence
    s.control("POST", "reset")
    s.index(dimension=2)
    again = {}
    for i in range(40):
        try:
            c.put_vectors(indexArn=arn, vectors=[vec(f"k{i}", [1.0, float(i)])])
            again[f"k{i}"] = 200
        except ClientError as e:
            again[f"k{i}"] = (e.response["ResponseMetadata"]["HTTPStatusCode"], error_code_of(e))
    assert again == outcome
    # faults can be switched off at run time; boto3's standard retries would ride over them anyway
    s.control("POST", "config", {"fault_rate": 0})
    c.put_vectors(indexArn=arn, vectors=[vec("after", [1.0, 1.0])])


def test_a_held_index_answers_429_beyond_its_count_until_released(standin_factory):
    s = standin_factory(**NO_QUOTA, hold_beyond_vectors=2)
    c = s.client
    arn = s.index(dimension=2)
    c.put_vectors(indexArn=arn, vectors=[vec("a", [1.0, 0.0]), vec("b", [0.0, 1.0])])
    c.put_vectors(indexArn=arn, vectors=[vec("a", [1.0, 1.0])])  # overwriting adds nothing: taken
    with pytest.raises(ClientError) as held:
        c.put_vectors(indexArn=arn, vectors=[vec("c", [1.0, 2.0])])
    assert (held.value.response["ResponseMetadata"]["HTTPStatusCode"], error_code_of(held.value)) == \
        (429, "TooManyRequestsException")
    assert s.control("GET", "stats")[2]["indexes"][f"{BUCKET}/{INDEX}"]["rejected_held_429"] == 1
    s.control("POST", "config", {"hold_beyond_vectors": None})
    c.put_vectors(indexArn=arn, vectors=[vec("c", [1.0, 2.0])])
    assert set(all_keys(c, arn)) == {"a", "b", "c"}


def test_chosen_keys_are_refused_with_the_whole_request(standin_factory):
    s = standin_factory(**NO_QUOTA, refuse_keys=["bad", "it's"])
    c = s.client
    arn = s.index(dimension=2)

    def refused(vectors) -> str:
        with pytest.raises(ClientError) as e:
            c.put_vectors(indexArn=arn, vectors=vectors)
        assert (status(e), error_code(e)) == (400, "ValidationException")
        return e.value.response["Error"]["Message"]

    assert refused([vec("ok", [1.0, 0.0]), vec("bad", [0.0, 1.0])]) == \
        "Invalid record for key 'bad': Filterable metadata must have at most 2048 bytes"
    assert refused([vec("it's", [1.0, 1.0])]) == \
        "Invalid record for key 'it's': Filterable metadata must have at most 2048 bytes"
    assert all_keys(c, arn) == []  # nothing of a refused request is written
    s.control("POST", "config", {"refused_keys_unnamed": True})
    assert refused([vec("ok", [1.0, 0.0]), vec("bad", [0.0, 1.0])]) == \
        "Invalid record: Filterable metadata must have at most 2048 bytes"
    c.put_vectors(indexArn=arn, vectors=[vec("ok", [1.0, 0.0])])
    s.control("POST", "config", {"refuse_keys": None})
    c.put_vectors(indexArn=arn, vectors=[vec("bad", [0.0, 1.0])])
    assert sorted(all_keys(c, arn)) == ["bad", "ok"]
    stats = s.control("GET", "stats")[2]["indexes"][f"{BUCKET}/{INDEX}"]
    assert stats["rejected_validation"] == 3 and stats["put_requests_accepted"] == 2


# ---------------------------------------------------------------------------------------- control / misc


def test_stats_config_reset(standin):
    c = standin.client
    arn = standin.index(dimension=3)
    c.put_vectors(indexArn=arn, vectors=[vec(f"k{i}", [1.0, 2.0, 3.0]) for i in range(7)])
    c.put_vectors(indexArn=arn, vectors=[vec(f"j{i}", [1.0, 2.0, 3.0]) for i in range(3)])
    code, _, stats = standin.control("GET", "stats")
    assert code == 200
    st = stats["indexes"][f"{BUCKET}/{INDEX}"]
    assert st["vectors"] == 10 and st["put_requests_accepted"] == 2 and st["put_vectors_accepted"] == 10
    assert st["largest_request_vectors"] == 7
    assert 0 < st["largest_request_bytes"] < st["bytes_accepted"]
    assert st["rejected_quota"] == st["rejected_fault"] == 0
    assert stats["config"]["vectors_per_second"] == 0

    code, _, cfg = standin.control("POST", "config", {"vectors_per_second": 2500, "requests_per_second": 1000,
                                                      "fault_rate": 0.25, "seed": 9, "max_request_bytes": 1000})
    assert code == 200 and (cfg["fault_rate"], cfg["seed"], cfg["max_request_bytes"]) == (0.25, 9, 1000)
    assert standin.control("POST", "config", {"no_such_option": 1})[0] == 400
    assert standin.control("POST", "config", {"fault_rate": 2})[0] == 400

    standin.control("POST", "reset", {"stats_only": True})
    st = standin.control("GET", "stats")[2]["indexes"][f"{BUCKET}/{INDEX}"]
    assert st["vectors"] == 10 and st["put_requests_accepted"] == 0
    standin.control("POST", "reset")
    assert standin.control("GET", "stats")[2]["indexes"] == {}
    assert c.list_vector_buckets()["vectorBuckets"] == []


def test_concurrent_writers(standin):
    arn = standin.index(dimension=16)
    errors = []

    # boto3.client() itself is not thread-safe: build the clients first
    clients = [boto3.client("s3vectors", endpoint_url=standin.url, region_name="us-east-1") for _ in range(6)]

    def writer(w):
        c = clients[w]
        try:
            for r in range(5):
                c.put_vectors(indexArn=arn, vectors=[vec(f"w{w}-r{r}-{i}", [float(w + 1)] * 16) for i in range(40)])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(all_keys(standin.client, arn)) == 6 * 5 * 40


def test_runs_as_its_own_process():
    proc = subprocess.Popen([sys.executable, "-m", "tests.standins.s3vectors", "--port", "0",
                             "--vectors-per-second", "2500", "--requests-per-second", "1000",
                             "--fault-rate", "0", "--seed", "1"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        c = boto3.client("s3vectors", endpoint_url=url, region_name="us-east-1")
        c.create_vector_bucket(vectorBucketName="proc-bucket")
        assert raw_call(url, "/_standin/stats", method="GET")[2]["config"]["vectors_per_second"] == 2500
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ------------------------------------------------------------------------------------ throughput figure


def measure_throughput(requests: int = 20, streams: int = 1, dimension: int = 3072) -> float:
    """Start the stand-in as its own process with the quota off and push pre-serialised 500-vector
    PutVectors bodies (floats with 8 decimals, ~17 MB per body) from `streams` threads; returns vectors/s."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.standins.s3vectors", "--port", "0",
                             "--vectors-per-second", "0", "--requests-per-second", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        raw_call(url, "/CreateVectorBucket", {"vectorBucketName": "bench"})
        raw_call(url, "/CreateIndex", {"vectorBucketName": "bench", "indexName": "bench", "dataType": "float32",
                                       "dimension": dimension, "distanceMetric": "cosine"})
        rnd = random.Random(1)
        rows = [orjson.dumps([round(rnd.gauss(0, 0.018), 8) for _ in range(dimension)]) for _ in range(500)]

        def body(r: int) -> bytes:
            items = b",".join(b'{"key":"r%d-%d","data":{"float32":%s},"metadata":{"source":"s3://b/%d.jpg"}}'
                              % (r, i, row, i) for i, row in enumerate(rows))
            return b'{"vectorBucketName":"bench","indexName":"bench","vectors":[' + items + b"]}"

        bodies = [body(r) for r in range(requests)]
        print(f"body size {len(bodies[0]) / 2**20:.1f} MiB per 500 vectors")
        todo = list(range(requests))
        lock = threading.Lock()

        def stream():
            while True:
                with lock:
                    if not todo:
                        return
                    r = todo.pop()
                code, _, err = raw_call(url, "/PutVectors", bodies[r])
                assert code == 200, err

        started = time.perf_counter()
        workers = [threading.Thread(target=stream) for _ in range(streams)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - started
        return requests * 500 / elapsed
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--streams", type=int, default=1)
    a = ap.parse_args()
    rate = measure_throughput(a.requests, a.streams)
    print(f"{rate:.0f} vectors/s ({a.streams} stream(s) of 500-vector PutVectors, 3072 dims, quota disabled)")


# ------------------------------------------------------------------------ since general availability


@pytest.mark.parametrize("mode", ["ENHANCED", "CLASSIC"])
def test_get_index_returns_the_ga_fields(standin_factory, mode):
    s = standin_factory(**NO_QUOTA, default_index_mode=mode)
    arn = s.index(dimension=8)
    index = s.client.get_index(indexArn=arn)["index"]  # botocore parses every field: all are in its Index shape
    assert index["indexMode"] == mode
    assert index["encryptionConfiguration"] == {"sseType": "AES256"}  # the bucket's
    assert (index["dimension"], index["distanceMetric"], index["dataType"]) == (8, "cosine", "float32")
    assert s.client.get_vector_bucket(vectorBucketName=BUCKET)["vectorBucket"]["defaultIndexMode"] == mode
    with pytest.raises(ValueError):
        make_app(options={"default_index_mode": "FAST"})


def test_list_vectors_pages_may_count_data_that_is_not_returned(standin_factory):
    s = standin_factory(**NO_QUOTA, max_list_response_bytes=4000)
    arn = s.index(dimension=100)  # 400 bytes of data a vector
    s.client.put_vectors(indexArn=arn, vectors=[vec(f"k{i:02d}", [1.0] * 100, source="x" * 50) for i in range(50)])
    assert len(s.client.list_vectors(indexArn=arn, maxResults=50)["vectors"]) == 50  # keys only: one page
    s.control("POST", "config", {"list_bytes_count_stored_data": True})
    page = s.client.list_vectors(indexArn=arn, maxResults=50)
    assert 1 <= len(page["vectors"]) < 10 and "nextToken" in page
    assert sorted(all_keys(s.client, arn, PaginationConfig={"PageSize": 50})) == [f"k{i:02d}" for i in range(50)]


# ----------------------------------------------------------------------------- PutVectors read by simdjson


def _put(vectors) -> bytes:
    head = b'{"vectorBucketName":"bucket","indexName":"index","vectors":'
    return head + (vectors if isinstance(vectors, bytes) else orjson.dumps(vectors)) + b"}"


def _v(key, values, **metadata):
    return {"key": key, "data": {"float32": values}, **({"metadata": metadata} if metadata else {})}


PUT_BODIES = {  # name: (body, whether simdjson reads it: the rest is left to orjson)
    "plain": (_put([_v("a", [0.1, -0.2, 0.3], uri="s3://b/中文 a+b.png", n=3, ok=True), _v("b", [1, 2, 3])]),
              True),
    "integers, exponents, negative zero": (_put(b'[{"key":"a","data":{"float32":[1e-8,-0,16777217]}},'
                                                b'{"key":"b","data":{"float32":[3.4028235E38,-2.5e+3,-0.0]}}]'),
                                           True),
    "digits beyond float64": (_put(b'[{"key":"a","data":{"float32":[0.1000000000000000055511151231257827,'
                                   b'0.30000000000000004,7]}}]'), True),
    "beyond float32": (_put([_v("a", [1e39, 1.0, 1.0])]), True),
    "zero once float32": (_put([_v("a", [1e-50, 0.0, -1e-60])]), True),
    "all zeros": (_put([_v("ok", [1.0, 1.0, 1.0]), _v("a", [0, 0.0, -0.0])]), True),
    "too few values": (_put([_v("a", [1.0, 2.0])]), True),
    "no values": (_put([_v("a", [])]), True),
    "null among the values": (_put([_v("a", [None, 1.0, 1.0])]), False),
    "true among the values": (_put([_v("a", [True, 1.0, 1.0])]), False),
    "text among the values": (_put([_v("a", ["1", 1.0, 1.0])]), False),
    "nested values": (_put([_v("a", [[1.0], 1.0, 1.0])]), False),
    "NaN": (_put(b'[{"key":"a","data":{"float32":[NaN,1,1]}}]'), False),
    "1e400": (_put(b'[{"key":"a","data":{"float32":[1e400,1,1]}}]'), False),
    "an integer beyond 64 bits": (_put(b'[{"key":"a","data":{"float32":[100000000000000000000,1,1]}}]'), False),
    "a list in metadata": (_put([_v("a", [1.0, 1.0, 1.0], tags=["x", "y"])]), False),
    "a bracket in a key": (_put([_v("a[1]", [1.0, 1.0, 1.0])]), False),
    "nested metadata": (_put([_v("a", [1.0, 1.0, 1.0], nested={"a": 1})]), True),
    "a key twice in a vector": (_put(b'[{"key":"a","key":"b","data":{"float32":[1,1,1]}}]'), False),
    "a key twice in the body": (_put(b'[{"key":"a","data":{"float32":[1,1,1]}}],"indexName":"other"'), False),
    "data with another type": (_put(b'[{"key":"a","data":{"float32":[1,1,1],"float16":[1,1,1]}}]'), False),
    "no data": (_put(b'[{"key":"a"}]'), False),
    "a duplicate key": (_put([_v("a", [1.0, 1.0, 1.0]), _v("a", [2.0, 1.0, 1.0])]), True),
    "no vectors": (_put([]), True),
    "vectors not a list": (_put(b'{"key":"a"}'), False),
}


@pytest.mark.parametrize("name", PUT_BODIES)
def test_put_vectors_read_by_simdjson_answers_and_stores_what_orjson_would(name, monkeypatch):
    from werkzeug.test import Client

    from tests.standins import s3vectors

    body, fast = PUT_BODIES[name]
    assert (s3vectors._read_put_vectors(body) is not None) == fast
    seen = []
    for reader in (s3vectors._read_put_vectors, lambda _body: None):
        monkeypatch.setattr(s3vectors, "_read_put_vectors", reader)
        app = make_app(options=NO_QUOTA)
        client = Client(app)
        assert client.post("/CreateVectorBucket", json={"vectorBucketName": "bucket"}).status_code == 200
        assert client.post("/CreateIndex", json={"vectorBucketName": "bucket", "indexName": "index",
                                                "dataType": "float32", "dimension": 3,
                                                "distanceMetric": "cosine"}).status_code == 200
        response = client.post("/PutVectors", data=body)
        stored = app.buckets["bucket"].indexes["index"].vectors
        seen.append((response.status_code, response.get_data(),
                     {key: (arr.tobytes(), meta) for key, (arr, _norm, meta) in stored.items()},
                     {key: norm for key, (_arr, norm, _meta) in stored.items()}))
    (status_new, answer_new, vectors_new, norms_new), (status_old, answer_old, vectors_old, norms_old) = seen
    assert (status_new, answer_new, vectors_new) == (status_old, answer_old, vectors_old)
    assert norms_new == pytest.approx(norms_old, rel=1e-12)
