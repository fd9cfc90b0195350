"""A job whose submit may have reached Bedrock is looked for before it is submitted again; a job of the same name
that Bedrock shows without a token is ours only when both its input and its output folder are ours. Another run's
job is never taken for ours (its results would be loaded as this run's). Submitting: what lands in S3, what Bedrock is
asked, what is printed and saved, for a job that may start, one that waits, and each way Bedrock refuses a submit."""

from __future__ import annotations

import copy
import types
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError
from botocore.stub import ANY, Stubber

import common
from batch_embeddings import jobs

OWNER = "123456789012"
NAME = "nova-mme-embedding-20261201-100000-01"
INPUT, OUTPUT = "s3://src/2024/", "s3://out/output/"


def summary(arn_id: str, input_uri: str, output_uri: str, token: str | None = None) -> dict:
    found = {"jobArn": f"arn:aws:bedrock:us-east-1:{OWNER}:model-invocation-job/{arn_id}", "jobName": NAME,
             "modelId": "amazon.nova-2-multimodal-embeddings-v1:0", "roleArn": f"arn:aws:iam::{OWNER}:role/R",
             "submitTime": "2026-12-01T10:00:00Z",
             "inputDataConfig": {"s3InputDataConfig": {"s3Uri": input_uri}},
             "outputDataConfig": {"s3OutputDataConfig": {"s3Uri": output_uri}}}
    if token is not None:
        found["clientRequestToken"] = token
    return found


def uploaded_job() -> dict:
    """A job 01 uploaded and whose submit's answer was lost: it may or may not be in Bedrock."""
    return {"job_name": NAME, "input_folder": "2024/", "input_s3_uri": INPUT, "output_s3_uri": OUTPUT,
            "model_id": "amazon.nova-2-multimodal-embeddings-v1:0", "role_arn": f"arn:aws:iam::{OWNER}:role/R",
            "embedding_dimension": 256, "record_count": 100, "manifests": [], "client_request_token": "t" * 64,
            "uploaded": True}


