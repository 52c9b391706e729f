"""The README's and the guide's examples, run as written: every fenced IPython/Python block
of README.md and of every page of docs/ runs on echo, page by page, each page in a fresh
folder and a fresh namespace, through a real shell, in the order a reader meets it.

Left out, by the fence's info string (nothing is left out by its place on a page):
- ```bash, ```console, ```text, ```mermaid: shell commands, output and diagrams, not cells;
- ```{.ipython .no-run} / ```{.python .no-run}: blocks that need a GPU, a model, Kaggle's
  paths or a terminal (the vLLM recipes, a pytest module); each page says why.
A fence with any other info string fails the test, so a block cannot drop out unnoticed.
The blocks assert what they show where it matters (``assert`` lines in the pages); the
tour's effects are checked here too."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README] + sorted(DOCS.glob("*.md"))

RUN = ("", "python", "ipython")
NOT_CELLS = ("bash", "console", "text", "mermaid")
NO_RUN = re.compile(r"^\{\s*\.(python|ipython)\s+\.no-run\s*\}$")
_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.S | re.M)


def page_blocks(text: str) -> tuple[list[str], list[str]]:
    """(blocks to run, blocks left out) of one page, in order. A fence whose info string
    is neither runnable nor a known exclusion raises ValueError."""
    run, left = [], []
    for info, code in _FENCE.findall(text):
        info = info.strip()
        if info in RUN:
            if all(line.startswith("!") or not line.strip() for line in code.splitlines()):
                left.append(code)  # shell commands in a cell
            else:
                run.append(code)
        elif info in NOT_CELLS or NO_RUN.match(info):
            left.append(code)
        else:
            raise ValueError(f"a fence with info string {info!r}: use python/ipython to run "
                             f"it, bash/console/text, or {{.ipython .no-run}} to leave it out")
    return run, left


def _name(page: Path) -> str:
    return page.name if page == README else f"docs/{page.name}"


def test_every_fence_is_run_or_left_out_by_name():
    for page in PAGES:
        page_blocks(page.read_text(encoding="utf-8"))  # raises on an unknown fence


def test_an_unknown_fence_fails_the_check():
    with pytest.raises(ValueError, match="'pyhton'"):
        page_blocks("```pyhton\nx = 1\n```\n")
    run, left = page_blocks("```ipython\n%subchat tree --text\n```\n"
                            "```{.ipython .no-run}\n%load_vllm 1\n```\n```bash\nls\n```\n")
    assert run == ["%subchat tree --text\n"] and len(left) == 2


def test_the_readme_and_the_guide_have_examples_where_a_reader_needs_them():
    counts = {_name(p): len(page_blocks(p.read_text(encoding="utf-8"))[0]) for p in PAGES}
    for page in ("README.md", "docs/index.md", "docs/chats.md", "docs/magics.md",
                 "docs/batches.md", "docs/structured.md", "docs/notebook-context.md",
                 "docs/tools.md", "docs/verdicts.md", "docs/backends.md",
                 "docs/tree-view.md", "docs/python-api.md", "docs/configuration.md"):
        assert counts[page] >= 1, f"{page} has no example that runs"
    assert sum(counts.values()) >= 60, counts


def _check_tour(shell, workdir):
    out = shell.ok("%subchat show root/units")
    assert "You are a patient physics tutor." in out and "echo (4 messages): And a joule?" in out
    tree = shell.ok("%subchat tree --text")
    assert all(f"  {n}  " in tree for n in ("1", "2", "3"))
    assert (workdir / "tree.json").exists()


def _check_readme(shell, workdir):
    _check_tour(shell, workdir)
    assert list(shell.ns["reviews"]["label"]) == ["positive"] * 3  # echo: the first choice
    assert "[assistant] positive" in shell.ok("%subchat show root/reviews/0")
    tree = shell.ok("%subchat tree --text")
    assert "reviews" in tree and "3/3 done" in tree


def _check_chats(shell, workdir):
    out = shell.ok("%subchat show root/physics")
    assert "What is a newton?" in out and "And a pascal?" in out and "And a watt?" not in out
    tree = shell.ok("%subchat tree --text")
    assert "thoughts" not in tree and "ideas" not in tree


def _check_batches(shell, workdir):
    assert "[assistant] positive" in shell.ok("%subchat show root/labels/reviews/r3")
    assert list(shell.ns["scored"].index) == ["r1", "r2", "r3"]  # the --labels batch ran


# what the examples say they did, beyond the asserts written in the pages
CHECKS = {"README.md": _check_readme, "docs/index.md": _check_tour,
          "docs/chats.md": _check_chats, "docs/batches.md": _check_batches}


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_example_of_the_page_runs_as_written_on_echo(page, shell, workdir, monkeypatch):
    monkeypatch.setenv("LLM_BACKEND", "echo")
    blocks, _ = page_blocks(page.read_text(encoding="utf-8"))
    for code in blocks:
        result, cap = shell.run(code)
        err = result.error_before_exec or result.error_in_exec
        if err is not None:
            pytest.fail(f"{_name(page)} example fails:\n{code}\n-> {type(err).__name__}: {err}\n"
                        f"{cap.stdout[-500:]}")
    check = CHECKS.get(_name(page))
    if check:
        check(shell, workdir)


def test_the_plugin_pages_pytest_module_passes_under_pytest(tmp_path):
    """docs/plugins.md's example is a test module for a plugin author: run it as one."""
    _, left = page_blocks((DOCS / "plugins.md").read_text(encoding="utf-8"))
    modules = [code for code in left if code.startswith("import pytest")]
    assert len(modules) == 1
    (tmp_path / "test_plugin_example.py").write_text(modules[0], encoding="utf-8")
    env = {k: v for k, v in os.environ.items()
           if k not in ("LLM_BACKEND", "SUBCHAT_STORE", "OLLAMA_HOST", "PYTEST_ADDOPTS")}
    env["OLLAMA_HOST"] = "http://127.0.0.1:9"  # a closed port: no real server is ever asked
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "test_plugin_example.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "2 passed" in done.stdout, done.stdout[-2000:] + done.stderr[-1000:]
