"""A run's on-demand part: images too few for a job of their own (a remainder that would cost a wave, or a day
with fewer new images than a job's minimum) are embedded with InvokeModel by step 3 and accounted like a job's."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import urllib.request
from datetime import date
from pathlib import Path

import numpy as np
import pytest

from batch_embeddings import accounting, naming, ondemand, pacing
import common
from tests.conftest import import_step
from tests.standins.embedding import embed_image

SMALL_JOBS = {"MAX_RECORDS_PER_JOB": "200"}


def test_a_day_with_fewer_images_than_a_job_takes_goes_on_demand(world):
    uris = world.put_images([f"day2/img-{i:02d}.png" for i in range(30)], prefix="2024/")
    created = world.step(1)
    assert created.returncode == 0, created.stdout + created.stderr
    assert "30 image(s) go on demand: step 3 embeds them" in created.stdout
    assert "No batch job: the images go on demand" in created.stdout
    assert world.emulator("/_emulator/jobs")["jobs"] == []  # nothing submitted, nothing uploaded
    assert not [o for o in world.client("s3").list_objects_v2(Bucket=world.source_bucket).get("Contents", [])
                if o["Key"].endswith(".jsonl")]
    (part,) = world.job_info()["jobs"]
    assert part["on_demand"] is True and part["record_count"] == 30 and "job_arn" not in part

    monitored = world.step(2, "--wait", "--interval", "0.05", "--timeout", "30")
    assert monitored.returncode == 0, monitored.stdout + monitored.stderr
    refused = world.step(1)  # the part is not loaded yet: the run has not finished
    assert refused.returncode == common.EXIT_REFUSED, refused.stderr
    assert "(on demand) but is not loaded" in refused.stderr and refused.stderr.count("\n") == 1

    loaded = world.step(3)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert "Embedded and loaded 30 image(s) on demand" in loaded.stdout
    assert "Images loaded: 30, failed: 0, missing: 0" in loaded.stdout
    index = world.index_metadata()
    assert {k: (m["source_uri"], m["job_id"]) for k, m in index.items()} == {
        naming.vector_key(u): (u, "on-demand") for u in uris}
    assert {m["embedded"] for m in index.values()} == {date.today().isoformat()}  # embedded on the day it loads
    assert world.vectors_accepted() == 30
    assert not list(world.run_dir().glob("load_report_*"))  # nothing failed: no report
    cleaned = world.step(4)
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    assert not list(world.cwd.rglob("batch_input_*.jsonl"))


def test_too_few_images_over_the_on_demand_limit_are_refused(world):
    world.put_images([f"img-{i:02d}.png" for i in range(30)], prefix="2024/")
    refused = world.step(1, env={"ON_DEMAND_MAX_IMAGES": "20"})
    assert refused.returncode != 0
    assert "found 30 images to embed" in refused.stderr and "ON_DEMAND_MAX_IMAGES=30" in refused.stderr
    assert not (world.cwd / "batch_job_info.json").exists()
    bad = world.step(1, "--dry-run", env={"ON_DEMAND_MAX_IMAGES": "-1"})
    assert bad.returncode == 2 and "ON_DEMAND_MAX_IMAGES='-1' must be a whole number" in bad.stderr


def put_remainder_tree(world) -> list[str]:
    return (world.put_images([f"a/img-{i:03d}.png" for i in range(150)], prefix="2024/")
            + world.put_images([f"b/img-{i:03d}.png" for i in range(120)], prefix="2024/")
            + world.put_images([f"top-{i:02d}.png" for i in range(30)], prefix="2024/"))


def test_dry_run_prints_jobs_waves_and_who_waits(world):
    put_remainder_tree(world)
    world.env.update(SMALL_JOBS)
    # Without on demand, the 30 images directly in 2024/ need a job at 2024/, which nests with a/ and b/.
    batch_only = world.step(1, "--dry-run", env={"ON_DEMAND_MAX_IMAGES": "0"})
    assert batch_only.returncode == 0, batch_only.stdout + batch_only.stderr
    assert "Planned 2 job(s) in 2 wave(s)" in batch_only.stdout
    lines = [line for line in batch_only.stdout.splitlines() if line.startswith("  nova-mme-embedding-")]
    assert len(lines) == 2
    assert "wave 1, 150 records" in lines[0] and "/2024/a/, starts at once" in lines[0]
    assert "wave 2, 150 records" in lines[1] and "/2024/, after 01 (folders nest)" in lines[1]
    with_on_demand = world.step(1, "--dry-run")
    assert "Planned 2 job(s) in 1 wave(s)" in with_on_demand.stdout
    assert "/2024/a/, starts at once" in with_on_demand.stdout and "/2024/b/, starts at once" in with_on_demand.stdout
    assert "30 image(s) embedded on demand (InvokeModel) by step 3" in with_on_demand.stdout
    assert not (world.cwd / "batch_job_info.json").exists() and not list(world.cwd.rglob("batch_input_*.jsonl"))


def test_a_remainder_that_would_cost_a_wave_is_embedded_by_step_3(world):
    uris = put_remainder_tree(world)
    bad = f"s3://{world.source_bucket}/2024/top-broken.png"
    world.client("s3").put_object(Bucket=world.source_bucket, Key="2024/top-broken.png", Body=b"not an image")
    world.env.update(SMALL_JOBS)
    created = world.step(1)
    assert created.returncode == 0, created.stdout + created.stderr
    run = world.job_info()["jobs"]
    assert sorted((j["input_folder"], j["record_count"], bool(j.get("on_demand"))) for j in run) == [
        ("2024/", 31, True), ("2024/a/", 150, False), ("2024/b/", 120, False)]
    assert sum(1 for j in run if j.get("job_arn")) == 2  # side by side: nothing at 2024/ waits for them
    monitored = world.step(2, "--wait", "--interval", "0.1", "--timeout", "120")
    assert monitored.returncode == 0, monitored.stdout + monitored.stderr
    assert "On demand: 31 image(s), embedded and loaded by step 3" in monitored.stdout
    loaded = world.step(3)
    assert loaded.returncode == 4, loaded.stdout + loaded.stderr
    assert "Images loaded: 300, failed: 1, missing: 0" in loaded.stdout
    account = Path(world.job_info()["account_file"])  # not_loaded.jsonl in the run's folder
    (entry,) = [json.loads(line) for line in account.read_text().splitlines()]
    assert entry["source_uri"] == bad and entry["status"] == "failed" and entry["error_code"] == "ValidationException"
    assert entry["job_name"].endswith("-on-demand")
    index = world.index_metadata()
    assert set(index) == {naming.vector_key(u) for u in uris}
    assert {index[naming.vector_key(u)]["job_id"] for u in uris if "/top-" in u} == {"on-demand"}
    assert world.vectors_accepted() == 300


def test_a_part_stopped_half_way_embeds_only_what_the_index_lacks(world):
    """Step 3 stopped after the index took some of a part's vectors: run again, it pays only for the others."""
    uris = world.put_images([f"day2/img-{i:02d}.png" for i in range(30)], prefix="2024/")
    assert world.step(1).returncode == 0
    assert world.step(3).returncode == 0
    # As if step 3 had stopped before it recorded the part loaded, with 10 of its vectors not yet put.
    info = world.job_info()
    info["jobs"][0].pop("load")
    (world.cwd / "batch_job_info.json").write_text(json.dumps(info))
    world.client("s3vectors").delete_vectors(vectorBucketName=world.vector_bucket, indexName=world.vector_index,
                                             keys=[naming.vector_key(u) for u in uris[:10]])
    (world.run_dir() / ondemand.KEPT_NAME).unlink()  # the index is asked first, whatever is kept
    invoked = len([c for c in world.emulator("/_emulator/auth")["calls"] if c["operation"] == "InvokeModel"])

    again = world.step(3)
    assert again.returncode == 0, again.stdout + again.stderr
    calls = [c for c in world.emulator("/_emulator/auth")["calls"] if c["operation"] == "InvokeModel"][invoked:]
    assert len(calls) == 10  # only the images the index lacked
    assert "20 image(s) of" in again.stdout and "in the index already" in again.stdout
    assert "Embedded and loaded 10 image(s) on demand" in again.stdout
    assert "Images loaded: 30, failed: 0, missing: 0" in again.stdout
    assert world.index_keys() == {naming.vector_key(u) for u in uris}


