"""What every step shares: configuration, AWS clients, errors and exit codes, console output and the S3 helpers.
The job-info file is batch_embeddings/jobinfo.py's, the names this tool gives things batch_embeddings/naming.py's,
and the model's request bodies batch_embeddings/nova.py's.

Every function here takes what it works on as arguments (a client, a config, a path); nothing runs at import.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

APP_NAME = "bedrock-batch-image-embeddings"
APP_VERSION = "0.1.0"
RULE = "=" * 70

# Exit codes of all the steps: one table, the same in README.md and every --help (EXIT_CODES_HELP).
EXIT_OK = 0  # done, or nothing to do
EXIT_ERROR = 1  # an AWS call failed
EXIT_USAGE = 2  # a setting, flag or local file (the job-info file, an account file) is wrong
EXIT_RUNNING = 3  # 02: the run is still going (or --timeout was reached)
EXIT_INCOMPLETE = 4  # some images failed or are missing (03, 01 --on-demand); 02: a job PartiallyCompleted
EXIT_JOB_FAILED = 5  # 02: a job Failed, was Stopped or Expired
EXIT_REFUSED = 6  # the run is not ready for this step (unfinished run, too few images, results not loaded), or no index
EXIT_LOCKED = 7  # another step holds the lock on the job-info file
EXIT_OVER_BUDGET = 8  # 01: the run's cost estimate is over MAX_RUN_COST_USD
EXIT_CHECK_FAILED = 9  # 00: a check of the setup failed
EXIT_MASS_DELETE = 10  # 01: it would delete more vectors than MAX_DELETE_FRACTION / MAX_DELETE_COUNT allow
EXIT_INTERRUPTED = 130  # Ctrl-C: run the step again to continue
EXIT_CODES_HELP = """exit status (the same for every step):
  0    done, or nothing to do
  1    an AWS call failed
  2    a setting, flag or local file (the job-info file, an account file) is wrong
  3    02: the run is still going (or --timeout was reached)
  4    some images failed or are missing (03, 01 --on-demand); 02: a job PartiallyCompleted
  5    02: a job Failed, was Stopped or Expired
  6    refused: the run is not ready for this step (a run not finished, too few images, results not loaded), or the vector index does not exist and --new-index was not given
  7    another step holds the lock on the job-info file (--wait-lock waits for it), or another run works on the same source prefix
  8    01: the run's cost estimate is over MAX_RUN_COST_USD
  9    00: a check of the setup failed (its ✗ line says what to fix)
  10   01: it would delete more vectors than MAX_DELETE_FRACTION or MAX_DELETE_COUNT allow (--allow-mass-delete, once)
  130  interrupted (Ctrl-C): run the step again to continue"""


DIMENSIONS = (256, 384, 1024, 3072)
EMBEDDING_PURPOSES = (
    "GENERIC_INDEX",
    "GENERIC_RETRIEVAL",
    "TEXT_RETRIEVAL",
    "IMAGE_RETRIEVAL",
    "VIDEO_RETRIEVAL",
    "DOCUMENT_RETRIEVAL",
    "AUDIO_RETRIEVAL",
    "CLASSIFICATION",
    "CLUSTERING",
)

# Bedrock's patterns, from botocore's service model (see ../shared/aws-facts.md).
MAX_S3_URI = 1024  # characters of a job's input or output s3Uri
S3_URI_RE = re.compile(r"s3://[a-z0-9][-.a-z0-9]{1,61}[a-z0-9](?:/[-!_*'().a-z0-9A-Z]+)*/?")
ROLE_ARN_RE = re.compile(r"arn:aws(-[^:]+)?:iam::([0-9]{12})?:role/.+")
BUCKET_RE = re.compile(r"[a-z0-9][-.a-z0-9]{1,61}[a-z0-9]")
# S3 Vectors names (S3 user guide, s3-vectors-buckets-naming and s3-vectors-indexes): a vector bucket takes no dots,
# unlike an S3 bucket; an index may.
VECTOR_BUCKET_RE = re.compile(r"[a-z0-9][-a-z0-9]{1,61}[a-z0-9]")
VECTOR_INDEX_RE = re.compile(r"[a-z0-9][-.a-z0-9]{1,61}[a-z0-9]")
ACCOUNT_RE = re.compile(r"[0-9]{12}")


class StepError(Exception):
    """An expected failure: printed as one line by `run_main`, never as a traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR):
        super().__init__(message)
        self.exit_code = exit_code


