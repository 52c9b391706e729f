"""What the tree view knows, held by chat id and fed by the core's events: the selected
chat (with its ancestors, for when it is deleted), what each chat's label shows, and the
replies streaming now. A rename anywhere changes none of it; a delete moves the selection
to the nearest surviving ancestor.

Plain Python: imports the tree's types, render's label and the coalescer; never
ipywidgets, never the faces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from .. import batch, render
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
class BatchInfo:
    """A batch chat (``%%subchat --each``) as one line: its rows' first replies counted
    (kept counted as they change, so a frame costs the same for 10 rows or 100,000)."""

    total: int
    rows: dict[int, str] = field(default_factory=dict)  # row id -> first reply's status
    streaming: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {"complete": 0, "error": 0, "cut": 0})

    @staticmethod
    def _kind(status: str) -> str:
        return "" if not status else status if status in ("complete", "error") else "cut"

    def set(self, chat_id: int, status: str) -> None:
        """Row ``chat_id``'s first reply now has ``status`` ('' while it streams)."""
        self.drop(chat_id)
        self.rows[chat_id] = status
        if self._kind(status):
            self.counts[self._kind(status)] += 1

    def drop(self, chat_id: int) -> None:
        old = self.rows.pop(chat_id, None)
        if old is not None and self._kind(old):
            self.counts[self._kind(old)] -= 1

    def label(self) -> str:
        c = self.counts
        return batch.Summary(0, max(self.total, len(self.rows)), c["complete"], c["error"],
                             c["cut"]).label()


@dataclass
class Stream:
    """A reply now streaming into some chat."""

    turn: "Turn"
    coalescer: Coalescer


