"""Local stand-ins for the AWS services the suite calls.

moto (server mode) answers S3, STS and IAM. moto has no Bedrock batch jobs and its S3 Vectors lacks the service's
limits and QueryVectors, so this package carries emulators for those, built from ../shared/aws-facts.md and
botocore's service models. Each emulator is a WSGI app; `serve` runs one on a loopback port in a thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from werkzeug.serving import WSGIRequestHandler, make_server


POLL_SECONDS = 0.02  # how often a server's loop looks for a stop: socketserver's 0.5 s made each stop wait that long


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs) -> None:  # no access log on the console
        pass


@dataclass
class Served:
    url: str
    stop: Callable[[], None]


def serve(app, host: str = "127.0.0.1", port: int = 0, ssl_context=None) -> Served:
    """Run a WSGI app on a loopback port in a daemon thread; returns its URL and a stop function.
    With an `ssl_context` (tests.standins.tls) it serves HTTPS."""
    server = make_server(host, port, app, threaded=True, request_handler=_QuietHandler, ssl_context=ssl_context)
    thread = threading.Thread(target=server.serve_forever, args=(POLL_SECONDS,), daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        thread.join()

    scheme = "https" if ssl_context is not None else "http"
    return Served(url=f"{scheme}://{host}:{server.server_port}", stop=stop)
