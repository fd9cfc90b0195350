"""Stand-in for Amazon Bedrock batch inference (control plane) and Bedrock Runtime InvokeModel, for the Nova
Multimodal Embeddings model.

Built from ../shared/aws-facts.md and botocore's service models (bedrock 2023-04-20, bedrock-runtime 2023-09-30).
One WSGI app answers both services (their paths do not overlap), so AWS_ENDPOINT_URL_BEDROCK and
AWS_ENDPOINT_URL_BEDROCK_RUNTIME can both point at it. Jobs read and write S3 (moto) through boto3, like the
service does with its service role, and every S3 access a job makes is recorded so a test can check it against
the role's policy. Where the behaviour of the real service is not known, the choice is marked "unverified".

    app = make_app(s3_endpoint_url=moto_url, iam_endpoint_url=moto_url)
    served = serve(app)                     # from tests.standins
    POST {served.url}/_emulator/config      {"step_seconds": 0.01, "fail_keys_regex": "broken"}
    GET  {served.url}/_emulator/jobs        jobs, statuses, counts and recorded S3 accesses
    GET  {served.url}/_emulator/auth        how each call was authenticated: Bearer (API key) or SigV4
    POST {served.url}/_emulator/reset       forget every job, back to the options given to make_app
"""

from __future__ import annotations

import base64
import copy
import json
import math
import random
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable
from urllib.parse import unquote

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError
from werkzeug.wrappers import Request, Response

from .embedding import DIMENSIONS, embed_bytes, embed_image, embed_text

from tests.iam_check import is_allowed

NOVA_MME = "amazon.nova-2-multimodal-embeddings-v1:0"
NOVA_MME_REGIONS = ("us-east-1",)  # aws-facts.md: us-east-1
NOVA_MME_NAME = "Nova 2 Multimodal Embeddings V1"  # unverified: its modelName (and the name its quotas use)
BEDROCK_SERVICE = "bedrock.amazonaws.com"

ACTIVE = ("Submitted", "Validating", "Scheduled", "InProgress", "Stopping")
TERMINAL = ("Completed", "PartiallyCompleted", "Failed", "Stopped", "Expired")
STATUSES = ACTIVE + TERMINAL

ROLE_KEY = "bedrock-service-role"  # the access key the jobs' S3 calls carry (see tests.standins.s3)

DEFAULT_OPTIONS: dict[str, Any] = {
    # Seconds between two status transitions (and before each step of a job). The launcher may set more.
    "step_seconds": 0.05,
    # Seconds spent on each record while InProgress, so a test can watch the counts grow or stop a job midway.
    "record_seconds": 0.0,
    # Quotas (Service Quotas, per model and region). Defaults for Nova MME are unverified: configurable.
    "min_records_per_job": 100,
    "max_records_per_file": 50_000,
    "max_records_per_job": 50_000,
    "max_input_file_bytes": 1_000_000_000,  # "1 GB"; decimal is the stricter reading (unverified)
    "max_job_bytes": 5_000_000_000,  # "5 GB"
    "max_concurrent_jobs": 10,  # Submitted + Validating + Scheduled + InProgress + Stopping, per model
    "max_image_bytes": 50_000_000,  # Nova MME: image up to 50 MB
    # AWS documents recordId as optional ("If you omit the recordId field, Amazon Bedrock adds it in the output").
    # True makes a line without one fail validation.
    "require_record_id": False,
    # Fault injection. The regexes are searched in the record's source object key (or, for a record without an
    # S3 source, its recordId).
    "fail_keys_regex": None,  # matching records fail with errorCode 500 "Internal server error" (transient)
    "drop_keys_regex": None,  # matching records are never processed nor written: the job ends PartiallyCompleted
    "final_status": None,  # None, "Failed", "Expired" or "PartiallyCompleted", for the jobs created next
    "final_message": None,  # the `message` of a job forced to Failed/Expired/PartiallyCompleted
    "throttle_create": 0,  # the next N CreateModelInvocationJob calls answer ThrottlingException
    "throttle_invoke": 0,  # the next N InvokeModel calls answer ThrottlingException
    # InvokeModel of a matching image answers ModelTimeoutException (408, which botocore does not retry), the first
    # `invoke_timeouts` times for that image and then embeds it (0: every time).
    "invoke_timeout_keys_regex": None,
    "invoke_timeouts": 0,
    # InvokeModel of a matching image answers AccessDeniedException (403). "s3": the message names the S3 object
    # the caller may not read; "iam": IAM's refusal of bedrock:InvokeModel itself, which names no object (as for a
    # caller without the permission, or without access to the model). The wording of both is unverified.
    "invoke_denied_keys_regex": None,
    "invoke_denied_reason": "s3",
    # While true (read live, not copied into the job), every job waits in Scheduled: a test holds a run "still
    # going" for as long as it needs, then configures it false to let the jobs go on.
    "hold_scheduled": False,
    # With iam_endpoint_url: the job's S3 accesses must be allowed by the role's policies (inline and attached).
    "enforce_role_policies": True,
    # Unverified behaviours, each played both ways (see "Assumptions about AWS" in README.md):
    # recordId: the docs have said "11 character alphanumeric string" and now say "alphanumeric string". A record
    # whose recordId is longer than this (0: no limit), or not alphanumeric, fails the job's validation.
    "max_record_id_length": 0,
    "record_id_alphanumeric": False,
    "rewrite_record_ids": False,  # output lines carry a recordId of the service's own, not the input's
    # A repeated clientRequestToken: None answers the earlier job's ARN; "ConflictException" (naming the job) or
    # "ValidationException" (naming the token) refuse it.
    "repeated_token_answer": None,
    # How long Bedrock remembers a clientRequestToken is not documented. True plays a Bedrock that has forgotten
    # it: a create repeating an earlier job's token starts a second job, even under the same name (the worst case:
    # whether Bedrock refuses a job name already taken is unverified too).
    "forget_tokens": False,
    "omit_job_name": False,  # GetModelInvocationJob leaves out jobName (not required in its response model)
    "stopped_output": "partial",  # what a Stopped job leaves: "partial" (the records done so far) or "none"
    "hold_after_records": 0,  # N > 0: the job stays InProgress after N records until it is stopped
    "progress_output_every": 0,  # N > 0: while InProgress, the output so far is written every N records
    # A time scale for tests whose point is not the wait: CreateModelInvocationJob answers once the job has ended,
    # so the first status a client asks for is the final one (a step that polls finds it at its first look).
    "answer_when_ended": False,
}
_FINAL_STATUSES = (None, "Failed", "Expired", "PartiallyCompleted")
_REPEATED_TOKEN_ANSWERS = (None, "ConflictException", "ValidationException")
_STOPPED_OUTPUTS = ("partial", "none")
_DENIED_REASONS = ("s3", "iam")
_DEFAULT_TIMEOUT_HOURS = 168  # unverified: the service's default when timeoutDurationInHours is omitted
_LIST_DEFAULT_MAX_RESULTS = 100  # unverified: page size when maxResults is omitted

# botocore's error shapes (bedrock 2023-04-20). The model gives ConflictException and ServiceQuotaExceededException
# HTTP 400; botocore takes the code from the x-amzn-ErrorType header either way.
ERROR_STATUS = {
    "ValidationException": 400,
    "ConflictException": 400,
    "ServiceQuotaExceededException": 400,
    "AccessDeniedException": 403,
    "ResourceNotFoundException": 404,
    "ModelTimeoutException": 408,
    "ThrottlingException": 429,
    "InternalServerException": 500,
    "UnknownOperationException": 404,
}