# ---------------------------------------------------------------------------------------------------------------
# One image's refusal is that image's failure; a refusal of InvokeModel itself stops the step
# ---------------------------------------------------------------------------------------------------------------


def invoked(world) -> int:
    """InvokeModel calls the emulator has answered (all of them: it cannot tell the images apart here)."""
    return len([c for c in world.emulator("/_emulator/auth")["calls"] if c["operation"] == "InvokeModel"])


def load_in_process(world, monkeypatch, *args: str) -> tuple[int, list[float], dict]:
    """Step 3 in this process, the on-demand part's sleeps recorded instead of slept, and what reached it: the
    limiter's rates the vectors were paced at and the retry setting of the client that asked the index first."""
    step3 = import_step(3)
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in world.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(world.cwd)
    sleeps: list[float] = []
    seen: dict = {}
    monkeypatch.setattr(ondemand, "load_part", functools.partial(ondemand.load_part, sleep=sleeps.append))

    class Sender(pacing.PutVectorsSender):
        def __init__(self, client, bucket, index, limiter, **kwargs):
            seen["rates"] = (limiter.max_rate, limiter.requests_per_second)
            super().__init__(client, bucket, index, limiter, **kwargs)

    def present_keys(s3v, bucket, index, keys, real=accounting.present_keys):
        seen["reader_attempts"] = s3v.meta.config.retries["total_max_attempts"]
        return real(s3v, bucket, index, keys)

    monkeypatch.setattr(pacing, "PutVectorsSender", Sender)
    monkeypatch.setattr(accounting, "present_keys", present_keys)
    code = step3.main(list(args))
    monkeypatch.undo()
    return code, sleeps, seen


