"""05_query_vectors.py against an index loaded as a user loads it (steps 1-3 as processes), and its bad inputs."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import subprocess
import sys
import urllib.parse
import urllib.request
import webbrowser
from datetime import datetime, timezone
from html.parser import HTMLParser

import pytest

import common
from batch_embeddings import naming, nova, results_page, search
from tests import sample_images
from tests.conftest import ROOT, STEPS, World, import_step, make_role
from tests.standins.embedding import embed_image, embed_text

EXTENSIONS = ["png", "jpg", "gif", "webp"]
XSS_KEY = "tricky/<img src=x onerror=alert(1)> \"q\" 'a'&amp;.png"  # a key that is also markup
KEYS = [f"img-{i:03d}.{EXTENSIONS[i % 4]}" for i in range(100)] + ["tricky/with space+plus.png", "tricky/中文.jpg",
                                                                   XSS_KEY]
DIMENSION = 256
ROW = re.compile(r"^\s*(\d+)\s+(\d+\.\d{4})\s+(s3://\S.*)$")


@pytest.fixture(scope="module")
def loaded(stack, tmp_path_factory) -> World:
    """One index for the module, loaded by steps 1-3 as processes, with buckets of its own (set up as conftest's
    `world` sets up a test's). The tests only read it: step 5 writes nothing, and each test runs it afresh."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(stack.env)
    w = World(stack=stack, cwd=tmp_path_factory.mktemp("query"), env=env, source_bucket="query-source",
              result_bucket="query-result", vector_bucket="query-vectors", vector_index="query-images", role_arn="")
    s3 = w.client("s3")
    s3.create_bucket(Bucket=w.source_bucket)
    s3.create_bucket(Bucket=w.result_bucket)
    w.role_arn = make_role(w.client("iam"), "BedrockBatchRoleQuery", w.source_bucket, w.result_bucket)
    env.update(SOURCE_BUCKET=w.source_bucket, SOURCE_PREFIX="2024/", RESULT_BUCKET=w.result_bucket,
               RESULT_PREFIX="output/", VECTOR_BUCKET=w.vector_bucket, VECTOR_INDEX=w.vector_index,
               ROLE_ARN=w.role_arn, EMBEDDING_DIMENSION=str(DIMENSION), PYTHONIOENCODING="utf-8")
    w.emulator("/_emulator/config", {"step_seconds": 0.02, "fail_keys_regex": None, "drop_keys_regex": None,
                                     "final_status": None})
    w.put_images(KEYS, prefix="2024/")
    for number, args in ((1, ()), (2, ("--wait", "--interval", "0.05", "--timeout", "60")), (3, ())):
        result = w.step(number, *args)
        assert result.returncode == 0, result.stdout + result.stderr
    return w


def uri_of(world: World, key: str) -> str:
    return f"s3://{world.source_bucket}/2024/{key}"


def image_bytes(world: World, key: str) -> bytes:
    return world.reader("s3").get_object(Bucket=world.source_bucket, Key=f"2024/{key}")["Body"].read()


def query_json(world: World, *args: str, env: dict | None = None) -> list[dict]:
    result = world.step(5, *args, "--json", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    return json.loads(result.stdout)


def one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def cosine_distance(a: list[float], b: list[float]) -> float:
    dot = math.fsum(x * y for x, y in zip(a, b))
    return 1.0 - dot / math.sqrt(math.fsum(x * x for x in a) * math.fsum(y * y for y in b))


# ---------------------------------------------------------------------------------------------------- searching


def test_an_image_in_s3_finds_itself_first(loaded):
    uri = uri_of(loaded, "img-007.webp")
    result = loaded.step(5, "--image", uri, "--top-k", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Bedrock Batch Inference - Query Vectors" in out
    assert f"Query: image {uri}" in out
    assert f"(GENERIC_RETRIEVAL, {DIMENSION} dimensions)" in out
    assert "✓ 3 hit(s)" in out
    rows = [m.groups() for m in map(ROW.match, out.splitlines()) if m]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    assert rows[0] == ("1", "0.0000", uri)
    assert all(float(r[1]) > 0.5 for r in rows[1:])  # unrelated images are far away


@pytest.mark.parametrize("key, local_name", [("img-012.png", "copy.png"), ("img-013.jpg", "COPY.JPG"),
                                             ("tricky/中文.jpg", "中文 copy.jpeg")])
def test_a_local_copy_of_an_image_finds_it_first(loaded, tmp_path, key, local_name):
    local = tmp_path / local_name
    local.write_bytes(image_bytes(loaded, key))
    hits = query_json(loaded, "--image", str(local), "--top-k", "5")
    assert len(hits) == 5
    assert hits[0]["source_uri"] == uri_of(loaded, key)
    assert hits[0]["key"] == naming.vector_key(uri_of(loaded, key))
    assert hits[0]["distance"] == pytest.approx(0.0, abs=1e-5)
    assert hits[1]["distance"] > 0.5


def test_a_text_finds_the_nearest_images_in_order(loaded):
    top_k = 7
    result = loaded.step(5, "a red sports car", "--top-k", str(top_k))
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'Query: text "a red sports car"' in result.stdout
    assert f"(IMAGE_RETRIEVAL, {DIMENSION} dimensions)" in result.stdout
    rows = [m.groups() for m in map(ROW.match, result.stdout.splitlines()) if m]

    hits = query_json(loaded, "a red sports car", "--top-k", str(top_k))
    job_id = loaded.job_info()["jobs"][0]["job_id"]
    assert [h["rank"] for h in hits] == list(range(1, top_k + 1))
    distances = [h["distance"] for h in hits]
    assert distances == sorted(distances)
    created = loaded.job_info()["jobs"][0]["created"][:10]
    for hit in hits:
        assert set(hit) == {"rank", "key", "distance", "source_uri", "embedded", "metadata"}
        assert hit["embedded"] == created  # the date its image was embedded
        assert {k: hit["metadata"][k] for k in ("source_uri", "job_id", "embedded")} == {
            "source_uri": hit["source_uri"], "job_id": job_id, "embedded": created}
        assert hit["key"] == naming.vector_key(hit["source_uri"])
    assert [(str(h["rank"]), f"{h['distance']:.4f}", h["source_uri"]) for h in hits] == rows

    # The same ranking, worked out here from the images themselves: the query embedded the text at the index's size.
    query = embed_text("a red sports car", DIMENSION)
    expected = sorted((cosine_distance(query, embed_image(image_bytes(loaded, key), DIMENSION)), uri_of(loaded, key))
                      for key in KEYS)[:top_k]
    assert [h["source_uri"] for h in hits] == [uri for _, uri in expected]
    assert distances == pytest.approx([d for d, _ in expected], abs=1e-5)


def test_a_filter_narrows_the_hits_to_exactly_those_images(loaded):
    wanted = [uri_of(loaded, k) for k in ("img-001.jpg", "img-050.gif", "tricky/with space+plus.png")]
    flt = json.dumps({"source_uri": {"$in": wanted}})
    hits = query_json(loaded, "a red sports car", "--filter", flt, "--top-k", "10")
    assert sorted(h["source_uri"] for h in hits) == sorted(wanted)
    distances = [h["distance"] for h in hits]
    assert distances == sorted(distances)

    by_job = query_json(loaded, "--image", wanted[0], "--top-k", "100",
                        "--filter", json.dumps({"job_id": {"$eq": loaded.job_info()["jobs"][0]["job_id"]}}))
    assert len(by_job) == 100 and by_job[0]["source_uri"] == wanted[0]

    nothing = loaded.step(5, "a red sports car", "--filter", '{"source_uri": "s3://elsewhere/x.png"}')
    assert nothing.returncode == 0, nothing.stderr
    assert "No hits match the filter." in nothing.stdout
    assert query_json(loaded, "car", "--filter", '{"source_uri": "s3://elsewhere/x.png"}') == []


def test_presign_adds_a_working_link_to_each_image(loaded):
    secret = "do-not-print-this-secret-0123456789"
    env = {"AWS_SECRET_ACCESS_KEY": secret}
    tricky = uri_of(loaded, "tricky/with space+plus.png")
    flt = json.dumps({"source_uri": {"$in": [tricky, uri_of(loaded, "img-002.gif")]}})
    hits = query_json(loaded, "a red sports car", "--presign", "60", "--filter", flt, env=env)
    assert len(hits) == 2
    for hit in hits:
        url = hit["url"]
        assert url.startswith(("https://", "http://"))
        _, key = common.parse_s3_uri(hit["source_uri"])
        assert urllib.parse.quote(key) in url
        assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url and "X-Amz-Expires=60" in url
        assert secret not in url
        with urllib.request.urlopen(url) as response:  # the link gets the image itself
            assert response.read() == image_bytes(loaded, key[len("2024/"):])

    shown = loaded.step(5, "a red sports car", "--presign", "60", "--top-k", "2", env=env)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count("X-Amz-Signature=") == 2
    assert "Links are valid for 60 s" in shown.stdout
    assert secret not in shown.stdout + shown.stderr


def test_help():
    result = subprocess.run([sys.executable, str(ROOT / STEPS[5]), "--help"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: 05_query_vectors.py")
    for flag in ("--image", "--top-k", "--filter", "--presign", "--json", "--purpose", "--vector-index",
                 "IMAGE_RETRIEVAL", "GENERIC_RETRIEVAL", "$in"):
        assert flag in result.stdout


def test_the_request_bodies():
    text = search.read_query("a red sports car")
    assert text.request(1024, None) == {
        "taskType": "SINGLE_EMBEDDING",
        "singleEmbeddingParams": {"embeddingPurpose": "IMAGE_RETRIEVAL", "embeddingDimension": 1024,
                                  "text": {"truncationMode": "END", "value": "a red sports car"}}}
    s3_image = search.read_query(image="s3://my-bucket/2024/Cat.JPG")
    assert s3_image.request(256, "111122223333")["singleEmbeddingParams"] == {
        "embeddingPurpose": "GENERIC_RETRIEVAL", "embeddingDimension": 256,
        "image": {"format": "jpeg", "source": {"s3Location": {"uri": "s3://my-bucket/2024/Cat.JPG",
                                                              "bucketOwner": "111122223333"}}}}
    override = search.read_query("cat", purpose="TEXT_RETRIEVAL")
    assert override.request(256, None)["singleEmbeddingParams"]["embeddingPurpose"] == "TEXT_RETRIEVAL"


def test_a_local_image_is_sent_inline(tmp_path):
    (tmp_path / "a.webp").write_bytes(sample_images.webp(3))
    query = search.read_query(image=str(tmp_path / "a.webp"))
    image = query.request(384, None)["singleEmbeddingParams"]["image"]
    assert image["format"] == "webp"
    assert base64.b64decode(image["source"]["bytes"]) == sample_images.webp(3)


# ---------------------------------------------------------------------------------------------------- bad input


def _files(cwd):
    (cwd / "notes.bmp").write_bytes(b"BM not supported")
    (cwd / "empty.png").write_bytes(b"")
    (cwd / "folder.png").mkdir()
    with open(cwd / "huge.png", "wb") as fh:  # sparse: no disk used
        fh.truncate(nova.MAX_IMAGE_BYTES + 1)
    with open(cwd / "big.jpg", "wb") as fh:
        fh.truncate(19_000_000)


BAD_INPUT = [
    ([""], "the text to search for is empty"),
    (["   "], "the text to search for is empty"),
    ([], "give a text to search for, or --image"),
    (["car", "--image", "empty.png"], "not both"),
    (["--image", "missing.png"], "missing.png: no such file"),
    (["--image", "notes.bmp"], "notes.bmp: unsupported image type '.bmp'"),
    (["--image", "s3://my-bucket/2024/photo.tiff"], "unsupported image type '.tiff'"),
    (["--image", "s3://my-bucket/2024/"], "is not an S3 object URI"),
    (["--image", "empty.png"], "empty.png: the file is empty"),
    (["--image", "folder.png"], "folder.png: not a file"),
    (["--image", "huge.png"], "the model takes images up to 50 MB"),
    (["--image", "big.jpg"], "upload it to S3 and pass --image s3://"),
    (["car", "--top-k", "0"], "--top-k must be at least 1, not 0"),
    (["car", "--top-k", "-3"], "--top-k must be at least 1, not -3"),
    (["car", "--top-k", "ten"], "argument --top-k: invalid int value: 'ten'"),
    (["car", "--filter", "{source_uri: 1}"], "--filter is not valid JSON"),
    (["car", "--filter", '["s3://b/k.png"]'], "--filter must be a non-empty JSON object"),
    (["car", "--filter", "{}"], "--filter must be a non-empty JSON object"),
    (["car", "--presign", "0"], "--presign must be between 1 and 604800 seconds"),
    (["car", "--presign", "604801"], "--presign must be between 1 and 604800 seconds"),
    (["car", "--purpose", "SEARCH"], "argument --purpose: invalid choice: 'SEARCH'"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=[" ".join(a) or "(none)" for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2_before_any_call(world, args, message):
    # This world has no vector bucket at all: an AWS call made before the input was checked would answer
    # NotFoundException (exit 1) instead of this message.
    _files(world.cwd)
    result = world.step(5, *args)
    assert result.returncode == 2, result.stdout + result.stderr
    line = one_line(result)
    assert line.startswith("error: ") and message in line
    assert "NotFoundException" not in line
    assert result.stdout == ""


def test_missing_settings(world):
    result = world.step(5, "car", env={"VECTOR_BUCKET": "", "VECTOR_INDEX": ""})
    assert result.returncode == 2
    line = one_line(result)
    assert "VECTOR_BUCKET is not set" in line and "VECTOR_INDEX is not set" in line


def test_a_vector_bucket_that_does_not_exist(world):
    result = world.step(5, "car")
    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith("error: NotFoundException:") and world.vector_bucket in line
    assert "check VECTOR_BUCKET and VECTOR_INDEX" in line


def test_an_index_that_does_not_exist(world):
    world.client("s3vectors").create_vector_bucket(vectorBucketName=world.vector_bucket)
    result = world.step(5, "car")
    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith("error: NotFoundException:") and f"Vector index {world.vector_index} not found" in line


def test_an_index_of_another_dimension(world):
    s3v = world.client("s3vectors")
    s3v.create_vector_bucket(vectorBucketName=world.vector_bucket)
    s3v.create_index(vectorBucketName=world.vector_bucket, indexName=world.vector_index, dataType="float32",
                     dimension=384, distanceMetric="cosine")
    result = world.step(5, "car")  # the world's EMBEDDING_DIMENSION is 256
    assert result.returncode == 2
    line = one_line(result)
    assert "holds 384-dimension vectors but EMBEDDING_DIMENSION is 256" in line
    assert "EMBEDDING_DIMENSION=384" in line
    assert world.step(5, "car", "--dimension", "384", "--json").stdout.strip() == "[]"  # empty index: no hits


def test_a_filter_the_index_refuses(loaded):
    result = loaded.step(5, "car", "--filter", '{"source_uri": {"$regex": "^s3://"}}')
    assert result.returncode == 2
    line = one_line(result)
    assert "ValidationException" in line and "check --filter" in line


def test_an_s3_image_that_does_not_exist(loaded):
    result = loaded.step(5, "--image", uri_of(loaded, "no-such-image.png"))
    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith("error: ValidationException:") and "does not exist" in line


# ---------------------------------------------------------------------------------------------------- pages of results


def test_queryvectors_pages_are_all_read_up_to_top_k(loaded):
    # The stand-in answers at most 30 results a page (its default query_page_size): 45 come in two pages, 100 in four.
    hits = query_json(loaded, "a red sports car", "--top-k", "45")
    assert [h["rank"] for h in hits] == list(range(1, 46))
    assert len({h["key"] for h in hits}) == 45
    distances = [h["distance"] for h in hits]
    assert distances == sorted(distances)
    assert [h["key"] for h in query_json(loaded, "a red sports car", "--top-k", "30")] == [h["key"] for h in hits[:30]]
    assert len(query_json(loaded, "a red sports car", "--top-k", "100")) == 100


def test_the_standin_pages_queryvectors_and_refuses_a_token_of_another_query():
    import boto3
    from botocore.exceptions import ClientError

    from tests.standins import s3vectors, serve

    served = serve(s3vectors.make_app(options={"query_page_size": 4}))
    try:
        c = boto3.client("s3vectors", region_name="us-east-1", endpoint_url=served.url,
                         aws_access_key_id="testing", aws_secret_access_key="testing")
        c.create_vector_bucket(vectorBucketName="pages")
        c.create_index(vectorBucketName="pages", indexName="idx", dataType="float32", dimension=2,
                       distanceMetric="euclidean")
        c.put_vectors(vectorBucketName="pages", indexName="idx",
                      vectors=[{"key": f"v{n:02d}", "data": {"float32": [float(n), 0.0]}} for n in range(10)])
        query = {"vectorBucketName": "pages", "indexName": "idx", "topK": 9, "queryVector": {"float32": [0.0, 0.0]}}
        first = c.query_vectors(**query)
        assert [v["key"] for v in first["vectors"]] == ["v00", "v01", "v02", "v03"]
        pages = list(c.get_paginator("query_vectors").paginate(**query))
        assert [len(p["vectors"]) for p in pages] == [4, 4, 1]
        assert [v["key"] for p in pages for v in p["vectors"]] == [f"v{n:02d}" for n in range(9)]
        assert "nextToken" not in pages[-1]
        with pytest.raises(ClientError, match="another query"):
            c.query_vectors(**{**query, "queryVector": {"float32": [1.0, 0.0]}}, nextToken=first["nextToken"])
        with pytest.raises(ClientError, match="invalid nextToken"):
            c.query_vectors(**query, nextToken="bm90IGEgdG9rZW4")
    finally:
        served.stop()


# ---------------------------------------------------------------------------------------------------- the HTML page


class _Tags(HTMLParser):
    """The elements, attributes and text of a page, as a browser's parser reads them."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse_page(text: str) -> _Tags:
    parser = _Tags()
    parser.feed(text)
    parser.close()
    return parser


NASTY = ["<img src=x onerror=alert(1)>", "</script><script>alert(2)</script>", "\"'&<>", "中文 é ☃", "a b+c=d%20"]
PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "header", "h1", "div", "p", "main", "ol", "li",
             "a", "img", "span", "footer", "br"}


def test_the_page_escapes_every_text_and_attribute():
    from batch_embeddings import results_page

    hits = [{"rank": n + 1, "key": f"k{n}", "distance": 0.5, "source_uri": f"s3://b/{text}.png",
             "url": f"https://b.s3.us-east-1.amazonaws.com/{urllib.parse.quote(text)}.png?X-Amz-Signature=1&a=\"'<"}
            for n, text in enumerate(NASTY)]
    hits.append({"rank": 9, "key": "<k>", "distance": None, "source_uri": None, "url": "javascript:alert(3)"})
    for query in (results_page.QueryShown(text=NASTY[0] + NASTY[1]),
                  results_page.QueryShown(image_name="s3://b/" + NASTY[0], image_src="javascript:alert(4)")):
        page = results_page.render(query, hits, index="i<x>", bucket="b\"x", model="m'x", purpose="p&x",
                                   presign_seconds=3600)
        parsed = parse_page(page)
        assert {tag for tag, _ in parsed.tags} <= PAGE_TAGS  # nothing a key brought in became an element
        assert "<script" not in page.lower()
        assert all(not name.startswith("on") for _, attrs in parsed.tags for name in attrs)
        assert "javascript:" not in page
        text = "".join(parsed.text)
        for nasty in NASTY:  # each shows as the text it is
            assert f"s3://b/{nasty}.png" in text
        srcs = [attrs["src"] for tag, attrs in parsed.tags if tag == "img"]
        assert srcs == [h["url"] for h in hits[:-1]]  # attribute values come back exactly
        assert "(no source_uri) key <k>" in text
        csp = next(a["content"] for t, a in parsed.tags if t == "meta" and a.get("http-equiv") ==
                   "Content-Security-Policy")
        assert csp.startswith("default-src 'none'; img-src data: https://b.s3.us-east-1.amazonaws.com; style-src 'sha")
        assert "script-src" not in csp and "unsafe" not in csp
    assert "valid for 1 hour" in page


def test_the_page_says_how_long_its_links_last():
    from batch_embeddings import results_page

    when = datetime(2026, 1, 2, 3, 4, tzinfo=timezone.utc)
    page = results_page.render(results_page.QueryShown(text="x"), [], index="i", bucket="b", model="m",
                               purpose="p", presign_seconds=7200, generated=when)
    assert "valid for 2 hours, until 2026-01-02 05:04 UTC" in page
    assert "No hits." in page


@pytest.fixture(scope="module")
def browser():
    from tests.browser import Browser, find_chromium

    executable = find_chromium()
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: .ci/run installs it (apt-get install chromium)")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    with Browser(executable) as running:
        yield running


def render_in_browser(browser, page_file, shot=None) -> dict:
    """Open the page from file:// in headless Chromium; what the person looking at it gets."""
    page = browser.page(width=1280, height=4000)  # every lazy thumbnail inside the viewport: all of them load
    page.open(page_file.resolve().as_uri())
    seen = page.evaluate("""({
        images: [...document.images].map(i => ({src: i.currentSrc, width: i.naturalWidth, alt: i.alt,
                                                 link: i.closest('a') && i.closest('a').href})),
        uris: [...document.querySelectorAll('.uri')].map(e => e.textContent),
        query: document.querySelector('.query').textContent,
        scripts: document.scripts.length,
        handlers: [...document.querySelectorAll('*')].filter(e => [...e.attributes].some(
                   a => a.name.startsWith('on'))).length,
        footer: document.querySelector('footer').textContent,
    })""")
    if shot is not None:
        page.screenshot(shot)
    seen["dialogs"] = [e for e in page.events if e["method"] == "Page.javascriptDialogOpening"]
    return seen


def test_the_html_page_in_a_real_browser(loaded, browser, tmp_path):
    wanted = [uri_of(loaded, k) for k in (XSS_KEY, "img-000.png", "img-001.jpg", "img-002.gif", "img-003.webp",
                                          "tricky/with space+plus.png", "tricky/中文.jpg")]
    page_file = tmp_path / "results page.html"
    result = loaded.step(5, "a red sports car", "--html", str(page_file), "--filter",
                         json.dumps({"source_uri": {"$in": wanted}}))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"✓ Wrote the results page {page_file}" in result.stdout
    assert "valid for 3600 s" in result.stdout
    assert "X-Amz-Signature" not in result.stdout  # the links are in the page; the console shows them for --presign
    hits = query_json(loaded, "a red sports car", "--filter", json.dumps({"source_uri": {"$in": wanted}}))
    text = page_file.read_text(encoding="utf-8")
    assert "<img src=x onerror" not in text and "<script" not in text

    seen = render_in_browser(browser, page_file, tmp_path / "results.png")
    assert seen["uris"] == [h["source_uri"] for h in hits]  # in rank order, as text: the markup key included
    assert uri_of(loaded, XSS_KEY) in seen["uris"]
    assert seen["query"] == "“a red sports car”"
    assert len(seen["images"]) == len(wanted)
    for image, hit in zip(seen["images"], hits):
        assert image["width"] > 0, image  # the thumbnail loaded through its pre-signed link to the local S3
        assert image["src"].startswith(loaded.env["AWS_ENDPOINT_URL_S3"]) and "X-Amz-Expires=3600" in image["src"]
        assert image["link"] == image["src"]  # each image links to itself
        assert image["alt"] == hit["source_uri"]
    assert seen["scripts"] == 0 and seen["handlers"] == 0 and seen["dialogs"] == []
    assert "valid for 1 hour" in seen["footer"]
    assert (tmp_path / "results.png").read_bytes().startswith(b"\x89PNG")


def test_the_html_page_of_an_image_query_shows_the_image(loaded, browser, tmp_path):
    s3_page, local_page = tmp_path / "s3.html", tmp_path / "local.html"
    uri = uri_of(loaded, "img-008.png")
    assert loaded.step(5, "--image", uri, "--top-k", "3", "--html", str(s3_page), "--presign", "120").returncode == 0
    local = tmp_path / "query.png"
    local.write_bytes(image_bytes(loaded, "img-004.png"))
    assert loaded.step(5, "--image", str(local), "--top-k", "2", "--html", str(local_page)).returncode == 0

    seen = render_in_browser(browser, s3_page)
    query_image, *thumbnails = seen["images"]
    assert query_image["width"] > 0 and "X-Amz-Expires=120" in query_image["src"]
    assert uri in seen["query"] and seen["uris"][0] == uri and len(thumbnails) == 3
    assert "valid for 2 minutes" in seen["footer"]
    seen = render_in_browser(browser, local_page)
    assert seen["images"][0]["src"].startswith("data:image/png;base64,") and seen["images"][0]["width"] > 0
    assert str(local) in seen["query"] and seen["uris"][0] == uri_of(loaded, "img-004.png")


def test_a_broken_link_shows_the_placeholder_and_the_uri(loaded, browser, tmp_path):
    from batch_embeddings import results_page

    hits = query_json(loaded, "--image", uri_of(loaded, "img-012.png"), "--top-k", "2", "--presign", "60")
    hits[1]["url"] = hits[1]["url"].replace("img-", "gone-")  # the object is not there: 403/404 like an expired link
    page_file = tmp_path / "broken.html"
    page_file.write_text(results_page.render(results_page.QueryShown(text="broken"), hits, index="i", bucket="b",
                                             model="m", purpose="p", presign_seconds=60), encoding="utf-8")
    seen = render_in_browser(browser, page_file, tmp_path / "broken.png")
    assert [i["width"] > 0 for i in seen["images"]] == [True, False]
    assert seen["images"][1]["alt"] == hits[1]["source_uri"]  # the placeholder (img::after) shows the alt text
    assert seen["uris"] == [h["source_uri"] for h in hits]


def open_page(loaded, tmp_path, monkeypatch, capsys, answer: bool, *args: str, display: str | None = ":0"):
    """Step 5 with --open in this process, the default browser answering `answer`; (the URIs it was asked to open,
    stdout, stderr, the page)."""
    step = import_step(5)
    opened = []
    monkeypatch.setattr(webbrowser, "open", lambda uri: opened.append(uri) or answer)
    for name, value in loaded.env.items():
        monkeypatch.setenv(name, value)
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER"):
        monkeypatch.delenv(name, raising=False)
    if display is not None:
        monkeypatch.setenv("DISPLAY", display)
    page_file = tmp_path / "open.html"
    capsys.readouterr()
    assert step.main(["car", "--top-k", "1", "--html", str(page_file), "--open", *args]) == 0
    out, err = capsys.readouterr()
    assert page_file.exists()
    return opened, out, err, page_file


def test_open_shows_the_page_in_the_default_browser(loaded, tmp_path, monkeypatch, capsys):
    opened, out, err, page_file = open_page(loaded, tmp_path, monkeypatch, capsys, True)
    assert opened == [page_file.resolve().as_uri()]
    assert "No browser opened" not in out + err


def test_open_says_where_the_page_is_when_no_browser_opens(loaded, tmp_path, monkeypatch, capsys):
    opened, out, err, page_file = open_page(loaded, tmp_path, monkeypatch, capsys, False)
    assert opened == [page_file.resolve().as_uri()]
    (line,) = [line for line in out.splitlines() if "No browser opened" in line]
    assert line == f"! No browser opened (no browser found): the page is {page_file.resolve()}"


def test_open_without_a_display_tries_no_browser_and_says_where_the_page_is(loaded, tmp_path, monkeypatch, capsys):
    opened, out, err, page_file = open_page(loaded, tmp_path, monkeypatch, capsys, True, display=None)
    assert opened == []  # a console browser would take over the terminal
    assert f"! No browser opened (no display): the page is {page_file.resolve()}" in out.splitlines()


def test_open_with_json_says_it_on_stderr(loaded, tmp_path, monkeypatch, capsys):
    _, out, err, page_file = open_page(loaded, tmp_path, monkeypatch, capsys, False, "--json")
    assert len(json.loads(out)) == 1  # stdout holds the hits alone
    assert err.strip() == f"! No browser opened (no browser found): the page is {page_file.resolve()}"


@pytest.mark.parametrize("platform, environ, tried", [
    ("linux", {}, False), ("linux", {"WAYLAND_DISPLAY": "wayland-0"}, True), ("linux", {"BROWSER": "firefox"}, True),
    ("darwin", {}, True), ("win32", {}, True)])
def test_a_browser_is_tried_where_there_is_a_display(tmp_path, monkeypatch, platform, environ, tried):
    opened = []
    monkeypatch.setattr(webbrowser, "open", lambda uri: opened.append(uri) or True)
    why = results_page.open_in_browser(tmp_path / "page.html", environ, platform)
    assert (why is None, bool(opened)) == (tried, tried)
    assert why in (None, "no display")


@pytest.mark.parametrize("args, message", [(["car", "--open"], "--open goes with --html FILE"),
                                           (["car", "--html", " "], "--html needs a file name")])
def test_html_flags_are_checked_before_any_call(world, args, message):
    result = world.step(5, *args)
    assert result.returncode == 2
    assert message in one_line(result)


def test_a_page_that_cannot_be_written_is_one_line(loaded, tmp_path):
    (tmp_path / "file").write_text("x")
    result = loaded.step(5, "car", "--html", str(tmp_path / "file" / "page.html"))
    assert result.returncode == 2
    assert "cannot write the page" in one_line(result)


# ---------------------------------------------------------------------------------------------------- the index's topK


@pytest.fixture
def vectors_options(loaded):
    """Change the S3 Vectors stand-in's options for one test (the session shares it), restored after."""
    url = loaded.stack.s3vectors_url + "/_standin/config"

    def call(changes: dict | None = None) -> dict:
        data = None if changes is None else json.dumps(changes).encode()
        request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request) as response:
            return json.loads(response.read())

    before = call()
    yield call
    call({"max_top_k": before["max_top_k"]})


def test_a_top_k_over_the_index_limit_is_one_line_and_exit_2(loaded, vectors_options):
    vectors_options({"max_top_k": 100})  # the limit at general availability
    result = loaded.step(5, "a red sports car", "--top-k", "500")
    assert result.returncode == common.EXIT_USAGE, result.stdout + result.stderr
    line = one_line(result)
    assert line.startswith("error: the index refused --top-k 500: ValidationException:")
    assert line.endswith("use a smaller --top-k")
    assert len(query_json(loaded, "a red sports car", "--top-k", "100")) == 100


def test_a_top_k_the_index_takes_is_not_refused_here(loaded, vectors_options):
    vectors_options({"max_top_k": 10_000})  # raised, as AWS reportedly did
    hits = query_json(loaded, "a red sports car", "--top-k", "500")
    assert len(hits) == len(KEYS) and [h["rank"] for h in hits] == list(range(1, len(KEYS) + 1))
    assert {h["source_uri"] for h in hits} == {uri_of(loaded, key) for key in KEYS}


# ---------------------------------------------------------------------------------------------------- long texts


def test_a_long_text_is_sent_whole_and_a_cut_is_reported_from_the_answer(loaded):
    def nearest(text: str, n: int) -> list[str]:
        query = embed_text(text, DIMENSION)
        return [uri for _, uri in sorted((cosine_distance(query, embed_image(image_bytes(loaded, key), DIMENSION)),
                                          uri_of(loaded, key)) for key in KEYS)[:n]]

    def shown(out: str) -> list[str]:
        return [m.group(3) for m in map(ROW.match, out.splitlines()) if m]

    medium = ("a red sports car parked by the sea " * 300).strip()  # 10,499 characters, within the 8K tokens
    result = loaded.step(5, medium, "--top-k", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "truncatedCharLength" not in result.stdout and "characters" not in result.stdout  # no guess of ours
    assert shown(result.stdout) == nearest(medium, 3)  # the whole text was embedded, not a cut of ours

    long = ("a red sports car parked by the sea " * 1200).strip()  # 41,999 characters: the model cuts the end
    result = loaded.step(5, long, "--top-k", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    (said,) = [line for line in result.stdout.splitlines() if "truncatedCharLength" in line]
    assert "8K tokens" in said and "cut the end" in said
    assert f"truncatedCharLength 32768 of the text's {len(long):,} characters" in said
    assert shown(result.stdout) == nearest(long[:32768], 3)  # the start the model read