def submit(listed: list[dict], created: str | None) -> tuple[dict, list[str]]:
    """02's submit of the uploaded job against a Bedrock that lists `listed` under its name; what the job file
    holds after it and every save of it."""
    bedrock = boto3.client("bedrock", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    info = {"account_id": OWNER, "source_bucket": "src", "jobs": [uploaded_job()]}
    saved = []
    config = types.SimpleNamespace(expected_bucket_owner=None, role_arn=None)
    with Stubber(bedrock) as stub:
        stub.add_response("list_model_invocation_jobs", {"invocationJobSummaries": listed},
                          {"nameContains": NAME, "maxResults": jobs.LIST_PAGE_SIZE})
        if created:
            stub.add_response("create_model_invocation_job", {"jobArn": created},
                              {"jobName": NAME, "roleArn": ANY, "clientRequestToken": "t" * 64, "modelId": ANY,
                               "inputDataConfig": ANY, "outputDataConfig": ANY})
        submitted = jobs.submit_ready(None, bedrock, info, config, lambda i: saved.append(repr(i)), 1)
        stub.assert_no_pending_responses()
    assert submitted == info["jobs"]
    return info["jobs"][0], saved


NEW = f"arn:aws:bedrock:us-east-1:{OWNER}:model-invocation-job/newnewnewnew"


@pytest.mark.parametrize("other", [
    summary("aaaaaaaaaaaa", INPUT, "s3://out/other-run/"),  # the same input folder, another run's output
    summary("bbbbbbbbbbbb", "s3://src/2023/", OUTPUT),  # the same output, another input folder
    summary("cccccccccccc", INPUT, OUTPUT, token="someone-else"),  # the same folders, another submit's token
])
def test_another_runs_job_of_the_same_name_is_not_taken_for_ours(other, capsys):
    job, saved = submit([other], created=NEW)
    assert job["job_arn"] == NEW and job["status"] == "Submitted"
    assert other["jobArn"] not in capsys.readouterr().out and other["jobArn"] not in "".join(saved)


@pytest.mark.parametrize("ours", [summary("dddddddddddd", INPUT, OUTPUT),
                                  summary("eeeeeeeeeeee", "s3://x/", "s3://y/", token="t" * 64)])
def test_our_earlier_submit_is_found_and_not_submitted_again(ours, capsys):
    job, _ = submit([summary("aaaaaaaaaaaa", INPUT, "s3://out/other-run/"), ours], created=None)
    assert job["job_arn"] == ours["jobArn"]
    assert f"Job {NAME} was already submitted (the answer was lost): {ours['jobArn']}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# Submitting queued jobs: what is uploaded, what Bedrock is asked, what is printed and saved
# ---------------------------------------------------------------------------------------------------------------

ROLE = f"arn:aws:iam::{OWNER}:role/BedrockBatchRole"
MODEL = "amazon.nova-2-multimodal-embeddings-v1:0"


class MemoryS3:
    """S3 for the job's manifests: objects by (bucket, key) with their upload settings; a request that names
    another expected bucket owner is refused, as S3 refuses it."""

    def __init__(self, objects: dict | None = None):
        self.objects: dict[tuple[str, str], tuple[bytes, dict]] = dict(objects or {})

    def _owner(self, owner):
        if owner != OWNER:
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "S3")

    def list_objects_v2(self, *, Bucket, Prefix, MaxKeys, ExpectedBucketOwner):
        self._owner(ExpectedBucketOwner)
        keys = sorted(k for b, k in self.objects if b == Bucket and k.startswith(Prefix))[:MaxKeys]
        return {"Contents": [{"Key": k} for k in keys]} if keys else {}

    def upload_file(self, Filename, Bucket, Key, ExtraArgs):
        self._owner(ExtraArgs["ExpectedBucketOwner"])
        with open(Filename, "rb") as fh:
            self.objects[(Bucket, Key)] = (fh.read(), {k: v for k, v in ExtraArgs.items()
                                                       if k != "ExpectedBucketOwner"})

    def delete_object(self, *, Bucket, Key, ExpectedBucketOwner):
        self._owner(ExpectedBucketOwner)
        self.objects.pop((Bucket, Key), None)


def queued_job(tmp_path, n: int, folder: str, files: int = 1, **fields) -> dict:
    name = f"nova-mme-embedding-20261201-100000-{n:02d}"
    manifests = []
    for i in range(files):
        path = tmp_path / f"{name}-{i}.jsonl"
        path.write_bytes(b'{"recordId": "%d"}\n' % i)
        manifests.append({"local_path": str(path), "s3_key": f"{folder}batch_input_20261201-100000-{n:02d}-{i}.jsonl"})
    return {"job_name": name, "input_folder": folder, "input_s3_uri": f"s3://src/{folder}",
            "output_s3_uri": f"s3://out/output/{name}/", "model_id": MODEL, "role_arn": ROLE, "record_count": 100 + n,
            "manifests": manifests, "client_request_token": f"token{n}", **fields}


def arn(n: int) -> str:
    return f"arn:aws:bedrock:us-east-1:{OWNER}:model-invocation-job/job{n:08d}"


def expect_create(stub, job: dict, n: int, role: str = ROLE, kms: str | None = None) -> None:
    output = {"s3Uri": job["output_s3_uri"], "s3BucketOwner": OWNER, **({"s3EncryptionKeyId": kms} if kms else {})}
    stub.add_response("create_model_invocation_job", {"jobArn": arn(n)}, {
        "jobName": job["job_name"], "roleArn": role, "clientRequestToken": job["client_request_token"],
        "modelId": MODEL, "inputDataConfig": {"s3InputDataConfig": {"s3Uri": job["input_s3_uri"],
                                                                    "s3InputFormat": "JSONL", "s3BucketOwner": OWNER}},
        "outputDataConfig": {"s3OutputDataConfig": output}})


def expect_refusal(stub, code: str, message: str) -> None:
    stub.add_client_error("create_model_invocation_job", service_error_code=code, service_message=message,
                          http_status_code=400)