# Patterns from botocore's model (smithy patterns match the whole value).
_PATTERNS = {
    "jobName": r"[a-zA-Z0-9]{1,63}(-*[a-zA-Z0-9\+\-\.]){0,63}",
    # botocore allows an empty account; a role in no account cannot be assumed, so require 12 digits (aws-facts.md).
    "roleArn": r"arn:aws(-[^:]+)?:iam::[0-9]{12}:role/.+",
    "clientRequestToken": r"[a-zA-Z0-9]{1,256}(-*[a-zA-Z0-9]){0,256}",
    "s3Uri": r"s3://[a-z0-9][-.a-z0-9]{1,61}[a-z0-9](?:/[-!_*'().a-z0-9A-Z]+(?:/[-!_*'().a-z0-9A-Z]+)*)?/?",
    "accountId": r"[0-9]{12}",
    "kmsKeyId": r"(arn:aws(-[^:]+)?:kms:[a-zA-Z0-9-]*:[0-9]{12}:((key/[a-zA-Z0-9-]{36})|(alias/[a-zA-Z0-9-_/]+)))"
    r"|([a-zA-Z0-9-]{36})|(alias/[a-zA-Z0-9-_/]+)",
    "modelId": r"(arn:aws(-[^:]+)?:bedrock:[a-z0-9-]{1,20}:(([0-9]{12}:custom-model/[a-z0-9-]{1,63}[.]{1}[a-z0-9-:]{1,63}"
    r"/[a-z0-9]{12}$)|(:foundation-model/([a-z0-9-]{1,63}[.]{1}[a-z0-9-]{1,63}([.]?[a-z0-9-]{1,63})"
    r"([:][a-z0-9-]{1,63}){0,2})|(([0-9a-zA-Z][_-]?)+)$)|([0-9]{12}:(inference-profile|application-inference-profile)"
    r"/[a-zA-Z0-9-:.]+$)))|([a-z0-9-]{1,63}[.]{1}[a-z0-9-]{1,63}([.]?[a-z0-9-]{1,63})([:][a-z0-9-]{1,63}){0,2})"
    r"|(([0-9a-zA-Z][_-]?)+)",
    "jobIdentifier": r"((arn:aws(-[^:]+)?:bedrock:[a-z0-9-]{1,20}:[0-9]{12}:model-invocation-job/)?[a-z0-9]{12})",
    "id": r"[-0-9a-zA-Z]+",
    "tag": r"[a-zA-Z0-9\s._:/=+@-]*",
}

# Nova MME request (the batch modelInput is the InvokeModel body).
_PURPOSES = (
    "GENERIC_INDEX", "GENERIC_RETRIEVAL", "TEXT_RETRIEVAL", "IMAGE_RETRIEVAL", "VIDEO_RETRIEVAL",
    "DOCUMENT_RETRIEVAL", "AUDIO_RETRIEVAL", "CLASSIFICATION", "CLUSTERING",
)
_IMAGE_FORMATS = ("png", "jpeg", "gif", "webp")
_VIDEO_FORMATS = ("mp4", "mov", "mkv", "webm", "flv", "mpeg", "mpg", "wmv", "3gp")
_AUDIO_FORMATS = ("mp3", "wav", "ogg")
# Nova MME reads a text up to 8K tokens ("Using Nova Embeddings"); the emulator counts a token a 4 characters (its
# input token count too). When it cuts a text the answer carries truncatedCharLength, here the characters it kept
# (unverified: what the service's number counts).
_MAX_TEXT_TOKENS = 8192
_CHARS_PER_TOKEN = 4
_INVOKE_BODY_MAX = 25_000_000  # botocore: bedrock-runtime Body max


def _image_format_of(data: bytes) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


class ApiError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.status = code, message, ERROR_STATUS[code]


class _JobFailed(Exception):
    """Ends the job with status Failed and this message."""


class _RecordError(Exception):
    def __init__(self, message: str, error_code: int = 400):
        super().__init__(message)
        self.message, self.error_code = message, error_code


