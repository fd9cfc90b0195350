"""Step 3's loading machinery: request packing, pacing and backoff, streaming, and resuming after a kill."""

from __future__ import annotations

import io
import json
import math
import random
import signal
import subprocess
import sys
import threading
import time
import types
import urllib.request

import orjson
import pytest

import common
from batch_embeddings import pacing, streams, vectors
from tests.conftest import ROOT, STEPS
from tests.sending import FakeClock, send_parts


def unit_vector(rng: random.Random, dimension: int) -> list[float]:
    values = [rng.gauss(0, 1) for _ in range(dimension)]
    norm = math.sqrt(sum(v * v for v in values))
    return [v / norm for v in values]


# ---------------------------------------------------------------------------------------------------- encoding


def test_encode_vector_is_float32_json_with_metadata():
    part = vectors.encode_vector("k1", [0.1, -0.25, 1e-8], 3, {"source_uri": "s3://b/中文 a+b.jpg"})
    decoded = orjson.loads(part)
    assert decoded["key"] == "k1" and decoded["metadata"] == {"source_uri": "s3://b/中文 a+b.jpg"}
    assert decoded["data"]["float32"] == [0.1, -0.25, 1e-8]  # float32 shortest text reads back as the float32


@pytest.mark.parametrize("values, reason", [
    ([0.1, 0.2], "2 values"),
    ([0.1, float("nan"), 0.3], "NaN"),
    ([0.1, float("inf"), 0.3], "NaN or infinite"),
    ([0.0, 0.0, 0.0], "all zeros"),
])
def test_encode_vector_refuses_what_the_index_refuses(values, reason):
    with pytest.raises(vectors.VectorError, match=reason):
        vectors.encode_vector("k", values, 3, {})


# ---------------------------------------------------------------------------------------------------- batching


def pack(parts, **limits):
    batcher = vectors.Batcher("bucket", "index", **limits)
    batches = [b for i, p in enumerate(parts) if (b := batcher.add(p, lambda i=i: {"i": i})) is not None]
    batches.append(batcher.flush({"i": len(parts)}))
    return batches


def test_500_vectors_of_3072_dimensions_fit_one_request_under_20_mib():
    rng = random.Random(7)
    parts = [vectors.encode_vector(f"key-{i:05d}", unit_vector(rng, 3072), 3072,
                                   {"source_uri": f"s3://bucket/2024/photos/image-{i:05d}.jpg", "job_id": "abc"})
             for i in range(1000)]
    batches = pack(parts)
    assert [b.count for b in batches] == [500, 500]
    for batch in batches:
        assert len(batch.body) <= vectors.MAX_REQUEST_BYTES
        body = orjson.loads(batch.body)
        assert body["vectorBucketName"] == "bucket" and body["indexName"] == "index"
        assert all(len(v["data"]["float32"]) == 3072 for v in body["vectors"])
    keys = [v["key"] for b in batches for v in orjson.loads(b.body)["vectors"]]
    assert keys == [f"key-{i:05d}" for i in range(1000)]


def test_batches_close_on_bytes_before_count():
    parts = [vectors.encode_vector(f"k{i}", [0.5] * 64, 64, {}) for i in range(50)]
    size = len(parts[0]) + 1
    batches = pack(parts, max_bytes=10 * size + 100)
    assert sum(b.count for b in batches) == 50
    assert max(b.count for b in batches) == 10
    assert all(len(b.body) <= 10 * size + 100 for b in batches)
    assert [b.seq for b in batches] == list(range(len(batches)))
    # a batch's mark is the position just before the vector that did not fit: where a resumed load starts
    assert [b.mark["i"] for b in batches[:-1]] == [10 * (n + 1) for n in range(len(batches) - 1)]


def test_a_vector_larger_than_a_request_is_refused():
    with pytest.raises(vectors.VectorError, match="more than a request may hold"):
        pack([b"x" * 1000], max_bytes=500)


# ---------------------------------------------------------------------------------------------------- streaming


def test_read_lines_gives_offsets_across_chunks_and_a_last_line_without_newline():
    data = b'{"a":1}\n{"b":22}\n\n{"c":333}'
    lines = list(streams.read_lines(io.BytesIO(data), chunk_size=3))
    assert lines == [(b'{"a":1}', 0, 8), (b'{"b":22}', 8, 17), (b"", 17, 18), (b'{"c":333}', 18, 27)]
    assert all(data[start:end].rstrip(b"\n") == line for line, start, end in lines)
    resumed = list(streams.read_lines(io.BytesIO(data[17:]), start=17, chunk_size=4))
    assert resumed == lines[2:]


