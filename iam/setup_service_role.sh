#!/usr/bin/env bash
#
# Create or update the IAM service role that Amazon Bedrock assumes to run the batch
# inference job (article, section 3.2), or print the policy the person running the
# numbered scripts needs (section 3.3), or put that policy on an IAM user or role (the
# article's "paste this policy into the console"), or delete the role.
#
# The policies are the JSON templates beside this script; ${NAME} placeholders in them are
# filled from the settings and the account that `aws sts get-caller-identity` reports.
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR
readonly ENV_FILE=".env"
readonly SERVICE_PRINCIPAL="bedrock.amazonaws.com"
# The only names read from .env; anything else in the file is ignored, nothing is executed.
readonly SETTINGS=(AWS_REGION AWS_DEFAULT_REGION AWS_PROFILE SOURCE_BUCKET SOURCE_PREFIX RESULT_BUCKET
  RESULT_PREFIX VECTOR_BUCKET VECTOR_INDEX MODEL_ID ROLE_NAME OUTPUT_KMS_KEY_ID SOURCE_KMS_KEY_ID
  EXPECTED_BUCKET_OWNER INVENTORY_BUCKET INVENTORY_PREFIX INVENTORY_BUCKET_OWNER)

usage() {
  cat <<'EOF'
Usage: bash iam/setup_service_role.sh [--user-policy | --attach-caller-policy user/NAME|role/NAME |
                                       --detach-caller-policy user/NAME|role/NAME | --delete | --help]

Creates the IAM role Amazon Bedrock assumes to run the batch inference job, or updates it
when it exists (trust policy and inline permissions policy are rewritten each run):
  trust        bedrock.amazonaws.com, only for model-invocation-job/* of this account and region
  permissions  s3:ListBucket on SOURCE_BUCKET, s3:GetObject under s3://SOURCE_BUCKET/SOURCE_PREFIX,
               s3:ListBucket on RESULT_BUCKET, s3:GetObject + s3:PutObject under
               s3://RESULT_BUCKET/RESULT_PREFIX,
               kms:Decrypt + kms:GenerateDataKey on OUTPUT_KMS_KEY_ID when it is set,
               kms:Decrypt on SOURCE_KMS_KEY_ID when it is set
At the end it prints the role ARN to put into ROLE_ARN in .env.

Options:
  --user-policy  print (JSON only, to stdout) the least-privilege policy the identity that
                 runs the numbered scripts needs; changes nothing
  --attach-caller-policy user/NAME|role/NAME
                 put that policy on the IAM user or role: as the customer managed policy
                 <ROLE_NAME>Caller (created, or given a new default version when the settings
                 changed), attached to it. Running it again changes nothing. For a Bedrock API
                 key, NAME is the key's IAM user: the first part of the key's id, BedrockAPIKey-...
                 (A managed policy, not an inline one: a user's inline policies may hold 2,048
                 characters in all, and this policy is longer.)
  --detach-caller-policy user/NAME|role/NAME
                 detach it again; the policy itself is deleted once nothing uses it
  --delete       delete the role and its inline policy (succeeds if they are already gone)
  -h, --help     show this help

Settings come from the environment and from ./.env in the current directory (run from the
project root, like the numbered scripts); a variable set in the environment wins over .env.
.env lines are KEY=VALUE, optionally with `export`, quotes and # comments; only the names
below are read from it and nothing in it is executed.
  AWS_REGION         default AWS_DEFAULT_REGION, then us-east-1
  SOURCE_BUCKET      required (role, --user-policy, --attach-caller-policy)
  SOURCE_PREFIX      e.g. 2024/ (a missing trailing / is added); empty means the whole bucket
  RESULT_BUCKET      required (role, --user-policy, --attach-caller-policy)
  RESULT_PREFIX      default output/
  VECTOR_BUCKET      required (--user-policy, --attach-caller-policy)
  VECTOR_INDEX       required (--user-policy, --attach-caller-policy)
  MODEL_ID           default amazon.nova-2-multimodal-embeddings-v1:0
  ROLE_NAME          default BedrockBatchInferenceRole
  OUTPUT_KMS_KEY_ID  optional KMS key id or key ARN that encrypts the job's output
  SOURCE_KMS_KEY_ID  optional KMS key id or key ARN of the source bucket's default encryption
                     (SSE-KMS with a customer key): the role may decrypt the images with it, the
                     caller may decrypt them and encrypt the manifests it uploads
  INVENTORY_BUCKET   optional: the bucket S3 Inventory delivers reports to, for 01 --inventory;
                     the caller may read the reports under INVENTORY_PREFIX there
  INVENTORY_PREFIX   optional folder of the reports in INVENTORY_BUCKET (default: the whole bucket)
  INVENTORY_BUCKET_OWNER  optional account that owns INVENTORY_BUCKET (default: the buckets' owner)
  EXPECTED_BUCKET_OWNER  optional account that owns the buckets (default: the caller's);
                     the S3 statements allow only buckets of that account (aws:ResourceAccount)
  AWS_PROFILE        optional, passed on to the AWS CLI
The AWS CLI must be on PATH (`uv run bash iam/setup_service_role.sh` provides it), and so
must python3 (used to fill in the policy templates).
EOF
}

die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

warn() {
  printf 'warning: %s\n' "$*" >&2
}

banner() {
  echo "=========================================="
  echo "$1"
  echo "=========================================="
}

is_setting() {
  local name
  for name in "${SETTINGS[@]}"; do
    [[ "$name" == "$1" ]] && return 0
  done
  return 1
}

# Read KEY=VALUE lines of a .env file into the settings that the environment does not set.
load_dotenv() {
  local file="$1" line key value lineno=0
  local assignment='^([A-Za-z_][A-Za-z0-9_]*)[[:space:]]*=[[:space:]]*(.*)$'
  local double_quoted='^"(.*)"[[:space:]]*(#.*)?$'
  local single_quoted="^'(.*)'[[:space:]]*(#.*)?\$"
  [[ -f "$file" ]] || return 0
  while IFS= read -r line || [[ -n "$line" ]]; do
    lineno=$((lineno + 1))
    line="${line%$'\r'}"
    line="${line#"${line%%[![:space:]]*}"}"
    [[ -z "$line" || "$line" == \#* ]] && continue
    if [[ "$line" =~ ^export[[:space:]]+(.*)$ ]]; then
      line="${BASH_REMATCH[1]}"
    fi
    if [[ ! "$line" =~ $assignment ]]; then
      warn "$file line $lineno ignored: not KEY=VALUE"
      continue
    fi
    key="${BASH_REMATCH[1]}"
    value="${BASH_REMATCH[2]}"
    if [[ "$value" =~ $double_quoted || "$value" =~ $single_quoted ]]; then
      value="${BASH_REMATCH[1]}"
    else
      value="${value%%[[:space:]]#*}"
      value="${value%"${value##*[![:space:]]}"}"
    fi
    is_setting "$key" || continue
    [[ -n "${!key+set}" ]] && continue # the environment wins
    printf -v "$key" '%s' "$value"
    if [[ "$key" == AWS_PROFILE ]]; then
      export AWS_PROFILE
    fi
  done <"$file"
}

require_settings() {
  local name missing=()
  for name in "$@"; do
    [[ -n "${!name:-}" ]] || missing+=("$name")
  done
  if ((${#missing[@]} > 0)); then
    die "missing setting: ${missing[*]} (set it in ./${ENV_FILE} or the environment; see --help)"
  fi
}

# folder PREFIX: the prefix as the numbered scripts use it (common.normalize_prefix): no
# surrounding blanks, no leading /, a trailing / unless empty.
folder() {
  local prefix="$1"
  prefix="${prefix#"${prefix%%[![:space:]]*}"}"
  prefix="${prefix%"${prefix##*[![:space:]]}"}"
  while [[ "$prefix" == /* ]]; do
    prefix="${prefix#/}"
  done
  if [[ -n "$prefix" && "$prefix" != */ ]]; then
    prefix="$prefix/"
  fi
  printf '%s' "$prefix"
}

