"""A small IAM policy evaluator for tests: enough of AWS's rules to check this suite's policies.

``is_allowed`` evaluates identity-based policies (and trust policies, given a principal) the way
IAM does for a single account: an explicit Deny wins, otherwise any matching Allow allows, and no
match denies. ``required_permission`` says which IAM actions, resources and request-context keys
a botocore call needs, following the Service Authorization Reference.

Not modelled: permission boundaries, SCPs, session policies, resource-based policies of the
target, policy variables such as ``${aws:username}``, ForAnyValue/ForAllValues, numeric, date,
Bool and IP operators (an unsupported operator raises ValueError rather than being skipped).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

Permission = tuple[str, str, dict[str, str]]


# ---------------------------------------------------------------- matching


@lru_cache(maxsize=1024)
def _wildcard(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    """IAM wildcards: ``*`` any run of characters (``/`` and ``:`` included), ``?`` one."""
    body = "".join(
        ".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern
    )
    return re.compile(body, re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def _like(pattern: str, value: str, *, ignore_case: bool = False) -> bool:
    return _wildcard(pattern, ignore_case).fullmatch(value) is not None


def _arn_like(pattern: str, arn: str) -> bool:
    """ArnEquals/ArnLike: each of the six colon-separated parts is matched on its own."""
    pattern_parts = pattern.split(":", 5)
    arn_parts = arn.split(":", 5)
    if len(pattern_parts) != 6 or len(arn_parts) != 6:
        return False
    return all(_like(p, a) for p, a in zip(pattern_parts, arn_parts))


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _action_matches(patterns: Any, action: str) -> bool:
    # Action names are case-insensitive in IAM.
    return any(_like(p, action, ignore_case=True) for p in _as_list(patterns))


def _resource_matches(patterns: Any, resource: str) -> bool:
    return any(_like(p, resource) for p in _as_list(patterns))


def _principal_matches(statement_principal: Any, principal: Mapping[str, str] | None) -> bool:
    if principal is None:
        return False
    if statement_principal == "*":
        return True
    for kind, value in principal.items():
        if value in _as_list(statement_principal.get(kind, [])):
            return True
    return False


# ---------------------------------------------------------------- conditions

_POSITIVE = {
    "StringEquals": lambda want, have: want == have,
    "StringEqualsIgnoreCase": lambda want, have: want.lower() == have.lower(),
    "StringLike": lambda want, have: _like(want, have),
    "ArnEquals": _arn_like,
    "ArnLike": _arn_like,
}
_NEGATED = {
    "StringNotEquals": "StringEquals",
    "StringNotEqualsIgnoreCase": "StringEqualsIgnoreCase",
    "StringNotLike": "StringLike",
    "ArnNotEquals": "ArnEquals",
    "ArnNotLike": "ArnLike",
}


def _lookup(context: Mapping[str, Any], key: str) -> str | None:
    # Condition key names are case-insensitive.
    for name, value in context.items():
        if name.lower() == key.lower():
            return str(value)
    return None


def _condition_holds(operator: str, key: str, wanted: Any, context: Mapping[str, Any]) -> bool:
    if_exists = operator.endswith("IfExists")
    base = operator.removesuffix("IfExists")
    have = _lookup(context, key)
    wanted = [str(w) for w in _as_list(wanted)]
    if base == "Null":
        if if_exists:
            raise ValueError("NullIfExists is not an IAM operator")
        return all((have is None) == (w.lower() == "true") for w in wanted)
    if base in _POSITIVE:
        if have is None:
            return if_exists
        return any(_POSITIVE[base](w, have) for w in wanted)
    if base in _NEGATED:
        if have is None:
            return True
        return not any(_POSITIVE[_NEGATED[base]](w, have) for w in wanted)
    raise ValueError(f"condition operator not supported by iam_check: {operator}")


def _conditions_hold(conditions: Mapping[str, Mapping[str, Any]], context: Mapping[str, Any]) -> bool:
    return all(
        _condition_holds(operator, key, wanted, context)
        for operator, keys in conditions.items()
        for key, wanted in keys.items()
    )


# ---------------------------------------------------------------- evaluation


def _statements(policy_documents: Any) -> Iterable[Mapping[str, Any]]:
    for document in _as_list(policy_documents):
        yield from _as_list(document["Statement"])


def _applies(statement: Mapping[str, Any], action: str, resource: str,
             context: Mapping[str, Any], principal: Mapping[str, str] | None) -> bool:
    if "Action" in statement:
        if not _action_matches(statement["Action"], action):
            return False
    elif "NotAction" in statement:
        if _action_matches(statement["NotAction"], action):
            return False
    else:
        raise ValueError(f"statement has neither Action nor NotAction: {statement}")

    if "Resource" in statement:
        if not _resource_matches(statement["Resource"], resource):
            return False
    elif "NotResource" in statement:
        if _resource_matches(statement["NotResource"], resource):
            return False
    elif "Principal" not in statement:
        raise ValueError(f"identity policy statement has no Resource: {statement}")

    if "Principal" in statement and not _principal_matches(statement["Principal"], principal):
        return False
    if "NotPrincipal" in statement:
        raise ValueError("NotPrincipal is not supported by iam_check")

    return _conditions_hold(statement.get("Condition", {}), context)


def is_allowed(policy_documents: Any, action: str, resource: str,
               context: Mapping[str, Any] | None = None, *,
               principal: Mapping[str, str] | None = None) -> bool:
    """Whether the policies allow ``action`` on ``resource`` with this request context.

    ``policy_documents`` is one policy document (dict) or a list of them. Statements with a
    ``Principal`` (trust and resource policies) apply only when ``principal`` is given, e.g.
    ``{"Service": "bedrock.amazonaws.com"}``; a statement without ``Resource`` then matches any
    resource. Explicit Deny wins over Allow; no matching statement means deny.
    """
    context = context or {}
    allowed = False
    for statement in _statements(policy_documents):
        effect = statement.get("Effect")
        if effect not in ("Allow", "Deny"):
            raise ValueError(f"statement Effect must be Allow or Deny: {statement}")
        if _applies(statement, action, resource, context, principal):
            if effect == "Deny":
                return False
            allowed = True
    return allowed


def is_allowed_all(policy_documents: Any, permissions: Iterable[Permission]) -> bool:
    """Whether every (action, resource, context) of ``required_permission`` is allowed."""
    return all(is_allowed(policy_documents, a, r, c) for a, r, c in permissions)


# ---------------------------------------------------------------- botocore call -> IAM

# Geographic prefixes of system-defined cross-Region inference profiles ("us.amazon.nova-...").
_INFERENCE_PROFILE = re.compile(r"^(us|us-gov|eu|apac|jp|au|ca|global)\.")


def _model_arn(model_id: str, *, partition: str, account: str, region: str) -> str:
    if model_id.startswith("arn:"):
        return model_id
    if _INFERENCE_PROFILE.match(model_id):
        return f"arn:{partition}:bedrock:{region}:{account}:inference-profile/{model_id}"
    return f"arn:{partition}:bedrock:{region}::foundation-model/{model_id}"


def _job_arn(identifier: str, *, partition: str, account: str, region: str) -> str:
    if identifier.startswith("arn:"):
        return identifier
    return f"arn:{partition}:bedrock:{region}:{account}:model-invocation-job/{identifier}"


# The id of a job that does not exist yet: the caller's policy has to allow model-invocation-job/*.
_NEW_JOB_ID = "newjob000000"


def _s3(operation: str, params: Mapping[str, Any], *, partition: str, account: str) -> list[Permission]:
    bucket = params["Bucket"]
    # The bucket's owner: the one ExpectedBucketOwner names (the call fails otherwise), else the caller.
    owner = {"aws:ResourceAccount": params.get("ExpectedBucketOwner", account)}

    def obj(action: str, key: str) -> Permission:
        return (action, f"arn:{partition}:s3:::{bucket}/{key}", dict(owner))

    if operation in ("ListObjectsV2", "ListObjects"):
        context = dict(owner)
        for param, key in (("Prefix", "s3:prefix"), ("Delimiter", "s3:delimiter"), ("MaxKeys", "s3:max-keys")):
            if param in params:
                context[key] = str(params[param])
        return [("s3:ListBucket", f"arn:{partition}:s3:::{bucket}", context)]
    if operation == "HeadBucket":
        # Authorised as s3:ListBucket with no s3:prefix in the context.
        return [("s3:ListBucket", f"arn:{partition}:s3:::{bucket}", dict(owner))]
    if operation in ("GetObject", "HeadObject"):
        action = "s3:GetObjectVersion" if params.get("VersionId") else "s3:GetObject"
        return [obj(action, params["Key"])]
    if operation in ("PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload"):
        # upload_file: one PutObject, or a multipart upload that is authorised as s3:PutObject ...
        return [obj("s3:PutObject", params["Key"])]
    if operation == "AbortMultipartUpload":
        # ... and aborted, on failure, with its own permission.
        return [obj("s3:AbortMultipartUpload", params["Key"])]
    if operation == "DeleteObject":
        action = "s3:DeleteObjectVersion" if params.get("VersionId") else "s3:DeleteObject"
        return [obj(action, params["Key"])]
    if operation == "DeleteObjects":
        # One authorisation per key, each reported in the response's Errors if denied.
        return [
            obj("s3:DeleteObjectVersion" if o.get("VersionId") else "s3:DeleteObject", o["Key"])
            for o in params["Delete"]["Objects"]
        ]
    raise KeyError(f"s3:{operation}")


def _s3vectors(operation: str, params: Mapping[str, Any], *, partition: str, account: str,
               region: str) -> list[Permission]:
    def bucket_arn() -> str:
        if "vectorBucketArn" in params:
            return params["vectorBucketArn"]
        return f"arn:{partition}:s3vectors:{region}:{account}:bucket/{params['vectorBucketName']}"

    def index_arn() -> str:
        if "indexArn" in params:
            return params["indexArn"]
        return f"{bucket_arn()}/index/{params['indexName']}"

    on_bucket = {"CreateVectorBucket", "GetVectorBucket", "ListIndexes"}
    if operation == "ListVectorBuckets":  # no resource type: the account's buckets
        return [("s3vectors:ListVectorBuckets", "*", {})]
    # CreateIndex is authorised on the Index resource (Service Authorization Reference).
    on_index = {"CreateIndex", "GetIndex", "PutVectors", "DeleteVectors", "GetVectors", "ListVectors", "QueryVectors"}
    if operation in on_bucket:
        return [(f"s3vectors:{operation}", bucket_arn(), {})]
    if operation in on_index:
        needs = [(f"s3vectors:{operation}", index_arn(), {})]
        if operation == "QueryVectors" and (params.get("filter") is not None or params.get("returnMetadata")):
            # Filtering or returning metadata reads the vectors: GetVectors is needed too.
            needs.append(("s3vectors:GetVectors", index_arn(), {}))
        if operation == "ListVectors" and (params.get("returnMetadata") or params.get("returnData")):
            needs.append(("s3vectors:GetVectors", index_arn(), {}))  # the same for a listing with metadata
        return needs
    raise KeyError(f"s3vectors:{operation}")


def _bedrock(operation: str, params: Mapping[str, Any], *, partition: str, account: str,
             region: str) -> list[Permission]:
    where = {"partition": partition, "account": account, "region": region}
    if operation == "CreateModelInvocationJob":
        return [
            ("bedrock:CreateModelInvocationJob", _job_arn(_NEW_JOB_ID, **where), {}),
            ("bedrock:CreateModelInvocationJob", _model_arn(params["modelId"], **where), {}),
            ("iam:PassRole", params["roleArn"], {"iam:PassedToService": "bedrock.amazonaws.com"}),
        ]
    if operation in ("GetModelInvocationJob", "StopModelInvocationJob"):
        return [(f"bedrock:{operation}", _job_arn(params["jobIdentifier"], **where), {})]
    if operation == "ListModelInvocationJobs":
        return [("bedrock:ListModelInvocationJobs", "*", {})]
    if operation == "GetFoundationModel":
        return [("bedrock:GetFoundationModel", _model_arn(params["modelIdentifier"], **where), {})]
    raise KeyError(f"bedrock:{operation}")


def _bedrock_runtime(operation: str, params: Mapping[str, Any], *, partition: str, account: str,
                     region: str) -> list[Permission]:
    if operation == "InvokeModel":
        arn = _model_arn(params["modelId"], partition=partition, account=account, region=region)
        return [("bedrock:InvokeModel", arn, {})]
    raise KeyError(f"bedrock-runtime:{operation}")


def _sts(operation: str, params: Mapping[str, Any]) -> list[Permission]:
    if operation == "GetCallerIdentity":
        # AWS: "No permissions are required to perform this operation", even under an explicit
        # deny. The caller policy still names sts:GetCallerIdentity to document that it is used.
        return []
    raise KeyError(f"sts:{operation}")


_IAM_ROLE_OPERATIONS = {"GetRole", "CreateRole", "UpdateAssumeRolePolicy", "PutRolePolicy",
                        "GetRolePolicy", "DeleteRolePolicy", "DeleteRole"}


def _iam(operation: str, params: Mapping[str, Any], *, partition: str, account: str) -> list[Permission]:
    if operation in _IAM_ROLE_OPERATIONS:
        return [(f"iam:{operation}", f"arn:{partition}:iam::{account}:role/{params['RoleName']}", {})]
    if operation == "SimulatePrincipalPolicy":
        return [("iam:SimulatePrincipalPolicy", params["PolicySourceArn"], {})]
    raise KeyError(f"iam:{operation}")


def required_permission(service: str, operation: str, params: Mapping[str, Any] | None = None, *,
                        account: str, region: str, partition: str = "aws") -> list[Permission]:
    """The (IAM action, resource ARN, request context) triples a botocore call is authorised on.

    ``service`` is the boto3 client name and ``operation`` the botocore operation name
    ("s3", "ListObjectsV2"). An operation this module does not know raises KeyError, so nothing
    is allowed by omission.
    """
    params = params or {}
    if service == "s3":
        return _s3(operation, params, partition=partition, account=account)
    if service == "s3vectors":
        return _s3vectors(operation, params, partition=partition, account=account, region=region)
    if service == "bedrock":
        return _bedrock(operation, params, partition=partition, account=account, region=region)
    if service == "bedrock-runtime":
        return _bedrock_runtime(operation, params, partition=partition, account=account, region=region)
    if service == "sts":
        return _sts(operation, params)
    if service == "iam":
        return _iam(operation, params, partition=partition, account=account)
    if service == "service-quotas" and operation in ("ListServiceQuotas", "ListAWSDefaultServiceQuotas"):
        return [(f"servicequotas:{operation}", "*", {})]
    raise KeyError(service)
