"""Benchmark of step 01's planning at scale: `01_create_job.py --dry-run` over 10^5 .. 10^7 synthetic images.

    uv run python -m benchmark.bench_plan --images 1000000 --latency 0.05 [--indexed 0] [--repeat 3]
    uv run python -m benchmark.bench_plan --images 10000000 --indexed 9000000 --inventory csv.gz [--repeat 3]
    uv run python -m benchmark.bench_plan --parse-cost          # CPU per 1,000 objects listed, lean or not

A synthetic AWS runs as a process of its own (one loopback port for S3, STS and S3 Vectors): ListObjectsV2 pages
are generated on the fly from a layout (`--folder-size` images a folder, zero-padded names, so key order is
numeric order), with `--latency` seconds per listing request; GetObject serves an S3 Inventory report (gzipped CSV
or Parquet, generated once and cached under the system's temp folder); ListVectors answers over the vector keys of
the first `--indexed` images, in up to 16 segments of up to 1,000 keys a page. The moto server and the S3 Vectors
stand-in of tests/standins hold every object in memory and parse every request fully, which is what 10^7 keys
cannot afford, and their server closes every connection; this server keeps only the layout and keeps connections
alive. launch.py measures step 01.

Step 01 runs as its own process under launch.py (its own peak RSS and CPU seconds, not the harness's). Each run
prints wall and CPU seconds, peak RSS, requests by type, jobs and waves (when 01 prints them), and CPU seconds per
1,000 images; with --repeat N the medians.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import statistics
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STEP1 = ROOT / "01_create_job.py"
LAUNCHER = HERE / "launch.py"
ACCOUNT = "123456789012"
SOURCE_BUCKET = "bench-source-images"
PREFIX = "images/"
INVENTORY_BUCKET = "bench-inventory"
VECTOR_BUCKET = "bench-vectors"
VECTOR_INDEX = "bench-index"
PAGE = 1000
ROWS_PER_FILE = 1_000_000


def etag_of(i: int) -> str:
    return f"{i * 2654435761 % 2**32:032x}"


class Layout:
    """N images under PREFIX in folders of F: images/d00000/img-00000.jpg ... (key order = index order)."""

    def __init__(self, images: int, folder_size: int):
        self.images, self.folder_size = images, folder_size
        self.folders = -(-images // folder_size)

    def folder(self, f: int) -> str:
        return f"{PREFIX}d{f:05d}/"

    def key(self, i: int) -> str:
        return f"{self.folder(i // self.folder_size)}img-{i % self.folder_size:05d}.jpg"

    @staticmethod
    def size(i: int) -> int:
        return 20_000 + i % 50_000


# ------------------------------------------------------------------------------------------------- the server


class SyntheticAws:
    """S3 ListObjectsV2/GetObject, STS GetCallerIdentity, S3 Vectors GetIndex/ListVectors, over a Layout.

    `answer(method, path, args, body)` -> (status, content type, bytes or a file to send)."""

    def __init__(self, layout: Layout, indexed: int, latency: float, files: Path | None, changed: float = 0.0,
                 gone: float = 0.0):
        self.layout, self.latency, self.files = layout, latency, files
        self.counts: Counter = Counter()
        # The index's keys, computed once before the server answers: S3 Vectors serves ListVectors from its own
        # fleet, so what the server spends a page should not compete with 01 for this machine's two cores. After
        # the first `indexed` images come the vectors of `gone` (a share of them) images no longer in the bucket;
        # every 1/`changed`-th indexed image records an ETag its object no longer has.
        prefix = f"s3://{SOURCE_BUCKET}/"
        self.gone = int(indexed * gone)
        self.changed_every = round(1 / changed) if changed else 0
        self.uris = [prefix + layout.key(i) for i in range(indexed)]
        self.uris += [f"{prefix}{PREFIX}gone/img-{i:07d}.jpg" for i in range(self.gone)]
        self.keys = np.array([hashlib.sha256(uri.encode()).hexdigest()[:32].encode() for uri in self.uris],
                             dtype="S32")
        self.indexed = len(self.keys)
        self.lock = threading.Lock()

    def metadata(self, i: int) -> bytes:
        """What a vector this tool wrote records of its image: the URI, the ETag and size it was listed with."""
        etag = etag_of(i) if i < self.layout.images and not (self.changed_every and i % self.changed_every == 0) \
            else "f" * 32
        return b',"metadata":{"source_uri":"%s","etag":"%s","size":%d,"job_id":"bench"}' % (
            self.uris[i].encode(), etag.encode(), Layout.size(i))

    def answer(self, method: str, path: str, args: dict, body: bytes):
        if path == "/_stats":
            return 200, "application/json", orjson.dumps(dict(self.counts))
        if method == "POST" and path in ("/GetIndex", "/ListVectors"):
            return self.vectors(path[1:], orjson.loads(body or b"{}"))
        if method == "POST" and path == "/":
            self.count("sts:GetCallerIdentity")
            return 200, "text/xml", (
                '<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><GetCallerIdentityResult>'
                f"<Arn>arn:aws:iam::{ACCOUNT}:user/bench</Arn><UserId>AIDABENCH</UserId><Account>{ACCOUNT}</Account>"
                "</GetCallerIdentityResult><ResponseMetadata><RequestId>1</RequestId></ResponseMetadata>"
                "</GetCallerIdentityResponse>").encode()
        if method == "GET" and "list-type" in args:
            self.count("s3:ListObjectsV2")
            if self.latency:
                time.sleep(self.latency)
            return 200, "application/xml", self.list_page(args)
        if method == "GET":
            return self.get_object(urllib.parse.unquote(path))
        return 400, "text/plain", b"unsupported"

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1

    def list_page(self, args) -> bytes:
        prefix, delimiter = args.get("prefix", ""), args.get("delimiter")
        start = int(args.get("continuation-token") or 0)
        size = min(int(args.get("max-keys") or PAGE), PAGE)
        lay = self.layout
        indexes: range = range(0)
        prefixes: list[str] = []
        if prefix == PREFIX and delimiter == "/":
            total = lay.folders
            prefixes = [lay.folder(f) for f in range(start, min(start + size, total))]
        elif prefix == PREFIX or prefix == "":
            total = lay.images
            indexes = range(start, min(start + size, total))
        elif re.fullmatch(re.escape(PREFIX) + r"d\d{5}/", prefix):
            f = int(prefix[len(PREFIX) + 1:-1])
            first = f * lay.folder_size
            total = max(0, min(lay.folder_size, lay.images - first))
            indexes = range(first + start, first + min(start + size, total))
        else:
            total = 0
        end = start + len(indexes) + len(prefixes)
        truncated = end < total
        # S3's order (the API reference's examples): the paging fields before the first <Contents>.
        body = ['<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="http://s3.amazonaws.com/doc/'
                f'2006-03-01/"><Name>{SOURCE_BUCKET}</Name><Prefix>{prefix}</Prefix>'
                + (f"<NextContinuationToken>{end}</NextContinuationToken>" if truncated else "")
                + f"<KeyCount>{end - start}</KeyCount><MaxKeys>{size}</MaxKeys>"
                + (f"<Delimiter>{delimiter}</Delimiter>" if delimiter else "")
                + ("<EncodingType>url</EncodingType>" if args.get("encoding-type") else "")
                + f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"]
        for i in indexes:
            body.append(f"<Contents><Key>{lay.key(i)}</Key><LastModified>2026-11-30T12:00:00.000Z</LastModified>"
                        f"<ETag>&quot;{etag_of(i)}&quot;</ETag>"
                        f"<Size>{Layout.size(i)}</Size><StorageClass>STANDARD</StorageClass></Contents>")
        body += [f"<CommonPrefixes><Prefix>{p}</Prefix></CommonPrefixes>" for p in prefixes]
        body.append("</ListBucketResult>")
        return "".join(body).encode()

    def get_object(self, path: str):
        self.count("s3:GetObject")
        bucket, _, key = path.lstrip("/").partition("/")
        file = (self.files / key) if self.files and bucket == INVENTORY_BUCKET else None
        if file is None or not file.is_file():
            return 404, "application/xml", b"<Error><Code>NoSuchKey</Code><Message>no such key</Message></Error>"
        return 200, "application/octet-stream", file

    def vectors(self, operation: str, body: dict):
        self.count(f"s3vectors:{operation}")
        if operation == "GetIndex":
            answer = {"index": {"vectorBucketName": VECTOR_BUCKET, "indexName": VECTOR_INDEX, "dimension": 1024,
                                "dataType": "float32", "distanceMetric": "cosine", "creationTime": 1764547200,
                                "indexArn": f"arn:aws:s3vectors:us-east-1:{ACCOUNT}:bucket/{VECTOR_BUCKET}/index/"
                                            f"{VECTOR_INDEX}"}}
            return 200, "application/json", orjson.dumps(answer)
        count, index = body.get("segmentCount", 1), body.get("segmentIndex", 0)
        size = min(body.get("maxResults", 500), PAGE)
        start = int(body.get("nextToken") or index)  # images index, index + count, index + 2 count, ...
        picks = range(start, self.indexed, count)[:size]
        keys = self.keys[picks.start:picks.stop:picks.step].tolist() if picks else []
        if body.get("returnMetadata"):
            page = b'{"vectors":[' + b",".join(b'{"key":"%s"%s}' % (key, self.metadata(i))
                                               for key, i in zip(keys, picks)) + b"]"
        else:
            page = b'{"vectors":[' + b",".join(b'{"key":"%s"}' % key for key in keys) + b"]"
        following = start + size * count
        if following < self.indexed:
            page += b',"nextToken":"%d"' % following
        return 200, "application/json", page + b"}"


def serve_main(args) -> int:
    """The synthetic AWS on a loopback port, HTTP/1.1 with keep-alive as AWS answers (werkzeug's development
    server, which tests/standins use, closes every connection: a new TCP connection a request is not what a
    client of AWS pays)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    app = SyntheticAws(Layout(args.images, args.folder_size), args.indexed, args.latency,
                       Path(args.files) if args.files else None, args.changed, args.gone)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go in separate writes: no 40 ms delayed-ACK stall

        def log_message(self, *_):
            pass

        def handle_one_request_body(self, method: str) -> None:
            url = urllib.parse.urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            args = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
            status, ctype, payload = app.answer(method, url.path, args, body)
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            size = payload.stat().st_size if isinstance(payload, Path) else len(payload)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            if isinstance(payload, Path):
                with open(payload, "rb") as fh:
                    while chunk := fh.read(1 << 20):
                        self.wfile.write(chunk)
            else:
                self.wfile.write(payload)

        def do_GET(self):
            self.handle_one_request_body("GET")

        def do_POST(self):
            self.handle_one_request_body("POST")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"http://127.0.0.1:{server.server_port}", flush=True)
    sys.stdin.read()  # until the harness closes our stdin
    server.shutdown()
    return 0