class ConfigError(StepError):
    def __init__(self, message: str):
        super().__init__(message, EXIT_USAGE)


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    env: str
    flag: str
    help: str
    default: str | None = None


SETTINGS = {
    s.env: s
    for s in (
        Setting("AWS_REGION", "--region", "AWS region", "us-east-1"),
        Setting("SOURCE_BUCKET", "--source-bucket", "bucket that holds the images"),
        Setting("SOURCE_PREFIX", "--source-prefix", "folder of the images, like 2024/ (empty: whole bucket)", ""),
        Setting("RESULT_BUCKET", "--result-bucket", "bucket Bedrock writes results to"),
        Setting("RESULT_PREFIX", "--result-prefix", "folder Bedrock writes results to", "output/"),
        Setting("VECTOR_BUCKET", "--vector-bucket", "S3 Vectors bucket"),
        Setting("VECTOR_INDEX", "--vector-index", "S3 Vectors index"),
        Setting("ROLE_ARN", "--role-arn", "Bedrock service role (bash iam/setup_service_role.sh)"),
        Setting("MODEL_ID", "--model-id", "embedding model", "amazon.nova-2-multimodal-embeddings-v1:0"),
        Setting("EMBEDDING_DIMENSION", "--dimension", "256, 384, 1024 or 3072", "3072"),
        Setting("EMBEDDING_PURPOSE", "--purpose", "embeddingPurpose of the stored vectors", "GENERIC_INDEX"),
        Setting("JOB_INFO_FILE", "--job-info-file", "state file between the steps", "batch_job_info.json"),
        Setting("EXPECTED_BUCKET_OWNER", "--bucket-owner", "account that must own the buckets (default: yours)"),
        Setting("OUTPUT_KMS_KEY_ID", "--output-kms-key-id", "KMS key that encrypts the job's output"),
        Setting("INVENTORY_BUCKET_OWNER", "--inventory-bucket-owner", "account that owns the bucket of the S3 "
                "Inventory report --inventory reads (default: EXPECTED_BUCKET_OWNER, else yours)"),
        Setting("MIN_RECORDS_PER_JOB", "--min-records-per-job", "Bedrock quota: fewest records in a job", "100"),
        Setting("MAX_RECORDS_PER_FILE", "--max-records-per-file", "Bedrock quota: records per input file", "50000"),
        Setting("MAX_RECORDS_PER_JOB", "--max-records-per-job", "Bedrock quota: records per job", "50000"),
        Setting("MAX_INPUT_FILE_BYTES", "--max-input-file-bytes", "Bedrock quota: bytes per input file",
                "1000000000"),
        Setting("MAX_JOB_BYTES", "--max-job-bytes", "Bedrock quota: bytes of input per job", "5000000000"),
        Setting("MAX_CONCURRENT_JOBS", "--max-concurrent-jobs", "Bedrock quota: jobs submitted or in progress",
                "10"),
        Setting("ON_DEMAND_MAX_IMAGES", "--on-demand-max-images", "at most this many images of a run are embedded "
                "on demand (InvokeModel) instead of in a batch job of their own; 0: never", "100"),
        # Prices for 01's cost estimate (cost.py): us-east-1's, unverified — check the pricing pages for your region.
        Setting("PRICE_PER_IMAGE_USD", "--price-per-image", "batch embedding price per image, USD", "0.00003"),
        Setting("ON_DEMAND_PRICE_PER_IMAGE_USD", "--on-demand-price-per-image",
                "on-demand (InvokeModel) embedding price per image, USD", "0.00006"),
        Setting("S3VECTORS_PUT_PRICE_PER_GB_USD", "--put-price-per-gb", "S3 Vectors PUT price per logical GB, USD",
                "0.20"),
        Setting("S3VECTORS_STORAGE_PRICE_PER_GB_MONTH_USD", "--storage-price-per-gb-month",
                "S3 Vectors storage price per logical GB-month, USD", "0.06"),
        Setting("MAX_RUN_COST_USD", "--max-cost", "refuse a run whose cost estimate is over this many USD"),
        # The index mirrors the bucket (mirror.py): vectors of images no longer under SOURCE_PREFIX are deleted.
        Setting("MIRROR_DELETES", "--mirror-deletes", "true: delete the vectors of images gone from SOURCE_PREFIX; "
                "false: the index only grows", "true"),
        Setting("MAX_DELETE_FRACTION", "--max-delete-fraction", "refuse a run that would delete more than this "
                "share of the prefix's vectors (0-1)", "0.1"),
        Setting("MAX_DELETE_COUNT", "--max-delete-count", "refuse a run that would delete more vectors than this",
                "10000"),
    )
}
# What a run needs from start to end: 03 loads into the vector index, so 01 (and daily_run.py) refuse to start a
# run (to pay for its jobs) without it.
LOAD_REQUIRED = ("VECTOR_BUCKET", "VECTOR_INDEX")
RUN_REQUIRED = ("SOURCE_BUCKET", "RESULT_BUCKET", "ROLE_ARN", *LOAD_REQUIRED)
QUOTA_SETTINGS = ("MIN_RECORDS_PER_JOB", "MAX_RECORDS_PER_FILE", "MAX_RECORDS_PER_JOB", "MAX_INPUT_FILE_BYTES",
                  "MAX_JOB_BYTES", "MAX_CONCURRENT_JOBS")