def _timestamp(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _now() -> datetime:
    """Milliseconds, as the API shows them, so submitTimeAfter=<a job's submitTime> leaves that job out."""
    now = datetime.now(timezone.utc)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _split_s3_uri(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    return bucket, key


def _bucket_arn(bucket: str) -> str:
    return f"arn:aws:s3:::{bucket}"


def _object_arn(bucket: str, key: str) -> str:
    return f"arn:aws:s3:::{bucket}/{key}"


# IAM: the role's trust and permission policies are judged by tests/iam_check.py, the suite's one evaluator.


def policy_allows(documents: list[dict | str], action: str, resource: str | None = None, *,
                  context: dict[str, str] | None = None, service_principal: str | None = None) -> bool:
    """True when some Allow statement of the documents applies and no Deny statement does."""
    parsed = [json.loads(unquote(d) if d.startswith("%") else d) if isinstance(d, str) else d for d in documents]
    principal = {"Service": service_principal} if service_principal else None
    return is_allowed(parsed, action, resource or "*", context or {}, principal=principal)


def _access_context(access: dict, account_id: str) -> dict[str, str]:
    context = {"aws:ResourceAccount": account_id}
    if access.get("prefix") is not None:
        context["s3:prefix"] = access["prefix"]
    return context


def unauthorized_accesses(accesses: list[dict], documents: list[dict | str], *,
                          account_id: str = "123456789012") -> list[dict]:
    """The recorded S3 accesses (as GET /_emulator/jobs lists them) that the policy documents do not allow."""
    return [a for a in accesses
            if not policy_allows(documents, a["action"], a["resource"], context=_access_context(a, account_id))]


# --------------------------------------------------------------------------------------------------------------
# Parameter validation in the service's words: "1 validation error detected: Value 'x' at 'jobName' failed to
# satisfy constraint: Member must satisfy regular expression pattern: ...".


class _Checks:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def fail(self, value: Any, path: str, constraint: str) -> None:
        shown = "null" if value is None else f"'{value}'" if isinstance(value, str) else json.dumps(value)
        self.errors.append(f"Value {shown} at '{path}' failed to satisfy constraint: Member must {constraint}")

    def string(self, value: Any, path: str, *, required: bool = False, min_len: int = 0, max_len: int | None = None,
               pattern: str | None = None, enum: tuple[str, ...] | None = None) -> bool:
        if value is None:
            if required:
                self.fail(None, path, "not be null")
            return False
        if not isinstance(value, str):
            self.fail(value, path, "be a string")
            return False
        ok = True
        if len(value) < min_len:
            self.fail(value, path, f"have length greater than or equal to {min_len}")
            ok = False
        if max_len is not None and len(value) > max_len:
            self.fail(value, path, f"have length less than or equal to {max_len}")
            ok = False
        if pattern is not None and re.fullmatch(pattern, value) is None:
            self.fail(value, path, f"satisfy regular expression pattern: {pattern}")
            ok = False
        if enum is not None and value not in enum:
            self.fail(value, path, f"satisfy enum value set: [{', '.join(enum)}]")
            ok = False
        return ok

    def structure(self, value: Any, path: str, *, required: bool = False) -> bool:
        if value is None:
            if required:
                self.fail(None, path, "not be null")
            return False
        if not isinstance(value, dict):
            self.fail(value, path, "be a structure")
            return False
        return True

    def raise_if_any(self) -> None:
        if self.errors:
            n = len(self.errors)
            raise ApiError("ValidationException",
                           f"{n} validation error{'s' if n > 1 else ''} detected: " + "; ".join(self.errors))


# --------------------------------------------------------------------------------------------------------------


@dataclass
class _InputFile:
    key: str  # full S3 key of the .jsonl
    rel: str  # path relative to the input folder: the output is <jobId>/<rel>.out
    records: list[tuple[str, Any]]  # (recordId, modelInput) in file order


@dataclass
class _Plan:
    input_bucket: str
    input_folder: str | None  # key prefix record objects must be under; None: a single-file input (no folder)
    output_bucket: str
    output_prefix: str
    files: list[_InputFile]

    @property
    def total(self) -> int:
        return sum(len(f.records) for f in self.files)


@dataclass
class _Job:
    job_id: str
    arn: str
    name: str
    token: str | None
    role_arn: str
    model_id: str
    input_config: dict
    output_config: dict
    vpc_config: dict | None
    timeout_hours: int
    invocation_type: str
    tags: list
    options: dict  # the options in force when the job was created
    submit_time: datetime
    last_modified: datetime
    expiration_time: datetime
    status: str = "Submitted"
    message: str | None = None
    end_time: datetime | None = None
    total: int | None = None
    processed: int | None = None
    success: int | None = None
    errors: int | None = None
    input_tokens: int = 0
    accesses: list[dict] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)
    discarded: bool = False
    role_policies: list[dict] | None = None  # None: not enforced

    def describe(self) -> dict:
        out: dict[str, Any] = {
            "jobArn": self.arn,
            "jobName": self.name,
            "modelId": self.model_id,
            "clientRequestToken": self.token,
            "roleArn": self.role_arn,
            "status": self.status,
            "message": self.message,
            "submitTime": _timestamp(self.submit_time),
            "lastModifiedTime": _timestamp(self.last_modified),
            "endTime": _timestamp(self.end_time),
            "inputDataConfig": self.input_config,
            "outputDataConfig": self.output_config,
            "vpcConfig": self.vpc_config,
            "timeoutDurationInHours": self.timeout_hours,
            "jobExpirationTime": _timestamp(self.expiration_time),
            "modelInvocationType": self.invocation_type,
            "totalRecordCount": self.total,
            "processedRecordCount": self.processed,
            "successRecordCount": self.success,
            "errorRecordCount": self.errors,
        }
        return {k: v for k, v in out.items() if v is not None}


class BedrockEmulator:
    """The WSGI app. Jobs live in memory; each runs in its own daemon thread."""

    def __init__(self, *, s3_endpoint_url: str, iam_endpoint_url: str | None = None, region: str = "us-east-1",
                 account_id: str = "123456789012", options: dict | None = None,
                 read_object: Callable[[str, str], bytes | None] | None = None):
        self.region, self.account_id = region, account_id
        # The jobs' reads of the images: through S3 by default; `read_object(bucket, key)` (the bytes, or None when
        # there is no such object) reads the same store without HTTP when moto runs in this process.
        self._read_direct = read_object
        unknown = set(options or {}) - set(DEFAULT_OPTIONS)
        if unknown:
            raise ValueError(f"unknown options: {sorted(unknown)}")
        self._initial_options = self._checked_options({**DEFAULT_OPTIONS, **(options or {})})
        self.options = dict(self._initial_options)
        self.jobs: dict[str, _Job] = {}
        self.auth_seen: list[dict] = []  # how each call was authenticated (see _record_auth)
        self._timeouts_given: dict[str, int] = {}  # ModelTimeoutException answered, by image key
        self._lock = threading.RLock()
        client_args = dict(region_name=region, aws_access_key_id="testing", aws_secret_access_key="testing",
                           config=Config(retries={"mode": "standard", "max_attempts": 3}))
        # The jobs read and write S3 as the service role, which has s3:ListBucket on the buckets: a missing image
        # is 404 to it (tests.standins.s3 tells it from the steps by this access key).
        self._s3 = boto3.client("s3", endpoint_url=s3_endpoint_url, **{**client_args, "aws_access_key_id": ROLE_KEY})
        self._iam = boto3.client("iam", endpoint_url=iam_endpoint_url, **client_args) if iam_endpoint_url else None

    # ---------------------------------------------------------------------------------------------- options

    @staticmethod
    def _checked_options(options: dict) -> dict:
        for name, value in options.items():
            default = DEFAULT_OPTIONS[name]
            if name.endswith("_regex"):
                if value is not None:
                    re.compile(value)
            elif name == "final_status":
                if value not in _FINAL_STATUSES:
                    raise ValueError(f"final_status must be one of {_FINAL_STATUSES}")
            elif name == "repeated_token_answer":
                if value not in _REPEATED_TOKEN_ANSWERS:
                    raise ValueError(f"repeated_token_answer must be one of {_REPEATED_TOKEN_ANSWERS}")
            elif name == "stopped_output":
                if value not in _STOPPED_OUTPUTS:
                    raise ValueError(f"stopped_output must be one of {_STOPPED_OUTPUTS}")
            elif name == "invoke_denied_reason":
                if value not in _DENIED_REASONS:
                    raise ValueError(f"invoke_denied_reason must be one of {_DENIED_REASONS}")
            elif name == "final_message":
                if value is not None and not isinstance(value, str):
                    raise ValueError("final_message must be a string")
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"{name} must be true or false")
            elif isinstance(default, float):
                if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"{name} must be a number >= 0")
            elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0")
        return options

    def configure(self, **changes: Any) -> dict:
        unknown = set(changes) - set(DEFAULT_OPTIONS)
        if unknown:
            raise ValueError(f"unknown options: {sorted(unknown)}")
        with self._lock:
            self.options = self._checked_options({**self.options, **changes})
            return dict(self.options)

    def reset(self) -> None:
        with self._lock:
            for job in self.jobs.values():
                job.discarded = True
                job.stop_event.set()
            self.jobs.clear()
            self.auth_seen.clear()
            self._timeouts_given.clear()
            self.options = dict(self._initial_options)

    # ---------------------------------------------------------------------------------------------- WSGI

    def __call__(self, environ, start_response):
        request = Request(environ)
        try:
            response = self._dispatch(request, environ)
        except ApiError as err:
            response = self._error(err)
        except Exception as exc:  # an emulator bug: answer as the service would, with the cause in the message
            response = self._error(ApiError("InternalServerException", f"{type(exc).__name__}: {exc}"))
        return response(environ, start_response)

    @staticmethod
    def _json(body: Any, status: int = 200) -> Response:
        return Response(json.dumps(body), status=status, content_type="application/json",
                        headers={"x-amzn-RequestId": str(uuid.uuid4())})

    @classmethod
    def _error(cls, err: ApiError) -> Response:
        response = cls._json({"message": err.message}, err.status)
        response.headers["x-amzn-ErrorType"] = err.code
        return response

    def _dispatch(self, request: Request, environ) -> Response:
        raw = environ.get("RAW_URI") or environ.get("REQUEST_URI") or request.path
        segments = [unquote(s) for s in raw.split("?", 1)[0].split("/")[1:]]
        method = request.method
        if segments and segments[0] == "_emulator":
            return self._control(request, segments[1:])
        if segments == ["model-invocation-job"] and method == "POST":
            self._record_auth(request, "CreateModelInvocationJob")
            return self._json(self.create_job(self._body(request)))
        if segments == ["model-invocation-jobs"] and method == "GET":
            self._record_auth(request, "ListModelInvocationJobs")
            return self._json(self.list_jobs(request.args))
        if len(segments) == 2 and segments[0] == "model-invocation-job" and method == "GET":
            self._record_auth(request, "GetModelInvocationJob")
            return self._json(self.get_job(segments[1]))
        if len(segments) == 3 and segments[0] == "model-invocation-job" and segments[2] == "stop" and method == "POST":
            self._record_auth(request, "StopModelInvocationJob")
            return self._json(self.stop_job(segments[1]))
        if len(segments) == 3 and segments[0] == "model" and segments[2] == "invoke" and method == "POST":
            self._record_auth(request, "InvokeModel")
            return self._json(self.invoke_model(segments[1], request.get_data()))
        if segments[:1] == ["foundation-models"] and len(segments) <= 2 and method == "GET":
            self._record_auth(request, "GetFoundationModel" if len(segments) == 2 else "ListFoundationModels")
            return self._json(self.foundation_models(segments[1] if len(segments) == 2 else None))
        raise ApiError("UnknownOperationException", f"No operation matches {method} {request.path}")

    def _record_auth(self, request: Request, operation: str) -> None:
        """Remember how a call was authenticated (GET /_emulator/auth): a Bedrock API key is sent as
        `Authorization: Bearer <key>`, credentials as SigV4 (`AWS4-HMAC-SHA256 Credential=<access key id>/...`).
        Neither is verified: the emulator only records which one came."""
        header = request.headers.get("Authorization", "")
        scheme, _, rest = header.partition(" ")
        if scheme == "Bearer":
            who = rest
        elif scheme == "AWS4-HMAC-SHA256":
            who = rest.split("Credential=", 1)[-1].split("/", 1)[0]
        else:
            scheme, who = scheme or "none", ""
        with self._lock:
            self.auth_seen.append({"operation": operation, "scheme": scheme, "credential": who,
                                   "https": request.scheme == "https"})

    @staticmethod
    def _body(request: Request) -> dict:
        try:
            body = json.loads(request.get_data() or b"{}")
        except ValueError:
            raise ApiError("ValidationException", "The request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError("ValidationException", "The request body must be a JSON object")
        return body

    def _control(self, request: Request, path: list[str]) -> Response:
        if path == ["config"] and request.method == "GET":
            with self._lock:
                return self._json(dict(self.options))
        if path == ["config"] and request.method == "POST":
            try:
                return self._json(self.configure(**self._body(request)))
            except ValueError as exc:
                return self._json({"message": str(exc)}, 400)
        if path == ["jobs"] and request.method == "GET":
            with self._lock:
                return self._json({"jobs": [{**job.describe(), "jobId": job.job_id,
                                             "s3Accesses": list(job.accesses)} for job in self.jobs.values()]})
        if path == ["auth"] and request.method == "GET":
            with self._lock:
                return self._json({"calls": list(self.auth_seen)})
        if path == ["reset"] and request.method == "POST":
            self.reset()
            return self._json({})
        return self._json({"message": f"no such control endpoint: {request.method} {request.path}"}, 404)

    # ---------------------------------------------------------------------------------------------- control plane

    def _take_throttle(self, name: str) -> None:
        with self._lock:
            if self.options[name] > 0:
                self.options[name] -= 1
                raise ApiError("ThrottlingException", "Too many requests, please wait before trying again.")

    def _check_create(self, body: dict) -> None:
        c = _Checks()
        c.string(body.get("jobName"), "jobName", required=True, min_len=1, max_len=63, pattern=_PATTERNS["jobName"])
        c.string(body.get("roleArn"), "roleArn", required=True, max_len=2048, pattern=_PATTERNS["roleArn"])
        c.string(body.get("clientRequestToken"), "clientRequestToken", min_len=1, max_len=256,
                 pattern=_PATTERNS["clientRequestToken"])
        c.string(body.get("modelId"), "modelId", required=True, min_len=1, max_len=2048, pattern=_PATTERNS["modelId"])
        for side, member in (("inputDataConfig", "s3InputDataConfig"), ("outputDataConfig", "s3OutputDataConfig")):
            union = body.get(side)
            if not c.structure(union, side, required=True):
                continue
            extra = sorted(set(union) - {member})
            if extra:
                c.fail(extra, side, f"set only {member}")
            config = union.get(member)
            if not c.structure(config, f"{side}.{member}", required=True):
                continue
            c.string(config.get("s3Uri"), f"{side}.{member}.s3Uri", required=True, min_len=1, max_len=1024,
                     pattern=_PATTERNS["s3Uri"])
            c.string(config.get("s3BucketOwner"), f"{side}.{member}.s3BucketOwner", pattern=_PATTERNS["accountId"])
            if side == "inputDataConfig":
                c.string(config.get("s3InputFormat"), f"{side}.{member}.s3InputFormat", enum=("JSONL",))
            else:
                c.string(config.get("s3EncryptionKeyId"), f"{side}.{member}.s3EncryptionKeyId", min_len=1,
                         max_len=2048, pattern=_PATTERNS["kmsKeyId"])
        timeout = body.get("timeoutDurationInHours")
        if timeout is not None:
            if not isinstance(timeout, int) or isinstance(timeout, bool):
                c.fail(timeout, "timeoutDurationInHours", "be an integer")
            elif timeout < 24:
                c.fail(timeout, "timeoutDurationInHours", "have value greater than or equal to 24")
            elif timeout > 168:
                c.fail(timeout, "timeoutDurationInHours", "have value less than or equal to 168")
        c.string(body.get("modelInvocationType"), "modelInvocationType", enum=("InvokeModel", "Converse"))
        vpc = body.get("vpcConfig")
        if c.structure(vpc, "vpcConfig"):
            for member, most in (("subnetIds", 16), ("securityGroupIds", 5)):
                ids = vpc.get(member)
                if not isinstance(ids, list) or not 1 <= len(ids) <= most:
                    c.fail(ids, f"vpcConfig.{member}", f"be a list of 1 to {most} items")
                else:
                    for i, one in enumerate(ids):
                        c.string(one, f"vpcConfig.{member}.{i + 1}.member", required=True, max_len=32,
                                 pattern=_PATTERNS["id"])
        tags = body.get("tags")
        if tags is not None:
            if not isinstance(tags, list) or len(tags) > 200:
                c.fail(tags, "tags", "be a list of at most 200 tags")
            else:
                for i, tag in enumerate(tags):
                    if c.structure(tag, f"tags.{i + 1}.member", required=True):
                        c.string(tag.get("key"), f"tags.{i + 1}.member.key", required=True, min_len=1, max_len=128,
                                 pattern=_PATTERNS["tag"])
                        c.string(tag.get("value"), f"tags.{i + 1}.member.value", required=True, max_len=256,
                                 pattern=_PATTERNS["tag"])
        c.raise_if_any()

    def _check_model(self, model_id: str, invocation_type: str = "InvokeModel") -> None:
        base = model_id.split("foundation-model/", 1)[1] if ":foundation-model/" in model_id else model_id
        if ":foundation-model/" in model_id and model_id.split(":")[3] != self.region:
            base = None
        if base != NOVA_MME or self.region not in NOVA_MME_REGIONS:
            # unverified: the exact code and message for a model that does not exist or does not support batch here
            raise ApiError("ValidationException", "The provided model identifier is invalid.")
        if invocation_type != "InvokeModel":
            raise ApiError("ValidationException",
                           f"The model {NOVA_MME} does not support modelInvocationType {invocation_type}.")

    def foundation_models(self, identifier: str | None) -> dict:
        """GetFoundationModel of `identifier`, or ListFoundationModels (None, filters ignored): the one model
        this emulator runs, where it is offered. An unknown model answers as CreateModelInvocationJob does."""
        details = {"modelArn": f"arn:aws:bedrock:{self.region}::foundation-model/{NOVA_MME}", "modelId": NOVA_MME,
                   "modelName": NOVA_MME_NAME, "providerName": "Amazon",
                   "inputModalities": ["TEXT", "IMAGE", "AUDIO", "VIDEO"], "outputModalities": ["EMBEDDING"],
                   "responseStreamingSupported": False, "customizationsSupported": [],
                   "inferenceTypesSupported": ["ON_DEMAND"], "modelLifecycle": {"status": "ACTIVE"}}
        if identifier is None:
            return {"modelSummaries": [details] if self.region in NOVA_MME_REGIONS else []}
        self._check_model(identifier)
        return {"modelDetails": details}

    def _check_role(self, role_arn: str, job_arn: str) -> list[dict] | None:
        """With IAM at hand: the role must exist and trust bedrock.amazonaws.com. Returns its policy documents."""
        if self._iam is None:
            return None
        # unverified: the code and wording the service uses for a role it cannot assume
        cannot = ApiError("ValidationException",
                          f"The provided role {role_arn} does not exist or cannot be assumed by {BEDROCK_SERVICE}. "
                          f"Check that its trust policy allows {BEDROCK_SERVICE} to perform sts:AssumeRole.")
        name = role_arn.rsplit("/", 1)[1]
        try:
            role = self._iam.get_role(RoleName=name)["Role"]
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "NoSuchEntity":
                raise cannot from None
            raise
        if role["Arn"] != role_arn:
            raise cannot
        context = {"aws:SourceAccount": self.account_id, "aws:SourceArn": job_arn}
        if not policy_allows([role["AssumeRolePolicyDocument"]], "sts:AssumeRole", context=context,
                             service_principal=BEDROCK_SERVICE):
            raise cannot
        return self._role_policies(name)

    def _role_policies(self, name: str) -> list[dict]:
        documents = []
        for policy_name in self._iam.list_role_policies(RoleName=name)["PolicyNames"]:
            documents.append(self._iam.get_role_policy(RoleName=name, PolicyName=policy_name)["PolicyDocument"])
        for attached in self._iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"]:
            policy = self._iam.get_policy(PolicyArn=attached["PolicyArn"])["Policy"]
            version = self._iam.get_policy_version(PolicyArn=attached["PolicyArn"],
                                                   VersionId=policy["DefaultVersionId"])
            documents.append(version["PolicyVersion"]["Document"])
        return documents

    def create_job(self, body: dict) -> dict:
        self._take_throttle("throttle_create")
        self._check_create(body)
        token, name, model_id = body.get("clientRequestToken"), body["jobName"], body["modelId"]
        invocation_type = body.get("modelInvocationType", "InvokeModel")
        with self._lock:
            repeated = token is not None and any(job.token == token for job in self.jobs.values())
            if repeated and not self.options["forget_tokens"]:
                # "If this token matches a previous request, Amazon Bedrock ignores the request, but does not
                # return an error." (CreateModelInvocationJob reference)
                return self._repeated_token(next(job for job in self.jobs.values() if job.token == token))
            if not repeated and any(job.name == name for job in self.jobs.values()):
                # unverified: the code for a job name already taken (ConflictException is in the operation's errors)
                raise ApiError("ConflictException", f"A batch inference job named {name} already exists.")
            self._check_model(model_id, invocation_type)
            job_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))
            arn = f"arn:aws:bedrock:{self.region}:{self.account_id}:model-invocation-job/{job_id}"
            role_policies = self._check_role(body["roleArn"], arn)
            options = copy.deepcopy(self.options)
            busy = sum(1 for job in self.jobs.values() if job.status in ACTIVE and job.model_id == model_id)
            if busy >= options["max_concurrent_jobs"]:
                raise ApiError("ServiceQuotaExceededException",
                               f"You have reached the quota of {options['max_concurrent_jobs']} batch inference jobs "
                               f"submitted or in progress for {model_id} in {self.region}. Wait for a job to end, "
                               "or request a quota increase through Service Quotas.")
            now = _now()
            timeout = body.get("timeoutDurationInHours", _DEFAULT_TIMEOUT_HOURS)
            job = _Job(
                job_id=job_id, arn=arn, name=name, token=token, role_arn=body["roleArn"], model_id=model_id,
                input_config=body["inputDataConfig"], output_config=body["outputDataConfig"],
                vpc_config=body.get("vpcConfig"), timeout_hours=timeout, invocation_type=invocation_type,
                tags=body.get("tags") or [], options=options, submit_time=now, last_modified=now,
                expiration_time=now + timedelta(hours=timeout),
                role_policies=role_policies if options["enforce_role_policies"] else None,
            )
            self.jobs[job_id] = job
        runner = threading.Thread(target=self._run, args=(job,), name=f"bedrock-job-{job_id}", daemon=True)
        runner.start()
        if options["answer_when_ended"]:
            runner.join()
        return {"jobArn": arn}

    def _repeated_token(self, job: _Job) -> dict:
        """A create with the clientRequestToken of an earlier one: the earlier job's ARN, or (option) an error."""
        answer = self.options["repeated_token_answer"]
        if answer == "ConflictException":
            raise ApiError("ConflictException", f"A batch inference job named {job.name} already exists.")
        if answer == "ValidationException":
            raise ApiError("ValidationException",
                           f"The clientRequestToken {job.token} has already been used by another request.")
        return {"jobArn": job.arn}

    def _find(self, identifier: str) -> _Job:
        c = _Checks()
        c.string(identifier, "jobIdentifier", required=True, max_len=1011, pattern=_PATTERNS["jobIdentifier"])
        c.raise_if_any()
        job_id = identifier.rsplit("/", 1)[-1]
        job = self.jobs.get(job_id)
        if job is None or (identifier.startswith("arn:") and identifier != job.arn):
            raise ApiError("ResourceNotFoundException", f"The specified job {identifier} could not be found.")
        return job

    def get_job(self, identifier: str) -> dict:
        with self._lock:
            described = self._find(identifier).describe()
            if self.options["omit_job_name"]:
                described.pop("jobName")
            return described

    def stop_job(self, identifier: str) -> dict:
        with self._lock:
            job = self._find(identifier)
            if job.status in TERMINAL:
                # unverified wording; Stop on an ended job is refused
                raise ApiError("ValidationException",
                               f"The job {job.arn} is in status {job.status} and cannot be stopped.")
            if job.status != "Stopping":
                job.status, job.last_modified = "Stopping", _now()
                job.stop_event.set()
        return {}

    def list_jobs(self, args) -> dict:
        c = _Checks()
        status = args.get("statusEquals")
        c.string(status, "statusEquals", enum=STATUSES)
        name = args.get("nameContains")
        c.string(name, "nameContains", min_len=1, max_len=63, pattern=_PATTERNS["jobName"])
        c.string(args.get("sortBy"), "sortBy", enum=("CreationTime",))
        order = args.get("sortOrder", "Descending")
        c.string(order, "sortOrder", enum=("Ascending", "Descending"))
        after, before = (self._parse_time(c, args.get(k), k) for k in ("submitTimeAfter", "submitTimeBefore"))
        max_results = _LIST_DEFAULT_MAX_RESULTS
        if args.get("maxResults") is not None:
            try:
                max_results = int(args["maxResults"])
            except ValueError:
                c.fail(args["maxResults"], "maxResults", "be an integer")
            else:
                if not 1 <= max_results <= 1000:
                    c.fail(max_results, "maxResults", "have value between 1 and 1000")
        offset = 0
        if args.get("nextToken") is not None:
            try:
                offset = json.loads(base64.urlsafe_b64decode(args["nextToken"].encode()))["offset"]
            except Exception:
                raise ApiError("ValidationException", "The pagination token is invalid.") from None
        c.raise_if_any()
        with self._lock:
            jobs = [job for job in self.jobs.values()
                    if (status is None or job.status == status)
                    and (name is None or name in job.name)
                    and (after is None or job.submit_time > after)
                    and (before is None or job.submit_time < before)]
            jobs.sort(key=lambda job: job.submit_time, reverse=order == "Descending")
            page = [job.describe() for job in jobs[offset:offset + max_results]]
        out: dict[str, Any] = {"invocationJobSummaries": page}
        if offset + max_results < len(jobs):
            out["nextToken"] = base64.urlsafe_b64encode(json.dumps({"offset": offset + max_results}).encode()).decode()
        return out

    @staticmethod
    def _parse_time(c: _Checks, value: str | None, path: str) -> datetime | None:
        if value is None:
            return None
        try:
            parsed = (datetime.fromtimestamp(float(value), timezone.utc) if re.fullmatch(r"[0-9.]+", value)
                      else datetime.fromisoformat(value))
        except ValueError:
            c.fail(value, path, "be a timestamp")
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)

    # ---------------------------------------------------------------------------------------------- job lifecycle

    def _transition(self, job: _Job, status: str, **fields: Any) -> bool:
        """Moves the job on unless it was stopped or discarded meanwhile."""
        with self._lock:
            if job.discarded or job.stop_event.is_set():
                return False
            job.status, job.last_modified = status, _now()
            for name, value in fields.items():
                setattr(job, name, value)
            return True

    def _end(self, job: _Job, status: str, message: str | None = None, *, force: bool = False) -> bool:
        """Ends the job; without force, not when a stop came first (the caller then ends it Stopped)."""
        with self._lock:
            if job.discarded or (job.stop_event.is_set() and not force):
                return False
            now = _now()
            job.status, job.last_modified, job.end_time = status, now, now
            if message is not None:
                job.message = message
            return True

    def _wait(self, job: _Job) -> bool:
        """One step of the lifecycle; False when the job was stopped (or discarded) during it."""
        return not job.stop_event.wait(job.options["step_seconds"])

    def _finish(self, job: _Job, status: str, message: str | None = None) -> None:
        """After one more step, ends the job in status, or in Stopped when a stop came first."""
        if not (self._wait(job) and self._end(job, status, message)):
            self._stopped(job)

    def _stopped(self, job: _Job, plan: _Plan | None = None, outputs: dict | None = None) -> None:
        """Stopping -> Stopped; the records processed so far are written (unverified: option stopped_output)."""
        if job.discarded:
            return
        if plan is not None and outputs is not None and job.options["stopped_output"] == "partial":
            self._write_outputs(job, plan, outputs)
        time.sleep(job.options["step_seconds"])
        self._end(job, "Stopped", force=True)

    def _run(self, job: _Job) -> None:
        try:
            self._lifecycle(job)
        except _JobFailed as failed:
            self._end(job, "Failed", str(failed), force=True)
        except Exception as exc:  # an emulator bug or an S3 failure: the job fails, with the cause in the message
            self._end(job, "Failed", f"Internal error while running the job: {type(exc).__name__}: {exc}", force=True)

    def _lifecycle(self, job: _Job) -> None:
        opts = job.options
        if not (self._wait(job) and self._transition(job, "Validating")):
            return self._stopped(job)
        try:
            plan = self._validate(job)
        except _JobFailed as failed:
            return self._finish(job, "Failed", str(failed))
        if not (self._wait(job) and self._transition(job, "Scheduled", total=plan.total)):
            return self._stopped(job)
        if opts["final_status"] == "Expired":  # scheduled, never started before the timeout
            return self._finish(job, "Expired", opts["final_message"] or
                                "The job expired because it was scheduled but did not start before its timeout of "
                                f"{job.timeout_hours} hours.")
        while self.options["hold_scheduled"]:
            if job.stop_event.wait(0.02):
                return self._stopped(job)
        if not (self._wait(job) and self._transition(job, "InProgress", processed=0, success=0, errors=0)):
            return self._stopped(job)
        if opts["final_status"] == "Failed":
            return self._finish(job, "Failed", opts["final_message"] or
                                "Internal server error while processing the job. Please try again later.")
        outputs, complete = self._process(job, plan)
        if not complete:
            return self._stopped(job, plan, outputs)
        self._write_outputs(job, plan, outputs)
        if opts["final_status"] == "PartiallyCompleted" or job.processed < job.total:
            return self._finish(job, "PartiallyCompleted", opts["final_message"] or
                                f"The job processed {job.processed} of {job.total} records before it timed out.")
        return self._finish(job, "Completed")

    # S3 on the role's behalf: every access is recorded and, when the role's policies are known, checked.

    def _allow(self, job: _Job, action: str, resource: str, prefix: str | None = None) -> bool:
        access = {"action": action, "resource": resource}
        if prefix is not None:
            access["prefix"] = prefix
        with self._lock:
            job.accesses.append(access)
        if job.role_policies is None:
            return True
        return policy_allows(job.role_policies, action, resource, context=_access_context(access, self.account_id))

    def _denied(self, job: _Job, action: str, resource: str) -> str:
        return (f"Access denied: the role {job.role_arn} is not authorized to perform {action} on resource "
                f"{resource}.")

    def _list_keys(self, job: _Job, bucket: str, prefix: str) -> list[dict]:
        if not self._allow(job, "s3:ListBucket", _bucket_arn(bucket), prefix):
            raise _JobFailed(self._denied(job, "s3:ListBucket", _bucket_arn(bucket)))
        objects = []
        for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            objects.extend(page.get("Contents", []))
        return objects

    def _validate(self, job: _Job) -> _Plan:
        opts = job.options
        in_cfg = job.input_config["s3InputDataConfig"]
        out_cfg = job.output_config["s3OutputDataConfig"]
        in_uri, out_uri = in_cfg["s3Uri"], out_cfg["s3Uri"]
        in_bucket, in_key = _split_s3_uri(in_uri)
        out_bucket, out_key = _split_s3_uri(out_uri)
        for uri, owner in ((in_uri, in_cfg.get("s3BucketOwner")), (out_uri, out_cfg.get("s3BucketOwner"))):
            if owner is not None and owner != self.account_id:  # S3 answers 403 to a wrong expected bucket owner
                raise _JobFailed(f"Unable to access the S3 location {uri}: the bucket is not owned by account "
                                 f"{owner} (Access Denied).")
        try:
            listed = self._list_keys(job, in_bucket, in_key)
        except ClientError as exc:
            raise _JobFailed(f"Unable to access the input S3 location {in_uri}: "
                             f"{exc.response['Error'].get('Message') or exc.response['Error']['Code']}.") from None
        single = next((o for o in listed if o["Key"] == in_key and in_key.endswith(".jsonl")), None)
        if single is not None:  # the s3Uri names one file: there is no folder for record objects to be under
            folder, candidates = None, [single]
        else:
            folder = in_key if in_key == "" or in_key.endswith("/") else in_key + "/"
            candidates = [o for o in listed if o["Key"].startswith(folder)]
        files = [o for o in candidates if o["Key"].endswith(".jsonl")]
        if not files:
            raise _JobFailed(f"No .jsonl input files were found at {in_uri}. Put one or more .jsonl files, one "
                             "record a line, in the input folder.")
        total_bytes = 0
        for obj in files:
            if obj["Size"] > opts["max_input_file_bytes"]:
                raise _JobFailed(f"The input file s3://{in_bucket}/{obj['Key']} is {obj['Size']} bytes, more than the "
                                 f"quota of {opts['max_input_file_bytes']} bytes per batch inference input file.")
            total_bytes += obj["Size"]
        if total_bytes > opts["max_job_bytes"]:
            raise _JobFailed(f"The input files total {total_bytes} bytes, more than the quota of "
                             f"{opts['max_job_bytes']} bytes per batch inference job.")
        inputs = [self._read_input_file(job, in_bucket, obj["Key"], folder) for obj in sorted(files,
                                                                                              key=lambda o: o["Key"])]
        total = sum(len(f.records) for f in inputs)
        if total > opts["max_records_per_job"]:
            raise _JobFailed(f"The job has {total} records, more than the quota of {opts['max_records_per_job']} "
                             "records per batch inference job.")
        if total < opts["min_records_per_job"]:
            raise _JobFailed(f"The job has {total} records in its input files, fewer than the minimum of "
                             f"{opts['min_records_per_job']} records per batch inference job.")
        try:
            if not self._allow(job, "s3:ListBucket", _bucket_arn(out_bucket)):
                raise _JobFailed(self._denied(job, "s3:ListBucket", _bucket_arn(out_bucket)))
            self._s3.head_bucket(Bucket=out_bucket)
        except ClientError as exc:
            raise _JobFailed(f"Unable to access the output S3 location {out_uri}: "
                             f"{exc.response['Error'].get('Message') or exc.response['Error']['Code']}.") from None
        out_prefix = out_key if out_key == "" or out_key.endswith("/") else out_key + "/"
        return _Plan(in_bucket, folder, out_bucket, out_prefix, inputs)

    def _read_input_file(self, job: _Job, bucket: str, key: str, folder: str | None) -> _InputFile:
        uri = f"s3://{bucket}/{key}"
        if not self._allow(job, "s3:GetObject", _object_arn(bucket, key)):
            raise _JobFailed(self._denied(job, "s3:GetObject", _object_arn(bucket, key)))
        try:
            data = self._s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            raise _JobFailed(f"Unable to read the input file {uri}: {exc.response['Error']['Code']}.") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise _JobFailed(f"The input file {uri} is not UTF-8 text.") from None
        records = []
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue  # unverified: blank lines (a trailing newline above all) are skipped
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise _JobFailed(f"Line {number} of the input file {uri} is not valid JSON ({exc}).") from None
            if not isinstance(record, dict):
                raise _JobFailed(f"Line {number} of the input file {uri} is not a JSON object.")
            if "modelInput" not in record:
                raise _JobFailed(f"Line {number} of the input file {uri} has no modelInput field.")
            record_id = record.get("recordId")
            if record_id is None:
                if job.options["require_record_id"]:
                    raise _JobFailed(f"Line {number} of the input file {uri} has no recordId field.")
                # "If you omit the recordId field, Amazon Bedrock adds it in the output." The form is unverified.
                record_id = uuid.uuid5(uuid.NAMESPACE_URL, f"{uri}#{number}").hex[:11].upper()
            elif not isinstance(record_id, str):
                raise _JobFailed(f"Line {number} of the input file {uri}: recordId must be a string.")
            else:
                self._check_record_id(job, record_id, number, uri)
            records.append((record_id, record["modelInput"]))
            if len(records) > job.options["max_records_per_file"]:
                raise _JobFailed(f"The input file {uri} has more than {job.options['max_records_per_file']} records, "
                                 "the quota of records per batch inference input file.")
        rel = key[len(folder):] if folder is not None else key.rsplit("/", 1)[-1]
        return _InputFile(key=key, rel=rel, records=records)

    @staticmethod
    def _check_record_id(job: _Job, record_id: str, number: int, uri: str) -> None:
        """The options max_record_id_length and record_id_alphanumeric (unverified rules, so both are options)."""
        most = job.options["max_record_id_length"]
        if most and len(record_id) > most:
            raise _JobFailed(f"Line {number} of the input file {uri}: recordId '{record_id}' is longer than {most} "
                             "characters.")
        if job.options["record_id_alphanumeric"] and not re.fullmatch(r"[A-Za-z0-9]+", record_id):
            raise _JobFailed(f"Line {number} of the input file {uri}: recordId '{record_id}' must be alphanumeric.")

    @staticmethod
    def _output_record_id(job: _Job, record_id: str, rel: str, n: int) -> str:
        """The recordId an output line carries: the input's, or (option rewrite_record_ids) one of its own."""
        if not job.options["rewrite_record_ids"]:
            return record_id
        return uuid.uuid5(uuid.NAMESPACE_URL, f"{job.job_id}/{rel}#{n}").hex[:11].upper()

    def _hold(self, job: _Job, plan: _Plan, outputs: dict[str, list[str]]) -> None:
        """Options progress_output_every and hold_after_records: output written while InProgress; a job that
        stays InProgress (until stopped) after some records."""
        opts = job.options
        every, hold = opts["progress_output_every"], opts["hold_after_records"]
        if every and job.processed % every == 0:
            self._write_outputs(job, plan, outputs, with_manifest=False)
        if hold and job.processed >= hold:
            job.stop_event.wait()

    def _process(self, job: _Job, plan: _Plan) -> tuple[dict[str, list[str]], bool]:
        """Runs every record; returns the output lines of each input file and whether all of them were reached."""
        opts = job.options
        fail_re = re.compile(opts["fail_keys_regex"]) if opts["fail_keys_regex"] else None
        drop_re = re.compile(opts["drop_keys_regex"]) if opts["drop_keys_regex"] else None
        outputs: dict[str, list[str]] = {}

        def read(uri: str, max_bytes: int) -> bytes:
            bucket, key = _split_s3_uri(uri)
            if bucket != plan.input_bucket or plan.input_folder is None or not key.startswith(plan.input_folder):
                where = (f"s3://{plan.input_bucket}/{plan.input_folder}" if plan.input_folder is not None
                         else job.input_config["s3InputDataConfig"]["s3Uri"])
                raise _RecordError(f"The S3 object {uri} is outside the job's input location {where}. Objects that "
                                   "records refer to must be in the input folder of the job (sub-folders allowed).")
            if not self._allow(job, "s3:GetObject", _object_arn(bucket, key)):
                raise _RecordError(self._denied(job, "s3:GetObject", _object_arn(bucket, key)))
            return self._read_object(bucket, key, max_bytes)

        for input_file in plan.files:
            lines = outputs.setdefault(input_file.rel, [])
            for record_id, model_input in input_file.records:
                if job.stop_event.is_set() or job.discarded:
                    return outputs, False
                source_key = _source_key(model_input) or record_id
                if drop_re is not None and drop_re.search(source_key):
                    continue
                line: dict[str, Any] = {"recordId": self._output_record_id(job, record_id, input_file.rel,
                                                                          len(lines)),
                                        "modelInput": model_input}
                try:
                    result, tokens = _nova_mme(model_input, read, opts["max_image_bytes"], self.account_id)
                    if fail_re is not None and fail_re.search(source_key):
                        raise _RecordError("Internal server error", 500)
                    line["modelOutput"] = result
                except _RecordError as err:
                    tokens = 0
                    line["error"] = {"errorCode": err.error_code, "errorMessage": err.message}
                lines.append(json.dumps(line))
                with self._lock:
                    job.processed += 1
                    job.input_tokens += tokens
                    if "error" in line:
                        job.errors += 1
                    else:
                        job.success += 1
                    job.last_modified = _now()
                if opts["record_seconds"]:
                    job.stop_event.wait(opts["record_seconds"])
                self._hold(job, plan, outputs)
                if job.stop_event.is_set() or job.discarded:
                    return outputs, False
        return outputs, True

    def _read_object(self, bucket: str, key: str, max_bytes: int) -> bytes:
        if self._read_direct is not None:
            data = self._read_direct(bucket, key)
            if data is None:
                raise _RecordError(f"The S3 object s3://{bucket}/{key} does not exist.")
            if len(data) > max_bytes:
                raise _RecordError(f"The S3 object s3://{bucket}/{key} is {len(data)} bytes, more than the maximum "
                                   f"of {max_bytes} bytes.")
            return data
        try:
            obj = self._s3.get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            code = exc.response["Error"]["Code"]
            if code in ("NoSuchKey", "NoSuchBucket", "404"):
                raise _RecordError(f"The S3 object s3://{bucket}/{key} does not exist.") from None
            raise _RecordError(f"Unable to read s3://{bucket}/{key}: {code}.") from None
        if obj["ContentLength"] > max_bytes:
            obj["Body"].close()
            raise _RecordError(f"The S3 object s3://{bucket}/{key} is {obj['ContentLength']} bytes, more than the "
                               f"maximum of {max_bytes} bytes.")
        return obj["Body"].read()

    def _write_outputs(self, job: _Job, plan: _Plan, outputs: dict[str, list[str]], with_manifest: bool = True) -> None:
        out_cfg = job.output_config["s3OutputDataConfig"]
        extra = {}
        if out_cfg.get("s3EncryptionKeyId"):
            extra = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": out_cfg["s3EncryptionKeyId"]}
        base = f"{plan.output_prefix}{job.job_id}/"
        for rel, lines in outputs.items():
            if not lines:
                continue
            random.Random(f"{job.job_id}/{rel}").shuffle(lines)  # the order of output lines is not guaranteed
            self._put(job, plan.output_bucket, f"{base}{rel}.out", ("\n".join(lines) + "\n").encode(), extra)
        if not with_manifest:
            return
        with self._lock:
            manifest = {"totalRecordCount": job.total, "processedRecordCount": job.processed,
                        "successRecordCount": job.success, "errorRecordCount": job.errors,
                        "inputTokenCount": job.input_tokens, "outputTokenCount": 0}
        self._put(job, plan.output_bucket, f"{base}manifest.json.out", json.dumps(manifest).encode(), extra)

    def _put(self, job: _Job, bucket: str, key: str, body: bytes, extra: dict) -> None:
        if not self._allow(job, "s3:PutObject", _object_arn(bucket, key)):
            raise _JobFailed(self._denied(job, "s3:PutObject", _object_arn(bucket, key)))
        self._s3.put_object(Bucket=bucket, Key=key, Body=body, **extra)

    # ---------------------------------------------------------------------------------------------- runtime

    def _invoke_faults(self, model_id: str, request: Any) -> None:
        """The faults options inject into InvokeModel for the image a request reads."""
        uri = _source_uri(request)
        if uri is None:
            return
        key = _split_s3_uri(uri)[1]
        with self._lock:
            pattern = self.options["invoke_denied_keys_regex"]
            if pattern is not None and re.search(pattern, key):
                if self.options["invoke_denied_reason"] == "iam":
                    raise ApiError("AccessDeniedException",
                                   f"User: arn:aws:iam::{self.account_id}:user/caller is not authorized to perform: "
                                   f"bedrock:InvokeModel on resource: arn:aws:bedrock:{self.region}::foundation-model/"
                                   f"{model_id} because no identity-based policy allows the bedrock:InvokeModel "
                                   "action")
                raise ApiError("AccessDeniedException", f"Access denied when reading the S3 object {uri}.")
            pattern = self.options["invoke_timeout_keys_regex"]
            if pattern is not None and re.search(pattern, key):
                seen = self._timeouts_given.get(key, 0)
                if not self.options["invoke_timeouts"] or seen < self.options["invoke_timeouts"]:
                    self._timeouts_given[key] = seen + 1
                    raise ApiError("ModelTimeoutException",
                                   "Model has timed out in processing the request. Try your request again.")

    def invoke_model(self, model_id: str, body: bytes) -> dict:
        self._take_throttle("throttle_invoke")
        c = _Checks()
        c.string(model_id, "modelId", required=True, min_len=1, max_len=2048)
        c.raise_if_any()
        self._check_model(model_id)
        if len(body) > _INVOKE_BODY_MAX:
            raise ApiError("ValidationException", f"The request body is larger than {_INVOKE_BODY_MAX} bytes.")
        try:
            request = json.loads(body)
        except ValueError:
            raise ApiError("ValidationException",
                           "Malformed input request, please reformat your input and try again.") from None

        def read(uri: str, max_bytes: int) -> bytes:
            bucket, key = _split_s3_uri(uri)
            return self._read_object(bucket, key, max_bytes)

        self._invoke_faults(model_id, request)
        try:
            result, _ = _nova_mme(request, read, self.options["max_image_bytes"], self.account_id)
        except _RecordError as err:
            raise ApiError("ValidationException", err.message) from None
        return result


