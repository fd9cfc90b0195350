"""Step 3's fast paths and what S3 Vectors may answer: the embedding encoded from its text (the same float32 values
in the index as the parsed path), the request byte limit where it binds, throttling with a bounded number of 429s,
503 splitting, 402 and 403, and the progress display."""

from __future__ import annotations

import io
import json
import threading
import types
import urllib.request

import numpy as np
import orjson
import pytest
from werkzeug.test import Client

import common
from batch_embeddings import loading, naming, nova, pacing, vectors
from tests.sending import FakeClock, send_parts
from tests.standins import s3vectors


def stored(app, text_body: bytes, key: str) -> bytes:
    """The float32 bytes the S3 Vectors stand-in stores for one vector sent in a PutVectors body."""
    response = Client(app).post("/PutVectors", data=text_body)
    assert response.status_code == 200, response.get_data()
    return app.buckets["bucket"].indexes["index"].vectors[key][0].tobytes()


def index_app(dimension: int):
    app = s3vectors.make_app(options={"vectors_per_second": 0, "requests_per_second": 0})
    client = Client(app)
    assert client.post("/CreateVectorBucket", json={"vectorBucketName": "bucket"}).status_code == 200
    assert client.post("/CreateIndex", json={"vectorBucketName": "bucket", "indexName": "index",
                                            "dataType": "float32", "dimension": dimension,
                                            "distanceMetric": "cosine"}).status_code == 200
    return app


def request(part: bytes) -> bytes:
    head, tail = vectors.envelope("bucket", "index")
    return head + part + tail


rng = np.random.default_rng(5)
FLOAT32 = rng.standard_normal(8).astype(np.float32) / 3
TEXTS = {
    "float32 text": orjson.dumps(FLOAT32, option=orjson.OPT_SERIALIZE_NUMPY),
    "float32 values as float64 text": json.dumps([float(v) for v in FLOAT32]).encode(),
    "long float text": json.dumps([float(v) for v in rng.standard_normal(8)]).encode(),
    "more digits than float32, short": b"[0.1234567891,-0.9876543211,0.5,0.25,1.0000001,3,0.3333333333,-7]",
    "integers": b"[1,2,3,-4,5,16777217,0,7]",
    "exponents": b"[1e-8,1E5,-2.5e+3,3.4028235e38,1e-40,6.02e23,-1e-45,7E-1]",
    "negative zero": b"[-0.0,0.5,-0.0,0,0.0,-0,1.5,2]",
    "spaces": b"[0.1, -0.2,  0.3 ,0.4,0.5,0.6,0.7,0.8]",
    "an integer beyond 64 bits": b"[100000000000000000000,0,0,0,0,0,0,1]",
}


@pytest.mark.parametrize("name", TEXTS)
def test_the_text_path_stores_the_same_float32_as_the_parsed_path(name):
    text = TEXTS[name]
    metadata = {"source_uri": "s3://b/中文 a+b.jpg", "job_id": "j"}
    new = vectors.encode_text("k", text, 8, metadata)
    old = vectors.encode_vector("k", orjson.loads(text), 8, metadata)
    assert orjson.loads(new)["metadata"] == metadata and orjson.loads(new)["key"] == "k"
    assert stored(index_app(8), request(new), "k") == stored(index_app(8), request(old), "k")


def test_short_text_is_copied_and_long_text_reformatted_as_float32():
    values = np.random.default_rng(1).standard_normal(3072).astype(np.float32)
    short = orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY)
    long = json.dumps([float(v) for v in values]).encode()
    assert short in vectors.encode_text("k", short, 3072, {})  # as it is
    assert short in vectors.encode_text("k", long, 3072, {})  # re-formatted: the float32 text, not 22 bytes a value
    assert stored(index_app(3072), request(vectors.encode_text("k", long, 3072, {})), "k") == values.tobytes()


@pytest.mark.parametrize("text, reason", [
    (b"[0.1,0.2]", "2 values"),
    (b"[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9]", "9 values"),
    (b"[0.1,1e39,0.3,0.4,0.5,0.6,0.7,0.8]", "NaN or infinite"),  # beyond float32
    (b"[0,0,0,0,-0.0,0e5,0.0,0]", "all zeros"),
    (b"[1e-50,0,0,0,0,0,0,-1e-60]", "all zeros"),  # zero once float32
    (b"[null,0,0,0,0,0,0,1]", "not numbers"),
    (b'[[1],0,0,0,0,0,0,1]', "not numbers"),
])
def test_the_text_path_refuses_what_the_index_refuses(text, reason):
    with pytest.raises(vectors.VectorError, match=reason):
        vectors.encode_text("k", text, 8, {})


