"""A vector the index refuses (400 ValidationException for the whole PutVectors request) is left out and reported;
the rest of its request is loaded, and the load goes on: in the sender, and through step 3 as a process."""

from __future__ import annotations

import json
import math
import random
import urllib.request

import pytest

import common
from batch_embeddings import naming, pacing, vectors
from tests.sending import FakeClock

MESSAGE = "Filterable metadata must have at most 2048 bytes"


def named(key: str) -> str:
    return f"Invalid record for key '{key}': {MESSAGE}"


# ------------------------------------------------------------------------------------------ the message


@pytest.mark.parametrize("message, keys, expected", [
    (named("b"), ["a", "b", "c"], 1),
    (named("it's"), ["it", "it's", "s"], 1),  # a quote in the key: the longest span that is a key
    (named("a': x"), ["a", "a': x"], 1),
    (named("x") + " (metadata key 'y' is too long)", ["y", "x"], 1),  # other words quoted after the key
    ("Invalid record for key \"d\": bad", ["d"], 0),
    ("invalid record for KEY 'e' rejected", ["e"], 0),
    ("Invalid record for key 'it\\'s': bad", ["it's"], 0),  # a quote escaped in the message
    (named("gone"), ["a", "b"], None),  # a key that is not in the request
    (f"Invalid record: {MESSAGE}", ["a", "b"], None),
    ("1 validation error: vectors[3].key", ["a", "b"], None),
    ("Invalid record for key '", ["a"], None),
])
def test_the_vector_a_message_names_is_found_among_the_requests_keys(message, keys, expected):
    assert pacing.refused_position(message, keys) == expected


# ------------------------------------------------------------------------------------------ the sender


def parts(n: int, dimension: int = 8, seed: int = 5) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        values = [rng.gauss(0, 1) for _ in range(dimension)]
        norm = math.sqrt(sum(v * v for v in values))
        key = f"k{i:04d}"
        out.append((key, vectors.encode_vector(key, [v / norm for v in values], dimension,
                                               {"source_uri": f"s3://images/{key}.png", "job_id": "j"})))
    return out


def send(client, items, per_request: int):
    """Send (key, part) pairs in requests of `per_request`; returns (the sender, the batches done)."""
    done = []
    clock = FakeClock()
    sender = pacing.PutVectorsSender(client, "bucket", "index", pacing.RateLimiter(1e6, 1e4), threads=2,
                                      on_done=done.append, sleep=clock.sleep, clock=clock)
    batcher = vectors.Batcher("bucket", "index", max_vectors=per_request)
    try:
        for key, part in items:
            if (batch := batcher.add(part, dict, key)) is not None:
                sender.submit(batch)
        sender.submit(batcher.flush({}))
    finally:
        sender.close()
    return sender, done


def index_stats(app) -> dict:
    return app.snapshot_stats()["indexes"]["bucket/index"]


def stored(client) -> set[str]:
    keys, token = set(), None
    while True:
        page = client.list_vectors(vectorBucketName="bucket", indexName="index",
                                   **({"nextToken": token} if token else {}))
        keys |= {v["key"] for v in page["vectors"]}
        token = page.get("nextToken")
        if not token:
            return keys


@pytest.mark.parametrize("unnamed", [False, True])
def test_a_refused_vector_is_left_out_and_the_rest_of_its_request_loaded(index_endpoint, unnamed):
    app, client = index_endpoint.app, index_endpoint.client
    app.configure(refuse_keys=["k0042", "k0170"], refused_keys_unnamed=unnamed)
    items = parts(200)
    sender, done = send(client, items, per_request=100)
    assert stored(client) == {key for key, _ in items} - {"k0042", "k0170"}
    refused = sorted(vector for batch in done for vector in batch.refused)
    assert [(v.key, v.source_uri) for v in refused] == [("k0042", "s3://images/k0042.png"),
                                                         ("k0170", "s3://images/k0170.png")]
    expected = f"Invalid record: {MESSAGE}" if unnamed else named("k0042")
    assert refused[0].message == expected
    by_seq = {batch.seq: batch for batch in done}
    assert [by_seq[0].count, by_seq[1].count] == [99, 99]  # what the index holds, for the checkpoint
    assert "k0042" not in by_seq[0].keys and len(by_seq[0].keys) == 99
    stats = index_stats(app)
    assert stats["put_vectors_accepted"] == 198 and sender.stats["refused"] == 2
    if unnamed:  # halves down to the vector: one refused request a level, log2(100) levels at most
        assert 2 * 2 <= stats["rejected_validation"] <= 2 * (1 + math.ceil(math.log2(100)))
        assert stats["put_requests_accepted"] <= 2 * math.ceil(math.log2(100))
    else:  # the named vector out, the rest sent again at once
        assert stats["rejected_validation"] == 2 and stats["put_requests_accepted"] == 2


