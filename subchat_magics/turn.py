"""One reply (``Turn``) and a fan-out (``Fanout``): thin callers of the exchange.

A :class:`Turn` is one :class:`~subchat_magics.exchange.Exchange` run by a
:class:`~subchat_magics.exchange.Runner` of one, read as an iterator of text deltas; a
:class:`Fanout` runs several through one pool and yields ``(index, delta)``. What is checked,
stored and streamed, and how a cut or failed reply is kept, is the exchange's rule."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Iterator

from .backends.base import Backend, GenerationOptions
from .backends.registry import Selection, registry
from .errors import InvalidInput, SubchatError
from .exchange import Exchange, Runner, check_prompt

if TYPE_CHECKING:
    from .tree import Chat, ChatTree, Message


def select(backend: "str | Backend | Selection | None") -> Selection:
    if isinstance(backend, Selection):
        return backend
    if isinstance(backend, Backend):
        return Selection(backend.id, [backend])
    return registry().select(backend or "auto")


class Turn(Exchange):
    """Iterate to stream the reply's deltas; afterwards ``reply`` is the stored
    :class:`~subchat_magics.tree.Message` and ``text`` its content.

    ``backend`` is a backend id (``"auto"`` by default), a :class:`Backend`, or a
    prepared :class:`Selection` (what :func:`subchat_magics.exchange.plan` chose). Other
    keyword arguments are generation options (``max_tokens``, ``temperature``, ``top_p``,
    ``stop``, ``seed``, ``model``, ``think``)."""

    def __init__(self, tree: "ChatTree", chat: "Chat", text: str | None, *,
                 backend: "str | Backend | Selection | None" = None,
                 options: GenerationOptions | None = None, default_system: str | None = None,
                 follow_up: bool = False, **overrides: Any):
        # follow_up: no new user message; the reply answers what the chat ends with (a
        # tool loop's next round, after the tool results)
        if not follow_up:
            check_prompt(text)  # type: ignore[arg-type]
        super().__init__(tree, chat, text, (options or GenerationOptions()).replace(**overrides),
                         default_system=default_system, follow_up=follow_up)
        self.selection = select(backend)
        if not self.selection.candidates:
            raise InvalidInput("no backend is available")
        self._cancel = threading.Event()
        self._started = False
        self.raised: BaseException | None = None

    @property
    def prompt(self) -> str:
        return self.text_sent

    @property
    def provenance_extra(self) -> dict[str, Any]:
        return self.provenance

    @property
    def reply_id(self) -> int | None:
        """The store id of this turn's reply row (it exists from the turn's start)."""
        return self.reply_row.id if self.reply_row is not None else None

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

    def fail(self, exc: BaseException, cut: Any = None) -> BaseException:
        self.raised = super().fail(exc, cut)
        return self.raised

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise SubchatError("a turn can be iterated only once")
        self._started = True
        return self._stream()

    def _stream(self) -> Iterator[str]:
        runner = Runner(self.selection, single=True)
        cancelled = self._cancel.is_set
        try:
            runner.begin([self])
            runner.submit([self])
            while runner.flying:
                for delta in runner.texts():  # the text of the stream, chunk by chunk
                    yield delta
                    if cancelled():
                        raise KeyboardInterrupt
                got = runner.step()  # its finish, an error, its end
                if got is not None:
                    yield got[1]
                if cancelled():
                    raise KeyboardInterrupt
        except BaseException as exc:
            if self.reply is None and self.begun:
                runner.close(exc)
            if self.raised is None or self.raised is exc:
                raise
            raise self.raised from None
        if runner.first_error is not None:
            raise runner.first_error from None


class Fanout:
    """The same message sent into several sibling chats at once, through one pool (vLLM
    batches them in the engine; others stream side by side on threads).

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
        for t in self.turns:
            t._started = True
        return self._stream()

    def _stream(self) -> Iterator[tuple[int, str]]:
        runner = Runner(self.selection, size=len(self.turns), join_s=5.0)
        self.backend = runner.backend
        where = {id(t): i for i, t in enumerate(self.turns)}
        cancelled = self._cancel.is_set
        try:
            runner.begin(self.turns)
            runner.submit(self.turns)
            while runner.flying:
                got = runner.step()
                if got is not None:
                    yield where[id(got[0])], got[1]
                if cancelled():
                    raise KeyboardInterrupt
        except BaseException as exc:
            runner.close(exc)
            raise
        finally:
            self.backend = runner.backend
        runner.close()  # (nothing in flight: lets the pool's threads go)
        if runner.first_error is not None:
            raise runner.first_error
