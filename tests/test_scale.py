"""Runs larger than one job, day-to-day incremental runs and retries: every image loaded exactly once."""

from __future__ import annotations


import common
from batch_embeddings import naming

QUOTAS = {"MIN_RECORDS_PER_JOB": "100", "MAX_RECORDS_PER_JOB": "500", "MAX_RECORDS_PER_FILE": "250",
          "MAX_CONCURRENT_JOBS": "3", "ON_DEMAND_MAX_IMAGES": "0"}  # the remainder joins a job (see test_on_demand)


def run_all(world, expect_load: int = 0):
    monitored = world.step(2, "--wait", "--interval", "0.1", "--timeout", "120")
    assert monitored.returncode == 0, monitored.stdout[-3000:] + monitored.stderr
    loaded = world.step(3)
    assert loaded.returncode == expect_load, loaded.stdout[-3000:] + loaded.stderr
    return monitored, loaded


def test_a_run_larger_than_one_job_is_split_by_folder_and_loads_every_image_once(world):
    world.env.update(QUOTAS)
    # The emulator lets two jobs run at once: the third submit meets ServiceQuotaExceededException.
    world.emulator("/_emulator/config", {"max_records_per_job": 500, "max_records_per_file": 250,
                                         "max_concurrent_jobs": 2})
    uris = (world.put_images([f"a/img-{i:03d}.png" for i in range(450)], prefix="2024/")
            + world.put_images([f"b/img-{i:03d}.jpg" for i in range(700)], prefix="2024/")
            + world.put_images([f"e/img-{i:03d}.png" for i in range(300)], prefix="2024/")
            + world.put_images([f"f/img-{i:03d}.png" for i in range(300)], prefix="2024/")
            + world.put_images([f"c/x/img-{i:02d}.gif" for i in range(30)], prefix="2024/")
            + world.put_images([f"top-{i:02d}.webp" for i in range(20)], prefix="2024/"))

    created = world.step(1)
    assert created.returncode == 0, created.stdout + created.stderr
    assert "Planned 5 job(s)" in created.stdout
    assert "stays queued: ServiceQuotaExceededException" in created.stdout
    run = world.job_info()["jobs"]
    # b/ is too large for one job: two jobs there, one after the other. c/x/ and the top folder are too small for
    # a job of their own: they join e/'s job, which moves up to 2024/ and so runs alone.
    assert sorted((j["input_folder"], j["record_count"]) for j in run) == [
        ("2024/", 350), ("2024/a/", 450), ("2024/b/", 350), ("2024/b/", 350), ("2024/f/", 300)]
    assert all(len(j["manifests"]) == 2 for j in run)  # 250 records per file at most
    assert sum(1 for j in run if j.get("job_arn")) == 2  # a/ and b/ first; f/ met the quota

    monitored, loaded = run_all(world)
    assert "Jobs: Completed 5" in monitored.stdout
    assert "Overall progress: 100.0% (1800/1800 records)" in monitored.stdout
    emulated = {j["jobArn"]: j for j in world.emulator("/_emulator/jobs")["jobs"]}
    for job in world.job_info()["jobs"]:
        # A job that had seen another job's manifest would have processed more records than its own.
        assert emulated[job["job_arn"]]["totalRecordCount"] == job["record_count"]
    assert "Images loaded: 1800, failed: 0, missing: 0" in loaded.stdout
    assert world.index_keys() == {naming.vector_key(uri) for uri in uris}
    assert world.vectors_accepted() == 1800  # each vector sent once
    assert world.step(4).returncode == 0

    # The next day: 150 new images. Only they are submitted.
    new = world.put_images([f"d/new-{i:03d}.png" for i in range(150)], prefix="2024/")
    day2 = world.step(1)
    assert day2.returncode == 0, day2.stdout + day2.stderr
    assert "Left out 1800 image(s): already in the vector index" in day2.stdout
    assert [j["record_count"] for j in world.job_info()["jobs"]] == [150]
    run_all(world)
    assert world.index_keys() == {naming.vector_key(uri) for uri in uris + new}
    assert world.vectors_accepted() == 1950


def test_failed_records_come_back_through_retry_failed(world):
    world.put_images([f"ok/img-{i:03d}.png" for i in range(200)], prefix="2024/")
    flaky = world.put_images([f"flaky/img-{i:03d}.png" for i in range(120)], prefix="2024/")
    world.emulator("/_emulator/config", {"fail_keys_regex": "flaky/"})
    assert world.step(1).returncode == 0
    _, loaded = run_all(world, expect_load=4)
    assert "Images loaded: 200, failed: 120, missing: 0" in loaded.stdout
    account = world.account()
    assert sorted(a["source_uri"] for a in account) == sorted(flaky)
    assert {a["error_code"] for a in account} == {"500"}

    world.emulator("/_emulator/config", {"fail_keys_regex": None})
    retried = world.step(1, "--retry-failed")
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert [j["record_count"] for j in world.job_info()["jobs"]] == [120]
    _, loaded = run_all(world)
    assert "Images loaded: 120, failed: 0, missing: 0" in loaded.stdout
    assert len(list(world.cwd.rglob("not_loaded.jsonl"))) == 1  # the first run's; the retry loaded everything
    assert len(world.index_keys()) == 320


def test_a_few_failures_are_embedded_on_demand(world):
    world.put_images([f"img-{i:03d}.png" for i in range(110)], prefix="2024/")
    world.emulator("/_emulator/config", {"fail_keys_regex": "img-00[0-9]"})
    assert world.step(1).returncode == 0
    run_all(world, expect_load=4)
    world.emulator("/_emulator/config", {"fail_keys_regex": None})

    refused = world.step(1, "--retry-failed")
    assert refused.returncode == common.EXIT_REFUSED
    assert "10 image(s) to retry, fewer than a batch job's minimum of 100" in refused.stderr
    assert "--on-demand" in refused.stderr

    on_demand = world.step(1, "--retry-failed", "--on-demand")
    assert on_demand.returncode == 0, on_demand.stdout + on_demand.stderr
    assert "Embedded and loaded 10 image(s) on demand" in on_demand.stdout
    assert len(world.index_keys()) == 110
    assert len(list(world.cwd.rglob("not_loaded.jsonl"))) == 1  # the first run's; on demand loaded everything
    again = world.step(1, "--retry-failed")
    assert again.returncode == 0 and "Left out 10 image(s): already in the vector index" in again.stdout


def test_a_partially_completed_job_reports_its_missing_images(world):
    world.put_images([f"img-{i:03d}.png" for i in range(120)], prefix="2024/")
    world.emulator("/_emulator/config", {"drop_keys_regex": "img-11[0-9]"})
    assert world.step(1).returncode == 0
    monitored = world.step(2, "--wait", "--interval", "0.1", "--timeout", "60")
    assert monitored.returncode == 4
    loaded = world.step(3)
    assert loaded.returncode == 4
    assert "Images loaded: 110, failed: 0, missing: 10" in loaded.stdout
    account = world.account()
    assert {a["status"] for a in account} == {"missing"}
    assert all("PartiallyCompleted" in a["error_message"] for a in account)
    assert world.step(3, "--accept-failures").returncode == 0
