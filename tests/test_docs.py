"""The README tells the truth: every step in order, the commands CI runs, and every script's --help."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, STEPS

README = (ROOT / "README.md").read_text(encoding="utf-8")
SCRIPTS = sorted(p.name for p in ROOT.glob("0[0-9]_*.py"))


def test_every_numbered_script_is_in_the_readme_in_order():
    assert SCRIPTS == [STEPS[n] for n in sorted(STEPS)]
    positions = [README.index(f"uv run {name}") for name in SCRIPTS]
    assert positions == sorted(positions)


def test_ci_runs_the_test_command_the_readme_gives():
    ci = (ROOT / ".ci" / "run").read_text()
    command = "uv run --locked pytest"
    assert command in README
    assert ci.strip().splitlines()[-1] == command


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_works_without_settings_or_aws(script, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=tmp_path, capture_output=True,
                            text=True, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ")
    assert re.search(r"Step \d", result.stdout)


LIBRARY = [f"batch_embeddings.{p.stem}" for p in sorted((ROOT / "batch_embeddings").glob("[!_]*.py"))]


@pytest.mark.parametrize("module", ["common", "daily_run", "batch_embeddings", *LIBRARY, *[s[:-3] for s in SCRIPTS]])
def test_nothing_runs_at_import(module, tmp_path):
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import importlib; importlib.import_module({module!r})"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    assert list(tmp_path.iterdir()) == []


def test_no_endpoint_url_in_the_code():
    for path in [*ROOT.glob("*.py"), *ROOT.glob("iam/*.sh")]:
        assert "endpoint_url" not in path.read_text(encoding="utf-8"), path


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmark" / "README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a file's headings: lower case, punctuation dropped, spaces made hyphens."""
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)  # a '#' inside a code block is no heading
    headings = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    text = doc.read_text(encoding="utf-8")
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        assert linked.exists(), f"{doc.relative_to(ROOT)}: {target} does not exist"
        if anchor:
            assert anchor in anchors(linked.read_text(encoding="utf-8")), \
                f"{doc.relative_to(ROOT)}: {target} names no heading of {linked.name}"


def test_the_readme_reads_in_five_minutes():
    assert len(README.encode("utf-8")) <= 15_000
