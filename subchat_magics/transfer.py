"""Moving chats in and out of a tree: exports (Markdown, re-importable JSON, a notebook that
reruns them, keys masked) and imports that keep each chat's context.

Core: imports the tree, render and the exchange's checks; never IPython."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import exchange, render
from .errors import InvalidInput
from .secrets import redact
from .tree import ROOT, Chat, ChatTree, normalize_path


@dataclass
class Imported:
    """What an import did: the chats made or filled, and notes on what it had to change
    to keep each chat's context (empty when nothing changed)."""

    paths: list[str]
    notes: list[str] = field(default_factory=list)


def export(tree: ChatTree, chat: Chat, fmt: str | None = None,
           out: str | os.PathLike[str] | None = None,
           default_system: str | None = None) -> tuple[str, str, int]:
    """The subtree of ``chat`` as Markdown (``md``), re-importable JSON (``json``) or a
    notebook that reruns it (``ipynb``), keys masked. With ``out`` the file is written.
    Returns (text, format, chats)."""
    if fmt is None:
        suffix = str(out).rpartition(".")[2] if out is not None else ""
        fmt = suffix if suffix in ("json", "ipynb") else "md"
    if fmt not in ("md", "json", "ipynb"):
        raise InvalidInput(f"export format is md, json or ipynb, not {fmt!r}")
    render_ = {"json": render.export_json, "ipynb": render.export_notebook,
               "md": render.export_markdown}[fmt]
    text = redact(render_(tree, chat, default_system))
    if out is not None:
        target = Path(out).expanduser()
        try:
            target.write_text(text, encoding="utf-8")
        except (OSError, UnicodeError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise InvalidInput(f"cannot write {str(out)!r}: {reason}; choose another file") from None
    return text, fmt, len(tree.subtree(chat))


def import_file(tree: ChatTree, file: str | os.PathLike[str], into: str | None = None) -> Imported:
    """Recreate the chats of a JSON export, each with the context it had (see
    :func:`import_data`)."""
    path = Path(file).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise InvalidInput(f"cannot read {str(file)!r}: {reason}") from None
    except ValueError as exc:
        raise InvalidInput(f"{path} is not JSON ({exc})") from None
    return import_data(tree, data, into)


def import_data(tree: ChatTree, data: dict[str, Any], into: str | None = None) -> Imported:
    """Recreate exported chats. They keep their paths, or move under ``into`` (the new
    parent of the exported top chat). An existing chat is filled only if it is empty.

    The top chat of a subtree keeps the context it was exported with: where its new
    parent's path holds those very messages it branches there as before; where the new
    parent holds other messages (and inherits none), the inherited messages are copied
    into the top chat as its first ones and a note says so; anywhere else the import is
    refused before anything is written."""
    if not isinstance(data, dict) or data.get("format") != render.EXPORT_FORMAT:
        raise InvalidInput(f"not a subchat-magics export (expected format {render.EXPORT_FORMAT!r})")
    chats = render.check_export(data)
    top = data.get("root") or (chats[0]["path"] if chats else None)
    if not top:
        return Imported([])
    prefix_old = top.rpartition("/")[0]
    notes: list[str] = []

    def target(path: str) -> str:
        if into is None:
            return path
        rel = path[len(prefix_old) + 1:] if prefix_old else path
        return f"{into.rstrip('/')}/{rel}"

    for c in chats:
        exchange.check_text(c.get("system_prompt"), f"the system prompt of {c['path']!r}")
        for m in c.get("messages", []):
            exchange.check_text(m["content"], f"a message of {c['path']!r}")
        normalize_path(target(c["path"]))
    copied, top_fork, top_system = _place_top(tree, data, chats, top, target(top), notes)
    made: list[str] = []
    with tree.atomic():  # every chat of the file, or none
        for c in chats:
            p = target(c["path"])
            is_top = c["path"] == top
            system = c.get("system_prompt") or (top_system if is_top else None)
            if p in tree:
                existing = tree.get(p)
                if existing.messages:
                    raise InvalidInput(
                        f"chat {existing.path!r} already exists with messages; import with "
                        "--into PATH to put the chats somewhere else")
                if system:
                    tree.set_system_prompt(existing, system)
                chat = existing
            else:
                chat = tree.create(p, system_prompt=system)
            fork = top_fork if is_top else c.get("fork_seq", chat.fork_seq)
            if c["path"].rpartition("/")[0] == top:
                fork += len(copied)  # the top chat's own messages now start with the copied ones
            if chat.path != ROOT and chat.fork_seq != fork:
                tree.store.update_chat(chat.id, fork_seq=int(fork))
                tree.refresh(force=True)
            for m in (copied if is_top else []) + c.get("messages", []):
                tree.append(chat, m["role"], m["content"], m.get("status", "complete"),
                            m.get("provenance") or None)
            made.append(chat.path)
    return Imported(made, notes)


def _place_top(tree: ChatTree, data: dict[str, Any], chats: list[dict[str, Any]], top: str,
               new_top: str, notes: list[str]) -> tuple[list[dict[str, Any]], int, str | None]:
    """Where the exported top chat goes so that its context stays what it was: (messages
    to copy into it first, its branch point in the new parent, a system prompt to give
    it). Raises before anything is written if that cannot be done."""
    if normalize_path(new_top) == ROOT:
        return [], 0, None
    exported = next((c for c in chats if c["path"] == top), {})
    inherited = data.get("inherited")
    parent_path = normalize_path(new_top).rpartition("/")[0]
    if parent_path not in tree:
        return [], 0, None  # creating the top chat says that its parent is missing
    parent = tree.get(parent_path)
    if inherited is None:  # an export made before exports carried their context
        if exported.get("fork_seq", 0):
            notes.append(f"{new_top}: the export does not carry the context it inherited (an "
                         "older export); it starts without it")
        return [], 0, None
    want = inherited.get("messages", [])
    have = tree.history(parent)
    parent_inherits = len(have) - len(parent.messages)
    system: str | None = None
    if not exported.get("system_prompt"):
        here = tree.system_prompt_for(parent)
        there = inherited.get("system_prompt")
        if there and there != here:
            system = there
            notes.append(f"{new_top}: the system prompt it inherited from {inherited.get('from')} "
                         "in the export is now its own")
        elif here and not there:
            notes.append(f"{new_top}: it now inherits the system prompt of {parent.path}, "
                         "which it did not have in the export; %subchat system "
                         f"{new_top} TEXT sets its own")
    same = [(m.role, m.content) for m in have[:len(want)]] == [(m["role"], m["content"]) for m in want]
    if parent_inherits <= len(want) <= len(have) and same:
        return [], len(want) - parent_inherits, system  # the same context is here: branch there
    if parent_inherits == 0:
        if want:
            notes.append(f"{new_top}: the {len(want)} message(s) it inherited from "
                         f"{inherited.get('from')} in the export were copied into it, as "
                         f"{parent.path} here holds other messages")
        return list(want), 0, system
    raise InvalidInput(
        f"cannot import {top} under {parent.path}: {parent.path} inherits {parent_inherits} "
        f"message(s) that {top} never had in its context; import it --into a chat that "
        "inherits nothing (e.g. --into root), where it keeps its own context")


__all__ = ["Imported", "export", "import_file", "import_data"]