# ---------------------------------------------------------------------------------------------------- pacing


def test_rate_limiter_paces_vectors_and_backs_off_after_throttling():
    clock = FakeClock()
    limiter = pacing.RateLimiter(2500, 1000, clock=clock, sleep=clock.sleep)
    for _ in range(50):
        limiter.acquire(500)
    assert clock.now == pytest.approx(50 * 500 / 2500 - 1.0)  # 25,000 vectors at 2,500/s, a second's worth at once
    limiter.throttled()
    assert limiter.rate == pytest.approx(1875)
    start = clock.now
    limiter.acquire(500)
    limiter.acquire(500)
    assert clock.now - start >= 500 / 2500  # slower after the 429
    clock.now += 60
    limiter.acquire(1)
    assert limiter.rate == pytest.approx(2500)  # and back to the quota after a quiet minute


def test_a_stray_429_costs_the_pacer_a_fraction_of_a_second():
    """After a cut the rate climbs back to where it was throttled within two seconds, quickly at first (CUBIC, as
    the AWS SDKs' adaptive retry mode): one 429 in a load at the quota costs ≈ 0.16 s, not the ≈ 0.75 s a recovery
    of 5 % a second cost."""
    def load(throttle_at: set[int]) -> float:
        clock = FakeClock()
        limiter = pacing.RateLimiter(2500, 1000, clock=clock, sleep=clock.sleep)
        for i in range(100):  # 50,000 vectors at 2,500/s: 19 s after the first second's burst
            limiter.acquire(500)
            if i in throttle_at:
                limiter.throttled()
        return clock.now

    assert load(set()) == pytest.approx(19.0)
    assert 19.05 < load({10}) < 19.0 + 0.25
    assert load({10, 30}) < 19.0 + 0.5


def test_the_rate_climbs_back_quickly_then_probes_past_the_rate_it_was_throttled_at():
    clock = FakeClock()
    limiter = pacing.RateLimiter(2500, 1000, clock=clock, sleep=clock.sleep)
    limiter.acquire(1)
    clock.now += 0.1
    limiter.throttled()  # cut from 2,500
    clock.now += 0.1
    limiter.throttled()  # a request reserved after the first cut: cut from ≈ 1,875
    cut_from = 2500 * (1 + 0.25 * (0.1 / 2 - 1) ** 3)
    assert limiter.rate == pytest.approx(0.75 * cut_from)
    rate_after = []
    for seconds in (1, 1, 1, 1, 10):
        clock.now += seconds
        limiter.acquire(1)
        rate_after.append(limiter.rate)
    assert rate_after[0] == pytest.approx(cut_from * (1 - 0.25 / 8))  # most of the way back after one second
    assert rate_after[1] == pytest.approx(cut_from)  # back after two
    assert rate_after[2] == pytest.approx(cut_from * (1 + 0.25 / 8))  # then slowly past it
    assert rate_after[3] == pytest.approx(cut_from * 1.25)
    assert rate_after[4] == 2500  # never past the quota it was given


def test_a_limit_met_again_and_again_is_climbed_back_to_more_slowly():
    """A 429 met again on the way back (a quota shared with another writer, or smaller than the pacer was told)
    doubles the time to climb back, up to 16 s; a stray 429 after a quiet spell climbs back in 2 s again."""
    clock = FakeClock()
    limiter = pacing.RateLimiter(2500, 1000, clock=clock, sleep=clock.sleep)
    limiter.throttled()
    assert limiter.recover == 2
    for expected in (4, 8, 16, 16):
        clock.now += limiter.recover * 0.75  # on the way back, above the rate of the cut before
        limiter.throttled()
        assert limiter.recover == expected
    clock.now += 0.1
    limiter.throttled()  # right after a cut: still too fast, cut again without slowing the climb
    assert limiter.recover == 16
    clock.now += 40
    limiter.throttled()
    assert limiter.recover == 2


def test_a_shared_quota_is_found_with_few_429s():
    """Told 2,500 vectors/s, granted 1,250 (a token bucket of one second, as the stand-in's quota): four minutes of
    500-vector requests, each 429 followed by the sender's mean first backoff. The pacer runs near the granted rate
    and meets a 429 every ten seconds or so (43 with a recovery of 5 % a second, 128 if the climb never slowed)."""
    clock = FakeClock()
    limiter = pacing.RateLimiter(2500, 1000, clock=clock, sleep=clock.sleep)
    tokens, filled = 1250.0, 0.0
    sent = throttled = 0
    while clock.now < 240:
        reserved = limiter.acquire(500)
        tokens, filled = min(1250.0, tokens + (clock.now - filled) * 1250), clock.now
        if tokens >= 500:
            tokens -= 500
            sent += 500
        else:
            throttled += 1
            limiter.throttled(reserved)
            clock.sleep(0.375)
    assert sent / clock.now > 0.95 * 1250
    assert throttled <= 30


