"""The Nova Multimodal Embeddings model: the request bodies this tool sends it (an image in S3 for a batch record
or an on-demand call, an inline image or a text for a query), the image formats and size it reads, and the
embedding an InvokeModel call answers."""

from __future__ import annotations

import json

from batch_embeddings import naming
from common import StepError


IMAGE_FORMATS = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".gif": "gif", ".webp": "webp"}
MAX_IMAGE_BYTES = 50 * 1000 * 1000  # the model's 50 MB image limit


def image_request(uri: str, fmt: str, owner: str, dimension: int, purpose: str) -> dict:
    """The Nova Multimodal Embeddings request body for an image in S3 (a batch record's modelInput)."""
    return {
        "taskType": "SINGLE_EMBEDDING",
        "singleEmbeddingParams": {
            "embeddingPurpose": purpose,
            "embeddingDimension": dimension,
            "image": {"format": fmt, "source": {"s3Location": {"uri": uri, "bucketOwner": owner}}},
        },
    }


def image_uri(record: dict) -> str | None:
    """The S3 URI of the image a batch record (a manifest line or an output line) is about."""
    try:
        return record["modelInput"]["singleEmbeddingParams"]["image"]["source"]["s3Location"]["uri"]
    except (KeyError, TypeError):
        return None


def image_record(uri: str, fmt: str, owner: str, dimension: int, purpose: str, rid: str | None = None) -> dict:
    """One line of the batch manifest. Results join back to the image by the URI in modelInput; `rid` is the
    recordId the job's RecordIds gave it (by default the URI's first id)."""
    return {"recordId": rid or naming.record_id(uri), "modelInput": image_request(uri, fmt, owner, dimension, purpose)}


def text_request(text: str, dimension: int, purpose: str) -> dict:
    """The Nova Multimodal Embeddings request body for a text. The model reads up to 8K tokens (how many characters
    that is depends on the text): past them it cuts the end (truncationMode END) and says so in the answer's
    `truncatedCharLength` (see `embed_answer`)."""
    return {
        "taskType": "SINGLE_EMBEDDING",
        "singleEmbeddingParams": {
            "embeddingPurpose": purpose,
            "embeddingDimension": dimension,
            "text": {"truncationMode": "END", "value": text},
        },
    }


def image_bytes_request(data: bytes, fmt: str, dimension: int, purpose: str) -> dict:
    """The Nova Multimodal Embeddings request body for an image sent inline (base64) instead of read from S3."""
    import base64

    return {
        "taskType": "SINGLE_EMBEDDING",
        "singleEmbeddingParams": {
            "embeddingPurpose": purpose,
            "embeddingDimension": dimension,
            "image": {"format": fmt, "source": {"bytes": base64.b64encode(data).decode("ascii")}},
        },
    }


def embed(runtime, model_id: str, body: dict) -> list[float]:
    """One InvokeModel call on bedrock-runtime; the embedding it answers."""
    return embed_answer(runtime, model_id, body)["embedding"]


def embed_answer(runtime, model_id: str, body: dict) -> dict:
    """One InvokeModel call on bedrock-runtime; the first embedding of its answer as the model gives it: `embedding`,
    `embeddingType`, and `truncatedCharLength` only when the model cut a text."""
    response = runtime.invoke_model(modelId=model_id, body=json.dumps(body, ensure_ascii=False).encode("utf-8"),
                                    contentType="application/json", accept="application/json")
    answer = json.loads(response["body"].read())
    try:
        item = answer["embeddings"][0]
        item["embedding"]
        return item
    except (KeyError, IndexError, TypeError):
        raise StepError(f"{model_id} answered without an embedding: {json.dumps(answer)[:200]}") from None
