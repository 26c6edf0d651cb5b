"""The documentation site: docs/*.md built by mkdocs (mkdocs.yml, Material theme) with --strict.

A broken link between pages, a link to a missing heading, or a page that mkdocs.yml's nav leaves out is a
warning, and --strict makes every warning fail the build, so it fails here. docs/index.md is the README with
its links made relative to docs/ (one text, two places). The commands the pages show are run by
tests/test_readme.py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO

DOCS = REPO / "docs"
MKDOCS_YML = REPO / "mkdocs.yml"


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    """`mkdocs build --strict`, its site written to `site` (never into the repository)."""
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def nav_pages(nav: list) -> list[str]:
    """Every page file that a mkdocs nav names, at any depth."""
    pages: list[str] = []
    for entry in nav:
        values = entry.values() if isinstance(entry, dict) else [entry]
        for value in values:
            pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_docs_build_strict(tmp_path: Path) -> None:
    proc = build(MKDOCS_YML, tmp_path / "site")
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}{proc.stderr}"
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "cli" / "index.html").is_file()


def test_docs_build_fails_on_a_broken_link(tmp_path: Path) -> None:
    """The strict build is what catches a broken link: a copy of the docs with one fails, naming it."""
    copy = tmp_path / "copy"
    shutil.copytree(DOCS, copy / "docs")
    shutil.copy2(MKDOCS_YML, copy / "mkdocs.yml")
    page = copy / "docs" / "cli.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    proc = build(copy / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode != 0
    assert "no-such-page.md" in proc.stdout + proc.stderr


def test_nav_names_every_page_and_only_pages_that_exist() -> None:
    config = yaml.safe_load(MKDOCS_YML.read_text())
    assert config["theme"]["name"] == "material"
    assert config.get("docs_dir", "docs") == "docs"
    named = nav_pages(config["nav"])
    assert len(named) == len(set(named)), f"a page is named twice in nav: {named}"
    pages = {path.name for path in DOCS.glob("*.md")}
    assert not set(named) - pages, f"nav names pages that do not exist: {sorted(set(named) - pages)}"
    assert not pages - set(named), f"pages missing from nav: {sorted(pages - set(named))}"


def test_index_is_the_readme() -> None:
    """docs/index.md is README.md with `docs/` taken off its links, so the site's home page is the README."""
    readme = (REPO / "README.md").read_text()
    assert "](docs/" in readme
    assert (DOCS / "index.md").read_text() == readme.replace("](docs/", "](")


def test_readme_fits_two_screens() -> None:
    """The README is an overview; the rest is in docs/."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 100 and len(readme.encode()) <= 6000