def submitting(info: dict, s3: MemoryS3, expect, *, max_concurrent: int = 10, role_arn: str | None = None,
               owner: str | None = None):
    """submit_ready against a stubbed Bedrock that `expect(stub)` prepares; returns (submitted, saves, error)."""
    bedrock = boto3.client("bedrock", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    config = types.SimpleNamespace(expected_bucket_owner=owner, role_arn=role_arn)
    saves: list[dict] = []
    with Stubber(bedrock) as stub:
        expect(stub)
        try:
            submitted, failure = jobs.submit_ready(s3, bedrock, info, config, lambda i: saves.append(
                copy.deepcopy(i)), max_concurrent), None
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            submitted, failure = None, exc
        stub.assert_no_pending_responses()
    return submitted, saves, failure


def info_of(*job_list) -> dict:
    return {"account_id": OWNER, "source_bucket": "src", "jobs": list(job_list)}


def test_queued_jobs_are_uploaded_and_submitted_unless_their_folders_nest(tmp_path, capsys):
    top, inner, sibling = (queued_job(tmp_path, 1, "2024/", files=2), queued_job(tmp_path, 2, "2024/a/"),
                           queued_job(tmp_path, 3, "2025/"))
    info, s3 = info_of(top, inner, sibling), MemoryS3()

    def expect(stub):
        expect_create(stub, top, 1)
        expect_create(stub, sibling, 3)

    submitted, saves, failure = submitting(info, s3, expect)
    assert failure is None and submitted == [top, sibling]
    assert (top["job_arn"], top["job_id"], top["status"], top["uploaded"]) == (arn(1), "job00000001", "Submitted",
                                                                                True)
    assert "uploaded" not in inner and "job_arn" not in inner  # waits for the job above it
    assert sorted(s3.objects) == sorted(("src", m["s3_key"]) for job in (top, sibling) for m in job["manifests"])
    for job in (top, sibling):
        for m in job["manifests"]:
            assert s3.objects[("src", m["s3_key"])] == (Path(m["local_path"]).read_bytes(),
                                                        {"ContentType": "application/jsonl"})
    out = capsys.readouterr().out
    first = top["manifests"][0]["s3_key"]
    assert (f"Uploading JSONL to s3://src/{first}\n✓ Uploaded to s3://src/{first}\n") in out
    assert (f"Creating batch inference job: {top['job_name']} (101 records, input s3://src/2024/)\n") in out
    # Saved once uploaded (before the submit: a lost answer is looked for next time), and once submitted.
    assert [(j["jobs"][0].get("uploaded"), j["jobs"][0].get("job_arn")) for j in saves[:2]] == [(True, None),
                                                                                              (True, arn(1))]
    assert saves[-1] == info


def test_a_job_waits_while_as_many_jobs_run_as_may_run_at_once(tmp_path):
    running = queued_job(tmp_path, 1, "2023/", uploaded=True, job_arn=arn(1), status="InProgress")
    ended = queued_job(tmp_path, 2, "2024/", uploaded=True, job_arn=arn(2), status="Completed")
    waiting = queued_job(tmp_path, 3, "2025/")
    submitted, saves, failure = submitting(info_of(running, ended, waiting), MemoryS3(), lambda stub: None,
                                           max_concurrent=1)
    assert failure is None and submitted == [] and saves == [] and "uploaded" not in waiting
    # One slot more: it starts, beside the running job (an ended job holds no slot and no folder).
    nested = queued_job(tmp_path, 4, "2024/b/")
    submitted, _, failure = submitting(info_of(running, ended, waiting, nested), MemoryS3(),
                                       lambda stub: (expect_create(stub, waiting, 3), expect_create(stub, nested, 4)),
                                       max_concurrent=3)
    assert failure is None and submitted == [waiting, nested]


def test_a_manifest_already_in_s3_is_not_uploaded_again(tmp_path, capsys):
    job = queued_job(tmp_path, 1, "2024/", files=2)
    there = ("src", job["manifests"][0]["s3_key"])
    s3 = MemoryS3({there: (b"uploaded by an earlier try", {})})
    submitted, _, failure = submitting(info_of(job), s3, lambda stub: expect_create(stub, job, 1))
    assert failure is None and submitted == [job]
    assert s3.objects[there] == (b"uploaded by an earlier try", {})
    out = capsys.readouterr().out
    assert f"Uploading JSONL to s3://src/{there[1]}" not in out
    assert f"Uploading JSONL to s3://src/{job['manifests'][1]['s3_key']}" in out


def test_manifests_go_to_the_expected_bucket_owner(tmp_path):
    job = queued_job(tmp_path, 1, "2024/")
    submitted, _, failure = submitting({**info_of(job), "account_id": "999999999999"}, MemoryS3(),
                                       lambda stub: expect_create(stub, job, 1), owner=OWNER)
    assert failure is None and submitted == [job]


def test_a_manifest_gone_from_disk_says_how_to_start_again(tmp_path):
    job = queued_job(tmp_path, 1, "2024/")
    Path(job["manifests"][0]["local_path"]).unlink()
    submitted, _, failure = submitting(info_of(job), MemoryS3(), lambda stub: None)
    assert isinstance(failure, common.StepError) and failure.exit_code == common.EXIT_ERROR
    assert str(failure) == (f"manifest {job['manifests'][0]['local_path']} is gone — run "
                            "04_remove_completed_task.py --force and 01_create_job.py again")


def test_a_queued_job_is_submitted_with_the_role_set_now(tmp_path, capsys):
    job = queued_job(tmp_path, 1, "2024/")
    new = f"arn:aws:iam::{OWNER}:role/Fixed"
    submitted, _, failure = submitting(info_of(job), MemoryS3(), lambda stub: expect_create(stub, job, 1, role=new),
                                       role_arn=new)
    assert failure is None and job["role_arn"] == new
    assert f"Job {job['job_name']} is submitted with ROLE_ARN {new} (planned with {ROLE})\n" in capsys.readouterr().out
    same = queued_job(tmp_path, 2, "2025/")
    submitting(info_of(same), MemoryS3(), lambda stub: expect_create(stub, same, 2), role_arn=ROLE)
    assert "is submitted with ROLE_ARN" not in capsys.readouterr().out


def test_a_kms_key_encrypts_the_jobs_output(tmp_path):
    job = queued_job(tmp_path, 1, "2024/", output_kms_key_id="arn:aws:kms:us-east-1:111122223333:key/k")
    _, _, failure = submitting(info_of(job), MemoryS3(),
                               lambda stub: expect_create(stub, job, 1, kms="arn:aws:kms:us-east-1:111122223333:key/k"))
    assert failure is None


@pytest.mark.parametrize(("code", "message"), [
    ("ValidationException", f"The provided role {ROLE} cannot be assumed by Bedrock"),
    ("AccessDeniedException", "User is not authorized to perform: iam:PassRole on resource: role/BedrockBatchRole"),
    ("ValidationException", "Bedrock could not assume role/BedrockBatchRole"),
    ("AccessDeniedException", "not authorized to perform iam:passrole"),
])
def test_a_refused_service_role_removes_the_manifests_and_keeps_the_job_queued(tmp_path, capsys, code, message):
    job, other = queued_job(tmp_path, 1, "2024/", files=2), queued_job(tmp_path, 2, "2025/")
    s3 = MemoryS3({("src", "2023/someone-elses.jsonl"): (b"x", {})})
    submitted, saves, failure = submitting(info_of(job, other), s3, lambda stub: expect_refusal(stub, code, message))
    assert isinstance(failure, common.StepError) and failure.exit_code == common.EXIT_USAGE
    exc = ClientError({"Error": {"Code": code, "Message": message}}, "CreateModelInvocationJob")
    assert str(failure) == (
        f"Bedrock refused the service role: {common.describe_aws_error(exc)} — fix ROLE_ARN (or the caller's "
        "iam:PassRole on it: bash iam/setup_service_role.sh --user-policy) and run 01_create_job.py again: the job "
        "is submitted with the ROLE_ARN set then; its manifest was removed from S3")
    assert message in str(failure)
    assert list(s3.objects) == [("src", "2023/someone-elses.jsonl")]  # nothing of the job stays in S3
    assert job["uploaded"] is False and "job_arn" not in job and saves[-1]["jobs"][0]["uploaded"] is False
    assert "uploaded" not in other  # not tried
    out = capsys.readouterr().out
    for m in job["manifests"]:
        assert f"Removed s3://src/{m['s3_key']}: the job was not submitted\n" in out


@pytest.mark.parametrize("code", ["ValidationException", "AccessDeniedException"])
def test_a_refused_submit_says_to_fix_the_cause_and_plan_again(tmp_path, code):
    job = queued_job(tmp_path, 1, "2024/")
    s3 = MemoryS3()
    _, _, failure = submitting(info_of(job), s3, lambda stub: expect_refusal(stub, code, "The model is not ready"))
    exc = ClientError({"Error": {"Code": code, "Message": "The model is not ready"}}, "CreateModelInvocationJob")
    assert isinstance(failure, common.StepError) and failure.exit_code == common.EXIT_ERROR
    assert str(failure) == (f"{common.describe_aws_error(exc)} — fix the cause, then 01_create_job.py --force plans "
                            "the run again")
    assert len(s3.objects) == 1 and job["uploaded"] is True  # uploaded: found there next time


@pytest.mark.parametrize("code", ["ServiceQuotaExceededException", "ThrottlingException"])
def test_a_full_quota_leaves_the_job_and_those_after_it_queued(tmp_path, capsys, code):
    first, second = queued_job(tmp_path, 1, "2024/"), queued_job(tmp_path, 2, "2025/")
    submitted, _, failure = submitting(info_of(first, second), MemoryS3(),
                                       lambda stub: expect_refusal(stub, code, "Too many jobs"))
    assert failure is None and submitted == []
    assert first["uploaded"] is True and "job_arn" not in first and "status" not in first
    assert "uploaded" not in second
    exc = ClientError({"Error": {"Code": code, "Message": "Too many jobs"}}, "CreateModelInvocationJob")
    assert f"Job {first['job_name']} stays queued: {common.describe_aws_error(exc)}\n" in capsys.readouterr().out


def test_another_error_of_the_submit_is_raised(tmp_path):
    job = queued_job(tmp_path, 1, "2024/")
    _, _, failure = submitting(info_of(job), MemoryS3(),
                               lambda stub: expect_refusal(stub, "InternalServerException", "Try again"))
    assert isinstance(failure, ClientError) and common.error_code(failure) == "InternalServerException"


@pytest.mark.parametrize(("code", "message"), [("ConflictException", "A job with this name exists"),
                                               ("ValidationException", "clientRequestToken token1 was used"),
                                               ("ValidationException", "nova-mme-embedding-20261201-100000-01 taken")])
def test_a_submit_refused_as_a_repeat_takes_the_earlier_job(tmp_path, capsys, code, message):
    job = queued_job(tmp_path, 1, "2024/")
    earlier = summary("zzzzzzzzzzzz", job["input_s3_uri"], job["output_s3_uri"], token="token1")

    def expect(stub):
        expect_refusal(stub, code, message)
        stub.add_response("list_model_invocation_jobs", {"invocationJobSummaries": [earlier]},
                          {"nameContains": NAME, "maxResults": jobs.LIST_PAGE_SIZE})

    submitted, _, failure = submitting(info_of(job), MemoryS3(), expect)
    assert failure is None and submitted == [job]
    assert (job["job_arn"], job["job_id"], job["status"]) == (earlier["jobArn"], "zzzzzzzzzzzz", "Submitted")
    assert f"Job {NAME} was already submitted (the answer was lost): {earlier['jobArn']}\n" in capsys.readouterr().out


def test_a_repeat_refused_when_no_earlier_job_is_found_is_an_error(tmp_path):
    job = queued_job(tmp_path, 1, "2024/")

    def expect(stub):
        expect_refusal(stub, "ConflictException", "A job with this name exists")
        stub.add_response("list_model_invocation_jobs", {"invocationJobSummaries": []},
                          {"nameContains": NAME, "maxResults": jobs.LIST_PAGE_SIZE})

    _, _, failure = submitting(info_of(job), MemoryS3(), expect)
    assert isinstance(failure, ClientError) and common.error_code(failure) == "ConflictException"


# ---------------------------------------------------------------------------------------------------------------
# A run's state: which jobs keep it from being finished
# ---------------------------------------------------------------------------------------------------------------


def test_refresh_asks_only_about_jobs_that_had_not_ended_and_sorts_the_run(capsys):
    loaded = {"finished": True}
    run = [{"job_name": "queued"},
           {"job_name": "running", "job_arn": arn(1), "status": "Submitted"},
           {"job_name": "ends now", "job_arn": arn(2), "status": "InProgress"},
           {"job_name": "failed", "job_arn": arn(3), "status": "Failed"},
           {"job_name": "completed", "job_arn": arn(4), "status": "Completed"},
           {"job_name": "stopped", "job_arn": arn(5), "status": "Stopped", "load": {"finished": False}},
           {"job_name": "loaded", "job_arn": arn(6), "status": "PartiallyCompleted", "load": loaded},
           {"job_name": "part", "on_demand": True},
           {"job_name": "part loaded", "on_demand": True, "load": loaded}]
    bedrock = boto3.client("bedrock", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(bedrock) as stub:
        stub.add_response("get_model_invocation_job", {**_job_answer(arn(1)), "status": "Scheduled"},
                          {"jobIdentifier": arn(1)})
        stub.add_response("get_model_invocation_job", {**_job_answer(arn(2)), "status": "Completed"},
                          {"jobIdentifier": arn(2)})
        state = jobs.refresh(bedrock, {"jobs": run})
        stub.assert_no_pending_responses()
    names = lambda found: [j["job_name"] for j in found]  # noqa: E731
    assert names(state.queued) == ["queued"] and names(state.running) == ["running"]
    assert names(state.unloaded) == ["ends now", "completed", "stopped", "part"]
    assert [j.get("status") for j in run[:3]] == [None, "Scheduled", "Completed"]
    assert jobs.refresh(None, {"jobs": run[3:]}).unloaded  # nothing to ask: no client needed


def _job_answer(job_arn: str) -> dict:
    return {"jobArn": job_arn, "jobName": "j", "modelId": MODEL, "roleArn": ROLE, "submitTime": "2026-12-01T10:00:00Z",
            "inputDataConfig": {"s3InputDataConfig": {"s3Uri": "s3://src/2024/"}},
            "outputDataConfig": {"s3OutputDataConfig": {"s3Uri": "s3://out/output/"}}}


PATH_ROLE = f"arn:aws:iam::{OWNER}:role/service-role/Batch"


@pytest.mark.parametrize("role, code, message, refused", [
    (ROLE, "ValidationException", f"Role {ROLE} cannot be assumed by Bedrock", True),
    (ROLE, "ValidationException", "The role role/BedrockBatchRole does not trust bedrock.amazonaws.com", True),
    (PATH_ROLE, "ValidationException", "The role role/Batch does not trust bedrock.amazonaws.com", True),
    (ROLE, "AccessDeniedException", "User is not authorized to perform: iam:PassRole on resource", True),
    (ROLE, "ValidationException", "Input file is not a valid JSONL", False),
    (ROLE, "ThrottlingException", f"Rate exceeded for {ROLE}", False),
])
def test_a_submit_refused_for_the_role_is_told_from_other_refusals(role, code, message, refused):
    exc = ClientError({"Error": {"Code": code, "Message": message}}, "CreateModelInvocationJob")
    assert jobs.role_refused(exc, role) is refused