PRICE_SETTINGS = ("PRICE_PER_IMAGE_USD", "ON_DEMAND_PRICE_PER_IMAGE_USD", "S3VECTORS_PUT_PRICE_PER_GB_USD",
                  "S3VECTORS_STORAGE_PRICE_PER_GB_MONTH_USD")
COST_SETTINGS = (*PRICE_SETTINGS, "MAX_RUN_COST_USD")
MIRROR_SETTINGS = ("MIRROR_DELETES", "MAX_DELETE_FRACTION", "MAX_DELETE_COUNT")


@dataclass(frozen=True)
class Quotas:
    """Bedrock's batch quotas for the model (defaults from aws-facts.md; the account's may differ)."""

    min_records_per_job: int = 100
    max_records_per_file: int = 50_000
    max_records_per_job: int = 50_000
    max_input_file_bytes: int = 1_000_000_000
    max_job_bytes: int = 5_000_000_000
    max_concurrent_jobs: int = 10


@dataclass(frozen=True)
class Prices:
    """The prices of 01's cost estimate (cost.py), in USD."""

    per_image: float = 0.00003
    on_demand_per_image: float = 0.00006
    s3vectors_put_per_gb: float = 0.20
    s3vectors_storage_per_gb_month: float = 0.06


@dataclass(frozen=True)
class Config:
    region: str = "us-east-1"
    source_bucket: str | None = None
    source_prefix: str = ""
    result_bucket: str | None = None
    result_prefix: str = "output/"
    vector_bucket: str | None = None
    vector_index: str | None = None
    role_arn: str | None = None
    model_id: str = "amazon.nova-2-multimodal-embeddings-v1:0"
    embedding_dimension: int = 3072
    embedding_purpose: str = "GENERIC_INDEX"
    job_info_file: Path = Path("batch_job_info.json")
    expected_bucket_owner: str | None = None
    output_kms_key_id: str | None = None
    inventory_bucket_owner: str | None = None
    quotas: Quotas = field(default_factory=Quotas)
    on_demand_max_images: int = 100
    prices: Prices = field(default_factory=Prices)
    max_run_cost_usd: float | None = None
    mirror_deletes: bool = True
    max_delete_fraction: float = 0.1
    max_delete_count: int = 10_000