# check NAME REGEX WHAT: the setting NAME must match REGEX
check() {
  local name="$1" regex="$2" what="$3"
  [[ "${!name}" =~ $regex ]] || die "$name='${!name}' is not $what"
}

# validate_settings MODE: the settings MODE uses must be well formed
validate_settings() {
  check AWS_REGION '^[a-z]{2}(-[a-z]+)+-[0-9]+$' "an AWS region name"
  check ROLE_NAME '^[A-Za-z0-9+=,.@_-]{1,64}$' "a valid IAM role name"
  [[ "$1" != delete && "$1" != detach ]] || return 0
  local bucket='^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$'
  # Letters, digits and -!_'(). in folder names (the batch job's s3Uri rule); no * or ?, which
  # would be wildcards in the policy.
  local prefix="^([A-Za-z0-9!_.'()-]+/)*[A-Za-z0-9!_.'()-]*\$"
  local name
  for name in SOURCE_BUCKET RESULT_BUCKET INVENTORY_BUCKET; do
    [[ -z "${!name}" ]] || check "$name" "$bucket" "a valid S3 bucket name"
  done
  for name in SOURCE_PREFIX RESULT_PREFIX INVENTORY_PREFIX; do
    check "$name" "$prefix" "an S3 folder prefix like 2024/ (letters, digits, -!_'(). and /)"
  done
  [[ -z "$VECTOR_BUCKET" ]] || check VECTOR_BUCKET '^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$' "a valid vector bucket name"
  [[ -z "$VECTOR_INDEX" ]] || check VECTOR_INDEX '^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$' "a valid vector index name"
  check MODEL_ID '^[A-Za-z0-9][A-Za-z0-9._:-]*$' "a Bedrock model id"
  for name in EXPECTED_BUCKET_OWNER INVENTORY_BUCKET_OWNER; do
    [[ -z "${!name}" ]] || check "$name" '^[0-9]{12}$' "a 12-digit AWS account id"
  done
  for name in OUTPUT_KMS_KEY_ID SOURCE_KMS_KEY_ID; do
    [[ -z "${!name}" ]] || check "$name" '^(arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/)?(mrk-)?[0-9a-f-]{32,36}$' \
      "a KMS key id or key ARN (an alias cannot name a key in an IAM policy)"
  done
}

