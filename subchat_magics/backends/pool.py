"""A pool of requests in flight: the one way several requests stream together (a fan-out,
a batch's rows, :meth:`Backend.stream_batch`).

A pool takes requests while others run, so a batch of 100,000 items keeps only ``size`` in
flight (flat memory, a server never flooded) and the next item starts the moment one ends.
Events are ``(index, item)`` (a delta, the request's
:class:`~subchat_magics.backends.base.Finish`, or the exception that ended it), then
``(index, END)`` once the request is over, whichever way it ended.

:func:`open_pool` asks the backend (:meth:`Backend.open_pool`): vLLM hands every request
to its engine, which batches them continuously; the others run each request's
:meth:`~subchat_magics.backends.base.Backend.stream` on one of ``size`` threads
(:class:`ThreadPool`: remote servers, ``size`` requests in flight).

Below the backend protocol (which imports it): nothing here imports it at run time.
"""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from .base import Backend, BatchEvent, Finish, GenerationOptions, Message

END = object()  # (index, END): request ``index`` is over


class Pool:
    """Requests streamed together, ``size`` at most in flight (the caller keeps count)."""

    size: int
    #: its replies come back whole, not token by token (an engine's batch rows): no
    #: first-token time can be read from when they arrive
    whole: bool = False

    def comes_whole(self, options: "GenerationOptions") -> bool:
        """Whether a request with ``options`` comes back whole (see :attr:`whole`)."""
        return self.whole

    def submit(self, index: int, messages: Sequence["Message"], options: "GenerationOptions") -> None:
        raise NotImplementedError

    def submit_many(self, requests: Sequence[tuple[int, Sequence["Message"], "GenerationOptions"]]
                    ) -> None:
        """Several requests at once (an engine adds them before its next step, so they
        are batched from the first one)."""
        for index, messages, options in requests:
            self.submit(index, messages, options)

    def submit_samples(self, indices: Sequence[int], messages: Sequence["Message"],
                       options: Sequence["GenerationOptions"]) -> None:
        """K samples of one message (``--vote K``), ``options[i]`` for sample ``i`` (the
        same but for the seed). Here K requests in flight; an engine overrides it with
        one request of K samples (vLLM's ``n``: the prompt computed once)."""
        self.submit_many([(i, messages, o) for i, o in zip(indices, options)])

    def next_event(self, timeout: float = 0.05) -> "BatchEvent | None":
        """The next ``(index, item)``, or None after ``timeout`` seconds without one."""
        raise NotImplementedError

    def cut_finish(self, index: int) -> "Finish | None":
        """What a request cut before its Finish cost, where the backend can say."""
        return None

    def close(self) -> None:
        """Stop every request in flight at once (abort them in an engine, close streams)."""

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the pool's own threads to end (after close)."""


class ThreadPool(Pool):
    """Each request's ``backend.stream`` on one of ``size`` threads (started as needed)."""

    def __init__(self, backend: "Backend", size: int):
        self.backend = backend
        self.size = max(1, int(size))
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._cut: dict[int, "Finish"] = {}

    def submit(self, index: int, messages: Sequence["Message"], options: "GenerationOptions") -> None:
        with self._lock:
            start = self._idle == 0 and len(self._threads) < self.size
            if not start:
                self._idle -= 1
        if start:
            t = threading.Thread(target=self._work_loop, daemon=True,
                                 name=f"subchat-pool-{len(self._threads)}")
            self._threads.append(t)
            t.start()
        self._work.put((index, messages, options))

    def _work_loop(self) -> None:
        while not self._stop.is_set():
            job = self._work.get()
            if job is None:
                return
            index, messages, options = job
            gen = None
            try:
                gen = self.backend.stream(messages, options)
                for item in gen:
                    if self._stop.is_set():
                        break
                    self._events.put((index, item))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                self._events.put((index, exc))
            finally:
                if gen is not None:
                    gen.close()
                    cut = getattr(gen, "cut", None)  # a Stream keeps a cut reply's counts
                    if isinstance(cut, dict) and 0 in cut:
                        self._cut[index] = cut[0]
                self._events.put((index, END))
            with self._lock:
                self._idle += 1

    def next_event(self, timeout: float = 0.05) -> "BatchEvent | None":
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def cut_finish(self, index: int) -> "Finish | None":
        return self._cut.get(index)

    def close(self) -> None:
        """Every thread stops at its stream's next chunk (a blocked read ends with the
        server's next token or its timeout); the caller does not wait for them."""
        self._stop.set()
        for _ in self._threads:
            self._work.put(None)

    def join(self, timeout: float) -> None:
        for t in self._threads:
            t.join(timeout)


def open_pool(backend: "Backend", size: int, deltas: bool = True) -> Pool:
    """The pool ``backend`` streams several requests through (``size`` in flight);
    ``deltas=False``: a request may come back whole (a batch's rows)."""
    return backend.open_pool(size, deltas)
