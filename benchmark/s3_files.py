"""A read-only S3 for the benchmark: ListObjectsV2 and GetObject (with Range) on files streamed from disk.

moto reads a whole object into memory before it answers a GET (seconds for a 3.5 GB job output), which real S3
does not; serving the generated output from here lets the benchmark measure step 03 rather than moto. Only what
step 03 reads is answered; anything else is 501.

    python -m benchmark.s3_files --port 0 --objects objects.json   # {"bucket": ..., "objects": {key: path}}
"""

from __future__ import annotations

import argparse
import email.utils
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from xml.sax.saxutils import escape

from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

CHUNK = 1 << 20


class Quiet(WSGIRequestHandler):
    def log_request(self, *args, **kwargs) -> None:
        pass


def make_app(bucket: str, objects: dict[str, str]):
    files = {key: Path(path) for key, path in objects.items()}

    def etag(path: Path) -> str:
        return '"' + hashlib.md5(f"{path}:{path.stat().st_size}".encode()).hexdigest() + '"'

    def listing(request: Request) -> Response:
        prefix = request.args.get("prefix", "")
        rows = "".join(
            f"<Contents><Key>{escape(key)}</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified>"
            f"<ETag>{escape(etag(path))}</ETag><Size>{path.stat().st_size}</Size>"
            f"<StorageClass>STANDARD</StorageClass></Contents>"
            for key, path in sorted(files.items()) if key.startswith(prefix))
        count = sum(1 for key in files if key.startswith(prefix))
        body = (f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>{bucket}</Name>'
                f"<Prefix>{escape(prefix)}</Prefix><KeyCount>{count}</KeyCount><MaxKeys>1000</MaxKeys>"
                f"<IsTruncated>false</IsTruncated>{rows}</ListBucketResult>")
        return Response(body, content_type="application/xml")

    def get(request: Request, key: str) -> Response:
        path = files.get(key)
        if path is None:
            body = f"<Error><Code>NoSuchKey</Code><Message>{escape(key)}</Message></Error>"
            return Response(body, status=404, content_type="application/xml")
        size = path.stat().st_size
        start, end, status = 0, size - 1, 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("Range", ""))
        if match:
            start, status = int(match.group(1)), 206
            end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1

        def stream():
            with open(path, "rb") as fh:
                fh.seek(start)
                left = end - start + 1
                while left > 0:
                    chunk = fh.read(min(CHUNK, left))
                    if not chunk:
                        return
                    left -= len(chunk)
                    yield chunk

        headers = {"Content-Length": str(end - start + 1), "ETag": etag(path), "Accept-Ranges": "bytes",
                   "Last-Modified": email.utils.formatdate(path.stat().st_mtime, usegmt=True)}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        return Response(stream(), status=status, headers=headers, content_type="application/octet-stream",
                        direct_passthrough=True)

    def app(environ, start_response):
        request = Request(environ)
        name, _, key = request.path.lstrip("/").partition("/")
        if request.method == "GET" and name == bucket and not key:
            response = listing(request)
        elif request.method == "GET" and name == bucket:
            response = get(request, key)
        else:
            response = Response(f"<Error><Code>NotImplemented</Code><Message>{request.method} {request.path}"
                                "</Message></Error>", status=501, content_type="application/xml")
        return response(environ, start_response)

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--objects", type=Path, required=True)
    args = parser.parse_args(argv)
    spec = json.loads(args.objects.read_text())
    server = make_server("127.0.0.1", args.port, make_app(spec["bucket"], spec["objects"]), threaded=True,
                         request_handler=Quiet)
    print(f"http://127.0.0.1:{server.server_port}", flush=True)
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