def test_every_named_vector_of_a_request_is_left_out_one_after_the_other(index_endpoint):
    app, client = index_endpoint.app, index_endpoint.client
    app.configure(refuse_keys=["k0003", "k0004", "k0009"])
    sender, done = send(client, parts(10), per_request=10)
    assert stored(client) == {f"k{i:04d}" for i in range(10)} - {"k0003", "k0004", "k0009"}
    assert sorted(v.key for v in done[0].refused) == ["k0003", "k0004", "k0009"] and done[0].count == 7
    assert index_stats(app)["rejected_validation"] == 3


def test_a_lone_vector_the_index_refuses_is_that_vectors_failure(index_endpoint):
    client = index_endpoint.client
    part = vectors.encode_vector("short", [0.5] * 4, 4, {"source_uri": "s3://images/short.png"})  # index: 8
    sender, done = send(client, [("short", part)], per_request=10)
    assert [(v.key, v.source_uri) for v in done[0].refused] == [("short", "s3://images/short.png")]
    assert "dimensions" in done[0].refused[0].message and done[0].count == 0 and done[0].keys == []


def test_a_request_refused_for_every_vector_stops_the_load_after_a_bounded_search(index_endpoint):
    """Not one vector's trouble (here: every vector has the wrong dimension, and the message names none): the load
    stops with the index's message instead of reporting every image, after at most 2n - 1 requests."""
    app, client = index_endpoint.app, index_endpoint.client
    items = [(key, vectors.encode_vector(key, [0.5] * 4, 4, {})) for key in ("a", "b", "c", "d", "e")]
    with pytest.raises(common.StepError) as stopped:
        send(client, items, per_request=5)
    assert "refused every vector of a request of 5" in str(stopped.value)
    assert "vector has 4 dimensions, the index has 8" in str(stopped.value)
    assert index_stats(app)["rejected_validation"] <= 2 * 5 - 1 and stored(client) == set()


# ------------------------------------------------------------------------------------------ step 3


def control(url: str, options: dict) -> None:
    request = urllib.request.Request(url + "/_standin/config", data=json.dumps(options).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request).read()


def index_stats_of(world) -> dict:
    with urllib.request.urlopen(world.stack.s3vectors_url + "/_standin/stats") as response:
        return json.loads(response.read())["indexes"][f"{world.vector_bucket}/{world.vector_index}"]


@pytest.mark.parametrize("unnamed", [False, True], ids=["key named", "no key named"])
def test_step_3_loads_around_a_refused_image_and_a_rerun_does_not_stop_on_it(world, unnamed):
    uris = world.put_images([f"p/img-{i:04d}.png" for i in range(300)], prefix="2024/")
    assert world.step(1).returncode == 0
    assert world.step(2, "--wait", "--interval", "0.1", "--timeout", "120").returncode == 0
    bad = uris[137]
    url = world.stack.s3vectors_url
    control(url, {"refuse_keys": [naming.vector_key(bad)], "refused_keys_unnamed": unnamed})
    job_id = world.job_info()["jobs"][0]["job_id"]

    def report() -> list[str]:
        lines = (world.run_dir() / f"load_report_{job_id}.jsonl").read_text().splitlines()
        return [json.loads(line)["source_uri"] for line in lines]

    try:
        loaded = world.step(3)
        stats, account, reported = index_stats_of(world), world.account(), report()
        again = world.step(3)  # the index still refuses it
        after, account_again, reported_again = index_stats_of(world), world.account(), report()
    finally:
        control(url, {"refuse_keys": None, "refused_keys_unnamed": False})

    out = loaded.stdout
    assert loaded.returncode == common.EXIT_INCOMPLETE, out + loaded.stderr
    assert world.index_keys() == {naming.vector_key(uri) for uri in uris if uri != bad}
    message = f"Invalid record: {MESSAGE}" if unnamed else named(naming.vector_key(bad))
    assert f"! S3 Vectors refused the vector of {bad}: {message}" in out
    assert f"  {bad}: failed (ValidationException: S3 Vectors refused the vector: {message})" in out
    assert "Successful: 299" in out and "Errors: 1" in out and "Vectors Inserted: 299" in out
    assert "Images loaded: 299, failed: 1, missing: 0" in out
    assert [(e["source_uri"], e["status"], e["error_code"]) for e in account] == \
        [(bad, "failed", "ValidationException")]
    assert account[0]["error_message"] == f"S3 Vectors refused the vector: {message}"
    assert reported == [bad]
    assert stats["put_vectors_accepted"] == 299
    if unnamed:
        assert stats["rejected_validation"] <= 1 + math.ceil(math.log2(300))
        assert stats["put_requests_accepted"] <= math.ceil(math.log2(300))
    else:
        assert stats["rejected_validation"] == 1 and stats["put_requests_accepted"] == 1

    # The checkpoint moved past it: the next run sends nothing again, names the image again and exits 4 again.
    assert again.returncode == common.EXIT_INCOMPLETE, again.stdout + again.stderr
    assert after["put_vectors_accepted"] == 299 and after["rejected_validation"] == stats["rejected_validation"]
    assert f"  {bad}: failed (ValidationException: S3 Vectors refused the vector: {message})" in again.stdout
    assert "Images loaded: 299, failed: 1, missing: 0" in again.stdout and "Errors: 1" in again.stdout
    assert account_again == account and reported_again == [bad]  # written once, not once a run
