"""The compact set of indexed keys: the same answers as a Python set, 24 bytes a key, every ListVectors page of
every segment read, and keys of another shape kept aside."""

from __future__ import annotations

import json
import os
import random
import urllib.request

import orjson
import pytest

import common
import keyset


def hex_keys(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.randbytes(16).hex() for _ in range(n)]


def test_the_key_set_answers_like_a_python_set():
    present = hex_keys(20_000, 1)
    # Keys that share their first 8 bytes with a present key, and differ after.
    twins = [k[:16] + hex_keys(1, i)[0][:16] for i, k in enumerate(present[:300])]
    present += twins[:150]
    absent = hex_keys(20_000, 2) + twins[150:]
    keys = keyset.KeySet.of(present + present[:100])  # a key read twice is kept once
    assert len(keys) == len(present)
    query = present + absent
    random.Random(3).shuffle(query)
    found = keys.contains([bytes.fromhex(k) for k in query])
    expected = set(present)
    assert [k for k, hit in zip(query, found) if hit] == [k for k in query if k in expected]
    assert present[0] in keys and absent[0] not in keys
    assert keys.nbytes <= 24 * len(present)


def test_keys_of_another_shape_are_kept_aside():
    keys = keyset.KeySet.of(["manual-1", "ABCDEF" * 6, "a" * 32, "b" * 31])
    assert keys.foreign == {"manual-1", "ABCDEF" * 6, "b" * 31}
    assert "a" * 32 in keys and "manual-1" in keys and "c" * 32 not in keys
    assert keyset.digest("s3://b/k.jpg").hex() == common.vector_key("s3://b/k.jpg")


def test_an_empty_set_contains_nothing():
    assert not keyset.KeySet().contains([b"\0" * 16]).any()


@pytest.fixture
def small_pages(world):
    """ListVectors pages cut after a few keys (the service cuts a page at 1 MB of data)."""
    def configure(**options):
        request = urllib.request.Request(world.stack.s3vectors_url + "/_standin/config",
                                         data=json.dumps(options).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request) as response:
            return json.loads(response.read())

    before = configure()
    configure(max_list_response_bytes=200)  # about 6 keys a page
    yield
    configure(max_list_response_bytes=before["max_list_response_bytes"])


@pytest.mark.parametrize("lean", [False, True])
def test_index_keys_reads_every_page_of_every_segment(world, small_pages, lean):
    s3v = world.client("s3vectors")
    s3v.create_vector_bucket(vectorBucketName=world.vector_bucket)
    s3v.create_index(vectorBucketName=world.vector_bucket, indexName=world.vector_index, dataType="float32",
                     dimension=4, distanceMetric="cosine")
    keys = [common.vector_key(f"s3://{world.source_bucket}/2024/img-{i}.jpg") for i in range(400)]
    keys += [f"manual-{i}" for i in range(5)]
    for n in range(0, len(keys), 100):
        s3v.put_vectors(vectorBucketName=world.vector_bucket, indexName=world.vector_index,
                        vectors=[{"key": k, "data": {"float32": [1.0, 0.5, 0.25, float(i % 7)]}}
                                 for i, k in enumerate(keys[n:n + 100])])
    pages = []
    s3v.meta.events.register("after-call.s3vectors.ListVectors",
                             lambda parsed, **_: pages.append(len(parsed.get("vectors", []))))

    found = keyset.index_keys(keyset.lean(s3v) if lean else s3v, world.vector_bucket, world.vector_index)

    assert len(pages) > 2 * keyset.MAX_SEGMENTS and max(pages) < 400 / keyset.MAX_SEGMENTS  # several pages each
    assert len(found) == 405 and found.foreign == {f"manual-{i}" for i in range(5)}
    assert all(k in found for k in keys)
    assert not found.contains([os.urandom(16) for _ in range(50)]).any()


def test_a_list_vectors_error_still_raises_with_the_lean_client(world):
    s3v = keyset.lean(world.client("s3vectors"))
    with pytest.raises(s3v.exceptions.NotFoundException):
        keyset.index_keys(s3v, "no-such-bucket", "no-such-index", segments=2)


def test_a_list_vectors_page_is_read_the_same_on_either_path():
    """A compact page of 32-hex-digit keys is cut out with regular expressions; any other page goes through orjson,
    and both give the same keys and token."""
    keys = [common.vector_key(f"s3://bucket/img-{i}.jpg") for i in range(5)]

    def parse(body: bytes) -> dict:
        response, parsed = {"status_code": 200, "body": body}, {}
        keyset._parse_keys(response, parsed)
        assert response["body"] == b"{}"
        return parsed

    def keys_of(parsed: dict) -> list[str]:
        packed = parsed.get("packedKeys", b"")
        return [packed[i:i + 16].hex() for i in range(0, len(packed), 16)] + [v["key"] for v in
                                                                              parsed.get("vectors", [])]

    compact = orjson.dumps({"vectors": [{"key": k} for k in keys], "nextToken": "abc_-="})
    fast = parse(compact)
    assert "packedKeys" in fast and "vectors" not in fast
    assert keys_of(fast) == keys and fast["nextToken"] == "abc_-="
    assert "nextToken" not in parse(orjson.dumps({"vectors": [{"key": k} for k in keys]}))
    others = [
        json.dumps({"vectors": [{"key": k} for k in keys], "nextToken": "abc_-="}).encode(),  # spaced
        orjson.dumps({"vectors": [{"key": k} for k in keys] + [{"key": "manual-1"}], "nextToken": "abc_-="}),
        orjson.dumps({"vectors": [{"key": k.upper()} for k in keys], "nextToken": "abc_-="}),
        orjson.dumps({"vectors": [{"key": k} for k in keys], "nextToken": 'a"b\\c'}),  # escapes in the token
    ]
    for body in others:
        slow = parse(body)
        assert "packedKeys" not in slow and len(slow["vectors"]) in (5, 6)
    assert keys_of(parse(others[0])) == keys and parse(others[0])["nextToken"] == "abc_-="
    assert parse(others[3])["nextToken"] == 'a"b\\c'
