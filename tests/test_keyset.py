"""The compact set of indexed keys: the same answers as a Python set, 24 bytes a key, every ListVectors page of
every segment read, and keys of another shape kept aside."""

from __future__ import annotations

import json
import os
import random
import urllib.request

import orjson
import pytest

from batch_embeddings import keyset, naming


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
    assert keyset.digest("s3://b/k.jpg").hex() == naming.vector_key("s3://b/k.jpg")


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
    keys = [naming.vector_key(f"s3://{world.source_bucket}/2024/img-{i}.jpg") for i in range(400)]
    keys += [f"manual-{i}" for i in range(5)]
    for n in range(0, len(keys), 100):
        s3v.put_vectors(vectorBucketName=world.vector_bucket, indexName=world.vector_index,
                        vectors=[{"key": k, "data": {"float32": [1.0, 0.5, 0.25, float(i % 7)]}}
                                 for i, k in enumerate(keys[n:n + 100])])
    pages = []
    s3v.meta.events.register("after-call.s3vectors.ListVectors",
                             lambda parsed, **_: pages.append(len(parsed.get("vectors", []))))

    found = keyset.index_keys(keyset.fast_keys_client(s3v) if lean else s3v, world.vector_bucket, world.vector_index)

    assert len(pages) > 2 * keyset.MAX_SEGMENTS and max(pages) < 400 / keyset.MAX_SEGMENTS  # several pages each
    assert len(found) == 405 and found.foreign == {f"manual-{i}" for i in range(5)}
    assert all(k in found for k in keys)
    assert not found.contains([os.urandom(16) for _ in range(50)]).any()


def test_a_list_vectors_error_still_raises_with_the_lean_client(world):
    s3v = keyset.fast_keys_client(world.client("s3vectors"))
    with pytest.raises(s3v.exceptions.NotFoundException):
        keyset.index_keys(s3v, "no-such-bucket", "no-such-index", segments=2)


def test_a_list_vectors_page_is_read_the_same_on_either_path():
    """A compact page of 32-hex-digit keys is cut out with regular expressions; any other page goes through orjson,
    and both give the same keys and token."""
    keys = [naming.vector_key(f"s3://bucket/img-{i}.jpg") for i in range(5)]

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


# ------------------------------------------------------------------------ the lean reader against botocore's


class _Body:
    """The raw stream of a stubbed HTTP answer."""

    def __init__(self, data: bytes):
        self.data = data

    def stream(self, **_):
        yield self.data


