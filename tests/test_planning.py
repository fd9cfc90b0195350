"""jobs.plan_jobs: every image in exactly one job (or on demand), every job within the quotas, under a folder that
holds it, in few waves; jobs whose folders nest never run at once."""

from __future__ import annotations

import math
import random

import pytest

import common
from batch_embeddings import jobs

QUOTAS = common.Quotas(min_records_per_job=100, max_records_per_job=500, max_records_per_file=250)


def check(plan: jobs.Plan, folder_counts: dict[str, tuple[int, int]], quotas=QUOTAS, on_demand_max=0) -> None:
    covered: dict[str, list[tuple[int, int]]] = {}
    for job in plan.jobs:
        assert quotas.min_records_per_job <= job.records <= quotas.max_records_per_job, job
        for folder, start, end in job.allocations:
            assert folder.startswith(job.root), (job.root, folder)  # the image sits under the job's folder
            assert start < end
            covered.setdefault(folder, []).append((start, end))
    for folder, start, end in plan.on_demand:
        assert start < end
        covered.setdefault(folder, []).append((start, end))
    assert plan.on_demand_records <= on_demand_max
    if plan.jobs:
        assert plan.on_demand_records < quotas.min_records_per_job  # only a remainder goes on demand
    for folder, (n, _) in folder_counts.items():
        spans = sorted(covered.get(folder, []))
        assert spans and spans[0][0] == 0 and spans[-1][1] == n, folder
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), (folder, spans)  # no gap, no overlap
    check_waves(plan, quotas.max_concurrent_jobs)


def check_waves(plan: jobs.Plan, concurrent: int) -> None:
    waves = plan.waves()
    assert sorted(i for wave in waves for i in wave) == list(range(len(plan.jobs)))
    for wave in waves:
        assert 1 <= len(wave) <= concurrent
        roots = [plan.jobs[i].root for i in wave]
        assert not any(jobs.nested(a, b) for n, a in enumerate(roots) for b in roots[n + 1:]), roots
    assert len(waves) >= math.ceil(len(plan.jobs) / concurrent)


def can_root_all(folder: str) -> bool:
    return True


def summary(plan: jobs.Plan) -> list[tuple[str, int]]:
    return sorted((j.root, j.records) for j in plan.jobs)


def test_a_tree_that_fits_one_job_is_one_job_at_the_top():
    folder_counts = {"2024/": (50, 1), "2024/a/": (100, 1), "2024/b/c/": (300, 1)}
    plan = jobs.plan_jobs(folder_counts, "2024/", QUOTAS, can_root_all, on_demand_max=100)
    assert summary(plan) == [("2024/", 450)] and not plan.on_demand
    check(plan, folder_counts, on_demand_max=100)


def test_a_flat_folder_is_cut_into_balanced_jobs():
    folder_counts = {"2024/": (1201, 1)}
    plan = jobs.plan_jobs(folder_counts, "2024/", QUOTAS, can_root_all)
    assert [j.records for j in plan.jobs] == [401, 400, 400]
    assert len(plan.waves()) == 3  # same folder: one after the other
    check(plan, folder_counts)


def test_small_folders_join_a_job_that_moves_up():
    folder_counts = {"2024/a/": (450, 1), "2024/b/": (300, 1), "2024/c/": (40, 1)}
    plan = jobs.plan_jobs(folder_counts, "2024/", QUOTAS, can_root_all)
    assert summary(plan) == [("2024/", 340), ("2024/a/", 450)]
    assert len(plan.waves()) == 2  # the job at 2024/ waits for a/
    check(plan, folder_counts)


def test_a_remainder_that_would_cost_a_wave_goes_on_demand():
    folder_counts = {"2024/a/": (450, 1), "2024/b/": (300, 1), "2024/c/": (40, 1)}
    plan = jobs.plan_jobs(folder_counts, "2024/", QUOTAS, can_root_all, on_demand_max=100)
    assert summary(plan) == [("2024/a/", 450), ("2024/b/", 300)]
    assert plan.on_demand == [("2024/c/", 0, 40)]
    assert len(plan.waves()) == 1  # a/ and b/ side by side; nothing at 2024/ waits for them
    check(plan, folder_counts, on_demand_max=100)


def test_a_remainder_over_the_on_demand_limit_stays_in_batch():
    folder_counts = {"2024/a/": (450, 1), "2024/b/": (300, 1), "2024/c/": (40, 1)}
    plan = jobs.plan_jobs(folder_counts, "2024/", QUOTAS, can_root_all, on_demand_max=39)
    assert summary(plan) == [("2024/", 340), ("2024/a/", 450)] and not plan.on_demand
    check(plan, folder_counts, on_demand_max=39)


