"""Sending encoded vectors to the S3 Vectors stand-in through the loader's sender, for the loader's tests."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from batch_embeddings import pacing, vectors


class FakeClock:
    """Time that moves only when someone sleeps: the sender, the pacer and the stand-in's quota can share it."""

    def __init__(self, start: float = 0.0):
        self.now = start

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += max(seconds, 0)


@dataclass
class IndexEndpoint:
    """A stand-in serving one 8-dimension index `bucket/index`, and a client of it without botocore's retries."""

    app: object
    url: str
    client: object


def send_parts(client, parts, limiter, *, per_request=25, threads=1, clock: FakeClock | None = None,
               max_backoff=20.0):
    """Send `parts` in requests of `per_request` vectors; returns (the sender, the batches done). With a clock,
    time moves only when the sender sleeps; without one, its backoff sleeps at most 10 ms of real time."""
    done = []
    timing = {"sleep": clock.sleep, "clock": clock, "jitter": random.Random(0).random} if clock else \
        {"sleep": lambda s: time.sleep(min(s, 0.01))}
    sender = pacing.PutVectorsSender(client, "bucket", "index", limiter, threads=threads, on_done=done.append,
                                      max_backoff=max_backoff, **timing)
    batcher = vectors.Batcher("bucket", "index", max_vectors=per_request)
    for i, part in enumerate(parts):
        if (batch := batcher.add(part, lambda i=i: {"i": i})) is not None:
            sender.submit(batch)
    sender.submit(batcher.flush({"i": len(parts)}))
    sender.close()
    return sender, done
