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

from .batch import Progress
from .magic_args import in_kernel

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
    bits.append(f"{_clock(p.eta_s)} left" if not p.finished else f"{_clock(p.elapsed_s)}")
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
        if self.kernel:
            bundle = {"text/plain": line,
                      "text/html": f"<progress value='{p.ended}' max='{max(p.total, 1)}' "
                                   f"style='width:16em;vertical-align:middle'></progress> "
                                   f"<code>{html.escape(line)}</code>"}
            if self.handle is None:  # it starts and ends empty: a saved notebook (and
                from IPython.display import display  # nbval) keeps only the summary

                self.handle = display({"text/plain": ""}, raw=True, display_id=True)
            self.handle.update(bundle, raw=True)
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
