"""Deterministic fake Nova Multimodal Embeddings vectors.

The same input gives the same vector everywhere (batch output and InvokeModel), so a query by an image finds that
image. Each vector is seeded from the SHA-256 of the input, unit-length, never all-zero, and every component is
already a float32 value, so it survives float32 storage (S3 Vectors) unchanged. A shorter dimension is the
normalised prefix of the longer one, as with the Matryoshka-style truncation of the real model.
"""

from __future__ import annotations

import hashlib
import math
import random
from array import array

DIMENSIONS = (256, 384, 1024, 3072)


def _float32(values: list[float]) -> list[float]:
    return array("f", values).tolist()


def _vector(kind: str, digest: bytes, dimension: int) -> list[float]:
    if dimension not in DIMENSIONS:
        raise ValueError(f"embedding dimension must be one of {DIMENSIONS}, not {dimension!r}")
    rng = random.Random(kind.encode() + b"\0" + digest)
    while True:
        raw = [rng.gauss(0.0, 1.0) for _ in range(dimension)]
        norm = math.sqrt(math.fsum(x * x for x in raw))
        vector = _float32([x / norm for x in raw]) if norm > 0 else []
        if any(vector):
            return vector


def embed_bytes(kind: str, data: bytes, dimension: int) -> list[float]:
    """The vector of a media object (kind: IMAGE, VIDEO, AUDIO, ...) from its bytes."""
    return _vector(kind, hashlib.sha256(data).digest(), dimension)


def embed_image(data: bytes, dimension: int) -> list[float]:
    return embed_bytes("IMAGE", data, dimension)


def embed_text(text: str, dimension: int) -> list[float]:
    return _vector("TEXT", hashlib.sha256(text.encode("utf-8")).digest(), dimension)
