"""What both magics classes share: parsing a magic's line shell-style, turning our errors
into one-line ``UsageError``s that name the magic, and knowing whether output goes to a
kernel. IPython layer; imports only the error hierarchy and the key redactor."""

from __future__ import annotations

import functools
from typing import Any, Callable

from IPython.core.error import UsageError

from .errors import SubchatError
from .secrets import redact, steady


def split_words(line: str) -> list[tuple[str, str]]:
    """A magic's line as words, each ``(value, raw)``: split at whitespace outside quotes,
    quotes removed from the value (``raw`` keeps them). Backslashes stay as typed
    (``--regex \\d{3}`` means ``\\d{3}``, a Windows path keeps its ``\\``); inside double
    quotes ``\\"`` is a quote. An unclosed quote is a ``UsageError``."""
    words: list[tuple[str, str]] = []
    value: list[str] = []
    raw: list[str] = []
    quote = ""
    started = False
    i = 0
    while i < len(line):
        ch = line[i]
        if quote:
            if ch == "\\" and quote == '"' and line[i + 1:i + 2] == '"':
                value.append('"')
                raw.append('\\"')
                i += 2
                continue
            if ch == quote:
                quote = ""
            else:
                value.append(ch)
            raw.append(ch)
        elif ch in "\"'":
            quote, started = ch, True
            raw.append(ch)
        elif ch.isspace():
            if started:
                words.append(("".join(value), "".join(raw)))
                value, raw, started = [], [], False
        else:
            value.append(ch)
            raw.append(ch)
            started = True
        i += 1
    if quote:
        raise UsageError(f"cannot parse the options (no closing {quote}); close your quotes")
    if started:
        words.append(("".join(value), "".join(raw)))
    return words


def parse_line(magic_func: Callable, line: str) -> Any:
    """Parse a magic's line shell-style (quotes removed, unlike ``parse_argstring``;
    backslashes kept as typed). ``args.raw_words`` keeps each word as typed, quotes and
    all (:func:`choices_of` reads ``--choice`` from it)."""
    words = split_words(line)
    args = magic_func.parser.parse_args([w for w, _ in words])
    args.raw_words = [r for _, r in words]
    return args


def choices_of(args: Any) -> "str | list[str] | None":
    """``--choice`` as typed: a list of the choices where quotes mark some of them
    (``--choice "yes, please",no`` is two choices), else the value as given (``A,B`` or
    the name of a list)."""
    if getattr(args, "choice", None) is None:
        return None
    raw = None
    words = getattr(args, "raw_words", [])
    for k, w in enumerate(words):
        if w == "--choice" and k + 1 < len(words):
            raw = words[k + 1]
        elif w.startswith("--choice="):
            raw = w[len("--choice="):]
    if raw is None or not any(q in raw for q in "\"'"):
        return args.choice
    if raw[0] in "\"'" and raw[-1] == raw[0] and raw.count(raw[0]) == 2:
        return raw[1:-1]  # the whole list quoted: A,B as if unquoted
    out: list[str] = []
    piece: list[str] = []
    quoted = False
    quote = ""
    for ch in raw:
        if quote:
            if ch == quote:
                quote = ""
            else:
                piece.append(ch)
        elif ch in "\"'":
            quote, quoted = ch, True
        elif ch == ",":
            text = "".join(piece)
            out.append(text if quoted else text.strip())
            piece, quoted = [], False
        else:
            piece.append(ch)
    text = "".join(piece)
    out.append(text if quoted else text.strip())
    return out


def usage_errors(magic: str) -> Callable:
    """Turn our errors and argument errors into one-line UsageErrors naming the magic."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                # the keys to mask are read once for the command (a cell masks each text
                # it stores or shows: a .env look-up each); a key entered meanwhile is
                # still masked at once (see secrets.steady)
                with steady():
                    return fn(self, *args, **kwargs)
            except SubchatError as exc:
                msg = redact(str(exc))
                raise UsageError(msg if msg.startswith(magic) else f"{magic}: {msg}") from None
            except UsageError as exc:
                msg = str(exc)
                if not msg.startswith(magic):
                    msg = f"{magic}: {msg} (see {magic}? for the options)"
                raise UsageError(msg) from None

        return wrapper

    return deco


def in_kernel(shell: Any) -> bool:
    """True when output goes to a Jupyter kernel (displays), not a terminal (stdout)."""
    return getattr(shell, "kernel", None) is not None
