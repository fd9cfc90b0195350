"""The IAM of iam/setup_service_role.sh covers exactly what the steps and the batch job do.

The four steps run end to end with every botocore call recorded (tests/record_calls); each call must be allowed by
the caller policy `--user-policy` prints. The job runs as the role the script created, and every S3 access the
Bedrock emulator makes on the job's behalf must be allowed by that role's policy.
"""

from __future__ import annotations

import json
import subprocess

from tests.conftest import ROOT
from tests.iam_check import is_allowed, required_permission

ACCOUNT = "123456789012"
SECRET = "kS3cr3tValueThatMustNeverBeWrittenAnywhere"
TOKEN = "SessionTokenThatMustNeverBeWrittenAnywhere"


def setup_script(world, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "iam" / "setup_service_role.sh"), *args], cwd=world.cwd,
                          env=world.env, capture_output=True, text=True, timeout=120)


def recorded_calls(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def denied(policy: dict, recorded: list[dict]) -> list[tuple]:
    """The recorded calls `policy` does not allow: (operation, action, resource, context)."""
    out = []
    for call in recorded:
        for action, resource, context in required_permission(call["service"], call["operation"], call["params"],
                                                             account=ACCOUNT, region="us-east-1"):
            if not is_allowed(policy, action, resource, context):
                out.append((call["operation"], action, resource, context))
    return out


def test_caller_and_role_policies_cover_every_call_of_the_four_steps(world):
    world.env["ROLE_NAME"] = f"Role-{world.source_bucket}"
    created = setup_script(world)
    assert created.returncode == 0, created.stderr
    world.env["ROLE_ARN"] = f"arn:aws:iam::{ACCOUNT}:role/{world.env['ROLE_NAME']}"
    caller_policy = json.loads(setup_script(world, "--user-policy").stdout)

    world.put_images([f"a/img-{i}.png" for i in range(110)], prefix="2024/")
    calls = world.cwd / "calls.jsonl"
    world.env.update(PYTHONPATH=str(ROOT / "tests" / "record_calls"), RECORD_AWS_CALLS=str(calls),
                     AWS_SECRET_ACCESS_KEY=SECRET, AWS_SESSION_TOKEN=TOKEN)
    outputs = []
    first_image = f"s3://{world.source_bucket}/2024/a/img-0.png"
    for step, args in ((1, ()), (2, ("--wait", "--interval", "0.05", "--timeout", "60")), (3, ()),
                       (5, ("a red sports car", "--presign", "60")), (5, ("--image", first_image)),
                       (5, ("--image", first_image, "--filter", json.dumps({"job_id": {"$exists": True}}))),
                       (4, ())):
        result = world.step(step, *args)
        assert result.returncode == 0, (step, result.stdout, result.stderr)
        outputs.append(result.stdout + result.stderr)
    world.client("s3").delete_object(Bucket=world.source_bucket, Key="2024/a/img-1.png")
    gone = world.step(1)  # a day with an image gone and none new: its vector deleted at once
    assert gone.returncode == 0 and "Deleted 1 vector(s)" in gone.stdout, gone.stdout + gone.stderr

    # No credential in what the steps print (a pre-signed link is step 5's answer, not a log) or leave behind.
    assert not [o for o in outputs[:3] + outputs[-1:] if SECRET in o or TOKEN in o]
    assert not [o for o in outputs[3:-1] if SECRET in o]
    for path in world.cwd.rglob("*"):
        if path.name != "calls.jsonl" and path.is_file():
            assert SECRET not in path.read_text(errors="replace") and TOKEN not in path.read_text(errors="replace")

    recorded = recorded_calls(calls)
    # Every S3 call names the account that must own the bucket (a pre-signed link cannot: a browser sends no
    # x-amz-expected-bucket-owner header).
    assert not [c for c in recorded if c["service"] == "s3" and not c["presign"]
                and c["params"].get("ExpectedBucketOwner") != ACCOUNT]
    assert [c for c in recorded if c["presign"]]
    operations = {(c["service"], c["operation"]) for c in recorded}
    assert {("sts", "GetCallerIdentity"), ("s3", "ListObjectsV2"), ("s3", "PutObject"),
            ("bedrock", "CreateModelInvocationJob"), ("bedrock", "GetModelInvocationJob"), ("s3", "GetObject"),
            ("s3vectors", "CreateIndex"), ("s3vectors", "PutVectors"), ("s3", "DeleteObject"),
            ("s3vectors", "QueryVectors"), ("bedrock-runtime", "InvokeModel"), ("s3vectors", "DeleteVectors"),
            ("s3vectors", "ListVectors"), ("s3vectors", "GetVectors")} <= operations
    assert denied(caller_policy, recorded) == []

    role_name = world.env["ROLE_NAME"]
    iam = world.client("iam")
    role_policies = [iam.get_role_policy(RoleName=role_name, PolicyName=name)["PolicyDocument"]
                     for name in iam.list_role_policies(RoleName=role_name)["PolicyNames"]]
    jobs = [j for j in world.emulator("/_emulator/jobs")["jobs"] if j["roleArn"] == world.env["ROLE_ARN"]]
    assert len(jobs) == 1 and jobs[0]["status"] == "Completed"
    accesses = jobs[0]["s3Accesses"]
    assert {a["action"] for a in accesses} == {"s3:ListBucket", "s3:GetObject", "s3:PutObject"}
    for access in accesses:
        context = {"aws:ResourceAccount": ACCOUNT}
        if access.get("prefix") is not None:
            context["s3:prefix"] = access["prefix"]
        assert is_allowed(role_policies, access["action"], access["resource"], context), access


def test_caller_policy_refuses_what_the_steps_do_not_need(world):
    policy = json.loads(setup_script(world, "--user-policy").stdout)
    for service, operation, params in [
        ("s3", "DeleteObject", {"Bucket": world.source_bucket, "Key": "other/photo.jpg"}),
        ("s3", "PutObject", {"Bucket": "someone-elses-bucket", "Key": "2024/x.jsonl"}),
        ("s3vectors", "PutVectors", {"vectorBucketName": world.vector_bucket, "indexName": "another-index"}),
        ("s3", "GetObject", {"Bucket": world.result_bucket, "Key": "elsewhere/secret.txt"}),
        ("bedrock-runtime", "InvokeModel", {"modelId": "anthropic.claude-v2"}),
    ]:
        needs = required_permission(service, operation, params, account=ACCOUNT, region="us-east-1")
        assert not all(is_allowed(policy, a, r, c) for a, r, c in needs), (operation, params)


def test_caller_policy_covers_01_reading_an_inventory_report_in_its_own_bucket(world, tmp_path):
    """01 --inventory reads the report from the bucket S3 Inventory delivers to (often another account's): the
    INVENTORY_* settings add exactly that read to the caller policy, and 01 names the report bucket's owner."""
    from tests.test_inventory import publish

    reports = f"inventory-{world.source_bucket}"
    world.client("s3").create_bucket(Bucket=reports)
    world.put_images([f"a/img-{i}.png" for i in range(110)], prefix="2024/")
    manifest_uri = publish(world, "csv.gz", tmp_path, bucket=reports)
    world.env["ROLE_NAME"] = world.role_arn.rsplit("/", 1)[1]
    plain_policy = json.loads(setup_script(world, "--user-policy").stdout)
    world.env.update(INVENTORY_BUCKET=reports, INVENTORY_PREFIX="inventory/", INVENTORY_BUCKET_OWNER=ACCOUNT)
    caller_policy = json.loads(setup_script(world, "--user-policy").stdout)

    calls = world.cwd / "calls.jsonl"
    world.env.update(PYTHONPATH=str(ROOT / "tests" / "record_calls"), RECORD_AWS_CALLS=str(calls))
    result = world.step(1, "--inventory", manifest_uri)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "✓ Found 110 images" in result.stdout
    recorded = recorded_calls(calls)
    report_reads = [c for c in recorded if c["operation"] == "GetObject" and c["params"]["Bucket"] == reports]
    assert len(report_reads) == 3  # manifest.json and its two data files
    assert all(c["params"]["ExpectedBucketOwner"] == ACCOUNT for c in report_reads)
    assert denied(caller_policy, recorded) == []
    # Without the settings, exactly the report's reads are refused.
    assert {(d[0], d[2].split(":::")[1].split("/")[0]) for d in denied(plain_policy, recorded)} == {
        ("GetObject", reports)}


def test_01_reads_the_report_as_an_object_of_the_report_buckets_owner(world, tmp_path):
    from tests.test_inventory import publish

    world.put_images([f"a/img-{i}.png" for i in range(3)], prefix="2024/")
    manifest_uri = publish(world, "csv", tmp_path)
    calls = world.cwd / "calls.jsonl"
    result = world.step(1, "--dry-run", "--inventory", manifest_uri, "--inventory-bucket-owner", "444455556666",
                        env={"PYTHONPATH": str(ROOT / "tests" / "record_calls"), "RECORD_AWS_CALLS": str(calls)})
    owners = {(c["params"]["Bucket"], c["params"].get("ExpectedBucketOwner")) for c in recorded_calls(calls)
              if c["service"] == "s3" and c["operation"] == "GetObject"}
    assert owners == {(world.result_bucket, "444455556666")}, result.stdout + result.stderr


def test_caller_policy_covers_every_call_of_the_setup_check(world):
    """00_check_setup.py asks Service Quotas, Bedrock, IAM, S3 and S3 Vectors; the caller policy allows each call
    (its own principal through ${aws:username}, which the evaluator does not expand: filled in here)."""
    world.env["ROLE_NAME"] = world.role_arn.rsplit("/", 1)[1]
    policy_text = setup_script(world, "--user-policy").stdout
    caller = world.client("sts").get_caller_identity()["Arn"]
    assert ":user/" in caller
    policy = json.loads(policy_text.replace("${aws:username}", caller.rsplit("/", 1)[1]))
    calls = world.cwd / "calls.jsonl"
    checked = world.step(0, env={"PYTHONPATH": str(ROOT / "tests" / "record_calls"), "RECORD_AWS_CALLS": str(calls)})
    assert "Traceback" not in checked.stderr, checked.stderr
    recorded = recorded_calls(calls)
    operations = {(c["service"], c["operation"]) for c in recorded}
    assert {("service-quotas", "ListServiceQuotas"), ("bedrock", "GetFoundationModel"), ("iam", "GetRole"),
            ("iam", "SimulatePrincipalPolicy"), ("s3", "ListObjectsV2"), ("sts", "GetCallerIdentity")} <= operations
    assert denied(policy, recorded) == []
    # Another user's permissions are not the caller's to simulate.
    assert denied(policy, [{"service": "iam", "operation": "SimulatePrincipalPolicy",
                            "params": {"PolicySourceArn": f"arn:aws:iam::{ACCOUNT}:user/someone-else"}}])
