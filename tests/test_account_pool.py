"""03's account asks the index in one shared pool: one GetIndex and one thread pool for a run of many jobs."""

from __future__ import annotations

import threading
from pathlib import Path

import orjson

from batch_embeddings import accounting, naming, nova
import common


class FakeIndex:
    """GetIndex and GetVectors of an index holding `present`; counts the calls."""

    class exceptions:
        class NotFoundException(Exception):
            pass

    def __init__(self, present: set[str], exists: bool = True):
        self.present, self.exists = present, exists
        self.get_index_calls = 0
        self.get_vectors_calls = 0
        self.lock = threading.Lock()

    def get_index(self, vectorBucketName, indexName):
        with self.lock:
            self.get_index_calls += 1
        if not self.exists:
            raise self.exceptions.NotFoundException()
        return {"index": {"dimension": 256}}

    def get_vectors(self, vectorBucketName, indexName, keys):
        assert len(keys) <= accounting.GET_VECTORS_KEYS
        with self.lock:
            self.get_vectors_calls += 1
        return {"vectors": [{"key": k} for k in keys if k in self.present]}


def make_run(tmp_path: Path, jobs: int, images: int) -> tuple[dict, list[str]]:
    info, uris = {"jobs": []}, []
    for n in range(jobs):
        path = tmp_path / f"batch_input_{n}.jsonl"
        lines = []
        for i in range(images):
            uri = f"s3://source/2024/f{n}/img-{i}.png"
            uris.append(uri)
            record = nova.image_record(uri, "png", "123456789012", 256, "GENERIC_INDEX")
            lines.append(orjson.dumps(record))
        path.write_bytes(b"\n".join(lines) + b"\n")
        info["jobs"].append({"job_name": f"run-{n:03d}", "status": "Completed", "record_count": images,
                             "job_arn": f"arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/{n:012d}",
                             "manifests": [{"local_path": str(path), "s3_key": f"2024/f{n}/{path.name}"}]})
    return info, uris


def test_the_account_of_many_jobs_asks_getindex_once_in_one_pool(tmp_path, monkeypatch):
    pools = []
    real_pool = accounting.ThreadPoolExecutor

    def counting_pool(*args, **kwargs):
        pools.append(args)
        return real_pool(*args, **kwargs)

    monkeypatch.setattr(accounting, "ThreadPoolExecutor", counting_pool)
    info, uris = make_run(tmp_path, jobs=120, images=150)
    missing = {naming.vector_key(u) for u in uris[::7]}
    index = FakeIndex({naming.vector_key(u) for u in uris} - missing)
    config = common.Config(vector_bucket="vectors", vector_index="images")
    out = tmp_path / "not_loaded.jsonl"
    account = accounting.account_run(info, index, config, lambda job_id: tmp_path / f"report-{job_id}", out)
    assert index.get_index_calls == 1
    assert len(pools) == 1
    assert index.get_vectors_calls == 120 * 2  # 150 keys a job: two GetVectors of at most 100
    assert account["loaded"] == len(uris) - len(missing) and account["missing"] == len(missing)
    listed = [orjson.loads(line)["source_uri"] for line in out.read_bytes().splitlines()]
    assert sorted(listed) == sorted(u for u in uris if naming.vector_key(u) in missing)


def test_no_index_yet_means_nothing_is_loaded(tmp_path):
    info, uris = make_run(tmp_path, jobs=3, images=10)
    index = FakeIndex(set(), exists=False)
    account = accounting.account_run(info, index, common.Config(vector_bucket="v", vector_index="i"),
                                     lambda job_id: tmp_path / f"report-{job_id}", tmp_path / "out.jsonl")
    assert (index.get_index_calls, index.get_vectors_calls) == (1, 0)
    assert account["missing"] == 30 and account["loaded"] == 0
    assert accounting.present_keys(index, "v", "i", []) == set() and index.get_index_calls == 1
