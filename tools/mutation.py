"""Mutation testing of the library modules, one module at a time, with mutmut (dev group).

    uv run --locked python tools/mutation.py failed_permanently cost    # these modules
    uv run --locked python tools/mutation.py --all                        # every module of MODULES, smallest first
    uv run --locked python tools/mutation.py failed_permanently --show   # and print each surviving mutant's diff
    uv run --locked python tools/mutation.py cost --tests tests/test_cost.py   # against other tests

Then, in $TMPDIR/bedrock-batch-mutation/<module>, `<checkout>/.venv/bin/mutmut show <mutant>` shows one mutant
and `<checkout>/.venv/bin/mutmut browse` all of them (mutmut.log there: mutmut's own output).

For each module, mutmut puts its mutants into a copy of the working tree (WORK/<module>, kept for `mutmut show`
until the next run of the module) and runs, for each mutant, the tests of MODULES[module] that reach the mutated
function in this process (a test that runs a step as a process of its own kills no mutant here). It prints the
module's score, killed (and timed out) of all mutants, and the survivors; it exits 1 when a module scores below
--fail-under. Mutation runs are CPU-heavy: it runs at the lowest priority (nice 19), one mutant at a time unless
--max-children says more.

The shared mutmut settings are in pyproject.toml's [tool.mutmut]; this script sets the module to mutate and its
tests in the copy's pyproject.toml.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(tempfile.gettempdir()) / "bedrock-batch-mutation"
PACKAGE = "batch_embeddings"  # the library's modules; daily_run.py is beside the steps

# module -> the fast tests that exercise it in-process (test files, or single tests as pytest node ids).
MODULES: dict[str, list[str]] = {
    "failed_permanently": ["tests/test_failed_permanently.py"],
    "cost": ["tests/test_noticed_cost.py", "tests/test_cost.py::test_vector_bytes_counts_data_key_and_metadata",
             "tests/test_cost.py::test_estimate_of_a_million_images_at_3072_dimensions",
             "tests/test_cost.py::test_dollars_are_shown_to_the_cent_or_to_the_first_digits"],
    "keyset": ["tests/test_noticed_keyset.py", "tests/test_keyset.py::test_the_key_set_answers_like_a_python_set",
               "tests/test_keyset.py::test_keys_of_another_shape_are_kept_aside",
               "tests/test_keyset.py::test_an_empty_set_contains_nothing",
               "tests/test_keyset.py::test_a_list_vectors_page_is_read_the_same_on_either_path",
               "tests/test_keyset.py::test_the_lean_reader_gives_what_botocores_parser_gives"],
    "results_page": ["tests/test_noticed_results_page.py", "tests/test_noticed_results_page_render.py"],
    "daily_run": ["tests/test_noticed_daily_run.py"],
    "jobinfo": ["tests/test_noticed_jobinfo.py", "tests/test_jobinfo.py"],
    "inventory": ["tests/test_noticed_inventory.py",
                  "tests/test_inventory.py::test_an_inventory_gives_the_same_manifests_as_listing",
                  "tests/test_inventory.py::test_parquet_without_duckdb_says_how_to_install_it",
                  "tests/test_inventory.py::test_listings_of_parts_merge_into_the_listing_of_the_whole"],
    "listing": ["tests/test_noticed_listing.py",
                "tests/test_listing.py::test_parallel_listing_equals_sequential_listing",
                "tests/test_listing.py::test_an_error_in_a_200_answer_is_still_an_error",
                "tests/test_listing.py::test_url_encoded_keys_are_decoded_as_botocore_would",
                "tests/test_listing.py::test_a_failure_on_any_thread_ends_the_listing_and_every_thread",
                "tests/test_listing.py::test_leaving_the_listing_early_stops_its_threads",
                "tests/test_listing.py::test_a_slow_caller_keeps_at_most_ahead_pages_listed_and_waiting",
                "tests/test_listing.py::test_sort_lines_merges_at_most_half_the_open_file_limit_at_once",
                "tests/test_listing.py::test_sort_lines_merges_runs_a_few_files_at_a_time",
                "tests/test_listing.py::test_the_order_of_the_listing_does_not_change_the_manifests",
                "tests/test_listing.py::test_manifests_written_with_a_few_files_open",
                "tests/test_listing.py::test_a_failure_while_writing_removes_every_manifest",
                "tests/test_listing.py::test_ctrl_c_while_writing_manifests_is_one_line_and_leaves_none",
                "tests/test_listing_reader.py::test_the_api_references_examples_read_the_same",
                "tests/test_listing_reader.py::test_the_documented_continuation_token_is_read_where_s3_writes_it",
                "tests/test_listing_reader.py::test_a_page_reads_the_same_in_any_order",
                "tests/test_listing_reader.py::test_empty_pages_and_pages_of_common_prefixes_read_the_same",
                "tests/test_listing_reader.py::test_entities_in_keys_and_etags_read_the_same",
                "tests/test_listing_reader.py::test_moto_answers_read_the_same_in_both_orders",
                "tests/test_listing_reader.py::test_the_stand_in_moves_every_field_ahead_of_the_contents"],
    "jobs": ["tests/test_noticed_jobs.py", "tests/test_planning.py",
             "tests/test_listing.py::test_the_order_of_the_listing_does_not_change_the_manifests",
             "tests/test_aws_assumptions.py::test_the_earlier_submit_is_found_by_its_exact_name_across_pages"],
    "ondemand": ["tests/test_noticed_on_demand.py",
                 "tests/test_on_demand.py::test_a_model_timeout_is_tried_again_and_the_image_loaded",
                 "tests/test_on_demand.py::test_an_image_that_always_times_out_fails_alone",
                 "tests/test_on_demand.py::test_kept_embeddings_answer_only_the_same_request"],
    "mirror": ["tests/test_mirror.py::test_the_cache_with_its_journal_is_used_only_while_it_accounts_for_the_index",
               "tests/test_mirror.py::test_an_images_state_is_its_etag_and_size"],
    "manifests": ["tests/test_listing.py::test_the_order_of_the_listing_does_not_change_the_manifests",
                  "tests/test_listing.py::test_manifests_written_with_a_few_files_open",
                  "tests/test_listing.py::test_a_failure_while_writing_removes_every_manifest",
                  "tests/test_listing.py::test_ctrl_c_while_writing_manifests_is_one_line_and_leaves_none",
                  "tests/test_aws_assumptions.py::test_the_client_request_token_is_a_function_of_the_manifests",
                  "tests/test_aws_assumptions.py::test_ids_that_share_only_their_start_keep_their_first_id"],
}
SKIP = {".git", ".venv", "mutants", "__pycache__", ".pytest_cache"}
DONE = {"killed", "timeout", "caught by type check"}


def copy_tree(target: Path) -> None:
    """The working tree as it is now (tracked and new files, not ignored ones) into `target`, file by file, so that
    mutmut sees unchanged files as unchanged and tests only the mutants of what changed."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source, dest = ROOT / name, target / name
        if set(Path(name).parts) & SKIP or not source.is_file():
            continue
        if dest.exists() and dest.stat().st_mtime_ns == source.stat().st_mtime_ns:
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest)


