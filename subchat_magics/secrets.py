"""Keeping keys out of output, stores, logs and exception messages.

One rule, :func:`mask_keys`: every known key (the environment's and ``.env``'s
``*_API_KEY`` values, keys entered with ``%subchat key``, and any value given to
:func:`register_secret`, e.g. a plugin backend's declared key) is replaced by ``***``
wherever a run of at least :data:`PART` of its characters appears, in any casing (a key
written in upper case is still the key). A key cut in two (a
table cell cut at 60 characters, a value cut at 4,000) is therefore masked in each part
that is long enough to matter, and a part shorter than that is no key."""

from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from typing import Any, Iterator

KEY_VARIABLES = ("GROQ_API_KEY", "OPENAI_API_KEY", "OLLAMA_API_KEY")
#: the shortest run of a key's characters that counts as (part of) the key
PART = 8
MARK = "***"
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
# the 8-character parts of the keys last seen, rebuilt only when the keys change
_parts: tuple[frozenset[str], list[str], list[str]] = (frozenset(), [], [])


def register_secret(value: str | None) -> None:
    """Remember a secret so that :func:`redact` and :func:`mask_keys` mask it wherever
    it appears (whole, or any run of :data:`PART` of its characters)."""
    if value and len(value) >= 4:
        with _lock:
            _known.add(value)


def forget_secret(value: str | None) -> None:
    """Stop masking a secret given to :func:`register_secret` (keys from the environment,
    ``.env`` and ``%subchat key`` are read again each time and stay masked)."""
    with _lock:
        _known.discard(value)


def known_keys() -> set[str]:
    """Every key this process knows of now (read again each time: ``.env`` may change)."""
    from .settings import _secrets, dotenv_values_here

    vals = set(_known)
    vals.update(v for v in _secrets.values() if v and len(v) >= 4)
    env = dotenv_values_here()
    for name in key_variables():
        for v in (os.environ.get(name), env.get(name)):
            if v and len(v) >= 4:
                vals.add(v)
    return vals


def _lower(text: str) -> str:
    """``text`` in lower case, character for character (the same length, so a place found
    in it is the same place in ``text``; ``str.lower`` lengthens a few letters, e.g. 'İ')."""
    low = text.lower()
    if len(low) == len(text):
        return low
    return "".join(lc if len(lc := ch.lower()) == 1 else ch for ch in text)


def _key_parts(keys: frozenset[str]) -> tuple[list[str], list[str]]:
    """(whole keys shorter than PART, every distinct PART-character run of the others)."""
    global _parts
    cached = _parts
    if cached[0] == keys:
        return cached[1], cached[2]
    lowered = {_lower(k) for k in keys}
    short = sorted((k for k in lowered if len(k) < PART), key=len, reverse=True)
    grams = sorted({k[i:i + PART] for k in lowered if len(k) >= PART
                    for i in range(len(k) - PART + 1)})
    _parts = (keys, short, grams)
    return short, grams


#: the keys read once for a batch (see :func:`steady`), the keys registered then, and
#: where keys entered with ``%subchat key`` are kept
_steady: tuple[frozenset[str], frozenset[str], dict[str, str]] | None = None


@contextmanager
def steady() -> Iterator[None]:
    """Within the block, the keys from the environment and ``.env`` are read once, at its
    start, not again for every text masked (a batch masks each row's messages several
    times: a ``.env`` look-up each costs more than the row's other work). Keys given to
    :func:`register_secret` or ``%subchat key`` meanwhile are still masked at once."""
    global _steady
    if _steady is not None:  # (already inside one)
        yield
        return
    from .settings import _secrets

    _steady = (frozenset(known_keys()), frozenset(_known) | frozenset(_secrets.values()), _secrets)
    try:
        yield
    finally:
        _steady = None


def _keys_now() -> frozenset[str]:
    held = _steady
    if held is not None:
        entered = held[2]  # (%subchat key's keys: settings._secrets, one dict changed in place)
        if (not _known and not entered) or frozenset(_known) | frozenset(entered.values()) <= held[1]:
            return held[0]
    return frozenset(known_keys())


def mask_keys(text: str) -> tuple[str, int]:
    """``text`` with every known key, and every run of at least :data:`PART` characters
    of one, in any casing, replaced by ``***``; and how many places were masked. Cheap
    when no key is known or none appears (one substring search per key part)."""
    if not text:
        return text, 0
    keys = _keys_now()
    if not keys:
        return text, 0
    short, grams = _key_parts(keys)
    low = _lower(text)  # keys are matched in any casing
    spans: list[tuple[int, int]] = []
    for gram in grams:
        start = low.find(gram)
        while start != -1:
            spans.append((start, start + PART))
            start = low.find(gram, start + 1)
    for key in short:  # a key too short to cut: only whole
        start = low.find(key)
        while start != -1:
            spans.append((start, start + len(key)))
            start = low.find(key, start + len(key))
    if not spans:
        return text, 0
    spans.sort()
    merged: list[list[int]] = []
    for a, b in spans:  # overlapping or touching runs are one masked place
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    out, pos = [], 0
    for a, b in merged:
        out += [text[pos:a], MARK]
        pos = b
    out.append(text[pos:])
    return "".join(out), len(merged)


def mask(value: str | None) -> str:
    """``gsk_…abcd``-style hint that never shows more than the last 4 characters."""
    if not value:
        return "(not set)"
    return f"…{value[-4:]}" if len(value) >= 12 else "****"


def redact(text: str) -> str:
    """``text`` with every known key, and every part of one of :data:`PART` characters
    or more, replaced by ``***`` (:func:`mask_keys` without the count)."""
    return mask_keys(text)[0] if text else text


def redact_json(data: Any) -> tuple[str, Any]:
    """``data`` as JSON text with every known key masked (:func:`redact`), and the data
    read back from that text when a key was masked (else ``data`` itself): a key a model
    wrote into a tool call's arguments, or an error quoted in provenance, is stored and
    shown masked like any message."""
    text = json.dumps(data, sort_keys=True)
    safe = redact(text)
    return safe, (data if safe == text else json.loads(safe))
