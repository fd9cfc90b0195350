"""The benchmark's verdict lines: which target each run is held to (the figures themselves are measured by
`benchmark/bench_load.py`, never by a timed test)."""

from __future__ import annotations

from benchmark import bench_load


def summary(**changes) -> dict:
    total = {"vectors_per_s": 1625.0, "steady_vectors_per_s": 2061.0, "cpu_ms_per_vector_main": 0.16,
             "cpu_ms_per_vector": 0.72, "peak_rss_mb": 174.0, "requests_accepted": 20, "min_requests_for_payload": 20,
             "vectors_accepted": 10_000, "index_check": "OK", "keys_check": "OK", "vectors_in_index": 10_000,
             "records": 10_000, "resent_vectors": 0, "exit_code": 0}
    return total | changes


def once_loading(lines: list[str]) -> str:
    return next(line for line in lines if "once loading" in line)


def test_a_run_with_faults_is_held_to_0_8_of_the_quota_once_loading():
    assert once_loading(bench_load.verdicts(summary(), 2500, faults=True)) == (
        "PASS once loading: 2,061 vectors/s, 0.82 of the quota (target >= 2,000 with faults)")
    assert once_loading(bench_load.verdicts(summary(steady_vectors_per_s=1944.0), 2500, faults=True)).startswith(
        "MISS once loading: 1,944 vectors/s, 0.78 of the quota")


def test_a_run_without_faults_is_held_to_0_92_of_the_quota_once_loading():
    assert once_loading(bench_load.verdicts(summary(), 2500)) == (
        "MISS once loading: 2,061 vectors/s, 0.82 of the quota (target >= 2,300)")
    assert once_loading(bench_load.verdicts(summary(steady_vectors_per_s=2325.0), 2500)).startswith("PASS")
