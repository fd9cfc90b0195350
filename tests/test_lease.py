"""The lease on a source prefix (lease.py): one run at a time on the images under SOURCE_PREFIX, whatever machine or
job-info file it starts from. A second job file on the same prefix exits 7 naming the holder and changes nothing;
an expired lease, or one a killed step of the same job file left, is taken over with a message; the lease is
renewed while a step runs (clock injected), never overwritten once another holds it, and gone when the step ends.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from datetime import datetime, timezone

import pytest
from botocore.exceptions import ClientError

import common
from batch_embeddings import jobinfo, lease, naming, selection
from tests.conftest import ROOT, STEPS

A_FILE = "batch_job_info.json"
B_FILE = "elsewhere/batch_job_info.json"  # a second job file, as a second checkout with its own .env has
HELD = re.compile(r"error: (?P<step>\S+) on (?P<host>\S+) for (?P<file>\S+) \(since (?P<since>[0-9T:+-]+), until "
                  r"(?P<until>[0-9T:+-]+)\) is working on the images under s3://[^ ]+/2024/ \(lease "
                  r"s3://[^ ]+/2024/\.bedrock-batch-embeddings\.lease\) — one run at a time on a prefix: let it "
                  r"finish, then run this step again\n")


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def keys(world) -> list[str]:
    listed = world.client("s3").list_objects_v2(Bucket=world.source_bucket).get("Contents", [])
    return sorted(o["Key"] for o in listed)


def manifests(world) -> list[str]:
    return [k for k in keys(world) if k.endswith(".jsonl")]


def jobs(world) -> list[dict]:
    return world.emulator("/_emulator/jobs")["jobs"]


def the_lease(world) -> dict:
    body = world.client("s3").get_object(Bucket=world.source_bucket, Key="2024/" + lease.NAME)["Body"].read()
    return json.loads(body)


def wait_for_line(process: subprocess.Popen, text: str) -> str:
    """Read the process's output until a line holds `text` (the process says where it is: no clock)."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"{text!r} never printed:\n{''.join(seen)}{process.stderr.read()}")


