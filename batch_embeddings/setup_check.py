"""The checks of 00_check_setup.py: each a small function that takes its clients and returns a Row (or a few).

Every check only reads (Get*, List*, iam:SimulatePrincipalPolicy); nothing is created, written or submitted.
The one exception is `check_invoke` (00 --invoke): a single InvokeModel of a short text, paid for and written
nowhere. A check that cannot tell (a permission the caller lacks, a quota it cannot find) says so with `?` rather
than guessing.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

import common
from batch_embeddings import naming, nova
from common import Config

OK, FAILED, UNKNOWN = "ok", "failed", "unknown"
MARKS = {OK: "✓", FAILED: "✗", UNKNOWN: "?"}
BEDROCK_SERVICE = "bedrock.amazonaws.com"
PROBE_JOB_ID = "checksetup00"  # a job id of Bedrock's form: the resource a job of this account and region has
PROBE_OBJECT = "check-setup-probe.jpg"  # an object name under a prefix, for the permission checks
CALLER_POLICY_HINT = "bash iam/setup_service_role.sh --user-policy"
PAGES_COMPARED = 2
PAGE_KEYS = 2  # keys a page when comparing the fast readers with botocore: small pages, so tokens are compared too
_INFERENCE_PROFILE = re.compile(r"(us|us-gov|eu|apac|jp|au|ca|global)\.")


@dataclass(frozen=True)
class Row:
    name: str
    status: str  # OK, FAILED or UNKNOWN
    detail: str
    fix: str = ""

    @property
    def mark(self) -> str:
        return MARKS[self.status]


def ok(name: str, detail: str) -> Row:
    return Row(name, OK, detail)


def failed(name: str, detail: str, fix: str) -> Row:
    return Row(name, FAILED, detail, fix)


def unknown(name: str, detail: str, fix: str = "") -> Row:
    return Row(name, UNKNOWN, detail, fix)


def _message(exc) -> str:
    err = exc.response.get("Error", {})
    return f"{err.get('Code', 'Error')}: {err.get('Message', '')}".rstrip(": ")


# --------------------------------------------------------------------------------------------------------------
# Credentials and model
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    account: str
    arn: str  # as STS gives it (an assumed role's is arn:aws:sts::<account>:assumed-role/<role>/<session>)

    @property
    def partition(self) -> str:
        return self.arn.split(":")[1]


def check_identity(sts, config: Config) -> tuple[Row, Identity | None]:
    from botocore.exceptions import ClientError, NoCredentialsError

    try:
        who = sts.get_caller_identity()
    except NoCredentialsError:
        return failed("credentials", "no AWS credentials found",
                      "configure them: aws configure, AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"), None
    except ClientError as exc:
        if common.error_code(exc) in ("ExpiredToken", "ExpiredTokenException", "InvalidClientTokenId",
                                      "SignatureDoesNotMatch", "UnrecognizedClientException"):
            return failed("credentials", _message(exc), "refresh your AWS credentials (aws sso login, or new keys)"), None
        raise
    identity = Identity(who["Account"], who["Arn"])
    return ok("credentials", f"account {identity.account} as {identity.arn}, region {config.region}"), identity


def check_model(bedrock, config: Config) -> tuple[Row, str | None]:
    """The model exists in the region and the caller can see it; returns its display name (the quotas use it)."""
    from botocore.exceptions import ClientError

    name, model = "model", config.model_id
    if _INFERENCE_PROFILE.match(model.rsplit("/", 1)[-1]):
        return unknown(name, f"{model} is an inference profile: GetFoundationModel does not describe it"), None
    fix = (f"set MODEL_ID to a model offered in {config.region}, or AWS_REGION to a region that offers {model} "
           "(Nova Multimodal Embeddings: us-east-1)")
    try:
        details = bedrock.get_foundation_model(modelIdentifier=model)["modelDetails"]
    except ClientError as exc:
        code = common.error_code(exc)
        if code in ("ResourceNotFoundException", "ValidationException"):
            return failed(name, f"{model} is not offered in {config.region} ({_message(exc)})", fix), None
        if code != "AccessDeniedException":
            raise
        try:  # the caller may list the models without being allowed to get one
            summaries = bedrock.list_foundation_models()["modelSummaries"]
        except ClientError as again:
            if common.error_code(again) != "AccessDeniedException":
                raise
            return unknown(name, "cannot read the model (needs bedrock:GetFoundationModel or "
                                 "bedrock:ListFoundationModels): skipped"), None
        found = [s for s in summaries if model in (s.get("modelId"), s.get("modelArn"))]
        if not found:
            return failed(name, f"{model} is not among the models of {config.region}", fix), None
        details = found[0]
    if "EMBEDDING" not in details.get("outputModalities", ["EMBEDDING"]):
        return failed(name, f"{model} ({details.get('modelName')}) does not make embeddings",
                      "set MODEL_ID to an embedding model (amazon.nova-2-multimodal-embeddings-v1:0)"), None
    status = (details.get("modelLifecycle") or {}).get("status", "ACTIVE")
    shown = details.get("modelName") or model
    return ok(name, f"{model} ({shown}{'' if status == 'ACTIVE' else ', ' + status}) in {config.region}"), \
        details.get("modelName")


def check_invoke(runtime, config: Config) -> Row:
    """One InvokeModel of a short text (00 --invoke): the model answers this caller with the configured dimension."""
    from botocore.exceptions import ClientError

    name = "InvokeModel"
    body = nova.text_request("a red sports car", config.embedding_dimension, "GENERIC_RETRIEVAL")
    try:
        vector = nova.embed(runtime, config.model_id, body)
    except ClientError as exc:
        if common.error_code(exc) == "AccessDeniedException":
            return failed(name, _message(exc), f"allow bedrock:InvokeModel on the model ({CALLER_POLICY_HINT})")
        if common.error_code(exc) == "ValidationException":
            return failed(name, _message(exc), "check MODEL_ID and EMBEDDING_DIMENSION")
        raise
    if len(vector) != config.embedding_dimension:
        return failed(name, f"{config.model_id} answered {len(vector)} numbers, not EMBEDDING_DIMENSION="
                            f"{config.embedding_dimension}", "check MODEL_ID and EMBEDDING_DIMENSION")
    return ok(name, f"{config.model_id} embedded a text: {len(vector)} numbers")


# --------------------------------------------------------------------------------------------------------------
# Quotas (Service Quotas, service code bedrock)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuotaSpec:
    field: str  # of common.Quotas
    setting: str  # the setting that holds it
    what: str  # the row's name
    pattern: str  # the quota's name without "(in GB)", lowercase; {model} is the model's name
    bytes_per_unit: int = 1  # the quota is in GB, the setting in bytes
    minimum: bool = False  # the setting may not be below the quota (instead of above it)

    def display(self, model: str) -> str:
        shown = self.pattern[0].upper() + self.pattern[1:]
        if self.bytes_per_unit > 1:
            shown = shown.replace(" for {model}", " (in GB) for {model}")
        return shown.replace("{model}", model)


# The names the AWS General Reference gives the batch quotas of a model, e.g. "Records per batch inference job for
# Nova Pro V1", "Batch inference job size (in GB) for Claude 3 Haiku" (some models have "... for X (in GB)").
QUOTA_SPECS = (
    QuotaSpec("min_records_per_job", "MIN_RECORDS_PER_JOB", "minimum records per job quota",
              "minimum number of records per batch inference job for {model}", minimum=True),
    QuotaSpec("max_records_per_file", "MAX_RECORDS_PER_FILE", "records per input file quota",
              "records per input file per batch inference job for {model}"),
    QuotaSpec("max_records_per_job", "MAX_RECORDS_PER_JOB", "records per job quota",
              "records per batch inference job for {model}"),
    QuotaSpec("max_input_file_bytes", "MAX_INPUT_FILE_BYTES", "input file size quota",
              "batch inference input file size for {model}", bytes_per_unit=1_000_000_000),
    QuotaSpec("max_job_bytes", "MAX_JOB_BYTES", "job size quota",
              "batch inference job size for {model}", bytes_per_unit=1_000_000_000),
    QuotaSpec("max_concurrent_jobs", "MAX_CONCURRENT_JOBS", "submitted + in-progress jobs quota",
              "sum of in-progress and submitted batch inference jobs using a base model for {model}"),
)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9][a-z0-9.]*", text.lower().replace("(in gb)", " "))


def _model_key(words: list[str]) -> tuple[str, ...]:
    """A model's name as the quotas may spell it: without a leading 'amazon' and a trailing version ('v1')."""
    if words[:1] == ["amazon"]:
        words = words[1:]
    if words and re.fullmatch(r"v[0-9.]+", words[-1]):
        words = words[:-1]
    return tuple(words)