def source(module: str) -> str:
    """The module's file, relative to the checkout: in the library package, or beside the steps (daily_run)."""
    packaged = f"{PACKAGE}/{module}.py"
    return packaged if (ROOT / packaged).exists() else f"{module}.py"


def settings(module: str, tests: list[str]) -> str:
    """The copy's [tool.mutmut]: the shared settings, this module, its tests, and every other file alongside."""
    shared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"].get("mutmut", {})
    mutated = source(module)
    others = sorted(p.name for p in ROOT.iterdir() if p.name not in SKIP | {mutated, PACKAGE} and not
                    p.name.startswith("."))
    others += sorted(f"{PACKAGE}/{p.name}" for p in (ROOT / PACKAGE).glob("*.py") if f"{PACKAGE}/{p.name}" != mutated)
    config = {**shared, "source_paths": [mutated], "also_copy": others,
              "pytest_add_cli_args_test_selection": tests}
    lines = ["[tool.mutmut]"]
    for key, value in config.items():
        lines.append(f"{key} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "[" + ", ".join(toml_value(v) for v in value) + "]"


def with_settings(pyproject: str, block: str) -> str:
    """pyproject.toml with its [tool.mutmut] table replaced by `block`."""
    kept = re.sub(r"(?ms)^\[tool\.mutmut\]\n.*?(?=^\[|\Z)", "", pyproject)
    return kept.rstrip("\n") + "\n\n" + block


def run_module(module: str, tests: list[str], max_children: int, show: bool) -> dict[str, list[str]]:
    work = WORK / module
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "mutants", ignore_errors=True)  # mutmut keeps verdicts across changed tests: start afresh
    copy_tree(work)
    (work / "pyproject.toml").write_text(with_settings((ROOT / "pyproject.toml").read_text(), settings(module, tests)))
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    print(f"== {module}: mutants of {source(module)} against {', '.join(tests)} (in {work})", flush=True)
    with open(work / "mutmut.log", "w") as log:  # mutmut's progress, redrawn in place: kept out of the console
        subprocess.run(["nice", "-n", "19", mutmut, "run", "--max-children", str(max_children)], cwd=work, env=env,
                       stdout=log, stderr=subprocess.STDOUT, check=False)
    listed = subprocess.run([mutmut, "results", "--all", "true"], cwd=work, env=env, capture_output=True, text=True)
    by_status: dict[str, list[str]] = {}
    for line in listed.stdout.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if name:
            by_status.setdefault(status, []).append(name)
    if show:
        for status, names in by_status.items():
            if status not in DONE:
                for name in names:
                    print(subprocess.run([mutmut, "show", name], cwd=work, env=env, capture_output=True,
                                         text=True).stdout)
    return by_status


