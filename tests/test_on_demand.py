"""A run's on-demand part: images too few for a job of their own (a remainder that would cost a wave, or a day
with fewer new images than a job's minimum) are embedded with InvokeModel by step 3 and accounted like a job's."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import accounting
import common
import ondemand
import vectors
from tests.conftest import import_step

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
    assert index == {common.vector_key(u): {"source_uri": u, "job_id": "on-demand"} for u in uris}
    assert world.vectors_accepted() == 30
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
    assert set(index) == {common.vector_key(u) for u in uris}
    assert {index[common.vector_key(u)]["job_id"] for u in uris if "/top-" in u} == {"on-demand"}
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
                                             keys=[common.vector_key(u) for u in uris[:10]])
    invoked = len([c for c in world.emulator("/_emulator/auth")["calls"] if c["operation"] == "InvokeModel"])

    again = world.step(3)
    assert again.returncode == 0, again.stdout + again.stderr
    calls = [c for c in world.emulator("/_emulator/auth")["calls"] if c["operation"] == "InvokeModel"][invoked:]
    assert len(calls) == 10  # only the images the index lacked
    assert "20 image(s) of" in again.stdout and "in the index already" in again.stdout
    assert "Embedded and loaded 10 image(s) on demand" in again.stdout
    assert "Images loaded: 30, failed: 0, missing: 0" in again.stdout
    assert world.index_keys() == {common.vector_key(u) for u in uris}


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

    class Sender(vectors.PutVectorsSender):
        def __init__(self, client, bucket, index, limiter, **kwargs):
            seen["rates"] = (limiter.max_rate, limiter.requests_per_second)
            super().__init__(client, bucket, index, limiter, **kwargs)

    def present_keys(s3v, bucket, index, keys, real=accounting.present_keys):
        seen["reader_attempts"] = s3v.meta.config.retries["total_max_attempts"]
        return real(s3v, bucket, index, keys)

    monkeypatch.setattr(vectors, "PutVectorsSender", Sender)
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
    assert world.index_keys() == {common.vector_key(u) for u in uris}
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
    assert world.index_keys() == {common.vector_key(u) for u in uris[1:]}


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
    assert world.index_keys() == {common.vector_key(u) for i, u in enumerate(uris) if i not in (3, 7)}


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
