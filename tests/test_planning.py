"""jobs.plan_jobs: every image in exactly one job, every job within the quotas, under a folder that holds it."""

from __future__ import annotations

import random

import pytest

import common
import jobs

QUOTAS = common.Quotas(min_records_per_job=100, max_records_per_job=500, max_records_per_file=250)


def check(planned: list[jobs.PlannedJob], folder_counts: dict[str, tuple[int, int]], quotas=QUOTAS) -> None:
    covered: dict[str, list[tuple[int, int]]] = {}
    for job in planned:
        assert quotas.min_records_per_job <= job.records <= quotas.max_records_per_job, job
        for folder, start, end in job.allocations:
            assert folder.startswith(job.root), (job.root, folder)  # the image sits under the job's folder
            assert start < end
            covered.setdefault(folder, []).append((start, end))
    for folder, (n, _) in folder_counts.items():
        spans = sorted(covered.get(folder, []))
        assert spans and spans[0][0] == 0 and spans[-1][1] == n, folder
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), (folder, spans)  # no gap, no overlap


def can_root_all(folder: str) -> bool:
    return True


def test_a_tree_that_fits_one_job_is_one_job_at_the_top():
    folder_counts = {"2024/": (50, 1), "2024/a/": (100, 1), "2024/b/c/": (300, 1)}
    planned = jobs.plan_jobs(folder_counts, "2024/", QUOTAS, can_root_all)
    assert [(j.root, j.records) for j in planned] == [("2024/", 450)]
    check(planned, folder_counts)


def test_a_flat_folder_is_cut_into_balanced_jobs():
    folder_counts = {"2024/": (1201, 1)}
    planned = jobs.plan_jobs(folder_counts, "2024/", QUOTAS, can_root_all)
    assert [j.records for j in planned] == [401, 400, 400]
    check(planned, folder_counts)


def test_small_folders_join_a_job_that_moves_up():
    folder_counts = {"2024/a/": (450, 1), "2024/b/": (300, 1), "2024/c/": (40, 1)}
    planned = jobs.plan_jobs(folder_counts, "2024/", QUOTAS, can_root_all)
    assert sorted((j.root, j.records) for j in planned) == [("2024/", 340), ("2024/a/", 450)]
    check(planned, folder_counts)


def test_when_every_job_is_full_the_remainder_borrows_from_the_largest():
    folder_counts = {"2024/a/": (500, 1), "2024/b/": (500, 1), "2024/c/": (30, 1)}
    planned = jobs.plan_jobs(folder_counts, "2024/", QUOTAS, can_root_all)
    assert sorted((j.root, j.records) for j in planned) == [("2024/", 100), ("2024/a/", 430), ("2024/b/", 500)]
    check(planned, folder_counts)


def test_a_folder_bedrock_cannot_take_never_roots_a_job():
    folder_counts = {"2024/ok/": (200, 1), "2024/with space/": (200, 1)}
    planned = jobs.plan_jobs(folder_counts, "2024/", common.Quotas(max_records_per_job=300),
                             lambda f: " " not in f)
    assert all(" " not in j.root for j in planned)
    check(planned, folder_counts, common.Quotas(max_records_per_job=300))


@pytest.mark.parametrize("seed", range(40))
def test_random_trees(seed):
    rng = random.Random(seed)
    folders = ["2024/"]
    for _ in range(rng.randint(1, 25)):
        folders.append(rng.choice(folders) + rng.choice("abcdefgh") + str(rng.randint(0, 3)) + "/")
    folder_counts = {f: (rng.choice([0, 1, 5, 30, 99, 150, 480, 1300]), 1) for f in set(folders)}
    folder_counts = {f: c for f, c in folder_counts.items() if c[0]}
    total = sum(n for n, _ in folder_counts.values())
    if total < QUOTAS.min_records_per_job:
        return
    planned = jobs.plan_jobs(folder_counts, "2024/", QUOTAS, can_root_all)
    check(planned, folder_counts)
