"""Exports keep constraints (issue 20): each reply records its constraint, and
``%subchat export --format ipynb`` writes every exchange with it, so an exported echo tree
with --json/--choice/--regex replies runs again under nbval."""

from __future__ import annotations

import json
import subprocess
import sys

import nbformat
import pytest


@pytest.fixture
def nb(shell, monkeypatch):
    monkeypatch.setenv("LLM_BACKEND", "echo")
    return shell


def ok(sh, source: str) -> str:
    return sh.ok(source)


def _export(sh, path: str, out) -> dict:
    ok(sh, f"%subchat export {path} --format ipynb --out {out}")
    data = json.loads(out.read_text(encoding="utf-8"))
    nbformat.validate(nbformat.from_dict(data))
    return data


def test_an_exported_notebook_keeps_each_replys_constraint_and_reruns_under_nbval(nb, workdir):
    # issue 20: --json/--choice/--regex were dropped, and 3 of 13 cells failed nbval
    nb.ns["schema"] = {"type": "object", "properties": {  # (an order that is not sorted)
        "zeta": {"type": "string", "maxLength": 4}, "alpha": {"type": "integer", "maximum": -3}},
        "required": ["zeta", "alpha"]}
    ok(nb, "%%subchat root --choice positive,negative\nWell?")
    ok(nb, '%%subchat root --choice "yes, please",no\nAnd?')
    ok(nb, "%%subchat root/r --regex \\d{3}-[a-z]+\nA code?")
    ok(nb, "%%subchat root/j --json=schema\nAs JSON.")
    ok(nb, "%%subchat root/j --json\nAny JSON.")
    ok(nb, "%%subchat root/j\nplain")
    out = workdir / "rerun.ipynb"
    _export(nb, "root", out)
    cells = ["".join(c["source"]) for c in json.loads(out.read_text())["cells"]]
    assert "%%subchat root --choice positive,negative\nWell?" in cells
    assert '%%subchat root --choice "yes, please","no"\nAnd?' in cells
    assert "%%subchat root/r --regex '\\d{3}-[a-z]+'\nA code?" in cells \
        or "%%subchat root/r --regex \\d{3}-[a-z]+\nA code?" in cells
    assert any(c.startswith("%%subchat root/j --json=schema_") and c.endswith("As JSON.")
               for c in cells)
    assert "%%subchat root/j\nplain" in cells
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval",
         "--nbval-current-env", str(out)], capture_output=True, text=True, cwd=workdir,
        env={**__import__("os").environ, "LLM_BACKEND": "echo"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
