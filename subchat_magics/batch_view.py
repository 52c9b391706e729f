"""The progress of a batch (``%%subchat --each``): one line updated in place, at most
~10 times a second, no output per item.

In a notebook: one display (a ``<progress>`` bar with the line beside it, and the line as
text/plain) that ends empty, so the saved notebook holds only the summary the magic
prints. In a terminal: the line rewritten with ``\\r`` (only on a real terminal; a
captured or piped stdout gets the summary alone).

Why not tqdm: it is not a dependency of the package, its notebook form is a widget that a
saved notebook (and nbval) cannot show, and the line we need is a few dozen lines; the
updates are paced by :meth:`subchat_magics.batch.Batch.run`, not here.

A face helper: imports the batch's types and IPython's display; never writes the tree.
"""

from __future__ import annotations

import html
import sys
from typing import Any

from . import notebook
from .batch import MARK, Progress, fields_of, first_exchanges
from .errors import SubchatError
from .magic_args import in_kernel
from .values import prompt_form

BAR = 20  # characters of the text bar


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_line(path: str, p: Progress) -> str:
    """``root/qs  ███████░░░ 734/1000 · 12 failed · 3,412 tokens/s · 0:04 left``."""
    frac = p.ended / p.total if p.total else 1.0
    full = int(frac * BAR)
    bits = [f"{p.ended}/{p.total}"]
    if p.failed:
        bits.append(f"{p.failed} failed")
    if p.interrupted:
        bits.append(f"{p.interrupted} interrupted")
    bits.append(f"{p.tokens_per_s:,.0f} tokens/s")
    if p.finished:
        bits.append(_clock(p.elapsed_s))
    elif p.paused:
        bits.append(f"paused: rate-limited, resuming in {_clock(p.paused)}")
    else:  # the rate of finished rows, once a few have finished (Progress.eta_s)
        eta = p.eta_s
        bits.append("estimating" if eta is None else f"{_clock(eta)} left")
    return f"{path}  {'█' * full}{'░' * (BAR - full)} " + " · ".join(bits)


class BatchProgress:
    """The live progress of one batch; call it with each :class:`Progress`."""

    def __init__(self, shell: Any, path: str):
        self.kernel = in_kernel(shell)
        self.path = path
        self.handle: Any = None
        self.tty = not self.kernel and bool(getattr(sys.stdout, "isatty", lambda: False)())
        self.updates = 0
        self._width = 0

    def __call__(self, p: Progress) -> None:
        self.updates += 1
        line = progress_line(self.path, p)
        # it starts and ends empty: a saved notebook (and nbval) keeps only the summary
        self._show(line, f"<progress value='{p.ended}' max='{max(p.total, 1)}' "
                         f"style='width:16em;vertical-align:middle'></progress> "
                         f"<code>{html.escape(line)}</code>")

    def planning(self, stage: str, done: int, total: int) -> None:
        """How far planning is (before the first row is sent): ``--each docs  planning:
        preparing the rows 4,096/10,000``."""
        self._show(f"{self.path}  planning: {stage} {done:,}/{total:,}",
                   f"<code>{html.escape(self.path)}  planning: {html.escape(stage)} "
                   f"{done:,}/{total:,}</code>")

    def _show(self, line: str, markup: str) -> None:
        if self.kernel:
            if self.handle is None:
                from IPython.display import display

                self.handle = display({"text/plain": ""}, raw=True, display_id=True)
            self.handle.update({"text/plain": line, "text/html": markup}, raw=True)
        elif self.tty:
            pad = max(0, self._width - len(line))
            sys.stdout.write("\r" + line + " " * pad)
            sys.stdout.flush()
            self._width = len(line)

    def close(self) -> None:
        """Take the live line away (the magic prints the summary after it)."""
        if self.kernel and self.handle is not None:
            self.handle.update({"text/plain": ""}, raw=True)
        elif self.tty and self._width:
            sys.stdout.write("\r" + " " * self._width + "\r")
            sys.stdout.flush()


# -- the template of a batch ----------------------------------------------------------------------
class CutText(str):
    """A row's message whose value was cut at ``max_value_chars`` (the batch counts it)."""

    cut = True


