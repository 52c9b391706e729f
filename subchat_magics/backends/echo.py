"""The offline echo backend: deterministic, streams word by word, and shows what it
was given, so that context inheritance is visible.

Its reply is exactly ``echo (N messages): <last user message>`` where N counts the
messages it received, system prompt included; with a constraint (``--json``, ``--choice``,
``--regex``) it is a value that satisfies it instead (the first choice; a small instance
of the schema, a string the pattern matches), so notebooks that read replies run offline.
With tools (``--tools``) it follows a fixed script: it calls each tool once, one per
round, in the order given, with a minimal valid instance of the tool's schema, then answers
with the results it got (``tool results: NAME → RESULT; ...``).
``max_tokens`` counts words.
``SUBCHAT_ECHO_DELAY`` (seconds per word, default 0; environment or ``./.env``) slows it
down for demos."""

from __future__ import annotations

import math
import re
import time
from typing import Iterator, Sequence

from ..errors import BackendError
from ..settings import getenv
from ..tools import ToolCall, example_arguments
from .base import Backend, Finish, GenerationOptions, Message

_WORDS = re.compile(r"\S+\s*|\s+")


class EchoBackend(Backend):
    id = "echo"
    description = "offline, built in: repeats the last message with the count of messages it got"
    auto_priority = 1000  # the offline fallback: always available, always last
    options = ("max_tokens",)  # counts words; the rest cannot change an echo
    constraints = ("json", "choice", "regex")  # answers with an example that satisfies it
    supports_tools = True  # a fixed script: each tool once, then the answer

    def __init__(self, delay: float | None = None):
        self._fixed = delay  # None: read SUBCHAT_ECHO_DELAY at each reply

    @property
    def delay(self) -> float:
        if self._fixed is not None:
            return max(0.0, self._fixed)
        raw = getenv("SUBCHAT_ECHO_DELAY", "0") or "0"
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not 0 <= value < math.inf:  # (nan too) said, not read as 0 or slept forever
            raise BackendError(f"SUBCHAT_ECHO_DELAY must be a number of seconds >= 0, not {raw!r}",
                               reason="config")
        return value

    def check_settings(self) -> None:
        """``SUBCHAT_ECHO_DELAY``, checked when a request is planned."""
        self.delay  # noqa: B018 - raises on a value it cannot use

    def default_model(self) -> str:
        return "echo"

    def count_tokens(self, text: str, options: GenerationOptions) -> int:
        return len(_WORDS.findall(text))

    def stream(self, messages: Sequence[Message], options: GenerationOptions) -> Iterator[str | Finish]:
        last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        last_user = messages[last]["content"] if last >= 0 else ""
        prompt_tokens = sum(len((m.get("content") or "").split()) for m in messages)
        since = messages[last + 1:]
        if options.tools:
            called = {c["function"]["name"] for m in since for c in m.get("tool_calls") or ()}
            todo = [t for t in options.tools if t.name not in called]
            if todo:
                tool = todo[0]
                args = example_arguments(tool.parameters)
                yield Finish(reason="tool_calls", model="echo", prompt_tokens=prompt_tokens,
                             completion_tokens=0, tool_calls=[
                                 ToolCall(tool.name, args, f"echo_{len(messages)}_{tool.name}")])
                return
        text = f"echo ({len(messages)} messages): {last_user}"
        results = [f"{m.get('name', '')} → {m['content']}" for m in since if m["role"] == "tool"]
        if results:
            text += "\ntool results: " + "; ".join(results)
        if options.constraint is not None:
            text = options.constraint.example()
        tokens = _WORDS.findall(text)
        limit = options.max_tokens if options.max_tokens and options.max_tokens > 0 else len(tokens)
        delay = self.delay
        for tok in tokens[:limit]:
            if delay:
                time.sleep(delay)
            yield tok
        yield Finish(
            reason="stop" if len(tokens) <= limit else "length",
            model="echo",
            prompt_tokens=prompt_tokens,
            completion_tokens=min(len(tokens), limit),
        )
