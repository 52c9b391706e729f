"""Requests in the engine — one reply, a fan-out or a batch's rows, the one place the
per-request state of vLLM is kept: each is prepared and handed to the engine driver the
moment it is submitted, so the engine batches every request in flight continuously
(a new one joins the running batch at the next step, as soon as another ends), and
requests that share a prompt prefix reuse it from the prefix cache. With ``deltas``
(one reply, a fan-out) the text streams a delta a step; without (a batch's rows) a reply
comes as one output when it ends (nobody reads a batch's rows token by token, and per-step
outputs for hundreds of rows would cost the engine's thread and ours); a row cut by Ctrl-C
keeps no partial text and is sent again by the next run.

Closing the pool aborts every request the engine still holds at once, and keeps the
counts of each cut reply (:meth:`EnginePool.cut_finish`).

Imports the pool protocol, :mod:`.slot`, :mod:`.driver` (its batch sink) and :mod:`.requests`;
never vLLM itself."""

from __future__ import annotations

import queue
from collections import deque
from typing import Sequence

from ...errors import SubchatError
from ..base import BatchEvent, Finish, GenerationOptions, Message
from ..pool import END, Pool
from . import slot
from .compat import final_only
from .driver import MANY, BatchSink
from .requests import Reply, as_error


class EnginePool(Pool):
    """Requests in the loaded engine; ``size`` is how many the batch keeps in flight."""

    def __init__(self, engine: slot.Engine, size: int, deltas: bool = False):
        self.engine = engine
        self.size = max(1, int(size))
        self.deltas = deltas  # a delta a step (a reply read as it comes), else one output
        self.whole = not deltas
        self._sink: queue.SimpleQueue = BatchSink()
        self._inbox: deque = deque()  # (tag, event) of a step's outputs not handled yet
        self._replies: dict[int, Reply] = {}
        self._cut: dict[int, Finish] = {}
        self._ready: list[BatchEvent] = []  # events to hand out before the engine's
        self._params: dict = {}  # SamplingParams made once for the rows sharing options

    def submit(self, index: int, messages: Sequence[Message], options: GenerationOptions) -> None:
        self.submit_many([(index, messages, options)])

    def submit_many(self, requests: Sequence[tuple[int, Sequence[Message], GenerationOptions]]
                    ) -> None:
        """Prepare every request, then hand them to the driver in one command: the engine
        adds them all before its next step (no step runs with only the first few)."""
        engine = self.engine
        items = []
        with engine.encoded(requests):  # (the rows' own parts: one call of the tokenizer)
            for index, messages, options in requests:
                try:
                    # a chat that cannot fit raises
                    reply, params = engine.prepare(messages, options, params_memo=self._params)
                except SubchatError as exc:
                    self._ready += [(index, exc), (index, END)]
                    continue
                self._replies[index] = reply
                items.append((reply.prompt.token_ids, params if self.deltas else final_only(params),
                              index))
        if items:
            for (_, _, index), rid in zip(items, engine.submit(items, self._sink)):
                self._replies[index].rid, self._replies[index].in_engine = rid, True

    def submit_samples(self, indices: Sequence[int], messages: Sequence[Message],
                       options: Sequence[GenerationOptions]) -> None:
        """K samples of one message as ONE engine request with ``n=K``: the prompt is
        computed once and the engine samples K continuations (sample ``i`` with the seed
        ``seed + i``, as ``options[i]`` says). Each sample keeps its own reply."""
        indices = list(indices)
        if len(indices) == 1:
            self.submit(indices[0], messages, options[0])
            return
        engine = self.engine
        try:
            first, params = engine.prepare(messages, options[0], samples=len(indices))
        except SubchatError as exc:
            for index in indices:
                self._ready += [(index, exc), (index, END)]
            return
        replies = [first] + [Reply(first.prompt, o, first.thinking) for o in options[1:]]
        for index, reply in zip(indices, replies):
            self._replies[index] = reply
        tag = tuple(indices)
        (rid,) = engine.submit([(first.prompt.token_ids,
                                 params if self.deltas else final_only(params), tag)], self._sink)
        for reply in replies:
            reply.rid, reply.in_engine = rid, True

    def next_event(self, timeout: float = 0.05) -> BatchEvent | None:
        if self._ready:
            return self._ready.pop(0)
        if not self._inbox:
            try:
                tag, ev = self._sink.get(timeout=timeout)
            except queue.Empty:
                self.engine.driver.check()  # an engine that failed or was unloaded says so
                return None
            if tag is not MANY:
                self._inbox.append((tag, ev))
            else:
                self._inbox.extend(ev)
        tag, ev = self._inbox.popleft()
        if isinstance(tag, tuple):  # a request of several samples
            if isinstance(ev, BaseException):
                live = [i for i in tag if i in self._replies]
                for index in live:
                    self._replies[index].in_engine = False
                    self._cut[index] = self._replies[index].finish(self.engine.label, "error")
                    self._end(index)
                    self._ready.insert(0, (index, as_error(ev)))
                return self._ready.pop(0) if self._ready else None
            index = tag[ev.index]
            if index not in self._replies:
                return None
        else:
            index = tag
        reply = self._replies[index]
        if isinstance(ev, BaseException):
            reply.in_engine = False
            self._cut[index] = reply.finish(self.engine.label, "error")
            self._end(index)
            return index, as_error(ev)
        reply.add(ev)
        if ev.finished:
            reply.finished, reply.in_engine = True, False
            self._end(index, reply.finish(self.engine.label, ev.finish_reason))
            if not ev.text:
                return self._ready.pop(0)
        return index, ev.text  # (a final output holds the whole reply: its Finish follows)

    def _end(self, index: int, finish: Finish | None = None) -> None:
        reply = self._replies.pop(index)
        self.engine.remember(reply)
        if finish is not None:
            self._ready.append((index, finish))
        self._ready.append((index, END))

    def cut_finish(self, index: int) -> Finish | None:
        return self._cut.get(index)

    def close(self) -> None:
        held = list(dict.fromkeys(r.rid for r in self._replies.values() if r.in_engine))
        counts = self.engine.abort(held) or {}  # all at once; returns when the engine let go
        for index, ev in self._ready:  # rows that ended, their end not handed out yet: a
            if isinstance(ev, Finish):  # cut row keeps what the engine said it cost
                self._cut.setdefault(index, ev)
        while True:  # outputs that arrived but were not read (rows that ended meanwhile)
            if not self._inbox:
                try:
                    tag, ev = self._sink.get_nowait()
                except queue.Empty:
                    break
                self._inbox.extend(ev if tag is MANY else [(tag, ev)])
                continue
            tag, ev = self._inbox.popleft()
            reply = self._replies.get(tag) if not isinstance(tag, tuple) else None
            if reply is not None and not isinstance(ev, BaseException):
                reply.ids.extend(ev.token_ids)
        for index, reply in list(self._replies.items()):
            if not reply.finished:
                # a row sent for one output at its end has streamed no token: the engine's
                # count of what it generated is the cut reply's
                reply.generated = max(len(reply.ids), counts.get(reply.rid, 0))
                self._cut[index] = reply.finish(self.engine.label, "interrupted")
                self.engine.remember(reply)
        self._replies.clear()

