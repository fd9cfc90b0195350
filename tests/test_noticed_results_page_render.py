"""The search page as the person who opens it reads it: its title, the query (text, or the image with its name),
one card a hit (thumbnail linking to itself, rank, distance, URI; a placeholder when there is no link), the facts
line, and how long the links last — in UTC whatever the machine's time zone; and `--open`'s answer about the
browser on each kind of system."""

from __future__ import annotations

import base64
import hashlib
import time
import webbrowser
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser

import pytest

from batch_embeddings import results_page
from batch_embeddings.results_page import QueryShown

WHEN = datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc)
TOKYO = timezone(timedelta(hours=9))
HIT = {"rank": 1, "key": "k1", "distance": 0.123456, "source_uri": 's3://images/cats/"tom".jpg',
       "url": "https://images.s3.us-east-1.amazonaws.com/cats/%22tom%22.jpg?X-Amz-Signature=ab&X-Amz-Expires=3600"}


class Node:
    def __init__(self, tag: str, attrs: dict):
        self.tag, self.attrs, self.children = tag, attrs, []

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    def find_all(self, tag: str | None = None, cls: str | None = None) -> list["Node"]:
        found = []
        for child in self.children:
            if isinstance(child, Node):
                if (tag is None or child.tag == tag) and (cls is None or child.attrs.get("class") == cls):
                    found.append(child)
                found.extend(child.find_all(tag, cls))
        return found

    def one(self, tag: str | None = None, cls: str | None = None) -> "Node":
        (found,) = self.find_all(tag, cls)
        return found


class Reader(HTMLParser):
    """The page as a tree of elements, attribute values and text unescaped as a browser reads them."""

    VOID = {"meta", "img", "br", "link"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.open = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs))
        self.open[-1].children.append(node)
        if tag not in self.VOID:
            self.open.append(node)

    def handle_endtag(self, tag):
        assert self.open[-1].tag == tag, (self.open[-1].tag, tag)  # every element closes where it opened
        self.open.pop()

    def handle_data(self, data):
        self.open[-1].children.append(data)


def read(page: str) -> Node:
    reader = Reader()
    reader.feed(page)
    reader.close()
    assert [n.tag for n in reader.open] == ["#document"]
    return reader.root


def render(query=QueryShown(text="red car"), hits=(HIT,), **options) -> Node:
    settings = dict(index="images", bucket="vectors", model="amazon.nova-2-multimodal-embeddings-v1:0",
                    purpose="GENERIC_RETRIEVAL", presign_seconds=3600, generated=WHEN)
    settings.update(options)
    return read(results_page.render(query, list(hits), **settings))


def card(li: Node) -> dict:
    """What one hit's card shows."""
    seen = {"rank": li.one("span", "rank").text, "distance": li.one("span", "distance").text,
            "uri": li.one("span", "uri").text}
    links = li.find_all("a")
    if links:
        (link,) = links
        image = link.one("img")
        seen.update(link=link.attrs["href"], src=image.attrs["src"], alt=image.attrs["alt"])
    else:
        seen["placeholder"] = li.one("div", "none").text
    return seen


def csp(page: Node) -> str:
    (meta,) = [m for m in page.find_all("meta") if m.attrs.get("http-equiv") == "Content-Security-Policy"]
    return meta.attrs["content"]


def test_a_text_query_page_shows_the_query_its_hits_and_the_facts():
    page = render(hits=[HIT, {"rank": 2, "key": "k2", "distance": 0.5, "source_uri": "s3://images/dog.png",
                              "url": "https://images.s3.us-east-1.amazonaws.com/dog.png?X-Amz-Signature=cd"}])
    assert page.one("title").text == "Search: red car"
    assert page.one("div", "query").text == "“red car”"
    assert page.one("div", "query").find_all("img") == []
    (grid,) = page.find_all("ol")
    assert grid.attrs == {"class": "grid"}
    assert [child.tag for child in grid.children] == ["li", "li"]  # nothing between the cards
    assert [card(li) for li in grid.find_all("li", "hit")] == [
        {"rank": "#1", "distance": "0.1235", "uri": 's3://images/cats/"tom".jpg', "link": HIT["url"], "src": HIT["url"],
         "alt": 's3://images/cats/"tom".jpg'},
        {"rank": "#2", "distance": "0.5000", "uri": "s3://images/dog.png",
         "link": "https://images.s3.us-east-1.amazonaws.com/dog.png?X-Amz-Signature=cd",
         "src": "https://images.s3.us-east-1.amazonaws.com/dog.png?X-Amz-Signature=cd", "alt": "s3://images/dog.png"},
    ]
    assert page.one("p", "facts").text == ("2 hit(s) from index images in vector bucket vectors · "
                                           "amazon.nova-2-multimodal-embeddings-v1:0 (GENERIC_RETRIEVAL) · "
                                           "nearest first, cosine distance")
    assert page.one("main").text.strip() == "".join(li.text for li in grid.find_all("li"))  # nothing else shown