def not_loaded(world) -> dict[str, dict]:
    lines = Path(world.job_info()["account_file"]).read_text().splitlines()
    return {e["source_uri"]: e for e in map(json.loads, lines)}


def test_a_model_timeout_is_tried_again_and_the_image_loaded(world, monkeypatch, capsys):
    uris = world.put_images([f"day2/img-{i:02d}.png" for i in range(30)], prefix="2024/")
    assert world.step(1).returncode == 0
    world.emulator("/_emulator/config", {"invoke_timeout_keys_regex": r"img-00\.png$", "invoke_timeouts": 2})
    before = invoked(world)
    code, sleeps, seen = load_in_process(world, monkeypatch, "--vectors-per-second", "900",
                                         "--requests-per-second", "70")
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Images loaded: 30, failed: 0, missing: 0" in out
    assert sleeps == list(ondemand.TIMEOUT_RETRY_DELAYS[:2])  # two timeouts, two waits, then the embedding
    assert invoked(world) - before == 32
    assert world.index_keys() == {naming.vector_key(u) for u in uris}
    # Step 3's own settings reach the on-demand part; the index is asked with the client botocore retries.
    assert seen["rates"] == (900.0, 70.0)
    assert seen["reader_attempts"] > 1


def test_an_image_that_always_times_out_fails_alone(world, monkeypatch, capsys):
    uris = world.put_images([f"day2/img-{i:02d}.png" for i in range(30)], prefix="2024/")
    assert world.step(1).returncode == 0
    world.emulator("/_emulator/config", {"invoke_timeout_keys_regex": r"img-00\.png$", "invoke_timeouts": 0})
    before = invoked(world)
    code, sleeps, _ = load_in_process(world, monkeypatch)
    out = capsys.readouterr().out
    assert code == common.EXIT_INCOMPLETE, out
    assert "Images loaded: 29, failed: 1, missing: 0" in out
    assert sleeps == list(ondemand.TIMEOUT_RETRY_DELAYS)
    assert invoked(world) - before == 29 + 1 + len(ondemand.TIMEOUT_RETRY_DELAYS)
    (entry,) = not_loaded(world).values()
    assert entry["source_uri"] == uris[0] and entry["status"] == "failed"
    assert entry["error_code"] == "ModelTimeoutException" and "timed out" in entry["error_message"]
    assert world.index_keys() == {naming.vector_key(u) for u in uris[1:]}