def model_names(model_id: str, display_name: str | None) -> list[str]:
    """The names the quotas may give the model: its display name (GetFoundationModel's modelName) and one made from
    its id (amazon.nova-2-multimodal-embeddings-v1:0 -> Nova 2 Multimodal Embeddings V1)."""
    base = model_id.rsplit("/", 1)[-1].split(":", 1)[0]
    base = base.split(".", 1)[-1] if "." in base else base
    from_id = " ".join(w.upper() if re.fullmatch(r"v[0-9]+", w) else w.capitalize() for w in base.split("-"))
    return [n for n in dict.fromkeys([display_name, from_id]) if n]


@dataclass(frozen=True)
class FoundQuota:
    name: str
    value: float
    default: bool  # from ListAWSDefaultServiceQuotas (the account has no applied value)


def match_quotas(quotas: Iterable[dict], names: list[str], default: bool = False) -> dict[str, list[FoundQuota]]:
    """For each QuotaSpec field, the quotas whose name is that spec's for one of the model's `names` (an exact name
    first; failing that, one that differs in 'Amazon' or the version only)."""
    exact = {tuple(_words(n)) for n in names}
    loose = {_model_key(_words(n)) for n in names}
    found: dict[str, list[tuple[int, FoundQuota]]] = defaultdict(list)
    for q in quotas:
        words = _words(q.get("QuotaName", ""))
        for spec in QUOTA_SPECS:
            prefix = _words(spec.pattern.replace("{model}", ""))
            if words[:len(prefix)] != prefix:
                continue
            model = words[len(prefix):]
            rank = 2 if tuple(model) in exact else 1 if _model_key(model) in loose else 0
            if rank:
                found[spec.field].append((rank, FoundQuota(q["QuotaName"], float(q["Value"]), default)))
    best = {}
    for field_name, candidates in found.items():
        top = max(rank for rank, _ in candidates)
        best[field_name] = [q for rank, q in candidates if rank == top]
    return best


