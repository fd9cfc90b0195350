"""What a run will cost, estimated by 01 before anything is uploaded, and the budget guard for unattended runs.

    embedding   images × PRICE_PER_IMAGE_USD (batch; about half the on-demand price)
                or × ON_DEMAND_PRICE_PER_IMAGE_USD for `01 --retry-failed --on-demand`
    S3 Vectors  logical GB written × S3VECTORS_PUT_PRICE_PER_GB_USD
                + logical GB stored for a month × S3VECTORS_STORAGE_PRICE_PER_GB_MONTH_USD

S3 Vectors bills the *logical* size of a vector: its data (4 bytes a dimension: float32), its key (1 byte a
character) and its metadata (here `source_uri` and `job_id`, counted as the UTF-8 bytes of their names and values;
the exact way AWS counts metadata bytes is unverified, and at a few dozen bytes against 4 × dimension it barely
moves the figure). GB are 2^30 bytes, as AWS bills storage. Queries, S3 requests and data transfer are left out.
The default prices are us-east-1's (aws-facts.md, unverified): check the Amazon Bedrock and Amazon S3 pricing pages
for your region and set your own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import common
from batch_embeddings import naming

GB = 1024 ** 3
FLOAT32_BYTES = 4
BATCH_JOB_ID = "x" * 12  # a batch job id (the last part of its ARN) is 12 characters; 03 stores it as job_id
ON_DEMAND_JOB_ID = "on-demand"  # what 01 --on-demand stores as job_id
# What each vector records of its image besides source_uri and job_id (mirror.provenance), at a typical length: a
# single-part ETag (32 hex digits), a size of 7 digits, the model id, the purpose, the date.
PROVENANCE = {"etag": "x" * 32, "size": 1_234_567, "model_id": "amazon.nova-2-multimodal-embeddings-v1:0",
              "purpose": "GENERIC_INDEX", "embedded": "2026-01-01"}


@dataclass(frozen=True)
class Estimate:
    images: int
    on_demand: bool
    price_per_image: float
    logical_bytes: int  # of every vector of the run: data, key and metadata
    prices: common.Prices

    @property
    def embedding(self) -> float:
        return self.images * self.price_per_image

    @property
    def put(self) -> float:
        return self.logical_bytes / GB * self.prices.s3vectors_put_per_gb

    @property
    def storage_month(self) -> float:
        return self.logical_bytes / GB * self.prices.s3vectors_storage_per_gb_month

    @property
    def total(self) -> float:
        return self.embedding + self.put + self.storage_month


def vector_bytes(dimension: int, key: str, metadata: dict[str, str]) -> int:
    """The logical size of one vector as S3 Vectors bills it."""
    meta = sum(len(name.encode("utf-8")) + len(str(value).encode("utf-8")) for name, value in metadata.items())
    return FLOAT32_BYTES * dimension + len(key) + meta


def estimate(source_uris: Iterable[str], dimension: int, prices: common.Prices, *, on_demand: bool = False) -> Estimate:
    """The estimate for embedding and loading these images (one pass over the URIs, nothing kept).

    Every vector key has the same length (a fixed-length hash of the URI), so only the URIs' lengths vary.
    """
    job_id = ON_DEMAND_JOB_ID if on_demand else BATCH_JOB_ID
    price = prices.on_demand_per_image if on_demand else prices.per_image
    uris = iter(source_uris)
    first = next(uris, None)
    if first is None:
        return Estimate(0, on_demand, price, 0, prices)
    fixed = vector_bytes(dimension, naming.vector_key(first), {"source_uri": "", "job_id": job_id, **PROVENANCE})
    images, uri_bytes = 1, len(first.encode("utf-8"))
    for uri in uris:
        images += 1
        uri_bytes += len(uri.encode("utf-8"))
    return Estimate(images, on_demand, price, images * fixed + uri_bytes, prices)


def usd(amount: float) -> str:
    """Dollars with cents, or below a cent with its first two significant digits ($0.0036, $0.00000042)."""
    if amount == 0 or amount >= 0.01:
        return f"${amount:,.2f}"
    digits = 1 - math.floor(math.log10(amount))  # the first significant digit and the next one
    return f"${amount:.{digits}f}".rstrip("0")


def describe(est: Estimate) -> list[str]:
    kind = "on-demand (InvokeModel)" if est.on_demand else "batch"
    return [
        f"Estimated cost of this run: {usd(est.total)}",
        f"  embedding, {kind}: {est.images:,} images × {usd(est.price_per_image)} = {usd(est.embedding)}",
        f"  S3 Vectors PUT: {est.logical_bytes / GB:,.3f} GB ({est.logical_bytes:,} bytes) logical (vectors, keys, "
        "metadata) × "
        f"{usd(est.prices.s3vectors_put_per_gb)}/GB = {usd(est.put)}",
        f"  S3 Vectors storage, one month: {est.logical_bytes / GB:,.3f} GB × "
        f"{usd(est.prices.s3vectors_storage_per_gb_month)}/GB-month = {usd(est.storage_month)}",
        "  (prices from PRICE_PER_IMAGE_USD and S3VECTORS_*_USD; check the Bedrock and S3 pricing pages for your "
        "region)",
    ]


def guard(source_uris: Iterable[str], config: common.Config, *, on_demand: bool = False) -> Estimate:
    """Print the estimate; refuse the run (EXIT_OVER_BUDGET) when it is over MAX_RUN_COST_USD."""
    est = estimate(source_uris, config.embedding_dimension, config.prices, on_demand=on_demand)
    for line in describe(est):
        print(line)
    limit = config.max_run_cost_usd
    if limit is not None and est.total > limit:
        raise common.StepError(
            f"the estimated cost {usd(est.total)} of {est.images:,} images is over MAX_RUN_COST_USD={limit:g} — "
            "nothing was uploaded; raise the limit (or --max-cost) or narrow SOURCE_PREFIX", common.EXIT_OVER_BUDGET)
    if limit is not None:
        print(f"  within MAX_RUN_COST_USD={limit:g}")
    return est
