"""The names this tool gives things: its manifests' file names, a batch record's recordId, an image's vector key,
and a job's id from its ARN. Each is derived from what it names, so a run repeated gives the same names."""

from __future__ import annotations

import hashlib

from common import StepError


MANIFEST_PREFIX = "batch_input_"
MANIFEST_SUFFIX = ".jsonl"


def is_own_manifest(key: str) -> bool:
    name = key.rsplit("/", 1)[-1]
    return name.startswith(MANIFEST_PREFIX) and name.endswith(MANIFEST_SUFFIX)


def vector_key(source_uri: str) -> str:
    """The vector key of an image: stable for its S3 URI, so loading twice overwrites."""
    return hashlib.sha256(source_uri.encode("utf-8")).hexdigest()[:32]


# A batch recordId: at most 12 characters [A-Za-z0-9] (Bedrock's documented length has varied; 12 alphanumerics is
# what is known to work), derived from the image's URI. Results are joined by the URI in modelInput; the recordId
# is only a cross-check, so an id Bedrock shortened or replaced costs a warning, not an image.
RECORD_ID_ATTEMPTS = 16  # ids tried for one URI before a job's manifest gives up (62**12 ids: never reached)
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BASE62_PAIRS = [low + high for high in _BASE62 for low in _BASE62]  # [n] = digits n % 62, n // 62


def record_id(source_uri: str, attempt: int = 0) -> str:
    """The recordId of an image in a batch manifest; `attempt` > 0 derives another one after a collision."""
    data = source_uri.encode("utf-8") if attempt == 0 else f"{attempt}\n{source_uri}".encode("utf-8")
    n = int.from_bytes(hashlib.sha256(data).digest()[:9], "big")  # 72 bits, 62**12 is about 2**71.4
    # base 62, least significant digit first, two digits at a time: six pairs (12 characters), written out
    # because 01 calls this for every image
    n, a = divmod(n, 3844)
    n, b = divmod(n, 3844)
    n, c = divmod(n, 3844)
    n, d = divmod(n, 3844)
    n, e = divmod(n, 3844)
    pairs = _BASE62_PAIRS
    return pairs[a] + pairs[b] + pairs[c] + pairs[d] + pairs[e] + pairs[n % 3844]


def record_id_matches(rid, source_uri: str) -> bool:
    """Whether `rid` is one of the recordIds 01 may have given the image (the cross-check of an output line)."""
    return isinstance(rid, str) and any(rid == record_id(source_uri, a) for a in range(RECORD_ID_ATTEMPTS))


class RecordIds:
    """The recordIds of one job: each derived from its image's URI, and unique within the job (a collision takes
    the URI's next id, so the same manifests always get the same ids)."""

    def __init__(self) -> None:
        self.used: set[str] = set()
        self.collisions = 0

    def assign(self, source_uri: str) -> str:
        for attempt in range(RECORD_ID_ATTEMPTS):
            rid = record_id(source_uri, attempt)
            if rid not in self.used:
                self.used.add(rid)
                self.collisions += attempt > 0
                return rid
        raise StepError(f"no unique recordId left for {source_uri} in its job")


def job_id_from_arn(job_arn: str) -> str:
    return job_arn.rsplit("/", 1)[-1]
