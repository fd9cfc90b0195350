"""Fixtures: the local stand-ins, a fresh set of buckets per test, and a way to run a step as a process."""

from __future__ import annotations

import compileall
import importlib
import itertools
import json
import os
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from tests import sample_images
from tests.standins import s3 as s3_standin
from tests.standins import stack as standins

ROOT = Path(__file__).resolve().parent.parent
STEPS = {
    0: "00_check_setup.py",
    1: "01_create_job.py",
    2: "02_monitor_job.py",
    3: "03_load_result_to_s3_vector_bucket.py",
    4: "04_remove_completed_task.py",
    5: "05_query_vectors.py",
}
_names = itertools.count(1)
_readers: dict[tuple[str, str], object] = {}  # (service, endpoint) -> client: World.reader


def pytest_configure(config):
    """Make the ~700 starts of a script the tests make cheap. Compile the project's modules once: where
    PYTHONDONTWRITEBYTECODE is set (as on the CI machine) each start would otherwise compile them all again
    (0.17 CPU s a start; `uv sync --compile-bytecode` does the same for the installed packages, .ci/run). And one
    OpenBLAS thread: importing numpy otherwise starts one a core, which spin (0.11 CPU s a start of 01 or 03);
    nothing here calls BLAS."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    compileall.compile_dir(ROOT, maxlevels=0, quiet=1)
    for package in ("batch_embeddings", "tests", "benchmark"):
        compileall.compile_dir(ROOT / package, quiet=1)


def import_step(number: int):
    """A numbered script as a module (its name starts with a digit, so `import` cannot name it)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(STEPS[number][:-3])


@pytest.fixture(scope="session")
def stack():
    running = standins.start(bedrock_options={"step_seconds": 0.02})
    yield running
    running.stop()


@dataclass
class World:
    """One test's AWS world: its own buckets on the shared stand-ins, and a working folder for the steps."""

    stack: standins.Stack
    cwd: Path
    env: dict[str, str]
    source_bucket: str
    result_bucket: str
    vector_bucket: str
    vector_index: str
    role_arn: str

    def client(self, service: str):
        """A new client of the stand-in that answers `service` for this world (a test may change it)."""
        return boto3.client(service, region_name=standins.REGION, endpoint_url=self.endpoint(service),
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def reader(self, service: str):
        """A client of the stand-in that answers `service`, shared by every world of the session, for what the
        fixtures and helpers do with it as it is (a client costs 13 ms); a test that changes a client makes its own
        with `client`."""
        endpoint = self.endpoint(service)
        if (service, endpoint) not in _readers:
            _readers[service, endpoint] = self.client(service)
        return _readers[service, endpoint]

    def endpoint(self, service: str) -> str:
        return self.env["AWS_ENDPOINT_URL_" + service.upper().replace("-", "_")]

    def put_images(self, keys, prefix: str = "") -> list[str]:
        s3_standin.put_objects(self.source_bucket,
                               ((prefix + key, sample_images.for_key(key, seed)) for seed, key in enumerate(keys)))
        return [f"s3://{self.source_bucket}/{prefix}{key}" for key in keys]

    def step(self, number: int, *args: str, input: str | None = None, env: dict | None = None,
             timeout: float = 120, new_index: bool = True) -> subprocess.CompletedProcess:
        """Run a numbered script as its own process, as a user would (`uv run 0N_....py`). Step 1 gets --new-index,
        as the README's first run does (a test's vector index does not exist before its first load); with
        `new_index=False` it runs as an unwatched later day does."""
        if number == 1 and new_index:
            args = (*args, "--new-index")
        return subprocess.run(
            [sys.executable, str(ROOT / STEPS[number]), *args],
            cwd=self.cwd, env={**self.env, **(env or {})}, input=input, capture_output=True, text=True,
            timeout=timeout,
        )

    def daily(self, *args: str, env: dict | None = None, timeout: float = 180,
              new_index: bool = True) -> subprocess.CompletedProcess:
        """Run daily_run.py as cron would, polling the jobs often (with --new-index, as `step` runs step 1)."""
        args = (*args, "--new-index") if new_index else args
        return subprocess.run([sys.executable, str(ROOT / "daily_run.py"), "--interval", "0.05", *args],
                              cwd=self.cwd, env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout)

    def emulator(self, path: str, payload: dict | None = None):
        url = self.stack.bedrock_url + path
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request) as response:
            return json.loads(response.read() or b"null")

    def index_keys(self) -> set[str]:
        """Every key in the test's vector index, read page by page as ListVectors gives them."""
        return set(self.index_metadata())

    def index_metadata(self) -> dict[str, dict]:
        s3v, found, token = self.reader("s3vectors"), {}, None
        while True:
            page = s3v.list_vectors(vectorBucketName=self.vector_bucket, indexName=self.vector_index,
                                    returnMetadata=True, **({"nextToken": token} if token else {}))
            found.update({v["key"]: v.get("metadata", {}) for v in page["vectors"]})
            token = page.get("nextToken")
            if not token:
                return found

    def vectors_accepted(self) -> int:
        """How many vectors the index has accepted in PutVectors, counting any sent twice."""
        with urllib.request.urlopen(self.stack.s3vectors_url + "/_standin/stats") as response:
            stats = json.loads(response.read())["indexes"]
        return stats.get(f"{self.vector_bucket}/{self.vector_index}", {}).get("put_vectors_accepted", 0)

    def job_info(self) -> dict:
        return json.loads((self.cwd / "batch_job_info.json").read_text())

    def run_dir(self) -> Path:
        """The newest run's folder (`runs/<stamp>/` beside the job-info file): its manifests and reports."""
        return sorted((self.cwd / "runs").iterdir())[-1]

    def account(self) -> list[dict]:
        """The newest run's list of images not loaded."""
        return [json.loads(line) for line in (self.run_dir() / "not_loaded.jsonl").read_text().splitlines()]


