"""The four steps of the article, as separate processes, in order, against the local stand-ins."""

from __future__ import annotations

import json

import common
from batch_embeddings import naming
from tests.conftest import ROOT

NESTED = [f"01/img_{i:03d}.jpg" for i in range(40)] + [f"02/deep/er/photo-{i}.PNG" for i in range(40)] + [
    f"root-{i}.jpeg" for i in range(25)
]
TRICKY = [
    "tricky/with space.jpg",
    "tricky/中文图片.png",
    "tricky/a+b=c.gif",
    "tricky/it's (1) & more.webp",
    "tricky/UPPER.JPG",
]


def test_four_steps_end_to_end(world):
    s3 = world.client("s3")
    good = world.put_images(NESTED + TRICKY, prefix="2024/")
    s3.put_object(Bucket=world.source_bucket, Key="2024/notes.txt", Body=b"not an image")
    s3.put_object(Bucket=world.source_bucket, Key="2024/01/empty.png", Body=b"")
    s3.put_object(Bucket=world.source_bucket, Key="2024/01/not-really.jpg", Body=b"plain text, not a jpeg")
    s3.put_object(Bucket=world.source_bucket, Key="2024/batch_input_20240101-000000.jsonl", Body=b"{}\n")
    s3.put_object(Bucket=world.source_bucket, Key="elsewhere/x.png", Body=b"\x89PNG outside the prefix")
    broken_uri = f"s3://{world.source_bucket}/2024/01/not-really.jpg"

    created = world.step(1)
    assert created.returncode == 0, created.stderr
    out = created.stdout
    assert "Bedrock Batch Inference - Create Job" in out
    assert f"✓ Found {len(good) + 1} images" in out  # the fake .jpg is listed by extension; Bedrock rejects it
    assert "not an image: 1" in out and "empty: 1" in out
    assert "Deleted: 2024/batch_input_20240101-000000.jsonl" in out
    assert "✓ Batch job created successfully!" in out and "Next steps:" in out
    info = world.job_info()
    job = info["jobs"][0]
    assert job["record_count"] == len(good) + 1
    assert job["input_s3_uri"] == f"s3://{world.source_bucket}/2024/"
    assert job["output_s3_uri"] == f"s3://{world.result_bucket}/output/"
    manifest = s3.get_object(Bucket=world.source_bucket, Key=job["manifests"][0]["s3_key"])["Body"].read().decode()
    uris = [json.loads(line)["modelInput"]["singleEmbeddingParams"]["image"]["source"]["s3Location"]["uri"]
            for line in manifest.splitlines()]
    assert sorted(uris) == sorted(good + [broken_uri])
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=world.source_bucket, Prefix="2024/")["Contents"]]
    assert [k for k in listed if k.endswith(".jsonl")] == [job["manifests"][0]["s3_key"]]

    monitored = world.step(2, "--wait", "--interval", "0.1", "--timeout", "60")
    assert monitored.returncode == 0, monitored.stdout + monitored.stderr
    assert ">>> STATUS: Completed <<<" in monitored.stdout
    assert f"Total Records: {len(good) + 1}" in monitored.stdout
    assert "Error Records: 1" in monitored.stdout
    assert (f"! Job {job['job_name']} completed with 1 error records — 03 loads the rest and lists them"
            in monitored.stdout) and "successfully" not in monitored.stdout
    assert not common.object_exists(s3, world.source_bucket, job["manifests"][0]["s3_key"], "123456789012")

    calls, clients = world.cwd / "calls.jsonl", world.cwd / "clients.txt"
    loaded = world.step(3, env={"PYTHONPATH": str(ROOT / "tests" / "record_calls"), "RECORD_AWS_CALLS": str(calls),
                                "RECORD_AWS_CLIENTS": str(clients)})
    assert loaded.returncode == 4, loaded.stdout + loaded.stderr  # one record failed: reported, not dropped
    # 02 recorded the job's end: 03 does not ask Bedrock again (a status that ended never changes), nor make a client.
    services = {json.loads(line)["service"] for line in calls.read_text().splitlines()}
    assert "bedrock" not in services and {"s3", "s3vectors"} <= services
    assert sorted(clients.read_text().split()) == ["s3", "s3vectors", "s3vectors"]
    assert f"Total Records Processed: {len(good) + 1}" in loaded.stdout
    assert f"Successful: {len(good)}" in loaded.stdout
    assert f"Vectors Inserted: {len(good)}" in loaded.stdout
    assert "✓ Counts match manifest.json.out" in loaded.stdout
    run_dir = world.run_dir()
    report = [json.loads(line) for line in (run_dir / f"load_report_{job['job_id']}.jsonl").read_text().splitlines()]
    assert [r["source_uri"] for r in report] == [broken_uri]
    assert report[0]["recordId"] == naming.record_id(broken_uri)
    assert f"Images loaded: {len(good)}, failed: 1, missing: 0" in loaded.stdout
    account = world.account()
    assert [(a["source_uri"], a["status"]) for a in account] == [(broken_uri, "failed")]
    assert f"! 1 image(s) not loaded — all listed in {run_dir / 'not_loaded.jsonl'}:" in loaded.stdout
    assert f"  {broken_uri}: failed (400: " in loaded.stdout  # named on the console, with Bedrock's reason
    assert "retry them with 01_create_job.py --retry-failed" in loaded.stdout
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        [f"load_report_{job['job_id']}.jsonl", "not_loaded.jsonl", job["manifests"][0]["s3_key"].rsplit("/")[-1],
         f"{job['job_name']}.sources.jsonl"])
    rejected = [json.loads(line) for line in (world.cwd / "failed_permanently.jsonl").read_text().splitlines()]
    assert [(r["source_uri"], r["error_code"], r["size"]) for r in rejected] == [(broken_uri, "400", 22)]

    index = world.index_metadata()
    listed = world.client("s3").list_objects_v2(Bucket=world.source_bucket)["Contents"]
    objects = {f"s3://{world.source_bucket}/{o['Key']}": o for o in listed}
    assert index == {naming.vector_key(uri): {
        "source_uri": uri, "job_id": job["job_id"], "etag": objects[uri]["ETag"].strip('"'),
        "size": objects[uri]["Size"], "model_id": job["model_id"], "purpose": "GENERIC_INDEX",
        "embedded": job["created"][:10]} for uri in good}  # what each image was embedded from, with what, when

    again = world.step(3, "--reload")  # loading twice overwrites, never duplicates
    assert again.returncode == 4
    assert world.index_metadata() == index

    cleaned = world.step(4)
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    assert "✓ Cleanup completed successfully!" in cleaned.stdout
    assert not (world.cwd / "batch_job_info.json").exists()
    assert not list(world.cwd.rglob("batch_input_*.jsonl"))
    # What a person needs stays: the failures' report and the list of images not loaded.
    assert sorted(p.name for p in run_dir.iterdir()) == [f"load_report_{job['job_id']}.jsonl", "not_loaded.jsonl"]
    assert f"Kept in {run_dir}: load_report_{job['job_id']}.jsonl, not_loaded.jsonl" in cleaned.stdout
    assert common.object_exists(s3, world.source_bucket, "2024/notes.txt", "123456789012")