AWS_ERR=""

# run_aws ARGS...: the AWS CLI in the configured region; its stderr is kept in $AWS_ERR
run_aws() {
  aws --region "$AWS_REGION" "$@" 2>"$AWS_ERR"
}

# The CLI's error message on one line.
aws_error() {
  tr -s '\n' ' ' <"$AWS_ERR" | sed -e 's/^ *//' -e 's/ *$//'
}

aws_error_is() {
  grep -q "($1)" "$AWS_ERR"
}

# Sets ACCOUNT_ID and PARTITION from the caller's identity.
find_account() {
  local identity caller_arn
  if ! identity="$(run_aws sts get-caller-identity --query '[Account, Arn]' --output text)"; then
    die "cannot find the AWS account (aws sts get-caller-identity): $(aws_error)"
  fi
  read -r ACCOUNT_ID caller_arn <<<"$identity"
  [[ "$ACCOUNT_ID" =~ ^[0-9]{12}$ ]] || die "unexpected answer from aws sts get-caller-identity: $identity"
  PARTITION="${caller_arn#arn:}"
  PARTITION="${PARTITION%%:*}"
}

# key_arn ID: a KMS key id as a key ARN in the configured region and account (an ARN as it is).
key_arn() {
  if [[ -n "$1" && "$1" != arn:* ]]; then
    printf 'arn:%s:kms:%s:%s:key/%s' "$PARTITION" "$AWS_REGION" "$ACCOUNT_ID" "$1"
  else
    printf '%s' "$1"
  fi
}

