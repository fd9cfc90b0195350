"""Step 3 resuming from its checkpoint: the load report is cut back to what the checkpoint counted (no doubled
line, no line cut by a kill), and a checkpoint made against another vector bucket with the same index name is not
taken for this one's."""

from __future__ import annotations

import json
import os

import common
from batch_embeddings import naming
from tests.conftest import import_step

WAIT = ("--wait", "--interval", "0.05", "--timeout", "120")


def step3_in_process(world, monkeypatch, env: dict | None = None) -> int:
    step3 = import_step(3)
    with monkeypatch.context() as patch:
        for name in [k for k in os.environ if k.startswith("AWS_")]:
            patch.delenv(name)
        for name, value in {**world.env, **(env or {})}.items():
            patch.setenv(name, value)
        patch.chdir(world.cwd)
        return step3.main([])


def ended_run(world, bad: bool = False) -> list[str]:
    """A run whose batch job has ended (01 and 02 done), with one image Bedrock refuses when `bad`."""
    uris = world.put_images([f"a/img-{i:03d}.png" for i in range(100)], prefix="2024/")
    if bad:
        world.client("s3").put_object(Bucket=world.source_bucket, Key="2024/a/notes.png", Body=b"a text file .png")
    created = world.step(1)
    assert created.returncode == 0, created.stdout + created.stderr
    waited = world.step(2, *WAIT)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    return uris


def test_a_resumed_load_cuts_the_report_back_to_its_checkpoint(world, monkeypatch, capsys):
    uris = ended_run(world, bad=True)
    bad = f"s3://{world.source_bucket}/2024/a/notes.png"
    info = world.job_info()
    job = info["jobs"][0]
    # As a kill leaves it: the checkpoint counts nothing confirmed (and no report line), but the killed step 3 had
    # written the bad image's line and half of another before it died.
    job["load"] = {"files": {}, "counts": {"total": 0, "success": 0, "error": 0, "inserted": 0}, "report_bytes": 0,
                   "vector_bucket": world.vector_bucket, "vector_index": world.vector_index}
    (world.cwd / "batch_job_info.json").write_text(json.dumps(info))
    report = world.cwd / "runs" / info["run"] / f"load_report_{job['job_id']}.jsonl"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_bytes(json.dumps({"recordId": "x", "source_uri": bad, "error_code": "400", "error_message": "no",
                                   "file": "f", "offset": 1}).encode() + b'\n{"recordId": "y", "source_u')

    code = step3_in_process(world, monkeypatch)
    out = capsys.readouterr().out
    assert code == common.EXIT_INCOMPLETE, out
    assert "Images loaded: 100, failed: 1, missing: 0" in out
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    assert [line["source_uri"] for line in lines] == [bad]  # once, and every line whole
    assert [entry["source_uri"] for entry in world.account()] == [bad]
    assert world.index_keys() == {naming.vector_key(u) for u in uris}


def test_a_checkpoint_of_another_vector_bucket_with_the_same_index_name_is_not_reused(world, monkeypatch, capsys):
    uris = ended_run(world)
    assert step3_in_process(world, monkeypatch) == common.EXIT_OK
    capsys.readouterr()

    other = f"{world.vector_bucket}-new"  # a new vector bucket, its index named as before
    code = step3_in_process(world, monkeypatch, {"VECTOR_BUCKET": other})
    out = capsys.readouterr().out
    assert code == common.EXIT_OK, out
    assert (f"was made against {world.vector_bucket}/{world.vector_index}, not {other}/{world.vector_index}: "
            "loading this job from the start") in out
    assert "Vectors Inserted: 100" in out
    s3v = world.client("s3vectors")
    found = s3v.get_vectors(vectorBucketName=other, indexName=world.vector_index,
                            keys=[naming.vector_key(u) for u in uris])["vectors"]
    assert len(found) == 100
    assert world.job_info()["jobs"][0]["load"]["vector_bucket"] == other
