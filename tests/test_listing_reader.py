"""The lean ListObjectsV2 reader (listing.fast_listing_client) equals botocore's own parser, on the same bytes.

Every body goes through two S3 clients whose HTTP answer is that body: a plain one (botocore parses and decodes)
and a `listing.fast_listing_client` one. What 01 uses must come out the same: keys (decoded), sizes, ETags, the common prefixes,
IsTruncated and NextContinuationToken. The bodies: the S3 API Reference's examples as printed, moto's answers,
and generated pages in many orders of their top-level elements, pretty-printed and compact, with entities and
URL-encoded keys. Element order is not part of the answer's form: real S3 writes the paging fields first, moto
after the contents.
"""

from __future__ import annotations

import random
from urllib.parse import quote
from xml.sax.saxutils import escape

import boto3
import pytest
from botocore.awsrequest import AWSResponse

from batch_embeddings import listing
from tests.standins import s3 as s3_standin

NS = 'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'

# The S3 API Reference, ListObjectsV2, "Examples" (the elided objects left out; literal quotes in the ETags as
# printed there).
DOC_CONTINUATION = f"""<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult {NS}>
  <Name>bucket</Name>
  <Prefix></Prefix>
  <NextContinuationToken>1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=</NextContinuationToken>
  <KeyCount>1000</KeyCount>
  <MaxKeys>1000</MaxKeys>
  <IsTruncated>true</IsTruncated>
  <Contents>
    <Key>happyface.jpg</Key>
    <LastModified>2014-11-21T19:40:05.000Z</LastModified>
    <ETag>"70ee1738b6b21e2c8a43f3a5ab0eee71"</ETag>
    <Size>11</Size>
    <StorageClass>STANDARD</StorageClass>
  </Contents>
</ListBucketResult>"""
DOC_CONTINUED = f"""<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult {NS}>
  <Name>bucket</Name>
  <Prefix></Prefix>
  <ContinuationToken>1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=</ContinuationToken>
  <KeyCount>112</KeyCount>
  <MaxKeys>1000</MaxKeys>
  <IsTruncated>false</IsTruncated>
  <Contents>
    <Key>happyface.jpg</Key>
    <LastModified>2014-11-21T19:40:05.000Z</LastModified>
    <ETag>"70ee1738b6b21e2c8a43f3a5ab0eee71"</ETag>
    <Size>11</Size>
    <StorageClass>STANDARD</StorageClass>
  </Contents>
</ListBucketResult>"""
DOC_START_AFTER = f"""<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult {NS}>
  <Name>quotes</Name>
  <Prefix>E</Prefix>
  <StartAfter>ExampleGuide.pdf</StartAfter>
  <KeyCount>1</KeyCount>
  <MaxKeys>3</MaxKeys>
  <IsTruncated>false</IsTruncated>
  <Contents>
    <Key>ExampleObject.txt</Key>
    <LastModified>2013-09-17T18:07:53.000Z</LastModified>
    <ETag>"599bab3ed2c697f1d26842727561fd94"</ETag>
    <Size>857</Size>
    <StorageClass>REDUCED_REDUNDANCY</StorageClass>
  </Contents>
</ListBucketResult>"""
DOC_DELIMITER = f"""<ListBucketResult {NS}>
  <Name>example-bucket</Name>
  <Prefix>photos/2006/</Prefix>
  <KeyCount>3</KeyCount>
  <MaxKeys>1000</MaxKeys>
  <Delimiter>/</Delimiter>
  <IsTruncated>false</IsTruncated>
  <Contents>
    <Key>photos/2006/</Key>
    <LastModified>2016-04-30T23:51:29.000Z</LastModified>
    <ETag>"d41d8cd98f00b204e9800998ecf8427e"</ETag>
    <Size>0</Size>
    <StorageClass>STANDARD</StorageClass>
  </Contents>

  <CommonPrefixes>
    <Prefix>photos/2006/February/</Prefix>
  </CommonPrefixes>
  <CommonPrefixes>
    <Prefix>photos/2006/January/</Prefix>
  </CommonPrefixes>
</ListBucketResult>"""
DOCUMENTED = {"continuation-token": DOC_CONTINUATION, "continued": DOC_CONTINUED, "start-after": DOC_START_AFTER,
              "delimiter": DOC_DELIMITER}

