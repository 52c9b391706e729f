"""What the tree view knows, held by chat id and fed by the core's events: the selected
chat (with its ancestors, for when it is deleted), what each chat's label shows, and the
replies streaming now. A rename anywhere changes none of it; a delete moves the selection
to the nearest surviving ancestor.

Plain Python: imports the tree's types, render's label and the coalescer; never
ipywidgets, never the faces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .. import render
from ..streaming import Coalescer
from ..tree import Chat, ChatTree, Message

if TYPE_CHECKING:
    from ..turn import Turn

NBSP = "\u00a0"


@dataclass
class ChatInfo:
    """What a tree label shows about one chat."""

    count: int = 0
    last: Message | None = None  # its last reply
    streaming: int = 0
    last_id: int = 0  # its newest message counted (events may come after a fresh read)


@dataclass
class Stream:
    """A reply now streaming into some chat."""

    turn: "Turn"
    coalescer: Coalescer


class ViewState:
    """The view's memory of the tree, keyed by chat id. Its methods named after events
    are called with the core's events, in order, by whoever draws (under the view's
    lock); the others when the user acts."""

    def __init__(self, tree: ChatTree, start: Chat, *, interval: float,
                 clock: Callable[[], float]):
        self.tree = tree
        self.interval = interval
        self.clock = clock
        self.info: dict[int, ChatInfo] = {}
        self.streams: dict[int, Stream] = {}
        self.selected_id = start.id
        self._line: list[int] = [c.id for c in tree.lineage(start)]  # root..selected
        self.load()

    # -- the selection ------------------------------------------------------------------------
    def select(self, chat: Chat) -> None:
        self.selected_id = chat.id
        self._line = [c.id for c in self.tree.lineage(chat)]

    def selected(self) -> Chat:
        """The selected chat; if it is gone (deleted elsewhere, its event not handled
        yet), its nearest surviving ancestor, which becomes the selection."""
        chat = self.tree.find(self.selected_id)
        if chat is None:
            chat = self._survivor()
            self.select(chat)
        return chat

    def on_line(self, chat_id: int) -> bool:
        """Whether ``chat_id`` is the selected chat or one of its ancestors (whose path
        its transcript shows)."""
        return chat_id in self._line

    def _survivor(self) -> Chat:
        for cid in reversed(self._line):
            chat = self.tree.find(cid)
            if chat is not None:
                return chat
        return self.tree.root  # root itself was deleted: the tree's fresh root

    # -- labels ------------------------------------------------------------------------------
    def load(self) -> None:
        """Read every chat's count and last reply from the store (streaming counts kept)."""
        counts = self.tree.store.message_counts()
        info: dict[int, ChatInfo] = {}
        for chat in self.tree.chats():
            n = counts.get(chat.id, 0)
            last, last_id = None, 0
            if n:
                msgs = chat.messages
                last = next((m for m in reversed(msgs) if m.role == "assistant"), None)
                last_id = msgs[-1].id or 0
            old = self.info.get(chat.id)
            info[chat.id] = ChatInfo(n, last, old.streaming if old else 0, last_id)
        self.info = info

    def outline(self) -> list[tuple[str, str]]:
        """The tree as (label, path) lines, drawn with box characters: ``├─ name · 2
        msgs · echo``."""
        chats = self.tree.chats()
        last_child: set[int] = set()
        for c in chats:
            if c.children:
                last_child.add(c.children[-1].id)
        lines = []
        for c in chats:
            line = [c]
            while line[-1].parent is not None:
                line.append(line[-1].parent)
            prefix = ""
            for ancestor in reversed(line[1:-1]):  # below root, above c
                prefix += NBSP * 3 if ancestor.id in last_child else "│" + NBSP * 2
            if c.parent is not None:
                prefix += ("└─" if c.id in last_child else "├─") + NBSP
            i = self.info.get(c.id) or ChatInfo()
            label = render.chat_label(c.name, i.count, i.last, bool(i.streaming))
            lines.append((prefix + label.replace(" ", NBSP), c.path))
        return lines

    # -- the core's events ----------------------------------------------------------------------
    def chat_created(self, chat_id: int) -> None:
        self.info.setdefault(chat_id, ChatInfo())

    def chat_deleted(self, ids: list[int]) -> bool:
        """Forget the deleted chats; True if the selection moved (to the nearest
        surviving ancestor)."""
        for cid in ids:
            self.info.pop(cid, None)
            self.streams.pop(cid, None)
        root = self.tree.root
        self.info.setdefault(root.id, ChatInfo())  # (a deleted root has a fresh one)
        if self.selected_id in ids:
            self.select(self._survivor())
            return True
        return False

    def message(self, chat_id: int, message: Message) -> None:
        info = self.info.setdefault(chat_id, ChatInfo())
        mid = message.id or 0
        if mid > info.last_id:  # not counted by a read of the store since
            info.count += 1
            info.last_id = mid
        if message.role == "assistant" and (info.last is None or mid >= (info.last.id or 0)):
            info.last = message  # (a finished reply replaces its stored placeholder)

    def reply_started(self, chat_id: int, turn: "Turn") -> Stream:
        self.streams[chat_id] = s = Stream(turn, Coalescer(self.interval, clock=self.clock))
        self.info.setdefault(chat_id, ChatInfo()).streaming += 1
        return s

    def reply_ended(self, chat_id: int, turn: "Turn") -> Stream | None:
        """The chat's stream, now ended, if it was this turn's."""
        info = self.info.setdefault(chat_id, ChatInfo())
        info.streaming = max(0, info.streaming - 1)
        s = self.streams.get(chat_id)
        if s is not None and s.turn is turn:
            del self.streams[chat_id]
            return s
        return None
