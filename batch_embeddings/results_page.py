"""The results of a search (step 5) as one self-contained HTML page: the query, then a grid of thumbnails.

Safe with any S3 key: every text and attribute value is escaped, and the page carries a Content-Security-Policy
that allows no script at all (not even its own: it has none), images only from data: URIs and the origins of the
pre-signed links it shows, and styles only its own (by hash). It needs nothing else and works from file://.
A thumbnail whose link is broken or has expired shows a placeholder with its URI (CSS only, see STYLE).
"""

from __future__ import annotations

import base64
import hashlib
import html
import os
import re
import sys
import webbrowser
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlsplit

MAX_INLINE_IMAGE_BYTES = 2_000_000  # a local query image larger than this is named, not embedded
MIME_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "gif": "image/gif", "webp": "image/webp"}
_ORIGIN = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?")

# A broken <img> (a failed or expired link) renders its ::before/::after boxes in Chromium and Firefox, a loaded one
# does not: they cover the broken-image icon with a placeholder that shows the alt text (which names the URI).
# Browsers without that behaviour (Safari) show the alt text itself.
STYLE = """
:root { color-scheme: light; --ink: #1d232b; --muted: #5b6675; --line: #d9dee5; --card: #fff; --back: #f3f5f8; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", sans-serif;
       color: var(--ink); background: var(--back); }
header { padding: 1.25rem clamp(1rem, 3vw, 2rem); background: var(--card); border-bottom: 1px solid var(--line); }
h1 { font-size: 1.15rem; margin: 0 0 .5rem; }
.query { display: flex; gap: 1rem; align-items: center; flex-wrap: wrap; }
.query-text { font-size: 1.35rem; font-weight: 600; overflow-wrap: anywhere; }
.query img { width: 96px; height: 96px; object-fit: contain; background: var(--back); border: 1px solid var(--line);
             border-radius: 6px; }
.facts { margin: .5rem 0 0; color: var(--muted); font-size: .85rem; overflow-wrap: anywhere; }
main { padding: 1rem clamp(.5rem, 3vw, 2rem) 2rem; }
.grid { list-style: none; margin: 0; padding: 0; display: grid; gap: .9rem;
        grid-template-columns: repeat(auto-fill, minmax(min(100%, 180px), 1fr)); }
.hit { background: var(--card); border: 1px solid var(--line); border-radius: 8px; overflow: hidden;
       display: flex; flex-direction: column; }
.frame { display: block; position: relative; aspect-ratio: 1 / 1; background: var(--back); }
.frame img { display: block; position: relative; width: 100%; height: 100%; object-fit: contain; color: transparent; }
.frame img::before { content: ""; position: absolute; inset: 0; background: repeating-linear-gradient(135deg,
                     #eceff3 0 12px, #e3e7ec 12px 24px); }
.frame img::after { content: "Image unavailable (the link may have expired)\\A" attr(alt); white-space: pre-wrap;
                    position: absolute; inset: 0; display: flex; align-items: center; justify-content: center;
                    padding: .75rem; text-align: center; font-size: .78rem; color: var(--muted);
                    overflow-wrap: anywhere; overflow: hidden; }
.none { display: flex; align-items: center; justify-content: center; height: 100%; padding: .75rem;
        color: var(--muted); font-size: .78rem; text-align: center; overflow-wrap: anywhere; }
.caption { padding: .5rem .6rem .65rem; font-size: .8rem; }
.rank { font-weight: 700; }
.distance { color: var(--muted); float: right; font-variant-numeric: tabular-nums; }
.embedded { color: var(--muted); display: block; font-size: 0.85em; }
.uri { display: block; clear: both; margin-top: .25rem; color: var(--ink); overflow-wrap: anywhere;
       word-break: break-all; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .74rem; }
.empty { color: var(--muted); }
footer { padding: 0 clamp(1rem, 3vw, 2rem) 2rem; color: var(--muted); font-size: .8rem; }
"""


@dataclass(frozen=True)
class QueryShown:
    """What was searched for, as the page shows it."""

    text: str | None = None  # a text query
    image_name: str | None = None  # an image query: its s3:// URI or local path
    image_src: str | None = None  # a pre-signed link or a data: URI of the query image, when it can be shown


def data_uri(data: bytes, fmt: str) -> str | None:
    """A data: URI of an image small enough to embed in the page, else None."""
    if len(data) > MAX_INLINE_IMAGE_BYTES or fmt not in MIME_TYPES:
        return None
    return f"data:{MIME_TYPES[fmt]};base64,{base64.b64encode(data).decode('ascii')}"


def _e(value) -> str:
    """Escaped for HTML text and for a double- or single-quoted attribute value."""
    return html.escape(str(value), quote=True)


def _safe_src(url: str | None) -> str | None:
    """Only links this page may load: http(s) links and data: URIs of images."""
    if isinstance(url, str) and (url.startswith(("https://", "http://")) or url.startswith("data:image/")):
        return url
    return None


def _origin(url: str) -> str:
    """The CSP source expression for an image link: its origin, or its scheme when the host is unusual."""
    parts = urlsplit(url)
    origin = f"{parts.scheme}://{parts.netloc}"
    return origin if _ORIGIN.fullmatch(origin) else f"{parts.scheme}:"