# Keys that need care: a space, a plus, a percent sign, non-ASCII, XML's own characters, a CR and a tab.
AWKWARD = ["2024/my trip/00001.jpg", "2024/a+b.jpg", "2024/100%.png", "2024/05/北京 故宫 (2).JPG",
           "2024/R&D <1> \"q\" 'a'.png", "2024/line\rbreak.jpg", "2024/tab\there.gif", "2024/plain.jpeg",
           "2024/ü/é+%2B.webp"]


class _Raw:
    def __init__(self, body: bytes):
        self.body = body

    def stream(self, **_):
        yield self.body


def _client(lean: bool, body: bytes):
    s3 = boto3.client("s3", region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    if lean:
        listing.fast_listing_client(s3)
    s3.meta.events.register_first(
        "before-send.s3.ListObjectsV2",
        lambda request, **_: AWSResponse(request.url, 200, {"Content-Type": "application/xml"}, _Raw(body)))
    return s3


def used(page: dict) -> dict:
    """What 01 reads of a page."""
    return {
        "Contents": [(o["Key"], o.get("Size", 0), o.get("ETag")) for o in page.get("Contents", [])],
        "CommonPrefixes": [p["Prefix"] for p in page.get("CommonPrefixes", [])],
        "IsTruncated": bool(page.get("IsTruncated")),
        "NextContinuationToken": page.get("NextContinuationToken"),
    }


def both(body: bytes | str) -> tuple[dict, dict]:
    body = body.encode() if isinstance(body, str) else body
    reference = _client(False, body).list_objects_v2(Bucket="bucket", Prefix="2024/")
    lean = _client(True, body).list_objects_v2(Bucket="bucket", Prefix="2024/")
    return used(reference), used(lean)


def assert_equal(body) -> dict:
    reference, lean = both(body)
    assert lean == reference
    return reference


@pytest.mark.parametrize("name", DOCUMENTED)
def test_the_api_references_examples_read_the_same(name):
    page = assert_equal(DOCUMENTED[name])
    assert page["Contents"]  # the example was read, not an empty page taken for it


def test_the_documented_continuation_token_is_read_where_s3_writes_it():
    page = assert_equal(DOC_CONTINUATION)
    assert page["IsTruncated"] and page["NextContinuationToken"] == "1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM="


def element(name: str, text: str) -> str:
    return f"<{name}>{text}</{name}>"


def contents(key: str, size: int, etag: str, pretty: bool, encode: bool) -> str:
    sep = "\n    " if pretty else ""
    parts = [element("Key", _key_text(key, encode)), element("LastModified", "2026-12-01T00:00:00.000Z"),
             element("ETag", "&quot;%s&quot;" % etag), element("Size", str(size)),
             element("StorageClass", "STANDARD")]
    return f"<Contents>{sep}{sep.join(parts)}{sep[:-2] if pretty else ''}</Contents>"


def _key_text(key: str, encode: bool) -> str:
    if encode:  # S3's url encoding: a space as +, the rest percent-encoded (keys stay in XML as well)
        return escape(quote(key, safe="/").replace("%20", "+"))
    return escape(key, {'"': "&quot;", "'": "&apos;", "\r": "&#13;"})


def page_elements(keys, prefixes, *, encode: bool, token: str | None, pretty: bool, seed: int) -> list[str]:
    rng = random.Random(seed)
    fields = [element("Name", "bucket"), element("Prefix", _key_text("2024/", encode)),
              element("KeyCount", str(len(keys) + len(prefixes))), element("MaxKeys", "1000"),
              element("IsTruncated", "true" if token else "false")]
    if token:
        fields.append(element("NextContinuationToken", escape(token)))
    if encode:
        fields.append(element("EncodingType", "url"))
    if prefixes:
        fields.append(element("Delimiter", "/"))
    blocks = [contents(k, rng.randrange(10**7), f"{rng.getrandbits(128):032x}", pretty, encode) for k in keys]
    blocks += [f"<CommonPrefixes>{element('Prefix', _key_text(p, encode))}</CommonPrefixes>" for p in prefixes]
    return fields + blocks


def assemble(elements: list[str], pretty: bool) -> str:
    sep = "\n  " if pretty else ""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult {NS}>{sep}' + sep.join(elements)
            + ("\n" if pretty else "") + "</ListBucketResult>")


