"""Step 5's search: the query (a text, an S3 image or a local one, checked before any AWS call) and its request
body, the index's shape, QueryVectors page by page, the hits, and pre-signed links to their images."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import common
from batch_embeddings import nova
from common import StepError

TEXT_PURPOSE = "IMAGE_RETRIEVAL"  # text → image search over image embeddings (aws-facts.md)
IMAGE_PURPOSE = "GENERIC_RETRIEVAL"  # image → image: both sides are images
MAX_INVOKE_BODY_BYTES = 25_000_000  # botocore's bedrock-runtime model: InvokeModel body max
BODY_ALLOWANCE = 1024  # the request around an inline image's base64


@dataclass(frozen=True)
class Query:
    """What to search by, checked (and a local image read) before any AWS call."""

    label: str
    purpose: str
    text: str | None = None
    image_uri: str | None = None
    image_data: bytes | None = None
    image_format: str | None = None
    image_path: str | None = None

    def request(self, dimension: int, owner: str | None) -> dict:
        """The InvokeModel body."""
        if self.text is not None:
            return nova.text_request(self.text, dimension, self.purpose)
        if self.image_uri is not None:
            return nova.image_request(self.image_uri, self.image_format, owner, dimension, self.purpose)
        return nova.image_bytes_request(self.image_data, self.image_format, dimension, self.purpose)


def image_format(name: str, shown: str) -> str:
    suffix = PurePosixPath(name).suffix.lower()
    fmt = nova.IMAGE_FORMATS.get(suffix)
    if fmt is None:
        kind = f"'{suffix}'" if suffix else "(no extension)"
        raise StepError(f"{shown}: unsupported image type {kind} — the model takes "
                        f"{', '.join(nova.IMAGE_FORMATS)}", common.EXIT_USAGE)
    return fmt


def read_local_image(path: Path) -> tuple[bytes, str]:
    """The bytes and format of a local image, refused when the model or an InvokeModel request cannot take it."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise StepError(f"{path}: no such file", common.EXIT_USAGE) from None
    except OSError as exc:
        raise StepError(f"{path}: {exc.strerror}", common.EXIT_USAGE) from None
    if not path.is_file():
        raise StepError(f"{path}: not a file", common.EXIT_USAGE)
    fmt = image_format(path.name, str(path))
    if size == 0:
        raise StepError(f"{path}: the file is empty", common.EXIT_USAGE)
    if size > nova.MAX_IMAGE_BYTES:
        raise StepError(f"{path}: {size / 1e6:.1f} MB; the model takes images up to 50 MB", common.EXIT_USAGE)
    if 4 * ((size + 2) // 3) + BODY_ALLOWANCE > MAX_INVOKE_BODY_BYTES:
        raise StepError(f"{path}: {size / 1e6:.1f} MB is too large to send inline (base64 in InvokeModel's 25 MB "
                        "request) — upload it to S3 and pass --image s3://bucket/key", common.EXIT_USAGE)
    try:
        return path.read_bytes(), fmt
    except OSError as exc:
        raise StepError(f"{path}: {exc.strerror}", common.EXIT_USAGE) from None


def read_query(text: str | None = None, image: str | None = None, purpose: str | None = None) -> Query:
    """The query: a text, or an image (s3://bucket/key, or a local file, read now); `purpose` overrides the
    embedding purpose of its kind."""
    if text is not None:
        return Query(f'text "{text}"', purpose or TEXT_PURPOSE, text=text)
    purpose = purpose or IMAGE_PURPOSE
    if image.startswith("s3://"):
        bucket, key = common.parse_s3_uri(image)
        if not common.BUCKET_RE.fullmatch(bucket) or not key or key.endswith("/"):
            raise StepError(f"{image} is not an S3 object URI like s3://bucket/2024/photo.jpg", common.EXIT_USAGE)
        fmt = image_format(key, image)
        return Query(f"image {image}", purpose, image_uri=image, image_format=fmt)
    path = Path(image).expanduser()
    data, fmt = read_local_image(path)
    return Query(f"image {path} ({len(data):,} bytes)", purpose, image_data=data, image_format=fmt,
                 image_path=str(path))


def parse_filter(raw: str | None) -> dict | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise StepError(f"--filter is not valid JSON ({exc.msg} at character {exc.pos}): {raw}",
                        common.EXIT_USAGE) from None
    if not isinstance(value, dict) or not value:
        raise StepError(f"--filter must be a non-empty JSON object like "
                        f"'{{\"source_uri\": {{\"$eq\": \"s3://bucket/key.jpg\"}}}}', not {raw}", common.EXIT_USAGE)
    return value


def index_shape(s3v, bucket: str, index: str, configured: int) -> tuple[int, str]:
    """The index's dimension and distance metric; the index decides the dimension the query is embedded at."""
    try:
        found = s3v.get_index(vectorBucketName=bucket, indexName=index)["index"]
    except s3v.exceptions.NotFoundException as exc:
        raise StepError(f"{common.describe_aws_error(exc)} — check VECTOR_BUCKET and VECTOR_INDEX, or load the "
                        "index with 03_load_result_to_s3_vector_bucket.py") from None
    dimension = found["dimension"]
    if dimension not in common.DIMENSIONS:
        raise StepError(f"index {index} in {bucket} holds {dimension}-dimension vectors, which Nova Multimodal "
                        "Embeddings does not produce (256, 384, 1024, 3072) — is VECTOR_INDEX right?",
                        common.EXIT_USAGE)
    if dimension != configured:
        raise StepError(f"index {index} in {bucket} holds {dimension}-dimension vectors but EMBEDDING_DIMENSION is "
                        f"{configured} — set EMBEDDING_DIMENSION={dimension} (or --dimension {dimension})",
                        common.EXIT_USAGE)
    return dimension, found.get("distanceMetric", "?")


def query_index(s3v, bucket: str, index: str, vector: list[float], top_k: int, flt: dict | None) -> list[dict]:
    params = {"vectorBucketName": bucket, "indexName": index, "topK": top_k, "queryVector": {"float32": vector},
              "returnMetadata": True, "returnDistance": True}
    if flt is not None:
        params["filter"] = flt
    found: list[dict] = []
    try:
        for _ in range(top_k):  # every page holds at least one result: at most top_k pages
            page = s3v.query_vectors(**params)
            found.extend(page.get("vectors", []))
            token = page.get("nextToken")
            if not token or len(found) >= top_k:
                break
            params["nextToken"] = token  # the same query again, for the next page (S3 user guide)
    except s3v.exceptions.ValidationException as exc:
        if "topk" in exc.response.get("Error", {}).get("Message", "").lower():
            raise StepError(f"the index refused --top-k {top_k}: {common.describe_aws_error(exc)} — use a smaller "
                            "--top-k", common.EXIT_USAGE) from None
        if flt is None:
            raise
        raise StepError(f"{common.describe_aws_error(exc)} — check --filter", common.EXIT_USAGE) from None
    return found[:top_k]


def to_hits(vectors: list[dict]) -> list[dict]:
    hits = []
    for rank, vector in enumerate(vectors, start=1):
        metadata = vector.get("metadata") or {}
        hits.append({"rank": rank, "key": vector["key"], "distance": vector.get("distance"),
                     "source_uri": metadata.get("source_uri"), "embedded": metadata.get("embedded"),
                     "metadata": metadata})
    return hits


def add_links(hits: list[dict], config: common.Config, seconds: int) -> None:
    """A pre-signed GetObject link for each hit's image (made locally: no call, no check that the object exists)."""
    clients = {}
    for hit in hits:
        uri = hit["source_uri"]
        hit["url"] = None
        if not isinstance(uri, str) or not uri.startswith("s3://"):
            continue
        bucket, key = common.parse_s3_uri(uri)
        path_style = "." in bucket
        if path_style not in clients:
            clients[path_style] = common.make_presign_client(config, path_style=path_style)
        hit["url"] = clients[path_style].generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=seconds)


def presign(config: common.Config, uri: str, seconds: int) -> str:
    """A pre-signed GetObject link for an s3:// URI (made locally: no call)."""
    bucket, key = common.parse_s3_uri(uri)
    client = common.make_presign_client(config, path_style="." in bucket)
    return client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=seconds)
