"""Where settings come from: the process environment first, then a ``.env`` file in the
working directory (as in local development with python-dotenv). Values are read when
needed, never copied into ``os.environ``, so a key in ``.env`` stays out of child
processes and ``%env`` output."""

from __future__ import annotations

import os
from pathlib import Path

_cache: dict[str, tuple[float, dict[str, str | None]]] = {}
# keys entered with %subchat key: this process only, never in os.environ (so %env,
# child processes and saved notebooks never see them)
_secrets: dict[str, str] = {}


def set_secret(name: str, value: str) -> None:
    _secrets[name] = value


def forget_secrets() -> None:
    """Forget every key entered with ``%subchat key`` in this process (the environment
    and ``.env`` are read again from then on)."""
    _secrets.clear()


def dotenv_values_here() -> dict[str, str | None]:
    # (os, not pathlib: every stored message asks, a few times a batch row)
    try:
        key = os.path.join(os.getcwd(), ".env")
        mtime = os.stat(key).st_mtime
    except OSError:
        return {}
    hit = _cache.get(key)
    if hit and hit[0] == mtime:
        return hit[1]
    path = Path(key)
    from dotenv import dotenv_values

    values = dict(dotenv_values(path))
    _cache[key] = (mtime, values)
    return values


def getenv(name: str, default: str | None = None) -> str | None:
    """``os.environ[name]``, else the ``.env`` file's value, else ``default``.
    Empty values count as unset. Keys entered with ``%subchat key`` come first."""
    if name in _secrets:
        return _secrets[name]
    value = os.environ.get(name)
    if value:
        return value
    value = dotenv_values_here().get(name)
    if value:
        return value
    return default


def where(name: str) -> str | None:
    """Where a setting comes from: ``"%subchat key"``, ``"environment"``, ``".env"`` or ``None``."""
    if name in _secrets:
        return "%subchat key"
    if os.environ.get(name):
        return "environment"
    if dotenv_values_here().get(name):
        return ".env"
    return None
