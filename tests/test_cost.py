"""01's cost estimate (cost.py) and the budget guard: the arithmetic, what 01 prints, and that it refuses a run over
MAX_RUN_COST_USD before anything is uploaded or submitted."""

from __future__ import annotations

import json

import pytest

import common
from batch_embeddings import cost, naming

IMAGES = [f"img-{i:03d}.png" for i in range(120)]
# etag (32 hex digits), size (7 digits), model_id, purpose, embedded (a date): names and values
PROVENANCE_BYTES = 4 + 32 + 4 + 7 + 8 + len("amazon.nova-2-multimodal-embeddings-v1:0") + 7 + 13 + 8 + 10


def expected(uris: list[str], dimension: int, job_id_len: int = 12, per_image: float = 0.00003,
             put: float = 0.20, storage: float = 0.06) -> tuple[float, int]:
    """Worked out here, independently: 4 bytes a dimension + the key + metadata names and values."""
    logical = sum(4 * dimension + 32 + len("source_uri") + len(uri.encode()) + len("job_id") + job_id_len
                  + PROVENANCE_BYTES for uri in uris)
    gb = logical / 2 ** 30
    return len(uris) * per_image + gb * put + gb * storage, logical


def test_vector_bytes_counts_data_key_and_metadata():
    assert cost.vector_bytes(1024, "k" * 32, {"source_uri": "s3://b/中.png", "job_id": "abcdefghijkl"}) == \
        4096 + 32 + 10 + len("s3://b/中.png".encode()) + 6 + 12


def test_estimate_of_a_million_images_at_3072_dimensions():
    uris = (f"s3://nova-mme-demo-source-image/2024/{i:08d}.jpg" for i in range(1_000_000))
    est = cost.estimate(uris, 3072, common.Prices())
    assert est.images == 1_000_000
    per_vector = 4 * 3072 + 32 + 10 + len("s3://nova-mme-demo-source-image/2024/00000000.jpg") + 6 + 12
    assert est.logical_bytes == 1_000_000 * (per_vector + PROVENANCE_BYTES)
    assert est.embedding == pytest.approx(30.0)  # 1 M × $0.00003
    assert est.put == pytest.approx(est.logical_bytes / 2 ** 30 * 0.20)
    assert est.storage_month == pytest.approx(est.logical_bytes / 2 ** 30 * 0.06)
    assert est.total == pytest.approx(30.0 + 11.67 * 0.26, rel=1e-3)  # 11.67 GB logical
    on_demand = cost.estimate(["s3://b/a.png"], 256, common.Prices(), on_demand=True)
    assert on_demand.embedding == pytest.approx(0.00006)


def test_dollars_are_shown_to_the_cent_or_to_the_first_digits():
    assert cost.usd(1234.5) == "$1,234.50"
    assert cost.usd(0.0036) == "$0.0036"
    assert cost.usd(0) == "$0.00"


def _estimate_lines(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Estimated cost of this run:"))
    return lines[start:start + 5]


def test_dry_run_prints_the_estimate(world):
    uris = world.put_images(IMAGES, prefix="2024/")
    result = world.step(1, "--dry-run", env={"VECTOR_BUCKET": "", "VECTOR_INDEX": ""})
    assert result.returncode == 0, result.stdout + result.stderr
    total, logical = expected(uris, 256)
    lines = _estimate_lines(result.stdout)
    assert lines[0] == f"Estimated cost of this run: {cost.usd(total)}"
    assert lines[1] == "  embedding, batch: 120 images × $0.00003 = $0.0036"
    assert f"{logical / 2 ** 30:,.3f} GB ({logical:,} bytes) logical" in lines[2]
    assert "pricing pages for your region" in lines[4]
    assert result.stdout.index("Estimated cost") < result.stdout.index("Dry run: nothing uploaded")


def test_prices_come_from_the_settings(world):
    uris = world.put_images(IMAGES, prefix="2024/")
    env = {"VECTOR_BUCKET": "", "VECTOR_INDEX": "", "PRICE_PER_IMAGE_USD": "0.001",
           "S3VECTORS_PUT_PRICE_PER_GB_USD": "100", "S3VECTORS_STORAGE_PRICE_PER_GB_MONTH_USD": "10"}
    result = world.step(1, "--dry-run", "--price-per-image", "0.002", env=env)
    assert result.returncode == 0, result.stderr
    total, _ = expected(uris, 256, per_image=0.002, put=100, storage=10)
    assert _estimate_lines(result.stdout)[0] == f"Estimated cost of this run: {cost.usd(total)}"
    assert "120 images × $0.002 = $0.24" in result.stdout


def test_over_budget_refuses_with_exit_8_and_uploads_nothing(world):
    world.put_images(IMAGES, prefix="2024/")
    result = world.step(1, env={"MAX_RUN_COST_USD": "0.001"})
    assert result.returncode == common.EXIT_OVER_BUDGET == 8, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("error: the estimated cost $0.00") and "MAX_RUN_COST_USD=0.001" in lines[0]
    assert "nothing was uploaded" in lines[0]
    assert "Estimated cost of this run" in result.stdout
    keys = [o["Key"] for o in world.client("s3").list_objects_v2(Bucket=world.source_bucket).get("Contents", [])]
    assert not [k for k in keys if k.endswith(".jsonl")]  # no manifest uploaded
    assert world.emulator("/_emulator/jobs")["jobs"] == []  # no job submitted
    assert not (world.cwd / "batch_job_info.json").exists()
    assert not list(world.cwd.glob("*.jsonl"))  # no local manifest left either

    dry = world.step(1, "--dry-run", env={"MAX_RUN_COST_USD": "0.001"})
    assert dry.returncode == 8 and "over MAX_RUN_COST_USD" in dry.stderr


def test_within_budget_goes_ahead_and_the_flag_wins(world):
    world.put_images(IMAGES, prefix="2024/")
    result = world.step(1, "--max-cost", "5", env={"MAX_RUN_COST_USD": "0.001"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "within MAX_RUN_COST_USD=5" in result.stdout
    assert len(world.emulator("/_emulator/jobs")["jobs"]) == 1


@pytest.mark.parametrize("name, value", [("MAX_RUN_COST_USD", "ten"), ("PRICE_PER_IMAGE_USD", "-1"),
                                         ("S3VECTORS_PUT_PRICE_PER_GB_USD", "0,20")])
def test_a_bad_price_or_limit_is_one_line_exit_2(world, name, value):
    result = world.step(1, "--dry-run", env={name: value})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{name}={value!r} must be an amount in USD" in lines[0]


def test_on_demand_retry_is_estimated_at_the_on_demand_price(world):
    uris = world.put_images(IMAGES[:3], prefix="2024/")
    (world.cwd / "not_loaded.jsonl").write_text("".join(json.dumps({"source_uri": u}) + "\n" for u in uris))
    result = world.step(1, "--retry-failed", "--on-demand", env={"MAX_RUN_COST_USD": "0.0001"})
    assert result.returncode == 8, result.stdout + result.stderr
    assert "embedding, on-demand (InvokeModel): 3 images × $0.00006 = $0.00018" in result.stdout
    assert "Embedding" not in result.stdout  # refused before the first InvokeModel
    ok = world.step(1, "--retry-failed", "--on-demand", env={"MAX_RUN_COST_USD": "0.01"})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    total, _ = expected(uris, 256, job_id_len=len("on-demand"), per_image=0.00006)
    assert f"Estimated cost of this run: {cost.usd(total)}" in ok.stdout
    assert world.index_keys() == {naming.vector_key(u) for u in uris}