def test_a_remainder_that_costs_no_wave_stays_in_batch():
    folder_counts = {"2024/": (30, 1), "2024/a/": (400, 1)}  # one job at 2024/ takes both
    plan = jobs.plan_jobs(folder_counts, "2024/", QUOTAS, can_root_all, on_demand_max=100)
    assert summary(plan) == [("2024/", 430)] and not plan.on_demand


@pytest.mark.parametrize("limit, expected_jobs, on_demand", [(100, [], 30), (30, [], 30), (29, [("2024/", 30)], 0)])
def test_a_run_below_the_minimum_goes_on_demand_within_the_limit(limit, expected_jobs, on_demand):
    folder_counts = {"2024/a/": (10, 1), "2024/": (20, 1)}
    plan = jobs.plan_jobs(folder_counts, "2024/", QUOTAS, can_root_all, on_demand_max=limit)
    assert summary(plan) == expected_jobs  # a job below the minimum: the caller refuses it
    assert plan.on_demand_records == on_demand


def test_when_every_job_is_full_the_remainder_borrows_from_the_largest():
    folder_counts = {"2024/a/": (500, 1), "2024/b/": (500, 1), "2024/c/": (30, 1)}
    plan = jobs.plan_jobs(folder_counts, "2024/", QUOTAS, can_root_all)
    assert summary(plan) == [("2024/", 100), ("2024/a/", 430), ("2024/b/", 500)]
    check(plan, folder_counts)


def test_a_folder_bedrock_cannot_take_never_roots_a_job():
    folder_counts = {"2024/ok/": (200, 1), "2024/with space/": (200, 1)}
    quotas = common.Quotas(max_records_per_job=300)
    plan = jobs.plan_jobs(folder_counts, "2024/", quotas, lambda f: " " not in f)
    assert all(" " not in j.root for j in plan.jobs)
    check(plan, folder_counts, quotas)


def test_a_remainder_no_folder_can_take_joins_the_smallest_job_with_room():
    """No plan keeps every job at a folder Bedrock takes (the run's folder is not one): the old way, every image
    placed, the remainder in the smallest job that has room for it, which moves up to the run's folder."""
    folder_counts = {"x y/a/": (300, 1), "x y/b/": (450, 1), "x y/c/": (30, 1)}
    plan = jobs.plan_jobs(folder_counts, "x y/", QUOTAS, lambda f: f != "x y/")
    assert summary(plan) == [("x y/", 330), ("x y/b/", 450)]
    check(plan, folder_counts)


def test_a_remainder_no_job_has_room_for_borrows_from_the_largest_to_make_its_own():
    folder_counts = {"x y/a/": (490, 1), "x y/b/": (480, 1), "x y/c/": (30, 1)}
    plan = jobs.plan_jobs(folder_counts, "x y/", QUOTAS, lambda f: f != "x y/")
    assert summary(plan) == [("x y/", 100), ("x y/a/", 420), ("x y/b/", 480)]
    lent = next(j for j in plan.jobs if j.root == "x y/").allocations
    assert lent == [("x y/c/", 0, 30), ("x y/a/", 420, 490)]  # the last images of the largest job
    check(plan, folder_counts)


def test_no_image_plans_nothing_and_a_run_of_exactly_the_minimum_is_a_job():
    empty = jobs.plan_jobs({"2024/": (0, 1)}, "2024/", QUOTAS, can_root_all, on_demand_max=100)
    assert (empty.jobs, empty.on_demand, empty.max_concurrent, empty.waves()) == ([], [], 10, [])
    exact = jobs.plan_jobs({"2024/a/": (100, 1)}, "2024/", QUOTAS, can_root_all, on_demand_max=100)
    assert summary(exact) == [("2024/a/", 100)] and exact.on_demand == []  # a job, not InvokeModel at twice the price
    below = jobs.plan_jobs({"2024/a/": (99, 1)}, "2024/", QUOTAS, can_root_all, on_demand_max=100)
    assert (below.jobs, below.on_demand, below.max_concurrent) == ([], [("2024/a/", 0, 99)], 10)
    check(below, {"2024/a/": (99, 1)}, on_demand_max=100)


def test_an_on_demand_part_is_never_a_queued_job():
    assert jobs.queued({"job_name": "n"}) and not jobs.queued({"job_name": "n", "on_demand": True})
    assert not jobs.queued({"job_name": "n", "job_arn": "arn:aws:bedrock:us-east-1:1:model-invocation-job/x"})


