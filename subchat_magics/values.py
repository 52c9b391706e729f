"""Values as prompt text: a form a model reads well that cannot flood the context.

A pandas DataFrame or Series becomes a Markdown table of at most ``rows`` rows and
``columns`` columns, and only as many rows as fit in ``chars`` (a table is cut between
rows, so its note says how many it shows), with a note of the full shape; floats are
written at ``digits`` significant digits; a numpy array its shape, dtype and a
head, anything else ``str()``; every form is cut at ``chars`` characters with a note of how
much was left out. Every known key is masked (:func:`secrets.mask_keys`) in each piece of
text *before* it is cut or laid out, so no cut leaves a part of a key behind. pandas and
numpy are never imported here: a value that is one of theirs means its library is already
in ``sys.modules``."""

from __future__ import annotations

import sys
import unicodedata
from dataclasses import dataclass
from typing import Any

from .errors import InvalidInput
from .secrets import mask_keys
from .words import counted


@dataclass(frozen=True)
class Limits:
    """How much of a value goes into a prompt (``0`` chars: no cut)."""

    chars: int = 4000
    rows: int = 20
    columns: int = 20
    digits: int = 6  # significant digits of a float in a table or an array


_JOINERS = {0x200C, 0x200D, 0x034F}  # ZWNJ, ZWJ, combining grapheme joiner


def _joins(ch: str) -> bool:
    """Whether ``ch`` belongs to the character before it (a combining accent, a variation
    selector, a skin tone, an emoji tag, a joiner): a cut must not fall before it."""
    o = ord(ch)
    return (o in _JOINERS or 0xFE00 <= o <= 0xFE0F or 0xE0100 <= o <= 0xE01EF
            or 0x1F3FB <= o <= 0x1F3FF or 0xE0020 <= o <= 0xE007F
            or unicodedata.category(ch) in ("Mn", "Mc", "Me"))


def _regional(ch: str) -> bool:
    return 0x1F1E6 <= ord(ch) <= 0x1F1FF  # a flag is two of these


def boundary(text: str, i: int) -> int:
    """The nearest place at or before ``i`` where ``text`` can be cut without splitting
    what reads as one character (``e`` + a combining accent, an emoji sequence joined by
    ZWJ or with a skin tone, a flag's pair of regional indicators, CR LF). Within 32
    characters; past that (no boundary so near) ``i`` itself."""
    j = i
    while i - j < 32:
        if j <= 0 or j >= len(text):
            return max(0, min(j, len(text)))
        ch, before = text[j], text[j - 1]
        if _joins(ch) or ord(before) in _JOINERS or (before == "\r" and ch == "\n"):
            j -= 1
            continue
        if _regional(ch) and _regional(before):
            run = 0
            while j - run - 1 >= 0 and _regional(text[j - run - 1]):
                run += 1
            if run % 2:  # the cut would fall inside a pair
                j -= 1
                continue
        return j
    return i


def _back_boundary(text: str, i: int) -> int:
    """Like :func:`boundary`, but moving forward (where a kept tail begins)."""
    j = i
    while j - i < 32:
        if j <= 0 or j >= len(text) or boundary(text, j) == j:
            return j
        j += 1
    return i