ORDERS = {
    "documented": lambda fields, blocks, rng: fields + blocks,
    "moto": lambda fields, blocks, rng: fields[:2] + blocks + fields[2:],
    "fields last, reversed": lambda fields, blocks, rng: blocks + fields[::-1],
    "interleaved": lambda fields, blocks, rng: [x for pair in zip(blocks, fields) for x in pair]
    + blocks[len(fields):] + fields[len(blocks):],
    "shuffled": lambda fields, blocks, rng: rng.sample(fields + blocks, len(fields) + len(blocks)),
}


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("pretty", [False, True], ids=["compact", "pretty"])
@pytest.mark.parametrize("encode", [True, False], ids=["url-encoded", "plain"])
@pytest.mark.parametrize("token", [None, "1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=", "a&b<c>"],
                         ids=["last", "truncated", "escaped-token"])
def test_a_page_reads_the_same_in_any_order(order, pretty, encode, token):
    prefixes = ["2024/sub dir/", "2024/a+b/", "2024/北京/"]
    for seed in range(3 if order == "shuffled" else 1):
        rng = random.Random(seed)
        elements = page_elements(AWKWARD, prefixes, encode=encode, token=token, pretty=pretty, seed=seed)
        fields, blocks = elements[:len(elements) - len(AWKWARD) - len(prefixes)], \
            elements[len(elements) - len(AWKWARD) - len(prefixes):]
        page = assert_equal(assemble(ORDERS[order](fields, blocks, rng), pretty))
        assert sorted(key for key, _, _ in page["Contents"]) == sorted(AWKWARD)
        assert page["NextContinuationToken"] == token and page["IsTruncated"] == bool(token)


@pytest.mark.parametrize("body", [
    f'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult {NS}><Name>bucket</Name><Prefix>2024/</Prefix>'
    "<KeyCount>0</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated></ListBucketResult>",
    f"<ListBucketResult {NS}><Name>bucket</Name><Prefix/><KeyCount>0</KeyCount><MaxKeys>1000</MaxKeys>"
    "<EncodingType>url</EncodingType><IsTruncated>false</IsTruncated></ListBucketResult>",
    f"<ListBucketResult {NS}><Name>bucket</Name><Prefix>2024%2F</Prefix><NextContinuationToken>t</NextContinuationToken>"
    "<KeyCount>2</KeyCount><MaxKeys>2</MaxKeys><Delimiter>/</Delimiter><EncodingType>url</EncodingType>"
    "<IsTruncated>true</IsTruncated><CommonPrefixes><Prefix>2024/my+trip/</Prefix></CommonPrefixes>"
    "<CommonPrefixes>\n  <Prefix>2024/%E5%8C%97%E4%BA%AC/</Prefix>\n</CommonPrefixes></ListBucketResult>",
], ids=["empty", "empty-self-closed-prefix", "only-common-prefixes"])
def test_empty_pages_and_pages_of_common_prefixes_read_the_same(body):
    assert_equal(body)


