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
        self._lock = threading.Lock()

    def add(self, listener: Listener) -> Callable[[], None]:
        """Subscribe ``listener``; returns the function that unsubscribes it."""
        with self._lock:
            self._items.append(listener)

        def remove() -> None:
            with self._lock:
                if listener in self._items:
                    self._items.remove(listener)

        return remove

    def send(self, event: str, data: dict[str, Any]) -> None:
        for listener in list(self._items):
            try:
                listener(event, data)
            except Exception:  # noqa: BLE001 - a broken view must not break a reply
                pass

    def __bool__(self) -> bool:
        return bool(self._items)