def list_quotas(client, operation: str) -> list[dict]:
    """Every quota of the bedrock service code, all pages (`operation`: list_service_quotas for the account's
    applied values, list_aws_default_service_quotas for AWS's defaults)."""
    paginator = client.get_paginator(operation)
    return [q for page in paginator.paginate(ServiceCode="bedrock", PaginationConfig={"PageSize": 100})
            for q in page.get("Quotas", [])]


def check_quotas(quotas_client, config: Config, display_name: str | None) -> list[Row]:
    """The model's batch quotas against MIN_RECORDS_PER_JOB, MAX_RECORDS_PER_FILE, ... (common.Quotas)."""
    from botocore.exceptions import ClientError

    names = model_names(config.model_id, display_name)
    try:
        found = match_quotas(list_quotas(quotas_client, "list_service_quotas"), names)
    except ClientError as exc:
        if common.error_code(exc) not in ("AccessDeniedException", "NoSuchResourceException"):
            raise
        settings = ", ".join(spec.setting for spec in QUOTA_SPECS)
        return [unknown("quotas", f"cannot read Service Quotas ({_message(exc)}; needs "
                                  "servicequotas:ListServiceQuotas): skipped",
                        f"compare {settings} with the Amazon Bedrock quotas of {names[0]} in the Service Quotas "
                        "console")]
    if any(spec.field not in found for spec in QUOTA_SPECS):
        # ListServiceQuotas leaves out the quotas the account has no applied value for: take AWS's default then
        try:
            defaults = match_quotas(list_quotas(quotas_client, "list_aws_default_service_quotas"), names, True)
        except ClientError as exc:
            if common.error_code(exc) not in ("AccessDeniedException", "NoSuchResourceException"):
                raise
            defaults = {}
        found = {**defaults, **found}
    return [_quota_row(spec, getattr(config.quotas, spec.field), found.get(spec.field, []), names)
            for spec in QUOTA_SPECS]


def _quota_row(spec: QuotaSpec, setting: int, quotas: list[FoundQuota], names: list[str]) -> Row:
    if not quotas:
        looked = " or ".join(f"'{spec.display(n)}'" for n in names)
        return unknown(spec.what, f"no quota named {looked} in Service Quotas (bedrock); {spec.setting}={setting} "
                                  "not checked",
                       f"find the quota in the Service Quotas console (Amazon Bedrock) and set {spec.setting}")
    values = {q.value for q in quotas}
    if len(values) > 1:
        listed = ", ".join(f"'{q.name}' = {q.value:g}" for q in quotas)
        return unknown(spec.what, f"several quotas could be the model's: {listed}",
                       f"set {spec.setting} to the one of the model you use")
    q = quotas[0]
    allowed = int(q.value * spec.bytes_per_unit)
    source = f"'{q.name}' = {q.value:g}" + (" (AWS default)" if q.default else "")
    if spec.minimum and setting < allowed:
        return failed(spec.what, f"{spec.setting}={setting} is below the quota {source}: a job that small fails "
                                 "validation", f"set {spec.setting}={allowed}")
    if not spec.minimum and setting > allowed:
        return failed(spec.what, f"{spec.setting}={setting} is above the quota {source}: a job that big fails",
                      f"set {spec.setting}={allowed}")
    note = "" if setting == allowed else f" (the quota allows {spec.setting}={allowed})"
    return ok(spec.what, f"{spec.setting}={setting}, quota {source}{note}")


