"""Run the whole flow on this machine, against the local stand-ins, with generated sample images.

    uv run python -m tests.local_run [--images 150] [--workdir DIR] [--serve]

Starts moto (S3, STS, IAM), the Bedrock batch emulator and the S3 Vectors stand-in, creates the buckets, the
service role (with iam/setup_service_role.sh) and the images, writes a `.env` in the work folder, and runs the
five steps there in order, as separate processes, exactly as a user runs them. No AWS account is needed.
With --serve it then keeps the stand-ins running and writes `standins.env` in the work folder: `source` it in a
shell in the checkout and the scripts there reach the stand-ins and this run's buckets and job-info file.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from tests import sample_images
from tests.standins import stack as standins

ROOT = Path(__file__).resolve().parent.parent
STEPS = [
    ["01_create_job.py", "--new-index"],  # the first run starts the vector index (step 3 creates it)
    ["02_monitor_job.py", "--wait", "--interval", "1"],
    ["03_load_result_to_s3_vector_bucket.py"],
    ["04_remove_completed_task.py"],
    ["05_query_vectors.py", "a red sports car", "--top-k", "5", "--html", "results.html"],
]
FOLDERS = ["", "beach/", "city/night/", "城市/"]
SUFFIXES = [".jpg", ".png", ".jpeg", ".PNG", ".gif", ".webp"]


def setup(running: standins.Stack, workdir: Path, images: int) -> dict[str, str]:
    import boto3

    # The work folder's .env decides: settings inherited from the caller's environment would win over it.
    env = {k: v for k, v in os.environ.items() if k not in common.SETTINGS and not k.startswith("AWS_")}
    env.update(running.env)
    settings = {
        "SOURCE_BUCKET": "nova-mme-demo-source-image",
        "SOURCE_PREFIX": "2024/",
        "RESULT_BUCKET": "nova-mme-demo-batch-result",
        "RESULT_PREFIX": "output/",
        "VECTOR_BUCKET": "my-nova-mme-demo-01",
        "VECTOR_INDEX": "my-image-index",
        "EMBEDDING_DIMENSION": "1024",
    }
    s3 = boto3.client("s3", region_name=standins.REGION, endpoint_url=running.moto_url,
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket=settings["SOURCE_BUCKET"])
    s3.create_bucket(Bucket=settings["RESULT_BUCKET"])
    for i in range(images):
        key = f"{settings['SOURCE_PREFIX']}{FOLDERS[i % len(FOLDERS)]}image-{i:04d}{SUFFIXES[i % len(SUFFIXES)]}"
        s3.put_object(Bucket=settings["SOURCE_BUCKET"], Key=key, Body=sample_images.for_key(key, i))
    print(f"Created {images} sample images under s3://{settings['SOURCE_BUCKET']}/{settings['SOURCE_PREFIX']}")

    role = subprocess.run(["bash", str(ROOT / "iam" / "setup_service_role.sh")], cwd=workdir,
                          env={**env, **settings}, capture_output=True, text=True)
    print(role.stdout, end="")
    if role.returncode != 0:
        sys.exit(f"iam/setup_service_role.sh failed: {role.stderr.strip()}")
    account = "123456789012"
    settings["ROLE_ARN"] = f"arn:aws:iam::{account}:role/BedrockBatchInferenceRole"
    (workdir / ".env").write_text("".join(f"{k}={v}\n" for k, v in settings.items()), encoding="utf-8")
    print(f"Wrote {workdir / '.env'}")
    exports = {**running.env, **settings, "JOB_INFO_FILE": str(workdir / "batch_job_info.json")}
    (workdir / "standins.env").write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in exports.items()),
                                          encoding="utf-8")
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=150, help="how many sample images (150)")
    parser.add_argument("--workdir", type=Path, help="folder for .env and the steps' files (a new temp folder)")
    parser.add_argument("--serve", action="store_true", help="keep the stand-ins running afterwards")
    parser.add_argument("--step-seconds", type=float, default=0.5,
                        help="seconds between two status changes of a job in the Bedrock stand-in (0.5)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bedrock-batch-local-"))
    workdir.mkdir(parents=True, exist_ok=True)
    running = standins.start(bedrock_options={"step_seconds": args.step_seconds})
    try:
        env = setup(running, workdir, args.images)
        for step in STEPS:
            print(f"\n$ uv run {' '.join(step)}", flush=True)
            code = subprocess.run([sys.executable, str(ROOT / step[0]), *step[1:]], cwd=workdir, env=env).returncode
            if code != 0:
                print(f"{step[0]} exited {code}")
                return code
        print(f"\nAll five steps ran against the local stand-ins. Work folder: {workdir}")
        print(f"The search's results page: {(workdir / 'results.html').as_uri()} (its thumbnails load while the "
              "stand-ins run: --serve)")
        if args.serve:
            print("Stand-ins running. In another shell, in this checkout:")
            print(f"  source {shlex.quote(str(workdir / 'standins.env'))}")
            print('  uv run 05_query_vectors.py "beach at night"')
            print("Ctrl-C to stop.", flush=True)
            while True:
                time.sleep(3600)
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        running.stop()


if __name__ == "__main__":
    sys.exit(main())