# --------------------------------------------------------------------------------------------------------------
# Nova Multimodal Embeddings: the checks of a request body and the fake embedding. Messages follow the shape of
# Bedrock's schema errors ("Malformed input request: #/path: ..., please reformat your input and try again");
# the exact wording for Nova MME is unverified.


def _malformed(path: str, problem: str) -> _RecordError:
    return _RecordError(f"Malformed input request: {path}: {problem}, please reformat your input and try again.")


def _check_keys(obj: Any, path: str, allowed: set[str], required: set[str] = frozenset()) -> dict:
    if not isinstance(obj, dict):
        raise _malformed(path, f"expected type: JSONObject, found: {type(obj).__name__}")
    for key in obj:
        if key not in allowed:
            raise _malformed(path, f"extraneous key [{key}] is not permitted")
    for key in sorted(required):
        if key not in obj:
            raise _malformed(path, f"required key [{key}] not found")
    return obj


def _check_enum(value: Any, path: str, allowed: tuple) -> None:
    if value not in allowed:
        choices = ", ".join(map(str, allowed))
        raise _malformed(path, f"{json.dumps(value)} is not a valid enum value (allowed: {choices})")


def _source_key(model_input: Any) -> str | None:
    """The S3 key a record's media comes from, if any (for the fault-injection regexes)."""
    uri = _source_uri(model_input)
    return None if uri is None else _split_s3_uri(uri)[1]