# extra_statements role|caller: the statement templates the settings add to that policy.
extra_statements() {
  [[ -z "$OUTPUT_KMS_KEY_ID" ]] || printf '%s\n' "$SCRIPT_DIR/$1-kms-statement.json"
  [[ -z "$SOURCE_KMS_KEY_ID" ]] || printf '%s\n' "$SCRIPT_DIR/$1-source-kms-statement.json"
  [[ "$1" != caller || -z "$INVENTORY_BUCKET" ]] || printf '%s\n' "$SCRIPT_DIR/caller-inventory-statement.json"
}

# render TEMPLATE [EXTRA_STATEMENT_TEMPLATE...]: print the policy with its placeholders filled in.
# Values are JSON-escaped; an unknown placeholder is an error. An empty prefix means the whole
# bucket, so an s3:prefix condition listing "" is dropped rather than kept as "" or "*" (a
# ListObjectsV2 without Prefix carries no s3:prefix, which no StringLike would match).
render() {
  local IFS=$'\n'
  python3 - "$1" "${*:2}" \
    "ACCOUNT_ID=$ACCOUNT_ID" "PARTITION=$PARTITION" "REGION=$AWS_REGION" \
    "BUCKET_OWNER=${EXPECTED_BUCKET_OWNER:-$ACCOUNT_ID}" \
    "SOURCE_BUCKET=$SOURCE_BUCKET" "SOURCE_PREFIX=$SOURCE_PREFIX" \
    "RESULT_BUCKET=$RESULT_BUCKET" "RESULT_PREFIX=$RESULT_PREFIX" \
    "VECTOR_BUCKET=$VECTOR_BUCKET" "VECTOR_INDEX=$VECTOR_INDEX" \
    "MODEL_ID=$MODEL_ID" "ROLE_NAME=$ROLE_NAME" "KMS_KEY_ARN=$(key_arn "$OUTPUT_KMS_KEY_ID")" \
    "SOURCE_KMS_KEY_ARN=$(key_arn "$SOURCE_KMS_KEY_ID")" \
    "INVENTORY_BUCKET=$INVENTORY_BUCKET" "INVENTORY_PREFIX=$INVENTORY_PREFIX" \
    "INVENTORY_OWNER=${INVENTORY_BUCKET_OWNER:-${EXPECTED_BUCKET_OWNER:-$ACCOUNT_ID}}" <<'PY'
import json
import re
import sys

template, extras, *pairs = sys.argv[1:]
values = dict(pair.split("=", 1) for pair in pairs)


def load(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()

    def fill(match):
        name = match.group(1)
        if name not in values:
            sys.exit(f"error: {path}: no value for placeholder ${{{name}}}")
        return json.dumps(values[name])[1:-1]

    return json.loads(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", fill, text))


policy = load(template)
for extra in filter(None, extras.split("\n")):
    policy["Statement"].append(load(extra))
for statement in policy["Statement"]:
    conditions = statement.get("Condition", {})
    for operator in list(conditions):
        prefixes = conditions[operator].get("s3:prefix")
        if prefixes is not None and "" in ([prefixes] if isinstance(prefixes, str) else prefixes):
            del conditions[operator]["s3:prefix"]
            if not conditions[operator]:
                del conditions[operator]
    if "Condition" in statement and not statement["Condition"]:
        del statement["Condition"]
json.dump(policy, sys.stdout, indent=2)
print()
PY
}

create_or_update_role() {
  local policy_name="$1" trust permissions created role_arn extras
  mapfile -t extras < <(extra_statements service-role)

  banner "Creating Bedrock Batch Inference Role"
  echo "Step 1: Creating trust policy..."
  trust="$(render "$SCRIPT_DIR/trust-policy.json")"
  permissions="$(render "$SCRIPT_DIR/service-role-policy.json" "${extras[@]}")"
  echo "✓ Trust policy: $SERVICE_PRINCIPAL, for batch jobs of account $ACCOUNT_ID in $AWS_REGION only"

  echo "Step 2: Creating IAM role: $ROLE_NAME"
  if created="$(run_aws iam create-role --role-name "$ROLE_NAME" --output json \
    --description "Assumed by Amazon Bedrock to run batch inference jobs (iam/setup_service_role.sh)" \
    --assume-role-policy-document "$trust")"; then
    printf '%s\n' "$created"
    echo "✓ Role created successfully"
  elif aws_error_is EntityAlreadyExists; then
    echo "Role $ROLE_NAME already exists: updating its trust policy"
    run_aws iam update-assume-role-policy --role-name "$ROLE_NAME" --policy-document "$trust" ||
      die "updating the trust policy of $ROLE_NAME failed: $(aws_error)"
    echo "✓ Trust policy updated"
  else
    die "creating role $ROLE_NAME failed: $(aws_error)"
  fi

  echo "Step 3: Attaching permissions policy..."
  run_aws iam put-role-policy --role-name "$ROLE_NAME" --policy-name "$policy_name" \
    --policy-document "$permissions" ||
    die "putting policy $policy_name on role $ROLE_NAME failed: $(aws_error)"
  echo "✓ Permissions policy attached successfully ($policy_name)"
  echo "  read  s3://$SOURCE_BUCKET/$SOURCE_PREFIX"
  echo "  write s3://$RESULT_BUCKET/$RESULT_PREFIX"
  [[ -z "$OUTPUT_KMS_KEY_ID" ]] || echo "  use KMS key $OUTPUT_KMS_KEY_ID for the output"
  [[ -z "$SOURCE_KMS_KEY_ID" ]] || echo "  decrypt the images with KMS key $SOURCE_KMS_KEY_ID"

  echo "Step 4: Verifying role setup..."
  role_arn="$(run_aws iam get-role --role-name "$ROLE_NAME" --query Role.Arn --output text)" ||
    die "reading role $ROLE_NAME back failed: $(aws_error)"
  echo "✓ Role ARN: $role_arn"

  banner "✓ Setup Complete!"
  echo "Role Name: $ROLE_NAME"
  echo "Role ARN: $role_arn"
  echo
  echo "Next: put the role ARN into .env so that 01_create_job.py passes it to Bedrock:"
  echo "  ROLE_ARN=$role_arn"
  echo "If the identity that runs the scripts is not an administrator, give it the caller policy:"
  echo "  bash iam/setup_service_role.sh --user-policy > caller-policy.json"
}

delete_role() {
  local policy_name="$1"
  banner "Deleting Bedrock Batch Inference Role"
  if run_aws iam delete-role-policy --role-name "$ROLE_NAME" --policy-name "$policy_name"; then
    echo "✓ Deleted inline policy $policy_name"
  elif aws_error_is NoSuchEntity; then
    echo "✓ Inline policy $policy_name is already gone"
  else
    die "deleting policy $policy_name of role $ROLE_NAME failed: $(aws_error)"
  fi
  if run_aws iam delete-role --role-name "$ROLE_NAME"; then
    echo "✓ Deleted role $ROLE_NAME"
  elif aws_error_is NoSuchEntity; then
    echo "✓ Role $ROLE_NAME is already gone"
  else
    die "deleting role $ROLE_NAME failed: $(aws_error)"
  fi
  echo "Remove ROLE_ARN from .env."
}

# parse_identity user/NAME|role/NAME: sets IDENTITY_KIND (user or role) and IDENTITY_NAME
parse_identity() {
  if [[ ! "$1" =~ ^(user|role)/([A-Za-z0-9+=,.@_-]{1,64})$ ]]; then
    die "'$1' is not user/NAME or role/NAME (an IAM user or role of this account, e.g. user/BedrockAPIKey-abcd)"
  fi
  IDENTITY_KIND="${BASH_REMATCH[1]}"
  IDENTITY_NAME="${BASH_REMATCH[2]}"
}

# same_json A B: whether two JSON documents are equal as values
same_json() {
  python3 -c 'import json, sys; sys.exit(json.loads(sys.argv[1]) != json.loads(sys.argv[2]))' "$1" "$2"
}

# The customer managed policy that holds the caller policy: one per ROLE_NAME, attached to every
# identity that runs the steps (the access-key user, a Bedrock API key's user, a role).
caller_policy_arn() {
  printf 'arn:%s:iam::%s:policy/%s' "$PARTITION" "$ACCOUNT_ID" "$CALLER_POLICY_NAME"
}

attach_caller_policy() {
  local kind="$IDENTITY_KIND" name="$IDENTITY_NAME" arn document extras current default versions count oldest
  arn="$(caller_policy_arn)"
  mapfile -t extras < <(extra_statements caller)
  document="$(render "$SCRIPT_DIR/caller-policy.json" "${extras[@]}")"

  banner "Attaching the caller policy to $kind $name"
  if ! run_aws iam "get-$kind" "--$kind-name" "$name" --output text --query "${kind^}.Arn" >/dev/null; then
    aws_error_is NoSuchEntity && die "there is no IAM $kind named $name in account $ACCOUNT_ID"
    die "reading IAM $kind $name failed: $(aws_error)"
  fi
  if default="$(run_aws iam get-policy --policy-arn "$arn" --query Policy.DefaultVersionId --output text)"; then
    current="$(run_aws iam get-policy-version --policy-arn "$arn" --version-id "$default"       --query PolicyVersion.Document --output json)" || die "reading policy $arn failed: $(aws_error)"
    if same_json "$current" "$document"; then
      echo "✓ Policy $CALLER_POLICY_NAME is up to date ($default)"
    else
      # IAM keeps at most five versions of a policy: make room by deleting the oldest non-default one.
      versions="$(run_aws iam list-policy-versions --policy-arn "$arn" --output text \
        --query '[length(Versions), sort_by(Versions[?!IsDefaultVersion], &CreateDate)[0].VersionId]')" ||
        die "listing the versions of $arn failed: $(aws_error)"
      read -r count oldest <<<"$versions"
      if ((count >= 5)); then
        run_aws iam delete-policy-version --policy-arn "$arn" --version-id "$oldest" ||
          die "deleting version $oldest of $arn failed: $(aws_error)"
      fi
      run_aws iam create-policy-version --policy-arn "$arn" --policy-document "$document" --set-as-default         >/dev/null || die "updating policy $arn failed: $(aws_error)"
      echo "✓ Policy $CALLER_POLICY_NAME updated to the current settings"
    fi
  elif aws_error_is NoSuchEntity; then
    run_aws iam create-policy --policy-name "$CALLER_POLICY_NAME" --policy-document "$document"       --description "What the identity running the bedrock-batch steps needs (iam/setup_service_role.sh)"       >/dev/null || die "creating policy $CALLER_POLICY_NAME failed: $(aws_error)"
    echo "✓ Policy $CALLER_POLICY_NAME created"
  else
    die "reading policy $arn failed: $(aws_error)"
  fi
  run_aws iam "attach-$kind-policy" "--$kind-name" "$name" --policy-arn "$arn" ||
    die "attaching $arn to $kind $name failed: $(aws_error)"
  echo "✓ Attached $arn to $kind $name"
}

detach_caller_policy() {
  local kind="$IDENTITY_KIND" name="$IDENTITY_NAME" arn attached version
  arn="$(caller_policy_arn)"
  banner "Detaching the caller policy from $kind $name"
  if run_aws iam "detach-$kind-policy" "--$kind-name" "$name" --policy-arn "$arn"; then
    echo "✓ Detached $arn from $kind $name"
  elif aws_error_is NoSuchEntity; then
    echo "✓ $arn is not attached to $kind $name"
  else
    die "detaching $arn from $kind $name failed: $(aws_error)"
  fi
  if ! attached="$(run_aws iam get-policy --policy-arn "$arn" --query Policy.AttachmentCount --output text)"; then
    aws_error_is NoSuchEntity && return 0
    die "reading policy $arn failed: $(aws_error)"
  fi
  if ((attached > 0)); then
    echo "Policy $CALLER_POLICY_NAME is still attached to $attached other identity(ies): kept"
    return 0
  fi
  for version in $(run_aws iam list-policy-versions --policy-arn "$arn" --output text     --query 'Versions[?!IsDefaultVersion].VersionId'); do
    run_aws iam delete-policy-version --policy-arn "$arn" --version-id "$version" ||
      die "deleting version $version of $arn failed: $(aws_error)"
  done
  run_aws iam delete-policy --policy-arn "$arn" || die "deleting policy $arn failed: $(aws_error)"
  echo "✓ Deleted policy $CALLER_POLICY_NAME (nothing used it any more)"
}

main() {
  local mode=create identity=""
  while (($# > 0)); do
    case "$1" in
      --user-policy) mode=user-policy ;;
      --attach-caller-policy | --detach-caller-policy)
        mode="${1#--}"
        mode="${mode%-caller-policy}"
        (($# > 1)) || die "$1 needs user/NAME or role/NAME"
        identity="$2"
        shift
        ;;
      --delete) mode=delete ;;
      -h | --help)
        usage
        return 0
        ;;
      *)
        printf 'error: unknown argument: %s (see --help)\n' "$1" >&2
        return 2
        ;;
    esac
    shift
  done

  load_dotenv "$ENV_FILE"
  AWS_REGION="${AWS_REGION:-${AWS_DEFAULT_REGION:-us-east-1}}"
  SOURCE_BUCKET="${SOURCE_BUCKET:-}"
  SOURCE_PREFIX="$(folder "${SOURCE_PREFIX:-}")"
  RESULT_BUCKET="${RESULT_BUCKET:-}"
  RESULT_PREFIX="$(folder "${RESULT_PREFIX:-output/}")"
  VECTOR_BUCKET="${VECTOR_BUCKET:-}"
  VECTOR_INDEX="${VECTOR_INDEX:-}"
  MODEL_ID="${MODEL_ID:-amazon.nova-2-multimodal-embeddings-v1:0}"
  ROLE_NAME="${ROLE_NAME:-BedrockBatchInferenceRole}"
  OUTPUT_KMS_KEY_ID="${OUTPUT_KMS_KEY_ID:-}"
  SOURCE_KMS_KEY_ID="${SOURCE_KMS_KEY_ID:-}"
  EXPECTED_BUCKET_OWNER="${EXPECTED_BUCKET_OWNER:-}"
  INVENTORY_BUCKET="${INVENTORY_BUCKET:-}"
  INVENTORY_PREFIX="$(folder "${INVENTORY_PREFIX:-}")"
  INVENTORY_BUCKET_OWNER="${INVENTORY_BUCKET_OWNER:-}"
  local policy_name="${ROLE_NAME}Permissions"
  CALLER_POLICY_NAME="${ROLE_NAME}Caller"

  case "$mode" in
    create) require_settings SOURCE_BUCKET RESULT_BUCKET ;;
    user-policy | attach) require_settings SOURCE_BUCKET RESULT_BUCKET VECTOR_BUCKET VECTOR_INDEX ;;
  esac
  [[ -z "$identity" ]] || parse_identity "$identity"
  validate_settings "$mode"
  command -v aws >/dev/null || die "the AWS CLI (aws) is not on PATH; run: uv run bash iam/setup_service_role.sh"
  command -v python3 >/dev/null || die "python3 is not on PATH (it fills in the policy templates)"

  AWS_ERR="$(mktemp)"
  trap 'rm -f "$AWS_ERR"' EXIT

  case "$mode" in
    delete) delete_role "$policy_name" ;;
    user-policy)
      find_account
      local extras
      mapfile -t extras < <(extra_statements caller)
      render "$SCRIPT_DIR/caller-policy.json" "${extras[@]}"
      ;;
    create)
      find_account
      create_or_update_role "$policy_name"
      ;;
    attach)
      find_account
      attach_caller_policy
      ;;
    detach)
      find_account
      detach_caller_policy
      ;;
  esac
}

main "$@"
