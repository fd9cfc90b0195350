"""The index mirrors the bucket (batch_embeddings/mirror.py): every kind of day, run as the README's cron line runs
it, leaves an index whose keys, ETags and embeddings are those of the images under SOURCE_PREFIX; what is gone is
deleted only after a complete listing, only this prefix's, and never in bulk without --allow-mass-delete."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from datetime import datetime, timezone

import numpy as np
import orjson
import pytest

from batch_embeddings import keyset, mirror, naming, results_page
from tests import sample_images
from tests.conftest import ROOT
from tests.standins import embedding
from tests.standins import s3 as s3_standin
from tests.test_faults import FAST_FAIL

KEYS = [f"{folder}/img-{i:03d}.png" for folder in ("a", "b") for i in range(60)]


def cron_command() -> str:
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^#+ [^\n]*cron[^\n]*\n(.*?)(?=^#)", readme, re.M | re.S | re.I)
    return re.search(r"```bash\n(.*?)```", section.group(1), re.S).group(1).strip()


def day(world, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """A day as cron runs it: the README's command, as it is (with `args` added), from the checkout."""
    world.emulator("/_emulator/config", {"answer_when_ended": True})  # 02's first look finds the jobs ended
    environment = {**world.env, "JOB_INFO_FILE": str(world.cwd / "batch_job_info.json"), **(env or {})}
    return subprocess.run(["bash", "-c", " ".join([cron_command(), *args])], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=300)


def first_day(world, keys=KEYS) -> None:
    world.put_images(keys, prefix="2024/")
    done = world.daily()  # the first run starts the index (--new-index)
    assert done.returncode == 0, done.stdout + done.stderr


def put(world, key: str, data: bytes) -> None:
    s3_standin.put_objects(world.source_bucket, [(f"2024/{key}", data)])


def remove(world, *keys: str) -> None:
    s3 = world.client("s3")
    for key in keys:
        s3.delete_object(Bucket=world.source_bucket, Key=f"2024/{key}")


def index(world) -> dict[str, tuple[dict, list[float]]]:
    s3v, found, token = world.client("s3vectors"), {}, None
    while True:
        page = s3v.list_vectors(vectorBucketName=world.vector_bucket, indexName=world.vector_index,
                                returnMetadata=True, returnData=True, **({"nextToken": token} if token else {}))
        found.update({v["key"]: (v.get("metadata", {}), v["data"]["float32"]) for v in page["vectors"]})
        token = page.get("nextToken")
        if not token:
            return found


def assert_mirrors(world, prefix: str = "2024/") -> None:
    """The index holds exactly the prefix's images: a vector each, with its object's ETag and size, embedding the
    object's bytes as they are now."""
    listed = world.client("s3").list_objects_v2(Bucket=world.source_bucket, Prefix=prefix).get("Contents", [])
    images = {f"s3://{world.source_bucket}/{o['Key']}": o for o in listed if o["Key"].endswith(".png")}
    held = {key: value for key, value in index(world).items()
            if value[0].get("source_uri", "").startswith(f"s3://{world.source_bucket}/{prefix}")}
    assert set(held) == {naming.vector_key(uri) for uri in images}
    for uri, obj in images.items():
        metadata, vector = held[naming.vector_key(uri)]
        assert (metadata["source_uri"], metadata["etag"], metadata["size"]) == (uri, obj["ETag"].strip('"'),
                                                                                obj["Size"])
        data = s3_standin.read_object(world.source_bucket, obj["Key"])
        assert vector == pytest.approx(embedding.embed_image(data, 256), abs=1e-7)


def deleted_lines(world) -> list[dict]:
    return [json.loads(line) for path in sorted((world.cwd / "runs").glob("*/deleted.jsonl"))
            for line in path.read_text().splitlines()]


def test_a_day_with_changed_and_deleted_images_leaves_the_index_equal_to_the_bucket(world):
    first_day(world)
    put(world, KEYS[0], sample_images.png(1007))  # new bytes under the same key
    put(world, KEYS[1], sample_images.png(1008))
    same = s3_standin.read_object(world.source_bucket, f"2024/{KEYS[2]}")
    put(world, KEYS[2], same)  # written again, the same bytes: the same ETag
    remove(world, KEYS[3], KEYS[4])
    world.put_images([f"c/new-{i:03d}.png" for i in range(100)], prefix="2024/")
    done = day(world)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Against the index: 100 new, 2 changed, 116 unchanged, 2 gone from the bucket" in done.stdout
    assert "Images: 100 new, 2 changed (embedded again), 2 deleted from the index" in done.stdout
    assert_mirrors(world)
    gone = {f"s3://{world.source_bucket}/2024/{k}" for k in KEYS[3:5]}
    assert {(line["key"], line["source_uri"]) for line in deleted_lines(world)} == {
        (naming.vector_key(uri), uri) for uri in gone}
    assert all(line["etag"] and line["deleted"] for line in deleted_lines(world))
    quiet = day(world)  # what 03 loaded and deleted went into the journal: the cache still accounts for the index
    assert quiet.returncode == 0 and "Nothing to do" in quiet.stdout, quiet.stdout + quiet.stderr
    assert "ETags and sizes of the indexed images: from the local cache" in quiet.stdout


