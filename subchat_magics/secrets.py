"""Keeping keys out of output, stores, logs and exception messages."""

from __future__ import annotations

import os
import threading

KEY_VARIABLES = ("GROQ_API_KEY", "OPENAI_API_KEY", "OLLAMA_API_KEY")
_known: set[str] = set()
_lock = threading.Lock()
_key_variables: dict[str, None] = dict.fromkeys(KEY_VARIABLES)  # + plugins' (key_env)


def declare_key_variable(name: str) -> None:
    """Mask the value of environment variable ``name`` too (a backend's declared key,
    ``Backend.key_env``: the registry declares each backend's as it loads it)."""
    if name:
        with _lock:
            _key_variables[name] = None


def key_variables() -> list[str]:
    """Every variable whose value is a key (built in and declared)."""
    with _lock:
        return list(_key_variables)


def register_secret(value: str | None) -> None:
    """Remember a secret so that :func:`redact` masks it wherever it appears."""
    if value and len(value) >= 4:
        with _lock:
            _known.add(value)


def _candidates() -> set[str]:
    from .settings import dotenv_values_here

    vals = set(_known)
    env = dotenv_values_here()
    for name in key_variables():
        for v in (os.environ.get(name), env.get(name)):
            if v and len(v) >= 4:
                vals.add(v)
    return vals


def mask(value: str | None) -> str:
    """``gsk_…abcd``-style hint that never shows more than the last 4 characters."""
    if not value:
        return "(not set)"
    return f"…{value[-4:]}" if len(value) >= 12 else "****"


def redact(text: str) -> str:
    """``text`` with every known secret replaced by ``***``."""
    if not text:
        return text
    for secret in sorted(_candidates(), key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, "***")
    return text