# --------------------------------------------------------------------------------------------------------------
# Buckets and the vector index
# --------------------------------------------------------------------------------------------------------------


def check_bucket(s3, what: str, setting: str, bucket: str, prefix: str, owner: str) -> Row:
    """The bucket exists, belongs to `owner` and the caller may list the prefix (a ListObjectsV2 of one key: a
    HeadBucket needs s3:ListBucket without an s3:prefix, which the generated caller policy does not grant)."""
    from botocore.exceptions import ClientError

    uri = common.s3_uri(bucket, prefix)
    if len(uri) > common.MAX_S3_URI or not common.S3_URI_RE.fullmatch(uri):
        return failed(what, f"{uri[:80]} cannot be a Bedrock job's s3Uri: at most {common.MAX_S3_URI} characters, "
                            "folder names of letters, digits and -!_*'(). only",
                      f"choose another {setting.replace('BUCKET', 'PREFIX')}")
    try:
        page = s3.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1, ExpectedBucketOwner=owner)
    except ClientError as exc:
        code = common.error_code(exc)
        if code == "NoSuchBucket":
            return failed(what, f"s3://{bucket} does not exist", f"create it, or fix {setting}")
        if code in ("AccessDenied", "403", "AllAccessDisabled"):
            return failed(what, f"{uri}: access denied — the bucket belongs to another account than {owner}, or "
                                "the caller may not list it",
                          f"check {setting} and EXPECTED_BUCKET_OWNER, and the caller's policy ({CALLER_POLICY_HINT})")
        raise
    empty = "" if page.get("KeyCount", len(page.get("Contents", []))) else " (nothing under it yet)"
    return ok(what, f"{uri}, owned by {owner}{empty}")


def check_vector_store(s3v, config: Config) -> list[Row]:
    """The vector bucket and index: missing is fine (step 3 creates them); an index of another dimension, metric or
    data type is not."""
    from botocore.exceptions import ClientError

    bucket, index = config.vector_bucket, config.vector_index
    later = f"will be created by step 3 ({config.embedding_dimension} dimensions, cosine)"
    fix_access = f"allow s3vectors:GetVectorBucket and GetIndex ({CALLER_POLICY_HINT})"
    try:
        s3v.get_vector_bucket(vectorBucketName=bucket)
    except ClientError as exc:
        code = common.error_code(exc)
        if code == "NotFoundException":
            return [ok("vector bucket", f"{bucket} will be created by step 3"), ok("vector index", f"{index} {later}")]
        if code == "AccessDeniedException":
            return [failed("vector bucket", f"{bucket}: {_message(exc)}", fix_access)]
        raise
    rows = [ok("vector bucket", f"{bucket} exists")]
    try:
        described = s3v.get_index(vectorBucketName=bucket, indexName=index)["index"]
    except ClientError as exc:
        code = common.error_code(exc)
        if code == "NotFoundException":
            return rows + [ok("vector index", f"{index} {later}")]
        if code == "AccessDeniedException":
            return rows + [failed("vector index", f"{index}: {_message(exc)}", fix_access)]
        raise
    dimension, metric = described.get("dimension"), described.get("distanceMetric")
    if dimension != config.embedding_dimension:
        return rows + [failed("vector index", f"{index} holds {dimension}-dimension vectors, EMBEDDING_DIMENSION="
                                              f"{config.embedding_dimension}",
                              f"set EMBEDDING_DIMENSION={dimension}, or choose another VECTOR_INDEX")]
    if metric != "cosine" or described.get("dataType", "float32") != "float32":
        return rows + [failed("vector index", f"{index} measures {metric} distance of {described.get('dataType')} "
                                              "vectors; the queries expect cosine over float32",
                              "choose another VECTOR_INDEX (step 3 creates it with cosine)")]
    return rows + [ok("vector index", f"{index}: {dimension} dimensions, cosine")]


