"""S3 answers a missing key with 403, not 404, to a caller without s3:ListBucket on it.

The caller policy `iam/setup_service_role.sh --user-policy` prints limits s3:ListBucket with an s3:prefix condition,
and for such a caller S3 answers GetObject of a key that is not there with 403 AccessDenied. Every "is it there
yet" question the steps ask must work in both worlds: the S3 stand-in plays either answer
(`stack.s3.missing_key`, tests/standins/s3.py).
"""

from __future__ import annotations

import pytest

import common
from tests.test_aws_assumptions import wait_for

OWNER = "123456789012"


@pytest.mark.parametrize("missing_key", [404, 403])
def test_a_job_that_left_no_manifest_is_watched_and_accounted_in_both_worlds(world, missing_key):
    """02 reads manifest.json.out while the job runs (it is not there yet) and 03 reads it after a job that left
    none: neither stops on the 403 a least-privilege caller gets."""
    world.stack.s3.missing_key = missing_key
    uris = world.put_images([f"img-{i:03d}.png" for i in range(120)], prefix="2024/")
    world.emulator("/_emulator/config", {"hold_after_records": 20, "stopped_output": "none"})
    assert world.step(1).returncode == 0
    job = world.job_info()["jobs"][0]
    s3 = world.client("s3")
    missing = f"output/{job['job_id']}/manifest.json.out"
    with pytest.raises(s3.exceptions.ClientError) as answer:
        s3.get_object(Bucket=world.result_bucket, Key=missing)
    assert answer.value.response["Error"]["Code"] == {404: "NoSuchKey", 403: "AccessDenied"}[missing_key]

    bedrock = world.client("bedrock")
    wait_for(lambda: bedrock.get_model_invocation_job(jobIdentifier=job["job_arn"]).get("processedRecordCount", 0)
             >= 20, "20 records processed")
    shown = world.step(2, "--no-wait")
    assert shown.returncode == common.EXIT_RUNNING and "Traceback" not in shown.stderr, shown.stdout + shown.stderr
    assert ">>> STATUS: InProgress <<<" in shown.stdout and "Processed Records: 20" in shown.stdout

    bedrock.stop_model_invocation_job(jobIdentifier=job["job_arn"])
    assert world.step(2, "--wait", "--interval", "0.05", "--timeout", "60").returncode == 5
    loaded = world.step(3)
    assert loaded.returncode == 4 and "Traceback" not in loaded.stderr, loaded.stdout + loaded.stderr
    assert "Images loaded: 0, failed: 0, missing: 120" in loaded.stdout
    assert {a["source_uri"] for a in world.account()} == set(uris)


def test_a_denied_object_that_is_there_is_still_an_error(world):
    """A 403 on a key that exists is a real refusal: read_if_present does not take it for "not there"."""
    from botocore.exceptions import ClientError

    s3 = world.client("s3")
    s3.put_object(Bucket=world.result_bucket, Key="output/x/manifest.json.out", Body=b"{}")
    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "GetObject")

    class Denying:
        def __init__(self, real):
            self.real = real

        def get_object(self, **_):
            raise denied

        def list_objects_v2(self, **params):
            return self.real.list_objects_v2(**params)

    with pytest.raises(ClientError):
        common.read_if_present(Denying(s3), world.result_bucket, "output/x/manifest.json.out", OWNER)
    assert common.read_if_present(Denying(s3), world.result_bucket, "output/x/other.json.out", OWNER) is None
    assert common.read_if_present(s3, world.result_bucket, "output/x/manifest.json.out", OWNER) == b"{}"


def test_the_stand_in_answers_a_missing_key_as_s3_does_to_each_caller(world):
    """The steps (the generated caller policy) get 403; the jobs' service role, which may list, gets 404; HEAD too."""
    import boto3

    from tests.standins.bedrock import ROLE_KEY

    s3 = world.client("s3")
    role = boto3.client("s3", region_name="us-east-1", endpoint_url=world.endpoint("s3"), aws_access_key_id=ROLE_KEY,
                        aws_secret_access_key="testing")
    for client, code, head in ((s3, "AccessDenied", "403"), (role, "NoSuchKey", "404")):
        with pytest.raises(client.exceptions.ClientError) as got:
            client.get_object(Bucket=world.source_bucket, Key="2024/nothing.jpg")
        assert got.value.response["Error"]["Code"] == code
        with pytest.raises(client.exceptions.ClientError) as got:
            client.head_object(Bucket=world.source_bucket, Key="2024/nothing.jpg")
        assert got.value.response["Error"]["Code"] == head
    s3.put_object(Bucket=world.source_bucket, Key="2024/there.jpg", Body=b"x")
    assert s3.get_object(Bucket=world.source_bucket, Key="2024/there.jpg")["Body"].read() == b"x"


def test_an_object_written_between_the_403_and_the_listing_is_read():
    """A job writes manifest.json.out just after a 403 for it: the listing finds it, and it is read again."""
    from botocore.exceptions import ClientError

    class Racing:
        def __init__(self):
            self.reads = 0

        def get_object(self, **_):
            self.reads += 1
            if self.reads == 1:
                raise ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "GetObject")
            return {"Body": __import__("io").BytesIO(b'{"totalRecordCount": 3}')}

        def list_objects_v2(self, Prefix, **_):
            return {"Contents": [{"Key": Prefix}]}

    racing = Racing()
    assert common.read_if_present(racing, "b", "output/j/manifest.json.out", OWNER) == b'{"totalRecordCount": 3}'
    assert racing.reads == 2
