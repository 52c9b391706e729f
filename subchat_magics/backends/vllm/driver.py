"""The engine driver: the one thread that calls the engine (``add_request``, ``step``,
``abort_request``), so that replies in flight from several threads (cells, the widget,
a fan-out) are batched by vLLM, and each consumer waits on its own queue of deltas.

Knows nothing of prompts or of the backend protocol; imports :mod:`.compat` (how a
token prompt enters the engine, what an output says) and the errors."""

from __future__ import annotations

import itertools
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ...errors import BackendError, BackendUnavailable
from .compat import Delta, deltas_of, engine_input, generated_counts
from .plan import first_line

POLL_S = 0.05  # how often a waiting consumer wakes, so that an interrupt lands promptly


MANY = object()  # (MANY, [(tag, Delta), ...]): a step's outputs for one batch sink


class BatchSink(queue.SimpleQueue):
    """A sink that takes a step's outputs in one item ``(MANY, [(tag, delta), ...])``:
    one wake-up of its reader a step, not one a finished row (each wake-up took the GIL
    from the engine's thread for a moment)."""


@dataclass
class _Request:
    rid: str
    sink: "queue.SimpleQueue[tuple[Any, Delta | BaseException]]"
    tag: Any
    samples: int = 1  # n: samples of the one prompt (--vote)