def _attr(env: str) -> str:
    return {"AWS_REGION": "region", "EXPECTED_BUCKET_OWNER": "expected_bucket_owner"}.get(env, env.lower())


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The steps' --help, fitted to the terminal's width as argparse fits the options: the description and epilog
    (a script's docstring and the exit status table) are wrapped too; an indented line (a command, a row of the
    table) keeps its indent and wraps under its text."""

    def _fill_text(self, text, width, indent):
        import textwrap

        out: list[str] = []
        item: list[str] = []  # the lines of the paragraph or list item being gathered

        def flush() -> None:
            if item:
                hang = " " * len(re.match(r"(\d+\.|-)?\s*", item[0]).group(0))
                out.extend(textwrap.wrap(" ".join(line.strip() for line in item), width, initial_indent=indent,
                                         subsequent_indent=indent + hang, break_on_hyphens=False))
                item.clear()

        for line in text.splitlines():
            if not line.strip():
                flush()
                out.append("")
            elif line[0].isspace():
                flush()
                lead = re.match(r"\s*\S+(\s+\S+)*?\s{2,}(?=\S)", line)  # a row: its text starts after 2 spaces
                hang = " " * (len(lead.group(0)) if lead and len(lead.group(0)) < width * 2 // 3 else
                              len(line) - len(line.lstrip()) + 4)
                out.extend(textwrap.wrap(line.rstrip(), width, initial_indent=indent, subsequent_indent=indent + hang,
                                         break_on_hyphens=False, drop_whitespace=True) or [""])
            else:
                if re.match(r"(\d+\.|-)\s", line):
                    flush()
                item.append(line)
        flush()
        return "\n".join(out)


def add_settings(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    """Add a command-line flag for each named setting; a flag wins over the environment and `.env`. The parser's
    --help is fitted to the terminal (HelpFormatter): every step calls this, so every step's help reads the same."""
    if parser.formatter_class in (argparse.HelpFormatter, argparse.RawDescriptionHelpFormatter):
        parser.formatter_class = HelpFormatter
    group = parser.add_argument_group("settings (flag > environment > .env)")
    for name in names:
        s = SETTINGS[name]
        default = f" (default: {s.default})" if s.default else ""
        group.add_argument(s.flag, dest=_attr(name), metavar=name, help=f"{s.help}{default}")


def normalize_prefix(prefix: str) -> str:
    prefix = prefix.strip().lstrip("/")
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def load_config(args: argparse.Namespace, required: Iterable[str] = (), env: dict | None = None) -> Config:
    """Read the settings: flags, then the environment, then `.env` in the current folder.

    Every missing or invalid setting is reported at once, in one ConfigError.
    """
    if env is None:
        from dotenv import load_dotenv

        load_dotenv(Path.cwd() / ".env", override=False)  # the environment wins over .env
        env = os.environ
    raw: dict[str, str | None] = {}
    for name, s in SETTINGS.items():
        value = getattr(args, _attr(name), None)
        if value is None:
            value = env.get(name) or None
        if name == "AWS_REGION" and value is None:
            value = env.get("AWS_DEFAULT_REGION") or None
        raw[name] = value if value is not None else s.default
    problems = [f"{name} is not set" for name in required if not raw.get(name)]
    problems += _invalid(raw)
    if problems:
        hint = "set them in .env (see .env.example), the environment or by flag"
        raise ConfigError("; ".join(problems) + f" — {hint}")
    return Config(
        region=raw["AWS_REGION"],
        source_bucket=raw["SOURCE_BUCKET"],
        source_prefix=normalize_prefix(raw["SOURCE_PREFIX"] or ""),
        result_bucket=raw["RESULT_BUCKET"],
        result_prefix=normalize_prefix(raw["RESULT_PREFIX"] or ""),
        vector_bucket=raw["VECTOR_BUCKET"],
        vector_index=raw["VECTOR_INDEX"],
        role_arn=raw["ROLE_ARN"],
        model_id=raw["MODEL_ID"],
        embedding_dimension=int(raw["EMBEDDING_DIMENSION"]),
        embedding_purpose=raw["EMBEDDING_PURPOSE"],
        job_info_file=Path(raw["JOB_INFO_FILE"]),
        expected_bucket_owner=raw["EXPECTED_BUCKET_OWNER"],
        output_kms_key_id=raw["OUTPUT_KMS_KEY_ID"],
        inventory_bucket_owner=raw["INVENTORY_BUCKET_OWNER"],
        quotas=Quotas(*(int(raw[name]) for name in QUOTA_SETTINGS)),
        on_demand_max_images=int(raw["ON_DEMAND_MAX_IMAGES"]),
        prices=Prices(*(float(raw[name]) for name in PRICE_SETTINGS)),
        max_run_cost_usd=float(raw["MAX_RUN_COST_USD"]) if raw["MAX_RUN_COST_USD"] else None,
        mirror_deletes=raw["MIRROR_DELETES"].strip().lower() == "true",
        max_delete_fraction=float(raw["MAX_DELETE_FRACTION"]),
        max_delete_count=int(raw["MAX_DELETE_COUNT"]),
    )


