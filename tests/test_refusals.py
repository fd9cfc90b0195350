"""What the steps refuse, and that a refusal changes nothing: a running job's images are never submitted twice, 03
loads nothing while a job runs, an account naming images elsewhere and a foreign manifest are refused."""

from __future__ import annotations

import json
import time

import pytest

import common
from batch_embeddings import nova


def s3_keys(world, suffix: str = "") -> list[str]:
    listed = world.client("s3").list_objects_v2(Bucket=world.source_bucket).get("Contents", [])
    return sorted(o["Key"] for o in listed if o["Key"].endswith(suffix))


def manifest_uris(path) -> list[str]:
    return [nova.image_uri(json.loads(line)) for line in path.read_text().splitlines()]


def test_force_while_a_job_of_the_replaced_run_runs_never_submits_its_images_again(world):
    first = world.put_images([f"a/img-{i:03d}.png" for i in range(100)], prefix="2024/")
    world.emulator("/_emulator/config", {"hold_scheduled": True})
    assert world.step(1).returncode == 0
    old = world.job_info()["jobs"][0]
    second = world.put_images([f"b/img-{i:03d}.png" for i in range(100)], prefix="2024/")

    refused = world.step(1)
    assert refused.returncode == common.EXIT_REFUSED
    assert "holds a run that has not finished" in refused.stderr

    forced = world.step(1, "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert "Left out 100 image(s): in a job of the replaced run still running" in forced.stdout
    new = world.job_info()["jobs"]
    submitted = [uri for job in new for m in job["manifests"] for uri in manifest_uris(world.cwd / m["local_path"])]
    assert sorted(submitted) == sorted(second)
    assert not set(submitted) & set(first)
    assert all(job["job_name"] != old["job_name"] for job in new)


def wait_for_status(world, status: str) -> None:
    """Until the emulator's only job reaches `status` (a state it then keeps for as long as the test needs)."""
    for _ in range(2000):
        jobs = world.emulator("/_emulator/jobs")["jobs"]
        if jobs and jobs[0]["status"] == status:
            return
        time.sleep(0.01)
    raise AssertionError(f"the job never reached {status}")


def test_03_while_a_job_is_in_progress_refuses_and_writes_no_account(world):
    world.put_images([f"a/img-{i:03d}.png" for i in range(100)], prefix="2024/")
    world.emulator("/_emulator/config", {"record_seconds": 5.0})  # 100 records: InProgress for minutes
    assert world.step(1).returncode == 0
    wait_for_status(world, "InProgress")
    loaded = world.step(3)
    assert loaded.returncode == common.EXIT_REFUSED
    assert loaded.stderr.startswith("error: the run has not ended (nova-mme-embedding-") and "is InProgress" in \
        loaded.stderr
    assert not list(world.cwd.rglob("not_loaded.jsonl")) and not list(world.cwd.rglob("load_report_*"))
    assert "load" not in world.job_info()["jobs"][0]
    assert world.vectors_accepted() == 0
    world.client("bedrock").stop_model_invocation_job(jobIdentifier=world.job_info()["jobs"][0]["job_arn"])


def test_retry_failed_refuses_an_account_naming_images_outside_the_source_prefix(world):
    world.put_images([f"a/img-{i:03d}.png" for i in range(100)], prefix="2024/")
    account = world.cwd / "runs" / "20261201-000000" / "not_loaded.jsonl"
    account.parent.mkdir(parents=True)
    outside = f"s3://{world.source_bucket}/elsewhere/img.png"
    account.write_text(json.dumps({"source_uri": outside, "status": "missing"}) + "\n")
    retried = world.step(1, "--retry-failed")
    assert retried.returncode == common.EXIT_USAGE
    assert retried.stderr == (f"error: {outside} is not under s3://{world.source_bucket}/2024/ — retry with the "
                              "settings of the run that produced the account\n")
    assert not (world.cwd / "batch_job_info.json").exists()
    assert s3_keys(world, ".jsonl") == []


def test_a_foreign_upper_case_manifest_under_the_prefix_is_refused_not_deleted(world):
    world.put_images([f"a/img-{i:03d}.png" for i in range(100)], prefix="2024/")
    world.client("s3").put_object(Bucket=world.source_bucket, Key="2024/a/batch_input_x.JSONL", Body=b"{}\n")
    created = world.step(1)
    assert created.returncode == common.EXIT_REFUSED
    assert created.stderr.startswith(f"error: s3://{world.source_bucket}/2024/a/batch_input_x.JSONL is a .jsonl this "
                                     "tool did not create")
    assert s3_keys(world, ".JSONL") == ["2024/a/batch_input_x.JSONL"]
    assert s3_keys(world, ".jsonl") == []
    assert not (world.cwd / "batch_job_info.json").exists()
    assert world.emulator("/_emulator/jobs")["jobs"] == []


def test_retry_failed_decides_before_it_replaces_anything(world):
    """The README's retry sequence: a refused --retry-failed deletes nothing; --on-demand, 02 --wait and 03 work."""
    world.put_images([f"a/img-{i:03d}.png" for i in range(100)], prefix="2024/")
    world.client("s3").put_object(Bucket=world.source_bucket, Key="2024/a/broken.png", Body=b"not a png")
    assert world.step(1).returncode == 0
    assert world.step(2, "--wait", "--interval", "0.05").returncode == 0
    assert world.step(3).returncode == common.EXIT_INCOMPLETE
    before = sorted(p.relative_to(world.cwd) for p in world.cwd.rglob("*"))

    refused = world.step(1, "--retry-failed")
    assert refused.returncode == common.EXIT_REFUSED
    assert "1 image(s) to retry, fewer than a batch job's minimum of 100" in refused.stderr
    assert sorted(p.relative_to(world.cwd) for p in world.cwd.rglob("*")) == before  # nothing deleted

    on_demand = world.step(1, "--retry-failed", "--on-demand")
    assert on_demand.returncode == common.EXIT_INCOMPLETE  # Bedrock refuses it again
    assert world.step(2, "--wait", "--interval", "0.05").returncode == 0
    again = world.step(3)
    assert again.returncode == common.EXIT_INCOMPLETE, again.stdout + again.stderr
    assert f"s3://{world.source_bucket}/2024/a/broken.png: failed (400" in again.stdout
    assert world.step(4).returncode == 0


def test_a_checkpoint_belongs_to_its_index(world):
    """A typo in the index given to 03 after a completed load: announced, loaded from the start, never counted from
    the old checkpoint; with --no-create it is refused and nothing is created."""
    world.put_images([f"a/img-{i:03d}.png" for i in range(100)], prefix="2024/")
    assert world.step(1).returncode == 0
    assert world.step(2, "--wait", "--interval", "0.05").returncode == 0
    assert world.step(3).returncode == 0
    accepted = world.vectors_accepted()

    refused = world.step(3, "--no-create", env={"VECTOR_BUCKET": "vectors-typo"})
    assert refused.returncode == common.EXIT_USAGE
    assert refused.stderr == ("error: vector bucket vectors-typo does not exist — check VECTOR_BUCKET and "
                              "VECTOR_INDEX, or run without --no-create to create it\n")
    s3v = world.client("s3vectors")
    assert "vectors-typo" not in [b["vectorBucketName"] for b in s3v.list_vector_buckets()["vectorBuckets"]]

    typo = world.step(3, env={"VECTOR_INDEX": "images-typo"})
    assert typo.returncode == 0, typo.stdout + typo.stderr
    assert (f"The load checkpoint of {world.job_info()['jobs'][0]['job_name']} was made against "
            f"{world.vector_bucket}/{world.vector_index}, not {world.vector_bucket}/images-typo: loading this job "
            "from the start") in typo.stdout
    assert "! Index images-typo does not exist: creating it" in typo.stdout
    assert "Vectors Inserted: 100" in typo.stdout and "(1 requests, " in typo.stdout
    keys = s3v.list_vectors(vectorBucketName=world.vector_bucket, indexName="images-typo")["vectors"]
    assert len(keys) == 100
    assert world.vectors_accepted() == accepted  # the first index got nothing more
    back = world.step(3, env={"VECTOR_INDEX": world.vector_index})  # and back: from the start again, no error
    assert back.returncode == 0 and "Vectors Inserted: 100" in back.stdout


@pytest.mark.parametrize("field, value", [("s3_key", "2024/victim/precious.jpg"),
                                          ("s3_key", "2023/batch_input_20261201-000000.jsonl"),
                                          ("local_path", "precious.txt")])
def test_a_job_file_naming_a_file_this_tool_did_not_write_deletes_nothing(world, field, value):
    """02 deletes a job's manifests when it ends, 04 every one the file names: a hand-edited job file that names
    an image, a manifest of another folder or another local file is refused (exit 2, one line) by both."""
    world.put_images([f"a/img-{i:03d}.png" for i in range(100)], prefix="2024/")
    victim = world.put_images(["victim/precious.jpg"], prefix="2024/")[0]
    (world.cwd / "precious.txt").write_text("keep me")
    assert world.step(1).returncode == 0
    info = world.job_info()
    info["jobs"][0]["manifests"][0][field] = value if field == "s3_key" else str(world.cwd / value)
    (world.cwd / "batch_job_info.json").write_text(json.dumps(info))

    for step, args in ((2, ("--wait", "--interval", "0.05", "--timeout", "60")), (4, ("--force",))):
        refused = world.step(step, *args)
        assert refused.returncode == common.EXIT_USAGE, refused.stdout + refused.stderr
        assert len(refused.stderr.splitlines()) == 1 and "is damaged" in refused.stderr
        assert f"manifests[0] names {'s3 key' if field == 's3_key' else 'local file'}" in refused.stderr
    assert common.object_exists(world.client("s3"), world.source_bucket, victim.split("/", 3)[3], "123456789012")
    assert (world.cwd / "precious.txt").read_text() == "keep me"
