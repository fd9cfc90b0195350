"""Images embedded on demand: InvokeModel with a batch record's own request body, loaded into the index the way
step 3 loads a job's results (same keys, same metadata, same PutVectors sender).

Used for a run's on-demand part (a remainder too small for a batch job that would otherwise cost a wave of its
own, or a day with fewer new images than a job's minimum: 01 writes their manifest, step 3 embeds and loads them
with the batch results) and for `01_create_job.py --retry-failed --on-demand`. On demand costs about twice batch
per image (aws-facts.md), so it is kept to ON_DEMAND_MAX_IMAGES.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import orjson

import accounting
import common
import vectors

JOB_ID = "on-demand"  # the `job_id` metadata of vectors embedded on demand
THREADS = 4  # InvokeModel calls in flight


def is_part(job: dict) -> bool:
    """Whether a job-info entry is a run's on-demand part (no Bedrock job: step 3 embeds its manifest)."""
    return bool(job.get("on_demand"))


def part_records(job: dict) -> Iterator[tuple[str, dict]]:
    """(image URI, InvokeModel body) of every record of an on-demand part's local manifest."""
    for record in accounting.job_records(job, "its images cannot be embedded — run 01_create_job.py again (they "
                                              "are not in the index)"):
        yield common.image_uri(record), record["modelInput"]


def embed_and_load(requests: Iterable[tuple[str, dict]], config: common.Config, runtime, s3v, dimension: int,
                   index_ready: Callable[[], object] = lambda: None) -> tuple[set[str], list[dict]]:
    """Embed each (image URI, request body) with InvokeModel and put the vectors into the index.

    Returns the keys the index confirmed and the images that failed, as account entries (`source_uri`,
    `recordId`, `status`, `error_code`, `error_message`). A request the model refuses (400, model error) or an
    embedding the index would refuse is a failure; any other AWS error stops the step.
    """
    from botocore.exceptions import ClientError

    def embed(item):
        uri, body = item
        key = common.vector_key(uri)
        try:
            embedding = common.embed(runtime, config.model_id, body)
            return key, vectors.encode_vector(key, embedding, dimension, {"source_uri": uri, "job_id": JOB_ID}), None
        except ClientError as exc:
            if common.error_code(exc) not in ("ValidationException", "ModelErrorException"):
                raise
            return key, None, failure(uri, common.error_code(exc), exc.response["Error"].get("Message", ""))
        except vectors.VectorError as exc:
            return key, None, failure(uri, "InvalidEmbedding", str(exc))

    confirmed: set[str] = set()
    failed: list[dict] = []
    limiter = vectors.RateLimiter(2500, 1000)

    def done(batch: vectors.Batch) -> None:
        confirmed.update(batch.keys)
        failed.extend(failure(vector.source_uri, "ValidationException", f"S3 Vectors refused the vector: "
                              f"{vector.message}") for vector in batch.refused if vector.source_uri)

    sender = vectors.PutVectorsSender(s3v, config.vector_bucket, config.vector_index, limiter, threads=2,
                                      on_done=done)
    batcher = vectors.Batcher(config.vector_bucket, config.vector_index)
    try:
        with ThreadPoolExecutor(THREADS) as pool:
            for key, part, failure_entry in pool.map(embed, requests):
                if failure_entry is not None:
                    failed.append(failure_entry)
                    continue
                index_ready()
                batch = batcher.add(part, dict, key)
                if batch is not None:
                    sender.submit(batch)
        index_ready()
        sender.submit(batcher.flush({}, allow_empty=True))
    finally:
        sender.close()
    return confirmed, failed


def failure(uri: str, code: str, message: str) -> dict:
    return {"source_uri": uri, "recordId": common.vector_key(uri), "status": "failed", "error_code": code,
            "error_message": message}


def load_part(job: dict, config: common.Config, runtime, s3v, report: Path, index_ready) -> dict:
    """Step 3 for a run's on-demand part: embed and load its images, list the failures in `report` (a load
    report, as for a job), and mark the part loaded. Returns its counts like a job's."""
    dimension = int(job.get("embedding_dimension", config.embedding_dimension))
    config = dataclasses.replace(config, model_id=job.get("model_id") or config.model_id)
    requests = list(part_records(job))
    keys = [common.vector_key(uri) for uri, _ in requests]
    # A step 3 stopped half-way (Ctrl-C, a lost connection) left some of them in the index: not paid for again.
    loaded = accounting.present_keys(s3v, config.vector_bucket, config.vector_index, keys)
    if loaded:
        requests = [request for request, key in zip(requests, keys) if key not in loaded]
        print(f"{len(loaded)} image(s) of {job['job_name']} are in the index already (embedded by an earlier "
              "step 3): not embedded again")
    print(f"Embedding {len(requests)} image(s) on demand with {config.model_id} ({job['job_name']})")
    confirmed, failed = embed_and_load(requests, config, runtime, s3v, dimension, index_ready)
    embedded = len(confirmed)
    confirmed |= loaded
    common.atomic_write(report, lambda fh: fh.write(b"".join(orjson.dumps(f) + b"\n" for f in failed)))
    counts = {"total": len(confirmed) + len(failed), "success": len(confirmed), "error": len(failed),
              "inserted": embedded}
    job["load"] = {"finished": True, "counts": counts}
    common.ok(f"Embedded and loaded {embedded} image(s) on demand into {config.vector_index}"
              + (f"; {len(failed)} failed" if failed else ""))
    return dict(counts, confirmed_keys=confirmed)