@pytest.mark.parametrize("text", [b"[NaN,0,0,0,0,0,0,1]", b"[Infinity,0,0,0,0,0,0,1]", b"[1e400,0,0,0,0,0,0,1]",
                                  b"[0.1,0.2"])
def test_text_that_is_not_json_is_refused(text):
    with pytest.raises(orjson.JSONDecodeError):
        vectors.encode_text("k", text, 8, {})


LONG_TEXTS = {  # 3072 values, where copying and re-formatting are decided by the text's length
    "float32 text": orjson.dumps(np.random.default_rng(2).standard_normal(3072).astype(np.float32),
                                 option=orjson.OPT_SERIALIZE_NUMPY),
    "float32 values as float64 text": json.dumps(
        [float(v) for v in np.random.default_rng(3).standard_normal(3072).astype(np.float32)]).encode(),
    "long float text": json.dumps(list(np.random.default_rng(4).standard_normal(3072))).encode(),
    "integers and exponents": b"[" + b",".join([b"1", b"-2e-3", b"16777217", b"-0", b"3.4028235E38"] * 614
                                               + [b"0"] * 2) + b"]",
    "digits beyond float64": b"[" + b",".join([b"0.1000000000000000055511151231257827021181583404541015625"] * 3072)
                             + b"]",
}


@pytest.mark.parametrize("name", [name for name in [*TEXTS, *LONG_TEXTS] if name != "an integer beyond 64 bits"])
def test_the_fast_path_reads_the_numbers_and_gives_the_reference_paths_bytes(name, monkeypatch):
    text, dimension = (TEXTS[name], 8) if name in TEXTS else (LONG_TEXTS[name], 3072)
    metadata = {"source_uri": "s3://b/a.png", "job_id": "j"}
    reference = vectors._encode_parsed_text("k", text, dimension, metadata)
    assert np.array_equal(vectors._numbers(text, dimension), np.asarray(orjson.loads(text), dtype=np.float64))

    def no_reference(*args):
        raise AssertionError("the reference path was taken")

    monkeypatch.setattr(vectors, "_encode_parsed_text", no_reference)
    assert vectors.encode_text("k", text, dimension, metadata) == reference


@pytest.mark.parametrize("text", [
    b"[0.1,0.2]",  # too few
    b"[NaN,0,0,0,0,0,0,1]", b"[1e400,0,0,0,0,0,0,1]", b"[0.1,0.2",  # not JSON
    b"[null,0,0,0,0,0,0,1]", b"[true,0,0,0,0,0,0,1]", b'["1",0,0,0,0,0,0,1]',  # not numbers
    b"[[1],0,0,0,0,0,0,1]", b"[1,[0],0,0,0,0,0,1]",  # nested: simdjson's buffer would flatten them
    b'{"a":[1,2,3,4,5,6,7,8]}',
    b"[100000000000000000000,0,0,0,0,0,0,1]",  # beyond 64 bits: orjson reads it as a float, simdjson refuses it
])
def test_what_the_fast_path_cannot_read_is_left_to_the_reference_path(text):
    assert vectors._numbers(text, 8) is None
    assert vectors._numbers(TEXTS["float32 text"], 8) is not None  # the parser reads the next line after a refusal


# ---------------------------------------------------------------------------------------------------- Loader.line


def output_line(embedding_text: bytes, uri="s3://src/2024/a.png", first=False, extra: bytes = b"") -> bytes:
    model_input = {"taskType": "SINGLE_EMBEDDING", "singleEmbeddingParams": {"image": {
        "format": "png", "source": {"s3Location": {"uri": uri, "bucketOwner": "111122223333"}}}}}
    out = b'{"embeddings": [{"embeddingType": "IMAGE", "embedding": ' + embedding_text + b"}]}"
    head = b'{"recordId": "R1", "modelInput": ' + orjson.dumps(model_input)
    if first:
        return b'{"modelOutput": ' + out + b', "recordId": "R1", "modelInput": ' + orjson.dumps(model_input) + extra + b"}"
    return head + extra + b', "modelOutput": ' + out + b"}"