# --------------------------------------------------------------------------------------------------------------
# The service role and the caller's permissions
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Need:
    action: str
    resource: str
    context: tuple[tuple[str, str], ...] = ()


def _s3_needs(actions: Iterable[str], arn: str, owner: str, prefix: str | None = None) -> list[Need]:
    context = (("aws:ResourceAccount", owner),) + ((("s3:prefix", prefix),) if prefix is not None else ())
    return [Need(action, arn, context) for action in actions]


def role_needs(config: Config, owner: str, partition: str) -> list[Need]:
    """What a job does with the service role: list and read the source prefix, list and write the result prefix
    (and the output key, when OUTPUT_KMS_KEY_ID is a key ARN)."""
    s3 = f"arn:{partition}:s3:::"
    needs = [
        *_s3_needs(["s3:ListBucket"], s3 + config.source_bucket, owner, config.source_prefix),
        *_s3_needs(["s3:GetObject"], s3 + f"{config.source_bucket}/{config.source_prefix}{PROBE_OBJECT}", owner),
        *_s3_needs(["s3:ListBucket"], s3 + config.result_bucket, owner, config.result_prefix),
        *_s3_needs(["s3:PutObject"], s3 + f"{config.result_bucket}/{config.result_prefix}{PROBE_JOB_ID}/x.jsonl.out",
                   owner),
    ]
    return needs + _output_key_needs(config, ["kms:GenerateDataKey", "kms:Decrypt"])


def _output_key_needs(config: Config, actions: list[str]) -> list[Need]:
    """The KMS actions on OUTPUT_KMS_KEY_ID, through S3 (when it is a key ARN: an alias or a bare id names no
    resource to simulate)."""
    key = config.output_kms_key_id or ""
    if not (key.startswith("arn:") and ":key/" in key):
        return []
    return [Need(action, key, (("kms:ViaService", f"s3.{config.region}.amazonaws.com"),)) for action in actions]


def caller_needs(config: Config, account: str, owner: str, partition: str) -> list[Need]:
    """What the numbered steps do as the caller (the statements of iam/caller-policy.json)."""
    job = f"arn:{partition}:bedrock:{config.region}:{account}:model-invocation-job/{PROBE_JOB_ID}"
    model = f"arn:{partition}:bedrock:{config.region}::foundation-model/{config.model_id}"
    s3 = f"arn:{partition}:s3:::"
    vector_bucket = f"arn:{partition}:s3vectors:{config.region}:{account}:bucket/{config.vector_bucket}"
    index = f"{vector_bucket}/index/{config.vector_index}"
    return [
        Need("bedrock:CreateModelInvocationJob", job),
        Need("bedrock:CreateModelInvocationJob", model),
        Need("bedrock:GetModelInvocationJob", job),
        Need("bedrock:StopModelInvocationJob", job),
        Need("bedrock:ListModelInvocationJobs", "*"),
        Need("bedrock:InvokeModel", model),
        Need("iam:PassRole", config.role_arn, (("iam:PassedToService", BEDROCK_SERVICE),)),
        *_s3_needs(["s3:ListBucket"], s3 + config.source_bucket, owner, config.source_prefix),
        *_s3_needs(["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload", "s3:DeleteObject"],
                   s3 + f"{config.source_bucket}/{config.source_prefix}{naming.MANIFEST_PREFIX}x.jsonl", owner),
        *_s3_needs(["s3:ListBucket"], s3 + config.result_bucket, owner, config.result_prefix),
        *_s3_needs(["s3:GetObject"], s3 + f"{config.result_bucket}/{config.result_prefix}{PROBE_JOB_ID}/x.jsonl.out",
                   owner),
        Need("s3vectors:CreateVectorBucket", vector_bucket),
        Need("s3vectors:GetVectorBucket", vector_bucket),
        *(Need(f"s3vectors:{action}", index) for action in
          ("CreateIndex", "GetIndex", "PutVectors", "GetVectors", "ListVectors", "QueryVectors")),
        *_output_key_needs(config, ["kms:Decrypt"]),  # 03 reads the results
    ]


def denied(iam, principal_arn: str, needs: list[Need]) -> list[Need]:
    """The needs iam:SimulatePrincipalPolicy does not find allowed for the principal (one call a resource and
    request context, every page)."""
    groups: dict[tuple[str, tuple], list[str]] = defaultdict(list)
    for need in needs:
        groups[(need.resource, need.context)].append(need.action)
    refused = []
    paginator = iam.get_paginator("simulate_principal_policy")
    for (resource, context), actions in groups.items():
        entries = [{"ContextKeyName": k, "ContextKeyValues": [v], "ContextKeyType": "string"} for k, v in context]
        for page in paginator.paginate(PolicySourceArn=principal_arn, ActionNames=actions, ResourceArns=[resource],
                                       **({"ContextEntries": entries} if entries else {})):
            for result in page["EvaluationResults"]:
                if result["EvalDecision"] != "allowed":
                    refused.append(Need(result["EvalActionName"], resource, context))
    return refused


