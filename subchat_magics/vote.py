"""A vote (``--vote K``): K samples of one message, kept as K sibling subchats, and the
verdict — the most common answer (:mod:`subchat_magics.verdict`) — stored on the chat's
own exchange with its count (``7/8 agree``).

The samples are one group for the pool (:meth:`~subchat_magics.exchange.Runner.submit_samples`):
on vLLM one engine request with ``n=K`` (the prompt computed once), elsewhere K requests in
flight. The sample subchats are made before the chat's exchange is stored, so each branches
off before it (their context is the chat's history, the message, and their own sample).
The chat's reply is the first sample that gave the verdict, whole; its provenance holds
``vote``: the verdict, its count, every sample's answer and the sample chats.

A thin caller of the exchange, like :mod:`subchat_magics.turn`.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from typing import TYPE_CHECKING, Any, Iterator

from .backends.base import Backend, Finish, GenerationOptions
from .backends.registry import Selection
from .batch import VOTE
from .errors import SubchatError
from .exchange import Exchange, Runner
from .structured import InvalidOutput
from .verdict import Verdict, answer_of, tally

if TYPE_CHECKING:
    from .tree import Chat, ChatTree

MARK = VOTE  # the provenance key of a vote's chat reply and of each sample


def sample_answer(ex: Exchange, pattern: "re.Pattern[str] | None") -> Any:
    """What a finished sample answers (None: it did not complete, or gave no answer)."""
    if ex.reply is None or ex.reply.status != "complete":
        return None
    return answer_of(ex.text, value=ex.value, constrained=ex.options.constraint is not None,
                     pattern=pattern)


def store_verdict(parent: Exchange, samples: list[Exchange], verdict: Verdict,
                  backend: Backend, extra: dict[str, Any] | None = None,
                  interrupted: bool = False) -> None:
    """Store the chat's exchange of a vote: the message, and the first sample that gave
    the verdict as the reply, with the vote in its provenance (one commit). A parent
    begun already (a batch row: its message claims the row) is ended. ``interrupted``
    (a sample was cut): the reply is stored ``interrupted``, the samples that finished
    kept as they are, so the next run sends the row again."""
    rep = samples[verdict.first] if verdict.first is not None else None
    parent.provenance[MARK] = dict(verdict.provenance(),
                                   samples=[s.chat.path for s in samples], **(extra or {}))
    fresh = not parent.begun
    with parent.tree.store.transaction():
        if fresh:
            parent.begin(backend)
        if interrupted:
            parent.parts = [rep.text] if rep is not None else []
            parent.end("interrupted", "interrupted")
        elif rep is not None:
            parent.parts = [rep.text]
            f = rep.finish or Finish()
            parent.finish = Finish(reason=f.reason, model=f.model, prompt_tokens=f.prompt_tokens,
                                   completion_tokens=sum((s.finish.completion_tokens or 0)
                                                         for s in samples if s.finish),
                                   cached_tokens=f.cached_tokens)
            parent.provenance[MARK]["representative"] = rep.chat.path
            parent.end("complete")
        else:
            parent.error = InvalidOutput("no sample gave an answer")
            parent.end("error", "error: no sample gave an answer")
    if fresh:
        parent.announce()


class Vote:
    """K samples of ``text`` into ``sample_chats`` (new sibling subchats of ``chat``),
    then the verdict on ``chat``. Iterate for ``(sample, delta)``; afterwards
    :attr:`verdict` is the :class:`~subchat_magics.verdict.Verdict`, :attr:`value` the
    answer, :attr:`reply` the chat's stored reply, ``samples[i]`` each sample's exchange."""

    def __init__(self, tree: "ChatTree", chat: "Chat", sample_chats: list["Chat"], text: str,
                 options: list[GenerationOptions], selection: Selection, *,
                 pattern: "re.Pattern[str] | None" = None, default_system: str | None = None):
        if len(sample_chats) != len(options) or len(options) < 2:
            raise SubchatError("a vote needs one set of options per sample, two or more")
        self.tree = tree
        self.chat = chat
        self.selection = selection
        self.pattern = pattern
        # the chat's exchange: its context is taken now, before anything is stored
        base = dataclasses.replace(options[0], seed=None)
        self.parent = Exchange(tree, chat, text, base, default_system=default_system)
        self.samples = [Exchange(tree, c, text, o, default_system=default_system)
                        for c, o in zip(sample_chats, options)]
        for i, ex in enumerate(self.samples):
            ex.provenance[MARK] = {"sample": i + 1, "of": len(self.samples), "chat": chat.path}
        self.verdict: Verdict | None = None
        self.backend: Backend | None = None
        self.error: BaseException | None = None
        self._cancel = threading.Event()
        self._started = False

    @property
    def value(self) -> Any:
        return self.verdict.answer if self.verdict is not None else None

    @property
    def reply(self) -> Any:
        return self.parent.reply

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.samples]

    def cancel(self) -> None:
        self._cancel.set()

    def run(self) -> Verdict:
        for _ in self:
            pass
        assert self.verdict is not None
        return self.verdict

    def __iter__(self) -> Iterator[tuple[int, str]]:
        if self._started:
            raise SubchatError("a vote can be run only once")
        self._started = True
        return self._stream()

    def _stream(self) -> Iterator[tuple[int, str]]:
        runner = Runner(self.selection, size=len(self.samples), join_s=5.0)
        where = {id(s): i for i, s in enumerate(self.samples)}
        try:
            runner.begin(self.samples)
            runner.submit_samples(self.samples)
            while runner.flying:
                got = runner.step()
                if got is not None:
                    yield where[id(got[0])], got[1]
                if self._cancel.is_set():
                    raise KeyboardInterrupt
        except BaseException as exc:
            runner.close(exc)
            raise
        finally:
            self.backend = runner.backend
        runner.close()
        self.error = runner.first_error
        self.verdict = tally([sample_answer(s, self.pattern) for s in self.samples])
        store_verdict(self.parent, self.samples, self.verdict, runner.backend)


__all__ = ["Vote", "MARK", "sample_answer", "store_verdict"]