def _invalid(raw: dict[str, str | None]) -> list[str]:
    problems = []
    for name in ("SOURCE_BUCKET", "RESULT_BUCKET"):
        if raw[name] and not BUCKET_RE.fullmatch(raw[name]):
            problems.append(f"{name}={raw[name]!r} is not a valid S3 bucket name")
    if raw["VECTOR_BUCKET"] and not VECTOR_BUCKET_RE.fullmatch(raw["VECTOR_BUCKET"]):
        problems.append(f"VECTOR_BUCKET={raw['VECTOR_BUCKET']!r} must be 3-63 lowercase letters, digits or '-' (no dots), "
                        "starting and ending with a letter or digit")
    if raw["VECTOR_INDEX"] and not VECTOR_INDEX_RE.fullmatch(raw["VECTOR_INDEX"]):
        problems.append(f"VECTOR_INDEX={raw['VECTOR_INDEX']!r} must be 3-63 lowercase letters, digits, '-' or '.', "
                        "starting and ending with a letter or digit")
    if raw["ROLE_ARN"] and not ROLE_ARN_RE.fullmatch(raw["ROLE_ARN"]):
        problems.append(f"ROLE_ARN={raw['ROLE_ARN']!r} is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)")
    if raw["EMBEDDING_DIMENSION"] not in {str(d) for d in DIMENSIONS}:
        problems.append(f"EMBEDDING_DIMENSION={raw['EMBEDDING_DIMENSION']!r} must be one of 256, 384, 1024, 3072")
    if raw["EMBEDDING_PURPOSE"] not in EMBEDDING_PURPOSES:
        problems.append(f"EMBEDDING_PURPOSE={raw['EMBEDDING_PURPOSE']!r} must be one of {', '.join(EMBEDDING_PURPOSES)}")
    for name in ("EXPECTED_BUCKET_OWNER", "INVENTORY_BUCKET_OWNER"):
        if raw[name] and not ACCOUNT_RE.fullmatch(raw[name]):
            problems.append(f"{name}={raw[name]!r} must be a 12-digit account id")
    for name in QUOTA_SETTINGS:
        if not (raw[name] or "").isdigit() or int(raw[name]) < 1:
            problems.append(f"{name}={raw[name]!r} must be a positive whole number")
    if not (raw["ON_DEMAND_MAX_IMAGES"] or "").isdigit():
        problems.append(f"ON_DEMAND_MAX_IMAGES={raw['ON_DEMAND_MAX_IMAGES']!r} must be a whole number (0: never)")
    if raw["MIRROR_DELETES"].strip().lower() not in ("true", "false"):
        problems.append(f"MIRROR_DELETES={raw['MIRROR_DELETES']!r} must be true or false")
    try:
        fraction = float(raw["MAX_DELETE_FRACTION"])
    except ValueError:
        fraction = -1.0
    if not 0 <= fraction <= 1:  # nan fails both
        problems.append(f"MAX_DELETE_FRACTION={raw['MAX_DELETE_FRACTION']!r} must be a share between 0 and 1 like 0.1")
    if not raw["MAX_DELETE_COUNT"].strip().isdigit():
        problems.append(f"MAX_DELETE_COUNT={raw['MAX_DELETE_COUNT']!r} must be a whole number")
    for name in COST_SETTINGS:
        if raw[name] is not None and not re.fullmatch(r"[0-9]+(\.[0-9]*)?|\.[0-9]+", raw[name].strip()):
            problems.append(f"{name}={raw[name]!r} must be an amount in USD like 0.00003")
    if not problems and int(raw["MAX_RECORDS_PER_JOB"]) < 2 * int(raw["MIN_RECORDS_PER_JOB"]):
        problems.append("MAX_RECORDS_PER_JOB must be at least twice MIN_RECORDS_PER_JOB")
    if not raw["AWS_REGION"] or not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", raw["AWS_REGION"]):
        problems.append(f"AWS_REGION={raw['AWS_REGION']!r} is not a region name like us-east-1")
    return problems