def test_a_hit_without_a_usable_link_shows_a_placeholder_with_what_is_known():
    hits = [{"rank": 3, "key": "k3", "distance": None, "source_uri": "s3://images/gone.jpg", "url": None},
            {"rank": 4, "key": "k/4", "distance": 1, "source_uri": None, "url": "javascript:alert(1)"},
            {"rank": 5, "key": "k5", "distance": "0.3", "source_uri": 17, "url": "ftp://images/5.jpg"},
            {"key": "k6"}, {}]
    page = render(hits=hits)
    assert [card(li) for li in page.find_all("li", "hit")] == [
        {"rank": "#3", "distance": "", "uri": "s3://images/gone.jpg",
         "placeholder": "No link for this images3://images/gone.jpg"},
        {"rank": "#4", "distance": "1.0000", "uri": "(no source_uri) key k/4",
         "placeholder": "No link for this image(no source_uri) key k/4"},
        {"rank": "#5", "distance": "", "uri": "(no source_uri) key k5",
         "placeholder": "No link for this image(no source_uri) key k5"},
        {"rank": "#", "distance": "", "uri": "(no source_uri) key k6",
         "placeholder": "No link for this image(no source_uri) key k6"},
        {"rank": "#", "distance": "", "uri": "(no source_uri) key ",
         "placeholder": "No link for this image(no source_uri) key "},
    ]
    assert page.find_all("li", "hit")[0].one("div", "none").find_all("br") != []  # the URI on a line of its own
    assert "javascript:" not in csp(page) and "ftp" not in csp(page)


def test_no_hits_says_so():
    page = render(hits=[])
    assert page.one("main").find_all("ol") == []
    assert page.one("p", "empty").text == "No hits."
    assert page.one("main").text.strip() == "No hits."
    assert page.one("p", "facts").text.startswith("0 hit(s) from index images")


@pytest.mark.parametrize("src", [
    results_page.data_uri(b"\x89PNG\r\n\x1a\nfake", "png"),
    "https://other-bucket.s3.eu-west-1.amazonaws.com/q.png?X-Amz-Signature=ef",
])
def test_an_image_query_shows_the_image_and_its_name(src):
    page = render(QueryShown(image_name="s3://images/query image.png", image_src=src))
    assert page.one("title").text == "Search by image: s3://images/query image.png"
    query = page.one("div", "query")
    assert query.one("img").attrs == {"src": src, "alt": "s3://images/query image.png"}
    assert query.one("div", "query-text").text == "s3://images/query image.png"
    assert query.text == "s3://images/query image.png"
    sources = csp(page).split("; ")[1].split()
    assert sources[0] == "img-src" and sources[1] == "data:" and "https://images.s3.us-east-1.amazonaws.com" in sources
    if src.startswith("https://"):  # the query image's own origin is allowed too
        assert sources[-1] == "https://other-bucket.s3.eu-west-1.amazonaws.com"


@pytest.mark.parametrize("src", [None, "javascript:alert(1)", "data:text/html;base64,PHA+"])
def test_an_image_query_without_a_picture_shows_its_name_alone(src):
    page = render(QueryShown(image_name="/home/me/query.png", image_src=src))
    query = page.one("div", "query")
    assert query.find_all("img") == []
    assert query.text == "/home/me/query.png"
    assert page.one("title").text == "Search by image: /home/me/query.png"


def test_the_style_is_allowed_by_its_hash_and_nothing_else_runs():
    page = render()
    policy = csp(page)
    style = page.one("style").text
    digest = base64.b64encode(hashlib.sha256(style.encode("utf-8")).digest()).decode("ascii")
    assert f"style-src 'sha256-{digest}'" in policy  # a browser applies the page's style only when the hash matches
    assert policy.startswith("default-src 'none'; img-src data: https://images.s3.us-east-1.amazonaws.com; ")
    assert policy.endswith("; base-uri 'none'; form-action 'none'")


@pytest.mark.parametrize("seconds, said", [
    (1, "1 second"), (59, "59 seconds"), (60, "1 minute"), (90, "90 seconds"), (120, "2 minutes"),
    (3599, "3599 seconds"), (3600, "1 hour"), (5400, "90 minutes"), (7200, "2 hours"), (86400, "1 day"),
    (90000, "25 hours"), (172800, "2 days"), (604800, "7 days"),
])
def test_the_footer_says_how_long_the_links_last(seconds, said):
    footer = render(presign_seconds=seconds).one("footer").text
    until = (WHEN + timedelta(seconds=seconds)).strftime("%Y-%m-%d %H:%M")
    assert footer == (f"Generated 2026-12-01 10:00 UTC. The image links are pre-signed S3 links valid for {said}, "
                      f"until {until} UTC (or less, if the credentials that signed them expire sooner); after that "
                      "the thumbnails show a placeholder: run the search again for fresh links. Anyone with this page "
                      "can open the images until then.")


