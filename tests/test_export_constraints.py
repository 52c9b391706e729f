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


def test_an_exported_tool_chat_carries_its_tools_and_reruns_under_nbval(nb, workdir):
    """The trial: an ipynb export of a tool chat did not define its tools, so its cell
    could not run. The export carries each tool's name, description and schema (the
    cell's metadata, a Markdown list) and defines it as a recorded tool that returns what
    the original call returned; the notebook reruns under nbval (no stdin: --yes)."""
    ok(nb, '''
import functools
def good(x: int) -> int:
    """Doubles x.

    Args:
        x: the number
    """
    return 2 * x
def boom(x: int) -> int:
    """Raises."""
    raise ValueError("kaboom")
def scaled(region: str, k: int) -> str:
    """A region, scaled."""
    return region * k
scaled3 = functools.partial(scaled, k=3)
''')
    ok(nb, "%%subchat root --tools good,boom,scaled3 --yes\nuse them")
    ok(nb, "%%subchat root\nand then?")
    out = workdir / "tools.ipynb"
    data = _export(nb, "root", out)
    cells = data["cells"]
    tool_cell = next(c for c in cells if c["cell_type"] == "code" and "--tools" in "".join(c["source"]))
    assert "".join(tool_cell["source"]).startswith("%%subchat root --tools good,boom,scaled3 --yes\n")
    specs = {t["function"]["name"]: t["function"] for t in tool_cell["metadata"]["subchat"]["tools"]}
    assert specs["good"]["description"] == "Doubles x."
    assert specs["good"]["parameters"]["properties"]["x"] == {"type": "integer",
                                                               "description": "the number"}
    assert specs["scaled3"]["parameters"]["required"] == ["region"]
    text = "\n".join("".join(c["source"]) for c in cells)
    assert "`good(x: integer)`: Doubles x." in text and "`scaled3(region: string, k: integer = 3)`" in text
    defs = next(c for c in cells if "recorded_tool(" in "".join(c["source"]))
    assert cells.index(defs) < cells.index(tool_cell)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval",
         "--nbval-current-env", str(out)], capture_output=True, text=True, cwd=workdir,
        env={**__import__("os").environ, "LLM_BACKEND": "echo"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_a_recorded_tool_returns_what_was_recorded_and_refuses_other_arguments():
    from subchat_magics.tools import ToolCall, Toolset, recorded_tool

    spec = {"type": "function", "function": {"name": "good", "description": "Doubles x.",
            "parameters": {"type": "object", "properties": {"x": {"type": "integer"}},
                           "required": ["x"]}}}
    tools = Toolset.of([recorded_tool(spec, {'{"x": 0}': "0"})])
    assert tools.run(ToolCall("good", {"x": 0})).content == "0"
    other = tools.run(ToolCall("good", {"x": 5}))
    assert other.status == "error" and "no recorded result of good(x=5)" in other.content
    assert "invalid arguments" in tools.run(ToolCall("good", {"x": "a"})).content