def _source_uri(model_input: Any) -> str | None:
    """The S3 URI a request's media comes from, if any."""
    try:
        params = model_input["singleEmbeddingParams"]
        for modality in ("image", "video", "audio", "text"):
            if isinstance(params.get(modality), dict):
                uri = params[modality]["source"]["s3Location"]["uri"]
                return uri if isinstance(uri, str) else None
    except (KeyError, TypeError, AttributeError):
        pass
    return None


def _media(spec: dict, path: str, read, max_bytes: int, account_id: str) -> bytes:
    source = _check_keys(spec.get("source"), f"{path}/source", {"bytes", "s3Location"})
    if len(source) != 1:
        raise _malformed(f"{path}/source", "exactly one of [bytes, s3Location] must be set")
    if "bytes" in source:
        if not isinstance(source["bytes"], str):
            raise _malformed(f"{path}/source/bytes", "expected a base64 string")
        try:
            data = base64.b64decode(source["bytes"], validate=True)
        except ValueError:
            raise _malformed(f"{path}/source/bytes", "is not valid base64") from None
        if len(data) > max_bytes:
            raise _RecordError(f"The input is {len(data)} bytes, more than the maximum of {max_bytes} bytes.")
        return data
    location = _check_keys(source["s3Location"], f"{path}/source/s3Location", {"uri", "bucketOwner"}, {"uri"})
    uri, owner = location["uri"], location.get("bucketOwner")
    if not isinstance(uri, str) or not re.fullmatch(r"s3://[a-z0-9][-.a-z0-9]{1,61}[a-z0-9]/.+", uri):
        raise _malformed(f"{path}/source/s3Location/uri", f"{json.dumps(uri)} is not a valid S3 object URI")
    if owner is not None and (not isinstance(owner, str) or not re.fullmatch(r"[0-9]{12}", owner)):
        raise _malformed(f"{path}/source/s3Location/bucketOwner", f"{json.dumps(owner)} is not a 12-digit account id")
    if owner is not None and owner != account_id:
        raise _RecordError(f"Access denied to {uri}: the bucket is not owned by account {owner}.")
    return read(uri, max_bytes)


