"""%subchat subcommands: the store file and moving chats in and out.

Each takes the magics object (its session, shell and settings) and the words after
the subcommand."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .. import transfer
from ..words import counted

if TYPE_CHECKING:
    from ..magics import SubchatMagics


def reopen(m: "SubchatMagics", rest: list[str]) -> None:
    a = m._parse("reopen", rest, (("--restore",), dict(action="store_true")))
    tree = m.session.reopen(restore=a.restore)
    print(f"store: {m.session.store_path()} ({counted(len(tree.chats()), 'chat')}); current chat: root")


def copy_to(m: "SubchatMagics", rest: list[str]) -> None:
    a = m._parse("copy-to", rest, (("file",), {}))
    old = m.session.store_path()
    tree = m.session.copy_to(a.file)
    new = m.session.store_path()
    m.store_path = str(new)  # %config shows the store in use
    print(f"copied {old} to {new} ({counted(len(tree.chats()), 'chat')}); now writing "
          f"there, current chat: {m.session.current} (the original is untouched)")


def export_chats(m: "SubchatMagics", rest: list[str]) -> None:
    a = m._parse("export", rest, (("path",), dict(nargs="?")),
                 (("--format",), dict(choices=["md", "json", "ipynb"], default=None)),
                 (("--out",), dict(default=None)))
    chat = m.session.chat(a.path)
    text, fmt, count = transfer.export(m.session.tree, chat, a.format, a.out,
                                       m.session.defaults.system_prompt)
    if a.out:
        print(f"exported {counted(count, 'chat')} from {chat.path} to {Path(a.out).expanduser()} ({fmt})")
    else:
        print(text)


def import_chats(m: "SubchatMagics", rest: list[str]) -> None:
    a = m._parse("import", rest, (("file",), {}), (("--into",), dict(default=None)))
    done = transfer.import_file(m.session.tree, a.file, a.into)
    made = done.paths
    print(f"imported {counted(len(made), 'chat')}: {', '.join(made[:5])}{' …' if len(made) > 5 else ''}")
    for note in done.notes:
        print(f"note: {note}")
