"""Benchmark of step 03 (`03_load_result_to_s3_vector_bucket.py`) against local stand-ins with the real quota.

    uv run python -m benchmark.bench_load --records 10000 --dimension 3072 [--fault-rate 0.1]
        [--kill-after SECONDS] [--baseline] [--repeat N] [--profile]

Starts moto (S3) and the S3 Vectors stand-in (write quota 2,500 vectors/s and 1,000 requests/s per index) as
processes of their own and the Bedrock emulator in a thread; generates (once, cached on disk) a synthetic batch
output of N records as the emulator writes them, creates a Completed job through the emulator, puts the output
under that job's folder with multipart uploads, then runs step 03 as its own process and reports what it did:
time from process start to exit, vectors/s against the quota, requests, throttling, peak RSS, and whether every
vector is in the index exactly once. See benchmark/README.md for how to read the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from batch_embeddings import jobinfo, naming, nova  # noqa: E402
from tests.standins import bedrock as bedrock_standin  # noqa: E402
from tests.standins import serve  # noqa: E402
from tests.standins.stack import ACCOUNT_ID, REGION, aws_env  # noqa: E402

STEP3 = ROOT / "03_load_result_to_s3_vector_bucket.py"
ARTICLE = HERE / "article_loader.py"
PROFILER = HERE / "profile_step.py"
LAUNCHER = HERE / "launch.py"
TRACER = HERE / "trace_memory.py"

SOURCE_BUCKET = "bench-source-images"
SOURCE_PREFIX = "images/"
RESULT_BUCKET = "bench-batch-results"
RESULT_PREFIX = "output/"
VECTOR_BUCKET = "bench-vectors"
VECTOR_INDEX = "bench-index"
ARTICLE_INDEX = "bench-article-index"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT_ID}:role/BedrockBatchInferenceRole"
MODEL_ID = "amazon.nova-2-multimodal-embeddings-v1:0"
PURPOSE = "GENERIC_INDEX"
SEED_MANIFEST = f"{SOURCE_PREFIX}batch_input_bench.jsonl"

QUOTA_VECTORS = 2500
QUOTA_REQUESTS = 1000
MAX_REQUEST_BYTES = 20 * 1024 * 1024
MAX_VECTORS_PER_PUT = 500
TARGET_RATIO = 0.90
STEADY_TARGET_RATIO = 0.92  # once loading
FAULT_TARGET_RATIO = 0.8  # once loading, with --fault-rate
RSS_TARGET_MB = 200
MAIN_THREAD_MS_TARGET = 0.15  # CPU ms a vector on 03's main thread (reading, parsing, encoding, batching)
PROCESS_MS_TARGET = 0.30  # CPU ms a vector of 03 as a whole (with the threads that sign and send)
CACHE_VERSION = 2  # 2: recordIds of 12 alphanumerics


# ---------------------------------------------------------------------------------------------------- the data


@dataclass
class Dataset:
    folder: Path
    records: int
    dimension: int
    files: list[dict]  # {"name", "path", "records", "bytes"}

    @property
    def bytes(self) -> int:
        return sum(f["bytes"] for f in self.files)

    @property
    def input_manifest(self) -> Path:
        """The batch input as 01_create_job.py writes it locally: one request per image, recordId = vector key."""
        path = self.folder / Path(SEED_MANIFEST).name
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            with open(tmp, "w", encoding="utf-8") as fh:
                for i in range(self.records):
                    fh.write(json.dumps(nova.image_record(image_uri(i), "jpeg", ACCOUNT_ID, self.dimension,
                                                            PURPOSE)) + "\n")
            tmp.rename(path)
        return path

    def manifest(self) -> bytes:
        return json.dumps({"totalRecordCount": self.records, "processedRecordCount": self.records,
                           "successRecordCount": self.records, "errorRecordCount": 0,
                           "inputTokenCount": 0, "outputTokenCount": 0}).encode()


def image_uri(i: int) -> str:
    return f"s3://{SOURCE_BUCKET}/{SOURCE_PREFIX}{i // 1000:04d}/img-{i:08d}.jpg"


def expected_keys(records: int) -> dict[str, str]:
    """vector key -> source URI of every generated record (the key is 01's recordId: a hash of the URI)."""
    return {naming.vector_key(uri): uri for uri in map(image_uri, range(records))}


def dataset(cache_root: Path, records: int, dimension: int, per_file: int, numbers: str = "double") -> Dataset:
    """The synthetic job output, generated once per (records, dimension, records per file, number text) and kept
    on disk. numbers="double": each float32 value written as Python writes a float (≈ 20 digits, as the Bedrock
    emulator does); "float32": as the shortest text of the float32 (what a float32 serialiser such as Java's writes;
    which one Bedrock uses is unverified)."""
    suffix = "" if numbers == "double" else f"-{numbers}"
    folder = cache_root / f"v{CACHE_VERSION}-n{records}-d{dimension}-f{per_file}{suffix}"
    meta_path = folder / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        print(f"Using cached output in {folder} ({meta['bytes'] / 1e6:,.0f} MB)")
        return Dataset(folder, records, dimension, meta["files"])
    import numpy as np
    import orjson

    folder.mkdir(parents=True, exist_ok=True)
    need = records * (dimension * 23 + 600)
    free = shutil.disk_usage(folder).free
    if need > free * 0.9:
        sys.exit(f"generating ~{need / 1e9:.1f} GB needs more room than {folder} has ({free / 1e9:.1f} GB free); "
                 "pass --cache-dir")
    print(f"Generating {records:,} records of {dimension} dimensions into {folder} (once; cached) ...", flush=True)
    started = time.monotonic()
    files = []
    for n, first in enumerate(range(0, records, per_file)):
        last = min(records, first + per_file)
        name = f"batch_input_bench-{n:03d}.jsonl.out"
        path = folder / name
        tmp = path.with_suffix(".tmp")
        rng = np.random.default_rng(1000 + n)
        with open(tmp, "w", encoding="utf-8") as fh:
            for chunk in range(first, last, 1000):
                rows = min(1000, last - chunk)
                raw = rng.standard_normal((rows, dimension))
                unit = (raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float32)
                for offset, embedding in enumerate(unit.tolist()):  # Python floats holding float32 values
                    uri = image_uri(chunk + offset)
                    # the Bedrock emulator's line: recordId, modelInput, modelOutput, written by json.dumps
                    line = json.dumps({
                        "recordId": naming.record_id(uri),
                        "modelInput": nova.image_request(uri, "jpeg", ACCOUNT_ID, dimension, PURPOSE),
                        "modelOutput": {"embeddings": [{"embeddingType": "IMAGE", "embedding": "@"}]},
                    })
                    if numbers == "double":
                        text = json.dumps(embedding)
                    else:
                        text = orjson.dumps(unit[offset], option=orjson.OPT_SERIALIZE_NUMPY).decode()
                    fh.write(line.replace('"@"', text) + "\n")
                print(f"  {last if chunk + rows >= last else chunk + rows:,}/{records:,} records "
                      f"({time.monotonic() - started:.0f}s)", end="\r", flush=True)
        tmp.rename(path)
        files.append({"name": name, "path": str(path), "records": last - first, "bytes": path.stat().st_size})
    total = sum(f["bytes"] for f in files)
    meta_path.write_text(json.dumps({"records": records, "dimension": dimension, "files": files, "bytes": total},
                                    indent=2) + "\n")
    print(f"\nGenerated {total / 1e6:,.0f} MB ({total / records / 1e3:.1f} KB a line) in "
          f"{time.monotonic() - started:.0f}s")
    return Dataset(folder, records, dimension, files)


# ---------------------------------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def http_json(url: str, body: dict | None = None, timeout: float = 30) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"{}")


class Servers:
    """moto and the S3 Vectors stand-in as processes; the Bedrock emulator in a thread of this process."""

    def __init__(self, logdir: Path, *, fault_rate: float, seed: int, store_data: bool, quota: float):
        self.procs: list[subprocess.Popen] = []
        self.logdir = logdir
        self.bedrock = None
        self.quota = quota
        try:
            self._start(fault_rate, seed, store_data)
        except BaseException:
            self.stop()
            raise

    def _start(self, fault_rate: float, seed: int, store_data: bool) -> None:
        logdir = self.logdir
        port = free_port()
        # moto, its S3 answering in the documented forms (tests.standins.s3)
        self.moto = self._spawn("moto", [sys.executable, "-m", "tests.standins.s3", "-H", "127.0.0.1", "-p",
                                         str(port)])
        self.moto_url = f"http://127.0.0.1:{port}"
        self._wait_http(self.moto_url + "/moto-api/", self.moto)
        options = [f"store_data={'true' if store_data else 'false'}"]
        self.s3v = self._spawn("s3vectors", [
            sys.executable, "-m", "tests.standins.s3vectors", "--host", "127.0.0.1", "--port", "0",
            "--vectors-per-second", str(self.quota), "--requests-per-second", str(QUOTA_REQUESTS),
            "--fault-rate", str(fault_rate), "--seed", str(seed), *[a for o in options for a in ("--option", o)],
        ], stdout=subprocess.PIPE)
        line = self.s3v.stdout.readline().decode().strip()
        if not line.startswith("http://127.0.0.1:"):
            raise SystemExit(f"the S3 Vectors stand-in did not start (see {logdir / 's3vectors.log'})")
        self.s3v_url = line
        self.bedrock = serve(bedrock_standin.make_app(
            s3_endpoint_url=self.moto_url, region=REGION, account_id=ACCOUNT_ID,
            options={"min_records_per_job": 1, "step_seconds": 0.01}))
        self.bedrock_url = self.bedrock.url
        self.env = aws_env(self.moto_url, self.bedrock_url, self.s3v_url)

    def _spawn(self, name: str, cmd: list[str], stdout=None) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=stdout or log, stderr=log, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    @staticmethod
    def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"{proc.args[:3]} exited with {proc.returncode}")
            try:
                urllib.request.urlopen(url, timeout=2).read()
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit(f"{url} did not answer within {timeout:.0f}s")

    def client(self, service: str, **config):
        import boto3
        from botocore.config import Config

        url = {"s3": self.moto_url, "bedrock": self.bedrock_url, "s3vectors": self.s3v_url}[service]
        return boto3.client(service, region_name=REGION, endpoint_url=url, aws_access_key_id="testing",
                            aws_secret_access_key="testing", config=Config(**config))

    def stats(self) -> dict:
        return http_json(self.s3v_url + "/_standin/stats")

    def reset_vectors(self, seed: int) -> None:
        """Drop every bucket, index and counter; reseed the fault injection."""
        http_json(self.s3v_url + "/_standin/config", {"seed": seed})
        http_json(self.s3v_url + "/_standin/reset", {})

    def stop(self) -> None:
        if self.bedrock is not None:
            self.bedrock.stop()
        for proc in self.procs:  # only the processes this harness started, by their own handle
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ---------------------------------------------------------------------------------------------------- the job