class Driver:
    """The thread that drives one ``LLMEngine``. Consumers :meth:`submit` requests and
    read ``(tag, Delta | exception)`` from their sink with :meth:`next_event`."""

    _ids = itertools.count(1)

    def __init__(self, llm_engine: Any):
        self._eng = llm_engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._requests: dict[str, _Request] = {}
        self._dead: BaseException | None = None
        self._stopped = threading.Event()
        self.requests_added = 0  # engine requests added so far (a vote of K is one)
        # request ids: one random part a driver, a count a request (unique in its engine;
        # a uuid4 a call read the OS's random source and handed the engine's thread the GIL)
        self._head = f"subchat-{uuid.uuid4().hex[:8]}"
        self._rids = itertools.count(1)
        self._thread = threading.Thread(target=self._drive, name=f"subchat-vllm-{next(self._ids)}",
                                        daemon=True)
        self._thread.start()

    # -- the driver thread (the only one that calls the engine) -----------------------------
    def _drive(self) -> None:
        eng = self._eng
        cmds = self._commands
        try:
            while True:
                busy = bool(self._requests) or eng.has_unfinished_requests()
                try:
                    cmd = cmds.get() if not busy else cmds.get_nowait()
                except queue.Empty:
                    cmd = None
                while cmd is not None:
                    if cmd[0] == "stop":
                        self._abort_all(eng, BackendUnavailable("the vLLM model was unloaded"))
                        return
                    self._handle(eng, cmd)
                    try:
                        cmd = cmds.get_nowait()
                    except queue.Empty:
                        cmd = None
                if not eng.has_unfinished_requests():
                    if self._requests:  # the engine let go of them without a final output
                        self._fail(BackendError("the vLLM engine dropped the request", reason="model"))
                    continue
                held: dict[int, tuple[BatchSink, list]] = {}
                for out in eng.step():
                    req = self._requests.get(out.request_id)
                    if req is None:
                        continue  # aborted meanwhile
                    if out.finished:
                        del self._requests[out.request_id]
                    sink = req.sink
                    if sink.__class__ is BatchSink:
                        box = held.get(id(sink))
                        if box is None:
                            box = held[id(sink)] = (sink, [])
                        box[1].extend((req.tag, delta) for delta in deltas_of(out, req.samples))
                        continue
                    for delta in deltas_of(out, req.samples):
                        sink.put((req.tag, delta))
                for sink, items in held.values():
                    sink.put((MANY, items))
        except Exception as exc:  # noqa: BLE001 - the engine failed: every consumer is told
            self._dead = exc
            self._abort_all(eng, BackendError(
                f"the vLLM engine failed ({type(exc).__name__}: {first_line(exc)}); "
                "reload the model with %load_vllm", reason="model"))
        finally:
            self._eng = None  # the driver holds no engine once stopped
            self._stopped.set()

    def _handle(self, eng: Any, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            for rid, prompt_ids, params, sink, tag in cmd[1]:
                self._requests[rid] = _Request(rid, sink, tag, int(getattr(params, "n", 1) or 1))
                try:
                    eng.add_request(rid, engine_input(eng, prompt_ids), params)
                    self.requests_added += 1
                except Exception as exc:  # noqa: BLE001 - the request's consumer gets it
                    self._requests.pop(rid, None)
                    sink.put((tag, exc))
        elif kind == "abort":
            rids, done = cmd[1], cmd[2]
            try:
                counts = cmd[3] if len(cmd) > 3 else None
                if counts is not None:  # what each cut request generated (sent or not yet)
                    counts.update(generated_counts(eng, list(rids)))
                for rid in rids:
                    self._requests.pop(rid, None)
                eng.abort_request(list(rids))
            finally:
                done.set()
        elif kind == "call":
            fn, box, done = cmd[1], cmd[2], cmd[3]
            try:
                box.append(("ok", fn(eng)))
            except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                box.append(("error", exc))
            finally:
                done.set()

    def _fail(self, exc: BaseException) -> None:
        reqs, self._requests = list(self._requests.values()), {}
        for req in reqs:
            req.sink.put((req.tag, exc))

    def _abort_all(self, eng: Any, exc: BaseException) -> None:
        rids = list(self._requests)
        self._fail(exc)
        if rids:
            try:
                eng.abort_request(rids)
            except Exception:  # noqa: BLE001 - the engine is going or gone
                pass

    # -- what consumers call ----------------------------------------------------------------
    @property
    def failed(self) -> str | None:
        """Why the engine failed (it must be loaded again), or None."""
        return None if self._dead is None else f"{type(self._dead).__name__}: {first_line(self._dead)}"

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def check(self) -> None:
        """Raise if no request can be served: the engine failed or the driver stopped."""
        if self._dead is not None:
            raise BackendError(
                f"the vLLM engine failed ({type(self._dead).__name__}: {first_line(self._dead)}); "
                "reload the model with %load_vllm", reason="model")
        if self._stopped.is_set():
            raise BackendUnavailable("the vLLM model was unloaded; load one with %load_vllm MODEL_PATH")

    def submit(self, items: Sequence[tuple[list[int], Any, Any]], sink: queue.SimpleQueue) -> list[str]:
        """Add requests ``(prompt_ids, sampling_params, tag)`` together (so the engine
        batches them); their outputs go to ``sink`` as ``(tag, Delta | exception)``."""
        self.check()
        head, count = self._head, self._rids
        batch = [(f"{head}-{next(count)}", ids, params, sink, tag) for ids, params, tag in items]
        self._commands.put(("add", batch))
        return [b[0] for b in batch]

    def abort(self, rids: Sequence[str], timeout: float = 30.0) -> dict[str, int]:
        """Abort requests and wait until the engine has let go of them. Returns how many
        tokens each had generated when it was cut (where this vLLM says)."""
        counts: dict[str, int] = {}
        if not rids or self._stopped.is_set():
            return counts
        done = threading.Event()
        self._commands.put(("abort", list(rids), done, counts))
        deadline = time.monotonic() + timeout
        while not done.wait(POLL_S):  # short waits: a second Ctrl-C still lands
            if self._stopped.is_set() or time.monotonic() > deadline:
                return {}
        return counts

    def call(self, fn: Callable[[Any], Any], timeout: float = 60.0) -> Any:
        """Run ``fn(llm_engine)`` on the driver thread (between steps) and return its result."""
        self.check()
        box: list = []
        done = threading.Event()
        self._commands.put(("call", fn, box, done))
        deadline = time.monotonic() + timeout
        while not done.wait(POLL_S):
            if self._stopped.is_set() or time.monotonic() > deadline:
                raise BackendError("the vLLM driver did not answer", reason="timeout")
        status, value = box[0]
        if status == "error":
            raise value
        return value

    def next_event(self, sink: queue.SimpleQueue) -> tuple[Any, Delta | BaseException]:
        """The next ``(tag, event)`` from ``sink``, waking often so an interrupt lands."""
        while True:
            try:
                return sink.get(timeout=POLL_S)
            except queue.Empty:
                if self._stopped.is_set():
                    try:
                        return sink.get_nowait()
                    except queue.Empty:
                        self.check()
                        raise BackendUnavailable("the vLLM model was unloaded mid-reply") from None

    def unfinished_requests(self) -> int:
        """How many requests the engine still holds (0 once every reply ended or was aborted)."""
        return int(self.call(lambda eng: eng.get_num_unfinished_requests()))

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread: requests in flight end with an error. The engine is left as it is."""
        if not self._stopped.is_set():
            self._commands.put(("stop",))
            self._thread.join(timeout)
