"""Service Quotas stand-in: ListServiceQuotas and ListAWSDefaultServiceQuotas for the `bedrock` service code.

moto's Service Quotas has no ListServiceQuotas and no Bedrock quotas. This WSGI app follows botocore's
`service-quotas` model (2019-06-24): JSON 1.1, every call a `POST /` naming its operation in
`X-Amz-Target: ServiceQuotasV20190624.<Operation>`, errors as `{"__type": ..., "message": ...}` (HTTP 400);
paging with `MaxResults` (1-100) and an opaque `NextToken`.

The Bedrock batch quotas are per model and named "<what> for <model>" (the names the AWS General Reference lists,
e.g. "Records per batch inference job for Nova Pro V1", "Batch inference job size (in GB) for Claude 3 Haiku",
"Sum of in-progress and submitted batch inference jobs using a base model for Claude 3.5 Sonnet"; the position of
"(in GB)" varies between models). Which name the Nova Multimodal Embeddings model goes by is unverified: MODEL_NAME
here, the `modelName` the Bedrock emulator's GetFoundationModel answers, and a test can set any other.

    app = make_app()                      # the six batch quotas of MODEL_NAME at the emulator's defaults
    served = serve(app)                   # from tests.standins
    GET  {served.url}/_standin/quotas     the quotas: [{"QuotaName", "Value", "QuotaCode", "applied"}, ...]
    POST {served.url}/_standin/quotas     {"quotas": [...]} replaces them ("applied": false: only a default value,
                                          which ListServiceQuotas leaves out and ListAWSDefaultServiceQuotas lists)
    POST {served.url}/_standin/config     {"deny": true}: every call answers AccessDeniedException
    POST {served.url}/_standin/reset      back to the quotas and options given to make_app
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import threading
import uuid
from typing import Any

from werkzeug.wrappers import Request, Response

from .bedrock import DEFAULT_OPTIONS, NOVA_MME_NAME

TARGET_PREFIX = "ServiceQuotasV20190624."
SERVICE_CODE = "bedrock"
SERVICE_NAME = "Amazon Bedrock"
MODEL_NAME = NOVA_MME_NAME  # unverified: the name the quotas use for the model (the emulator's modelName)
DEFAULT_PAGE = 100  # unverified: the page size when MaxResults is omitted (the model's maximum)
_SERVICE_CODE_RE = re.compile(r"[a-zA-Z][a-zA-Z0-9-]{1,63}")


def code_for(name: str) -> str:
    """A quota code of the service's form (L- and 8 hex digits), the same for the same name."""
    return "L-" + hashlib.sha256(name.encode()).hexdigest()[:8].upper()


def quota(name: str, value: float, *, applied: bool = True) -> dict:
    return {"QuotaName": name, "Value": float(value), "QuotaCode": code_for(name), "applied": applied}


def batch_quotas(model_name: str = MODEL_NAME, *, min_records_per_job: int = 100, max_records_per_file: int = 50_000,
                 max_records_per_job: int = 50_000, max_input_file_bytes: int = 1_000_000_000,
                 max_job_bytes: int = 5_000_000_000, max_concurrent_jobs: int = 10) -> list[dict]:
    """The six batch quotas of one model, in the wording of the General Reference's table (sizes in GB)."""
    return [
        quota(f"Minimum number of records per batch inference job for {model_name}", min_records_per_job),
        quota(f"Records per input file per batch inference job for {model_name}", max_records_per_file),
        quota(f"Records per batch inference job for {model_name}", max_records_per_job),
        quota(f"Batch inference input file size (in GB) for {model_name}", max_input_file_bytes / 1e9),
        quota(f"Batch inference job size (in GB) for {model_name}", max_job_bytes / 1e9),
        quota(f"Sum of in-progress and submitted batch inference jobs using a base model for {model_name}",
              max_concurrent_jobs),
    ]


def quotas_for(bedrock_options: dict | None = None) -> list[dict]:
    """The model's batch quotas at the values the Bedrock emulator enforces with these options, among quotas of
    other models and other kinds (which a reader must not take for them)."""
    options = {**DEFAULT_OPTIONS, **(bedrock_options or {})}
    names = ("min_records_per_job", "max_records_per_file", "max_records_per_job", "max_input_file_bytes",
             "max_job_bytes", "max_concurrent_jobs")
    return [
        *batch_quotas(**{name: options[name] for name in names}),
        *batch_quotas("Nova Pro V1", max_records_per_job=25_000, max_concurrent_jobs=20),
        quota(f"On-demand model inference tokens per minute for {MODEL_NAME}", 1_000_000),
        quota("Batch inference job size for Titan Text Embeddings V2 (in GB)", 5),
    ]


class ApiError(Exception):
    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


