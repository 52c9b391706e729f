"""What both magics classes share: parsing a magic's line shell-style, turning our errors
into one-line ``UsageError``s that name the magic, and knowing whether output goes to a
kernel. IPython layer; imports only the error hierarchy and the key redactor."""

from __future__ import annotations

import functools
import shlex
from typing import Any, Callable

from IPython.core.error import UsageError

from .errors import SubchatError
from .secrets import redact


def parse_line(magic_func: Callable, line: str) -> Any:
    """Parse a magic's line shell-style (quotes removed, unlike ``parse_argstring``)."""
    try:
        argv = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"cannot parse the options ({exc}); close your quotes") from None
    return magic_func.parser.parse_args(argv)


def usage_errors(magic: str) -> Callable:
    """Turn our errors and argument errors into one-line UsageErrors naming the magic."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
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
