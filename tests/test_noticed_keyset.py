"""01's set of keys already in the index, fed keys that another tool wrote: keys of another length or in
upper-case hex are that tool's, never taken for the key 01 gives an image (which would leave the image out)."""

from __future__ import annotations

import orjson
import pytest

from batch_embeddings import keyset, naming

OURS = [naming.vector_key(f"s3://bucket/img-{i}.jpg") for i in range(3)]


def from_page(page: dict) -> keyset.KeySet:
    packed, foreign = bytearray(), set()
    assert keyset.page_keys(page, packed, foreign) is None
    return keyset.KeySet(packed, foreign)


def from_body(body: bytes) -> keyset.KeySet:
    """A ListVectors answer as the lean client reads it."""
    response, parsed = {"status_code": 200, "body": body}, {}
    keyset._parse_keys(response, parsed)
    return from_page(parsed)


def test_shorter_hex_keys_on_a_page_are_kept_as_they_are():
    halves = ["0123456789abcdef", "fedcba9876543210"]  # together as long as one of our keys
    for keys in (OURS + halves, halves + OURS, [OURS[0], "ab", "cd" * 15, OURS[1]]):
        found = from_page({"vectors": [{"key": k} for k in keys]})
        assert len(found) == len(keys)
        assert all(k in found for k in keys)
        assert found.foreign == {k for k in keys if k not in OURS}
        joined = bytes.fromhex("".join(k for k in keys if k not in OURS)[:32].ljust(32, "0"))
        assert not found.contains([joined])[0]
        assert found.contains([bytes.fromhex(k) for k in keys if k in OURS]).all()


def test_a_longer_hex_key_on_a_page_is_kept_as_it_is():
    longer = "ab" * 17
    found = from_page({"vectors": [{"key": k} for k in [OURS[0], longer]]})
    assert found.foreign == {longer} and longer in found and len(found) == 2


@pytest.mark.parametrize("read", ["page", "body", "text"])
def test_upper_case_hex_keys_are_another_tools(read):
    uri = "s3://bucket/photo.jpg"
    upper = naming.vector_key(uri).upper()
    keys = [upper, OURS[0]]
    if read == "page":
        found = from_page({"vectors": [{"key": k} for k in keys]})
    elif read == "body":
        found = from_body(orjson.dumps({"vectors": [{"key": k} for k in keys]}))
    else:
        found = keyset.KeySet.of(keys)
    assert not found.contains([keyset.digest(uri)])[0]  # 01 embeds the image: its own key is not in the index
    assert naming.vector_key(uri) not in found
    assert upper in found and found.foreign == {upper}
    assert found.contains([keyset.digest("s3://bucket/img-0.jpg")])[0]


def test_a_page_of_upper_case_keys_only():
    upper = [k.upper() for k in OURS]
    for found in (from_body(orjson.dumps({"vectors": [{"key": k} for k in upper]})),
                  from_page({"vectors": [{"key": k} for k in upper]})):
        assert found.foreign == set(upper)
        assert not found.contains([bytes.fromhex(k) for k in OURS]).any()


class SegmentedIndex:
    """ListVectors of an index whose keys are split into segments, `per_page` keys a page."""

    def __init__(self, keys: list[str], per_page: int):
        self.keys, self.per_page, self.asked = keys, per_page, []

    def list_vectors(self, vectorBucketName, indexName, maxResults, segmentCount, segmentIndex, nextToken=None):
        self.asked.append((vectorBucketName, indexName, maxResults, segmentCount, segmentIndex, nextToken))
        mine = [k for i, k in enumerate(self.keys) if i % segmentCount == segmentIndex]
        start = int(nextToken or 0)
        page = {"vectors": [{"key": k} for k in mine[start:start + self.per_page]]}
        if start + self.per_page < len(mine):
            page["nextToken"] = str(start + self.per_page)
        return page


@pytest.mark.parametrize("segments", [1, 3, keyset.MAX_SEGMENTS])
def test_index_keys_reads_every_page_of_every_segment(segments):
    ours = [naming.vector_key(f"s3://bucket/img-{i}.jpg") for i in range(200)]
    others = ["manual-1", "AB" * 16]
    index = SegmentedIndex(ours + others + ours[:5], per_page=7)  # a key listed twice is counted once
    found = keyset.index_keys(index, "vectors", "images", segments=segments)
    assert len(found) == 202 and found.foreign == set(others)
    assert found.contains([bytes.fromhex(k) for k in ours]).all()
    assert {a[:4] for a in index.asked} == {("vectors", "images", keyset.PAGE, segments)}
    assert {a[4] for a in index.asked} == set(range(segments))
    assert not found.contains([keyset.digest("s3://bucket/not-there.jpg")])[0]