def score(by_status: dict[str, list[str]]) -> tuple[int, int]:
    total = sum(len(names) for names in by_status.values())
    return sum(len(by_status.get(status, [])) for status in DONE), total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=f"of: {', '.join(MODULES)}")
    parser.add_argument("--all", action="store_true", help="every module, smallest first")
    parser.add_argument("--show", action="store_true", help="print the diff of every mutant not killed")
    parser.add_argument("--max-children", type=int, default=1, help="mutants tested at once (1)")
    parser.add_argument("--tests", nargs="+", metavar="TEST",
                        help="run these tests instead of the module's own (test files or pytest node ids)")
    parser.add_argument("--fail-under", type=float, default=0.0, metavar="PERCENT",
                        help="exit 1 when a module's score is below this")
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown or not (args.modules or args.all):
        parser.error(f"name modules of: {', '.join(MODULES)} (or --all)" + (f"; unknown: {unknown}" if unknown else ""))
    modules = sorted(MODULES, key=lambda m: (ROOT / source(m)).stat().st_size) if args.all else args.modules
    failed = False
    summary = []
    for module in modules:
        by_status = run_module(module, args.tests or MODULES[module], args.max_children, args.show)
        done, total = score(by_status)
        percent = 100.0 * done / total if total else 100.0
        failed |= percent < args.fail_under
        rest = ", ".join(f"{status} {len(names)}" for status, names in sorted(by_status.items()))
        summary.append(f"{module}: {percent:.0f} % killed ({done} of {total}: {rest})")
        for status, names in sorted(by_status.items()):
            if status not in DONE:
                print(f"  {status}: {' '.join(names)}")
    print("\n".join(["", "Mutation scores:", *summary]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
