"""The search page's Content-Security-Policy with links whose host part is not a plain host: the page never
trusts more than the links' origins (a host with `;`, a space, quotes or user info gives only its scheme)."""

from __future__ import annotations

import html
import re
from datetime import datetime, timezone

import pytest

from batch_embeddings import results_page

WHEN = datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc)


def policy_of(urls: list[str]) -> dict[str, list[str]]:
    """The CSP the rendered page carries, as directive -> sources."""
    hits = [{"rank": i + 1, "distance": 0.1, "source_uri": f"s3://b/{i}.jpg", "url": url} for i, url in enumerate(urls)]
    page = results_page.render(results_page.QueryShown(text="cat"), hits, index="i", bucket="b", model="m",
                               purpose="GENERIC_RETRIEVAL", presign_seconds=3600, generated=WHEN)
    content = html.unescape(re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', page)[1])
    directives = {}
    for part in content.split(";"):
        words = part.split()
        if words:
            assert words[0] not in directives, content  # a directive given twice: the browser keeps the first
            directives[words[0]] = words[1:]
    return directives


@pytest.mark.parametrize("url", [
    "https://bucket.s3.amazonaws.com;script-src 'unsafe-inline'/k.jpg",
    "https://bucket.s3.amazonaws.com 'unsafe-inline'/k.jpg",
    "https://user:pass@bucket.s3.amazonaws.com/k.jpg",
    "https://bucket.s3.amazonaws.com,evil.example/k.jpg",
    "https://*/k.jpg",
])
def test_an_unusual_host_trusts_only_its_scheme(url):
    directives = policy_of(["https://bucket.s3.us-east-1.amazonaws.com/a.jpg?X-Amz-Signature=x", url])
    assert set(directives) == {"default-src", "img-src", "style-src", "base-uri", "form-action"}
    assert directives["img-src"] == ["data:", "https://bucket.s3.us-east-1.amazonaws.com", "https:"]
    assert directives["default-src"] == ["'none'"]


def test_plain_hosts_are_trusted_by_origin_with_their_port():
    directives = policy_of(["https://b.s3.eu-west-1.amazonaws.com/x.jpg?sig=1", "http://127.0.0.1:9000/b/y.png",
                            "https://b.s3.eu-west-1.amazonaws.com/z.jpg"])
    assert directives["img-src"] == ["data:", "https://b.s3.eu-west-1.amazonaws.com", "http://127.0.0.1:9000"]