def _nova_mme(body: Any, read, max_image_bytes: int, account_id: str) -> tuple[dict, int]:
    """Checks one Nova MME request body and returns (response body, input token count)."""
    body = _check_keys(body, "#", {"schemaVersion", "taskType", "singleEmbeddingParams"},
                       {"taskType", "singleEmbeddingParams"})
    if "schemaVersion" in body:
        _check_enum(body["schemaVersion"], "#/schemaVersion", ("nova-multimodal-embed-v1",))
    if body["taskType"] == "SEGMENTED_EMBEDDING":
        raise _RecordError("SEGMENTED_EMBEDDING is only supported by the asynchronous API "
                           "(StartAsyncInvoke); use SINGLE_EMBEDDING.")
    _check_enum(body["taskType"], "#/taskType", ("SINGLE_EMBEDDING",))
    path = "#/singleEmbeddingParams"
    params = _check_keys(body["singleEmbeddingParams"], path,
                         {"embeddingPurpose", "embeddingDimension", "text", "image", "video", "audio"},
                         {"embeddingPurpose"})
    _check_enum(params["embeddingPurpose"], f"{path}/embeddingPurpose", _PURPOSES)
    dimension = params.get("embeddingDimension", 3072)
    if isinstance(dimension, bool) or dimension not in DIMENSIONS:
        _check_enum(dimension, f"{path}/embeddingDimension", DIMENSIONS)
    modalities = [m for m in ("text", "image", "video", "audio") if m in params]
    if len(modalities) != 1:
        raise _malformed(path, "exactly one of [text, image, video, audio] must be set, found "
                               f"[{', '.join(modalities)}]")
    modality = modalities[0]
    mpath = f"{path}/{modality}"
    if modality == "text":
        spec = _check_keys(params["text"], mpath, {"truncationMode", "value", "source"}, {"truncationMode"})
        _check_enum(spec["truncationMode"], f"{mpath}/truncationMode", ("START", "END", "NONE"))
        if ("value" in spec) == ("source" in spec):
            raise _malformed(mpath, "exactly one of [value, source] must be set")
        if "value" in spec:
            if not isinstance(spec["value"], str):
                raise _malformed(f"{mpath}/value", "expected type: String")
            text = spec["value"]
        else:
            try:
                text = _media(spec, mpath, read, max_image_bytes, account_id).decode("utf-8")
            except UnicodeDecodeError:
                raise _RecordError("The text object is not UTF-8 text.") from None
        if not text:
            raise _malformed(f"{mpath}/value", "expected minLength: 1")
        item: dict[str, Any] = {"embeddingType": "TEXT"}
        kept = _MAX_TEXT_TOKENS * _CHARS_PER_TOKEN
        if len(text) > kept:
            if spec["truncationMode"] == "NONE":
                raise _RecordError(f"The text is longer than the maximum of {_MAX_TEXT_TOKENS} tokens with "
                                   "truncationMode NONE.")
            text = text[:kept] if spec["truncationMode"] == "END" else text[-kept:]
            item["truncatedCharLength"] = kept
        item["embedding"] = embed_text(text, dimension)
        return {"embeddings": [item]}, max(1, math.ceil(len(text) / _CHARS_PER_TOKEN))
    if modality == "image":
        spec = _check_keys(params["image"], mpath, {"format", "source", "detailLevel"}, {"format", "source"})
        _check_enum(spec["format"], f"{mpath}/format", _IMAGE_FORMATS)
        if "detailLevel" in spec:
            _check_enum(spec["detailLevel"], f"{mpath}/detailLevel", ("STANDARD_IMAGE", "DOCUMENT_IMAGE"))
        data = _media(spec, mpath, read, max_image_bytes, account_id)
        actual = _image_format_of(data)
        if actual != spec["format"]:
            raise _RecordError(f"The image content is {actual or 'not a supported image format'} but the declared "
                               f"format is {spec['format']}.")
        return {"embeddings": [{"embeddingType": "IMAGE", "embedding": embed_image(data, dimension)}]}, 0
    # video and audio: format and source are checked; the content is not (no decoder here)
    if modality == "video":
        spec = _check_keys(params["video"], mpath, {"format", "source", "embeddingMode"}, {"format", "source"})
        _check_enum(spec["format"], f"{mpath}/format", _VIDEO_FORMATS)
        mode = spec.get("embeddingMode", "AUDIO_VIDEO_COMBINED")  # unverified: whether it may be omitted
        _check_enum(mode, f"{mpath}/embeddingMode", ("AUDIO_VIDEO_COMBINED", "AUDIO_VIDEO_SEPARATE"))
        data = _media(spec, mpath, read, max_image_bytes, account_id)
        kinds = ["AUDIO_VIDEO_COMBINED"] if mode == "AUDIO_VIDEO_COMBINED" else ["VIDEO", "AUDIO"]
    else:
        spec = _check_keys(params["audio"], mpath, {"format", "source"}, {"format", "source"})
        _check_enum(spec["format"], f"{mpath}/format", _AUDIO_FORMATS)
        data = _media(spec, mpath, read, max_image_bytes, account_id)
        kinds = ["AUDIO"]
    return {"embeddings": [{"embeddingType": k, "embedding": embed_bytes(k, data, dimension)} for k in kinds]}, 0


def make_app(*, s3_endpoint_url: str, iam_endpoint_url: str | None = None, region: str = "us-east-1",
             account_id: str = "123456789012", options: dict | None = None,
             read_object: Callable[[str, str], bytes | None] | None = None) -> BedrockEmulator:
    """The WSGI app of the emulator; run it with tests.standins.serve."""
    return BedrockEmulator(s3_endpoint_url=s3_endpoint_url, iam_endpoint_url=iam_endpoint_url, region=region,
                           account_id=account_id, options=options, read_object=read_object)