def test_an_image_the_model_may_not_read_fails_alone(world):
    uris = world.put_images([f"day2/img-{i:02d}.png" for i in range(30)], prefix="2024/")
    assert world.step(1).returncode == 0
    world.emulator("/_emulator/config", {"invoke_denied_keys_regex": r"img-03\.png$"})
    world.client("s3").delete_object(Bucket=world.source_bucket, Key="2024/day2/img-07.png")  # gone since 01
    loaded = world.step(3)
    assert loaded.returncode == common.EXIT_INCOMPLETE, loaded.stdout + loaded.stderr
    assert "Images loaded: 28, failed: 2, missing: 0" in loaded.stdout
    failed = not_loaded(world)
    assert set(failed) == {uris[3], uris[7]}
    assert failed[uris[3]]["error_code"] == "AccessDeniedException" and uris[3] in failed[uris[3]]["error_message"]
    assert failed[uris[7]]["error_code"] == "ValidationException" and uris[7] in failed[uris[7]]["error_message"]
    assert world.index_keys() == {naming.vector_key(u) for i, u in enumerate(uris) if i not in (3, 7)}


def test_a_caller_refused_invoke_model_stops_the_step_with_one_line(world):
    world.put_images([f"day2/img-{i:02d}.png" for i in range(30)], prefix="2024/")
    assert world.step(1).returncode == 0
    world.emulator("/_emulator/config", {"invoke_denied_keys_regex": ".", "invoke_denied_reason": "iam"})
    before = invoked(world)
    stopped = world.step(3)
    assert stopped.returncode == common.EXIT_ERROR, stopped.stdout + stopped.stderr
    lines = stopped.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stopped.stderr, stopped.stderr
    assert "AccessDeniedException" in lines[0] and "bedrock:InvokeModel" in lines[0]
    assert "before any image was embedded" in lines[0]
    assert invoked(world) - before <= ondemand.THREADS  # the calls in flight, not one an image
    assert world.index_keys() == set() and "account_file" not in world.job_info()


# ---------------------------------------------------------------------------------------------------------------
# Nothing paid is thrown away: the embeddings are kept as they come, a load that failed is run again for free
# ---------------------------------------------------------------------------------------------------------------


def standin_config(world, **options) -> None:
    request = urllib.request.Request(world.stack.s3vectors_url + "/_standin/config",
                                     data=json.dumps(options).encode(), method="POST")
    urllib.request.urlopen(request).close()


@contextlib.contextmanager
def put_vectors_denied(world):
    """The caller lacks s3vectors:PutVectors (the stand-in is shared by the session: restored after)."""
    standin_config(world, deny_put_vectors=True)
    try:
        yield
    finally:
        standin_config(world, deny_put_vectors=False)


def kept_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def assert_stored_as_the_model_gave(world, uris: list[str]) -> None:
    """The index holds each image's vector as the emulator's model embeds the image's bytes (float32)."""
    s3, s3v = world.client("s3"), world.client("s3vectors")
    got = s3v.get_vectors(vectorBucketName=world.vector_bucket, indexName=world.vector_index,
                          keys=[naming.vector_key(u) for u in uris], returnData=True)["vectors"]
    stored = {v["key"]: np.asarray(v["data"]["float32"], dtype=np.float32) for v in got}
    for uri in uris:
        bucket, key = common.parse_s3_uri(uri)
        image = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        expected = np.asarray(embed_image(image, 256), dtype=np.float32)
        np.testing.assert_array_equal(stored[naming.vector_key(uri)], expected, err_msg=uri)


