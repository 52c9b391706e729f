"""The tree view's frame scheduler: a queue of the core's events, and a thread that draws
at most once an interval while there is something to draw, within a budget of about one
widget message an interval while a reply streams.

Standard library only (no ipywidgets, nothing of the core): it knows when to draw, never
what.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable, Iterator

IDLE_EXIT = 5.0  # seconds the thread waits for events before it ends (the next one starts again)
DEBT_MAX = 5  # streaming updates skipped at most after a busy frame (one a reply starts in)

Event = tuple[str, dict[str, Any]]


class RenderLoop:
    """Queue events from any thread (:meth:`post`); ``draw()`` is called on the loop's
    thread at most every ``interval`` seconds while events wait or ``active()`` says a
    reply is on show, and an interval after the first event, so that what a whole fast
    reply changes is drawn once. With ``autodraw=False`` no thread runs: whoever calls
    :meth:`drain` (``TreeView.sync``) draws.

    The budget: a frame that sent several widget messages (:meth:`count`) makes the next
    streaming updates wait (:meth:`update_due`), so a reply costs ~one message an
    interval on average whatever else is drawn."""

    def __init__(self, draw: Callable[[], None], *, interval: float, autodraw: bool = True,
                 active: Callable[[], bool] = lambda: False,
                 on_error: Callable[[Exception], None] = lambda exc: None,
                 name: str = "subchat-view render"):
        self.interval = interval
        self.autodraw = autodraw
        self._draw = draw
        self._active = active
        self._on_error = on_error
        self._name = name
        self._events: deque[Event] = deque()
        self._wake = threading.Condition()  # guards _events and the thread's life
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._last_frame = float("-inf")
        self._sent = 0  # widget messages in this frame (roughly: one per change drawn)
        self._debt = 0  # streaming updates to skip, to pay for frames that sent more than one

    # -- events ------------------------------------------------------------------------------
    def post(self, event: Event | None = None) -> None:
        """Queue ``event`` (if any) and wake the thread, starting one if none runs."""
        with self._wake:
            if self._stopping:
                return
            if event is not None:
                self._events.append(event)
            if not self.autodraw:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name=self._name)
                self._thread.start()
            else:
                self._wake.notify()

    def drain(self) -> Iterator[Event]:
        """The queued events, oldest first, each taken off the queue as it is yielded."""
        while True:
            with self._wake:
                if not self._events:
                    return
                event = self._events.popleft()
            yield event

    # -- the message budget --------------------------------------------------------------------
    def count(self, messages: int = 1) -> None:
        """Note widget messages sent in this frame."""
        self._sent += messages

    def update_due(self) -> bool:
        """Whether a streaming update fits this frame (False: an earlier frame overspent)."""
        if self._debt:
            self._debt -= 1
            return False
        return True

    def end_frame(self, streaming: bool) -> None:
        """Close the frame's account: while a reply is on show, messages beyond one a
        frame become debt."""
        self._debt = min(self._debt + max(0, self._sent - 1), DEBT_MAX) if streaming else 0
        self._sent = 0

    # -- the thread ----------------------------------------------------------------------------
    def stop(self, timeout: float) -> None:
        """Stop the thread (no more events are queued) and wait for it."""
        with self._wake:
            self._stopping = True
            thread = self._thread
            self._wake.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._wake:
                idle_since = time.monotonic()
                while not self._stopping and not self._events and not self._active():
                    left = IDLE_EXIT - (time.monotonic() - idle_since)
                    if left <= 0:
                        self._thread = None
                        return
                    self._wake.wait(left)
                if self._stopping:
                    self._thread = None
                    return
            now = time.monotonic()
            time.sleep(max(self._last_frame, now) + self.interval - now)
            self._last_frame = time.monotonic()
            try:
                self._draw()
            except Exception as exc:  # noqa: BLE001 - a dead render thread is a frozen view
                self._on_error(exc)