def make_role(iam, name: str, source_bucket: str, result_bucket: str) -> str:
    """A Bedrock service role that may read the source bucket and write the result bucket."""
    trust = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"Service": "bedrock.amazonaws.com"},
                       "Action": "sts:AssumeRole"}],
    }
    arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],
             "Resource": [f"arn:aws:s3:::{source_bucket}", f"arn:aws:s3:::{source_bucket}/*"]},
            {"Effect": "Allow", "Action": ["s3:PutObject", "s3:ListBucket"],
             "Resource": [f"arn:aws:s3:::{result_bucket}", f"arn:aws:s3:::{result_bucket}/*"]},
        ],
    }
    iam.put_role_policy(RoleName=name, PolicyName="batch-access", PolicyDocument=json.dumps(policy))
    return arn


@pytest.fixture
def world(stack, tmp_path) -> World:
    n = next(_names)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(stack.env)
    w = World(
        stack=stack,
        cwd=tmp_path,
        env=env,
        source_bucket=f"source-{n}",
        result_bucket=f"result-{n}",
        vector_bucket=f"vectors-{n}",
        vector_index=f"images-{n}",
        role_arn="",
    )
    s3 = w.reader("s3")
    s3.create_bucket(Bucket=w.source_bucket)
    s3.create_bucket(Bucket=w.result_bucket)
    w.role_arn = make_role(w.reader("iam"), f"BedrockBatchRole{n}", w.source_bucket, w.result_bucket)
    env.update(
        SOURCE_BUCKET=w.source_bucket,
        SOURCE_PREFIX="2024/",
        RESULT_BUCKET=w.result_bucket,
        RESULT_PREFIX="output/",
        VECTOR_BUCKET=w.vector_bucket,
        VECTOR_INDEX=w.vector_index,
        ROLE_ARN=w.role_arn,
        EMBEDDING_DIMENSION="256",
        PYTHONIOENCODING="utf-8",
    )
    w.emulator("/_emulator/reset", {})  # no jobs, no options left over from another test
    stack.s3.reset()  # S3 in the documented forms, a missing key 404 (a test may say 403)
    return w


@pytest.fixture
def index_endpoint(monkeypatch):
    """The S3 Vectors stand-in in a thread with one 8-dimension index, and a client without botocore's retries
    (the sender's own backoff is what the loader's tests look at)."""
    from botocore.config import Config

    from tests.sending import IndexEndpoint
    from tests.standins import s3vectors, serve

    app = s3vectors.make_app()
    served = serve(app)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    client = boto3.client("s3vectors", region_name="us-east-1", endpoint_url=served.url,
                          config=Config(retries={"total_max_attempts": 1}))
    client.create_vector_bucket(vectorBucketName="bucket")
    client.create_index(vectorBucketName="bucket", indexName="index", dataType="float32", dimension=8,
                        distanceMetric="cosine")
    yield IndexEndpoint(app, served.url, client)
    served.stop()


@pytest.fixture
def proxy():
    """A proxy in front of a stand-in that fails the requests `fail(method, path)` names ("refuse", ...)."""
    from tests.standins import serve
    from tests.standins.faulty import FaultyProxy

    started = []

    def start(target: str, fail) -> str:
        served = serve(FaultyProxy(target, fail))
        started.append(served)
        return served.url

    yield start
    for served in started:
        served.stop()