def _models_status(tree: ChatTree, row: Chat) -> str:
    """A comparison row (it holds nothing) as its models' first replies say: complete
    when every model's is, an error when one's is, else cut ('' when none was sent)."""
    got = [ex[1][2] for ex in batch.first_exchanges(tree, row).values() if len(ex) > 1
           and isinstance(ex[1][3].get(batch.MARK), dict)] if row.children else []
    if not got:
        return ""
    if all(s == "complete" for s in got):
        return "complete"
    return "error" if "error" in got else "interrupted"


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
        self.batches: dict[int, BatchInfo] = {}  # batch chat id -> its rows, folded
        self.parts: dict[int, int] = {}  # a row's model/sample/attempt streaming -> the row
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
        counts = self.tree.message_counts()
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
        self.load_batches(counts)

    def load_batches(self, counts: dict[int, int] | None = None) -> None:
        """Read which chats are batches and how their rows ended (one query a batch)."""
        found = batch.summaries(self.tree, counts)
        batches: dict[int, BatchInfo] = {}
        for cid, summary in found.items():
            chat = self.tree.find(cid)
            if chat is None:
                continue
            firsts = batch.first_exchanges(self.tree, chat)
            old = self.batches.get(cid)
            b = batches[cid] = BatchInfo(summary.total, streaming=old.streaming if old else 0)
            for k in chat.children:  # (a row made but not sent yet: '')
                ex = firsts.get(k.id, ())
                b.set(k.id, ex[1][2] if len(ex) > 1 else _models_status(self.tree, k))
        self.batches = batches

    def batch_of(self, chat_id: int) -> int | None:
        """The batch chat ``chat_id`` is a row of, or None."""
        chat = self.tree.find(chat_id)
        parent = chat.parent if chat is not None else None
        return parent.id if parent is not None and parent.id in self.batches else None

    def outline(self) -> list[tuple[str, str]]:
        """The tree as (label, path) lines, drawn with box characters: ``├─ name · 2
        msgs · echo``. A batch is one line, ``qs · [987/1000 done, 13 failed]``, its rows
        folded away (but the selected one, with its path)."""
        lines: list[tuple[str, str]] = []
        root = self.tree.root
        stack: list[tuple[Chat, str, bool]] = [(root, "", True)]  # chat, prefix, is last
        while stack:
            c, prefix, last = stack.pop()
            head = "" if c.parent is None else prefix + ("└─" if last else "├─") + NBSP
            b = self.batches.get(c.id)
            if b is not None:
                bits = [c.name, b.label()]
                if b.streaming:
                    bits.append(f"● {b.streaming} streaming")
                label = " · ".join(bits)
                kids = [k for k in c.children if self.on_line(k.id)]
            else:
                i = self.info.get(c.id) or ChatInfo()
                label = render.chat_label(c.name, i.count, i.last, bool(i.streaming))
                kids = c.children
            lines.append((head + label.replace(" ", NBSP), c.path))
            below = "" if c.parent is None else prefix + (NBSP * 3 if last else "│" + NBSP * 2)
            for k, kid in reversed(list(enumerate(kids))):
                stack.append((kid, below, k == len(kids) - 1))
        return lines

    # -- the core's events ----------------------------------------------------------------------
    def chat_deleted(self, ids: list[int]) -> bool:
        """Forget the deleted chats; True if the selection moved (to the nearest
        surviving ancestor)."""
        gone = set(ids)
        for cid in ids:
            self.info.pop(cid, None)
            self.streams.pop(cid, None)
            self.batches.pop(cid, None)
        for b in self.batches.values():
            for cid in gone & b.rows.keys():
                b.drop(cid)
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
        mark = getattr(turn, "provenance_extra", {}).get(batch.MARK)
        if mark is not None:  # a row of a batch: its batch chat is one line
            row = self._row_of(chat_id, mark)
            parent = row.parent if row is not None else None
            if parent is not None:
                if row.id != chat_id:  # a comparison's model, a vote's sample, an attempt
                    self.parts[chat_id] = row.id
                b = self.batches.get(parent.id)
                if b is None:
                    b = self.batches[parent.id] = BatchInfo(int(mark.get("of") or 0))
                b.total = max(b.total, int(mark.get("of") or 0))
                if row.id not in b.rows:
                    b.set(row.id, "")
                b.streaming += 1
        return s

    def _row_of(self, chat_id: int, mark: dict) -> Chat | None:
        """The row a batch reply streams into: the chat itself, or (a comparison's model
        subchat, a vote's sample, an ``attempt-K``) the ancestor its mark names."""
        chat = self.tree.find(chat_id)
        item = mark.get("item") if isinstance(mark, dict) else None
        if chat is None or item is None:
            return chat
        node: Chat | None = chat
        while node is not None and node.name != str(item):
            node = node.parent
        return node if node is not None and node.parent is not None else chat

    def batch_started(self, chat_id: int, total: int) -> None:
        """A batch starts in ``chat_id``: from now on its rows are one line."""
        b = self.batches.get(chat_id)
        if b is None:
            self.batches[chat_id] = BatchInfo(total)
        else:
            b.total = max(b.total, total)

    def chat_created(self, chat_id: int) -> None:
        self.info.setdefault(chat_id, ChatInfo())
        chat = self.tree.find(chat_id)
        parent = chat.parent if chat is not None else None
        if parent is not None and parent.id in self.batches \
                and chat_id not in self.batches[parent.id].rows:
            self.batches[parent.id].set(chat_id, "")

    def is_row(self, chat_id: int) -> bool:
        """Whether ``chat_id`` is a row of a batch, or a part of one (whose events a view
        does not follow)."""
        return chat_id in self.parts or any(chat_id in b.rows for b in self.batches.values())

    def reply_ended(self, chat_id: int, turn: "Turn") -> Stream | None:
        """The chat's stream, now ended, if it was this turn's."""
        info = self.info.setdefault(chat_id, ChatInfo())
        info.streaming = max(0, info.streaming - 1)
        row_id = self.parts.pop(chat_id, chat_id)
        for b in self.batches.values():
            if row_id in b.rows:
                b.streaming = max(0, b.streaming - 1)
                reply = getattr(turn, "reply", None)
                if row_id != chat_id:  # a part ended: the row as the store says now
                    row = self.tree.find(row_id)
                    if row is not None and not b.rows[row_id]:
                        ex = batch.first_exchanges(self.tree, row.parent).get(row_id, ()) \
                            if row.parent is not None else ()
                        b.set(row_id, ex[1][2] if len(ex) > 1 else _models_status(self.tree, row))
                elif not b.rows[chat_id] and reply is not None:  # its first reply ended
                    b.set(chat_id, reply.status)
                break
        s = self.streams.get(chat_id)
        if s is not None and s.turn is turn:
            del self.streams[chat_id]
            return s
        return None