def test_sibling_folders_share_a_job_at_their_parent_when_that_saves_waves():
    # 3 at a time, 12 folders of 100 in two months: a job a folder would be 12 jobs in 4 waves. A month (600) is
    # more than a job takes: one day of it runs on its own, then a job at the month takes the other five.
    quotas = common.Quotas(min_records_per_job=100, max_records_per_job=500, max_concurrent_jobs=3)
    folder_counts = {f"2024/{m}/{d}/": (100, 1) for m in ("01", "02") for d in range(6)}
    plan = jobs.plan_jobs(folder_counts, "2024/", quotas, can_root_all)
    assert summary(plan) == [("2024/01/", 500), ("2024/01/5/", 100), ("2024/02/", 500), ("2024/02/5/", 100)]
    assert len(plan.waves()) == 2
    check(plan, folder_counts, quotas)


def test_waves_and_who_waits_for_whom():
    roots = ["2024/a/", "2024/b/", "2024/", "2024/a/x/", "2024/c/"]
    waves = jobs.waves(roots, 2)
    assert waves == [[0, 1], [2], [3, 4]]
    assert jobs.waits_for(roots, waves) == {2: [0, 1], 3: [0, 2], 4: [2]}
    assert jobs.waves(roots, 10) == [[0, 1, 4], [2], [3]]
    assert jobs.waves(["", "x/"], 10) == [[0], [1]]  # the bucket's root holds every folder


def test_a_million_images_in_2000_image_folders_need_at_most_20_waves():
    line = 480  # bytes of a manifest line
    flat = {f"2024/f{i:03d}/": (2000, 2000 * line) for i in range(500)}
    plan = jobs.plan_jobs(flat, "2024/", common.Quotas(), can_root_all, on_demand_max=100)
    assert len(plan.waves()) <= 20  # one job a folder: 500 jobs, 50 waves at 10 at a time
    assert min(j.records for j in plan.jobs) >= 100
    check(plan, flat, common.Quotas(), 100)
    by_day = {f"2024/m{m:02d}/d{d:02d}/": (2000, 2000 * line) for m in range(20) for d in range(25)}
    plan = jobs.plan_jobs(by_day, "2024/", common.Quotas(), can_root_all, on_demand_max=100)
    assert len(plan.waves()) == 2 and len(plan.jobs) == 20  # a month a job, 10 at a time
    check(plan, by_day, common.Quotas(), 100)


def test_the_bytes_quota_bounds_a_job():
    folder_counts = {f"2024/{i}/": (200, 200 * 1000) for i in range(4)}  # 1,000 bytes a line
    quotas = common.Quotas(min_records_per_job=100, max_records_per_job=5000, max_job_bytes=450_000)
    plan = jobs.plan_jobs(folder_counts, "2024/", quotas, can_root_all)
    assert all(j.records * 1000 <= 450_000 for j in plan.jobs)
    check(plan, folder_counts, quotas)


def random_tree(rng: random.Random) -> dict[str, tuple[int, int]]:
    folders = ["2024/"]
    for _ in range(rng.randint(1, 25)):
        folders.append(rng.choice(folders) + rng.choice("abcdefgh") + str(rng.randint(0, 3)) + "/")
    folders = list(dict.fromkeys(folders))  # in order: no dependence on PYTHONHASHSEED
    folder_counts = {f: (rng.choice([0, 1, 5, 30, 99, 150, 480, 1300]), 0) for f in folders}
    return {f: (n, n * rng.choice([400, 500])) for f, (n, _) in folder_counts.items() if n}


def submit_in_random_order(plan: jobs.Plan, concurrent: int, rng: random.Random, monkeypatch) -> int:
    """Drive jobs.submit_ready over the plan, ending running jobs in random order; at every moment at most
    `concurrent` jobs run and no two of them nest. Returns how many times submit_ready was called."""
    monkeypatch.setattr(jobs, "upload_manifests", lambda *args: None)
    arns = iter(f"arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/{n:012d}" for n in range(10**6))
    monkeypatch.setattr(jobs, "create_job", lambda *args, **kwargs: next(arns))
    info = {"account_id": "123456789012", "source_bucket": "b",
            "jobs": [{"job_name": f"j{n}", "input_folder": job.root} for n, job in enumerate(plan.jobs)]}
    config = common.Config()
    calls = 0
    while True:
        jobs.submit_ready(None, None, info, config, lambda _: None, concurrent)
        calls += 1
        running = [j for j in info["jobs"] if jobs.active(j)]
        assert len(running) <= concurrent
        folders = [j["input_folder"] for j in running]
        assert not any(jobs.nested(a, b) for n, a in enumerate(folders) for b in folders[n + 1:]), folders
        if not running:
            assert all(j.get("job_arn") for j in info["jobs"])  # nothing left queued with no job running
            return calls
        rng.choice(running)["status"] = "Completed"