def _describe(needs: list[Need]) -> str:
    shown = [f"{n.action} on {n.resource}" for n in needs[:4]]
    return ", ".join(shown) + (f" (+{len(needs) - 4} more)" if len(needs) > 4 else "")


def _simulated(name: str, iam, principal: str, needs: list[Need], fix: str) -> Row:
    from botocore.exceptions import ClientError

    try:
        refused = denied(iam, principal, needs)
    except ClientError as exc:
        if common.error_code(exc) in ("AccessDenied", "AccessDeniedException"):
            return unknown(name, "cannot simulate (needs iam:SimulatePrincipalPolicy): skipped")
        if common.error_code(exc) in ("NoSuchEntity", "InvalidInput"):
            return unknown(name, f"cannot simulate {principal} ({_message(exc)}): skipped")
        raise
    if refused:
        return failed(name, f"{principal} is not allowed {_describe(refused)}", fix)
    return ok(name, f"{principal} may do the {len(needs)} things it needs")


def check_role(iam, config: Config, identity: Identity) -> tuple[Row, bool]:
    """ROLE_ARN exists in the caller's account and its trust policy lets Bedrock's jobs assume it; returns the row
    and whether the role was found."""
    from botocore.exceptions import ClientError

    arn, name = config.role_arn, "service role"
    account, role_name = arn.split(":")[4], arn.rsplit("/", 1)[-1]
    fix = "bash iam/setup_service_role.sh, and set ROLE_ARN to the ARN it prints"
    if account != identity.account:
        return failed(name, f"ROLE_ARN is in account {account}, the jobs run in {identity.account}: a role of "
                            "another account cannot be passed to Bedrock", fix), False
    try:
        role = iam.get_role(RoleName=role_name)["Role"]
    except ClientError as exc:
        code = common.error_code(exc)
        if code == "NoSuchEntity":
            return failed(name, f"no role {role_name} in account {account}", fix), False
        if code in ("AccessDenied", "AccessDeniedException"):
            return unknown(name, "cannot read the role (needs iam:GetRole): skipped"), False
        raise
    if role["Arn"] != arn:
        return failed(name, f"ROLE_ARN={arn}, but the role {role_name} is {role['Arn']}",
                      f"set ROLE_ARN={role['Arn']}"), False
    job = f"arn:{identity.partition}:bedrock:{config.region}:{account}:model-invocation-job/{PROBE_JOB_ID}"
    verdict, why = trust_allows(role.get("AssumeRolePolicyDocument"), BEDROCK_SERVICE,
                                {"aws:SourceAccount": account, "aws:SourceArn": job})
    if verdict is None:
        return unknown(name, f"{arn}: cannot tell whether its trust policy lets {BEDROCK_SERVICE} assume it "
                             f"({why})"), True
    if not verdict:
        return failed(name, f"{arn}: its trust policy does not let {BEDROCK_SERVICE} assume it for a job of "
                            f"{config.region} ({why})", fix), True
    return ok(name, f"{arn}, trusted by {BEDROCK_SERVICE}"), True


def check_role_permissions(iam, config: Config, identity: Identity, owner: str) -> Row:
    return _simulated("service role permissions", iam, config.role_arn,
                      role_needs(config, owner, identity.partition),
                      "bash iam/setup_service_role.sh (it rewrites the role's permissions for these settings)")


def caller_principal(iam, identity: Identity) -> tuple[str | None, str]:
    """The IAM principal to simulate for the caller (an assumed role: the role) and how the setup script names it
    (user/NAME or role/NAME); None when the caller is not an IAM user or role."""
    from botocore.exceptions import ClientError

    resource = identity.arn.split(":", 5)[5]
    kind, _, rest = resource.partition("/")
    if kind == "user":
        return f"arn:{identity.partition}:iam::{identity.account}:{resource}", "user/" + rest.rsplit("/", 1)[-1]
    if kind == "assumed-role":
        role = rest.split("/", 1)[0]
        try:  # the role's ARN with its path (an SSO role's is /aws-reserved/...)
            return iam.get_role(RoleName=role)["Role"]["Arn"], f"role/{role}"
        except ClientError as exc:
            if common.error_code(exc) not in ("AccessDenied", "AccessDeniedException", "NoSuchEntity"):
                raise
            return f"arn:{identity.partition}:iam::{identity.account}:role/{role}", f"role/{role}"
    return None, resource