def content_security_policy(image_urls: list[str]) -> str:
    """No script, nothing framed or submitted; images from data: and the links' origins; only this page's style."""
    sources = ["data:"]
    for url in image_urls:
        if url.startswith(("https://", "http://")):
            source = _origin(url)
            if source not in sources:
                sources.append(source)
    style_hash = base64.b64encode(hashlib.sha256(STYLE.encode("utf-8")).digest()).decode("ascii")
    return (f"default-src 'none'; img-src {' '.join(sources)}; style-src 'sha256-{style_hash}'; "
            "base-uri 'none'; form-action 'none'")


def _duration(seconds: int) -> str:
    if seconds % 86400 == 0:
        n, unit = seconds // 86400, "day"
    elif seconds % 3600 == 0:
        n, unit = seconds // 3600, "hour"
    elif seconds % 60 == 0:
        n, unit = seconds // 60, "minute"
    else:
        n, unit = seconds, "second"
    return f"{n} {unit}{'' if n == 1 else 's'}"


def _hit(hit: dict) -> str:
    uri = hit.get("source_uri") if isinstance(hit.get("source_uri"), str) else None
    shown = uri or f"(no source_uri) key {hit.get('key', '')}"
    src = _safe_src(hit.get("url"))
    if src:
        frame = (f'<a class="frame" href="{_e(src)}" rel="noopener noreferrer">'
                 f'<img src="{_e(src)}" alt="{_e(shown)}" loading="lazy" decoding="async"></a>')
    else:
        frame = f'<div class="frame"><div class="none">No link for this image<br>{_e(shown)}</div></div>'
    distance = hit.get("distance")
    distance_text = "" if not isinstance(distance, (int, float)) else f"{distance:.4f}"
    embedded = hit.get("embedded") if isinstance(hit.get("embedded"), str) else None
    when = f'<span class="embedded">embedded {_e(embedded)}</span>' if embedded else ""
    return (f'<li class="hit">{frame}<div class="caption"><span class="rank">#{_e(hit.get("rank", ""))}</span>'
            f'<span class="distance" title="cosine distance (0 = same direction)">{_e(distance_text)}</span>'
            f'<span class="uri">{_e(shown)}</span>{when}</div></li>')


def render(query: QueryShown, hits: list[dict], *, index: str, bucket: str, model: str, purpose: str,
           presign_seconds: int, generated: datetime | None = None) -> str:
    """The whole page as a string (UTF-8 when written)."""
    generated = generated or datetime.now(timezone.utc)
    expires = generated + timedelta(seconds=presign_seconds)
    query_src = _safe_src(query.image_src)
    links = [h["url"] for h in hits if _safe_src(h.get("url"))] + ([query_src] if query_src else [])
    if query.text is not None:
        title = f"Search: {query.text}"
        shown = f'<div class="query-text">“{_e(query.text)}”</div>'
    else:
        title = f"Search by image: {query.image_name}"
        picture = (f'<img src="{_e(query_src)}" alt="{_e(query.image_name)}">' if query_src else "")
        shown = f'{picture}<div class="query-text">{_e(query.image_name)}</div>'
    if hits:
        body = '<ol class="grid">' + "".join(_hit(h) for h in hits) + "</ol>"
    else:
        body = '<p class="empty">No hits.</p>'
    stamp = "%Y-%m-%d %H:%M UTC"
    facts = (f"{len(hits)} hit(s) from index {_e(index)} in vector bucket {_e(bucket)} · {_e(model)} ({_e(purpose)}) · "
             f"nearest first, cosine distance")
    validity = (f"Generated {generated.astimezone(timezone.utc).strftime(stamp)}. The image links are pre-signed "
                f"S3 links valid for {_duration(presign_seconds)}, until {expires.astimezone(timezone.utc).strftime(stamp)}"
                " (or less, if the credentials that signed them expire sooner); after that the thumbnails show a "
                "placeholder: run the search again for fresh links. Anyone with this page can open the images until "
                "then.")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_e(content_security_policy(links))}">
<meta name="referrer" content="no-referrer">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{STYLE}</style>
</head>
<body>
<header>
<h1>Image search results</h1>
<div class="query">{shown}</div>
<p class="facts">{facts}</p>
</header>
<main>
{body}
</main>
<footer><p>{validity}</p></footer>
</body>
</html>
"""


def open_in_browser(page: Path, environ=None, platform: str | None = None) -> str | None:
    """Show the page in the default browser; None when one took it, else why none did: "no display" (an X11 or
    Wayland system with neither DISPLAY nor WAYLAND_DISPLAY set, nor a BROWSER chosen: an ssh session, cron, a
    container — a console browser would take over the terminal) or "no browser found" (webbrowser found none that
    started)."""
    environ = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    graphical = platform in ("darwin", "win32", "cygwin") or any(
        environ.get(name) for name in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER"))
    if not graphical:
        return "no display"
    try:
        opened = webbrowser.open(Path(page).resolve().as_uri())
    except webbrowser.Error:
        opened = False
    return None if opened else "no browser found"
