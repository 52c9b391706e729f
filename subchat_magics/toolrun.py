"""A message answered with tools: the model answers or calls tools; each call is checked
against its tool's schema, asked about (unless approved in advance), run in this thread
and its result stored and sent back; up to ``max_rounds`` rounds of calls.

Each round is a :class:`~subchat_magics.turn.Turn` (the first with the user's message, the
next ones answering the tool results), so every reply, call and result is a message of the
chat as soon as it exists: Ctrl-C keeps every finished step. Only the tools of the
:class:`~subchat_magics.tools.Toolset` can run; a call the user refuses is sent back as
refused."""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .errors import InvalidInput, SubchatError
from .tools import ToolCall, ToolResult, Toolset
from .values import Limits

if TYPE_CHECKING:
    from .tree import Chat, ChatTree, Message
    from .turn import Turn

MAX_ROUNDS = 5
REFUSED = "refused: the user did not allow this call; do not call it again, answer without it"


@dataclass
class ToolEvent:
    """What the loop did besides streaming text: ``call`` (a call about to be asked/run)
    or ``result`` (its result, stored)."""

    kind: str
    call: ToolCall
    result: ToolResult | None = None


class Approver:
    """Decides whether a call may run. ``yes``: every call runs. Otherwise ``ask(call)``
    (default: :func:`input`, which works in a terminal and in a notebook) is asked;
    ``y`` runs it, ``a`` runs it and every later call of that tool, anything else refuses
    it. ``per_tool``: one answer per tool for the whole run (a batch's rows)."""

    def __init__(self, yes: bool = False, ask: Callable[[str], str] | None = None,
                 per_tool: bool = False):
        self.yes = yes
        self.ask = ask
        self.per_tool = per_tool
        self.decided: dict[str, bool] = {}

    @classmethod
    def of(cls, approve: "Approver | bool | Callable[[ToolCall], bool] | None") -> "Approver":
        if isinstance(approve, Approver):
            return approve
        if approve is True:
            return cls(yes=True)
        if approve is None:
            return cls()
        if approve is False:  # refuse every call (the model is told each time)
            return _CallbackApprover(lambda call: False)
        if callable(approve):
            return _CallbackApprover(approve)
        raise InvalidInput("approve must be True, None or a function of the call")

    def __call__(self, call: ToolCall) -> bool:
        if self.yes:
            return True
        if call.name in self.decided:
            return self.decided[call.name]
        ask = self.ask or builtins.input
        scope = " (for all of them)" if self.per_tool else ""  # a fan-out, a batch
        try:
            answer = str(ask(f"run {call.signature()}? [y]es / [n]o / [a]lways {call.name}{scope}: "))
        except KeyboardInterrupt:
            raise  # no answer: stop
        except Exception as exc:  # noqa: BLE001 - a front end that cannot ask: no stdin, or
            # a closed one (EOFError: a terminal IPython fed by a pipe, a script's stdin)
            raise CannotAsk(f"cannot ask before running {call.name} here (no stdin: "
                            f"{type(exc).__name__}); add --yes to run the calls without "
                            "asking, or approve=... in Python") from None
        answer = answer.strip().lower()
        allowed = answer in ("y", "yes", "a", "always")
        if answer in ("a", "always") or self.per_tool:
            self.decided[call.name] = allowed
        return allowed


class CannotAsk(InvalidInput):
    """A call needs the user's approval and this front end cannot ask (``input()`` fails:
    no stdin, as under nbval or papermill)."""


#: the result of a call that could not be approved (sent back and stored as its result)
NOT_APPROVED = ("not run: no approval was possible (this front end cannot ask: no stdin); "
                "run the cell again with --yes to allow the calls")


class _CallbackApprover(Approver):
    def __init__(self, fn: Callable[[ToolCall], bool]):
        super().__init__()
        self.fn = fn

    def __call__(self, call: ToolCall) -> bool:
        return bool(self.fn(call))


