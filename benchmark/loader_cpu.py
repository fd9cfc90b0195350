"""CPU of step 3's main-thread work alone — reading lines, parsing, encoding, batching — on an output file, without
servers: a figure that other processes on the machine disturb less than the whole benchmark's.

    uv run python -m benchmark.loader_cpu FILE [--records 2000] [--repeat 3] [--profile]

FILE is a `.jsonl.out` (the benchmark's cache holds them). Prints CPU ms a record (median of --repeat).
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import itertools
import pstats
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Limited:
    """The first `limit` bytes of a file, read as a streaming body is."""

    def __init__(self, fh, limit: int):
        self.fh, self.left = fh, limit

    def read(self, n: int) -> bytes:
        n = min(n, self.left)
        self.left -= n
        return self.fh.read(n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("file", type=Path)
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dimension", type=int, default=3072)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--code", type=Path, default=ROOT, help="folder holding vectors.py and step 3 (default: here)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(args.code))
    # the library's loader, in the package (or, in the code of a revision before it, beside the steps)
    packaged = (args.code / "batch_embeddings" / "vectors.py").exists()
    vectors = importlib.import_module("batch_embeddings.vectors" if packaged else "vectors")
    # read_lines: in streams.py, or in vectors.py in revisions before it
    streams = importlib.import_module("batch_embeddings.streams") \
        if (args.code / "batch_embeddings" / "streams.py").exists() else vectors
    if (args.code / "batch_embeddings" / "loading.py").exists():
        loading = importlib.import_module("batch_embeddings.loading")
    else:  # a revision whose Loader was in step 3
        loading = importlib.import_module(next(n for n in ("03_load_result_to_s3_vector_bucket", "step3")
                                               if (args.code / f"{n}.py").exists()))

    def run() -> None:
        batcher = vectors.Batcher("bucket", "index")
        loader = loading.Loader("job", args.dimension, batcher, io.BytesIO(), {})
        with open(args.file, "rb") as fh:
            lines = streams.read_lines(Limited(fh, args.records * 80_000))
            for raw, start, end in itertools.islice(lines, args.records):
                loader.line(raw, "key", start, end)

    figures = []
    for _ in range(args.repeat):
        started = time.process_time()
        run()
        figures.append((time.process_time() - started) * 1000 / args.records)
    print(f"{args.code}: {statistics.median(figures):.3f} CPU ms a record "
          f"(runs: {', '.join(f'{f:.3f}' for f in figures)})")
    if args.profile:
        profile = cProfile.Profile(time.process_time)  # CPU time: other processes on the machine do not count
        profile.runcall(run)
        pstats.Stats(profile).sort_stats("tottime").print_stats(12)
    return 0


if __name__ == "__main__":
    sys.exit(main())