@pytest.fixture
def tokyo_machine(monkeypatch):
    """A machine whose local time zone is not UTC."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_times_are_in_utc_on_a_machine_in_another_time_zone(tokyo_machine):
    footer = render(generated=datetime(2026, 12, 1, 19, 30, tzinfo=TOKYO), presign_seconds=7200).one("footer").text
    assert footer.startswith("Generated 2026-12-01 10:30 UTC. The image links are pre-signed S3 links valid for "
                             "2 hours, until 2026-12-01 12:30 UTC (or less")


def test_the_page_is_stamped_with_the_time_it_was_made(monkeypatch):
    class Clock(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2027, 3, 4, 5, 6, tzinfo=timezone.utc).astimezone(tz)

    monkeypatch.setattr(results_page, "datetime", Clock)
    footer = render(generated=None, presign_seconds=60).one("footer").text
    assert footer.startswith("Generated 2027-03-04 05:06 UTC. The image links are pre-signed S3 links valid for "
                             "1 minute, until 2027-03-04 05:07 UTC")


# ------------------------------------------------------------------------------------------------------------------
# data_uri: a local query image embedded in the page
# ------------------------------------------------------------------------------------------------------------------


def test_a_small_local_image_is_embedded_as_a_data_uri():
    assert results_page.data_uri(b"GIF89a\x01", "gif") == "data:image/gif;base64," + base64.b64encode(
        b"GIF89a\x01").decode()
    assert results_page.data_uri(b"x", "webp") == "data:image/webp;base64,eA=="
    assert results_page.data_uri(b"\xff\xd8", "jpeg") == "data:image/jpeg;base64,/9g="


def test_an_image_up_to_the_limit_is_embedded_one_byte_more_is_not():
    limit = results_page.MAX_INLINE_IMAGE_BYTES
    assert limit == 2_000_000
    assert results_page.data_uri(b"\0" * limit, "png").startswith("data:image/png;base64,AAAA")
    assert results_page.data_uri(b"\0" * (limit + 1), "png") is None


@pytest.mark.parametrize("fmt", ["bmp", "tiff", "", "PNG"])
def test_an_image_of_another_format_is_not_embedded(fmt):
    assert results_page.data_uri(b"BM", fmt) is None


# ------------------------------------------------------------------------------------------------------------------
# open_in_browser: the answer 05 --open prints when no browser takes the page
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def browser(monkeypatch):
    """The default browser: records each page it is asked to open, answers `answer` (or raises `error`)."""

    class Browser:
        opened: list = []
        answer = True
        error = None

        def open(self, uri):
            self.opened.append(uri)
            if self.error:
                raise self.error
            return self.answer

    fake = Browser()
    fake.opened = []
    monkeypatch.setattr(webbrowser, "open", fake.open)
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER"):
        monkeypatch.delenv(name, raising=False)
    return fake


@pytest.mark.parametrize("platform, environ", [
    ("darwin", {}), ("win32", {}), ("cygwin", {}),
    ("linux", {"DISPLAY": ":0"}), ("linux", {"WAYLAND_DISPLAY": "wayland-0"}), ("linux", {"BROWSER": "firefox"}),
    ("freebsd14", {"DISPLAY": ":1", "BROWSER": ""}),
])
def test_a_browser_takes_the_page_where_there_is_a_display(browser, tmp_path, platform, environ):
    page = tmp_path / "results page.html"
    assert results_page.open_in_browser(page, environ, platform) is None
    assert browser.opened == [page.resolve().as_uri()]


@pytest.mark.parametrize("platform, environ", [
    ("linux", {}), ("linux", {"DISPLAY": "", "WAYLAND_DISPLAY": "", "BROWSER": ""}), ("freebsd14", {"TERM": "xterm"}),
    ("Darwin", {}),
])
def test_no_display_tries_no_browser(browser, tmp_path, platform, environ):
    assert results_page.open_in_browser(tmp_path / "page.html", environ, platform) == "no display"
    assert browser.opened == []  # a console browser would take over the terminal


def test_no_browser_found_is_said(browser, tmp_path):
    browser.answer = False
    assert results_page.open_in_browser(tmp_path / "page.html", {"DISPLAY": ":0"}, "linux") == "no browser found"
    browser.answer, browser.error = True, webbrowser.Error("could not locate runnable browser")
    assert results_page.open_in_browser(tmp_path / "page.html", {"DISPLAY": ":0"}, "linux") == "no browser found"
    assert len(browser.opened) == 2


def test_the_environment_and_platform_default_to_this_machines(browser, tmp_path, monkeypatch):
    page = tmp_path / "page.html"
    monkeypatch.setattr(results_page.sys, "platform", "linux")
    assert results_page.open_in_browser(page) == "no display"
    monkeypatch.setenv("DISPLAY", ":0")
    assert results_page.open_in_browser(page) is None
    assert results_page.open_in_browser(page, {}) == "no display"  # the environment given wins over this one
    monkeypatch.delenv("DISPLAY")
    assert results_page.open_in_browser(page, {"DISPLAY": ":0"}) is None
    monkeypatch.setattr(results_page.sys, "platform", "darwin")
    assert results_page.open_in_browser(page) is None
    assert results_page.open_in_browser(page, {}, "linux") == "no display"  # the platform given wins too
    assert browser.opened == [page.resolve().as_uri()] * 3
