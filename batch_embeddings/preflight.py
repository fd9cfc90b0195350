"""What 01 checks before anything is uploaded or paid for: that the vector index the results go to exists (or that
the user means to start a new one), and that the service role exists.

A typo in VECTOR_BUCKET or VECTOR_INDEX would otherwise show only in step 3, after the jobs are paid for, as a new
empty index; a role that does not exist would fail the submit after the manifest was uploaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import common

log = logging.getLogger(__name__)
SHOWN_NAMES = 5  # names of existing indexes (or vector buckets) printed with a missing one
DENIED = ("AccessDenied", "AccessDeniedException")


@dataclass(frozen=True)
class IndexLookup:
    """The vector index 03 will load into, as the caller sees it."""

    index: dict | None  # GetIndex's `index` when it exists
    problem: str = ""  # what is missing or cannot be read, with the names nearby
    denied: bool = False  # the caller may not read it: starting a new index would be refused as well


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest single-character insertions, deletions and substitutions."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def nearby(name: str, names: list[str] | None, what: str, where: str, permission: str) -> str:
    """A parenthesis naming the existing `names` closest to `name` first, with a guess when one is close."""
    if names is None:
        return f" ({where} cannot be listed: {permission} is not allowed)"
    if not names:
        return f" ({where} holds no {what})"
    ranked = sorted(names, key=lambda n: (edit_distance(name, n), n))
    shown = ", ".join(ranked[:SHOWN_NAMES]) + (f" and {len(ranked) - SHOWN_NAMES} more" if len(ranked) > SHOWN_NAMES
                                               else "")
    return f" ({where} holds {what}: {shown}; did you mean {ranked[0]}?)"


def _names(pages, field: str, key: str) -> list[str] | None:
    """Every name in a listing's pages; None when the caller may not list."""
    from botocore.exceptions import ClientError

    try:
        return [item[key] for page in pages for item in page.get(field, [])]
    except ClientError as exc:
        if common.error_code(exc) in DENIED:
            return None
        raise


def _list(s3v, operation: str, **params):
    """The pages of an S3 Vectors listing, followed by hand (nextToken)."""
    token = None
    while True:
        page = getattr(s3v, operation)(**params, **({"nextToken": token} if token else {}))
        yield page
        token = page.get("nextToken")
        if not token:
            return


def find_index(s3v, bucket: str, index: str, region: str) -> IndexLookup:
    """The index when it exists; else what is missing (the bucket or the index) and the existing names closest to
    the one asked for (ListVectorBuckets or ListIndexes; a caller who may not list is told so)."""
    from botocore.exceptions import ClientError

    try:
        return IndexLookup(s3v.get_index(vectorBucketName=bucket, indexName=index)["index"])
    except ClientError as exc:
        code = common.error_code(exc)
        if code != "NotFoundException" and code not in DENIED:
            raise
        index_denied = code in DENIED
    try:
        s3v.get_vector_bucket(vectorBucketName=bucket)
    except ClientError as exc:
        code = common.error_code(exc)
        if code == "NotFoundException":
            buckets = _names(_list(s3v, "list_vector_buckets"), "vectorBuckets", "vectorBucketName")
            return IndexLookup(None, f"vector bucket {bucket} does not exist" + nearby(
                bucket, buckets, "vector buckets", f"your account in {region}", "s3vectors:ListVectorBuckets"))
        if code not in DENIED:
            raise
        return IndexLookup(None, f"vector bucket {bucket} and its index {index} cannot be read "
                                 f"({code}: s3vectors:GetVectorBucket, s3vectors:GetIndex)", denied=True)
    indexes = _names(_list(s3v, "list_indexes", vectorBucketName=bucket), "indexes", "indexName")
    hint = nearby(index, indexes, "indexes", f"vector bucket {bucket}", "s3vectors:ListIndexes")
    if index_denied:
        return IndexLookup(None, f"index {index} in vector bucket {bucket} cannot be read (s3vectors:GetIndex is "
                                 f"not allowed on it){hint}", denied=True)
    return IndexLookup(None, f"index {index} does not exist in vector bucket {bucket}{hint}")


def check_role(iam, role_arn: str, account: str) -> None:
    """Refuse a ROLE_ARN that names no role (iam:GetRole). A role of another account, or a caller who may not call
    GetRole, is not checked here: Bedrock's answer to the submit tells then."""
    from botocore.exceptions import ClientError

    match = common.ROLE_ARN_RE.fullmatch(role_arn)
    if match is None or match.group(2) != account:
        log.debug("ROLE_ARN %s is not of account %s: not checked before the submit", role_arn, account)
        return
    name = role_arn.rsplit("/", 1)[1]
    try:
        iam.get_role(RoleName=name)
    except ClientError as exc:
        code = common.error_code(exc)
        if code == "NoSuchEntity":
            raise common.StepError(
                f"ROLE_ARN {role_arn}: account {account} has no role {name} — fix ROLE_ARN (bash "
                "iam/setup_service_role.sh creates the role and prints its ARN); nothing was uploaded",
                common.EXIT_USAGE) from None
        if code not in DENIED:
            raise
        log.debug("iam:GetRole on %s is not allowed: the role is checked by Bedrock at the submit", name)