def test_a_second_job_file_on_the_same_prefix_exits_7_and_changes_nothing_while_02_looks_freely(world):
    world.put_images([f"a/img-{i:03d}.png" for i in range(100)], prefix="2024/")
    world.emulator("/_emulator/config", {"hold_scheduled": True})
    created = world.step(1)
    assert created.returncode == 0, created.stdout + created.stderr
    assert lease.NAME not in created.stdout  # 01's listing saw its own lease: not an image, not counted
    assert not any(k.endswith(lease.NAME) for k in keys(world))  # released when 01 ended
    first_manifests = manifests(world)
    assert len(first_manifests) == 1 and len(jobs(world)) == 1

    monitor = subprocess.Popen([sys.executable, str(ROOT / STEPS[2]), "--wait", "--interval", "0.05"],
                               cwd=world.cwd, env=world.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_line(monitor, "Next check in")
        held = the_lease(world)
        assert held["host"] == socket.gethostname() and held["job_info"] == str(world.cwd / A_FILE)
        assert held["step"] == "02_monitor_job.py" and held["pid"] == monitor.pid

        # The second checkout's 01: refused in one line naming the holder, nothing deleted or submitted.
        other = world.step(1, env={"JOB_INFO_FILE": B_FILE})
        assert other.returncode == 7, other.stdout + other.stderr
        shown = HELD.fullmatch(other.stderr)
        assert shown, other.stderr
        assert shown["host"] == socket.gethostname() and shown["file"] == str(world.cwd / A_FILE)
        assert shown["since"] == held["since"] and shown["until"] == held["until"]
        assert manifests(world) == first_manifests and len(jobs(world)) == 1
        assert not (world.cwd / B_FILE).exists()

        # Looking needs no lock: 02 --no-wait shows the run while 02 --wait holds it, and saves nothing.
        before = (world.cwd / A_FILE).read_bytes()
        looked = world.step(2, "--no-wait")
        assert looked.returncode == 3, looked.stdout + looked.stderr
        assert ">>> STATUS: Scheduled <<<" in looked.stdout and looked.stderr == ""
        assert (world.cwd / A_FILE).read_bytes() == before
    finally:
        world.emulator("/_emulator/config", {"hold_scheduled": False})
        out, err = monitor.communicate(timeout=120)
    assert monitor.returncode == 0, out + err
    assert lease.NAME not in " ".join(keys(world))  # released at the end


@pytest.mark.parametrize("status", ["Scheduled", "InProgress"])
def test_between_its_steps_another_runs_job_still_refuses_a_second_job_file(world, status):
    """The tester's case: no step of the first run is working (no lease), its job waits Scheduled (or runs); a
    second checkout's 01 on the same prefix must not delete its manifest nor submit the same images again."""
    world.put_images([f"a/img-{i:03d}.png" for i in range(100)], prefix="2024/")
    world.emulator("/_emulator/config", {"hold_scheduled": True} if status == "Scheduled" else
                   {"hold_after_records": 10})
    assert world.step(1).returncode == 0
    first = world.job_info()["jobs"][0]
    bedrock = world.client("bedrock")
    deadline = __import__("time").monotonic() + 60
    while bedrock.get_model_invocation_job(jobIdentifier=first["job_arn"])["status"] != status:
        assert __import__("time").monotonic() < deadline, f"the job never became {status}"
        __import__("time").sleep(0.05)
    assert not any(k.endswith(lease.NAME) for k in keys(world))  # no step works: no lease
    first_manifests = manifests(world)

    other = world.step(1, env={"JOB_INFO_FILE": B_FILE})
    assert other.returncode == 7, other.stdout + other.stderr
    assert other.stderr == (f"error: job {first['job_name']} ({status}, submitted "
                            f"{bedrock.get_model_invocation_job(jobIdentifier=first['job_arn'])['submitTime']}) of "
                            f"another run reads {first['input_s3_uri']} — one run at a time on a prefix: carry on with "
                            "the job-info file that started it, or wait until it ends\n")
    assert manifests(world) == first_manifests and len(jobs(world)) == 1 and not (world.cwd / B_FILE).exists()
    assert not any(k.endswith(lease.NAME) for k in keys(world))  # the refused step let its lease go

    # The first job file's own steps carry on: its 01 is not refused by its own job.
    again = world.step(1)
    assert again.returncode != 7, again.stdout + again.stderr
    bedrock.stop_model_invocation_job(jobIdentifier=first["job_arn"])


def put_foreign_lease(world, until: float, owner: str = "f" * 32) -> None:
    world.client("s3").put_object(Bucket=world.source_bucket, Key="2024/" + lease.NAME, Body=json.dumps({
        "owner": owner, "host": "build-07", "job_info": "/srv/other/batch_job_info.json", "step": "daily_run.py",
        "pid": 4242, "since": iso(until - 3600), "until": iso(until)}).encode())


def test_a_live_lease_of_another_machine_refuses_01_and_an_expired_one_is_taken_over(world):
    world.put_images([f"a/img-{i:03d}.png" for i in range(100)], prefix="2024/")
    now = datetime.now(timezone.utc).timestamp()
    put_foreign_lease(world, until=now + 3600)
    refused = world.step(1)
    assert refused.returncode == 7, refused.stdout + refused.stderr
    shown = HELD.fullmatch(refused.stderr)
    assert shown and shown["host"] == "build-07" and shown["file"] == "/srv/other/batch_job_info.json"
    assert shown["until"] == iso(now + 3600)
    assert manifests(world) == [] and jobs(world) == [] and not (world.cwd / A_FILE).exists()
    assert the_lease(world)["host"] == "build-07"  # left as it was

    put_foreign_lease(world, until=now - 60)  # its machine died an hour ago
    created = world.step(1)
    assert created.returncode == 0, created.stdout + created.stderr
    assert (f"Took over the lease s3://{world.source_bucket}/2024/{lease.NAME} that expired: daily_run.py on "
            f"build-07 for /srv/other/batch_job_info.json") in created.stdout
    assert len(jobs(world)) == 1 and len(manifests(world)) == 1
    assert lease.NAME not in " ".join(keys(world))


def test_a_lease_a_killed_step_left_is_taken_back_by_its_own_job_file_at_once(world):
    world.put_images([f"a/img-{i:03d}.png" for i in range(100)], prefix="2024/")
    code = ("import sys, boto3\nfrom batch_embeddings import jobinfo\n"
            f"s3 = boto3.client('s3', region_name='us-east-1', endpoint_url={world.endpoint('s3')!r})\n"
            f"with jobinfo.locked({str(world.cwd / A_FILE)!r}, '01_create_job.py'):\n"
            f"    jobinfo.claim({str(world.cwd / A_FILE)!r}, s3, {world.source_bucket!r}, '2024/', '123456789012')\n"
            "    print('held', flush=True)\n"
            "    sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=world.env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    holder.kill()  # no chance to release the lease: it stays in S3 for hours
    holder.wait()
    left = the_lease(world)
    assert left["pid"] == holder.pid

    other = world.step(1, env={"JOB_INFO_FILE": B_FILE})  # another job file must still wait for it
    assert other.returncode == 7 and HELD.fullmatch(other.stderr), other.stderr
    created = world.step(1)  # the same job file: its lock file names the lease its dead holder left
    assert created.returncode == 0, created.stdout + created.stderr
    assert (f"that an earlier step of this job-info file left: 01_create_job.py on {socket.gethostname()} for "
            f"{world.cwd / A_FILE}") in created.stdout
    assert len(jobs(world)) == 1


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_renewal_moves_the_expiry_and_never_overwrites_a_lease_another_took_over(world):
    s3 = world.client("s3")
    clock = Clock(datetime.now(timezone.utc).timestamp())
    said = []
    mine = lease.Lease(s3, world.source_bucket, "2024/", "123456789012", world.cwd / A_FILE, "03", clock=clock,
                       ttl=600, renew_every=120, say=said.append)
    mine.take()
    first = the_lease(world)
    assert first["until"] == iso(clock.now + 600) and first["owner"] == mine.id
    etag = mine.etag

    clock.now += 60
    mine.keep()  # not due yet: nothing written
    assert mine.etag == etag and the_lease(world) == first
    clock.now += 61
    mine.keep()
    renewed = the_lease(world)
    assert renewed["until"] == iso(clock.now + 600) and renewed["since"] == first["since"] and mine.etag != etag

    # Its network goes away for longer than the lease: another machine takes the expired lease over.
    clock.now += 601
    theirs = lease.Lease(s3, world.source_bucket, "2024/", "123456789012", world.cwd / B_FILE, "01", clock=clock,
                         say=said.append)
    theirs.take()
    assert said and said[-1].startswith(f"Took over the lease s3://{world.source_bucket}/2024/{lease.NAME} that "
                                        "expired: 03 on ")
    mine.keep()
    assert the_lease(world)["owner"] == theirs.id  # If-Match: the renewal did not overwrite it
    with pytest.raises(common.StepError) as lost:
        mine.check()
    assert lost.value.exit_code == common.EXIT_LOCKED and "is now held by 01 on " in str(lost.value)
    mine.release()
    assert the_lease(world)["owner"] == theirs.id  # not ours to delete
    theirs.release()
    assert lease.NAME not in " ".join(keys(world))


def test_saving_the_job_file_renews_the_lease_when_due(world, tmp_path):
    s3 = world.client("s3")
    clock = Clock(datetime.now(timezone.utc).timestamp())
    path = tmp_path / A_FILE
    with jobinfo.locked(path, "02_monitor_job.py"):
        jobinfo.claim(path, s3, world.source_bucket, "2024/", "123456789012", clock=clock)
        jobinfo.claim(path, s3, world.source_bucket, "2024/", "123456789012", clock=clock)  # re-entrant
        first = the_lease(world)
        assert json.loads((tmp_path / (A_FILE + ".lock")).read_text())["leases"] == [first["owner"]]
        clock.now += lease.RENEW_EVERY + 1
        jobinfo.save(path, {"any": "content"})
        assert the_lease(world)["until"] == iso(clock.now + lease.TTL)
    assert lease.NAME not in " ".join(keys(world))  # released with the lock
    assert (tmp_path / (A_FILE + ".lock")).read_text() == ""


def test_a_racing_write_is_tried_again():
    class Racing:
        """An S3 client whose first conditional write loses a race (409), as S3 answers concurrent writes."""

        def __init__(self):
            self.puts = []

        def put_object(self, **params):
            self.puts.append(params)
            if len(self.puts) == 1:
                raise ClientError({"Error": {"Code": "ConditionalRequestConflict", "Message": "race"}}, "PutObject")
            return {"ETag": '"e2"'}

        def get_object(self, **params):
            raise ClientError({"Error": {"Code": "NoSuchKey", "Message": "gone"}}, "GetObject")

    s3 = Racing()
    taken = lease.Lease(s3, "bucket", "2024/", "123456789012", "batch_job_info.json", "01")
    taken.take()
    assert taken.etag == '"e2"' and [p.get("IfNoneMatch") for p in s3.puts] == ["*", "*"]


@pytest.mark.parametrize("key", ["2024/" + lease.NAME, lease.NAME, "2024/sub/" + lease.NAME])
def test_the_lease_is_neither_an_image_nor_a_manifest(key):
    assert lease.is_lease(key) and lease.key_for(key.rsplit("/", 1)[0] + "/" if "/" in key else "") == key
    assert selection.classify(key, 300)[0] is None  # not an image the model takes
    assert not naming.is_own_manifest(key) and not key.endswith(".jsonl")  # Bedrock reads every .jsonl


def test_02_waiting_at_its_prompt_holds_no_lock_and_reads_the_file_again_after_y(world):
    import os
    import pty
    import select
    import time

    world.put_images([f"a/img-{i:03d}.png" for i in range(100)], prefix="2024/")
    world.emulator("/_emulator/config", {"hold_scheduled": True})
    assert world.step(1).returncode == 0
    leader, follower = pty.openpty()
    asking = subprocess.Popen([sys.executable, str(ROOT / STEPS[2]), "--interval", "0.05"], cwd=world.cwd,
                              env=world.env, stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)

    def read_until(text: bytes, seen: bytes = b"") -> bytes:
        deadline = time.monotonic() + 60  # a bound on a hung test only: the step says where it is
        while text not in seen and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.5)[0]:
                try:
                    seen += os.read(leader, 4096)
                except OSError:
                    break
        return seen

    try:
        seen = read_until(b"Monitor until completion? (y/n): ")
        assert b"(y/n)" in seen, seen.decode()
        # A person has not answered yet: another step (the next day's cron run) takes the lock meanwhile.
        world.emulator("/_emulator/config", {"hold_scheduled": False})
        other = world.step(2, "--wait", "--interval", "0.05", "--timeout", "120")
        assert other.returncode == 0, other.stdout + other.stderr
        assert "✓ Deleted: " in other.stdout  # it removed the job's manifest and saved that
        os.write(leader, b"y\n")
        seen = read_until(b"Next step:", seen)
        asking.wait(timeout=60)
    finally:
        asking.kill() if asking.poll() is None else None
        os.close(leader)
    text = seen.decode()
    assert asking.returncode == 0, text
    assert ">>> STATUS: Scheduled <<<" in text and "Job completed successfully!" in text.split("(y/n): ", 1)[1]
    assert "✓ Deleted: " not in text.split("(y/n): ", 1)[1]  # the file read again: the manifest is already gone
    assert world.job_info()["jobs"][0]["input_removed"] is True