@pytest.mark.parametrize("seed", range(60))
def test_random_trees(seed, monkeypatch):
    rng = random.Random(seed)
    folder_counts = random_tree(rng)
    concurrent = rng.choice([1, 2, 3, 10])
    limit = rng.choice([0, 40, 100])
    quotas = common.Quotas(min_records_per_job=100, max_records_per_job=500, max_records_per_file=250,
                           max_concurrent_jobs=concurrent, max_job_bytes=rng.choice([5_000_000_000, 200_000]))
    plan = jobs.plan_jobs(folder_counts, "2024/", quotas, can_root_all, on_demand_max=limit)
    total = sum(n for n, _ in folder_counts.values())
    if total < quotas.min_records_per_job:
        # Too few for a job: on demand within the limit, else one job below the minimum, which 01 refuses.
        assert (plan.on_demand_records, summary(plan)) == ((total, []) if total <= limit else (0, [("2024/", total)]))
        return
    check(plan, folder_counts, quotas, limit)
    for job in plan.jobs:
        assert count_bytes(job, folder_counts) <= quotas.max_job_bytes
    assert submit_in_random_order(plan, concurrent, rng, monkeypatch) >= len(plan.waves())


def count_bytes(job: jobs.PlannedJob, folder_counts) -> float:
    return sum((end - start) * folder_counts[f][1] / folder_counts[f][0] for f, start, end in job.allocations)


def test_random_trees_are_the_same_under_any_hash_seed():
    import subprocess
    import sys

    code = ("import random, tests.test_planning as t; from batch_embeddings import jobs;"
            "print([(len(jobs.plan_jobs(t.random_tree(random.Random(s)), '2024/', t.QUOTAS, t.can_root_all, 40).jobs))"
            " for s in range(20)])")
    outputs = {subprocess.run([sys.executable, "-c", code], env={"PYTHONHASHSEED": seed, "PATH": ""},
                              capture_output=True, text=True, cwd=str(common_root())).stdout for seed in ("1", "2")}
    assert len(outputs) == 1 and outputs.pop().startswith("[")


def common_root():
    from pathlib import Path

    return Path(common.__file__).resolve().parent


# ---------------------------------------------------------------------------------------------------------------
# Submitting a job whose earlier submit may have reached Bedrock
# ---------------------------------------------------------------------------------------------------------------

MODEL = "amazon.nova-2-multimodal-embeddings-v1:0"


def test_an_uploaded_job_is_looked_for_by_its_exact_name_on_every_page_before_it_is_submitted(
        world, monkeypatch, capsys):
    bedrock = world.client("bedrock")
    name = "nova-mme-embedding-20261201-100000-01"

    def job(job_name: str, token: str) -> dict:
        return {"job_name": job_name, "client_request_token": token, "input_folder": "2024/", "uploaded": True,
                "input_s3_uri": f"s3://{world.source_bucket}/2024/",
                "output_s3_uri": f"s3://{world.result_bucket}/output/", "role_arn": world.role_arn,
                "model_id": MODEL, "record_count": 100, "manifests": []}

    def create(job_name: str, token: str) -> str:
        return jobs.create_job(bedrock, "123456789012", job(job_name, token))

    create(name + "0", "other1")  # names that contain ours, listed on other pages
    ours = create(name, "ours")
    create(name + "1", "other2")
    create("x" + name, "other3")
    capsys.readouterr()
    monkeypatch.setattr(jobs, "LIST_PAGE_SIZE", 1)  # a page a job: ours is on the third page (newest first)
    info = {"account_id": "123456789012", "source_bucket": world.source_bucket,
            "jobs": [job(name, "ours"), job(name[:-1] + "2", "never-submitted")]}
    saved = []
    submitted = jobs.submit_ready(None, bedrock, info, common.Config(), saved.append, 10)

    assert [j["job_name"] for j in submitted] == [name, name[:-1] + "2"]
    assert info["jobs"][0]["job_arn"] == ours and info["jobs"][0]["job_id"] == ours[-12:]
    out = capsys.readouterr().out
    assert f"Job {name} was already submitted (the answer was lost): {ours}" in out
    assert f"Creating batch inference job: {name} " not in out  # no second submit of ours
    assert f"Creating batch inference job: {name[:-1]}2 " in out  # found nowhere: submitted
    listed = [s["jobName"] for s in bedrock.list_model_invocation_jobs(maxResults=100)["invocationJobSummaries"]]
    assert sorted(listed) == sorted([name + "0", name, name + "1", "x" + name, name[:-1] + "2"])
    assert saved and all(j.get("job_arn") for j in saved[-1]["jobs"])
