"""Listeners of a source of events (the tree, the core): subscribe, unsubscribe, send to
each. A listener that raises is skipped, so a broken view never breaks a reply. A helper
module: imports nothing of the package."""

from __future__ import annotations

import threading
from typing import Any, Callable

Listener = Callable[[str, dict[str, Any]], None]


class Listeners:
    """The listeners of one source, safe to change from any thread while it sends."""

    def __init__(self) -> None:
        self._items: list[Listener] = []
        self._relays: dict[int, "Listeners"] = {}  # id(listener) -> the set it passes events to
        self._lock = threading.Lock()

    def add(self, listener: Listener, *, relays: "Listeners | None" = None) -> Callable[[], None]:
        """Subscribe ``listener``; returns the function that unsubscribes it. ``relays``:
        the listener only passes events on to those listeners (the core relaying the
        tree's events), so it counts as listening only while they are there."""
        with self._lock:
            self._items.append(listener)
            if relays is not None:
                self._relays[id(listener)] = relays

        def remove() -> None:
            with self._lock:
                if listener in self._items:
                    self._items.remove(listener)
                    if listener not in self._items:
                        self._relays.pop(id(listener), None)

        return remove

    def send(self, event: str, data: dict[str, Any]) -> None:
        for listener in list(self._items):
            try:
                listener(event, data)
            except Exception:  # noqa: BLE001 - a broken view must not break a reply
                pass

    def wanted(self) -> bool:
        """Whether someone listens for its own sake: a relay counts only while what it
        relays to is listened to. (A source builds its per-chunk events only then.)"""
        relays = self._relays
        for listener in self._items:
            relay = relays.get(id(listener))
            if relay is None or relay.wanted():
                return True
        return False

    def __bool__(self) -> bool:
        return bool(self._items)