class BatchTemplate:
    """A ``--each`` cell as a template read once per batch: every reference that is not
    the row's own (``{In[-1]}``, ``{Out[3]}``, ``{_}``, a notebook variable) is resolved
    once, before the first row; per row only ``{item}``, ``{index}`` and the fields are
    put in. Relative references (``{In[-1]}``, ``{Out[-1]}``, ``{_}``) are pinned to the
    executions they name the first time the batch runs (``refs``, kept in the rows'
    provenance), so running the same cell again means the same text and resumes it."""

    def __init__(self, shell: Any, template: str, limits: Any, refs: dict[str, str] | None = None):
        self.shell = shell
        self.ns = shell.user_ns
        self.hidden = getattr(shell, "user_ns_hidden", None) or {}
        self.cells = notebook.context(shell)
        self.limits = limits
        self.template = template
        self.refs: dict[str, str] = dict(refs or {})
        self.masked: list[str] = []
        self._static: dict[str, str | None] = {}
        self._parts = self._compile()  # ("text", s) | ("static", token) | ("name", name)

    def known(self, name: str) -> bool:
        return name in self.ns and not notebook.ipython_owned(name, self.ns, self.hidden)

    def _pin(self, tok: str, m: Any) -> str:
        """The absolute form of a relative reference (``{In[-1]}`` -> ``{In[12]}``)."""
        if tok in self.refs:
            return self.refs[tok]
        kind, index, name = m.group(1), m.group(2), m.group(3)
        pinned = tok
        try:
            if kind is not None and int(index) < 0:
                cell = self.cells._locate(kind, int(index), None)
                if isinstance(cell, int):
                    pinned = f"{{{kind}[{cell}]}}"
            elif name == "_" and not self.known("_"):
                out = getattr(getattr(self.shell, "history_manager", None), "output_hist", {}) or {}
                if out:
                    pinned = f"{{Out[{max(out)}]}}"
        except SubchatError:
            return tok  # the error is raised when it is filled, naming it
        if pinned != tok:
            self.refs[tok] = pinned
        return pinned

    def _compile(self) -> list[tuple[str, str]]:
        parts: list[tuple[str, str]] = []
        text = self.template
        open_escapes = 0
        pos = 0
        for m in notebook._TOKEN.finditer(text):
            parts.append(("text", text[pos:m.start()]))
            pos = m.end()
            tok = m.group(0)
            if tok == "{{":
                parts.append(("text", "{"))
                open_escapes += 1
            elif tok == "}}":
                parts.append(("text", "}" if open_escapes else "}}"))
                open_escapes = max(0, open_escapes - 1)
            elif m.group(3) is not None and m.group(3) != "_":
                parts.append(("name", m.group(3)))
            else:
                parts.append(("static", self._pin(tok, m)))
        parts.append(("text", text[pos:]))
        return parts

    def _resolve(self, tok: str) -> str | None:
        """A reference that is not the row's own, filled once for the whole batch."""
        if tok not in self._static:
            filled = notebook.interpolate(tok, self.ns, self.hidden, cells=self.cells,
                                          limits=self.limits)
            self.masked.extend(filled.masked)
            self._static[tok] = filled.text
        return self._static[tok]

    def row(self, item: Any, index: Any) -> str:
        """The message of one row."""
        own = {"item": item, "index": index, **(fields_of(item) or {})}
        out: list[str] = []
        cut = False
        for kind, value in self._parts:
            if kind == "text":
                out.append(value)
            elif kind == "static":
                out.append(self._resolve(value) or value)
            elif value in own:
                piece, n_masked = prompt_form(value, own[value], self.limits)
                if piece.endswith(" more characters left out)") and not (
                        isinstance(own[value], str) and len(own[value]) <= self.limits.chars):
                    cut = True
                if n_masked:
                    self.masked.append(f"{{{value}}}")
                out.append(piece)
            else:
                out.append(self._resolve(f"{{{value}}}") or f"{{{value}}}")
        text = "".join(out)
        return CutText(text) if cut else text


def stored_refs(session: Any, path: Any, name: str) -> dict[str, str]:
    """The pinned references of the batch chat ``PATH/NAME`` (empty when it is new)."""
    tree = session.tree
    try:
        parent = session.chat(path) if path is not None else session.current_chat()
    except SubchatError:
        return {}
    full = f"{parent.path}/{name}"
    if full not in tree:
        return {}
    for ex in first_exchanges(tree, tree.get(full)).values():
        if len(ex) > 1:
            mark = ex[1][3].get(MARK)
            if isinstance(mark, dict) and isinstance(mark.get("refs"), dict):
                return {str(k): str(v) for k, v in mark["refs"].items()}
    return {}