@dataclass
class Job:
    arn: str
    job_id: str
    name: str
    prefix: str  # output/<jobId>/


def create_job(servers: Servers, data: Dataset) -> Job:
    """A job that exists in the emulator, Completed, whose output folder holds the generated output."""
    from boto3.s3.transfer import TransferConfig

    s3 = servers.client("s3", retries={"mode": "standard", "max_attempts": 5})
    bedrock = servers.client("bedrock")
    for bucket in (SOURCE_BUCKET, RESULT_BUCKET):
        s3.create_bucket(Bucket=bucket)
    # The emulator runs a real job: one tiny image, one record (min_records_per_job=1), so it is Completed fast.
    seed_image = f"{SOURCE_PREFIX}seed/seed.png"
    s3.put_object(Bucket=SOURCE_BUCKET, Key=seed_image, Body=b"\x89PNG\r\n\x1a\n" + bytes(56))
    record = nova.image_record(common.s3_uri(SOURCE_BUCKET, seed_image), "png", ACCOUNT_ID, data.dimension, PURPOSE)
    s3.put_object(Bucket=SOURCE_BUCKET, Key=SEED_MANIFEST, Body=json.dumps(record).encode() + b"\n")
    name = f"bench-load-{common.timestamp()}"
    arn = bedrock.create_model_invocation_job(
        jobName=name, roleArn=ROLE_ARN, modelId=MODEL_ID, clientRequestToken=f"bench{random.getrandbits(64):x}",
        inputDataConfig={"s3InputDataConfig": {"s3Uri": common.s3_uri(SOURCE_BUCKET, SOURCE_PREFIX),
                                               "s3InputFormat": "JSONL", "s3BucketOwner": ACCOUNT_ID}},
        outputDataConfig={"s3OutputDataConfig": {"s3Uri": common.s3_uri(RESULT_BUCKET, RESULT_PREFIX),
                                                 "s3BucketOwner": ACCOUNT_ID}},
    )["jobArn"]
    deadline = time.monotonic() + 60
    while (status := bedrock.get_model_invocation_job(jobIdentifier=arn)["status"]) not in jobinfo.TERMINAL_STATUSES:
        if time.monotonic() > deadline:
            raise SystemExit(f"the emulator's job is still {status} after 60 s")
        time.sleep(0.05)
    if status != "Completed":
        raise SystemExit(f"the emulator's job ended {status}")
    job_id = naming.job_id_from_arn(arn)
    prefix = f"{RESULT_PREFIX}{job_id}/"
    # Replace the emulator's one-record output with the generated one.
    for obj in common.objects_under(s3, RESULT_BUCKET, prefix, ACCOUNT_ID):
        s3.delete_object(Bucket=RESULT_BUCKET, Key=obj["Key"])
    transfer = TransferConfig(multipart_threshold=8 * 1024 * 1024, multipart_chunksize=64 * 1024 * 1024,
                              max_concurrency=4)
    started = time.monotonic()
    for f in data.files:
        print(f"Uploading {f['name']} ({f['bytes'] / 1e6:,.0f} MB, multipart) to "
              f"{common.s3_uri(RESULT_BUCKET, prefix)} ...", flush=True)
        s3.upload_file(f["path"], RESULT_BUCKET, prefix + f["name"], Config=transfer)
    s3.put_object(Bucket=RESULT_BUCKET, Key=prefix + "manifest.json.out", Body=data.manifest())
    print(f"Uploaded {data.bytes / 1e6:,.0f} MB in {time.monotonic() - started:.0f}s")
    return Job(arn=arn, job_id=job_id, name=name, prefix=prefix)


