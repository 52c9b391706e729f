"""Tool calls on the wire of the HTTP backends: the request's ``tools`` field, the chat's
tool calls and results in each server's message format, and the calls read back from a
stream (OpenAI's and Groq's deltas, keyed by index, whose arguments may come in
fragments; Ollama's whole calls with their arguments as objects).

Knows nothing of any SDK: it reads the plain fields the SDKs' objects carry (through
:func:`fields`-like access) or plain dicts."""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from ..tools import Tool, ToolCall


def tool_specs(tools: Sequence[Tool] | None) -> list[dict[str, Any]]:
    """The ``tools`` field of a request (OpenAI's form, which Ollama and Groq read too)."""
    return [t.spec() for t in tools or ()]


def openai_messages(messages: Sequence[Mapping[str, Any]], keep_name: bool = False) -> list[dict]:
    """The chat as chat-completions servers take it: assistant ``tool_calls`` with their
    arguments as JSON text, ``tool`` messages with ``tool_call_id`` (and ``name`` where the
    server reads it: ``keep_name``)."""
    out = []
    for m in messages:
        if m["role"] == "tool":
            msg = {"role": "tool", "content": m["content"], "tool_call_id": m.get("tool_call_id")}
            if keep_name and m.get("name"):
                msg["name"] = m["name"]
            out.append(msg)
        elif m.get("tool_calls"):
            out.append({"role": m["role"], "content": m["content"] or None,
                        "tool_calls": [dict(c) for c in m["tool_calls"]]})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def ollama_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The chat as Ollama takes it: assistant ``tool_calls`` with their arguments as
    objects, ``tool`` messages with ``tool_name``."""
    out = []
    for m in messages:
        if m["role"] == "tool":
            out.append({"role": "tool", "content": m["content"], "tool_name": m.get("name")})
        elif m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = c.get("function") or {}
                args = fn.get("arguments")
                if isinstance(args, str):
                    try:
                        args = json.loads(args)
                    except ValueError:
                        pass
                calls.append({"function": {"name": fn.get("name"), "arguments": args}})
            out.append({"role": m["role"], "content": m["content"], "tool_calls": calls})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def _get(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


class DeltaCalls:
    """Tool calls assembled from OpenAI-style stream deltas: each delta names its call by
    ``index``; the first carries the id and the name, the arguments come in fragments
    (Groq sends each call whole in one delta: the same rule reads it)."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, str]] = {}

    def add(self, deltas: Any) -> None:
        for d in deltas or ():
            index = _get(d, "index")
            index = int(index) if isinstance(index, int) else len(self._calls)
            call = self._calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
            if _get(d, "id"):
                call["id"] = str(_get(d, "id"))
            fn = _get(d, "function")
            name, args = _get(fn, "name"), _get(fn, "arguments")
            if name:
                call["name"] += str(name)
            if args:
                call["arguments"] += args if isinstance(args, str) else json.dumps(args)

    def __bool__(self) -> bool:
        return bool(self._calls)

    def calls(self) -> list[ToolCall]:
        return [ToolCall.parse(c["name"], c["arguments"], c["id"] or None)
                for _, c in sorted(self._calls.items())]


def ollama_calls(message: Any) -> list[ToolCall]:
    """The calls of one Ollama message (``tool_calls``: each ``function`` with its name
    and its arguments as an object)."""
    out = []
    for c in _get(message, "tool_calls") or ():
        fn = _get(c, "function")
        args = _get(fn, "arguments")
        if args is not None and not isinstance(args, (str, dict)):
            args = dict(args)
        out.append(ToolCall.parse(str(_get(fn, "name") or ""), {} if args is None else args,
                                  _get(c, "id") or None))
    return out
