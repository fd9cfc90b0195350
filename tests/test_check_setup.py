"""00_check_setup.py: every row ✓ in a world set up as the quick start sets it up; each row ✗ (with its fix) when
the one thing it checks is broken; and nothing is written, created or submitted by the check.

The caller is an IAM user of its own with the policy `iam/setup_service_role.sh --user-policy` prints (plus what
the check itself reads), and IAM's SimulatePrincipalPolicy, which moto lacks, is answered by tests.standins.iamsim.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request

import pytest

import common
from batch_embeddings import keyset, listing, setup_check
from tests.conftest import ROOT, import_step
from tests.standins import iamsim, serve
from tests.standins.servicequotas import MODEL_NAME, batch_quotas, quota

ROWS = ["credentials", "model", "minimum records per job quota", "records per input file quota",
        "records per job quota", "input file size quota", "job size quota", "submitted + in-progress jobs quota", "source bucket", "result bucket", "vector bucket", "vector index",
        "service role", "service role permissions", "caller permissions", "S3 listing reader",
        "S3 Vectors page reader"]
# What the generated policy grants the check, with the caller's own principal as `*` (tests.iam_check does not expand
# the ${aws:username} the generated policy names it by).
CHECK_ITSELF = {"Sid": "CheckSetup", "Effect": "Allow", "Resource": "*",
                "Action": ["servicequotas:ListServiceQuotas", "servicequotas:ListAWSDefaultServiceQuotas",
                           "bedrock:GetFoundationModel", "iam:GetRole", "iam:SimulatePrincipalPolicy"]}


@pytest.fixture(scope="module")
def simulator(stack):
    served = serve(iamsim.make_app(stack.moto_url))
    yield served
    served.stop()


def post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read() or b"{}")


NAMED = ("SOURCE_BUCKET", "RESULT_BUCKET", "VECTOR_BUCKET", "VECTOR_INDEX", "ROLE_NAME", "ROLE_ARN")
_printed: dict[tuple, tuple[dict[str, str], str]] = {}  # the other settings -> (the names, the policy printed)


def printed_policy(world) -> str:
    """What `setup_service_role.sh --user-policy` prints for this world's settings. The script runs once per set of
    settings besides the world's own names; for another world that text is used with its names in their places
    (worlds differ only in their numbered names; tests/test_iam.py tests the script's output itself)."""
    env = {**world.env, "ROLE_NAME": world.role_arn.rsplit("/", 1)[-1]}
    names = {name: env[name] for name in NAMED}
    settings = tuple(sorted((k, v) for k, v in env.items()
                            if k not in NAMED and not k.startswith("PYTEST_")
                            and (not k.startswith("AWS_") or k.endswith("REGION"))))
    if settings not in _printed:
        printed = subprocess.run(["bash", str(ROOT / "iam" / "setup_service_role.sh"), "--user-policy"],
                                 cwd=world.cwd, env=env, capture_output=True, text=True, timeout=120)
        assert printed.returncode == 0, printed.stderr
        _printed[settings] = (names, printed.stdout)
    first, text = _printed[settings]
    ours = {first[name]: names[name] for name in NAMED}
    return re.sub("|".join(map(re.escape, sorted(ours, key=len, reverse=True))), lambda m: ours[m[0]], text)


def caller_policy(world, *, drop: str | None = None, check_itself: bool = True) -> dict:
    """The policy the setup script prints for this world's settings, less the action `drop`."""
    policy = json.loads(printed_policy(world))
    for statement in policy["Statement"]:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        statement["Action"] = [a for a in actions if a != drop]
    policy["Statement"] = [s for s in policy["Statement"] if s["Action"]]
    if check_itself:
        policy["Statement"].append(json.loads(json.dumps(CHECK_ITSELF)))
    return policy


def use_caller(world, simulator, policy: dict, name: str = "checker") -> str:
    """Run the check as a new IAM user holding `policy`; returns its name."""
    iam = world.client("iam")
    name = f"{name}-{world.source_bucket}"
    iam.create_user(UserName=name)
    arn = iam.create_policy(PolicyName=f"{name}-policy", PolicyDocument=json.dumps(policy))["Policy"]["Arn"]
    iam.attach_user_policy(UserName=name, PolicyArn=arn)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    world.env.pop("AWS_SESSION_TOKEN", None)
    world.env.update(AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"],
                     AWS_ENDPOINT_URL_IAM=simulator.url)
    return name


@pytest.fixture
def checked(world, simulator):
    """The world with a caller of its own (the generated policy) and the quotas stand-in at its defaults."""
    post(world.endpoint("service-quotas") + "/_standin/reset", {})
    world.caller = use_caller(world, simulator, caller_policy(world))
    return world


def rows(output: str) -> dict[str, tuple[str, str]]:
    """Each row the check printed: name -> (mark, rest of the line and the fix under it)."""
    found, last = {}, None
    for line in output.split("\n\n", 1)[0].splitlines():  # the rows end at the summary's blank line
        if line[:2] in ("✓ ", "✗ ", "? "):
            name, _, detail = line[2:].partition(": ")
            found[name], last = (line[0], detail), name
        elif line.startswith("    → ") and last:
            found[last] = (found[last][0], found[last][1] + "\n" + line.strip())
    return found


def marks(output: str) -> dict[str, str]:
    return {name: mark for name, (mark, _) in rows(output).items()}


def snapshot(world) -> dict:
    """What the check must not change: the buckets' objects, the vector buckets and index, the jobs."""
    s3, s3v = world.client("s3"), world.client("s3vectors")
    objects = {}
    for bucket in (world.source_bucket, world.result_bucket):
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            objects.update({(bucket, o["Key"]): o["ETag"] for o in page.get("Contents", [])})
    buckets = [b["vectorBucketName"] for b in s3v.list_vector_buckets()["vectorBuckets"]]
    indexes = [i["indexName"] for i in s3v.list_indexes(vectorBucketName=world.vector_bucket)["indexes"]] \
        if world.vector_bucket in buckets else []
    return {"objects": objects, "vector buckets": buckets, "indexes": indexes,
            "vectors": world.index_keys() if world.vector_index in indexes else set(),
            "vectors accepted": world.vectors_accepted(), "jobs": len(world.emulator("/_emulator/jobs")["jobs"])}


def bedrock_calls(world) -> list[str]:
    """The Bedrock and Bedrock Runtime operations called so far, in order."""
    return [call["operation"] for call in world.emulator("/_emulator/auth")["calls"]]


def quick_start(world) -> None:
    """The quick start's run: images, a job, its results loaded into the index."""
    world.put_images([f"{folder}img-{i:03d}.png" for i, folder in
                      zip(range(120), ["", "beach/", "city/night/", "城市/"] * 30)], prefix="2024/")
    assert world.step(1).returncode == 0
    assert world.step(2, "--wait", "--interval", "0.05").returncode == 0
    assert world.step(3).returncode == 0


# --------------------------------------------------------------------------------------------------------------
# Everything ✓, nothing written
# --------------------------------------------------------------------------------------------------------------


def test_every_row_passes_after_the_quick_start_and_the_check_writes_nothing(checked):
    world = checked
    quick_start(world)
    before, calls_before = snapshot(world), len(bedrock_calls(world))
    done = world.step(0)
    assert done.returncode == common.EXIT_OK, done.stdout + done.stderr
    shown = rows(done.stdout)
    assert list(shown) == ROWS, done.stdout
    assert {name: mark for name, (mark, _) in shown.items()} == dict.fromkeys(ROWS, "✓"), done.stdout
    assert "Traceback" not in done.stderr and done.stderr == ""
    assert "✓ The setup is ready for 01_create_job.py" in done.stdout
    assert f"'Records per batch inference job for {MODEL_NAME}' = 50000" in shown["records per job quota"][1]
    assert "index images-" in shown["S3 Vectors page reader"][1] and "(4 keys)" in shown["S3 Vectors page reader"][1]
    assert f"user/{world.caller} may do the" in shown["caller permissions"][1]
    assert snapshot(world) == before
    assert bedrock_calls(world)[calls_before:] == ["GetFoundationModel"]  # no job, no InvokeModel


def test_a_fresh_setup_passes_and_the_vector_store_is_left_to_step_3(checked):
    world = checked
    before = snapshot(world)
    done = world.step(0)
    assert done.returncode == common.EXIT_OK, done.stdout + done.stderr
    shown = rows(done.stdout)
    assert set(marks(done.stdout).values()) == {"✓"}, done.stdout
    assert shown["vector bucket"][1] == f"{world.vector_bucket} will be created by step 3"
    assert shown["vector index"][1] == f"{world.vector_index} will be created by step 3 (256 dimensions, cosine)"
    assert "nothing under it yet" in shown["source bucket"][1]
    assert snapshot(world) == before == {**before, "vector buckets": [b for b in before["vector buckets"]
                                                                      if b != world.vector_bucket]}


def test_invoke_embeds_one_text_and_writes_nothing(checked):
    world = checked
    before, calls_before = snapshot(world), len(bedrock_calls(world))
    done = world.step(0, "--invoke")
    assert done.returncode == common.EXIT_OK, done.stdout + done.stderr
    assert rows(done.stdout)["InvokeModel"] == ("✓", "amazon.nova-2-multimodal-embeddings-v1:0 embedded a text: "
                                                     "256 numbers")
    assert bedrock_calls(world)[calls_before:] == ["GetFoundationModel", "InvokeModel"]
    assert snapshot(world) == before


# --------------------------------------------------------------------------------------------------------------
# Each row broken once
# --------------------------------------------------------------------------------------------------------------


def failing(done, name: str) -> str:
    """The ✗ row `name` with its fix; the run failed with exit 9 and one line on stderr."""
    assert done.returncode == common.EXIT_CHECK_FAILED, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and "check(s) failed" in done.stderr, done.stderr
    mark, detail = rows(done.stdout)[name]
    assert mark == "✗", done.stdout
    return detail


@pytest.mark.parametrize("setting, value, fix", [
    ("MAX_RECORDS_PER_JOB", "60000", "set MAX_RECORDS_PER_JOB=50000"),
    ("MIN_RECORDS_PER_JOB", "50", "set MIN_RECORDS_PER_JOB=100"),
    ("MAX_INPUT_FILE_BYTES", "2000000000", "set MAX_INPUT_FILE_BYTES=1000000000"),
    ("MAX_CONCURRENT_JOBS", "11", "set MAX_CONCURRENT_JOBS=10"),
])
def test_a_quota_setting_the_quota_does_not_allow(checked, setting, value, fix):
    done = checked.step(0, env={setting: value})
    name = next(spec.what for spec in setup_check.QUOTA_SPECS if spec.setting == setting)
    detail = failing(done, name)
    assert f"{setting}={value}" in detail and detail.endswith("→ " + fix)
    assert [n for n, m in marks(done.stdout).items() if m != "✓"] == [name]


def test_a_setting_below_the_quota_passes_and_names_what_the_quota_allows(checked):
    done = checked.step(0, env={"MAX_RECORDS_PER_JOB": "20000"})
    assert done.returncode == 0, done.stdout
    assert rows(done.stdout)["records per job quota"] == (
        "✓", f"MAX_RECORDS_PER_JOB=20000, quota 'Records per batch inference job for {MODEL_NAME}' = 50000 (the "
             "quota allows MAX_RECORDS_PER_JOB=50000)")


def test_the_account_quota_is_read_on_the_last_page_and_a_default_when_no_value_is_applied(checked):
    world = checked
    others = [quota(f"On-demand model inference tokens per minute for Model {i}", i) for i in range(230)]
    mine = batch_quotas(max_records_per_job=20_000, max_job_bytes=2_500_000_000)
    mine[5] = {**mine[5], "applied": False, "Value": 4}  # only AWS's default: ListServiceQuotas leaves it out
    post(world.endpoint("service-quotas") + "/_standin/quotas", {"quotas": others + mine})
    done = world.step(0)
    assert failing(done, "records per job quota").endswith("→ set MAX_RECORDS_PER_JOB=20000")
    assert failing(done, "job size quota").endswith("→ set MAX_JOB_BYTES=2500000000")
    detail = failing(done, "submitted + in-progress jobs quota")
    assert "= 4 (AWS default)" in detail and detail.endswith("→ set MAX_CONCURRENT_JOBS=4")


def test_a_quota_not_found_for_the_model_is_a_question_naming_the_quotas_looked_for(checked):
    world = checked
    post(world.endpoint("service-quotas") + "/_standin/quotas",
         {"quotas": batch_quotas("Nova Pro V1") + batch_quotas(MODEL_NAME)[:2]})
    done = world.step(0)
    assert done.returncode == common.EXIT_OK, done.stdout + done.stderr  # nothing known to be wrong
    mark, detail = rows(done.stdout)["records per job quota"]
    assert mark == "?"
    assert f"no quota named 'Records per batch inference job for {MODEL_NAME}'" in detail
    assert "MAX_RECORDS_PER_JOB=50000 not checked" in detail
    assert marks(done.stdout)["records per input file quota"] == "✓"
    strict = world.step(0, "--strict")
    assert strict.returncode == common.EXIT_CHECK_FAILED
    assert strict.stderr.strip() == "error: 4 check(s) could not tell (--strict)"


def test_quotas_the_caller_may_not_read(checked):
    world = checked
    post(world.endpoint("service-quotas") + "/_standin/config", {"deny": True})
    done = world.step(0)
    assert done.returncode == 0, done.stdout
    mark, detail = rows(done.stdout)["quotas"]
    assert mark == "?" and "needs servicequotas:ListServiceQuotas" in detail
    assert "records per job quota" not in rows(done.stdout)


def test_a_missing_caller_permission(checked, simulator):
    world = checked
    name = use_caller(world, simulator, caller_policy(world, drop="s3vectors:PutVectors"), "partial")
    detail = failing(world.step(0), "caller permissions")
    assert f"user/{name} is not allowed s3vectors:PutVectors on arn:aws:s3vectors:us-east-1:123456789012:bucket/" \
           f"{world.vector_bucket}/index/{world.vector_index}" in detail
    assert detail.endswith(f"→ bash iam/setup_service_role.sh --attach-caller-policy user/{name} (or add the "
                           "statements of bash iam/setup_service_role.sh --user-policy)")
    assert [n for n, m in marks(world.step(0).stdout).items() if m != "✓"] == ["caller permissions"]


def test_a_caller_who_may_not_simulate_gets_a_question_not_an_answer(checked, simulator):
    world = checked
    policy = caller_policy(world, drop="iam:SimulatePrincipalPolicy")
    policy["Statement"][-1]["Action"].remove("iam:SimulatePrincipalPolicy")
    use_caller(world, simulator, policy, "nosimulate")
    done = world.step(0)
    assert done.returncode == common.EXIT_OK, done.stdout + done.stderr
    shown = rows(done.stdout)
    for name in ("service role permissions", "caller permissions"):
        assert shown[name] == ("?", "cannot simulate (needs iam:SimulatePrincipalPolicy): skipped")


def test_an_index_of_another_dimension(checked):
    world = checked
    s3v = world.client("s3vectors")
    s3v.create_vector_bucket(vectorBucketName=world.vector_bucket)
    s3v.create_index(vectorBucketName=world.vector_bucket, indexName=world.vector_index, dataType="float32",
                     dimension=1024, distanceMetric="cosine")
    detail = failing(world.step(0), "vector index")
    assert detail == (f"{world.vector_index} holds 1024-dimension vectors, EMBEDDING_DIMENSION=256\n"
                      "→ set EMBEDDING_DIMENSION=1024, or choose another VECTOR_INDEX")


def test_an_index_of_another_metric(checked):
    world = checked
    s3v = world.client("s3vectors")
    s3v.create_vector_bucket(vectorBucketName=world.vector_bucket)
    s3v.create_index(vectorBucketName=world.vector_bucket, indexName=world.vector_index, dataType="float32",
                     dimension=256, distanceMetric="euclidean")
    assert "measures euclidean distance" in failing(world.step(0), "vector index")


def test_a_missing_source_bucket(checked):
    done = checked.step(0, env={"SOURCE_BUCKET": "no-such-source-bucket"})
    assert failing(done, "source bucket") == "s3://no-such-source-bucket does not exist\n→ create it, or fix " \
                                             "SOURCE_BUCKET"
    assert marks(done.stdout)["S3 listing reader"] == "?"
    assert marks(done.stdout)["result bucket"] == "✓"


def test_a_role_whose_trust_policy_names_another_service(checked):
    world = checked
    iam = world.client("iam")
    trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
                                                      "Action": "sts:AssumeRole"}]}
    iam.update_assume_role_policy(RoleName=world.role_arn.rsplit("/", 1)[-1], PolicyDocument=json.dumps(trust))
    detail = failing(world.step(0), "service role")
    assert "its trust policy does not let bedrock.amazonaws.com assume it" in detail
    assert detail.endswith("→ bash iam/setup_service_role.sh, and set ROLE_ARN to the ARN it prints")


