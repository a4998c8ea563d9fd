"""The documentation: the README stays a front door, and the MkDocs site builds with no warning.

The site is built in strict mode, so a broken link, a missing anchor, a page missing from the nav or a nav
entry without its page fails here (mkdocs.yml's `validation`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from ..conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
README_MAX_LINES = 150
QUICK_START = ["scripts/example", "scripts/test"]


def commands(block: str) -> list[str]:
    """The commands of a shell block: comments dropped, continuation lines joined."""
    joined = block.replace("\\\n", " ")
    return [line.split("#")[0].strip() for line in joined.splitlines() if line.split("#")[0].strip()]


def test_the_readme_is_a_front_door() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: move details into docs/"


def test_the_readme_starts_with_the_two_quick_start_commands() -> None:
    readme = README.read_text(encoding="utf-8")
    first_block = re.search(r"```(?:bash|sh)\n(.*?)```", readme, re.DOTALL)
    assert first_block is not None
    assert readme.index("## Quick start") < first_block.start()
    assert commands(first_block.group(1)) == QUICK_START


def test_the_readme_links_to_pages_that_exist() -> None:
    links = re.findall(r"\]\((docs/[^)#]+)", README.read_text(encoding="utf-8"))
    assert links
    assert [link for link in links if not (REPO_ROOT / link).is_file()] == []


def test_the_site_builds_without_a_warning(tmp_path: Path) -> None:
    # Nothing is fetched at build time: Material's fonts are linked, not downloaded, and no
    # plugin that downloads (privacy, social) is configured.
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO_ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    warnings = [line for line in result.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert result.returncode == 0 and warnings == [], result.stderr
    assert (tmp_path / "site" / "index.html").is_file()
