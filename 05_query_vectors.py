"""Step 5: search the index — embed a text (or an image) with Nova Multimodal Embeddings and list the images whose
vectors are nearest.

    uv run 05_query_vectors.py "a red sports car" [--top-k 10] [--filter JSON] [--presign SECONDS] [--json]
    uv run 05_query_vectors.py --image photo.jpg          (or --image s3://bucket/2024/photo.jpg)
    uv run 05_query_vectors.py "a red sports car" --html results.html [--open]

A text is embedded with embeddingPurpose IMAGE_RETRIEVAL (text → image search), an image with GENERIC_RETRIEVAL;
--purpose overrides. The index decides the dimension (GetIndex); EMBEDDING_DIMENSION must match it.
A filter is an S3 Vectors metadata filter on `source_uri`, `job_id` or `embedded` (the date), with $eq $ne $gt $gte
$lt $lte $in $nin $exists $and $or, e.g. '{"embedded": {"$eq": "2026-12-01"}}' or
'{"source_uri": {"$in": ["s3://bucket/2024/a.jpg", "s3://bucket/2024/b.jpg"]}}'.
--html writes the hits as a page of thumbnails (pre-signed links valid --presign SECONDS, default 3600).
No hits is not an error (exit 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import common
from batch_embeddings import nova, results_page, search
from common import StepError, ok

SETTINGS = ("AWS_REGION", "VECTOR_BUCKET", "VECTOR_INDEX", "MODEL_ID", "EMBEDDING_DIMENSION", "EXPECTED_BUCKET_OWNER")
REQUIRED = ("VECTOR_BUCKET", "VECTOR_INDEX")
DEFAULT_TOP_K = 10  # QueryVectors takes topK >= 1; its maximum is the index's to say (100 at launch)
MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # SigV4's limit for a pre-signed URL
HTML_PRESIGN_SECONDS = 3600  # the page's thumbnails load through pre-signed links valid this long by default
TEXT_LIMIT = "8K tokens"  # what the model reads of a text; past it, it cuts the end (truncationMode END)


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (through `common.run_main`), like every other bad input."""

    def error(self, message):
        raise StepError(f"{message} (see --help)", common.EXIT_USAGE)


def parse_args(argv):
    parser = Parser(description=__doc__.split("\n\n")[0],
                    epilog=__doc__.split("\n\n", 1)[1] + "\n" + common.EXIT_CODES_HELP,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text", nargs="?", help="what to search for, in words")
    parser.add_argument("--image", metavar="PATH_OR_S3_URI",
                        help="search by an image instead: a local file or s3://bucket/key (jpg, jpeg, png, gif, webp)")
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, metavar="K",
                        help=f"how many hits, at least 1 (default {DEFAULT_TOP_K}; the index sets the most: 100 "
                             "when S3 Vectors launched)")
    parser.add_argument("--filter", metavar="JSON", help="S3 Vectors metadata filter, a JSON object (see below)")
    parser.add_argument("--presign", type=int, metavar="SECONDS",
                        help=f"add a pre-signed HTTPS link to each image, valid SECONDS (1-{MAX_PRESIGN_SECONDS})")
    parser.add_argument("--json", action="store_true",
                        help="print only a JSON array of {rank, key, distance, source_uri, embedded, metadata, url}")
    parser.add_argument("--html", metavar="FILE",
                        help="also write the hits as an HTML page of thumbnails to FILE (links valid --presign "
                             f"SECONDS, default {HTML_PRESIGN_SECONDS})")
    parser.add_argument("--open", action="store_true",
                        help="open the --html page in the default browser (when none opens, say where the page is)")
    parser.add_argument("--purpose", choices=common.EMBEDDING_PURPOSES, metavar="PURPOSE",
                        help=f"embeddingPurpose of the query (default: {search.TEXT_PURPOSE} for a text, "
                             f"{search.IMAGE_PURPOSE} for an image)")
    common.add_settings(parser, SETTINGS)
    args = parser.parse_args(argv)
    if args.text is not None and args.image is not None:
        parser.error("give a text or --image, not both")
    if args.text is None and args.image is None:
        parser.error("give a text to search for, or --image PATH_OR_S3_URI")
    if args.text is not None and not args.text.strip():
        parser.error("the text to search for is empty")
    if args.image is not None and not args.image.strip():
        parser.error("--image is empty")
    if args.top_k < 1:
        parser.error(f"--top-k must be at least 1, not {args.top_k}")
    if args.open and args.html is None:
        parser.error("--open goes with --html FILE")
    if args.html is not None and not args.html.strip():
        parser.error("--html needs a file name")
    args.show_links = args.presign is not None  # the links go on the console only when --presign asks for them
    if args.html is not None and args.presign is None:
        args.presign = HTML_PRESIGN_SECONDS
    if args.presign is not None and not 1 <= args.presign <= MAX_PRESIGN_SECONDS:
        parser.error(f"--presign must be between 1 and {MAX_PRESIGN_SECONDS} seconds (7 days), not {args.presign}")
    return args


