"""%subchat subcommands: editing the tree: the current chat, names, system prompts, deletes.

Each takes the magics object (its session, shell and settings) and the words after
the subcommand."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..words import counted

if TYPE_CHECKING:
    from ..magics import SubchatMagics


def use(m: "SubchatMagics", rest: list[str]) -> None:
    a = m._parse("use", rest, (("path",), {}))
    print(f"current chat: {m.session.use(a.path)}")


def rename(m: "SubchatMagics", rest: list[str]) -> None:
    a = m._parse("rename", rest, (("path",), {}), (("new_name",), {}))
    chat = m.session.rename(a.path, a.new_name)
    print(f"renamed to {chat.path}")


def system(m: "SubchatMagics", rest: list[str]) -> None:
    a = m._parse("system", rest, (("path",), {}), (("text",), dict(nargs="?")))
    chat = m.session.chat(a.path)
    if a.text is not None:
        chat = m.session.set_system(chat, a.text)
    own, in_force, source = m.session.system_of(chat)
    if own:
        print(f"system prompt of {chat.path}: {own!r}")
    elif source == "none":
        print(f"{chat.path} has no system prompt (none on its path, none configured)")
    else:
        print(f"{chat.path} inherits the system prompt {in_force!r} (from {source})")


def delete(m: "SubchatMagics", rest: list[str]) -> None:
    a = m._parse("delete", rest, (("path",), {}), (("--force",), dict(action="store_true")))
    done = m.session.delete(a.path, force=a.force)
    gone = done.paths
    print(f"deleted {counted(len(gone), 'chat')}: {', '.join(gone[:5])}{' …' if len(gone) > 5 else ''}")
    if done.current_moved_to:
        print(f"current chat: {done.current_moved_to} (the deleted one was current)")