def test_entities_in_keys_and_etags_read_the_same():
    body = (f"<ListBucketResult {NS}><Name>bucket</Name><Prefix>2024/</Prefix><KeyCount>3</KeyCount>"
            "<MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>"
            "<Contents><Key>2024/R&amp;D &quot;x&quot; &#13;&#x4E2D;.jpg</Key><Size>1</Size>"
            "<ETag>&#34;abc&#34;</ETag></Contents>"
            "<Contents><Key>2024/&lt;tag&gt; &apos;q&apos;.png</Key><Size>2</Size><ETag>&quot;d-3&quot;</ETag>"
            "</Contents><Contents><Key>2024/a\r\nb.jpg</Key><Size>3</Size></Contents></ListBucketResult>")
    page = assert_equal(body)
    assert page["Contents"][0] == ('2024/R&D "x" \r中.jpg', 1, '"abc"')


def test_moto_answers_read_the_same_in_both_orders(world):
    """moto's own bytes, as it writes them and as the stand-in puts them in the documented order."""
    s3 = world.client("s3")
    keys = [f"2024/{name}" for name in ("my trip/1.jpg", "a+b.jpg", "100%.png", "北京/故宫 (2).JPG", "R&D <1>.png")]
    for key in keys:
        s3.put_object(Bucket=world.source_bucket, Key=key, Body=b"x")
    bodies: list[bytes] = []
    s3.meta.events.register("before-parse.s3.ListObjectsV2",
                            lambda response_dict, **_: bodies.append(response_dict["body"]))
    for order in ("moto", "documented"):
        world.stack.s3.list_order = order
        for params in ({"MaxKeys": 2}, {"Delimiter": "/"}, {}):
            s3.list_objects_v2(Bucket=world.source_bucket, Prefix="2024/", **params)
    assert len(bodies) == 6
    assert bodies[0].index(b"<NextContinuationToken>") > bodies[0].index(b"<Contents>")  # moto's order
    assert bodies[3].index(b"<NextContinuationToken>") < bodies[3].index(b"<Contents>")  # S3's order
    for body in bodies:
        page = assert_equal(body)
        assert page["Contents"] or page["CommonPrefixes"]


def test_the_stand_in_moves_every_field_ahead_of_the_contents():
    body = assemble(ORDERS["moto"](*_split(page_elements(AWKWARD[:2], ["2024/x/"], encode=True, token="t",
                                                        pretty=False, seed=0), 3), None), False).encode()
    moved = s3_standin.documented_order(body)
    first = moved.index(b"<Contents>")
    for name in (b"Name", b"Prefix", b"NextContinuationToken", b"KeyCount", b"MaxKeys", b"EncodingType",
                 b"IsTruncated", b"Delimiter"):
        assert moved.index(b"<%s>" % name) < first, name
    assert sorted(moved) == sorted(body)  # the same bytes, moved


def _split(elements: list[str], blocks: int) -> tuple[list[str], list[str]]:
    return elements[:-blocks], elements[-blocks:]


@pytest.mark.parametrize("order", ["documented", "moto"])
def test_01_finds_every_image_of_a_large_folder_and_of_an_awkward_one_exactly_once(world, order):
    """2,500 images in one folder (three pages) and a folder named with a space, a plus and Chinese characters:
    every image is in the run's manifests once, by its real key, whichever order S3 writes its fields in."""
    import orjson

    world.stack.s3.list_order = order
    keys = [f"2024/big/{i:05d}.jpg" for i in range(2500)] + [f"2024/my trip + 北京/{n} (2).JPG" for n in range(30)]
    s3_standin.put_objects(world.source_bucket, ((key, b"jpeg") for key in keys))

    done = world.step(1)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "✓ Found 2530 images" in done.stdout
    uris = [orjson.loads(line)["modelInput"]["singleEmbeddingParams"]["image"]["source"]["s3Location"]["uri"]
            for job in world.job_info()["jobs"] for manifest in job["manifests"]
            for line in open(manifest["local_path"], "rb")]
    assert sorted(uris) == sorted(f"s3://{world.source_bucket}/{key}" for key in keys)