def cut(text: str, chars: int, keep: str = "head") -> str:
    """``text`` cut to about ``chars`` characters with a note of what was left out; a cut
    never splits what reads as one character (:func:`boundary`).
    ``keep="ends"`` keeps its start and its end (a traceback's last line is the error)."""
    if chars <= 0 or len(text) <= chars:
        return text
    if keep == "ends":
        head = boundary(text, chars // 3)
        start = _back_boundary(text, len(text) - (chars - chars // 3))
        left = start - head
        return f"{text[:head]}\n… ({left} characters left out) …\n{text[start:]}"
    end = boundary(text, chars)
    return f"{text[:end]}\n… ({len(text) - end} more characters left out)"


def masked_cut(text: str, chars: int, keep: str = "head") -> tuple[str, int]:
    """``text`` with known keys masked, then cut (:func:`cut`); and how many places were
    masked."""
    text, n = mask_keys(text)
    return cut(text, chars, keep), n


def prompt_text(name: str, value: Any, limits: Limits = Limits()) -> str:
    """``value`` as prompt text within ``limits``, known keys masked; ``name`` is how the
    cell wrote it (``df``, ``Out[3]``), for the error when its ``str()`` fails."""
    return prompt_form(name, value, limits)[0]


def prompt_form(name: str, value: Any, limits: Limits = Limits()) -> tuple[str, int]:
    """:func:`prompt_text` and how many places of it had a known key masked (each table
    cell, index label and column name is masked before it is cut to its width)."""
    if type(value) is str:
        return masked_cut(value, limits.chars)
    tally = [0]
    form = _library_form(value, limits, tally)
    if form is None:
        form = _str_of(name, value)
    text, n = masked_cut(form, limits.chars)
    return text, n + tally[0]


def _library_form(value: Any, limits: Limits, tally: list[int]) -> str | None:
    modules = {c.__module__.partition(".")[0] for c in type(value).__mro__}
    if "pandas" in modules and "pandas" in sys.modules:
        pd = sys.modules["pandas"]
        if isinstance(value, pd.DataFrame):
            return _frame_markdown(value, limits, tally)
        if isinstance(value, pd.Series):
            return _series_markdown(value, limits, tally)
    if "numpy" in modules and "numpy" in sys.modules:
        np = sys.modules["numpy"]
        if isinstance(value, np.ndarray):
            return _array_text(np, value, limits)
    return None


def _str_of(name: str, value: Any) -> str:
    try:
        text = str(value)
    except Exception as exc:  # noqa: BLE001 - any __str__ may fail; say which name
        raise InvalidInput(
            f"{{{name}}} in the cell cannot be written as text: str({name}) raised "
            f"{type(exc).__name__}: {str(exc)[:100]}; fix its __str__, or write {{{{{name}}}}} "
            "for the braces themselves") from None
    if not isinstance(text, str):  # a str subclass whose __str__ misbehaves
        raise InvalidInput(f"str({name}) did not give text; write {{{{{name}}}}} for the braces")
    return str.__str__(text)


def _is_float(value: Any) -> bool:
    """A Python or numpy float (numpy is never imported here: its scalars say their kind)."""
    if isinstance(value, float):  # (numpy's float64 too)
        return True
    return type(value).__module__ == "numpy" and getattr(getattr(value, "dtype", None), "kind", "") == "f"


def _float(value: Any, digits: int) -> str:
    """A float at ``digits`` significant digits, the way a person writes it (``0.3`` for
    0.30000000000000004, ``3.14159``, ``1.5e-07``, ``nan``), never fewer than its whole
    part has (``123456790``, not ``1.23457e+08``) below 1e15."""
    v = float(value)
    sig = max(1, digits)
    if v == v and abs(v) < 1e15:
        sig = max(sig, len(str(int(abs(v)))))
    return f"{v:.{sig}g}"


def _cell(value: Any, tally: list[int], width: int = 60, digits: int = 6) -> str:
    if _is_float(value):
        value = _float(value, digits)
    text, n = mask_keys(" ".join(str(value).split()))  # masked before it is cut to width
    tally[0] += n
    if len(text) > width:
        text = text[: width - 1] + "…"
    return text.replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _shown(total: int, shown: int, what: str) -> str | None:
    return f"the first {shown} of {total} {what}" if shown < total else None


#: room kept for a table's note (its shape, what is shown) when rows are fitted to ``chars``
NOTE_ROOM = 160


def _fitted(header: list[str], body: list[list[str]], chars: int) -> list[list[str]]:
    """The first rows of ``body`` whose table fits in ``chars`` with its note (at least
    one row): a table is cut between rows, so its note can say how many it shows."""
    if chars <= 0:
        return body
    used = len(_table(header, [])) + NOTE_ROOM
    for i, row in enumerate(body):
        used += len("| " + " | ".join(row) + " |") + 1
        if used > chars and i > 0:
            return body[:i]
    return body


def _frame_markdown(df: Any, limits: Limits, tally: list[int]) -> str:
    n_rows, n_cols = df.shape
    rows, cols = max(1, limits.rows), max(1, limits.columns)
    part = df.iloc[:rows, :cols]
    header = [_cell(df.index.name or "", tally)] + [_cell(c, tally) for c in part.columns]
    body = [[_cell(idx, tally)] + [_cell(v, tally, digits=limits.digits) for v in row]
            for idx, row in zip(part.index, part.itertuples(index=False, name=None))]
    body = _fitted(header, body, limits.chars)
    note = f"DataFrame: {counted(n_rows, 'row')} × {counted(n_cols, 'column')}"
    shown = [s for s in (_shown(n_rows, len(body), "rows"), _shown(n_cols, part.shape[1], "columns"))
             if s]
    if shown:
        note += f" (showing {' and '.join(shown)})"
    return f"{note}\n\n{_table(header, body)}"


def _series_markdown(s: Any, limits: Limits, tally: list[int]) -> str:
    rows = max(1, limits.rows)
    part = s.iloc[:rows]
    name = "" if s.name is None else str(s.name)
    header = [_cell(s.index.name or "", tally), _cell(name or "value", tally)]
    body = [[_cell(idx, tally), _cell(v, tally, digits=limits.digits)]
            for idx, v in zip(part.index, part.tolist())]
    body = _fitted(header, body, limits.chars)
    note = f"Series{f' {name!r}' if name else ''}: {counted(len(s), 'row')}, dtype {s.dtype}"
    shown = _shown(len(s), len(body), "rows")
    if shown:
        note += f" (showing {shown})"
    return f"{note}\n\n{_table(header, body)}"


def _array_text(np: Any, a: Any, limits: Limits) -> str:
    note = f"numpy array: shape {a.shape}, dtype {a.dtype}"
    if a.ndim == 0:
        return f"{note}\n\n{a!s}"
    head = a[: max(1, limits.rows)]
    shown = [_shown(a.shape[0], head.shape[0], "rows")]
    if a.ndim >= 2:
        head = head[:, : max(1, limits.columns)]
        shown.append(_shown(a.shape[1], head.shape[1], "columns"))
    shown = [s for s in shown if s]
    if shown:
        note += f" (showing {' and '.join(shown)})"
    body = np.array2string(head, threshold=sys.maxsize, max_line_width=200,
                           precision=max(1, limits.digits) if head.dtype.kind == "f" else None)
    return f"{note}\n\n{body}"
