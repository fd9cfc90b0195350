"""A job whose submit may have reached Bedrock is looked for before it is submitted again; a job of the same name
that Bedrock shows without a token is ours only when both its input and its output folder are ours. Another run's
job is never taken for ours (its results would be loaded as this run's)."""

from __future__ import annotations

import types

import boto3
import pytest
from botocore.stub import ANY, Stubber

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
