"""Never pay for a mistake: what step 1 checks before anything is uploaded or submitted, run as a user runs it.

Each case was reproduced by a tester on the code before these checks: a run started without the vector index's
settings, a typo in the vector bucket or index, `01 --force` over results not loaded, a service role that does not
exist, and messages that said more (or less) than what happened.
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
from botocore.stub import Stubber

import common
from batch_embeddings import cost, naming, preflight
from tests.conftest import ROOT, STEPS

ACCOUNT = "123456789012"


def source_manifests(world) -> list[str]:
    listed = world.client("s3").list_objects_v2(Bucket=world.source_bucket).get("Contents", [])
    return [o["Key"] for o in listed if o["Key"].endswith(".jsonl")]


def jobs(world) -> list[dict]:
    return world.emulator("/_emulator/jobs")["jobs"]


def assert_nothing_started(world) -> None:
    """Nothing uploaded, no job submitted, no job file, no run folder."""
    assert source_manifests(world) == []
    assert jobs(world) == []
    assert not (world.cwd / "batch_job_info.json").exists()
    assert not (world.cwd / "runs").exists()


def make_index(world, name: str | None = None) -> None:
    s3v = world.client("s3vectors")
    buckets = [b["vectorBucketName"] for b in s3v.list_vector_buckets()["vectorBuckets"]]
    if world.vector_bucket not in buckets:
        s3v.create_vector_bucket(vectorBucketName=world.vector_bucket)
    s3v.create_index(vectorBucketName=world.vector_bucket, indexName=name or world.vector_index, dataType="float32",
                     dimension=256, distanceMetric="cosine")


def one_error(result) -> str:
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stdout + result.stderr
    return result.stderr.strip()


# 1. The settings step 3 needs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("runner", ["01", "daily_run"])
def test_a_run_without_the_vector_settings_is_refused_before_anything_starts(world, runner):
    world.put_images([f"a/img-{i:03d}.png" for i in range(100)], prefix="2024/")
    del world.env["VECTOR_BUCKET"], world.env["VECTOR_INDEX"]
    (world.cwd / ".env").write_text(f"SOURCE_BUCKET={world.source_bucket}\n")  # a .env that lacks them too
    result = world.step(1) if runner == "01" else world.daily()
    assert result.returncode == common.EXIT_USAGE
    line = one_error(result)
    assert "VECTOR_BUCKET is not set" in line and "VECTOR_INDEX is not set" in line
    assert "every image is embedded" not in result.stdout
    assert ">>> daily_run:" not in result.stdout  # daily_run checks before it starts any step
    assert_nothing_started(world)


def test_a_dry_run_without_the_vector_settings_plans_and_says_a_run_needs_them(world):
    world.put_images([f"a/img-{i:03d}.png" for i in range(100)], prefix="2024/")
    result = world.step(1, "--dry-run", env={"VECTOR_BUCKET": "", "VECTOR_INDEX": ""}, new_index=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "VECTOR_BUCKET/VECTOR_INDEX not set: every image is planned (a run needs them" in result.stdout
    assert "Vector index: not set (VECTOR_BUCKET, VECTOR_INDEX: a run needs them)" in result.stdout
    assert_nothing_started(world)


# 2. A typo in the vector bucket or index ---------------------------------------------------------------------------


def test_a_typo_in_the_index_is_named_with_the_indexes_the_bucket_holds_and_refused_unwatched(world):
    world.put_images([f"a/img-{i:03d}.png" for i in range(100)], prefix="2024/")
    make_index(world)
    make_index(world, "zz-other")
    typo = world.vector_index.replace("images", "image")  # one letter off
    problem = (f"index {typo} does not exist in vector bucket {world.vector_bucket} (vector bucket "
               f"{world.vector_bucket} holds indexes: {world.vector_index}, zz-other; did you mean "
               f"{world.vector_index}?)")

    refused = world.step(1, env={"VECTOR_INDEX": typo}, new_index=False)
    assert refused.returncode == common.EXIT_REFUSED
    assert one_error(refused) == (f"error: {problem} — fix VECTOR_BUCKET/VECTOR_INDEX, or pass --new-index to start "
                                  "a new index (step 3 creates it); nothing was uploaded")
    assert f"! {problem}" in refused.stdout
    assert_nothing_started(world)

    day = world.daily(env={"VECTOR_INDEX": typo}, new_index=False)  # cron: the same refusal, nothing started
    assert day.returncode == common.EXIT_REFUSED and problem in one_error(day)
    assert_nothing_started(world)

    dry = world.step(1, "--dry-run", env={"VECTOR_INDEX": typo}, new_index=False)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert f"! {problem}" in dry.stdout and "--new-index starts a new index" in dry.stdout
    assert_nothing_started(world)

    started = world.step(1, "--new-index", env={"VECTOR_INDEX": typo}, new_index=False)
    assert started.returncode == 0, started.stdout + started.stderr
    assert f"--new-index: step 3 creates index {typo} (256 dimensions)" in started.stdout
    assert len(jobs(world)) == 1


def test_a_typo_in_the_vector_bucket_is_named_with_the_buckets_there_are(world):
    world.put_images([f"a/img-{i:03d}.png" for i in range(100)], prefix="2024/")
    make_index(world)
    typo = world.vector_bucket.replace("vectors", "vectrs")
    refused = world.step(1, env={"VECTOR_BUCKET": typo}, new_index=False)
    assert refused.returncode == common.EXIT_REFUSED
    line = one_error(refused)
    assert line.startswith(f"error: vector bucket {typo} does not exist (your account in us-east-1 holds vector "
                           "buckets: ")
    assert f"; did you mean {world.vector_bucket}?) — fix VECTOR_BUCKET/VECTOR_INDEX, or pass --new-index" in line
    assert_nothing_started(world)
    s3v = world.client("s3vectors")
    assert typo not in [b["vectorBucketName"] for b in s3v.list_vector_buckets()["vectorBuckets"]]


def run_on_a_terminal(world, answer: str) -> subprocess.CompletedProcess:
    """Step 1 with a terminal as its stdin (a person at the keyboard), `answer` typed in."""
    main, terminal = pty.openpty()
    try:
        process = subprocess.Popen([sys.executable, str(ROOT / STEPS[1])], cwd=world.cwd, env=world.env,
                                   stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.close(terminal)
        os.write(main, answer.encode())
        out, err = process.communicate(timeout=120)
    finally:
        os.close(main)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def test_on_a_terminal_a_new_index_is_asked_for(world):
    world.put_images([f"a/img-{i:03d}.png" for i in range(100)], prefix="2024/")
    prompt = f"Start a new index {world.vector_index} in vector bucket {world.vector_bucket} (step 3 creates it)?"
    no = run_on_a_terminal(world, "n\n")
    assert no.returncode == common.EXIT_REFUSED, no.stdout + no.stderr
    assert prompt in no.stdout and f"vector bucket {world.vector_bucket} does not exist" in no.stderr
    assert_nothing_started(world)
    yes = run_on_a_terminal(world, "y\n")
    assert yes.returncode == 0, yes.stdout + yes.stderr
    assert prompt in yes.stdout and len(jobs(world)) == 1


def test_an_index_of_the_configured_name_goes_ahead_without_asking(world):
    world.put_images([f"a/img-{i:03d}.png" for i in range(100)], prefix="2024/")
    make_index(world)
    done = world.step(1, new_index=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "does not exist" not in done.stdout and len(jobs(world)) == 1


def lookup_with(answers: list[tuple[str, dict | str]]) -> preflight.IndexLookup:
    """find_index against botocore's Stubber: each (operation, answer or error code) in the order they come."""
    import boto3

    s3v = boto3.client("s3vectors", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(s3v) as stub:
        for operation, answer in answers:
            if isinstance(answer, str):
                stub.add_client_error(operation, answer, "denied" if "Denied" in answer else "not found")
            else:
                stub.add_response(operation, answer)
        found = preflight.find_index(s3v, "my-nova-mme-demo-02", "my-image-index", "us-east-1")
        stub.assert_no_pending_responses()
    return found


def test_a_caller_who_may_not_list_vector_buckets_is_told_so():
    found = lookup_with([("get_index", "NotFoundException"), ("get_vector_bucket", "NotFoundException"),
                         ("list_vector_buckets", "AccessDeniedException")])
    assert found.index is None and not found.denied
    assert found.problem == ("vector bucket my-nova-mme-demo-02 does not exist (your account in us-east-1 cannot be "
                             "listed: s3vectors:ListVectorBuckets is not allowed)")


def test_the_closest_names_come_first_over_every_page():
    bucket = "my-nova-mme-demo-02"

    def indexes(*names):
        return [{"vectorBucketName": bucket, "indexName": n, "indexArn": "arn:x", "creationTime": 0} for n in names]

    found = lookup_with([("get_index", "NotFoundException"),
                         ("get_vector_bucket", {"vectorBucket": {"vectorBucketName": bucket, "vectorBucketArn": "arn:x",
                                                                 "creationTime": 0}}),
                         ("list_indexes", {"indexes": indexes("aa1", "bb2", "cc3"), "nextToken": "t"}),
                         ("list_indexes", {"indexes": indexes("my-image-indx", "dd4", "ee5", "ff6")})])
    assert found.problem.startswith("index my-image-index does not exist in vector bucket my-nova-mme-demo-02 "
                                    "(vector bucket my-nova-mme-demo-02 holds indexes: my-image-indx, ")
    assert found.problem.endswith(" and 2 more; did you mean my-image-indx?)")


def test_an_index_the_caller_may_not_read_stops_the_run_it_cannot_be_started_either():
    found = lookup_with([("get_index", "AccessDeniedException"), ("get_vector_bucket", "AccessDeniedException")])
    assert found.denied and found.index is None
    assert "cannot be read (AccessDeniedException" in found.problem


# 3. --force over results not loaded --------------------------------------------------------------------------------


def test_force_never_discards_a_finished_runs_results(world):
    world.put_images([f"a/img-{i:03d}.png" for i in range(100)], prefix="2024/")
    assert world.step(1).returncode == 0
    assert world.step(2, "--wait", "--interval", "0.05", "--timeout", "60").returncode == 0
    before = world.job_info()
    world.put_images([f"b/img-{i:03d}.png" for i in range(100)], prefix="2024/")

    forced = world.step(1, "--force")
    assert forced.returncode == common.EXIT_REFUSED
    assert one_error(forced) == (
        f"error: batch_job_info.json holds results not loaded yet ({before['jobs'][0]['job_name']} ended Completed) "
        "— --force does not discard them: run 03_load_result_to_s3_vector_bucket.py first, or "
        "04_remove_completed_task.py --force to discard them on purpose")
    assert "Replacing" not in forced.stdout
    assert world.job_info() == before and len(jobs(world)) == 1  # nothing planned again, nothing paid twice
    assert manifests_kept(before)

    loaded = world.step(3)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert len(world.index_keys()) == 100


def manifests_kept(info: dict) -> bool:
    return all(Path(m["local_path"]).exists() for job in info["jobs"] for m in job["manifests"])


def test_force_still_replaces_a_stuck_run_and_says_its_jobs_keep_running(world):
    world.put_images([f"a/img-{i:03d}.png" for i in range(100)], prefix="2024/")
    world.emulator("/_emulator/config", {"hold_scheduled": True})
    assert world.step(1).returncode == 0
    stuck = world.job_info()["jobs"][0]
    world.put_images([f"b/img-{i:03d}.png" for i in range(100)], prefix="2024/")
    forced = world.step(1, "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert (f"! {stuck['job_name']} keeps running: this tool will not load what it writes to "
            f"s3://{world.result_bucket}/output/{stuck['job_id']}/") in forced.stdout
    assert f"--job-identifier {stuck['job_arn']}" in forced.stdout
    assert "Left out 100 image(s): in a job of the replaced run still running" in forced.stdout


# 4. A service role that does not exist -----------------------------------------------------------------------------


def test_a_role_that_does_not_exist_is_refused_before_the_upload(world):
    world.put_images([f"a/img-{i:03d}.png" for i in range(100)], prefix="2024/")
    wrong = f"arn:aws:iam::{ACCOUNT}:role/NoSuchBedrockRole"
    refused = world.step(1, env={"ROLE_ARN": wrong})
    assert refused.returncode == common.EXIT_USAGE
    assert one_error(refused) == (f"error: ROLE_ARN {wrong}: account {ACCOUNT} has no role NoSuchBedrockRole — fix "
                                  "ROLE_ARN (bash iam/setup_service_role.sh creates the role and prints its ARN); "
                                  "nothing was uploaded")
    assert_nothing_started(world)


def test_a_role_bedrock_refuses_leaves_nothing_uploaded_and_the_fixed_setting_is_used_next_time(world):
    """A role GetRole cannot see (another account's): Bedrock refuses the submit. The manifest goes from S3 and the
    job stays queued; the next run submits it with the ROLE_ARN set then, without --force."""
    world.put_images([f"a/img-{i:03d}.png" for i in range(100)], prefix="2024/")
    wrong = "arn:aws:iam::999999999999:role/NoSuchBedrockRole"
    refused = world.step(1, env={"ROLE_ARN": wrong})
    assert refused.returncode == common.EXIT_USAGE, refused.stdout + refused.stderr
    line = one_error(refused)
    assert line.startswith(f"error: Bedrock refused the service role: ValidationException: The provided role {wrong} "
                           "does not exist")
    assert "fix ROLE_ARN" in line and "its manifest was removed from S3" in line
    assert source_manifests(world) == [] and jobs(world) == []
    job = world.job_info()["jobs"][0]
    assert not job.get("uploaded") and not job.get("job_arn")

    again = world.step(1)  # ROLE_ARN fixed
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"Job {job['job_name']} is submitted with ROLE_ARN {world.role_arn} (planned with {wrong})" in again.stdout
    assert [j["roleArn"] for j in jobs(world)] == [world.role_arn]
    assert world.step(2, "--wait", "--interval", "0.05", "--timeout", "60").returncode == 0
    assert world.step(3).returncode == 0
    assert len(world.index_keys()) == 100


def test_a_caller_who_may_not_call_get_role_is_not_stopped_by_the_check():
    import boto3

    iam = boto3.client("iam", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(iam) as stub:
        stub.add_client_error("get_role", "AccessDenied", "not authorized to perform: iam:GetRole")
        preflight.check_role(iam, f"arn:aws:iam::{ACCOUNT}:role/BedrockBatchInferenceRole", ACCOUNT)
        stub.add_client_error("get_role", "NoSuchEntity", "The role cannot be found.")
        with pytest.raises(common.StepError) as refused:
            preflight.check_role(iam, f"arn:aws:iam::{ACCOUNT}:role/path/Missing", ACCOUNT)
        stub.assert_no_pending_responses()
    assert refused.value.exit_code == common.EXIT_USAGE and "has no role Missing" in str(refused.value)


# 5. Messages that say what happened --------------------------------------------------------------------------------


def test_02_names_a_jobs_error_records_instead_of_success(world):
    world.put_images([f"a/img-{i:03d}.png" for i in range(100)], prefix="2024/")
    world.emulator("/_emulator/config", {"fail_keys_regex": r"img-00[0-2]\.png$"})
    assert world.step(1).returncode == 0
    done = world.step(2, "--wait", "--interval", "0.05", "--timeout", "60")
    assert done.returncode == 0, done.stdout + done.stderr
    name = world.job_info()["jobs"][0]["job_name"]
    assert f"! Job {name} completed with 3 error records — 03 loads the rest and lists them" in done.stdout
    assert "successfully" not in done.stdout


def test_02_on_a_run_that_is_all_on_demand_says_so(world):
    world.put_images([f"a/img-{i:03d}.png" for i in range(5)], prefix="2024/")
    assert world.step(1).returncode == 0
    done = world.step(2, "--wait", "--interval", "0.05", "--timeout", "60")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No batch job in this run: its images go on demand — step 3 embeds and loads them" in done.stdout
    assert "successfully" not in done.stdout


def test_retry_failed_names_every_file_it_reads(world):
    uris = world.put_images([f"a/img-{i:03d}.png" for i in range(3)], prefix="2024/")
    account = world.cwd / "runs" / "20261201-000000" / "not_loaded.jsonl"
    account.parent.mkdir(parents=True)
    account.write_text(json.dumps({"source_uri": uris[0], "status": "missing"}) + "\n")
    rejected = world.cwd / "failed_permanently.jsonl"
    rejected.write_text(json.dumps({"source_uri": uris[1], "key": naming.vector_key(uris[1]), "etag": "x", "size": 1,
                                    "failed_on": "2026-12-01"}) + "\n")
    shown = world.step(1, "--retry-failed", "--dry-run")
    assert f"Retrying the 2 image(s) the last runs did not load (from {account} and {rejected})" in shown.stdout
    rejected.unlink()
    shown = world.step(1, "--retry-failed", "--dry-run")
    assert f"Retrying the 1 image(s) the last runs did not load (from {account})" in shown.stdout


def test_a_cost_below_a_tenth_of_a_cent_is_printed_with_its_digits(world):
    world.put_images([f"a/img-{i:03d}.png" for i in range(100)], prefix="2024/")
    shown = world.step(1, "--dry-run", env={"S3VECTORS_PUT_PRICE_PER_GB_USD": "0.0001"})
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert not re.search(r"\$0\.(?!\d)", shown.stdout), shown.stdout
    put = next(line for line in shown.stdout.splitlines() if "S3 Vectors PUT" in line)
    assert re.search(r"= \$0\.0000000\d+$", put), put
    assert [cost.usd(a) for a in (0.0036, 0.00003, 4.2e-7, 0.0099999)] == ["$0.0036", "$0.00003", "$0.00000042",
                                                                          "$0.01"]