def _client_answering(body: bytes, lean: bool):
    """An s3vectors client whose ListVectors gets `body` as its HTTP answer: botocore parses it (or our reader, on a
    lean client) exactly as it would parse the service's."""
    import boto3
    from botocore.awsrequest import AWSResponse

    s3v = boto3.client("s3vectors", region_name="us-east-1", endpoint_url="https://s3vectors.invalid",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    s3v.meta.events.register(
        "before-send.s3vectors.ListVectors",
        lambda request, **_: AWSResponse(request.url, 200, {"Content-Type": "application/json"}, _Body(body)))
    return keyset.fast_keys_client(s3v) if lean else s3v


def _what_index_keys_takes(body: bytes, lean: bool) -> tuple[dict, set[str], str | None]:
    """The page as the client gives it, and what index_keys makes of it: its keys as text and the next token."""
    page = _client_answering(body, lean).list_vectors(vectorBucketName="bucket", indexName="index")
    packed, foreign = bytearray(), set()
    token = keyset.page_keys(page, packed, foreign)
    keys = {bytes(packed[i:i + 16]).hex() for i in range(0, len(packed), 16)} | foreign
    return page, keys, token


def _standin_pages() -> list[bytes]:
    """The ListVectors answers of our S3 Vectors stand-in, as it sends them (two pages)."""
    from werkzeug.test import Client

    from tests.standins.s3vectors import make_app

    client = Client(make_app(options={"vectors_per_second": 0, "requests_per_second": 0}))

    def call(operation: str, **body) -> bytes:
        answer = client.post(f"/{operation}", data=orjson.dumps(body), content_type="application/json")
        assert answer.status_code == 200, answer.data
        return answer.data

    call("CreateVectorBucket", vectorBucketName="bucket")
    call("CreateIndex", vectorBucketName="bucket", indexName="index", dataType="float32", dimension=2,
         distanceMetric="cosine")
    keys = [naming.vector_key(f"s3://b/{i}.jpg") for i in range(7)]
    call("PutVectors", vectorBucketName="bucket", indexName="index",
         vectors=[{"key": k, "data": {"float32": [1.0, float(i)]}} for i, k in enumerate(keys)])
    first = call("ListVectors", vectorBucketName="bucket", indexName="index", maxResults=4)
    last = call("ListVectors", vectorBucketName="bucket", indexName="index", maxResults=4,
                nextToken=orjson.loads(first)["nextToken"])
    return [first, last]


HEX = [naming.vector_key(f"s3://bucket/2024/img-{i}.jpg") for i in range(4)]
STANDIN = _standin_pages()


def _compact(vectors, **rest) -> bytes:
    return orjson.dumps({"vectors": vectors, **rest})


# (name, body, whether the fast path must read it: the compact pages the stand-in, like the service, sends)
PAGES = [
    ("the stand-in's page", STANDIN[0], True),
    ("the stand-in's last page", STANDIN[1], True),
    ("compact", _compact([{"key": k} for k in HEX], nextToken="tok_-=+/"), True),
    ("nextToken first", orjson.dumps({"nextToken": "tok", "vectors": [{"key": k} for k in HEX]}), False),
    ("pretty-printed", json.dumps({"vectors": [{"key": k} for k in HEX], "nextToken": "tok"}, indent=2).encode(),
     False),
    ("spaces after the separators", json.dumps({"vectors": [{"key": k} for k in HEX], "nextToken": "t"}).encode(),
     False),
    ("escapes in keys", b'{"vectors":[{"key":"' + HEX[0].encode() + b'"},{"key":"it\\"s"},{"key":"caf\\u00e9"},'
     b'{"key":"a\\/b"},{"key":"\\u0030' + HEX[1][1:].encode() + b'"}],"nextToken":"t"}', False),
    ("an escaped token", _compact([{"key": k} for k in HEX[:2]])[:-1] + b',"nextToken":"a\\/b\\u002b"}', False),
    ("hex keys and others", _compact([{"key": HEX[0]}, {"key": "manual-1"}, {"key": HEX[1]}, {"key": "x" * 32},
                                      {"key": HEX[2][:31]}, {"key": HEX[3] + "0"}]), False),
    ("upper-case hex", _compact([{"key": HEX[0]}, {"key": HEX[1].upper()}, {"key": "ABCDEF" * 5 + "AB"}]), False),
    ("an empty page", b'{"vectors":[]}', True),
    ("only a token", b'{"nextToken":"tok"}', False),
    ("an empty token", _compact([{"key": k} for k in HEX], nextToken=""), True),
    ("an empty page with a token", b'{"vectors":[],"nextToken":"tok"}', True),
    ("with data", _compact([{"key": HEX[0]}, {"key": HEX[1], "data": {"float32": [0.5, 1.0]}}]), False),
    ("with metadata", _compact([{"key": HEX[0], "metadata": {"key": HEX[2], "nextToken": "no"}}, {"key": HEX[1]}],
                               nextToken="tok"), False),
    ("metadata first", _compact([{"metadata": {"key": HEX[2]}, "key": "manual-2"}]), False),
]


@pytest.mark.parametrize("name, body, fast", PAGES, ids=[p[0] for p in PAGES])
def test_the_lean_reader_gives_what_botocores_parser_gives(name, body, fast):
    """The keys and the next token index_keys takes from a page are the same whether botocore parses it or our
    reader does, and the compact pages take the fast path (packedKeys)."""
    reference, keys, token = _what_index_keys_takes(body, lean=False)
    page, lean_keys, lean_token = _what_index_keys_takes(body, lean=True)
    assert (lean_keys, lean_token) == (keys, token)
    assert keys == {v["key"] for v in reference.get("vectors", [])}
    assert token == (reference.get("nextToken") or None)
    if fast:
        assert "packedKeys" in page and "vectors" not in page


def _meta(i: int, **extra) -> dict:
    return {"source_uri": f"s3://bucket/2024/img-{i}.jpg", "etag": f"{i:032x}", "size": 1000 + i, "job_id": "j",
            "embedded": "2026-12-01", **extra}


# ListVectors with returnMetadata, in the form the API reference documents (vectors: key, data, metadata), as the
# stand-in sends it, and in shapes the service may send as well.
METADATA_PAGES = [
    ("compact", _compact([{"key": HEX[i], "metadata": _meta(i)} for i in range(3)], nextToken="t")),
    ("token first, pretty", json.dumps({"nextToken": "t", "vectors": [{"metadata": _meta(i), "key": HEX[i]}
                                                                       for i in range(3)]}, indent=2).encode()),
    ("with data", _compact([{"key": HEX[0], "data": {"float32": [0.5, 1.0]}, "metadata": _meta(0)}])),
    ("escapes in the URI", b'{"vectors":[{"key":"' + HEX[1].encode() + b'","metadata":{"source_uri":'
     b'"s3:\\/\\/bucket\\/2024\\/caf\\u00e9 \\"1\\".jpg","etag":"ab-3","size":7}}]}'),
    ("a multipart ETag and no size", _compact([{"key": HEX[2], "metadata": {"source_uri": "s3://bucket/2024/x.jpg",
                                                                           "etag": "0f-3"}}])),
    ("no metadata", _compact([{"key": HEX[3]}, {"key": "manual-1", "metadata": _meta(9)}])),
]


@pytest.mark.parametrize("name, body", METADATA_PAGES, ids=[p[0] for p in METADATA_PAGES])
def test_what_the_mirror_reads_of_a_page_with_metadata_is_what_botocore_parses(name, body):
    """mirror.from_index reads ListVectors pages with metadata through the lean client: the vectors it hands on,
    and what mirror makes of them (each key's state and whether it is this prefix's), are botocore's."""
    from batch_embeddings import mirror

    reference = _client_answering(body, lean=False).list_vectors(vectorBucketName="bucket", indexName="index",
                                                                 returnMetadata=True)
    lean = _client_answering(body, lean=True).list_vectors(vectorBucketName="bucket", indexName="index", returnMetadata=True)
    assert lean.get("vectors", []) == reference.get("vectors", [])
    assert (lean.get("nextToken") or None) == (reference.get("nextToken") or None)
    prefix = "s3://bucket/2024/"
    assert mirror._parse(lean.get("vectors", []), prefix) == mirror._parse(reference.get("vectors", []), prefix)
