"""One exchange: a user message sent into a chat and the reply streamed back.

``Turn`` is an iterator of text deltas. The user message and the reply are committed to
the store; a reply that is cut (interrupt, error, closed early) is kept with what
arrived and marked. Under ``auto`` a backend that fails before its first token is
passed over for the next one, and the reply's provenance says so."""

from __future__ import annotations

import threading
import time
from itertools import chain
from time import perf_counter
from typing import TYPE_CHECKING, Any, Iterator

from .backends.base import Backend, Finish, GenerationOptions, cut_finish
from .backends.registry import Selection, registry
from .errors import BackendError, InvalidInput, SubchatError
from .secrets import redact
from .structured import InvalidOutput

if TYPE_CHECKING:
    from .tree import Chat, ChatTree, Message


SAVE_EVERY_S = 2.0  # while streaming, the partial reply is written this often


def select(backend: "str | Backend | Selection | None") -> Selection:
    if isinstance(backend, Selection):
        return backend
    if isinstance(backend, Backend):
        return Selection(backend.id, [backend])
    return registry().select(backend or "auto")


class Turn:
    """Iterate to stream the reply's deltas; afterwards ``reply`` is the stored
    :class:`~subchat_magics.tree.Message` and ``text`` its content.

    ``backend`` is a backend id (``"auto"`` by default), a :class:`Backend`, or a
    prepared :class:`Selection`. Other keyword arguments are generation options
    (``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``, ``model``, ``think``)."""

    def __init__(self, tree: "ChatTree", chat: "Chat", text: str, *,
                 backend: "str | Backend | Selection | None" = None,
                 options: GenerationOptions | None = None, default_system: str | None = None,
                 follow_up: bool = False, **overrides: Any):
        # follow_up: no new user message; the reply answers what the chat ends with (a
        # tool loop's next round, after the tool results)
        if not follow_up and (not isinstance(text, str) or not text.strip()):
            raise InvalidInput("the message is empty; write the prompt in the cell body")
        self.tree = tree
        self.chat = chat
        self.prompt = text
        self.follow_up = follow_up
        self.options = (options or GenerationOptions()).replace(**overrides)
        self.selection = select(backend)
        self.messages = tree.context(chat, None if follow_up else text)
        if default_system and self.messages[0]["role"] != "system":
            self.messages.insert(0, {"role": "system", "content": default_system})
        self.parts: list[str] = []
        self.notes: list[str] = []
        self.provenance_extra: dict[str, Any] = {}  # recorded with the reply (system_from...)
        self.reply: "Message | None" = None
        self.user_message: "Message | None" = None
        self.error: BaseException | None = None
        self.backend: Backend | None = None
        self.finish: Finish | None = None
        #: the parsed, validated reply when ``options.constraint`` is set (None otherwise,
        #: and for a reply that is cut or does not satisfy it)
        self.value: Any = None
        self._cancel = threading.Event()
        self._started = False

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def reply_id(self) -> int | None:
        """The store id of this turn's reply row (it exists from the turn's start)."""
        row = getattr(self, "_reply_row", None)
        return row.id if row is not None else None

    @property
    def done(self) -> bool:
        return self.reply is not None

    def cancel(self) -> None:
        """Ask the streaming thread to stop at the next delta (the widget's Stop)."""
        self._cancel.set()

    def run(self) -> "Message":
        """Stream to the end without looking at the deltas."""
        for _ in self:
            pass
        assert self.reply is not None
        return self.reply

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise SubchatError("a turn can be iterated only once")
        self._started = True
        return self._stream()

    def _open(self) -> tuple[Iterator, Any, float]:
        """Start the first candidate backend that yields something (under ``auto``)."""
        candidates = list(self.selection.candidates)
        last_exc: BaseException | None = None
        for i, backend in enumerate(candidates):
            self.backend = backend
            t0 = time.perf_counter()
            gen = backend.stream(self.messages, self.options)
            try:
                first = next(gen)
            except StopIteration:
                return iter(()), None, t0
            except BackendError as exc:
                gen.close()
                last_exc = exc
                if self.selection.explicit or i == len(candidates) - 1:
                    raise
                nxt = candidates[i + 1].id
                self.notes.append(f"{backend.id} failed before its first token ({redact(str(exc))}); used {nxt}")
                continue
            return gen, first, t0
        raise last_exc or BackendError("no backend is available")

    def _begin(self) -> None:
        backend_id = self.backend.id if self.backend else None
        if self.follow_up:
            self._reply_row = self.tree.begin_reply(self.chat, backend_id)
        else:
            self.user_message, self._reply_row = self.tree.begin_turn(
                self.chat, self.prompt, backend_id)
        self.tree.emit("reply-start", id=self.chat.id, path=self.chat.path, turn=self)
        self._t0 = time.perf_counter()
        self._ttft: float | None = None
        self._saved_at = self._t0

    def _feed(self, item: "str | Finish") -> str | None:
        """Take one item of the backend's stream; returns the delta to show, if any.
        Runs once per chunk, so it does the least it can: the remote benchmark holds a
        turn to 1.05x the raw client's time."""
        if item.__class__ is not str and isinstance(item, Finish):
            self.finish = item
            self.notes.extend(item.extra.get("notes", ()))
            return None
        if not item:
            return None
        now = perf_counter()
        if self._ttft is None:
            self._ttft = now - self._t0
        self.parts.append(item)
        tree = self.tree
        if tree.has_listeners:  # build the event only for someone listening (an open view)
            tree.emit("reply-delta", id=self.chat.id, path=self.chat.path, turn=self, delta=item)
        if now - self._saved_at >= SAVE_EVERY_S:  # a killed kernel keeps most of the reply
            self._saved_at = now
            tree.store.update_reply(self._reply_row.id, self.text, "interrupted")
        return item

    def _fail(self, exc: BaseException) -> tuple[str, str, BaseException]:
        """Status, finish reason and the exception to raise for ``exc``."""
        self.error = exc
        if isinstance(exc, (KeyboardInterrupt, GeneratorExit)):
            return "interrupted", "interrupted", exc
        if isinstance(exc, BackendError):
            return "error", f"error: {exc.reason}", BackendError(
                redact(str(exc)), reason=exc.reason, retry_after=exc.retry_after)
        if isinstance(exc, SubchatError):
            return "error", f"error: {type(exc).__name__}", exc
        name = self.backend.id if self.backend else "backend"
        return "error", f"error: {type(exc).__name__}", BackendError(
            redact(f"{name} failed: {type(exc).__name__}: {exc}"), reason="backend")

    def _end(self, status: str = "complete", finish_reason: str | None = None) -> None:
        if finish_reason is None:
            finish_reason = (self.finish.reason if self.finish else None) or "stop"
        if (status == "complete" and self.options.constraint is not None and self.reply is None
                and not (self.finish and self.finish.tool_calls)):  # binds the answer only
            status, finish_reason = self._validate(finish_reason)
        self._store(status, finish_reason, self._ttft, time.perf_counter() - self._t0)

    def _enforced(self) -> bool:
        try:
            return self.backend is not None and self.backend.cannot_enforce(self.options) is None
        except SubchatError:
            return False

    def _validate(self, finish_reason: str) -> tuple[str, str]:
        """Parse the finished reply against the constraint: its value, or the reply kept
        as text and marked ``error: invalid output (why)``."""
        try:
            self.value = self.options.constraint.parse(self.text)  # type: ignore[union-attr]
        except InvalidOutput as exc:
            why = str(exc) + ("; it stopped at max tokens" if finish_reason == "length" else "")
            self.error = InvalidOutput(f"invalid output ({why})")
            return "error", f"error: invalid output ({why})"
        return "complete", finish_reason

    def _stream(self) -> Iterator[str]:
        self._begin()
        gen = None
        status, reason = "complete", None
        try:
            gen, first, self._t0 = self._open()
            if first is not None:
                feed, cancelled = self._feed, self._cancel.is_set
                for item in chain((first,), gen):
                    delta = feed(item)
                    if delta:
                        yield delta
                    if cancelled():
                        raise KeyboardInterrupt
        except BaseException as exc:
            status, reason, to_raise = self._fail(exc)
            if to_raise is exc:
                raise
            raise to_raise from None
        finally:
            if gen is not None:
                gen.close()
                # a cut reply keeps what the part that ran cost, where the backend knows it
                self.finish = self.finish or cut_finish(gen)
            self._end(status, reason)

    def _store(self, status: str, finish_reason: str, ttft: float | None, duration: float) -> None:
        if self.reply is not None:
            return
        f = self.finish or Finish()
        prov: dict[str, Any] = {
            "backend": self.backend.id if self.backend else None,
            "model": f.model or self.options.model
            or (self.backend.default_model() if self.backend else None),
            "prompt_tokens": f.prompt_tokens,
            "completion_tokens": f.completion_tokens,
            "cached_tokens": f.cached_tokens,
            "ttft_s": round(ttft, 6) if ttft is not None else None,
            "duration_s": round(duration, 6),
            "finish_reason": finish_reason,
        }
        if status == "error" and self.error is not None:
            prov["error"] = redact(str(self.error))[:500]
        if self.notes:
            prov["notes"] = list(self.notes)
        if f.tool_calls:  # the reply called tools instead of answering
            prov["tool_calls"] = [c.to_dict() for c in f.tool_calls]
        c = self.options.constraint
        if c is not None:  # what the reply had to be, and whether the backend enforced it
            prov["constraint"] = dict(c.provenance(), enforced=self._enforced())
        if f.extra:
            prov.update({k: v for k, v in f.extra.items() if k not in prov})
        prov.update({k: v for k, v in self.provenance_extra.items() if k not in prov})
        prov = {k: v for k, v in prov.items() if v is not None}
        self.reply = self.tree.finish_reply(self.chat, self._reply_row, self.text, status, prov)
        self.tree.emit("reply-end", id=self.chat.id, path=self.chat.path, turn=self,
                       message=self.reply)


