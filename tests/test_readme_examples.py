"""The README's examples, run as written: every fenced IPython/Python example (the tour,
the magics, the Python API) runs on echo, in a fresh folder, through a real shell, in
the order a reader meets it. The Kaggle/vLLM recipe, installation and shell commands are
left out (they need a GPU, a network or a terminal)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
# sections whose examples need a GPU, the network or a terminal, or are not code
SKIPPED_SECTIONS = ("On a fresh machine", "Install", "vLLM in the kernel", "Layout",
                    "On Kaggle")  # /kaggle paths; tests/test_read_only_store.py runs the same
_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.S | re.M)


def readme_examples(text: str) -> list[tuple[str, str]]:
    """(section, code) of each fenced example to run, in order."""
    out = []
    sections = re.split(r"^## ", text, flags=re.M)
    for section in sections[1:]:
        title = section.splitlines()[0].strip()
        if title.startswith(SKIPPED_SECTIONS):
            continue
        for info, code in _FENCE.findall(section):
            if info.strip() not in ("", "python", "ipython"):
                continue  # bash, console...
            if all(line.startswith("!") or not line.strip() for line in code.splitlines()):
                continue  # shell commands
            out.append((title, code))
    return out


def test_the_readme_has_examples_in_the_tour_and_the_api():
    titles = {title for title, _ in readme_examples(README.read_text(encoding="utf-8"))}
    assert {"A 30-second tour", "Python API"} <= titles


def test_every_readme_example_runs_as_written_on_echo(shell, workdir, monkeypatch):
    monkeypatch.setenv("LLM_BACKEND", "echo")
    examples = readme_examples(README.read_text(encoding="utf-8"))
    for title, code in examples:
        result, cap = shell.run(code)
        err = result.error_before_exec or result.error_in_exec
        if err is not None:
            pytest.fail(f"README ({title}) example fails:\n{code}\n-> {type(err).__name__}: {err}\n"
                        f"{cap.stdout[-500:]}")
    # and they did what they say
    out = shell.ok("%subchat show root/units")
    assert "You are a patient physics tutor." in out and "echo (4 messages): And a joule?" in out
    tree = shell.ok("%subchat tree --text")
    assert all(f"  {n}  " in tree for n in ("1", "2", "3"))
    assert (workdir / "tree.json").exists()