def one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_a_load_the_index_refused_is_run_again_without_calling_the_model(world):
    uris = world.put_images([f"day2/img-{i:02d}.png" for i in range(30)], prefix="2024/")
    assert world.step(1).returncode == 0
    before = invoked(world)
    with put_vectors_denied(world):
        denied = world.step(3)
    assert denied.returncode == common.EXIT_ERROR, denied.stdout + denied.stderr
    assert "needs s3vectors:PutVectors" in one_line(denied)
    assert invoked(world) - before == 30
    kept = world.run_dir() / ondemand.KEPT_NAME
    assert sorted(line["source_uri"] for line in kept_lines(kept)) == uris
    assert world.index_keys() == set() and "load" not in world.job_info()["jobs"][0]
    # compact: 256 floats as base64 of float32 take 1,368 bytes a line (as float32 text, about 3,300)
    assert kept.stat().st_size < 30 * 1600

    before = invoked(world)
    again = world.step(3)
    assert again.returncode == 0, again.stdout + again.stderr
    assert invoked(world) == before  # not one image paid for twice
    assert "30 of the 30 image(s) were embedded by an earlier try and kept in" in again.stdout
    assert "Embedded and loaded 30 image(s) on demand" in again.stdout
    assert "Images loaded: 30, failed: 0, missing: 0" in again.stdout
    metadata = world.index_metadata()
    assert {k: (m["source_uri"], m["job_id"]) for k, m in metadata.items()} == {
        naming.vector_key(u): (u, "on-demand") for u in uris}
    assert all(m["etag"] and m["size"] and m["embedded"] for m in metadata.values())  # what each was embedded from
    assert_stored_as_the_model_gave(world, uris)
    assert not list(world.run_dir().glob("load_report_*"))

    run_dir = world.run_dir()
    cleaned = world.step(4)
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    assert f"Deleted: {ondemand.KEPT_NAME}" in cleaned.stdout
    assert not run_dir.exists()  # nothing left in the run's folder: it goes too