def test_a_role_made_by_the_setup_script_passes_and_one_that_cannot_write_results_fails(checked):
    world = checked
    made = subprocess.run(["bash", str(ROOT / "iam" / "setup_service_role.sh")], cwd=world.cwd,
                          env={**world.env, "ROLE_NAME": f"Scripted-{world.source_bucket}"}, capture_output=True,
                          text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    scripted = f"arn:aws:iam::123456789012:role/Scripted-{world.source_bucket}"
    world.env.update(ROLE_ARN=scripted)
    done = world.step(0)
    assert marks(done.stdout)["service role"] == "✓" and marks(done.stdout)["service role permissions"] == "✓", done.stdout
    iam = world.client("iam")
    name = world.role_arn.rsplit("/", 1)[-1]
    policy = iam.get_role_policy(RoleName=name, PolicyName="batch-access")["PolicyDocument"]
    policy["Statement"][1]["Action"] = ["s3:ListBucket"]
    iam.put_role_policy(RoleName=name, PolicyName="batch-access", PolicyDocument=json.dumps(policy))
    world.env.update(ROLE_ARN=world.role_arn)
    detail = failing(world.step(0), "service role permissions")
    assert f"{world.role_arn} is not allowed s3:PutObject on arn:aws:s3:::{world.result_bucket}/output/" in detail


def test_a_role_that_does_not_exist(checked):
    done = checked.step(0, env={"ROLE_ARN": "arn:aws:iam::123456789012:role/NoSuchRole"})
    assert failing(done, "service role").startswith("no role NoSuchRole in account 123456789012")
    assert rows(done.stdout)["service role permissions"] == ("?", "skipped: the role was not found")


def test_a_model_the_region_does_not_offer(checked):
    done = checked.step(0, env={"MODEL_ID": "amazon.titan-embed-text-v2:0"})
    assert "amazon.titan-embed-text-v2:0 is not offered in us-east-1" in failing(done, "model")


def test_no_credentials(checked):
    world = checked
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        world.env.pop(name)
    detail = failing(world.step(0), "credentials")
    assert detail.startswith("no AWS credentials found")
    assert "(the other checks need credentials: not run)" in world.step(0).stdout


def test_missing_settings_are_named_at_once(world):
    done = world.step(0, env={"VECTOR_INDEX": "", "ROLE_ARN": ""})
    assert done.returncode == common.EXIT_USAGE
    assert "ROLE_ARN is not set; VECTOR_INDEX is not set" in done.stderr and done.stdout == ""


# --------------------------------------------------------------------------------------------------------------
# The fast readers against botocore (a broken reader injected in this process)
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def in_process(checked, monkeypatch):
    """Run the check as main([...]) in this process, in the world's environment and folder."""
    quick_start(checked)
    for name in [n for n in list(__import__("os").environ) if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in checked.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(checked.cwd)
    common._session.cache_clear()  # a session of this world's credentials
    yield checked
    common._session.cache_clear()


def test_the_readers_agree_in_process(in_process, capsys):
    assert import_step(0).main([]) == common.EXIT_OK
    shown = rows(capsys.readouterr().out)
    assert shown["S3 listing reader"][0] == "✓" and shown["S3 Vectors page reader"][0] == "✓"


def test_a_listing_reader_that_drops_a_size(in_process, capsys, monkeypatch):
    original = listing._parse_lean

    def broken(response_dict, customized_response_dict, **kwargs):
        original(response_dict, customized_response_dict, **kwargs)
        for item in customized_response_dict.get("Contents", [])[1:]:
            item["Size"] += 1

    monkeypatch.setattr(listing, "_parse_lean", broken)
    assert import_step(0).main([]) == common.EXIT_CHECK_FAILED
    mark, detail = rows(capsys.readouterr().out)["S3 listing reader"]
    assert mark == "✗"
    # page 1 by folder holds two sub-folders, page 2 the first two images of 2024/
    assert detail.startswith(f"report this: the fast reader (listing.py) disagrees with botocore on page 2 of "
                             f"s3://{in_process.source_bucket}/2024/ by folder: keys, sizes and ETags (item 2)")
    assert "01 --inventory S3_URI" in detail


def test_a_listing_reader_that_loses_the_token(in_process, capsys, monkeypatch):
    original = listing._parse_lean

    def broken(response_dict, customized_response_dict, **kwargs):
        original(response_dict, customized_response_dict, **kwargs)
        customized_response_dict.pop("NextContinuationToken", None)

    monkeypatch.setattr(listing, "_parse_lean", broken)
    assert import_step(0).main([]) == common.EXIT_CHECK_FAILED
    assert "NextContinuationToken: botocore '" in rows(capsys.readouterr().out)["S3 listing reader"][1]


def test_a_vector_page_reader_that_misreads_a_key(in_process, capsys, monkeypatch):
    original = keyset._parse_keys

    def broken(response_dict, customized_response_dict, **kwargs):
        original(response_dict, customized_response_dict, **kwargs)
        if customized_response_dict.get("packedKeys"):
            packed = customized_response_dict["packedKeys"]
            customized_response_dict["packedKeys"] = bytes([packed[0] ^ 0xFF]) + packed[1:]
        for vector in customized_response_dict.get("vectors", [])[:1]:
            vector["key"] = vector["key"][::-1]

    monkeypatch.setattr(keyset, "_parse_keys", broken)
    assert import_step(0).main([]) == common.EXIT_CHECK_FAILED
    mark, detail = rows(capsys.readouterr().out)["S3 Vectors page reader"]
    assert mark == "✗"
    assert detail.startswith(f"report this: the fast reader (keyset.py) disagrees with botocore on page 1 of index "
                             f"{in_process.vector_index}: keys (item 1)")


def test_an_output_key_the_caller_may_use_and_the_role_may_not(world, simulator):
    key = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    world.env["OUTPUT_KMS_KEY_ID"] = key
    post(world.endpoint("service-quotas") + "/_standin/reset", {})
    use_caller(world, simulator, caller_policy(world))  # the generated policy, with its statement for the key
    done = world.step(0)
    assert marks(done.stdout)["caller permissions"] == "✓", done.stdout
    detail = failing(done, "service role permissions")  # the fixture's role has no statement for the key
    assert f"is not allowed kms:GenerateDataKey on {key}, kms:Decrypt on {key}" in detail