def write_page(path: Path, query: search.Query, hits: list[dict], config: common.Config, purpose: str,
               seconds: int) -> None:
    """The results page (results_page.py), written atomically; the query image is shown too when it can be."""
    if query.text is not None:
        shown = results_page.QueryShown(text=query.text)
    elif query.image_uri is not None:
        shown = results_page.QueryShown(image_name=query.image_uri,
                                        image_src=search.presign(config, query.image_uri, seconds))
    else:
        shown = results_page.QueryShown(image_name=query.image_path,
                                        image_src=results_page.data_uri(query.image_data, query.image_format))
    page = results_page.render(shown, hits, index=config.vector_index, bucket=config.vector_bucket,
                               model=config.model_id, purpose=purpose, presign_seconds=seconds)
    try:
        common.atomic_write(path, lambda fh: fh.write(page.encode("utf-8")))
    except OSError as exc:
        raise StepError(f"{path}: cannot write the page ({exc.strerror})", common.EXIT_USAGE) from None


def print_hits(hits: list[dict], top_k: int, filtered: bool, links: bool) -> None:
    if not hits:
        print("No hits" + (" match the filter." if filtered else ": the index is empty."))
        return
    ok(f"{len(hits)} hit(s)" + (f" (asked for {top_k})" if len(hits) < top_k else ""))
    print(f"{'Rank':>4}  {'Distance':>8}  Image")
    for hit in hits:
        distance = "" if hit["distance"] is None else f"{hit['distance']:.4f}"
        print(f"{hit['rank']:>4}  {distance:>8}  {hit['source_uri'] or '(no source_uri) key ' + hit['key']}")
        if links and hit.get("url"):
            print(f"{'':16}{hit['url']}")


def run(argv) -> int:
    args = parse_args(argv)
    config = common.load_config(args, REQUIRED)
    flt = search.parse_filter(args.filter)
    query = search.read_query(args.text, args.image, args.purpose)

    def say(line: str) -> None:  # --json prints nothing but the hits
        if not args.json:
            print(line)

    if not args.json:
        common.banner("Bedrock Batch Inference - Query Vectors")
    say(f"Vector Bucket: {config.vector_bucket}")

    s3v = common.make_client("s3vectors", config)
    dimension, metric = search.index_shape(s3v, config.vector_bucket, config.vector_index, config.embedding_dimension)
    say(f"Index Name: {config.vector_index} ({dimension} dimensions, {metric})")
    say(f"Query: {query.label}")
    if flt is not None:
        say(f"Filter: {json.dumps(flt, ensure_ascii=False)}")

    owner = None
    if query.image_uri is not None:
        owner = config.expected_bucket_owner or common.caller_account(common.make_client("sts", config))
    say(f"Embedding with {config.model_id} ({query.purpose}, {dimension} dimensions)")
    runtime = common.make_client("bedrock-runtime", config)
    answer = nova.embed_answer(runtime, config.model_id, query.request(dimension, owner))
    vector = answer["embedding"]
    if query.text is not None and "truncatedCharLength" in answer:
        say(f"! The text is longer than the model reads ({TEXT_LIMIT}): it cut the end and searched with the start "
            f"(truncatedCharLength {answer['truncatedCharLength']} of the text's {len(query.text):,} characters)")
    if len(vector) != dimension:
        raise StepError(f"{config.model_id} answered a {len(vector)}-dimension embedding; the index takes {dimension}")

    say(f"Querying the top {args.top_k}")
    hits = search.to_hits(search.query_index(s3v, config.vector_bucket, config.vector_index, vector, args.top_k, flt))
    if args.presign is not None:
        search.add_links(hits, config, args.presign)
    if args.html is not None:
        page = Path(args.html).expanduser()
        write_page(page, query, hits, config, query.purpose, args.presign)
    if args.json:
        print(json.dumps(hits, indent=2, ensure_ascii=False))
    else:
        print(common.RULE)
        print_hits(hits, args.top_k, flt is not None, args.show_links)
        if args.show_links and hits:
            print(f"Links are valid for {args.presign} s (less if your credentials expire sooner).")
        if args.html is not None:
            ok(f"Wrote the results page {page} (its image links are valid for {args.presign} s)")
    if args.open:
        why = results_page.open_in_browser(page)
        if why is not None:
            out = sys.stderr if args.json else sys.stdout  # --json: stdout holds the hits alone
            print(f"! No browser opened ({why}): the page is {page.resolve()}", file=out)
    return common.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return common.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
