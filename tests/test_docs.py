"""The documentation a newcomer reads: a short README whose links and named files all exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "benchmarks" / "results").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
NAMED_FILE = re.compile(r"`([\w.-]+(?:/[\w.-]+)+\.(?:py|md|yaml|sh|ipynb|png))`")


def local_targets(page: Path) -> list[str]:
    """The repository paths a page links to, or names in backticks from a top-level folder of the repository
    (``emalign/io.py``, not ``OUT/qc.csv``); web links and anchors left out."""
    text = page.read_text()
    links = [t.split("#")[0] for t in LINK.findall(text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    named = [t for t in NAMED_FILE.findall(text) if (ROOT / t.split("/")[0]).is_dir()]
    return [*links, *named]


def test_the_readme_is_at_most_250_lines():
    assert len(README.read_text().splitlines()) <= 250


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_local_link_and_named_file_exists(page):
    assert page.exists()
    missing = [t for t in local_targets(page) if not (page.parent / t).exists() and not (ROOT / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} points at missing {missing}"


def test_a_link_to_a_missing_file_is_caught(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[a](README.md) [b](docs/nowhere.md#x) [c](https://example.org) `emalign/nope.py` `OUT/qc.png`")
    assert local_targets(page) == ["README.md", "docs/nowhere.md", "emalign/nope.py"]


def test_ci_runs_the_test_command_the_readme_gives():
    setup = README.read_text().split("## Set-up")[1].split("```bash")[1].split("```")[0]
    test_command = setup.strip().splitlines()[-1].strip()
    assert test_command == "python -m pytest -q"
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()
