"""The guide builds strictly: ``mkdocs build --strict`` (a broken link or anchor, a page
missing from the nav, a nav entry without a page, any warning) fails this test, and every
notebook of ``notebooks/`` is rendered with its stored outputs (``docs/notebooks`` is a
link to ``../notebooks``; mkdocs-jupyter never executes them)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(project: Path, site: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # material's banner about its successor
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                           "-f", str(project / "mkdocs.yml"), "-d", str(site)],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)


def test_the_guide_builds_strictly_with_every_page_and_notebook(tmp_path):
    done = build(ROOT, tmp_path / "site")
    log = done.stdout + done.stderr
    assert done.returncode == 0 and "WARNING" not in log, log  # (no -q: it hides warnings from --strict)
    for page in (ROOT / "docs").glob("*.md"):
        name = "" if page.stem == "index" else page.stem + "/"
        assert (tmp_path / "site" / name / "index.html").exists(), page.name
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        html = (tmp_path / "site" / "notebooks" / nb.stem / "index.html").read_text(encoding="utf-8")
        assert "jp-OutputArea" in html or "output_area" in html, nb.name  # outputs shown
    assert not (ROOT / ".cache").exists()  # the notebook plugin's cache stays off


def test_a_broken_link_fails_the_strict_build(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(ROOT / "docs", project / "docs", symlinks=False)
    shutil.copy(ROOT / "mkdocs.yml", project / "mkdocs.yml")
    with open(project / "docs" / "chats.md", "a", encoding="utf-8") as f:
        f.write("\nSee [the missing page](no-such-page.md).\n")
    done = build(project, tmp_path / "site")
    assert done.returncode != 0 and "no-such-page.md" in done.stdout + done.stderr