# --------------------------------------------------------------------------------------------------------------
# Clients and errors
# --------------------------------------------------------------------------------------------------------------


def make_client(service: str, config: Config, *, attempts: int | None = None, max_pool_connections: int = 10):
    """A boto3 client for `service` in the configured region.

    No endpoint is passed: the standard AWS_ENDPOINT_URL_<SERVICE> variables route clients elsewhere.
    """
    import boto3
    from botocore.config import Config as BotoConfig

    if attempts is None:  # botocore retries, unless the caller retries itself; AWS_MAX_ATTEMPTS sets how often
        attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or 10)
    return _session(boto3).client(
        service,
        region_name=config.region,
        config=BotoConfig(
            retries={"mode": "standard", "total_max_attempts": attempts},
            user_agent_extra=f"{APP_NAME}/{APP_VERSION}",
            max_pool_connections=max_pool_connections,
        ),
    )


@functools.lru_cache(maxsize=1)
def _session(boto3):
    """One boto3 session a process: its clients share the loaded service models and credentials."""
    return boto3.session.Session()


def error_code(exc: Exception) -> str:
    return exc.response.get("Error", {}).get("Code", "")  # type: ignore[attr-defined]


def describe_aws_error(exc: Exception) -> str:
    """One line for an AWS error: `Code: message (operation)` plus what to do for the common ones."""
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code, message = err.get("Code", "Error"), err.get("Message", str(exc))
        op = getattr(exc, "operation_name", "")
        hint = {
            "AccessDenied": "check the caller's IAM policy (bash iam/setup_service_role.sh --user-policy) and that "
                            "the bucket belongs to EXPECTED_BUCKET_OWNER",
            "AccessDeniedException": "check the caller's IAM policy (bash iam/setup_service_role.sh --user-policy)",
            "NoSuchBucket": "check the bucket settings in .env",
            "ExpiredToken": "refresh your AWS credentials and run the step again",
            "ExpiredTokenException": "refresh your AWS credentials and run the step again",
        }.get(code)
        return f"{code}: {message} ({op})" + (f" — {hint}" if hint else "")
    return f"{type(exc).__name__}: {exc}"


def run_main(body, argv: list[str] | None) -> int:
    """Run a step's body and turn expected failures into one line on stderr and an exit code."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        return body(argv)
    except StepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except NoCredentialsError:
        print("error: no AWS credentials found — configure them (aws configure, AWS_PROFILE or env)", file=sys.stderr)
        return EXIT_ERROR
    except (ClientError, BotoCoreError) as exc:
        print(f"error: {describe_aws_error(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        if exc.errno not in LOCAL_ERRNOS:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: a local file could not be written{where}: {exc.strerror or exc} — {local_remedy(exc)}",
              file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted — nothing half-written was kept; run the step again to continue", file=sys.stderr)
        return EXIT_INTERRUPTED


# What a local folder or disk answers (not the network): a step stops with one line and exit 2 on these.
LOCAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR,
                          errno.ENOTDIR, errno.EFBIG})


def local_remedy(exc: OSError) -> str:
    """What to do about a local file that cannot be written."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return "free some disk space, then run the step again (files are written whole or not at all)"
    if exc.errno == errno.EROFS:
        return "run the step from a writable folder (or set JOB_INFO_FILE to a path in one)"
    if exc.errno in (errno.EISDIR, errno.ENOTDIR):
        return "move what is in its place out of the way, then run the step again"
    return "check the folder's permissions (or set JOB_INFO_FILE to a path in a writable folder)"