def test_429s_of_requests_paced_before_a_cut_cut_the_rate_once():
    clock = FakeClock()
    limiter = pacing.RateLimiter(2500, 1000, clock=clock, sleep=clock.sleep)
    reserved = [limiter.acquire(500) for _ in range(4)]  # four requests in flight
    clock.now += 0.2
    for at in reserved:  # all four answered 429
        limiter.throttled(at)
    assert limiter.rate == pytest.approx(1875)
    clock.now += 0.01
    later = limiter.acquire(500)
    clock.now += 0.2
    limiter.throttled(later)  # paced at the lower rate and throttled still: cut again
    assert limiter.rate == pytest.approx(0.75 * limiter.cut_from) and limiter.rate < 0.9 * 1875


def test_the_sender_tells_the_pacer_when_a_throttled_request_was_paced():
    """Three requests in flight, all answered 429: the pacer cuts once, not three times."""
    from botocore.exceptions import ClientError

    clock = FakeClock()
    limiter = pacing.RateLimiter(2500, 1000, clock=clock, sleep=clock.sleep)
    in_flight = threading.Barrier(3)
    calls = []

    class Client:
        meta = types.SimpleNamespace(events=types.SimpleNamespace(register=lambda *a, **k: None))

        def put_vectors(self, **_):
            calls.append(1)
            if len(calls) <= 3:
                in_flight.wait(timeout=30)  # all three paced before any answer
                clock.now += 0.1
                raise ClientError({"Error": {"Code": "TooManyRequestsException", "Message": "slow down"},
                                   "ResponseMetadata": {"HTTPStatusCode": 429}}, "PutVectors")
            return {}

    sender = pacing.PutVectorsSender(Client(), "bucket", "index", limiter, threads=3, on_done=lambda b: None,
                                      sleep=lambda s: None, clock=clock)
    batcher = vectors.Batcher("bucket", "index", max_vectors=1)
    for i in range(3):
        batcher.add(vectors.encode_vector(f"k{i}", [0.5] * 4, 4, {}), dict)
        sender.submit(batcher.flush({}))
    sender.close()
    assert sender.stats["throttled"] == 3 and len(calls) == 6
    assert limiter.cut_from == 2500 and limiter.rate > 0.75 * 2500 * 0.99  # one cut


def test_rate_limiter_respects_requests_per_second():
    clock = FakeClock()
    limiter = pacing.RateLimiter(1e9, 10, clock=clock, sleep=clock.sleep)
    for _ in range(10):
        limiter.acquire(1)
    assert clock.now == 0  # a second's worth of requests at once
    for _ in range(11):
        limiter.acquire(1)
    assert clock.now == pytest.approx(1.1)


# ---------------------------------------------------------------------------------------------------- sending


def control(url, path, payload=None):
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url + path, data=data, method="POST" if data else "GET")
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())


def test_every_vector_lands_once_when_a_third_of_the_requests_fail(index_endpoint):
    url, client = index_endpoint.url, index_endpoint.client
    control(url, "/_standin/config", {"fault_rate": 0.3, "seed": 3})
    rng = random.Random(1)
    parts = [vectors.encode_vector(f"k{i:04d}", unit_vector(rng, 8), 8, {"n": i}) for i in range(1000)]
    sender, done = send_parts(client, parts, pacing.RateLimiter(1e6, 1e4), threads=3)
    stats = control(url, "/_standin/stats")["indexes"]["bucket/index"]
    assert stats["rejected_fault_429"] > 0 and stats["rejected_fault_503"] > 0
    assert stats["vectors"] == 1000 and stats["put_vectors_accepted"] == 1000  # each once, none dropped
    assert sender.stats["retries"] == stats["rejected_fault"]
    assert sorted(b.seq for b in done) == list(range(40))


