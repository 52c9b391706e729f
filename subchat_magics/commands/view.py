"""%subchat subcommands: the tree, a transcript, where things stand.

Each takes the magics object (its session, shell and settings) and the words after
the subcommand."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import batch, render, scores
from ..magic_args import in_kernel
from ..secrets import redact
from ..verdict_view import plot_scores
from ..words import counted

if TYPE_CHECKING:
    from ..magics import SubchatMagics


def tree(m: "SubchatMagics", rest: list[str]) -> Any:
    a = m._parse("tree", rest, (("--text",), dict(action="store_true")))
    if not a.text and in_kernel(m.shell) and m.open_view is not None:
        view = m.open_view(m.session)  # (the faces know nothing of each other)
        if view is not None:
            return view
    print(render.tree_text(m.session.tree, m.session.current))
    return None


def show(m: "SubchatMagics", rest: list[str]) -> None:
    a = m._parse("show", rest, (("path",), dict(nargs="?")),
                 (("-p", "--provenance"), dict(action="store_true")),
                 (("--own",), dict(action="store_true")))
    tree = m.session.tree
    chat = m.session.chat(a.path)
    system = m.session.defaults.system_prompt
    m._show(render.transcript(tree, chat, a.provenance, not a.own, default_system=system),
               render.transcript(tree, chat, a.provenance, not a.own, markdown=True,
                                 default_system=system))
    if in_kernel(m.shell) and not chat.messages:  # a labelled batch chat: its scores drawn
        board = scores.board(tree, chat) if batch.is_batch_chat(tree, chat) else None
        if board is not None:
            plot_scores(board.scores())


def status(m: "SubchatMagics", rest: list[str]) -> None:
    m._parse("status", rest)
    st = m.session.status()
    lines = [
        f"store:    {st['store']} ({counted(st['chats'], 'chat')}, {counted(st['messages'], 'message')})"
        + (f", read-only: {st['read_only']}" if st["read_only"] else ""),
        f"current:  {st['current']}",
        f"backend:  {st['active'] or 'none'} (asked for {st['requested']!r} by {st['requested_from']})",
    ]
    if st["store_problem"]:
        lines.insert(1, f"          {st['store_problem']}")
    if st["requested"] == "auto":
        lines.append(f"auto order: {' -> '.join(st['auto_order'])}")
        for name, reason in st["passed_over"]:
            lines.append(f"  passed over {name}: {redact(reason)}")
    d = m.session.defaults
    o = d.options
    lines.append(f"defaults: max_tokens={o.max_tokens} temperature={o.temperature} "
                 f"top_p={o.top_p} format={d.format}" + (f" model={o.model}" if o.model else ""))
    print("\n".join(lines))