class Fanout:
    """The same message sent into several sibling chats at once, through the backend's
    batch entry point (vLLM batches them natively; others run concurrently).

    Iterate for ``(index, delta)`` events; ``turns[i]`` holds each sibling's reply."""

    def __init__(self, turns: list[Turn]):
        if not turns:
            raise InvalidInput("fan-out needs at least one subchat")
        self.turns = turns
        self.selection = turns[0].selection
        self.backend: Backend | None = None
        self._cancel = threading.Event()
        self._started = False

    def cancel(self) -> None:
        self._cancel.set()

    def run(self) -> list["Message"]:
        for _ in self:
            pass
        return [t.reply for t in self.turns]  # type: ignore[misc]

    def __iter__(self) -> Iterator[tuple[int, str]]:
        if self._started:
            raise SubchatError("a fan-out can be iterated only once")
        self._started = True
        return self._stream()

    def _stream(self) -> Iterator[tuple[int, str]]:
        backend = self.selection.candidates[0] if self.selection.candidates else None
        if backend is None:
            raise BackendError("no backend is available")
        self.backend = backend
        for t in self.turns:
            t.backend = backend
            t._started = True
            t._begin()
        open_ = set(range(len(self.turns)))
        gen = backend.stream_batch([(t.messages, t.options) for t in self.turns])
        first_error: BaseException | None = None
        try:
            for index, item in gen:
                turn = self.turns[index]
                if isinstance(item, BaseException):
                    turn.finish = turn.finish or cut_finish(gen, index)
                    status, reason, to_raise = turn._fail(item)
                    turn._end(status, reason)
                    open_.discard(index)
                    first_error = first_error or to_raise
                    continue
                delta = turn._feed(item)
                if isinstance(item, Finish):
                    turn._end()
                    open_.discard(index)
                elif delta:
                    yield index, delta
                if self._cancel.is_set():
                    raise KeyboardInterrupt
        except BaseException as exc:
            gen.close()
            for i in sorted(open_):
                self.turns[i].finish = self.turns[i].finish or cut_finish(gen, i)
                status, reason, _ = self.turns[i]._fail(exc)
                self.turns[i]._end(status, reason)
            open_.clear()
            raise
        finally:
            gen.close()
            for i in sorted(open_):  # a stream that ended without its Finish
                self.turns[i].finish = self.turns[i].finish or cut_finish(gen, i)
                self.turns[i]._end()
        if first_error is not None:
            raise first_error