@pytest.mark.parametrize("where", ["last", "middle"])
def test_a_kept_line_cut_by_a_kill_is_embedded_again_alone(world, where):
    uris = world.put_images([f"day2/img-{i:02d}.png" for i in range(30)], prefix="2024/")
    assert world.step(1).returncode == 0
    with put_vectors_denied(world):
        assert world.step(3).returncode == common.EXIT_ERROR
    kept = world.run_dir() / ondemand.KEPT_NAME
    lines = kept.read_bytes().splitlines(keepends=True)
    n = len(lines) - 1 if where == "last" else 12
    cut = json.loads(lines[n])["source_uri"]
    if where == "last":  # killed while writing it: the file ends in the middle of a line
        kept.write_bytes(b"".join(lines[:n]) + lines[n][:len(lines[n]) // 2])
    else:  # one line damaged (cut short) in the middle of the file
        kept.write_bytes(b"".join(lines[:n]) + lines[n][:len(lines[n]) // 2] + b"\n" + b"".join(lines[n + 1:]))

    before = invoked(world)
    again = world.step(3)
    assert again.returncode == 0, again.stdout + again.stderr
    assert invoked(world) - before == 1
    assert "29 of the 30 image(s) were embedded by an earlier try" in again.stdout
    assert "Images loaded: 30, failed: 0, missing: 0" in again.stdout
    assert world.index_keys() == {naming.vector_key(u) for u in uris}
    assert_stored_as_the_model_gave(world, uris)
    # The image embedded again is kept whole after what was whole: read again, every image is there.
    assert json.loads(kept.read_bytes().splitlines()[-1])["source_uri"] == cut
    assert len(ondemand.Kept(kept, 256).found) == 30


def test_a_kept_embedding_the_index_refuses_is_still_that_images_failure(world):
    uris = world.put_images([f"day2/img-{i:02d}.png" for i in range(30)], prefix="2024/")
    assert world.step(1).returncode == 0
    with put_vectors_denied(world):
        assert world.step(3).returncode == common.EXIT_ERROR
    before = invoked(world)
    standin_config(world, refuse_keys=[naming.vector_key(uris[5])])
    try:
        again = world.step(3)
    finally:
        standin_config(world, refuse_keys=None)
    assert again.returncode == common.EXIT_INCOMPLETE, again.stdout + again.stderr
    assert invoked(world) == before
    assert "Images loaded: 29, failed: 1, missing: 0" in again.stdout
    (entry,) = not_loaded(world).values()
    assert entry["source_uri"] == uris[5] and entry["error_code"] == "ValidationException"
    assert "S3 Vectors refused the vector" in entry["error_message"]
    assert len(list(world.run_dir().glob("load_report_*"))) == 1  # it lists that image
    assert world.index_keys() == {naming.vector_key(u) for i, u in enumerate(uris) if i != 5}


def test_a_retry_on_demand_the_index_refused_is_run_again_without_calling_the_model(world):
    uris = world.put_images([f"day2/img-{i:02d}.png" for i in range(5)], prefix="2024/")
    account = world.cwd / "to_retry.jsonl"
    account.write_text("".join(json.dumps({"source_uri": u, "status": "missing"}) + "\n" for u in uris))
    kept = world.cwd / "runs" / ondemand.RETRY_KEPT_NAME
    before = invoked(world)
    with put_vectors_denied(world):
        denied = world.step(1, "--retry-failed", str(account), "--on-demand")
    assert denied.returncode == common.EXIT_ERROR, denied.stdout + denied.stderr
    assert "needs s3vectors:PutVectors" in one_line(denied)
    assert invoked(world) - before == 5
    assert sorted(line["source_uri"] for line in kept_lines(kept)) == uris

    before = invoked(world)
    again = world.step(1, "--retry-failed", str(account), "--on-demand")
    assert again.returncode == 0, again.stdout + again.stderr
    assert invoked(world) == before
    assert "5 of the 5 image(s) were embedded by an earlier try" in again.stdout
    assert "Embedded and loaded 5 image(s) on demand" in again.stdout
    assert_stored_as_the_model_gave(world, uris)
    assert not kept.exists()  # the index holds them all: nothing left to keep


def test_kept_embeddings_answer_only_the_same_request(tmp_path):
    """A kept embedding is used for the same image, model and request body only (another dimension or purpose is
    another request), and a later line for an image wins."""
    kept = ondemand.Kept(tmp_path / "kept.jsonl", 4)
    body = {"taskType": "SINGLE_EMBEDDING", "singleEmbeddingParams": {"embeddingDimension": 4}}
    digest = ondemand.request_digest("model-a", body)
    kept.add("k1", "s3://b/1.png", digest, [0.1, 0.2, 0.3, 0.4])
    kept.add("k1", "s3://b/1.png", digest, [0.5, 0.6, 0.7, 0.8])
    kept.close()
    again = ondemand.Kept(tmp_path / "kept.jsonl", 4)
    assert again.get("k1", digest).tolist() == np.asarray([0.5, 0.6, 0.7, 0.8], dtype=np.float32).tolist()
    assert again.get("k2", digest) is None
    assert again.get("k1", ondemand.request_digest("model-b", body)) is None
    other = {"taskType": "SINGLE_EMBEDDING", "singleEmbeddingParams": {"embeddingDimension": 8}}
    assert again.get("k1", ondemand.request_digest("model-a", other)) is None
    assert ondemand.Kept(tmp_path / "kept.jsonl", 8).found == {}  # of another dimension: not these
    again.forget({"k1"})
    assert not (tmp_path / "kept.jsonl").exists()