def test_throttling_by_the_index_is_absorbed(index_endpoint):
    url, client = index_endpoint.url, index_endpoint.client
    control(url, "/_standin/config", {"vectors_per_second": 400, "requests_per_second": 1000})
    rng = random.Random(2)
    parts = [vectors.encode_vector(f"k{i:04d}", unit_vector(rng, 8), 8, {}) for i in range(600)]
    sender, _ = send_parts(client, parts, pacing.RateLimiter(4000, 1000), threads=3)  # told a quota 10x the real one
    stats = control(url, "/_standin/stats")["indexes"]["bucket/index"]
    assert stats["rejected_quota"] > 0 and sender.stats["throttled"] == stats["rejected_quota"]
    assert stats["vectors"] == 600 and stats["put_vectors_accepted"] == 600


def test_a_request_the_index_refuses_for_every_vector_stops_the_load_with_its_error(index_endpoint):
    client = index_endpoint.client
    parts = [vectors.encode_vector(f"k{i}", [0.5] * 4, 4, {}) for i in range(3)]  # the index takes 8 dimensions
    with pytest.raises(common.StepError) as raised:
        send_parts(client, parts, pacing.RateLimiter(1e6, 1e4), threads=3)
    assert "ValidationException: vectors[0]: vector has 4 dimensions, the index has 8" in str(raised.value)


# ---------------------------------------------------------------------------------------------------- resuming


@pytest.mark.parametrize("workers", ["0", "2"])  # lines examined in this process, or handed to worker processes
def test_killed_mid_load_it_resumes_after_the_last_confirmed_batch(world, workers):
    world.put_images([f"p/img-{i:04d}.png" for i in range(1500)], prefix="2024/")
    assert world.step(1).returncode == 0
    assert world.step(2, "--wait", "--interval", "0.1", "--timeout", "120").returncode == 0
    info_file = world.cwd / "batch_job_info.json"
    index = f"{world.vector_bucket}/{world.vector_index}"
    # The index takes 600 vectors, then answers 429 until told otherwise: the load stands still there, however
    # slow the machine, and is killed while it retries.
    control(world.stack.s3vectors_url, "/_standin/config", {"hold_beyond_vectors": 600})
    step = [sys.executable, str(ROOT / STEPS[3]), "--vectors-per-second", "400", "--workers", workers]
    process = subprocess.Popen(step, cwd=world.cwd, env=world.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            held = control(world.stack.s3vectors_url, "/_standin/stats")["indexes"].get(index, {})
            load = json.loads(info_file.read_text())["jobs"][0].get("load", {})
            if held.get("rejected_held_429") and load.get("counts", {}).get("inserted") == held["vectors"]:
                break  # held, and every vector the index took is in the checkpoint
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        control(world.stack.s3vectors_url, "/_standin/config", {"hold_beyond_vectors": None})
    confirmed = json.loads(info_file.read_text())["jobs"][0]["load"]["counts"]["inserted"]
    assert 0 < confirmed <= 600

    resumed = world.step(3, "--workers", workers)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"Resuming: {confirmed} vectors already confirmed" in resumed.stdout
    assert ("worker processes" in resumed.stdout) == (workers != "0")
    assert "Vectors Inserted: 1500" in resumed.stdout and "Total Records Processed: 1500" in resumed.stdout
    stats = control(world.stack.s3vectors_url, "/_standin/stats")["indexes"][index]
    assert stats["vectors"] == 1500
    assert stats["put_vectors_accepted"] == 1500  # only what was not confirmed is sent again: nothing twice


def test_lines_read_in_worker_processes_load_the_same_vectors(world):
    uris = world.put_images([f"p/img-{i:04d}.png" for i in range(300)], prefix="2024/")
    assert world.step(1).returncode == 0
    assert world.step(2, "--wait", "--interval", "0.1", "--timeout", "120").returncode == 0
    s3v = world.client("s3vectors")

    def stored() -> dict[str, list[float]]:
        keys = sorted(world.index_keys())
        found = {}
        for n in range(0, len(keys), 100):
            for v in s3v.get_vectors(vectorBucketName=world.vector_bucket, indexName=world.vector_index,
                                     keys=keys[n:n + 100], returnData=True, returnMetadata=True)["vectors"]:
                found[v["key"]] = (v["data"]["float32"], v["metadata"]["source_uri"])
        return found

    pooled = world.step(3, "--workers", "2")
    assert pooled.returncode == 0, pooled.stdout + pooled.stderr
    assert "Output lines are read in 2 worker processes" in pooled.stdout
    first = stored()
    assert len(first) == 300 and {uri for _, uri in first.values()} == set(uris)

    again = world.step(3, "--reload", "--workers", "0")
    assert again.returncode == 0 and "worker processes" not in again.stdout
    assert stored() == first
