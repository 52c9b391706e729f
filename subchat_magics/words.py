"""Counts in messages and summaries: ``1 item``, ``2 items`` (never ``1 items`` nor
``1 item(s)``). A helper anyone may import."""

from __future__ import annotations

_IRREGULAR = {"reply": "replies", "copy": "copies", "entry": "entries", "summary": "summaries"}


def plural(noun: str) -> str:
    """``noun``'s plural (regular English, and the few nouns the messages use that are not)."""
    if noun in _IRREGULAR:
        return _IRREGULAR[noun]
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    return noun + "s"


def counted(n: int, noun: str, many: str | None = None, group: bool = False) -> str:
    """``n`` and ``noun`` agreeing: ``counted(1, "row")`` is ``1 row``, ``counted(3, "row")``
    ``3 rows`` (``many``: the plural, where it is not regular; ``group``: ``1,000``)."""
    number = f"{n:,}" if group else f"{n}"
    return f"{number} {noun if n == 1 else (many or plural(noun))}"