class ToolRun:
    """Iterate for the final answer's text deltas (``events()`` for the calls and results
    too); afterwards ``reply`` is the last stored reply, ``text`` its content, ``value``
    its parsed value (with a constraint), ``calls`` every ``(call, result)``.

    ``new_turn(follow_up)`` makes each round's :class:`Turn` (the session supplies it with
    the backend, options and system prompt)."""

    def __init__(self, tree: "ChatTree", chat: "Chat", text: str, toolset: Toolset,
                 new_turn: Callable[[bool], "Turn"], *, approve: Any = None,
                 max_rounds: int = MAX_ROUNDS, limits: Limits = Limits()):
        if not isinstance(max_rounds, int) or isinstance(max_rounds, bool) or max_rounds < 1:
            raise InvalidInput(f"--max-rounds takes a whole number >= 1, not {max_rounds!r}")
        self.tree = tree
        self.chat = chat
        self.prompt = text
        self.toolset = toolset
        self.approver = Approver.of(approve)
        self.max_rounds = max_rounds
        self.limits = limits
        self.turns: list["Turn"] = [new_turn(False)]
        self._new_turn = new_turn
        self.calls: list[tuple[ToolCall, ToolResult]] = []
        #: why the loop stopped before a final answer (max rounds), or None
        self.stopped: str | None = None
        self._started = False

    # -- what a Turn offers, for the last round ----------------------------------------------
    @property
    def turn(self) -> "Turn":
        return self.turns[-1]

    @property
    def options(self) -> Any:
        return self.turn.options

    @property
    def reply(self) -> "Message | None":
        return self.turn.reply

    @property
    def text(self) -> str:
        return self.turn.text

    @property
    def value(self) -> Any:
        return self.turn.value

    @property
    def finish(self) -> Any:
        return self.turn.finish

    @property
    def notes(self) -> list[str]:
        return [n for t in self.turns for n in t.notes]

    @property
    def selection(self) -> Any:
        return self.turn.selection

    def cancel(self) -> None:
        self.turn.cancel()

    def run(self) -> "Message | None":
        for _ in self:
            pass
        return self.reply

    def __iter__(self) -> Iterator[str]:
        return (e for e in self.events() if isinstance(e, str))

    # -- the loop ---------------------------------------------------------------------------
    def events(self) -> Iterator["str | ToolEvent"]:
        """Text deltas of each round, and a :class:`ToolEvent` for each call and result."""
        if self._started:
            raise SubchatError("a tool run can be iterated only once")
        self._started = True
        rounds = 0
        while True:
            turn = self.turns[-1]
            yield from turn
            calls = turn.finish.tool_calls if turn.finish is not None else []
            if not calls or turn.reply is None or turn.reply.status != "complete":
                return
            rounds += 1
            for event in run_calls(self.tree, self.chat, calls, self.toolset, self.approver,
                                   self.limits, self.calls):
                yield event
            if rounds >= self.max_rounds:
                self.stopped = (f"stopped after {rounds} round(s) of tool calls (--max-rounds "
                                f"{self.max_rounds}); the results are stored, no answer yet")
                return
            self.turns.append(self._new_turn(True))



def run_one(call: ToolCall, toolset: Toolset, approver: Approver, limits: Limits) -> ToolResult:
    """One call: checked (an invalid one is never asked about nor run: the model is told
    why), asked, run."""
    problem = toolset.check(call)
    if problem is not None:
        return ToolResult(call, f"error: invalid call: {problem}", "error", 0.0)
    if not approver(call):
        return ToolResult(call, REFUSED, "refused")
    return toolset.run(call, limits)


def run_calls(tree: "ChatTree", chat: "Chat", calls: list[ToolCall], toolset: Toolset,
              approver: Approver, limits: Limits,
              done: list[tuple[ToolCall, ToolResult]] | None = None) -> Iterator[ToolEvent]:
    """Run the calls of one stored reply in turn, each result stored as a ``tool`` message
    of ``chat`` (and added to ``done``); a :class:`ToolEvent` before and after each. On
    Ctrl-C (or any failure while asking) every call left gets a result marked
    ``interrupted`` (one that could not be asked about: ``refused``, saying why), so the
    chat stays a valid context, and the exception goes on."""
    def store(result: ToolResult) -> None:
        status = "interrupted" if result.status == "interrupted" else "complete"
        tree.append(chat, "tool", result.content, status, result.provenance())
        if done is not None:
            done.append((result.call, result))

    for i, call in enumerate(calls):
        yield ToolEvent("call", call)
        try:
            result = run_one(call, toolset, approver, limits)
        except CannotAsk:  # said truly: not run for want of an approval, not interrupted
            for cut in calls[i:]:
                store(ToolResult(cut, NOT_APPROVED, "refused"))
            raise
        except BaseException:
            for cut in calls[i:]:
                store(ToolResult(cut, "interrupted: the user stopped the run before this call "
                                      "finished", "interrupted"))
            raise
        store(result)
        yield ToolEvent("result", call, result)