# ---------------------------------------------------------------------------------------- the inventory report


def inventory(layout: Layout, fmt: str) -> Path:
    """A report of the layout (cached): <dir>/inv/manifest.json and its data files."""
    folder = Path(tempfile.gettempdir()) / f"bench-plan-inventory-etag-{layout.images}-{layout.folder_size}-{fmt}"
    manifest = folder / "inv" / "manifest.json"
    if manifest.exists():
        return folder
    (folder / "inv" / "data").mkdir(parents=True, exist_ok=True)
    files = []
    for n, first in enumerate(range(0, layout.images, ROWS_PER_FILE)):
        last = min(first + ROWS_PER_FILE, layout.images)
        name = f"inv/data/part-{n:03d}.{fmt}"
        path = folder / name
        print(f"  writing {name} ({last - first} rows)", file=sys.stderr)
        if fmt == "csv.gz":
            with gzip.open(path, "wb", compresslevel=1) as out:
                for i in range(first, last, 10_000):
                    out.write("".join(f'"{SOURCE_BUCKET}","{layout.key(j)}","{Layout.size(j)}","{etag_of(j)}"\n'
                                      for j in range(i, min(i + 10_000, last))).encode())
        else:
            import duckdb

            con = duckdb.connect()
            con.execute(f"""COPY (SELECT '{SOURCE_BUCKET}' AS bucket,
                                 '{PREFIX}d' || lpad(CAST(i // {layout.folder_size} AS VARCHAR), 5, '0') || '/img-' ||
                                 lpad(CAST(i % {layout.folder_size} AS VARCHAR), 5, '0') || '.jpg' AS key,
                                 20000 + i % 50000 AS size,
                                 lpad(printf('%x', (i * 2654435761) % 4294967296), 32, '0') AS e_tag
                          FROM range({first}, {last}) t(i)) TO '{path}' (FORMAT PARQUET)""")
            con.close()
        files.append({"key": name, "size": path.stat().st_size,
                      "MD5checksum": hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()})
    doc = {"sourceBucket": SOURCE_BUCKET, "destinationBucket": f"arn:aws:s3:::{INVENTORY_BUCKET}",
           "version": "2016-11-30", "creationTimestamp": "1764547200000",
           "fileFormat": "CSV" if fmt == "csv.gz" else "Parquet", "fileSchema": "Bucket, Key, Size, ETag", "files": files}
    manifest.write_text(json.dumps(doc))
    return folder