def make_index(world, dimension: int) -> None:
    s3v = world.client("s3vectors")
    s3v.create_vector_bucket(vectorBucketName=world.vector_bucket)
    s3v.create_index(vectorBucketName=world.vector_bucket, indexName=world.vector_index, dataType="float32",
                     dimension=dimension, distanceMetric="cosine")


def test_an_index_of_another_dimension_stops_01_before_anything_is_paid_for(world):
    world.put_images([f"img-{i:03d}.png" for i in range(100)], prefix="2024/")
    make_index(world, 1024)
    created = world.step(1)
    assert created.returncode == 2
    assert created.stderr.strip() == (
        f"error: index {world.vector_index} in {world.vector_bucket} holds 1024-dimension vectors but "
        "EMBEDDING_DIMENSION=256 — set EMBEDDING_DIMENSION=1024 or choose another VECTOR_INDEX; nothing was uploaded")
    assert not (world.cwd / "batch_job_info.json").exists() and not (world.cwd / "runs").exists()
    assert [o["Key"] for o in world.client("s3").list_objects_v2(Bucket=world.source_bucket)["Contents"]
            if o["Key"].endswith(".jsonl")] == []
    assert world.emulator("/_emulator/jobs")["jobs"] == []
    # The advice works: with the index's dimension the run goes through.
    assert world.step(1, env={"EMBEDDING_DIMENSION": "1024"}).returncode == 0


def test_an_index_changed_after_the_submit_stops_the_load_with_advice_that_works(world):
    world.put_images([f"img-{i:03d}.png" for i in range(100)], prefix="2024/")
    assert world.step(1).returncode == 0
    make_index(world, 1024)
    assert world.step(2, "--wait", "--interval", "0.05", "--timeout", "60").returncode == 0
    loaded = world.step(3)
    assert loaded.returncode == 2
    assert loaded.stderr.strip() == (
        f"error: index {world.vector_index} in {world.vector_bucket} holds 1024-dimension vectors but the run's "
        "vectors have 256 — load them into another index (VECTOR_INDEX=<new name>, step 3 creates it)")
    assert world.index_keys() == set()
    again = world.step(3, env={"VECTOR_INDEX": "another-index"})
    assert again.returncode == 0, again.stdout + again.stderr
    assert "! Index another-index does not exist: creating it" in again.stdout


def test_a_missing_result_bucket_stops_01_before_anything_is_uploaded(world):
    world.put_images([f"img-{i:03d}.png" for i in range(100)], prefix="2024/")
    created = world.step(1, env={"RESULT_BUCKET": "no-such-result-bucket"})
    assert created.returncode == 2
    assert created.stderr.strip() == ("error: RESULT_BUCKET no-such-result-bucket does not exist — create it or fix "
                                      "RESULT_BUCKET; nothing was uploaded")
    assert not (world.cwd / "batch_job_info.json").exists() and not (world.cwd / "runs").exists()
    assert not [o for o in world.client("s3").list_objects_v2(Bucket=world.source_bucket)["Contents"]
                if o["Key"].endswith(".jsonl")]


def test_an_output_location_bedrock_would_refuse_stops_01(world):
    world.put_images([f"img-{i:03d}.png" for i in range(100)], prefix="2024/")
    created = world.step(1, env={"RESULT_PREFIX": "out put/"})
    assert created.returncode == 2 and created.stderr.startswith("error: RESULT_PREFIX 'out put/' cannot be a "
                                                                 "Bedrock output location")
    long = world.step(1, env={"RESULT_PREFIX": "a" * 1010 + "/"})
    assert long.returncode == 2 and "must be at most 1024 characters" in long.stderr
    assert not (world.cwd / "batch_job_info.json").exists()


def test_output_kms_key_reaches_the_job(world):
    key = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    world.put_images([f"img-{i:03d}.png" for i in range(100)], prefix="2024/")
    assert world.step(1, env={"OUTPUT_KMS_KEY_ID": key}).returncode == 0
    job = world.client("bedrock").get_model_invocation_job(jobIdentifier=world.job_info()["jobs"][0]["job_arn"])
    assert job["outputDataConfig"]["s3OutputDataConfig"]["s3EncryptionKeyId"] == key