def test_a_day_with_only_changes_embeds_them_on_demand_and_one_with_nothing_new_does_nothing(world):
    first_day(world)
    put(world, KEYS[5], sample_images.png(1009))
    changed = day(world)
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert "Against the index: 0 new, 1 changed, 119 unchanged, 0 gone" in changed.stdout
    assert_mirrors(world)
    quiet = day(world)
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    assert "✓ Nothing to do: no new images to embed" in quiet.stdout
    assert "ETags and sizes of the indexed images: from the local cache" in quiet.stdout
    assert_mirrors(world)


def test_a_delete_only_day_deletes_at_once_and_a_rename_is_a_delete_and_a_new_image(world):
    first_day(world)
    remove(world, KEYS[10])
    deleted = day(world)
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    assert "Deleted 1 vector(s) of images no longer in the bucket" in deleted.stdout
    assert "Nothing to do" in deleted.stdout and not (world.cwd / "batch_job_info.json").exists()
    assert_mirrors(world)

    data = s3_standin.read_object(world.source_bucket, f"2024/{KEYS[11]}")
    remove(world, KEYS[11])
    put(world, "a/renamed.png", data)  # a rename: the same bytes under another key
    put(world, KEYS[10], sample_images.png(1010))  # the deleted key uploaded again, other bytes
    renamed = day(world)
    assert renamed.returncode == 0, renamed.stdout + renamed.stderr
    assert "Against the index: 2 new, 0 changed, 118 unchanged, 1 gone" in renamed.stdout
    assert_mirrors(world)


def test_a_prefix_emptied_by_mistake_deletes_nothing_until_allowed_once(world):
    first_day(world)
    remove(world, *KEYS)
    refused = day(world)
    assert refused.returncode == 10, refused.stdout + refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"error: 120 of the 120 vectors of images under s3://{world.source_bucket}/2024/ would be deleted (100%; "
        "over MAX_DELETE_FRACTION=0.1): nothing deleted, nothing submitted — if the images are gone for good, run 01 "
        "(or daily_run.py) with --allow-mass-delete once; to never delete, set MIRROR_DELETES=false"]
    assert len(index(world)) == 120 and not (world.cwd / "batch_job_info.json").exists()
    dry = world.step(1, "--dry-run")
    assert dry.returncode == 0 and "! A run would refuse: 120 of the 120 vectors" in dry.stdout
    allowed = day(world, "--allow-mass-delete")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert index(world) == {} and len(deleted_lines(world)) == 120


def test_the_guard_counts_against_both_limits_and_append_only_never_deletes(world):
    first_day(world)
    remove(world, *KEYS[:20])  # 17 %: over MAX_DELETE_FRACTION=0.1
    assert day(world).returncode == 10
    fraction = day(world, env={"MAX_DELETE_FRACTION": "0.2"})
    assert fraction.returncode == 0, fraction.stdout + fraction.stderr
    assert len(deleted_lines(world)) == 20
    remove(world, *KEYS[20:25])
    assert day(world, env={"MAX_DELETE_COUNT": "4"}).returncode == 10  # 5 > 4, though 5 % of them
    append_only = day(world, env={"MIRROR_DELETES": "false"})
    assert append_only.returncode == 0 and len(index(world)) == 100


def test_a_listing_that_fails_midway_deletes_nothing(world, proxy):
    first_day(world)
    remove(world, KEYS[0])
    url = proxy(world.stack.moto_url, lambda method, path: "refuse" if "2024%2Fb%2F" in path else None)
    failed = world.step(1, env={"AWS_ENDPOINT_URL_S3": url, **FAST_FAIL})
    assert failed.returncode == 1 and failed.stderr.startswith("error: ")
    assert len(index(world)) == 120 and deleted_lines(world) == []