class ServiceQuotasStandin:
    """The WSGI app; quotas live in memory."""

    def __init__(self, *, region: str = "us-east-1", account_id: str = "123456789012",
                 quotas: list[dict] | None = None):
        self.region, self.account_id = region, account_id
        self._initial = copy.deepcopy(quotas if quotas is not None else quotas_for())
        self.quotas = copy.deepcopy(self._initial)
        self.deny = False
        self.calls: list[str] = []  # operation names, in order
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self.quotas, self.deny = copy.deepcopy(self._initial), False
            self.calls.clear()

    def __call__(self, environ, start_response):
        request = Request(environ)
        try:
            if request.path.startswith("/_standin/"):
                response = self._control(request, request.path[len("/_standin/"):])
            else:
                response = self._api(request)
        except ApiError as err:
            response = self._json({"__type": err.code, "message": err.message}, err.status)
            response.headers["x-amzn-ErrorType"] = err.code
        return response(environ, start_response)

    @staticmethod
    def _json(body: Any, status: int = 200) -> Response:
        return Response(json.dumps(body), status=status, content_type="application/x-amz-json-1.1",
                        headers={"x-amzn-RequestId": str(uuid.uuid4())})

    def _control(self, request: Request, what: str) -> Response:
        if what == "quotas" and request.method == "GET":
            with self._lock:
                return self._json({"quotas": self.quotas, "calls": self.calls})
        if what == "quotas" and request.method == "POST":
            quotas = json.loads(request.get_data() or b"{}").get("quotas", [])
            with self._lock:
                self.quotas = [{"QuotaCode": code_for(q["QuotaName"]), "applied": True, **q} for q in quotas]
                return self._json({"quotas": self.quotas})
        if what == "config" and request.method == "POST":
            with self._lock:
                self.deny = bool(json.loads(request.get_data() or b"{}").get("deny", False))
                return self._json({"deny": self.deny})
        if what == "reset" and request.method == "POST":
            self.reset()
            return self._json({})
        raise ApiError("UnknownOperationException", f"{request.method} /_standin/{what} is not a control call", 404)

    def _api(self, request: Request) -> Response:
        target = request.headers.get("X-Amz-Target", "")
        if request.method != "POST" or not target.startswith(TARGET_PREFIX):
            raise ApiError("UnknownOperationException", f"No operation matches {request.method} {target!r}", 404)
        operation = target[len(TARGET_PREFIX):]
        if operation not in ("ListServiceQuotas", "ListAWSDefaultServiceQuotas"):
            raise ApiError("UnknownOperationException", f"{operation} is not served by this stand-in", 404)
        with self._lock:
            self.calls.append(operation)
            if self.deny:
                raise ApiError("AccessDeniedException", f"User is not authorized to perform: servicequotas:{operation}")
        try:
            body = json.loads(request.get_data() or b"{}")
        except ValueError:
            raise ApiError("SerializationException", "The request body is not valid JSON") from None
        return self._json(self._list(body, applied_only=operation == "ListServiceQuotas"))

    def _list(self, body: dict, *, applied_only: bool) -> dict:
        code = body.get("ServiceCode")
        if not isinstance(code, str) or not _SERVICE_CODE_RE.fullmatch(code):
            raise ApiError("ValidationException", "1 validation error detected: Value at 'serviceCode' failed to "
                                                  "satisfy constraint: Member must satisfy regular expression pattern")
        if code != SERVICE_CODE:
            raise ApiError("NoSuchResourceException", f"The request failed because the specified service {code} "
                                                      "does not exist.")
        size = body.get("MaxResults", DEFAULT_PAGE)
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 100:
            raise ApiError("ValidationException", "1 validation error detected: Value at 'maxResults' failed to "
                                                  "satisfy constraint: Member must have value between 1 and 100")
        start = 0
        if body.get("NextToken") is not None:
            try:
                start = int(base64.urlsafe_b64decode(body["NextToken"].encode()).decode().removeprefix("after:"))
            except (ValueError, AttributeError, UnicodeDecodeError):
                raise ApiError("InvalidPaginationTokenException", "Invalid pagination token") from None
        with self._lock:
            listed = [q for q in self.quotas if q.get("applied", True) or not applied_only]
        page = listed[start:start + size]
        answer: dict[str, Any] = {"Quotas": [self._describe(q) for q in page]}
        if start + size < len(listed):
            answer["NextToken"] = base64.urlsafe_b64encode(f"after:{start + size}".encode()).decode()
        return answer

    def _describe(self, q: dict) -> dict:
        return {
            "ServiceCode": SERVICE_CODE,
            "ServiceName": SERVICE_NAME,
            "QuotaArn": f"arn:aws:servicequotas:{self.region}:{self.account_id}:{SERVICE_CODE}/{q['QuotaCode']}",
            "QuotaCode": q["QuotaCode"],
            "QuotaName": q["QuotaName"],
            "Value": float(q["Value"]),
            "Unit": "None",
            "Adjustable": True,
            "GlobalQuota": False,
            "QuotaAppliedAtLevel": "ACCOUNT",
        }


def make_app(*, region: str = "us-east-1", account_id: str = "123456789012",
             quotas: list[dict] | None = None) -> ServiceQuotasStandin:
    """The WSGI app; `quotas` defaults to quotas_for() (the Bedrock emulator's defaults)."""
    return ServiceQuotasStandin(region=region, account_id=account_id, quotas=quotas)