def check_caller_permissions(iam, config: Config, identity: Identity, owner: str) -> Row:
    name = "caller permissions"
    principal, label = caller_principal(iam, identity)
    if principal is None:
        if label == "root":
            return ok(name, "the account's root user may do everything (an IAM user or role is safer for cron)")
        return unknown(name, f"{identity.arn} is not an IAM user or role: cannot simulate it")
    return _simulated(name, iam, principal, caller_needs(config, identity.account, owner, identity.partition),
                      f"bash iam/setup_service_role.sh --attach-caller-policy {label} (or add the statements of "
                      f"{CALLER_POLICY_HINT})")


# A trust policy, evaluated for one service principal: enough of IAM's rules for the policies people write for a
# service role. An operator or condition it does not know makes the answer "cannot tell", never "yes".
def _like(pattern: str, value: str, ignore_case: bool = False) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.S | (re.I if ignore_case else 0)) is not None


_OPERATORS = {
    "StringEquals": lambda want, have: want == have,
    "StringLike": _like,
    "ArnEquals": _like,
    "ArnLike": _like,
}
_NOT = {"StringNotEquals": "StringEquals", "StringNotLike": "StringLike", "ArnNotEquals": "ArnEquals",
        "ArnNotLike": "ArnLike"}


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _condition(operator: str, key: str, wanted, context: dict) -> bool | None:
    base = operator.removesuffix("IfExists")
    have = next((v for k, v in context.items() if k.lower() == key.lower()), None)
    if base in _OPERATORS:
        return operator != base if have is None else any(_OPERATORS[base](str(w), have) for w in _as_list(wanted))
    if base in _NOT:
        return True if have is None else not any(_OPERATORS[_NOT[base]](str(w), have) for w in _as_list(wanted))
    return None


def trust_allows(document, service: str, context: dict) -> tuple[bool | None, str]:
    """Whether the trust policy lets `service` call sts:AssumeRole with this request context: (True|False, why), or
    (None, why) when it uses something this reading does not know."""
    import json
    from urllib.parse import unquote

    if isinstance(document, str):
        document = json.loads(unquote(document))
    allowed, unsure = False, ""
    for statement in _as_list((document or {}).get("Statement", [])):
        principal = statement.get("Principal", {})
        services = _as_list(principal.get("Service", [])) if isinstance(principal, dict) else []
        if principal != "*" and service not in services:
            continue
        if not any(_like(a, "sts:AssumeRole", ignore_case=True) for a in _as_list(statement.get("Action", []))):
            continue
        verdicts = [_condition(op, key, wanted, context)
                    for op, keys in statement.get("Condition", {}).items() for key, wanted in keys.items()]
        if None in verdicts:
            unsure = f"condition {', '.join(statement.get('Condition', {}))}"
            continue
        if all(verdicts):
            if statement.get("Effect") == "Deny":
                return False, "a Deny statement matches"
            allowed = True
    if allowed:
        return True, "allowed"
    if unsure:
        return None, unsure
    return False, "no statement allows it"


# --------------------------------------------------------------------------------------------------------------
# The fast readers against botocore, on the very same answers
# --------------------------------------------------------------------------------------------------------------


class _Replay:
    """The body of an answer already received, for botocore to read again."""

    def __init__(self, data: bytes):
        self.data = data

    def stream(self, **_):
        yield self.data


def same_answer(plain, fast, event: str, call: str, params: dict) -> tuple[dict, dict]:
    """Call `call` once on `plain` (botocore's parser), then on `fast` with the very same HTTP answer replayed (no
    second request): the two readings of one answer. `event` is like 's3.ListObjectsV2'."""
    from botocore.awsrequest import AWSResponse

    answers = []

    def keep(http_response, **_):
        answers.append(http_response)

    def replay(**_):
        answer = answers[-1]
        return AWSResponse(answer.url, answer.status_code, answer.headers, _Replay(answer.content))

    plain.meta.events.register(f"after-call.{event}", keep, unique_id="setup-check-keep")
    fast.meta.events.register_first(f"before-send.{event}", replay, unique_id="setup-check-replay")
    try:
        reference = getattr(plain, call)(**params)
        return reference, getattr(fast, call)(**params)
    finally:
        plain.meta.events.unregister(f"after-call.{event}", unique_id="setup-check-keep")
        fast.meta.events.unregister(f"before-send.{event}", unique_id="setup-check-replay")