def loader_for(dimension=8):
    batcher = vectors.Batcher("bucket", "index")
    report = io.BytesIO()
    return loading.Loader("job1", dimension, batcher, report, {}), batcher, report


@pytest.mark.parametrize("line", [
    output_line(TEXTS["long float text"]),
    output_line(TEXTS["float32 text"], first=True),
    output_line(TEXTS["exponents"], uri='s3://src/2024/"embedding": [1,2].png'),
    output_line(TEXTS["integers"], extra=b', "embedding": "not this one"'),
])
def test_loader_reads_the_vector_key_metadata_and_values_of_a_line(line):
    loader, batcher, report = loader_for()
    assert loader.line(line, "f", 0, len(line) + 1) is None
    record = orjson.loads(line)
    uri = nova.image_uri(record)
    sent = orjson.loads(batcher.flush({}).body)["vectors"]
    assert [v["key"] for v in sent] == [naming.vector_key(uri)]
    assert sent[0]["metadata"] == {"source_uri": uri, "job_id": "job1"}
    expected = np.asarray(record["modelOutput"]["embeddings"][0]["embedding"], np.float32)
    assert np.array_equal(np.asarray(sent[0]["data"]["float32"], np.float32), expected)
    assert loader.counts == {"total": 1, "success": 1, "error": 0, "inserted": 0} and report.getvalue() == b""


@pytest.mark.parametrize("line, code", [
    (output_line(b"[NaN,0,0,0,0,0,0,1]"), "MalformedLine"),
    (output_line(b"[0.1,0.2]"), "InvalidEmbedding"),
    (output_line(b"[0,0,0,0,0,0,0,0]"), "InvalidEmbedding"),
    (output_line(TEXTS["float32 text"])[:-40], "MalformedLine"),  # truncated
])
def test_loader_reports_a_line_the_index_would_refuse(line, code):
    loader, batcher, report = loader_for()
    assert loader.line(line, "f", 0, len(line) + 1) is None
    assert batcher.flush({}) is None
    reported = orjson.loads(report.getvalue())
    assert reported["error_code"] == code and loader.counts["error"] == 1


# ---------------------------------------------------------------------------------------------------- bytes bind


def test_requests_close_at_20_mib_when_bytes_bind_before_500_vectors():
    # 3072 values of full float32 precision around 1e-5 take ≈ 15 bytes each as float32 text, and a 1 KB source
    # URI rides in each vector's metadata: 500 of them would be ≈ 24 MB, so bytes bind first.
    generator = np.random.default_rng(3)
    parts = []
    for i in range(1100):
        values = (generator.standard_normal(3072) * 3e-5).astype(np.float32)
        uri = f"s3://bucket/{'long-folder-name/' * 58}img-{i:05d}.jpg"
        parts.append(vectors.encode_text(f"{i:032x}", json.dumps([float(v) for v in values]).encode(), 3072,
                                         {"source_uri": uri, "job_id": "job"}))
    batcher = vectors.Batcher("bucket", "index")
    batches, closed_before = [], []
    for i, part in enumerate(parts):
        if (batch := batcher.add(part, lambda i=i: {"i": i})) is not None:
            batches.append(batch)
            closed_before.append(len(part))
    batches.append(batcher.flush({"i": len(parts)}))
    assert sum(b.count for b in batches) == 1100 and all(b.count < 500 for b in batches)
    assert max(len(b.body) for b in batches) <= 20_971_520
    # full: the next vector would not have fitted under 20 MiB less the 4 KiB kept for the envelope
    assert all(len(b.body) + 1 + size > 20_971_520 - 4096 for b, size in zip(batches, closed_before))
    app = index_app(3072)
    app.options["store_data"] = False
    client = Client(app)
    for batch in batches:
        assert client.post("/PutVectors", data=bytes(batch.body)).status_code == 200


# ---------------------------------------------------------------------------------------------------- sending


def unit_parts(n, seed=1):
    generator = np.random.default_rng(seed)
    parts = []
    for i in range(n):
        values = generator.standard_normal(8).astype(np.float32)
        parts.append(vectors.encode_vector(f"k{i:05d}", values / np.linalg.norm(values), 8, {"n": i}))
    return parts


def index_stats(app):
    return app.snapshot_stats()["indexes"]["bucket/index"]


