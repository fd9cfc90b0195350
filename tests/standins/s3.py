"""moto's S3 (with STS and IAM) answering in the forms the AWS documentation gives, where moto's differ.

moto is the S3 the tests run against, but two of its answers are not S3's, and a reader written against moto
alone works on moto only:

- **ListObjectsV2's paging fields.** The S3 API Reference's examples put `<Name>`, `<Prefix>`,
  `<NextContinuationToken>`, `<KeyCount>`, `<MaxKeys>`, `<EncodingType>`, `<IsTruncated>` before the first
  `<Contents>`; moto writes some of them after the last. `list_order="documented"` (the default) moves every
  top-level element that is not a `<Contents>` or `<CommonPrefixes>` ahead of them, in the documented order;
  `"moto"` leaves moto's answer as it is, so a test can play both.
- **A key that is not there.** S3 answers GetObject/HeadObject of a missing key with 404 NoSuchKey only when the
  caller has s3:ListBucket on it; the caller policy this project generates limits ListBucket with an `s3:prefix`
  condition, and S3 answers such a caller 403 AccessDenied. moto always answers 404. `missing_key=403` (the
  default) answers as S3 does to the steps under that policy, and 404 to the callers in `listers` (the Bedrock
  emulator's jobs, as the service role, which may list the buckets); `404` as S3 does to an administrator.

The options live in `S3Options` (in this process: `Stack.s3`); `python -m tests.standins.s3 -p PORT` serves the
same as a process of its own (the benchmarks), options from its flags.
"""

from __future__ import annotations

import argparse
import logging
import re
import threading
from dataclasses import dataclass
from urllib.parse import parse_qs

from werkzeug.serving import make_server

from . import POLL_SECONDS
from .bedrock import ROLE_KEY

# The S3 API Reference's order (ListObjectsV2, "Examples"); anything else moto writes follows these.
DOCUMENTED_ORDER = ("Name", "Prefix", "ContinuationToken", "NextContinuationToken", "KeyCount", "MaxKeys",
                    "Delimiter", "EncodingType", "IsTruncated", "StartAfter")
_BLOCKS = ("Contents", "CommonPrefixes")
_TOP = re.compile(rb"<(Contents|CommonPrefixes)>.*?</\1>|<(\w+)>[^<]*</\2>|<(\w+)\s*/>", re.S)
_RESULT = re.compile(rb"(.*?<ListBucketResult[^>]*>)(.*)(</ListBucketResult>\s*)$", re.S)
_CREDENTIAL = re.compile(r"Credential=([^/%]+)|X-Amz-Credential=([^/%&]+)")
_ACCESS_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                  b"<Message>Access Denied</Message><RequestId>STANDIN0000000000</RequestId></Error>")


@dataclass
class S3Options:
    list_order: str = "documented"  # or "moto"
    missing_key: int = 403  # or 404
    listers: frozenset[str] = frozenset({ROLE_KEY})  # access keys answered 404: they hold s3:ListBucket

    def reset(self) -> None:
        self.list_order, self.missing_key = "documented", 403


def documented_order(body: bytes) -> bytes:
    """A ListBucketResult with its top-level fields ahead of the <Contents> and <CommonPrefixes> blocks, in the
    order of the API reference's examples (the blocks keep their own order)."""
    whole = _RESULT.match(body)
    if not whole:
        return body
    head, inner, tail = whole.groups()
    fields: dict[str, bytes] = {}
    blocks: list[bytes] = []
    for element in _TOP.finditer(inner):
        name = (element.group(1) or element.group(2) or element.group(3)).decode()
        if name in _BLOCKS:
            blocks.append(element.group(0))
        else:
            fields[name] = element.group(0)
    rank = {name: n for n, name in enumerate(DOCUMENTED_ORDER)}
    ordered = sorted(fields, key=lambda name: rank.get(name, len(rank)))
    return head + b"".join(fields[name] for name in ordered) + b"".join(blocks) + tail