def test_another_prefixs_and_another_tools_vectors_are_never_deleted(world):
    first_day(world)
    s3v = world.client("s3vectors")
    other = f"s3://{world.source_bucket}/2023/old.png"  # another prefix of the same bucket
    elsewhere = "s3://another-bucket/2024/a/img-000.png"  # the same key in another bucket
    vectors = [{"key": naming.vector_key(uri), "data": {"float32": [0.5] * 256}, "metadata": {"source_uri": uri}}
               for uri in (other, elsewhere)]
    vectors.append({"key": "not-ours", "data": {"float32": [0.5] * 256}, "metadata": {"source_uri": "x"}})
    s3v.put_vectors(vectorBucketName=world.vector_bucket, indexName=world.vector_index, vectors=vectors)
    remove(world, KEYS[0])
    done = day(world)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ETags and sizes of the indexed images: read from the index" in done.stdout  # keys it did not write
    held = index(world)
    assert {naming.vector_key(other), naming.vector_key(elsewhere), "not-ours"} <= set(held)
    assert [line["source_uri"] for line in deleted_lines(world)] == [f"s3://{world.source_bucket}/2024/{KEYS[0]}"]
    assert_mirrors(world)


def test_vectors_without_an_etag_are_current_unless_asked_to_embed_them_again(world):
    first_day(world)
    s3v = world.client("s3vectors")  # vectors as a version before provenance wrote them: no ETag
    old = {key: value for key, value in index(world).items()}
    s3v.put_vectors(vectorBucketName=world.vector_bucket, indexName=world.vector_index, vectors=[
        {"key": key, "data": {"float32": vector}, "metadata": {"source_uri": meta["source_uri"]}}
        for key, (meta, vector) in old.items()])
    (world.cwd / mirror.CACHE_NAME).unlink(missing_ok=True)
    quiet = day(world)
    assert quiet.returncode == 0 and "Nothing to do" in quiet.stdout
    again = world.step(1, "--reembed-without-etag", "--dry-run")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Against the index: 0 new, 120 changed" in again.stdout


def publish_inventory(world, extra_rows: list[list[str]]) -> str:
    """An S3 Inventory report (CSV, versions: All) of the bucket as it is, plus `extra_rows`; its manifest's URI."""
    s3 = world.client("s3")
    listed = s3.list_objects_v2(Bucket=world.source_bucket).get("Contents", [])
    rows = [[world.source_bucket, o["Key"], "v2", "true", "false", str(o["Size"]), "2026-12-01T00:00:00Z",
             o["ETag"].strip('"'), "STANDARD"] for o in listed] + extra_rows
    body = "".join(",".join(f'"{v}"' for v in row) + "\n" for row in rows).encode()
    s3.put_object(Bucket=world.result_bucket, Key="inventory/data/part0.csv", Body=body)
    manifest = {"sourceBucket": world.source_bucket, "destinationBucket": f"arn:aws:s3:::{world.result_bucket}",
                "version": "2016-11-30", "creationTimestamp": "1764547200000", "fileFormat": "CSV",
                "fileSchema": "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, "
                              "StorageClass",
                "files": [{"key": "inventory/data/part0.csv", "size": len(body),
                           "MD5checksum": hashlib.md5(body).hexdigest()}]}
    s3.put_object(Bucket=world.result_bucket, Key="inventory/manifest.json", Body=orjson.dumps(manifest))
    return f"s3://{world.result_bucket}/inventory/manifest.json"


def test_a_delete_marker_in_an_inventory_of_a_versioned_bucket_is_a_deletion(world):
    first_day(world)
    remove(world, KEYS[0])  # in a versioned bucket: a delete marker over the old versions
    uri = publish_inventory(world, [
        [world.source_bucket, f"2024/{KEYS[0]}", "v9", "true", "true", "", "2026-12-01T00:00:00Z", "", ""],
        [world.source_bucket, f"2024/{KEYS[0]}", "v1", "false", "false", "74", "2026-11-01T00:00:00Z", "x", "STANDARD"],
        [world.source_bucket, f"2024/{KEYS[1]}", "v1", "false", "false", "9", "2026-11-01T00:00:00Z", "y", "STANDARD"],
    ])
    done = world.step(1, "--inventory", uri)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Against the index: 0 new, 0 changed, 119 unchanged, 1 gone" in done.stdout  # an old version is not news
    assert [line["source_uri"] for line in deleted_lines(world)] == [f"s3://{world.source_bucket}/2024/{KEYS[0]}"]
    assert_mirrors(world)