def test_a_throttled_load_causes_a_bounded_number_of_429s(index_endpoint, monkeypatch):
    app, client = index_endpoint.app, index_endpoint.client
    clock = FakeClock(1000.0)
    monkeypatch.setattr(s3vectors, "time", types.SimpleNamespace(monotonic=clock, time=lambda: clock.now))
    app.configure(vectors_per_second=400, requests_per_second=1000)  # the quota's clock is now the fake one
    # the pacer is told a quota 10x the real one: it must find the real one from the 429s, not hammer it
    # short backoffs, so that only the pacer keeps the 429s few
    limiter = pacing.RateLimiter(4000, 1000, clock=clock, sleep=clock.sleep)
    sender, done = send_parts(client, unit_parts(3000), limiter, clock=clock, max_backoff=0.02)
    stats = index_stats(app)
    assert stats["vectors"] == 3000 and stats["put_vectors_accepted"] == 3000
    assert sender.stats["throttled"] == stats["rejected_quota"]
    assert 1 <= stats["rejected_quota"] <= 25  # 19 here; a sender that does not slow down meets ≈ 430
    assert clock.now - 1000 < 3000 / 400 * 1.5  # and it did not slow down more than it had to


def test_a_request_answered_503_again_and_again_is_split_in_halves(index_endpoint):
    app, client = index_endpoint.app, index_endpoint.client
    app.configure(put_capacity_vectors=100)
    sender, done = send_parts(client, unit_parts(1000), pacing.RateLimiter(1e6, 1e4), per_request=500,
                              clock=FakeClock(1000.0))
    stats = index_stats(app)
    assert stats["vectors"] == 1000 and stats["put_vectors_accepted"] == 1000  # each vector once
    assert stats["largest_request_vectors"] <= 100
    # 500 -> 250 -> 125 -> 62 + 63: each request over capacity is tried 3 times before it is split
    assert stats["rejected_capacity_503"] == 2 * 3 * (1 + 2 + 4) and sender.stats["split"] == 2 * 7
    assert stats["put_requests_accepted"] == 16 and sender.stats["retries"] == stats["rejected_capacity_503"]
    assert sorted(b.seq for b in done) == [0, 1]  # the checkpoint sees the two batches, each once


def test_a_single_503_is_retried_as_it_is(index_endpoint):
    app, client = index_endpoint.app, index_endpoint.client
    app.configure(fault_rate=1.0, seed=2)
    calls = []

    def recover(_seconds):
        calls.append(1)
        if len(calls) == 2:
            app.configure(fault_rate=0.0)

    sender = pacing.PutVectorsSender(client, "bucket", "index", pacing.RateLimiter(1e6, 1e4), threads=1,
                                      on_done=lambda b: None, sleep=recover)
    batcher = vectors.Batcher("bucket", "index")
    for part in unit_parts(10):
        batcher.add(part, dict)
    sender.submit(batcher.flush({}))
    sender.close()
    assert sender.stats["split"] == 0 and index_stats(app)["put_vectors_accepted"] == 10


def test_a_batch_is_handed_on_only_when_a_sending_thread_is_free():
    """A body is up to 20 MiB: the sender holds one a thread, and the caller fills the next one meanwhile."""
    gate, sent = threading.Event(), []

    class Held(pacing.PutVectorsSender):
        def send(self, batch):
            sent.append(batch.seq)
            gate.wait(30)

    client = types.SimpleNamespace(meta=types.SimpleNamespace(events=types.SimpleNamespace(register=lambda *a: None)))
    sender = Held(client, "bucket", "index", pacing.RateLimiter(1e6, 1e4), threads=2, on_done=lambda b: None)
    batches = [vectors.Batch(b"{}", 1, seq) for seq in range(3)]
    sender.submit(batches[0])
    sender.submit(batches[1])
    third = threading.Thread(target=sender.submit, args=(batches[2],))
    third.start()
    third.join(0.3)
    assert third.is_alive()  # both threads hold a batch: the third stays with its caller
    gate.set()
    third.join(30)
    sender.close()
    assert not third.is_alive() and sorted(sent) == [0, 1, 2]


def quiet_send(client, parts):
    return send_parts(client, parts, pacing.RateLimiter(1e6, 1e4), clock=FakeClock(1000.0))


