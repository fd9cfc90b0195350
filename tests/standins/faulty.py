"""A reverse proxy in front of a stand-in that breaks chosen requests, as a failing network would.

`fail(method, path_and_query) -> str | None` decides per request: None forwards it; "drop" forwards it and then
breaks the answer (the request reached the service, the caller never hears back); "refuse" breaks it without
forwarding; any other string is sent back as an XML/JSON error code with HTTP 400 (e.g. "ExpiredToken").

`BucketOwnerCheck` puts in front of moto's S3 the check moto leaves out: ExpectedBucketOwner.
"""

from __future__ import annotations

import http.client
import socket
import threading
from urllib.parse import urlsplit

from werkzeug.wrappers import Request, Response

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
              "proxy-authenticate", "host", "content-length"}


class FaultyProxy:
    def __init__(self, target: str, fail):
        self.target = urlsplit(target)
        self.fail = fail
        self.lock = threading.Lock()
        self.seen: list[tuple[str, str]] = []

    def forward(self, request: Request) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(self.target.hostname, self.target.port, timeout=60)
        path = request.full_path if request.query_string else request.path
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Host"] = self.target.netloc
        connection.request(request.method, path, body=request.get_data(), headers=headers)
        answer = connection.getresponse()
        body = answer.read()
        connection.close()
        return answer.status, [(k, v) for k, v in answer.getheaders() if k.lower() not in HOP_BY_HOP], body

    def __call__(self, environ, start_response):
        request = Request(environ)
        where = request.full_path if request.query_string else request.path
        with self.lock:
            self.seen.append((request.method, where))
            verdict = self.fail(request.method, where)
        if verdict == "refuse":
            return self.broken(environ)
        if verdict not in (None, "drop"):
            body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{verdict}</Code>'
                    f"<Message>{verdict} (injected)</Message></Error>").encode()
            return Response(body, status=400, headers={"x-amzn-ErrorType": verdict},
                            content_type="application/xml")(environ, start_response)
        status, headers, body = self.forward(request)
        if verdict == "drop":
            return self.broken(environ)
        return Response(body, status=status, headers=headers)(environ, start_response)

    @staticmethod
    def broken(environ):
        """No answer at all: the connection is cut, as when the network fails."""
        connection = environ["werkzeug.socket"]
        connection.shutdown(socket.SHUT_RDWR)
        connection.close()
        return []


class BucketOwnerCheck(FaultyProxy):
    """moto's S3 with S3's ExpectedBucketOwner check, which moto ignores: a request whose
    x-amz-expected-bucket-owner header names an account other than the bucket owner (every moto bucket belongs to
    `owner`) is answered 403 AccessDenied, as S3 answers it, and never reaches moto."""

    def __init__(self, target: str, owner: str = "123456789012", fail=lambda method, path: None):
        super().__init__(target, fail)
        self.owner = owner
        self.refused: list[tuple[str, str]] = []

    def __call__(self, environ, start_response):
        expected = environ.get("HTTP_X_AMZ_EXPECTED_BUCKET_OWNER")
        if expected is None or expected == self.owner:
            return super().__call__(environ, start_response)
        request = Request(environ)
        request.get_data()  # read the body, so the connection stays usable
        with self.lock:
            self.refused.append((request.method, request.full_path if request.query_string else request.path))
        body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                b"<Message>Access Denied</Message></Error>")
        return Response(body, status=403, content_type="application/xml")(environ, start_response)
