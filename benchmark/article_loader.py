"""The article's way of loading a batch job's results, kept as the benchmark's baseline.

    python benchmark/article_loader.py --bucket B --prefix output/<jobId>/ --vector-bucket VB --index IX
                                       --dimension 3072 [--limit 2000]

As the article's step 3 does it (its console output: "Downloading ...", "Processing ...", "Inserting N vectors",
"Batch Size: 100", "Delay between batches: 0.5s"): download each whole `.jsonl.out` into memory, `json.loads`
every line into a list, then `put_vectors` 100 vectors per call with boto3, sleeping 0.5 s after each call.
Only the loading is copied, not the article's exact code (which is not published with it).

Endpoints and credentials come from the environment (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL_S3VECTORS, ...).
`--limit` stops after that many records (the approach takes about 1 s per 100 vectors at 3072 dimensions).
The last stdout line is a JSON object with the figures, for benchmark/bench_load.py.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

BATCH_SIZE = 100
DELAY_SECONDS = 0.5


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bucket", required=True)
    p.add_argument("--prefix", required=True, help="output/<jobId>/")
    p.add_argument("--vector-bucket", required=True)
    p.add_argument("--index", required=True)
    p.add_argument("--dimension", type=int, required=True)
    p.add_argument("--limit", type=int, default=0, help="load at most this many records (0: all)")
    args = p.parse_args(argv)

    import boto3

    region = os.environ.get("AWS_REGION", "us-east-1")
    s3 = boto3.client("s3", region_name=region)
    s3v = boto3.client("s3vectors", region_name=region)

    try:
        s3v.get_vector_bucket(vectorBucketName=args.vector_bucket)
    except s3v.exceptions.NotFoundException:
        s3v.create_vector_bucket(vectorBucketName=args.vector_bucket)
    try:
        s3v.get_index(vectorBucketName=args.vector_bucket, indexName=args.index)
    except s3v.exceptions.NotFoundException:
        s3v.create_index(vectorBucketName=args.vector_bucket, indexName=args.index, dataType="float32",
                         dimension=args.dimension, distanceMetric="cosine")

    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=args.bucket, Prefix=args.prefix).get("Contents", [])
            if o["Key"].endswith(".jsonl.out")]
    vectors: list[dict] = []
    download_seconds = parse_seconds = 0.0
    for key in keys:
        if args.limit and len(vectors) >= args.limit:
            break
        print(f"Downloading {key}...", flush=True)
        t = time.monotonic()
        content = s3.get_object(Bucket=args.bucket, Key=key)["Body"].read()  # the whole file, in memory
        download_seconds += time.monotonic() - t
        print(f"Processing {key.rsplit('/', 1)[-1]}...", flush=True)
        t = time.monotonic()
        for line in io.BytesIO(content):  # line by line over the downloaded bytes (no second copy of the file)
            if not line.strip():
                continue
            if args.limit and len(vectors) >= args.limit:
                break
            record = json.loads(line)
            if "modelOutput" not in record:
                continue
            uri = record["modelInput"]["singleEmbeddingParams"]["image"]["source"]["s3Location"]["uri"]
            vectors.append({"key": record["recordId"],
                            "data": {"float32": record["modelOutput"]["embeddings"][0]["embedding"]},
                            "metadata": {"source_uri": uri}})
        del content
        parse_seconds += time.monotonic() - t

    print(f"Inserting {len(vectors)} vectors to S3 Vectors...", flush=True)
    print(f"Batch Size: {BATCH_SIZE}")
    print(f"Delay between batches: {DELAY_SECONDS}s (rate limiting)", flush=True)
    t = time.monotonic()
    requests = 0
    for start in range(0, len(vectors), BATCH_SIZE):
        batch = vectors[start:start + BATCH_SIZE]
        s3v.put_vectors(vectorBucketName=args.vector_bucket, indexName=args.index, vectors=batch)
        requests += 1
        print(f"✓ Batch {requests}: Inserted {len(batch)} vectors", flush=True)
        time.sleep(DELAY_SECONDS)
    insert_seconds = time.monotonic() - t
    print(f"✓ Total vectors inserted: {len(vectors)}")
    print(json.dumps({"vectors": len(vectors), "requests": requests, "download_seconds": download_seconds,
                      "parse_seconds": parse_seconds, "insert_seconds": insert_seconds,
                      "seconds_in_process": time.monotonic() - started}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
