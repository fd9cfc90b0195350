"""Deleting vectors at the index's write quota: mirror.delete against the S3 Vectors stand-in, whose write quota
(2,500 vectors and 1,000 requests a second, DeleteVectors keys counted as vectors) answers 429 beyond it.

    uv run python -m benchmark.bench_delete [--vectors 10000] [--repeat 3]

Each run puts `--vectors` vectors of this prefix (256 dimensions) into a new index with the quota off, turns the
quota on, and times mirror.delete of all of them with the loader's pacer at the quota (2,500 vectors a second):
the wall time, the CPU seconds of this process, the vectors deleted a second, the 429s the index answered, and
that the index is empty after it. The stand-in runs in this process's threads, so its CPU is counted too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import boto3  # noqa: E402

import common  # noqa: E402
from batch_embeddings import mirror, naming, pacing  # noqa: E402
from tests.standins import s3vectors, serve  # noqa: E402

BUCKET, INDEX, SOURCE = "bench-vectors", "bench-index", "bench-source"


def control(url: str, what: str, payload: dict | None = None) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(f"{url}/_standin/{what}", data=data, method="POST" if data else "GET",
                                     headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request).read() or b"{}")


def run_once(url: str, n: int, number: int) -> dict:
    control(url, "reset", {})
    control(url, "config", {"vectors_per_second": 0, "requests_per_second": 0})
    client = boto3.client("s3vectors", region_name="us-east-1", endpoint_url=url, aws_access_key_id="x",
                          aws_secret_access_key="x")
    client.create_vector_bucket(vectorBucketName=BUCKET)
    client.create_index(vectorBucketName=BUCKET, indexName=INDEX, dataType="float32", dimension=256,
                        distanceMetric="cosine")
    uris = [f"s3://{SOURCE}/2024/img-{i:07d}.jpg" for i in range(n)]
    for start in range(0, n, 500):
        client.put_vectors(vectorBucketName=BUCKET, indexName=INDEX, vectors=[
            {"key": naming.vector_key(uri), "data": {"float32": [0.5] * 256}, "metadata": {"source_uri": uri}}
            for uri in uris[start:start + 500]])
    control(url, "config", {"vectors_per_second": 2500, "requests_per_second": 1000})
    config = common.Config(vector_bucket=BUCKET, vector_index=INDEX, source_bucket=SOURCE, source_prefix="2024/")
    with tempfile.TemporaryDirectory() as work:
        started, cpu = time.monotonic(), time.process_time()
        deleted = mirror.delete(client, config, [naming.vector_key(uri) for uri in uris],
                                pacing.RateLimiter.at_index_quota(), Path(work), Path(work) / mirror.DELETED_NAME)
        wall, cpu = time.monotonic() - started, time.process_time() - cpu
    stats = control(url, "stats")
    index = stats["indexes"][f"{BUCKET}/{INDEX}"]
    result = {"run": number, "deleted": deleted, "wall_s": round(wall, 2), "vectors_per_s": round(deleted / wall),
              "cpu_s": round(cpu, 2), "cpu_ms_per_vector": round(1000 * cpu / deleted, 3),
              "throttled": index["rejected_quota"], "left_in_index": index["vectors"]}
    print(json.dumps(result), flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"# {' '.join(sys.argv)}\n# uptime: {os.popen('uptime').read().strip()}", flush=True)
    served = serve(s3vectors.make_app())
    try:
        results = [run_once(served.url, args.vectors, n + 1) for n in range(args.repeat)]
    finally:
        served.stop()
    print(json.dumps({"median_wall_s": statistics.median(r["wall_s"] for r in results),
                      "median_vectors_per_s": statistics.median(r["vectors_per_s"] for r in results),
                      "median_cpu_ms_per_vector": statistics.median(r["cpu_ms_per_vector"] for r in results)}))
    print(f"# uptime: {os.popen('uptime').read().strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