def test_402_stops_with_the_quota_named(index_endpoint):
    app, client = index_endpoint.app, index_endpoint.client
    app.configure(vector_quota=60)
    with pytest.raises(common.StepError) as raised:
        quiet_send(client, unit_parts(100))
    message = str(raised.value)
    assert "ServiceQuotaExceededException" in message and "quota" in message and "Service Quotas" in message
    assert "\n" not in message and raised.value.exit_code == common.EXIT_ERROR
    assert index_stats(app)["vectors"] <= 60 and index_stats(app)["rejected_quota_402"] == 1  # not retried


def test_403_names_the_missing_action(index_endpoint):
    app, client = index_endpoint.app, index_endpoint.client
    app.configure(deny_put_vectors=True)
    with pytest.raises(common.StepError) as raised:
        quiet_send(client, unit_parts(10))
    assert "s3vectors:PutVectors" in str(raised.value) and "AccessDenied" in str(raised.value)
    assert raised.value.exit_code == common.EXIT_ERROR and index_stats(app)["rejected_denied"] == 1


def standin_config(world, **options):
    request = urllib.request.Request(world.stack.s3vectors_url + "/_standin/config",
                                     data=json.dumps(options).encode(), method="POST")
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("option, value, expected", [
    ("deny_put_vectors", True, "needs s3vectors:PutVectors"),
    ("vector_quota", 3, "ServiceQuotaExceededException"),
])
def test_step_3_stops_on_402_and_403_with_one_line(world, option, value, expected):
    world.put_images([f"img-{i:03d}.png" for i in range(120)], prefix="2024/")
    assert world.step(1).returncode == 0
    assert world.step(2, "--wait", "--interval", "0.1", "--timeout", "120").returncode == 0
    standin_config(world, **{option: value})
    try:
        loaded = world.step(3)
    finally:
        standin_config(world, **{option: {"deny_put_vectors": False, "vector_quota": None}[option]})
    assert loaded.returncode == common.EXIT_ERROR, loaded.stdout + loaded.stderr
    lines = loaded.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in loaded.stderr
    assert "run the step again to resume" in lines[0]


# ---------------------------------------------------------------------------------------------------- progress


class Screen(io.StringIO):
    """A terminal of a fixed width: what is left on screen after carriage returns."""

    def lines(self) -> list[str]:
        shown = []
        for line in self.getvalue().split("\n"):
            shown.append(line.rsplit("\r", 1)[-1] if "\r" in line else line)
        return shown


def test_the_bar_fits_the_terminal_and_counts_confirmed_vectors_of_this_run():
    clock, screen = FakeClock(1000.0), Screen()
    progress = loading.Progress(10_000, True, already=4_000, out=screen, clock=clock, width=lambda: 80)
    for n in range(1, 13):
        clock.now += 1
        progress.update(4_000 + 500 * n)
        progress.print("✓ Processed part.jsonl.out") if n == 6 else None
    progress.close()
    segments = [seg for line in screen.getvalue().split("\n") for seg in line.split("\r")]
    assert segments and max(len(seg) for seg in segments) <= 79  # never wraps: \r can redraw it
    shown = screen.lines()
    assert "✓ Processed part.jsonl.out" in shown  # a line of its own, not glued to the bar
    last = [line for line in shown if line.strip()][-1]
    assert "10,000/10,000 vectors" in last and "500 vectors/s" in last  # 6,000 in 12 s, not 10,000 in 12 s
    assert " 100%" in last


def test_the_bar_has_a_rate_and_time_left_and_shrinks_with_the_terminal():
    clock, screen = FakeClock(1000.0), Screen()
    width = [120]
    progress = loading.Progress(100_000, True, out=screen, clock=clock, width=lambda: width[0])
    clock.now += 10
    progress.update(25_000)
    assert "2,500 vectors/s" in screen.lines()[-1] and "0:30 left" in screen.lines()[-1]
    assert screen.lines()[-1].startswith("[") and len(screen.lines()[-1]) <= 119
    width[0] = 40
    clock.now += 1
    progress.update(27_500)
    assert all(len(seg) <= 39 for seg in screen.getvalue().split("\r")[-2:])


def test_off_a_terminal_one_line_every_few_seconds():
    clock, out = FakeClock(1000.0), io.StringIO()
    progress = loading.Progress(10_000, False, out=out, clock=clock, every=5)
    for n in range(1, 41):
        clock.now += 0.5
        progress.update(250 * n)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4  # 20 s: one line every 5 s, not one per batch
    assert lines[0] == "Inserted 2,500 of 10,000 vectors (25%), 500 vectors/s this run, 0:15 left"
    assert "\r" not in out.getvalue()
