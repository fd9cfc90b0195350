"""01's cost estimate and budget guard at their edges: a run that costs exactly the budget goes ahead, a cent
more is refused; a key's non-ASCII characters are billed as the UTF-8 bytes S3 Vectors stores."""

from __future__ import annotations

import types

import pytest

import common
from batch_embeddings import cost, naming

# Half a dollar an image and nothing for S3 Vectors: every total is exact in binary floating point.
HALF_DOLLAR = common.Prices(per_image=0.5, on_demand_per_image=1.0, s3vectors_put_per_gb=0.0,
                            s3vectors_storage_per_gb_month=0.0)


def config(limit):
    return types.SimpleNamespace(embedding_dimension=256, prices=HALF_DOLLAR, max_run_cost_usd=limit)


def test_a_run_at_exactly_the_budget_goes_ahead(capsys):
    est = cost.guard(["s3://b/1.jpg", "s3://b/2.jpg"], config(1.0))
    assert est.total == 1.0
    out = capsys.readouterr().out
    assert "Estimated cost of this run: $1.00" in out and "  within MAX_RUN_COST_USD=1\n" in out


def test_a_run_over_the_budget_is_refused_with_exit_8(capsys):
    with pytest.raises(common.StepError) as caught:
        cost.guard(["s3://b/1.jpg", "s3://b/2.jpg", "s3://b/3.jpg"], config(1.0))
    assert caught.value.exit_code == common.EXIT_OVER_BUDGET
    assert str(caught.value) == ("the estimated cost $1.50 of 3 images is over MAX_RUN_COST_USD=1 — nothing was "
                                 "uploaded; raise the limit (or --max-cost) or narrow SOURCE_PREFIX")
    assert "within" not in capsys.readouterr().out


def test_without_a_budget_nothing_is_refused(capsys):
    est = cost.guard([f"s3://b/{i}.jpg" for i in range(1000)], config(None))
    assert est.total == 500.0 and "within" not in capsys.readouterr().out


def logical_bytes(uris) -> int:
    return cost.estimate(uris, 256, HALF_DOLLAR).logical_bytes


@pytest.mark.parametrize("at", [0, 1, 2])
def test_a_non_ascii_key_is_counted_in_utf8_bytes(at):
    """'é' is 2 bytes in UTF-8 and '中' 3: the vector's metadata holds the URI as UTF-8."""
    plain = ["s3://b/cafe-0.jpg", "s3://b/cafe-1.jpg", "s3://b/cafe-2.jpg"]
    accented = list(plain)
    accented[at] = accented[at].replace("cafe", "café")
    chinese = list(plain)
    chinese[at] = chinese[at].replace("cafe", "中afe")
    assert logical_bytes(accented) == logical_bytes(plain) + 1
    assert logical_bytes(chinese) == logical_bytes(plain) + 2


def test_the_printed_estimate_counts_every_byte_of_a_vector(capsys):
    uri = "s3://b/写真/café.jpg"
    one = cost.vector_bytes(256, naming.vector_key(uri), {"source_uri": uri, "job_id": cost.BATCH_JOB_ID,
                                                          **cost.PROVENANCE})
    assert one == 4 * 256 + 32 + len("source_uri") + len(uri.encode("utf-8")) + len("job_id") + 12 + \
        4 + 32 + 4 + 7 + 8 + len("amazon.nova-2-multimodal-embeddings-v1:0") + 7 + 13 + 8 + 10  # the provenance
    cost.guard([uri, uri], config(None))
    assert f"({2 * one:,} bytes) logical" in capsys.readouterr().out


def test_an_on_demand_run_is_priced_and_described_as_on_demand(capsys):
    uri = "s3://b/1.jpg"
    est = cost.guard([uri], config(None), on_demand=True)
    one = cost.vector_bytes(256, naming.vector_key(uri), {"source_uri": uri, "job_id": cost.ON_DEMAND_JOB_ID,
                                                          **cost.PROVENANCE})
    assert (est.images, est.on_demand, est.price_per_image, est.logical_bytes) == (1, True, 1.0, one)
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["Estimated cost of this run: $1.00",
                       "  embedding, on-demand (InvokeModel): 1 images × $1.00 = $1.00"]
    batch = cost.estimate([uri], 256, HALF_DOLLAR)
    assert batch.logical_bytes == one - len(cost.ON_DEMAND_JOB_ID) + len(cost.BATCH_JOB_ID)
    assert cost.describe(batch)[1] == "  embedding, batch: 1 images × $0.50 = $0.50"


def test_no_image_costs_nothing(capsys):
    est = cost.guard([], config(0.0))
    assert (est.images, est.on_demand, est.price_per_image, est.logical_bytes, est.total) == (0, False, 0.5, 0, 0)
    assert capsys.readouterr().out.splitlines()[0] == "Estimated cost of this run: $0.00"


def test_the_estimate_lines_name_every_part_of_the_price():
    prices = common.Prices(per_image=0.00003, on_demand_per_image=0.00006, s3vectors_put_per_gb=0.2,
                           s3vectors_storage_per_gb_month=0.06)
    est = cost.estimate((f"s3://bucket/2024/img-{i:07d}.jpg" for i in range(1_000_000)), 1024, prices)
    lines = cost.describe(est)
    assert est.logical_bytes == 1_000_000 * cost.vector_bytes(1024, "k" * 32, {"source_uri": "s3://bucket/2024/img-"
                                                                                             "0000000.jpg",
                                                                               "job_id": "x" * 12,
                                                                               **cost.PROVENANCE})
    gb = est.logical_bytes / cost.GB
    assert lines[0] == f"Estimated cost of this run: {cost.usd(30 + gb * 0.2 + gb * 0.06)}"
    assert lines[1] == "  embedding, batch: 1,000,000 images × $0.00003 = $30.00"
    assert lines[2] == (f"  S3 Vectors PUT: {gb:,.3f} GB ({est.logical_bytes:,} bytes) logical (vectors, keys, "
                        f"metadata) × $0.20/GB = {cost.usd(gb * 0.2)}")
    assert lines[3] == f"  S3 Vectors storage, one month: {gb:,.3f} GB × $0.06/GB-month = {cost.usd(gb * 0.06)}"
    assert lines[4] == ("  (prices from PRICE_PER_IMAGE_USD and S3VECTORS_*_USD; check the Bedrock and S3 pricing pages for "
                        "your region)")


@pytest.mark.parametrize("amount, shown", [(0.01, "$0.01"), (0.0099, "$0.0099"), (0.00000042, "$0.00000042"),
                                           (0.0004, "$0.0004"), (0.00123, "$0.0012"), (1e-9, "$0.000000001")])
def test_amounts_below_a_cent_show_their_first_two_digits(amount, shown):
    assert cost.usd(amount) == shown
