"""The notebook as context: what ``{In[3]}``, ``{Out[3]}``, ``{Err[3]}``, ``{_}`` and
``{name}`` in a message stand for, and the errors the notebook's cells raised.

A face helper: it reads the IPython shell (its namespace, input and output history) and
records every cell's error through a ``post_run_cell`` handler that the extension registers
on load and removes on unload. :func:`interpolate` is the one place a message's braces are
filled, so every face that takes a template (``%%subchat``, ``explain``) fills them alike;
everything it puts in is cut to the configured limits and has every known key masked."""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInput
from .secrets import mask_keys
from .values import Limits, masked_cut, prompt_form

# {{ and }} (escaped braces), {In[3]} / {Out[-1]} / {Err[2]}, {name}; anything else in
# braces ({In[}, {Out[x]}, code, JSON) is not a token and stays as written
_TOKEN = re.compile(r"\{\{|\}\}|\{(In|Out|Err)\[(-?\d+)\]\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
# names IPython itself puts into the namespace (output and input history, its helpers)
_IPYTHON_NAMES = re.compile(r"_{1,3}|_\d+|_i.*|_o.*|_d.*|In|Out|exit|quit|get_ipython")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
_KEEP = 200  # the newest errors kept per kernel (text only, no frames)
_KEEP_RUNS = 50  # the newest cells run without history kept (their results are held)


@dataclass(frozen=True)
class CellError:
    """What one cell raised: its execution number (``None`` for a cell run without
    history), its source, and the error as the notebook showed it (exception type,
    message and traceback, colours stripped)."""

    execution: int | None
    source: str
    ename: str
    evalue: str
    traceback: str

    @property
    def where(self) -> str:
        return f"execution {self.execution}" if self.execution is not None else "a cell"


@dataclass
class Run:
    """A cell run without history (nbval, some frontends): IPython numbers and keeps none
    of it, so its source, result and error are kept here for ``{In[-1]}`` and the like."""

    source: str
    result: Any
    has_result: bool
    error: CellError | None


@dataclass
class Filled:
    """A message with its braces filled; ``masked`` names each reference in which a
    known key was masked (``{In[3]}``, ``{config}``)."""

    text: str
    masked: list[str] = field(default_factory=list)


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def ipython_owned(name: str, namespace: dict[str, Any], hidden: dict[str, Any]) -> bool:
    """Whether ``name`` is one of IPython's own names (``_``, ``In``, ``exit``, ``_i3``…)
    holding what IPython put there, not something the notebook assigned itself."""
    if not _IPYTHON_NAMES.fullmatch(name):
        return False
    value = namespace.get(name)
    if name in hidden:
        return hidden[name] is value  # IPython re-pushes its names; an assignment differs
    # before the first output IPython sets _, __ and ___ to '' without marking them
    return name in ("_", "__", "___") and isinstance(value, str) and value == ""


class NotebookContext:
    """One shell's cells as prompt material: sources, results, the errors they raised.

    Cells are named by IPython's execution numbers (``{In[3]}``; negative: counted back
    from the running cell). A runner that executes cells without history (nbval does)
    leaves them unnumbered; then negative references count back through the unnumbered
    cells run since the extension was loaded, which this context keeps."""

    def __init__(self, shell: Any):
        self.shell = shell
        self.errors: dict[int, CellError] = {}  # by execution number
        self.recent_errors: list[CellError] = []  # every recorded error, newest last
        self.unnumbered: list[Run] = []  # cells run without history, newest last
        self._attached = False

    # -- the record ----------------------------------------------------------------------------
    def attach(self) -> None:
        if not self._attached and getattr(self.shell, "events", None) is not None:
            self.shell.events.register("post_run_cell", self.record)
            self._attached = True

    def detach(self) -> None:
        if self._attached:
            try:
                self.shell.events.unregister("post_run_cell", self.record)
            except ValueError:
                pass  # someone removed it already
            self._attached = False

    def record(self, result: Any) -> None:
        """``post_run_cell`` handler: keep the error a cell raised; of a cell run without
        history, keep its source and result too."""
        if result is None:
            return
        err = getattr(result, "error_before_exec", None) or getattr(result, "error_in_exec", None)
        n = getattr(result, "execution_count", None)
        numbered = n is not None and n < self.shell.execution_count  # else: the next number
        info = getattr(result, "info", None)
        source = getattr(info, "raw_cell", None)
        if source is None:
            source = (self._input(n) if numbered else None) or ""
        error = None
        if err is not None:
            error = CellError(n if numbered else None, source, type(err).__name__, str(err),
                              (self._stored_traceback(n) if numbered else None)
                              or self._traceback_text(err))
            if numbered:
                self.errors[n] = error
            self.recent_errors = (self.recent_errors + [error])[-_KEEP:]
            for old in sorted(self.errors)[:-_KEEP]:
                del self.errors[old]
        if not numbered:
            value = getattr(result, "result", None)
            run = Run(source, value, value is not None, error)
            self.unnumbered = (self.unnumbered + [run])[-_KEEP_RUNS:]

    def _stored_traceback(self, n: int) -> str | None:
        """The traceback IPython (9 and later) already formatted and stored for execution
        ``n``, so a deep one is not formatted twice."""
        stored = getattr(getattr(self.shell, "history_manager", None), "exceptions", None)
        entry = stored.get(n) if isinstance(stored, dict) else None
        lines = entry.get("traceback") if isinstance(entry, dict) else None
        if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
            return None
        return strip_ansi("\n".join(x.rstrip("\n") for x in lines)).strip("\n") or None

    def _traceback_text(self, err: BaseException) -> str:
        import traceback

        from IPython.core.error import UsageError

        if isinstance(err, UsageError):
            return f"UsageError: {err}"
        try:
            if isinstance(err, SyntaxError):
                lines = traceback.format_exception_only(type(err), err)
            elif hasattr(err, "_render_traceback_"):
                lines = err._render_traceback_()
            else:  # as the notebook showed it: "Cell In[3], line 2", arrows, context
                lines = self.shell.InteractiveTB.structured_traceback(
                    type(err), err, err.__traceback__, tb_offset=1)
        except Exception:  # noqa: BLE001 - a formatter's failure must not fail the user's cell
            lines = traceback.format_exception(type(err), err, err.__traceback__)
        return strip_ansi("\n".join(line.rstrip("\n") for line in lines)).strip("\n")

    # -- executions ----------------------------------------------------------------------------
    def _running(self) -> tuple[int, bool]:
        """The running cell's number (the next one outside a cell) and whether it is
        numbered. IPython counts a numbered cell before running it, so the number is the
        running cell's result's; a cell run without history carries the next number."""
        count = int(getattr(self.shell, "execution_count", 1) or 1)
        running = getattr(getattr(self.shell, "displayhook", None), "exec_result", None)
        n = getattr(running, "execution_count", None)
        if n is None:
            return count, True
        return int(n), int(n) < count

    @property
    def current(self) -> int:
        return self._running()[0]

    def _input(self, n: int | None) -> str | None:
        hist = getattr(getattr(self.shell, "history_manager", None), "input_hist_raw", None) or []
        return hist[n] if n is not None and 0 < n < len(hist) else None

    def _locate(self, ref: str, index: int, label: str | None) -> int | Run:
        """The cell ``{ref[index]}`` names: an execution number, or (counting back from a
        cell run without history) one of the unnumbered runs."""
        current, numbered = self._running()
        if index < 0 and not numbered:
            if -index > len(self.unnumbered):
                raise InvalidInput(
                    f"{label or self._ref(ref, index)}: only {len(self.unnumbered)} cell(s) "
                    "ran before this one since the extension was loaded (these cells run "
                    f"without history, so only those are known){self._hint(ref, index, label)}")
            return self.unnumbered[index]
        n = current + index if index < 0 else index
        if not 0 < n < current or self._input(n) is None:
            ran = (f"executions 1 to {current - 1} ran before this cell"
                   if current > 1 else "no cell ran before this one")
            which = f"{n}" if index >= 0 else f"{ref}[{index}]"  # as written, not what it counts to
            if index < 0:
                ran = f"it counts {-index} back from this cell, execution {current}; {ran}"
            raise InvalidInput(f"{label or self._ref(ref, index)}: there is no execution {which} "
                               f"({ran}){self._hint(ref, index, label)}")
        return n

    @staticmethod
    def _ref(ref: str, index: int) -> str:
        return f"{{{ref}[{index}]}}"

    @staticmethod
    def _hint(ref: str, index: int, label: str | None) -> str:
        return "" if label else f"; write {{{{{ref}[{index}]}}}} for the braces themselves"

    def source(self, index: int) -> str:
        cell = self._locate("In", index, None)
        return (cell.source if isinstance(cell, Run) else self._input(cell) or "").rstrip()

    def result(self, index: int) -> tuple[str, Any]:
        """(how to name it, the value) of ``{Out[index]}``."""
        cell = self._locate("Out", index, None)
        if isinstance(cell, Run):
            if not cell.has_result:
                raise InvalidInput(f"{self._ref('Out', index)}: that cell returned no result"
                                   f"{self._hint('Out', index, None)}")
            return f"Out[{index}]", cell.result
        out = getattr(getattr(self.shell, "history_manager", None), "output_hist", {}) or {}
        if cell not in out:
            raise InvalidInput(f"{self._ref('Out', index)}: execution {cell} returned no result"
                               f"{self._hint('Out', index, None)}")
        return f"Out[{cell}]", out[cell]

    def error(self, index: int, label: str | None = None) -> CellError:
        cell = self._locate("Err", index, label)
        error = cell.error if isinstance(cell, Run) else self.errors.get(cell)
        if error is None:
            where = "that cell" if isinstance(cell, Run) else f"execution {cell}"
            raise InvalidInput(
                f"{label or self._ref('Err', index)}: {where} raised no error (errors are "
                "recorded for the cells run while the extension is loaded)"
                f"{self._hint('Err', index, label)}")
        return error

    def last_error(self) -> CellError | None:
        """The newest error of a cell that is not itself a ``%subchat``/``%%subchat``
        magic (what the user wants explained is their code's error, not ours)."""
        for error in reversed(self.recent_errors):
            if not error.source.lstrip().startswith(("%subchat", "%%subchat")):
                return error
        return None

    def last_result(self) -> Any:
        """``_``: the notebook's own ``_`` if it assigned one, else the last result."""
        ns = self.shell.user_ns
        hidden = getattr(self.shell, "user_ns_hidden", {}) or {}
        if "_" in ns and not ipython_owned("_", ns, hidden):
            return ns["_"]
        hook = getattr(self.shell, "displayhook", None)
        out = ns.get("_oh") or {}
        if hook is None or (not out and getattr(hook, "_", "") == ""):
            raise InvalidInput("{_}: no cell has returned a result yet; write {{_}} for the "
                               "braces themselves")
        return hook._

    # -- filling a message ---------------------------------------------------------------------
    def fill(self, text: str, limits: Limits = Limits()) -> Filled:
        return interpolate(text, self.shell.user_ns,
                           getattr(self.shell, "user_ns_hidden", None), cells=self, limits=limits)


def interpolate(text: str, namespace: dict[str, Any], hidden: dict[str, Any] | None = None, *,
                cells: NotebookContext | None = None, limits: Limits = Limits(),
                typed: str = "the cell's text") -> Filled:
    """Fill a message's braces.

    ``{name}`` is the value of ``name`` in ``namespace`` when it is a simple name there; with
    ``cells``, ``{In[n]}`` is execution n's source, ``{Out[n]}`` its result, ``{Err[n]}`` the
    error it raised (negative n counts back from this cell) and ``{_}`` the last result.
    Any other text in braces (code, JSON, ``{In[}``, unknown names) stays as written, and so
    do IPython's own names (``{__}``, ``{In}``, ``{_i2}``…) unless the notebook assigned them
    (``hidden``: the shell's ``user_ns_hidden``). ``{{`` … ``}}`` are escaped braces: each
    ``{{`` gives ``{`` and the ``}}`` that closes it gives ``}``; a ``}}`` with no ``{{``
    before it (nested JSON) stays. Values are put in by :func:`values.prompt_text` within
    ``limits``. Every known key (and any run of 8 of its characters) is masked: in the text as
    typed and in each value before it is cut or laid out; ``masked`` names where (``typed``
    names the text as typed). A reference to an execution that does not exist, or that gave
    no result or error, is an :class:`InvalidInput` naming it."""
    hidden = hidden or {}
    out: list[str] = []
    masked: list[str] = []
    open_escapes = 0
    pos = 0
    text, n = mask_keys(text)  # the typed text, before any brace is read
    if n:
        masked.append(typed)
    for m in _TOKEN.finditer(text):
        out.append(text[pos:m.start()])
        pos = m.end()
        tok = m.group(0)
        if tok == "{{":
            out.append("{")
            open_escapes += 1
            continue
        if tok == "}}":
            out.append("}" if open_escapes else "}}")
            open_escapes = max(0, open_escapes - 1)
            continue
        piece = _reference(m, namespace, hidden, cells, limits)
        if piece is None:
            out.append(tok)
            continue
        if piece[1]:
            masked.append(tok)
        out.append(piece[0])
    out.append(text[pos:])
    # a key put together only by a value and the text around it
    filled, n = mask_keys("".join(out))
    if n and not masked:
        masked.append(typed)
    return Filled(filled, masked)


def _reference(m: re.Match, namespace: dict[str, Any], hidden: dict[str, Any],
               cells: NotebookContext | None, limits: Limits) -> tuple[str, int] | None:
    """The text a token stands for with how many places of it were masked, or None when
    it stays as written. Keys are masked before the text is cut."""
    kind, index, name = m.group(1), m.group(2), m.group(3)
    if kind is not None:
        if cells is None:
            return None
        i = int(index)
        if kind == "In":
            return masked_cut(cells.source(i), limits.chars)
        if kind == "Out":
            name, value = cells.result(i)
            return prompt_form(name, value, limits)
        return masked_cut(cells.error(i).traceback, limits.chars, keep="ends")
    if name == "_" and cells is not None:
        return prompt_form("_", cells.last_result(), limits)
    if name not in namespace or ipython_owned(name, namespace, hidden):
        return None
    return prompt_form(name, namespace[name], limits)


def explain_prompt(error: CellError, limits: Limits = Limits()) -> Filled:
    """The message ``%subchat explain`` sends: the cell's code and the error it raised,
    cut to ``limits`` and with every known key masked."""
    code, a = masked_cut(error.source.rstrip(), limits.chars)
    tb, b = masked_cut(error.traceback or f"{error.ename}: {error.evalue}", limits.chars,
                       keep="ends")
    text = (f"This notebook cell raised {error.ename}. Explain "
            "the cause briefly and propose a fix (corrected code in a fenced block).\n\n"
            f"The cell:\n```python\n{code}\n```\n\nThe error:\n```\n{tb}\n```")
    safe, c = mask_keys(text)
    return Filled(safe, ["the error and its cell"] if a + b + c else [])


# -- one context per shell, held while the extension is loaded ---------------------------------
_contexts: "weakref.WeakKeyDictionary[Any, NotebookContext]" = weakref.WeakKeyDictionary()


def context(shell: Any) -> NotebookContext:
    """The notebook context of ``shell`` (created on first use)."""
    ctx = _contexts.get(shell)
    if ctx is None:
        ctx = _contexts[shell] = NotebookContext(shell)
    return ctx


def attach(shell: Any) -> NotebookContext:
    """Start recording the errors of ``shell``'s cells (``%load_ext``)."""
    ctx = context(shell)
    ctx.attach()
    return ctx


def detach(shell: Any) -> None:
    """Stop recording and forget the errors (``%unload_ext``)."""
    ctx = _contexts.pop(shell, None)
    if ctx is not None:
        ctx.detach()