def _is_list_v2(environ) -> bool:
    return environ["REQUEST_METHOD"] == "GET" and parse_qs(environ.get("QUERY_STRING", "")).get("list-type") == ["2"]


def _access_key(environ) -> str:
    found = _CREDENTIAL.search(environ.get("HTTP_AUTHORIZATION", "") or environ.get("QUERY_STRING", ""))
    return (found.group(1) or found.group(2)) if found else ""


def _is_object_read(environ) -> bool:
    """A GetObject or HeadObject (path style: /bucket/key, no sub-resource in the query)."""
    if environ["REQUEST_METHOD"] not in ("GET", "HEAD"):
        return False
    bucket, _, key = environ.get("PATH_INFO", "").lstrip("/").partition("/")
    query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    return bool(bucket and key) and not (set(query) - {"versionId", "partNumber", "response-content-type",
                                                       "x-id"})


def wrap(app, options: S3Options):
    """moto's WSGI app, answering as `options` says (see the module's docstring)."""

    def wrapped(environ, start_response):
        relist = options.list_order == "documented" and _is_list_v2(environ)
        deny = options.missing_key == 403 and _is_object_read(environ) and _access_key(environ) not in options.listers
        if not (relist or deny):
            return app(environ, start_response)
        answered: dict = {}

        def capture(status, headers, exc_info=None):
            answered.update(status=status, headers=headers)
            return lambda data: None

        chunks = app(environ, capture)
        try:
            body = b"".join(chunks)
        finally:
            getattr(chunks, "close", lambda: None)()
        status, headers = answered["status"], answered["headers"]
        if relist and status.startswith("200"):
            body = documented_order(body)
        elif deny and status.startswith("404") and (environ["REQUEST_METHOD"] == "HEAD" or b"NoSuchKey" in body):
            status = "403 Forbidden"
            headers = [("Content-Type", "application/xml")]
            body = b"" if environ["REQUEST_METHOD"] == "HEAD" else _ACCESS_DENIED
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        headers.append(("Content-Length", str(len(body))))
        start_response(status, headers)
        return [body]

    return wrapped


class MotoS3:
    """moto's server (S3, STS, IAM, …) on a loopback port in a thread, its S3 answers as `options` says."""

    def __init__(self, options: S3Options | None = None, host: str = "127.0.0.1", port: int = 0):
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, \
            create_backend_app

        self.options = options or S3Options()
        app = wrap(DomainDispatcherApplication(create_backend_app), self.options)
        self._server = make_server(host, port, app, threaded=True, request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(POLL_SECONDS,), daemon=True)
        self.url = f"http://{host}:{self._server.server_port}"

    def start(self) -> MotoS3:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()


def put_objects(bucket: str, objects, account_id: str = "123456789012") -> None:
    """Write (key, bytes) pairs straight into the store moto's server in this process answers from: what a test sets
    up, not what it tests (a PutObject over HTTP costs ≈ 10 ms here, this ≈ 0.04). The objects are the ones PutObject
    would make (ETag the MD5 of the bytes), read back through the server like any other."""
    from moto.s3.models import s3_backends

    backend = s3_backends[account_id]["aws"]
    for key, body in objects:
        backend.put_object(bucket, key, body)


def read_object(bucket: str, key: str, account_id: str = "123456789012") -> bytes | None:
    """The bytes of an object in the store moto's server in this process answers from; None when there is none."""
    from moto.s3.exceptions import MissingBucket
    from moto.s3.models import s3_backends

    try:
        found = s3_backends[account_id]["aws"].get_object(bucket, key)
    except MissingBucket:
        return None
    return None if found is None else found.value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="moto's server, its S3 answering in the documented forms")
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=5000)
    parser.add_argument("--list-order", choices=("documented", "moto"), default="documented")
    parser.add_argument("--missing-key", type=int, choices=(404, 403), default=403)
    args = parser.parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = MotoS3(S3Options(args.list_order, args.missing_key), args.host, args.port)
    try:
        server._server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