def serve_files(servers: Servers, data: Dataset, job: Job, workroot: Path) -> None:
    """Serve the job's output (the cached files and manifest.json.out) from benchmark/s3_files.py."""
    manifest = workroot / "manifest.json.out"
    manifest.write_bytes(data.manifest())
    objects = {job.prefix + f["name"]: str(f["path"]) for f in data.files}
    objects[job.prefix + "manifest.json.out"] = str(manifest)
    spec = workroot / "s3-objects.json"
    spec.write_text(json.dumps({"bucket": RESULT_BUCKET, "objects": objects}))
    proc = servers._spawn("s3files", [sys.executable, "-m", "benchmark.s3_files", "--port", "0", "--objects",
                                      str(spec)], stdout=subprocess.PIPE)
    servers.files_url = proc.stdout.readline().decode().strip()
    if not servers.files_url.startswith("http://127.0.0.1:"):
        raise SystemExit(f"benchmark/s3_files.py did not start (see {workroot / 's3files.log'})")


def moto_ttfb(servers: Servers, data: Dataset, job: Job, offset: int | None = None) -> float:
    """moto reads a whole object (and copies the requested range) before it answers a GET: the seconds until the
    first byte of the largest output file (from `offset` to the end, as 03 asks when it resumes), which 03 waits
    too on its GetObject. Real S3 answers in milliseconds."""
    s3 = servers.client("s3")
    largest = max(data.files, key=lambda f: f["bytes"])
    t = time.monotonic()
    body = s3.get_object(Bucket=RESULT_BUCKET, Key=job.prefix + largest["name"],
                         Range=f"bytes={offset}-" if offset else "bytes=0-0")["Body"]
    body.read(1)
    elapsed = time.monotonic() - t
    body.close()
    return elapsed


def write_job_info(workdir: Path, job: Job, data: Dataset) -> Path:
    """batch_job_info.json as 01_create_job.py writes it after a submit and 02_monitor_job.py --wait leaves it when
    the job has completed, with the local manifest beside it.

    Both shapes of a job entry are written (one manifest_s3_key / manifest_local_path, and the newer
    input_folder + manifests list), so the harness runs against either version of the steps."""
    created = common.now_iso()
    local_manifest = workdir / Path(SEED_MANIFEST).name
    shutil.copyfile(data.input_manifest, local_manifest)
    info = {
        "version": 1,
        "region": REGION,
        "account_id": ACCOUNT_ID,
        "source_bucket": SOURCE_BUCKET,
        "source_prefix": SOURCE_PREFIX,
        "result_bucket": RESULT_BUCKET,
        "result_prefix": RESULT_PREFIX,
        "created": created,
        "jobs": [{
            "job_name": job.name,
            "model_id": MODEL_ID,
            "role_arn": ROLE_ARN,
            "embedding_dimension": data.dimension,
            "embedding_purpose": PURPOSE,
            "input_s3_uri": common.s3_uri(SOURCE_BUCKET, SOURCE_PREFIX),
            "output_s3_uri": common.s3_uri(RESULT_BUCKET, RESULT_PREFIX),
            "manifest_local_path": str(local_manifest),
            "manifest_s3_key": SEED_MANIFEST,
            "input_folder": SOURCE_PREFIX,
            "manifests": [{"local_path": str(local_manifest), "s3_key": SEED_MANIFEST, "records": data.records}],
            "record_count": data.records,
            "created": created,
            "client_request_token": "bench",
            "job_arn": job.arn,
            "job_id": job.job_id,
            "status": "Completed",
        }],
    }
    path = workdir / "batch_job_info.json"
    jobinfo.save(path, info)
    return path


# ---------------------------------------------------------------------------------------------------- one process


def index_stats(stats: dict, index: str = VECTOR_INDEX) -> dict:
    return stats["indexes"].get(f"{VECTOR_BUCKET}/{index}") or {}


@dataclass
class ProcessRun:
    """One run of a child process: wall time, rusage, samples of the index's counters while it ran."""

    exit_code: int
    seconds: float
    killed: bool
    peak_rss_mb: float  # ru_maxrss of exactly this process (wait4 in benchmark/launch.py)
    hwm_mb: float  # VmHWM last read from /proc while it ran (a cross-check of the above)
    cpu_seconds: float
    main_thread_cpu: float
    server_cpu: dict
    samples: list[tuple[float, int, float]] = field(default_factory=list)  # (seconds, vectors accepted, RSS MB)
    log: Path | None = None