def test_an_emptied_prefix_with_deletions_off_is_nothing_to_do_not_a_broken_job_file(world):
    world.client("s3").put_object(Bucket=world.source_bucket, Key="2024/readme.txt", Body=b"not an image")
    first = world.step(1)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Nothing to do" in first.stdout and not (world.cwd / "batch_job_info.json").exists()  # never jobless


# ---------------------------------------------------------------------------------------------- the cache


def state_for(keys: list[str], states: list[int], ours: list[bool]) -> mirror.IndexState:
    packed = keyset.KeySet(b"".join(bytes.fromhex(k) for k in keys))
    order = [keys.index(k.hex()) for k in packed.packed.tolist()]
    return mirror.IndexState(packed, np.array([states[i] for i in order], dtype=np.uint32),
                             np.array([ours[i] for i in order], dtype=bool))


def test_the_cache_with_its_journal_is_used_only_while_it_accounts_for_the_index(tmp_path):
    import common

    config = common.Config(vector_bucket="vb", vector_index="ix", source_bucket="src", source_prefix="p/")
    keys = [naming.vector_key(f"s3://src/p/{i}.png") for i in range(5)]
    state = state_for(keys, [11, 12, 13, 14, 15], [True] * 5)
    mirror.save(tmp_path, config, state)
    same, why = mirror._from_cache(tmp_path, config, state.keys)
    assert why.startswith("from the local cache") and same.states.tolist() == state.states.tolist()

    new = naming.vector_key("s3://src/p/new.png")
    mirror.journal(tmp_path, [new, keys[0]], [21, 22])  # a new vector and a changed one
    mirror.journal(tmp_path, [keys[1]], [mirror.GONE])  # a deleted one
    today = keyset.KeySet(b"".join(bytes.fromhex(k) for k in [new, *keys[0:1], *keys[2:]]))
    found, why = mirror._from_cache(tmp_path, config, today)
    assert why.startswith("from the local cache")
    by_key = dict(zip((k.hex() for k in today.packed.tolist()), found.states.tolist()))
    assert by_key == {new: 21, keys[0]: 22, keys[2]: 13, keys[3]: 14, keys[4]: 15}

    stranger = keyset.KeySet(b"".join(bytes.fromhex(k) for k in [new, keys[0], *keys[2:],
                                                                    naming.vector_key("s3://src/p/x.png")]))
    assert mirror._from_cache(tmp_path, config, stranger) == (None, "the index holds 1 vector(s) the cache does not "
                                                                    "know")  # written by another tool or folder
    written_then_gone = keyset.KeySet(b"".join(bytes.fromhex(k) for k in keys))
    assert mirror._from_cache(tmp_path, config, written_then_gone)[0] is None  # the journal's new key is not there
    lost = keyset.KeySet(b"".join(bytes.fromhex(k) for k in [new, keys[0], keys[2], keys[3]]))
    assert mirror._from_cache(tmp_path, config, lost) == (None, "vectors the cache knows are no longer in the "
                                                                "index")  # keys[4] gone, deleted by no step
    other = common.Config(vector_bucket="vb", vector_index="other", source_bucket="src", source_prefix="p/")
    assert mirror._from_cache(tmp_path, other, state.keys)[1].endswith("of another index or source prefix")


@pytest.mark.parametrize("listed, stored, changed", [
    (('"abc-3"', 10), ("abc-3", 10), False),  # a multipart ETag, quoted in a listing, bare in metadata
    (('"abc-3"', 10), ("abc-4", 10), True),
    (('"abc"', 10), ("abc", 11), True),  # the same ETag, another size
])
def test_an_images_state_is_its_etag_and_size(listed, stored, changed):
    assert (mirror.state_of(*listed) != mirror.state_of(*stored)) is changed
    assert mirror.state_of(None, 10) == mirror.UNKNOWN


def test_the_results_page_shows_when_each_image_was_embedded():
    hits = [{"rank": 1, "distance": 0.1, "source_uri": "s3://b/a.jpg", "embedded": "2026-12-01", "url": None},
            {"rank": 2, "distance": 0.2, "source_uri": "s3://b/b.jpg", "embedded": None, "url": None}]
    page = results_page.render(results_page.QueryShown(text="cat"), hits, index="i", bucket="b", model="m",
                               purpose="GENERIC_RETRIEVAL", presign_seconds=3600,
                               generated=datetime(2026, 12, 7, tzinfo=timezone.utc))
    assert page.count('<span class="embedded">') == 1  # a vector written before the date was recorded shows none
    assert '<span class="embedded">embedded 2026-12-01</span>' in page