def _listing_fields(page: dict) -> dict:
    return {
        "keys, sizes and ETags": [(o.get("Key"), o.get("Size"), o.get("ETag")) for o in page.get("Contents") or []],
        "CommonPrefixes": [p.get("Prefix") for p in page.get("CommonPrefixes") or []],
        "IsTruncated": bool(page.get("IsTruncated")),
        "NextContinuationToken": page.get("NextContinuationToken"),
    }


def _first_difference(reference: dict, fast: dict) -> str | None:
    for name, want in reference.items():
        have = fast.get(name)
        if have != want:
            if isinstance(want, list) and isinstance(have, list):
                at = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), min(len(want), len(have)))
                want = want[at] if at < len(want) else "(nothing)"
                have = have[at] if at < len(have) else "(nothing)"
                return f"{name} (item {at + 1}): botocore {want!r}, fast reader {have!r}"
            return f"{name}: botocore {want!r}, fast reader {have!r}"
    return None


def check_listing_reader(plain_s3, lean_s3, bucket: str, prefix: str, owner: str) -> Row:
    """listing.fast_listing_client's ListObjectsV2 reader against botocore's on the same pages: the first pages of the prefix with
    and without a delimiter (01 lists folders both ways), PAGE_KEYS keys a page."""
    name = "S3 listing reader"
    compared = 0
    for delimiter in ("/", None):
        token = None
        for number in range(1, PAGES_COMPARED + 1):
            params = dict(Bucket=bucket, Prefix=prefix, MaxKeys=PAGE_KEYS, ExpectedBucketOwner=owner,
                          **({"Delimiter": delimiter} if delimiter else {}),
                          **({"ContinuationToken": token} if token else {}))
            reference, fast = same_answer(plain_s3, lean_s3, "s3.ListObjectsV2", "list_objects_v2", params)
            want = _listing_fields(reference)
            difference = _first_difference(want, _listing_fields(fast))
            if difference:
                where = f"page {number} of s3://{bucket}/{prefix}" + (" by folder" if delimiter else "")
                return failed(name, f"report this: the fast reader (listing.py) disagrees with botocore on {where}: "
                                    f"{difference}",
                              "report it with this line; until it is fixed, 01 --inventory S3_URI reads an S3 "
                              "Inventory report instead of listing")
            compared += len(want["keys, sizes and ETags"]) + len(want["CommonPrefixes"])
            token = reference.get("NextContinuationToken")
            if not reference.get("IsTruncated") or not token:
                break
    return ok(name, f"agrees with botocore on the first pages of s3://{bucket}/{prefix} ({compared} entries)")


def _vector_keys(page: dict) -> list[str]:
    packed = page.get("packedKeys", b"")
    keys = [packed[i:i + 16].hex() for i in range(0, len(packed), 16)]
    return keys + [v.get("key") for v in page.get("vectors") or []]


def check_vector_reader(plain_s3v, lean_s3v, config: Config) -> Row:
    """keyset.fast_keys_client's ListVectors reader against botocore's on the same pages of the index, when it exists."""
    from botocore.exceptions import ClientError

    name = "S3 Vectors page reader"
    token, compared = None, 0
    for number in range(1, PAGES_COMPARED + 1):
        params = dict(vectorBucketName=config.vector_bucket, indexName=config.vector_index, maxResults=PAGE_KEYS,
                      **({"nextToken": token} if token else {}))
        try:
            reference, fast = same_answer(plain_s3v, lean_s3v, "s3vectors.ListVectors", "list_vectors", params)
        except ClientError as exc:
            if common.error_code(exc) != "NotFoundException" or number > 1:
                raise
            return ok(name, f"no index {config.vector_index} yet: nothing to read")
        want = {"keys": [v.get("key") for v in reference.get("vectors") or []], "nextToken": reference.get("nextToken")}
        difference = _first_difference(want, {"keys": _vector_keys(fast), "nextToken": fast.get("nextToken")})
        if difference:
            return failed(name, f"report this: the fast reader (keyset.py) disagrees with botocore on page {number} "
                                f"of index {config.vector_index}: {difference}",
                          "report it with this line; until it is fixed, 01 --all does not read the index")
        compared += len(want["keys"])
        token = reference.get("nextToken")
        if not token:
            break
    return ok(name, f"agrees with botocore on the first pages of index {config.vector_index} ({compared} keys)")
