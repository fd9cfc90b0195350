"""Step 0: check the setup before the first paid job, changing nothing and paying for nothing.

    uv run 00_check_setup.py [--invoke] [--strict]

Checks the credentials and region, the model, the model's Bedrock batch quotas against the quota settings, the
source and result buckets, the vector bucket and index, the service role (its trust policy and permissions), the
caller's own permissions for every step, and this tool's fast readers of S3 and S3 Vectors pages against botocore
on the real service. One line a check: ✓ it holds, ✗ it does not (the line below says what to do), ? it cannot be
told from here (the caller may not simulate IAM policies, say). Nothing is created, written or submitted; only
--invoke embeds one short text with the model (one InvokeModel call, a fraction of a cent).
"""

from __future__ import annotations

import argparse
import sys

import common
from batch_embeddings import keyset, listing, setup_check
from common import StepError

SETTINGS = tuple(name for name in common.SETTINGS if name not in common.COST_SETTINGS)
REQUIRED = ("SOURCE_BUCKET", "RESULT_BUCKET", "ROLE_ARN", "VECTOR_BUCKET", "VECTOR_INDEX")
ATTEMPTS = 3  # a check answers soon: an AWS call is tried this often, not AWS_MAX_ATTEMPTS times


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2] + "\n\n" + common.EXIT_CODES_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--invoke", action="store_true",
                        help="also embed one short text with the model (one InvokeModel: a fraction of a cent)")
    parser.add_argument("--strict", action="store_true", help="a check that cannot tell (?) counts as failed")
    common.add_settings(parser, SETTINGS)
    return parser.parse_args(argv)


def show(result) -> list[setup_check.Row]:
    """Print a check's row(s) as they come, the fix under a ✗ (or under a ? that has one)."""
    rows = result if isinstance(result, list) else [result]
    for row in rows:
        print(f"{row.mark} {row.name}: {row.detail}", flush=True)
        if row.fix and row.status != setup_check.OK:
            print(f"    → {row.fix}", flush=True)
    return rows


def attempt(name: str, check):
    """Run one check; an AWS error it does not expect makes its row a ? instead of ending the other checks."""
    from botocore.exceptions import BotoCoreError, ClientError
    from botocore.parsers import ResponseParserError

    try:
        return check()
    except (ClientError, BotoCoreError, ResponseParserError) as exc:  # the last: an answer that is not AWS's
        first_line = (common.describe_aws_error(exc).splitlines() or [""])[0].rstrip(":")
        return setup_check.unknown(name, f"could not check: {first_line}")


def checks(config: common.Config, invoke: bool) -> list[setup_check.Row]:
    client = lambda service: common.make_client(service, config, attempts=ATTEMPTS)  # noqa: E731
    identity_row, identity = setup_check.check_identity(client("sts"), config)
    rows = show(identity_row)
    if identity is None:
        print("  (the other checks need credentials: not run)")
        return rows
    owner = common.bucket_owner(config, identity.account)

    model = attempt("model", lambda: setup_check.check_model(client("bedrock"), config))
    model_row, model_name = model if isinstance(model, tuple) else (model, None)
    rows += show(model_row)
    rows += show(attempt("quotas", lambda: setup_check.check_quotas(client("service-quotas"), config, model_name)))

    s3 = client("s3")
    source = attempt("source bucket", lambda: setup_check.check_bucket(
        s3, "source bucket", "SOURCE_BUCKET", config.source_bucket, config.source_prefix, owner))
    rows += show(source)
    rows += show(attempt("result bucket", lambda: setup_check.check_bucket(
        s3, "result bucket", "RESULT_BUCKET", config.result_bucket, config.result_prefix, owner)))
    s3v = client("s3vectors")
    store = attempt("vector index", lambda: setup_check.check_vector_store(s3v, config))
    rows += show(store)

    iam = client("iam")
    role = attempt("service role", lambda: setup_check.check_role(iam, config, identity))
    role_row, role_found = role if isinstance(role, tuple) else (role, False)
    rows += show(role_row)
    if role_found:
        rows += show(attempt("service role permissions",
                             lambda: setup_check.check_role_permissions(iam, config, identity, owner)))
    else:
        rows += show(setup_check.unknown("service role permissions", "skipped: the role was not found"))
    rows += show(attempt("caller permissions",
                         lambda: setup_check.check_caller_permissions(iam, config, identity, owner)))

    if source.status == setup_check.OK:
        rows += show(attempt("S3 listing reader", lambda: setup_check.check_listing_reader(
            s3, listing.fast_listing_client(client("s3")), config.source_bucket, config.source_prefix, owner)))
    else:
        rows += show(setup_check.unknown("S3 listing reader", "skipped: the source bucket cannot be listed"))
    store_rows = store if isinstance(store, list) else [store]
    if all(row.status == setup_check.OK for row in store_rows):
        rows += show(attempt("S3 Vectors page reader", lambda: setup_check.check_vector_reader(
            s3v, keyset.fast_keys_client(client("s3vectors")), config)))
    else:
        rows += show(setup_check.unknown("S3 Vectors page reader", "skipped: the vector index cannot be read"))
    if invoke:
        rows += show(attempt("InvokeModel", lambda: setup_check.check_invoke(client("bedrock-runtime"), config)))
    return rows


def run(argv) -> int:
    args = parse_args(argv)
    config = common.load_config(args, REQUIRED)
    common.banner("Bedrock Batch Inference - Check Setup")
    rows = checks(config, args.invoke)
    count = {status: sum(row.status == status for row in rows) for status in setup_check.MARKS}
    print(f"\n{count[setup_check.OK]} ✓, {count[setup_check.FAILED]} ✗, {count[setup_check.UNKNOWN]} ?"
          + ("" if args.invoke else " (nothing was written; --invoke also embeds one text)"))
    if count[setup_check.FAILED]:
        raise StepError(f"{count[setup_check.FAILED]} check(s) failed: fix the ✗ line(s) above and run "
                        "00_check_setup.py again", common.EXIT_CHECK_FAILED)
    if args.strict and count[setup_check.UNKNOWN]:
        raise StepError(f"{count[setup_check.UNKNOWN]} check(s) could not tell (--strict)", common.EXIT_CHECK_FAILED)
    common.ok("The setup is ready for 01_create_job.py" if not count[setup_check.UNKNOWN] else
              "Nothing is known to be wrong; the ? lines could not be checked from here")
    return common.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return common.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