def caller_account(sts) -> str:
    return sts.get_caller_identity()["Account"]


def bucket_owner(config: Config, account: str) -> str:
    return config.expected_bucket_owner or account


# --------------------------------------------------------------------------------------------------------------
# Console
# --------------------------------------------------------------------------------------------------------------


def printable(text: str) -> str:
    """An S3 key (or any text from outside) safe to print: control characters (a terminal's escape codes, new
    lines) shown as escapes like \\x1b instead of acting on the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def banner(title: str) -> None:
    print(RULE)
    print(title)
    print(RULE)


def ok(message: str) -> None:
    print(f"✓ {message}")


def timestamp(now: datetime | None = None) -> str:
    return (now or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------------------
# Files: atomic writes, the run's records
# --------------------------------------------------------------------------------------------------------------


def atomic_write(path: Path, write) -> None:
    """Write a file through a temporary sibling and a rename, so a reader never sees half of it: a write that fails
    (a full disk) leaves the file as it was. A symbolic link is written through: its target is replaced."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def s3_uri(bucket: str, key: str = "") -> str:
    return f"s3://{bucket}/{key}"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri}")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def objects_under(s3, bucket: str, prefix: str, owner: str) -> Iterator[dict]:
    """Every object under `prefix`, sub-folders included, one page at a time."""
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix, ExpectedBucketOwner=owner):
        yield from page.get("Contents", [])


def object_exists(s3, bucket: str, key: str, owner: str) -> bool:
    """Whether the object exists, asked by listing: a caller whose s3:ListBucket is limited to a prefix gets 403,
    not 404, from HeadObject on a missing key."""
    page = s3.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1, ExpectedBucketOwner=owner)
    return any(obj["Key"] == key for obj in page.get("Contents", []))


def read_if_present(s3, bucket: str, key: str, owner: str) -> bytes | None:
    """The object's bytes, or None when there is no such key. S3 answers a missing key with 404 NoSuchKey only
    to a caller with s3:ListBucket on it, and with 403 AccessDenied to one without (the caller policy the project
    generates limits ListBucket with an s3:prefix condition): a 403 is asked again by listing, and stays an error
    only when the object is there — once it was read again (it may have been written between the two calls: a job
    writing its manifest.json.out)."""
    from botocore.exceptions import ClientError

    def read() -> bytes:
        return s3.get_object(Bucket=bucket, Key=key, ExpectedBucketOwner=owner)["Body"].read()

    try:
        return read()
    except ClientError as exc:
        code = error_code(exc)
        if code in ("NoSuchKey", "404") or (code in ("AccessDenied", "403")
                                            and not object_exists(s3, bucket, key, owner)):
            return None
        if code not in ("AccessDenied", "403"):
            raise
    return read()  # there now: written since the first read, or denied for real (its error stands)


def delete_object(s3, bucket: str, key: str, owner: str) -> None:
    s3.delete_object(Bucket=bucket, Key=key, ExpectedBucketOwner=owner)


# --------------------------------------------------------------------------------------------------------------
# Queries (step 5)
# --------------------------------------------------------------------------------------------------------------


def make_presign_client(config: Config, *, path_style: bool = False):
    """An S3 client for pre-signed GetObject links.

    SigV4: botocore still presigns S3 with SigV2 by default, which regions opened after 2014 and KMS-encrypted
    objects refuse. The region's own host: a link to a bucket outside us-east-1 is not redirected (a redirect
    breaks its signature). `path_style` for bucket names with dots, which as a host name fall outside S3's TLS
    certificate. No endpoint is passed, as in `make_client`.
    """
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3.session.Session().client(
        "s3",
        region_name=config.region,
        config=BotoConfig(
            signature_version="s3v4",
            s3={"addressing_style": "path" if path_style else "virtual"},
            retries={"mode": "standard", "max_attempts": 10},
            user_agent_extra=f"{APP_NAME}/{APP_VERSION}",
        ),
    )