def run_process(cmd: list[str], *, cwd: Path, env: dict, log: Path, servers: Servers, index: str,
                kill_after: float | None = None, timeout: float = 1800) -> ProcessRun:
    """Run cmd through benchmark/launch.py (for an RSS figure that is the command's own), timing it from its
    fork to its exit; optionally SIGKILL it after kill_after seconds."""
    server_pids = {"s3vectors": servers.s3v.pid, "moto": servers.moto.pid}
    cpu_before = {name: cpu_seconds(pid) for name, pid in server_pids.items()}
    report = log.with_suffix(".rusage.json")
    with open(log, "wb") as out:
        launcher = subprocess.Popen([sys.executable, "-I", "-S", str(LAUNCHER), str(report), *cmd], cwd=cwd,
                                    env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    pid_file = Path(str(report) + ".pid")
    while not pid_file.exists() or len(pid_file.read_text().split()) < 2:
        if launcher.poll() is not None:
            raise SystemExit(f"benchmark/launch.py failed (exit {launcher.returncode}); see {log}")
        time.sleep(0.002)
    pid_text, started_text = pid_file.read_text().split()[:2]
    pid, started = int(pid_text), float(started_text)
    samples: list[tuple[float, int, float]] = []
    hwm = main_cpu = 0.0
    killed = False
    tick = 0
    while launcher.poll() is None:
        now = time.monotonic() - started
        if not killed and (kill_after is not None and now >= kill_after or now >= timeout):
            try:  # only while it is still the launcher's child (never a reused pid)
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(launcher.pid):
                    os.kill(pid, signal.SIGKILL)
                    killed = True
            except (OSError, IndexError):
                pass
        rss = 0.0
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            m = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
            if m:
                hwm = max(hwm, int(m.group(1)) / 1024)
            m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
            rss = int(m.group(1)) / 1024 if m else 0.0
            main_cpu = max(main_cpu, cpu_seconds_thread(pid))
        except OSError:
            pass
        if tick % 2 == 0:
            try:
                samples.append((time.monotonic() - started,
                                index_stats(servers.stats(), index).get("put_vectors_accepted", 0), rss))
            except OSError:
                pass
        tick += 1
        time.sleep(0.05)
    usage = json.loads(report.read_text())
    try:
        samples.append((usage["seconds"], index_stats(servers.stats(), index).get("put_vectors_accepted", 0), 0.0))
    except OSError:
        pass
    cpu_after = {name: cpu_seconds(pid) for name, pid in server_pids.items()}
    return ProcessRun(
        exit_code=usage["exit_code"], seconds=usage["seconds"], killed=killed, peak_rss_mb=usage["maxrss_kb"] / 1024,
        hwm_mb=hwm, cpu_seconds=usage["utime"] + usage["stime"], main_thread_cpu=main_cpu,
        server_cpu={name: cpu_after[name] - cpu_before[name] for name in server_pids}, samples=samples, log=log,
    )


def cpu_seconds_thread(pid: int) -> float:
    """CPU seconds of the main thread of pid (its task id is the pid)."""
    try:
        fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------------- figures


STATS_FIELDS = ("put_requests_accepted", "put_vectors_accepted", "rejected_quota", "rejected_fault_429",
                "rejected_fault_503", "rejected_validation", "bytes_accepted")


def per_vector(process_cpu: float, main_cpu: float, records: int, standin_cpu: float) -> dict:
    """CPU milliseconds a vector (a machine-independent figure beside the rates), and their ratio to the targets."""
    n = max(records, 1)
    return {"cpu_ms_per_vector": process_cpu * 1000 / n, "cpu_ms_per_vector_main": main_cpu * 1000 / n,
            "cpu_ms_per_vector_standin": standin_cpu * 1000 / n,
            "cpu_ratio_process_target": process_cpu * 1000 / n / PROCESS_MS_TARGET,
            "cpu_ratio_main_target": main_cpu * 1000 / n / MAIN_THREAD_MS_TARGET}


def delta(after: dict, before: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in STATS_FIELDS}


def step3_figures(run: ProcessRun, d: dict, after: dict, records: int, dimension: int, global_stats: dict,
                  quota: float = QUOTA_VECTORS) -> dict:
    """Figures of one run of 03 from its process data and the stand-in's counters for that run (d = delta)."""
    text = run.log.read_text(errors="replace") if run.log else ""
    m = re.search(r"Total vectors inserted: (\d+) in ([\d.]+)s \((\d+) requests, (\d+) throttled\)", text)
    accepted_vectors = d["put_vectors_accepted"]
    requests = (d["put_requests_accepted"] + d["rejected_quota"] + d["rejected_fault_429"] + d["rejected_fault_503"]
                + d["rejected_validation"])
    bytes_per_vector = d["bytes_accepted"] / accepted_vectors if accepted_vectors else 0
    per_request = min(MAX_VECTORS_PER_PUT, int(MAX_REQUEST_BYTES // bytes_per_vector)) if bytes_per_vector else 0
    min_requests = math.ceil(accepted_vectors / per_request) if per_request else 0
    # samples hold the index's cumulative counter; this run's share starts at the first sample's value
    base = run.samples[0][1] if run.samples else 0
    first = next(((t, v) for t, v, _ in run.samples if v > base), None)
    steady = last = None
    if first is not None:
        # rate between the first sample that saw vectors of this run and the first that saw all of them
        last = next((t for t, v, _ in run.samples if v - base >= accepted_vectors), run.seconds)
        if last > first[0]:
            steady = (base + accepted_vectors - first[1]) / (last - first[0])
    return {
        "records": records,
        "dimension": dimension,
        "seconds": run.seconds,
        "loader_load_seconds": float(m.group(2)) if m else None,
        "first_vector_at_s": first[0] if first else None,
        "last_vector_at_s": last,
        "after_last_vector_s": run.seconds - last if last is not None else None,
        "vectors_per_s": accepted_vectors / run.seconds if run.seconds else 0,
        "ratio_to_quota": accepted_vectors / run.seconds / quota if run.seconds else 0,
        "steady_vectors_per_s": steady,
        "requests_sent": requests,
        "requests_accepted": d["put_requests_accepted"],
        "min_requests_for_payload": min_requests,
        "vectors_per_request_mean": accepted_vectors / d["put_requests_accepted"] if d["put_requests_accepted"] else 0,
        "vectors_per_request_max": after.get("largest_request_vectors", 0),
        "largest_request_mib": after.get("largest_request_bytes", 0) / 1024 / 1024,
        "bytes_per_vector": bytes_per_vector,
        "throttled_429_quota": d["rejected_quota"],
        "throttled_429_injected": d["rejected_fault_429"],
        "unavailable_503_injected": d["rejected_fault_503"],
        "rejected_validation": d["rejected_validation"],
        "rejected_too_large": global_stats.get("rejected_too_large", 0),
        "loader_throttled_count": int(m.group(4)) if m else None,
        "peak_rss_mb": run.peak_rss_mb,
        "vmhwm_mb": run.hwm_mb,
        "cpu_s_step3": run.cpu_seconds,
        "cpu_s_step3_main_thread": run.main_thread_cpu,
        "cpu_s_s3vectors_standin": run.server_cpu["s3vectors"],
        "cpu_s_moto": run.server_cpu["moto"],
        **per_vector(run.cpu_seconds, run.main_thread_cpu, records, run.server_cpu["s3vectors"]),
        "vectors_accepted": accepted_vectors,
        "vectors_in_index": after.get("vectors", 0),
        "exit_code": run.exit_code,
        "killed": run.killed,
        "timeline": [(round(t, 2), v - base, round(rss)) for t, v, rss in run.samples],
    }


def verify_index(servers: Servers, data: Dataset, job: Job, sample_data: bool) -> tuple[str, str]:
    """Compares the index's keys and metadata with the generated records; with stored data, checks a sample of
    vectors value for value. Returns (verdict, detail)."""
    import numpy as np

    s3v = servers.client("s3vectors")
    want = expected_keys(data.records)
    seen: dict[str, dict] = {}
    token = None
    while True:
        kwargs = {"nextToken": token} if token else {}
        try:
            page = s3v.list_vectors(vectorBucketName=VECTOR_BUCKET, indexName=VECTOR_INDEX, maxResults=1000,
                                    returnMetadata=True, **kwargs)
        except s3v.exceptions.NotFoundException as exc:
            return "MISMATCH", f"no index: {exc}"
        for v in page["vectors"]:
            seen[v["key"]] = v.get("metadata") or {}
        token = page.get("nextToken")
        if not token:
            break
    missing = len(set(want) - set(seen))
    extra = len(set(seen) - set(want))
    bad_meta = sum(1 for k, meta in seen.items() if k in want and
                   (meta.get("source_uri") != want[k] or meta.get("job_id") != job.job_id))
    detail = f"{len(seen):,} keys listed, {missing} missing, {extra} unexpected, {bad_meta} with wrong metadata"
    bad_data = 0
    if sample_data:
        with open(data.files[0]["path"], "rb") as fh:
            lines = [fh.readline() for _ in range(min(50, data.files[0]["records"]))]
        records = [json.loads(line) for line in lines]
        keys = [naming.vector_key(nova.image_uri(r)) for r in records]  # the vector key is the URI's, not the recordId
        got = s3v.get_vectors(vectorBucketName=VECTOR_BUCKET, indexName=VECTOR_INDEX, returnData=True,
                              keys=keys[:100])["vectors"]
        by_key = {v["key"]: v["data"]["float32"] for v in got}
        for key, r in zip(keys, records):
            want_vec = np.asarray(r["modelOutput"]["embeddings"][0]["embedding"], dtype=np.float32)
            have = by_key.get(key)
            if have is None or not np.array_equal(np.asarray(have, dtype=np.float32), want_vec):
                bad_data += 1
        detail += f", {len(records) - bad_data}/{len(records)} sampled vectors equal to the output bit for bit"
    ok = missing == 0 and extra == 0 and bad_meta == 0 and bad_data == 0
    return ("OK" if ok else "MISMATCH"), detail


# ---------------------------------------------------------------------------------------------------- one measurement


def export_revision(rev: str, cache_root: Path) -> Path:
    """The project's files at a git revision, exported (git archive) into the cache: a fixed version to measure
    while the working tree changes. The repository itself is only read."""
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    folder = cache_root / f"src-{sha[:12]}"
    if not (folder / STEP3.name).exists():
        folder.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", "--format=tar", sha], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def step3_command(args, prof: Path | None) -> list[str]:
    extra = list(args.loader_arg or [])
    pin = [shutil.which("taskset") or "taskset", "-c", "0"] if args.cpu_split else []
    script = str(args.source / STEP3.name)
    if prof is not None:
        return [*pin, sys.executable, str(PROFILER), str(prof), script, *extra]
    if args.trace_memory:
        return [*pin, sys.executable, str(TRACER), str(args.trace_memory), script, *extra]
    return [*pin, sys.executable, script, *extra]


def show_timeline(figures: dict, every: float = 0.5) -> None:
    """Vectors the index had accepted from this run, every `every` seconds since the process started."""
    points, next_t, prev = [], 0.0, (0.0, 0)
    for t, v, rss in figures.get("timeline") or []:
        if t >= next_t:
            rate = (v - prev[1]) / (t - prev[0]) if t > prev[0] else 0
            points.append(f"{t:5.1f}s {v:>7,} {rate:>6,.0f}/s {rss:>4.0f}MB")
            prev, next_t = (t, v), t + every
    print("  timeline (seconds since start: vectors accepted, rate since the previous point, RSS of 03):")
    for i in range(0, len(points), 4):
        print("    " + "   ".join(points[i:i + 4]))


def step3_env(servers: Servers, args) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(servers.env)
    if getattr(servers, "files_url", None):
        env["AWS_ENDPOINT_URL_S3"] = servers.files_url  # 03 reads the output from the streaming file server
    env.update({"VECTOR_BUCKET": VECTOR_BUCKET, "VECTOR_INDEX": VECTOR_INDEX, "PYTHONUNBUFFERED": "1"})
    for item in args.loader_env or []:
        name, _, value = item.partition("=")
        env[name] = value
    if args.bytecode == "warm":
        # As on a user's machine after the first run: compiled modules are cached (here outside the project and
        # the venv). This sandbox sets PYTHONDONTWRITEBYTECODE and the venv holds no .pyc, so every process
        # would otherwise compile boto3, botocore and numpy from source (~0.2 s per start).
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(args.cache_dir / "pycache")
    return env


WARM_UP = """
import boto3, numpy, orjson, urllib3
import common
from batch_embeddings import vectors
try:
    from batch_embeddings import accounting, jobs
except ImportError:
    pass
for service in ("s3", "s3vectors", "bedrock"):
    boto3.client(service, region_name="us-east-1")
"""


def warm_bytecode(servers: Servers, args) -> None:
    if args.bytecode == "warm":
        subprocess.run([sys.executable, "-c", WARM_UP], cwd=args.source, env=step3_env(servers, args), check=True)


def measure(args, servers: Servers, data: Dataset, job: Job, n: int, workroot: Path) -> dict:
    """One measurement: fresh index and job-info file, run 03 (killed and run again with --kill-after)."""
    servers.reset_vectors(seed=args.seed + n - 1)  # each measurement its own fault pattern
    ttfb = moto_ttfb(servers, data, job) if args.s3 == "moto" else None
    workdir = workroot / f"run-{n}"
    workdir.mkdir(parents=True)
    write_job_info(workdir, job, data)
    env = step3_env(servers, args)
    result: dict = {"workdir": str(workdir)}
    runs = []
    before = {}
    kill = args.kill_after
    for attempt in (1, 2) if kill is not None else (1,):
        prof = workdir / f"profile-{attempt}" if args.profile else None
        run = run_process(step3_command(args, prof), cwd=workdir, env=env, log=workdir / f"03-run{attempt}.log",
                          servers=servers, index=VECTOR_INDEX, kill_after=kill if attempt == 1 else None,
                          timeout=args.timeout)
        stats = servers.stats()
        after = index_stats(stats)
        figures = step3_figures(run, delta(after, before), after, data.records, data.dimension, stats["global"],
                                args.quota)
        figures["profile"] = str(prof) if prof else None
        resumed_at = re.search(r"\(from byte (\d+)\)", run.log.read_text(errors="replace"))
        if resumed_at and args.s3 == "moto":  # moto copies the object from that byte on before it answers
            figures["moto_ttfb_s"] = moto_ttfb(servers, data, job, int(resumed_at.group(1)))
        runs.append(figures)
        before = after
        if attempt == 1 and kill is not None and not run.killed:
            print(f"  (run 1 ended by itself after {run.seconds:.1f}s, before --kill-after {kill}s)")
            break
    result["runs"] = runs
    final = index_stats(servers.stats())
    total = dict(runs[-1])
    if len(runs) > 1:
        total = combine(runs, final, args.quota)
    total["resent_vectors"] = final.get("put_vectors_accepted", 0) - data.records
    verdict, detail = verify_index(servers, data, job, sample_data=args.store_data)
    total["index_check"] = ("OK" if final.get("vectors", 0) == data.records else "MISMATCH")
    total["keys_check"] = verdict
    total["keys_detail"] = detail
    if len(runs) > 1 and runs[1].get("moto_ttfb_s") is not None:
        total["moto_ttfb_resume_s"] = runs[1]["moto_ttfb_s"]
    total["moto_ttfb_s"] = ttfb
    result["total"] = total
    if args.baseline:
        result["article"] = measure_article(args, servers, data, job, workdir)
    return result


def combine(runs: list[dict], final: dict, quota: float) -> dict:
    """Both runs of a --kill-after measurement as one: times and counts add up, maxima are maxima."""
    out = dict(runs[-1])
    for key in ("seconds", "requests_sent", "requests_accepted", "throttled_429_quota", "throttled_429_injected",
                "unavailable_503_injected", "rejected_validation", "cpu_s_step3", "cpu_s_step3_main_thread",
                "cpu_s_s3vectors_standin", "cpu_s_moto", "vectors_accepted", "min_requests_for_payload"):
        out[key] = sum(r[key] or 0 for r in runs)
    for key in ("peak_rss_mb", "vmhwm_mb", "vectors_per_request_max", "largest_request_mib"):
        out[key] = max(r[key] or 0 for r in runs)
    out["vectors_per_s"] = out["records"] / out["seconds"]
    out["ratio_to_quota"] = out["vectors_per_s"] / quota
    out["vectors_per_request_mean"] = out["vectors_accepted"] / out["requests_accepted"] if out["requests_accepted"] else 0
    out["vectors_in_index"] = final.get("vectors", 0)
    out["first_vector_at_s"] = runs[0]["first_vector_at_s"]
    out["steady_vectors_per_s"] = None
    out["loader_load_seconds"] = None
    out.update(per_vector(out["cpu_s_step3"], out["cpu_s_step3_main_thread"], out["records"],
                          out["cpu_s_s3vectors_standin"]))
    return out


def measure_article(args, servers: Servers, data: Dataset, job: Job, workdir: Path) -> dict:
    limit = min(data.records, args.article_records)
    print(f"  article's approach on {limit:,} of {data.records:,} records (fresh index {ARTICLE_INDEX}) ...",
          flush=True)
    env = step3_env(servers, args)
    cmd = [sys.executable, str(ARTICLE), "--bucket", RESULT_BUCKET, "--prefix", job.prefix, "--vector-bucket",
           VECTOR_BUCKET, "--index", ARTICLE_INDEX, "--dimension", str(data.dimension), "--limit", str(limit)]
    run = run_process(cmd, cwd=workdir, env=env, log=workdir / "article.log", servers=servers, index=ARTICLE_INDEX,
                      timeout=args.timeout)
    stats = index_stats(servers.stats(), ARTICLE_INDEX)
    lines = run.log.read_text(errors="replace").strip().splitlines()
    own = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    vectors = stats.get("vectors", 0)
    return {
        "records": limit,
        "seconds": run.seconds,
        "vectors_per_s": vectors / run.seconds if run.seconds else 0,
        "insert_phase_vectors_per_s": vectors / own["insert_seconds"] if own.get("insert_seconds") else None,
        "download_seconds": own.get("download_seconds"),
        "parse_seconds": own.get("parse_seconds"),
        "insert_seconds": own.get("insert_seconds"),
        "requests": stats.get("put_requests_accepted", 0),
        "peak_rss_mb": run.peak_rss_mb,
        "cpu_s": run.cpu_seconds,
        "vectors_in_index": vectors,
        "exit_code": run.exit_code,
    }


# ---------------------------------------------------------------------------------------------------- output


LABELS = {
    "records": ("records", "{:,}"),
    "dimension": ("dimension", "{}"),
    "seconds": ("seconds (03 process start to exit)", "{:.2f}"),
    "loader_load_seconds": ("  of which 03's own load phase", "{:.2f}"),
    "first_vector_at_s": ("first vector accepted at (s)", "{:.2f}"),
    "moto_ttfb_s": ("  moto's time to first byte of the file (s)", "{:.2f}"),
    "moto_ttfb_resume_s": ("  moto's time to first byte, resumed GET (s)", "{:.2f}"),
    "last_vector_at_s": ("last vector accepted at (s)", "{:.2f}"),
    "after_last_vector_s": ("  03's time after the last vector (s)", "{:.2f}"),
    "vectors_per_s": ("vectors/s (end to end)", "{:,.0f}"),
    "ratio_to_quota": ("ratio to the index's quota", "{:.1%}"),
    "steady_vectors_per_s": ("vectors/s once loading (first to last vector)", "{:,.0f}"),
    "requests_sent": ("requests sent (accepted + rejected)", "{:,}"),
    "requests_accepted": ("requests accepted", "{:,}"),
    "min_requests_for_payload": ("fewest requests 500 vectors / 20 MiB allow", "{:,}"),
    "vectors_per_request_mean": ("vectors per request, mean", "{:.1f}"),
    "vectors_per_request_max": ("vectors per request, largest", "{:,}"),
    "largest_request_mib": ("largest request (MiB)", "{:.2f}"),
    "bytes_per_vector": ("bytes per vector in requests", "{:,.0f}"),
    "throttled_429_quota": ("429 quota rejections", "{:,}"),
    "throttled_429_injected": ("429 injected faults", "{:,}"),
    "unavailable_503_injected": ("503 injected faults", "{:,}"),
    "rejected_validation": ("400 validation rejections", "{:,}"),
    "rejected_too_large": ("requests over 20 MiB (stand-in total)", "{:,}"),
    "loader_throttled_count": ("throttled, as 03 counted them", "{}"),
    "peak_rss_mb": ("peak RSS of 03 (MB, ru_maxrss)", "{:.0f}"),
    "vmhwm_mb": ("  VmHWM seen in /proc (MB)", "{:.0f}"),
    "cpu_s_step3": ("CPU s of 03 (user+sys)", "{:.2f}"),
    "cpu_s_step3_main_thread": ("  of which its main thread", "{:.2f}"),
    "cpu_s_s3vectors_standin": ("CPU s of the S3 Vectors stand-in", "{:.2f}"),
    "cpu_s_moto": ("CPU s of moto", "{:.2f}"),
    "cpu_ms_per_vector": ("CPU ms a vector, 03 (target <= 0.30)", "{:.3f}"),
    "cpu_ms_per_vector_main": ("CPU ms a vector, 03's main thread (<= 0.15)", "{:.3f}"),
    "cpu_ms_per_vector_standin": ("CPU ms a vector, S3 Vectors stand-in", "{:.3f}"),
    "vectors_accepted": ("vectors accepted (sent successfully)", "{:,}"),
    "resent_vectors": ("re-sent vectors (accepted - records)", "{:,}"),
    "vectors_in_index": ("vectors in the index at the end", "{:,}"),
    "index_check": ("index holds every record", "{}"),
    "keys_check": ("keys and metadata", "{}"),
    "exit_code": ("exit code of 03", "{}"),
    "killed": ("killed (SIGKILL)", "{}"),
}
ARTICLE_LABELS = {
    "records": ("records loaded", "{:,}"),
    "seconds": ("seconds (process start to exit)", "{:.2f}"),
    "vectors_per_s": ("vectors/s (end to end)", "{:,.1f}"),
    "insert_phase_vectors_per_s": ("vectors/s while inserting", "{:,.1f}"),
    "download_seconds": ("download s", "{:.2f}"),
    "parse_seconds": ("json.loads s", "{:.2f}"),
    "insert_seconds": ("insert s", "{:.2f}"),
    "requests": ("requests", "{:,}"),
    "peak_rss_mb": ("peak RSS (MB)", "{:.0f}"),
    "cpu_s": ("CPU s", "{:.2f}"),
    "vectors_in_index": ("vectors in its index", "{:,}"),
    "exit_code": ("exit code", "{}"),
}


def show(title: str, figures: dict, labels: dict = LABELS) -> None:
    print(f"--- {title}")
    for key, (label, fmt) in labels.items():
        if key not in figures:
            continue
        value = figures[key]
        text = "-" if value is None else fmt.format(value)
        if key == "index_check":
            text = f"{text} ({figures['vectors_in_index']:,} of {figures['records']:,})"
        if key == "keys_check" and figures.get("keys_detail"):
            text = f"{text} ({figures['keys_detail']})"
        print(f"  {label:<46} {text}")


def median_of(dicts: list[dict]) -> dict:
    out: dict = {}
    for key in dicts[0]:
        values = [d.get(key) for d in dicts]
        if any(isinstance(v, (list, dict)) for v in values):
            continue
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = statistics.median(values)
        elif all(v == values[0] for v in values):
            out[key] = values[0]
        else:
            out[key] = "/".join(str(v) for v in values)
    return out


def verdicts(total: dict, quota: float, faults: bool = False) -> list[str]:
    """PASS/MISS against the targets; with injected faults, once loading is held to 0.8 of the quota."""
    out = []
    rate_ok = total["vectors_per_s"] >= TARGET_RATIO * quota
    out.append(f"{'PASS' if rate_ok else 'MISS'} throughput: {total['vectors_per_s']:,.0f} vectors/s end to end "
               f"(target >= {TARGET_RATIO * quota:,.0f})")
    steady = total.get("steady_vectors_per_s")
    if steady is not None:
        target = (FAULT_TARGET_RATIO if faults else STEADY_TARGET_RATIO) * quota
        out.append(f"{'PASS' if steady >= target else 'MISS'} once loading: {steady:,.0f} vectors/s, "
                   f"{steady / quota:.2f} of the quota (target >= {target:,.0f}{' with faults' if faults else ''})")
    for key, target, what in (("cpu_ms_per_vector_main", MAIN_THREAD_MS_TARGET, "main-thread CPU"),
                              ("cpu_ms_per_vector", PROCESS_MS_TARGET, "process CPU")):
        value = total.get(key)
        if value is not None:
            out.append(f"{'PASS' if value <= target else 'MISS'} {what}: {value:.3f} ms a vector "
                       f"({value / target:.2f} of the target {target} ms)")
    rss_ok = total["peak_rss_mb"] <= RSS_TARGET_MB
    out.append(f"{'PASS' if rss_ok else 'MISS'} memory: peak RSS {total['peak_rss_mb']:.0f} MB "
               f"(target <= {RSS_TARGET_MB} MB)")
    extra = total["requests_accepted"] - total["min_requests_for_payload"]
    out.append(f"{'PASS' if extra <= max(1, 0.02 * total['min_requests_for_payload']) else 'NOTE'} requests: "
               f"{total['requests_accepted']:,} accepted for {total['vectors_accepted']:,} vectors, fewest possible "
               f"{total['min_requests_for_payload']:,}")
    once = total["index_check"] == "OK" and total["keys_check"] == "OK"
    out.append(f"{'PASS' if once else 'FAIL'} every vector present exactly once: {total['vectors_in_index']:,} of "
               f"{total['records']:,} in the index, {total['resent_vectors']:,} re-sent")
    out.append(f"{'PASS' if total['exit_code'] == 0 else 'FAIL'} exit code of 03: {total['exit_code']}")
    return out


# ---------------------------------------------------------------------------------------------------- profile


def show_profile(prefix: Path, top: int = 18) -> None:
    import io
    import pstats

    for part, sort in (("main", "tottime"), ("main", "cumulative"), ("threads", "tottime")):
        path = Path(f"{prefix}.{part}.prof")
        if not path.exists():
            continue
        buf = io.StringIO()
        stats = pstats.Stats(str(path), stream=buf)
        stats.strip_dirs().sort_stats(sort).print_stats(top)
        text = buf.getvalue()
        body = text[text.find("   ncalls"):] if "   ncalls" in text else text
        print(f"--- profile of 03, {part} thread(s), by {sort} ({path})")
        print(body.rstrip())


# ---------------------------------------------------------------------------------------------------- main


def git_head() -> str:
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return head.stdout.strip() + (" + uncommitted changes" if dirty else "")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Targets: >= 90%% of the 2,500 vectors/s quota end to end, peak RSS <= 256 MB, "
                                       "every vector exactly once (faults, SIGKILL + rerun).")
    p.add_argument("--records", type=int, default=10_000, help="records in the job output (10000)")
    p.add_argument("--dimension", type=int, default=3072, choices=common.DIMENSIONS)
    p.add_argument("--quota", type=float, default=QUOTA_VECTORS,
                   help="the stand-in's write quota in vectors/s (2500); 03 still assumes its own --vectors-per-second "
                        "(2500): a lower value shows how it finds a smaller or shared quota")
    p.add_argument("--fault-rate", type=float, default=0.0, help="share of PutVectors answered 429/503 (0)")
    p.add_argument("--s3", choices=("files", "moto"), default="files",
                   help="what serves the job output to 03: files streamed from disk like S3 (default), or moto, "
                        "which reads a whole object before its first byte")
    p.add_argument("--kill-after", type=float, metavar="SECONDS", help="SIGKILL 03 after this long, then rerun it")
    p.add_argument("--baseline", action="store_true", help="also run the article's approach (benchmark/article_loader.py)")
    p.add_argument("--article-records", type=int, default=2000,
                   help="records the article's approach loads (2000; it takes ~1 s per 100)")
    p.add_argument("--repeat", type=int, default=1, help="measurements; the median of each figure is printed")
    p.add_argument("--numbers", choices=("double", "float32"), default="double",
                   help="how the output writes each value: Python's float text, as the Bedrock emulator does "
                        "(default), or float32 shortest text")
    p.add_argument("--records-per-file", type=int, default=50_000, help="records per .jsonl.out (50000)")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "bedrock-batch-bench-cache",
                   help="where generated output is kept between runs")
    p.add_argument("--store-data", choices=("auto", "yes", "no"), default="auto",
                   help="whether the stand-in keeps vector data (auto: only up to 10,000 records)")
    p.add_argument("--seed", type=int, default=1, help="seed of the stand-in's fault injection")
    p.add_argument("--profile", action="store_true", help="run 03 under cProfile (all threads) and print the top")
    p.add_argument("--trace-memory", type=Path, metavar="FILE",
                   help="run 03 under tracemalloc (benchmark/trace_memory.py) and write its peak allocations to FILE")
    p.add_argument("--loader-arg", action="append", metavar="ARG", help="pass ARG to 03 (repeatable), e.g. "
                   "--loader-arg=--threads=8")
    p.add_argument("--loader-env", action="append", metavar="NAME=VALUE",
                   help="extra environment for 03 (repeatable), e.g. MALLOC_ARENA_MAX=2")
    p.add_argument("--timeout", type=float, default=1800, help="kill a run of 03 after this long (1800 s)")
    p.add_argument("--rev", metavar="REV",
                   help="measure the steps as committed at this git revision (exported to the cache dir) instead "
                        "of the working tree")
    p.add_argument("--bytecode", choices=("warm", "env"), default="warm",
                   help="warm: 03 runs with a bytecode cache, as after a first run (default); env: as this "
                        "environment says (here PYTHONDONTWRITEBYTECODE=1: every start compiles from source)")
    p.add_argument("--timeline", action="store_true", help="print vectors accepted every 0.5 s of each run")
    p.add_argument("--cpu-split", action="store_true",
                   help="diagnostic: pin 03 to CPU 0 and moto + the S3 Vectors stand-in to CPU 1")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, job-info files)")
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    args.store_data = args.store_data == "yes" or (args.store_data == "auto" and args.records <= 10_000)
    args.source = ROOT
    if args.records < 1 or args.repeat < 1 or not 0 <= args.fault_rate <= 1:
        p.error("--records and --repeat must be positive, --fault-rate between 0 and 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workroot = Path(tempfile.mkdtemp(prefix="bench-load-"))
    print(f"Work folder: {workroot}")
    if args.rev:
        args.source = export_revision(args.rev, args.cache_dir)
    print(f"Measuring {args.source / STEP3.name}" + (f" (git {args.rev} = {args.source.name[4:]})" if args.rev else
                                                      f" (working tree; HEAD {git_head()})"))
    data = dataset(args.cache_dir, args.records, args.dimension, args.records_per_file, args.numbers)
    servers = Servers(workroot, fault_rate=args.fault_rate, seed=args.seed, store_data=args.store_data,
                      quota=args.quota)
    results = []
    try:
        if args.cpu_split:
            for pid in (servers.moto.pid, servers.s3v.pid, os.getpid()):
                for tid in os.listdir(f"/proc/{pid}/task"):  # every thread: new ones inherit from their creator
                    os.sched_setaffinity(int(tid), {1})
        print(f"moto {servers.moto_url} (pid {servers.moto.pid}), S3 Vectors stand-in {servers.s3v_url} "
              f"(pid {servers.s3v.pid}; quota {args.quota:,g} vectors/s, {QUOTA_REQUESTS:,} requests/s, "
              f"fault rate {args.fault_rate:g}, store_data={args.store_data}), Bedrock emulator {servers.bedrock_url}; "
              f"bytecode: {args.bytecode}")
        job = create_job(servers, data)
        if args.s3 == "files":
            serve_files(servers, data, job, workroot)
            print(f"03 reads the output from {servers.files_url} (files streamed from disk, as S3 streams them)")
        warm_bytecode(servers, args)
        print(f"Job {job.job_id} Completed in the emulator; output s3://{RESULT_BUCKET}/{job.prefix} "
              f"({len(data.files)} file(s), {data.bytes / 1e6:,.0f} MB)")
        for n in range(1, args.repeat + 1):
            print(f"=== measurement {n}/{args.repeat}: step 03 on {data.records:,} records x {data.dimension} dims"
                  + (f", SIGKILL after {args.kill_after:g}s then rerun" if args.kill_after is not None else "")
                  + (" (profiled: times are inflated)" if args.profile else ""), flush=True)
            result = measure(args, servers, data, job, n, workroot)
            results.append(result)
            runs = result["runs"]
            if len(runs) > 1:
                show("run 1 (killed)" if runs[0]["killed"] else "run 1", runs[0])
                show("run 2 (resumed)", runs[1])
            show("step 03" + (" (both runs)" if len(runs) > 1 else ""), result["total"])
            if args.timeline:
                for i, run in enumerate(runs, 1):
                    if len(runs) > 1:
                        print(f"  run {i}:")
                    show_timeline(run)
            if "article" in result:
                show("article's approach", result["article"], ARTICLE_LABELS)
            for run in runs:
                if run.get("profile"):
                    show_profile(Path(run["profile"]))
            if args.trace_memory and args.trace_memory.exists():
                print(f"--- tracemalloc of 03 ({args.trace_memory})")
                print(args.trace_memory.read_text().split("\nlargest by traceback")[0])
        totals = [r["total"] for r in results]
        summary = median_of(totals) if len(totals) > 1 else totals[0]
        if len(totals) > 1:
            show(f"median of {len(totals)} measurements", summary)
            for i in (0, 1):
                if all(len(r["runs"]) > i for r in results) and args.kill_after is not None:
                    show(f"median of run {i + 1}", median_of([r["runs"][i] for r in results]))
        article = None
        if args.baseline:
            article = median_of([r["article"] for r in results]) if len(results) > 1 else results[0]["article"]
            if len(results) > 1:
                show(f"article's approach, median of {len(results)}", article, ARTICLE_LABELS)
        print("=== verdict" + (f" (medians of {len(totals)})" if len(totals) > 1 else ""))
        for line in verdicts(summary, args.quota, faults=args.fault_rate > 0):
            print(f"  {line}")
        if article:
            ours = summary["vectors_per_s"]
            note = (f" (the article's approach loaded the first {article['records']:,} of {args.records:,} records)"
                    if article["records"] < args.records else "")
            insert = article.get("insert_phase_vectors_per_s")
            print(f"  ours / article's: {ours / article['vectors_per_s']:.1f}x end to end "
                  f"({ours:,.0f} vs {article['vectors_per_s']:,.1f} vectors/s)"
                  + (f", {ours / insert:.1f}x against its insert phase alone ({insert:,.1f} vectors/s)" if insert else "")
                  + note)
        if args.json:
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                             "results": results, "summary": summary, "article": article},
                                            indent=2, default=str) + "\n")
            print(f"Figures written to {args.json}")
        return 0 if summary["index_check"] == "OK" and summary["exit_code"] == 0 else 1
    finally:
        servers.stop()
        if args.keep:
            print(f"Kept {workroot}")
        else:
            shutil.rmtree(workroot, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