# --------------------------------------------------------------------------------------------------- the runs


def start_server(args, files: Path | None):
    cmd = [sys.executable, "-m", "benchmark.bench_plan", "--serve", "--images", str(args.images), "--folder-size",
           str(args.folder_size), "--indexed", str(args.indexed), "--latency", str(args.latency),
           "--changed", str(args.changed), "--gone", str(args.gone)]
    if files:
        cmd += ["--files", str(files)]
    server = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return server, server.stdout.readline().strip()


def env_for(url: str, workdir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({
        "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true",
        **{f"AWS_ENDPOINT_URL_{s}": url for s in ("S3", "STS", "S3VECTORS", "BEDROCK", "BEDROCK_RUNTIME")},
        "SOURCE_BUCKET": SOURCE_BUCKET, "SOURCE_PREFIX": PREFIX, "RESULT_BUCKET": "bench-results",
        "RESULT_PREFIX": "output/", "ROLE_ARN": f"arn:aws:iam::{ACCOUNT}:role/BedrockBatchRole",
        "VECTOR_BUCKET": VECTOR_BUCKET, "VECTOR_INDEX": VECTOR_INDEX, "EMBEDDING_DIMENSION": "1024",
        "JOB_INFO_FILE": str(workdir / "batch_job_info.json"), "PYTHONIOENCODING": "utf-8",
    })
    return env


def run_once(args, url: str, n: int, kept: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-plan-") as work:
        workdir = kept or Path(work)  # kept: the index's cache (mirror.py) stays from one run to the next
        report = workdir / "launch.json"
        step = [str(STEP1)]
        if args.profile:  # cProfile of every thread of 01, written next to --profile's prefix
            step = [str(ROOT / "benchmark" / "profile_step.py"), f"{args.profile}-{n}", str(STEP1)]
        cmd = [sys.executable, "-I", "-S", str(LAUNCHER), str(report), sys.executable, *step, "--dry-run"]
        if args.inventory:
            cmd += ["--inventory", f"s3://{INVENTORY_BUCKET}/inv/manifest.json"]
        urllib.request.urlopen(url + "/_stats").read()
        before = json.loads(urllib.request.urlopen(url + "/_stats").read())
        limit = f"ulimit -n {args.ulimit} && " if args.ulimit else ""
        shell = limit + " ".join(f"'{c}'" for c in cmd)
        done = subprocess.run(["bash", "-c", shell], cwd=workdir, env=env_for(url, workdir), capture_output=True,
                              text=True)
        if done.returncode != 0:
            sys.exit(f"01 failed ({done.returncode}): {done.stderr[-2000:]}")
        measured = json.loads(report.read_text())
        after = json.loads(urllib.request.urlopen(url + "/_stats").read())
    out = done.stdout
    requests = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
    jobs = re.search(r"Planned (\d+) job", out)
    waves = re.search(r"(\d+) wave", out)
    found = re.search(r"Found (\d+) images", out)
    cpu = measured["utime"] + measured["stime"]
    mirror = re.search(r"Against the index: (\d+) new, (\d+) changed, (\d+) unchanged, (\d+) gone", out)
    result = {"run": n, "index_state": "cache" if "from the local cache" in out else "read",
              "wall_s": round(measured["seconds"], 1), "cpu_s": round(cpu, 1),
              "peak_rss_mb": round(measured["maxrss_kb"] / 1024), "requests": requests,
              "images_to_embed": int(found.group(1)) if found else None,
              "jobs": int(jobs.group(1)) if jobs else None, "waves": int(waves.group(1)) if waves else None,
              "cpu_s_per_1000_images": round(1000 * cpu / args.images, 4),
              "new_changed_unchanged_gone": [int(g) for g in mirror.groups()] if mirror else None}
    print(json.dumps(result), flush=True)
    return result


def parse_cost(args) -> int:
    """CPU seconds per 1,000 objects listed, sequentially, with botocore's full parse and with the lean one."""
    import common
    from batch_embeddings import listing

    os.environ.update(env_for("", Path(tempfile.gettempdir())))
    args.latency = 0.0
    server, url = start_server(args, None)
    try:
        os.environ.update({f"AWS_ENDPOINT_URL_{s}": url for s in ("S3", "STS", "S3VECTORS")})
        config = common.load_config(argparse.Namespace(), env=os.environ)
        for name in ("full", "lean", "full", "lean", "full", "lean"):
            s3 = common.make_client("s3", config)
            if name == "lean":
                listing.fast_listing_client(s3)
            t0 = time.process_time()
            n = sum(1 for _ in listing.list_sequential(s3, SOURCE_BUCKET, PREFIX, ACCOUNT))
            print(json.dumps({"parse": name, "objects": n,
                              "cpu_s_per_1000": round(1000 * (time.process_time() - t0) / n, 4)}), flush=True)
    finally:
        server.stdin.close()
        server.wait()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--folder-size", type=int, default=2000)
    parser.add_argument("--indexed", type=int, default=0, help="images already in the index (the first ones)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to each ListObjectsV2 request")
    parser.add_argument("--inventory", choices=["csv.gz", "parquet"], help="read an S3 Inventory report instead")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--changed", type=float, default=0.0, help="share of the indexed images whose object changed")
    parser.add_argument("--gone", type=float, default=0.0,
                        help="vectors of images gone from the bucket, as a share of the indexed images")
    parser.add_argument("--keep-cache", action="store_true",
                        help="one work folder for every run: the first reads the index, the others its cache")
    parser.add_argument("--ulimit", type=int, default=256, help="open-file limit of 01 (0: leave as it is)")
    parser.add_argument("--parse-cost", action="store_true", help="measure CPU per 1,000 objects listed")
    parser.add_argument("--profile", metavar="PREFIX",
                        help="run 01 under cProfile, every thread: PREFIX-N.main.prof and PREFIX-N.threads.prof")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve_main(args)
    if args.parse_cost:
        return parse_cost(args)
    files = inventory(Layout(args.images, args.folder_size), args.inventory) if args.inventory else None
    print(f"# {' '.join(sys.argv)}\n# uptime: {os.popen('uptime').read().strip()}", flush=True)
    server, url = start_server(args, files)
    kept = Path(tempfile.mkdtemp(prefix="bench-plan-kept-")) if args.keep_cache else None
    try:
        results = [run_once(args, url, n + 1, kept) for n in range(args.repeat + bool(kept))]
    finally:
        server.stdin.close()
        server.wait()
        if kept:
            shutil.rmtree(kept, ignore_errors=True)
    for kind in ("read", "cache"):
        runs = [r for r in results if r["index_state"] == kind]
        if len(runs) > 1:
            print(json.dumps({"index_state": kind, "median_wall_s": statistics.median(r["wall_s"] for r in runs),
                              "median_cpu_s": statistics.median(r["cpu_s"] for r in runs),
                              "median_peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs)}))
    print(f"# uptime: {os.popen('uptime').read().strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
