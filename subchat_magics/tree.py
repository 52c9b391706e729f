"""The chat tree: chats addressed by path (``root``, ``root/physics``, ``root/physics/units``),
their messages, and the context a backend sees. No IPython, no widgets in here.

A subchat branches from its parent at the parent's message count when it was made
(``fork_seq``) and inherits the path's messages from the root down to that point. Its
context is: the nearest system prompt on the path (a chat's own replaces its
ancestors'), then those inherited messages, then the chat's own messages.
"""

from __future__ import annotations

import json
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

from .errors import ChatNotFound, InvalidInput, StoreError
from .events import Listener, Listeners
from .secrets import redact, redact_json
from .settings import getenv
from .store import ChatRow, MessageRow, Store

ROOT = "root"
#: where a reply goes whose chat was deleted while it streamed:
#: ``<nearest surviving ancestor>/recovered/<the chat's name>``
RECOVERED = "recovered"
_SEGMENT = re.compile(r"^[\w.\-]{1,100}$")
DEFAULT_STORE = "subchats.db"


def default_store_path() -> Path:
    """``$SUBCHAT_STORE``, else ``./subchats.db`` in the working directory."""
    return Path(getenv("SUBCHAT_STORE") or DEFAULT_STORE).expanduser()


def normalize_path(path: str | None) -> str:
    """``root/a/b`` stays; ``a/b`` and ``/a/b`` mean ``root/a/b``. Segments are letters,
    digits, ``_``, ``-`` and ``.``; names are case-sensitive, and a path starting with
    ``ROOT``/``Root`` is refused with the spelling it probably meant."""
    if path is None:
        raise InvalidInput("no chat path given")
    p = str(path).strip().strip("/")
    if not p or p == ROOT:
        return ROOT
    parts = p.split("/")
    if parts[0] != ROOT and parts[0].lower() == ROOT:
        # names are case-sensitive, and root is always "root": ROOT/y would quietly
        # become root/ROOT/y, a chat nobody meant
        fixed = "/".join([ROOT, *parts[1:]])
        raise InvalidInput(
            f"bad chat path {str(path)[:80]!r}: paths start at 'root' (lowercase; chat names "
            f"are case-sensitive): did you mean {fixed!r}? A chat named {parts[0]!r} under "
            f"root is written root/{'/'.join(parts)}")
    if parts[0] != ROOT:
        parts.insert(0, ROOT)
    for seg in parts[1:]:
        if not _SEGMENT.match(seg) or seg in (".", ".."):
            raise InvalidInput(
                f"bad chat path {str(path)[:80]!r}: each part must be 1-100 letters, digits, "
                "'_', '-' or '.', separated by '/', e.g. root/physics/units"
            )
    return "/".join(parts)


@dataclass
class Message:
    """One stored message. ``status`` is ``complete``, ``interrupted`` or ``error``;
    ``provenance`` holds backend, model, token counts, ttft, duration, finish_reason."""

    role: str
    content: str
    status: str = "complete"
    provenance: dict[str, Any] = field(default_factory=dict)
    seq: int = 0
    id: int | None = None
    created_at: float | None = None
    #: the chat it is stored in (a reply whose chat was deleted while it streamed is
    #: stored in a recovery chat: this says which)
    chat_id: int | None = None

    @classmethod
    def from_row(cls, r: MessageRow) -> "Message":
        return cls(r.role, r.content, r.status, r.provenance, r.seq, r.id, r.created_at, r.chat_id)

    @property
    def finish_reason(self) -> str | None:
        return self.provenance.get("finish_reason")

    def as_chat(self) -> dict[str, Any]:
        if self.role == "tool" or self.tool_calls:
            return tool_message(self.role, self.content, self.provenance)
        return {"role": self.role, "content": self.content}

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """The tool calls of an assistant message (``id``, ``name``, ``arguments``)."""
        calls = self.provenance.get("tool_calls") if self.role == "assistant" else None
        return list(calls) if isinstance(calls, list) else []


def tool_message(role: str, content: str, provenance: dict[str, Any]) -> dict[str, Any]:
    """A tool call or a tool result in the chat format backends read (OpenAI's:
    ``tool_calls`` with JSON-text arguments on an assistant message; ``tool`` messages with
    ``tool_call_id`` and ``name``); each backend turns it into its own."""
    if role == "tool":
        return {"role": "tool", "content": content,
                "tool_call_id": str(provenance.get("tool_call_id", "")),
                "name": str(provenance.get("name", ""))}
    calls = []
    for c in provenance.get("tool_calls") or []:
        args = c.get("arguments")
        calls.append({"id": str(c.get("id", "")), "type": "function", "function": {
            "name": str(c.get("name", "")),
            "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}})
    return {"role": role, "content": content, "tool_calls": calls}


class Chat:
    """A handle on one chat of a :class:`ChatTree`. Its row and path are read from the
    tree's current index (so a rename seen by a refresh is seen by every handle at once);
    a deleted chat keeps the last ones seen."""

    def __init__(self, tree: "ChatTree", row: ChatRow, path: str):
        self.tree = tree
        self.id = row.id
        self._last = (row, path)

    @property
    def _state(self) -> tuple[ChatRow, str]:
        state = self.tree._index.state.get(self.id)
        if state is None:
            return self._last
        self._last = state  # one assignment: kept whole for after a delete
        return state

    @property
    def _row(self) -> ChatRow:
        return self._state[0]

    @property
    def path(self) -> str:
        return self._state[1]

    @property
    def name(self) -> str:
        return self._row.name

    @property
    def system_prompt(self) -> str | None:
        return self._row.system_prompt

    @property
    def fork_seq(self) -> int:
        return self._row.fork_seq

    @property
    def parent(self) -> "Chat | None":
        return self.tree._by_id.get(self._row.parent_id) if self._row.parent_id else None

    @property
    def children(self) -> list["Chat"]:
        return self.tree.children(self)

    @property
    def messages(self) -> list[Message]:
        """This chat's own messages (not the inherited ones)."""
        return [Message.from_row(r) for r in self.tree.store.messages(self.id)]

    def context(self) -> list[dict[str, str]]:
        return self.tree.context(self)

    def __repr__(self) -> str:
        return f"<Chat {self.path}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Chat) and other.id == self.id and other.tree is self.tree

    def __hash__(self) -> int:
        return hash((id(self.tree), self.id))



class _Index(NamedTuple):
    """The in-memory index of the chats, replaced as a whole by :meth:`ChatTree.refresh`
    (one assignment): a Ctrl-C anywhere in a refresh leaves the old index or the new."""

    version: int
    chats: dict[int, Chat]  # by id
    paths: dict[str, Chat]
    children: dict[int | None, list[int]]
    state: dict[int, tuple[ChatRow, str]]  # each chat's row and path


_EMPTY = _Index(-1, {}, {}, {}, {})


class ChatTree:
    """The whole tree, backed by a :class:`Store`. Chats are indexed in memory (a few MB
    for 10,000 chats); messages are read from the store when needed. Changes made by
    another process are picked up when the store's data version moves."""

    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.path = Path(path).expanduser() if path is not None else default_store_path()
        self.store = Store(self.path)
        self._lock = threading.RLock()
        self._listeners = Listeners()
        self._index = _EMPTY
        # reply id -> (its user message, its chat's id and path when it began): what a
        # recovery needs once the chat is gone (its id may then name a new chat)
        self._open_turns: dict[int, tuple[Message, int, str]] = {}
        self._held: tuple[int, list[tuple[str, dict[str, Any]]]] | None = None  # see atomic()
        self._deferred: tuple[int, list[tuple]] | None = None  # see defer_replies()
        self.refresh(force=True)
        if ROOT not in self._by_path:
            self.store.insert_chat(None, ROOT, None, 0)
            self.refresh(force=True)

    @contextmanager
    def atomic(self) -> Iterator[None]:
        """Every change made in the block is one transaction: all of it is kept, or (on
        any exception) none. Events are held and sent only once it is committed."""
        with self._lock:
            if self._held is not None:  # already inside one: part of it
                yield
                return
            self._held = (threading.get_ident(), [])
            try:
                with self.store.transaction():
                    yield
            except BaseException:
                self._held = None
                self.refresh(force=True)  # the index saw rows that were rolled back
                raise
            held, self._held = self._held[1], None
        for event, data in held:
            self.emit(event, **data)

    # -- index -------------------------------------------------------------------------------
    @property
    def _by_id(self) -> dict[int, Chat]:
        return self._index.chats

    @property
    def _by_path(self) -> dict[str, Chat]:
        return self._index.paths

    @property
    def _children(self) -> dict[int | None, list[int]]:
        return self._index.children

    @property
    def _version(self) -> int:
        return self._index.version

    def refresh(self, force: bool = False) -> bool:
        """Reload the chat index if another connection changed the store. True if reloaded.
        The new index is built aside and put in place by one assignment, so an interrupt
        (Ctrl-C) at any point leaves the old index or the new one, never a mix."""
        with self._lock:
            version = self.store.data_version()
            if not force and version == self._version:
                return False
            rows = self.store.load_chats()
            by_id: dict[int, ChatRow] = {r.id: r for r in rows}
            children: dict[int | None, list[int]] = {}
            for r in rows:
                children.setdefault(r.parent_id, []).append(r.id)
            paths: dict[int, str] = {}

            def path_of(cid: int) -> str:
                chain = []
                cur: int | None = cid
                while cur is not None and cur not in paths:
                    chain.append(cur)
                    if len(chain) > len(by_id):
                        raise StoreError(f"chat store {self.store.path} is damaged (chats form a "
                                         "loop); keep a copy and open another store")
                    row = by_id.get(cur)
                    if row is None:
                        raise StoreError(
                            f"chat store {self.store.path} is damaged (chat {chain[-2] if len(chain) > 1 else cid} "
                            f"names a parent #{cur} that does not exist); keep a copy, salvage it "
                            "with the sqlite3 tool (.recover), or open another store")
                    cur = row.parent_id
                base = paths[cur] if cur is not None else None
                for c in reversed(chain):
                    base = by_id[c].name if base is None else f"{base}/{by_id[c].name}"
                    paths[c] = base
                return paths[cid]

            old = self._index.chats
            by_chat: dict[int, Chat] = {}
            by_path: dict[str, Chat] = {}
            state: dict[int, tuple[ChatRow, str]] = {}
            for r in rows:
                p = path_of(r.id)
                chat = old.get(r.id)  # a handle held elsewhere reads its new state
                if chat is None:
                    chat = Chat(self, r, p)
                by_chat[r.id] = chat
                by_path[p] = chat
                state[r.id] = (r, p)
            self._index = _Index(version, by_chat, by_path, children, state)
            return True

    def added(self, rows: list[ChatRow]) -> None:
        """Put chats this connection just inserted (and committed) into the index without
        reloading it: a new index is made from the current one and these rows, and put in
        place by one assignment (a Ctrl-C leaves the old or the new). The index keeps its
        data version, so a change another connection made meanwhile is still read at the
        next look. A row whose parent the index does not hold: a whole reload instead."""
        with self._lock:
            old = self._index
            chats, paths, state = dict(old.chats), dict(old.paths), dict(old.state)
            children = dict(old.children)
            grown: set[int | None] = set()
            for r in sorted(rows, key=lambda r: r.id):
                parent = state.get(r.parent_id) if r.parent_id is not None else None
                if parent is None or r.id in state:
                    self.refresh(force=True)
                    return
                path = f"{parent[1]}/{r.name}"
                chat = Chat(self, r, path)
                chats[r.id], paths[path], state[r.id] = chat, chat, (r, path)
                if r.parent_id not in grown:  # (a list of its own: the old index's is kept)
                    children[r.parent_id] = list(children.get(r.parent_id, ()))
                    grown.add(r.parent_id)
                children[r.parent_id].append(r.id)
            self._index = _Index(old.version, chats, paths, children, state)

    def _maybe_refresh(self) -> None:
        if self.store.data_version() != self._version:
            self.refresh()

    def _after_write(self) -> None:
        # our own commits do not move data_version for our connection; re-read the index
        self.refresh(force=True)

    # -- listeners (the live widget) --------------------------------------------------------
    def subscribe(self, listener: Listener, *, relays: Listeners | None = None) -> Callable[[], None]:
        """Call ``listener(event, data)`` on ``chat-created``, ``chat-deleted``,
        ``chat-renamed``, ``message``, ``reply-start``, ``reply-delta``, ``reply-end``.
        ``relays``: the listeners ``listener`` passes the events on to (the core's), so
        that per-chunk events are built only while someone is at the end of the relay.
        Returns the unsubscribe function."""
        return self._listeners.add(listener, relays=relays)

    @property
    def has_listeners(self) -> bool:
        """Whether anyone listens, through any relay (a turn builds its per-chunk event
        only then: with no view open, a streamed chunk costs no event)."""
        return self._listeners.wanted()

    def emit(self, event: str, **data: Any) -> None:
        held = self._held
        if held is not None and held[0] == threading.get_ident():
            held[1].append((event, data))  # inside atomic(): sent once committed
            return
        self._listeners.send(event, data)

    # -- chats -------------------------------------------------------------------------------
    @property
    def root(self) -> Chat:
        return self.get(ROOT)

    def __contains__(self, path: str) -> bool:
        try:
            self.get(path)
            return True
        except (ChatNotFound, InvalidInput):
            return False

    def find(self, chat_id: int) -> Chat | None:
        """The chat with this id, or ``None`` if it is gone (deleted here or elsewhere)."""
        with self._lock:
            self._maybe_refresh()
            return self._by_id.get(chat_id)

    def find_many(self, ids: list[int]) -> list[Chat | None]:
        """:meth:`find` of each id, with one look at whether the store changed."""
        with self._lock:
            self._maybe_refresh()
            chats = self._by_id
            return [chats.get(i) for i in ids]

    def get(self, path: "str | int | Chat") -> Chat:
        """The chat at ``path`` (or with this id); :class:`ChatNotFound` if there is none."""
        if isinstance(path, Chat):
            return path
        if isinstance(path, int) and not isinstance(path, bool):
            chat = self.find(path)
            if chat is None:
                raise ChatNotFound(f"chat #{path} no longer exists (deleted); pick another chat")
            return chat
        p = normalize_path(path)
        with self._lock:
            self._maybe_refresh()
            chat = self._by_path.get(p)
        if chat is None:
            raise ChatNotFound(f"no chat {p!r}{self._did_you_mean(p)}; create it with "
                               f"%%subchat {p} (its parent must exist)")
        return chat

    def _did_you_mean(self, path: str) -> str:
        """`` (did you mean 'root/Physics'?)`` when a chat's path differs only in case."""
        with self._lock:
            near = [q for q in self._by_path if q.lower() == path.lower() and q != path]
        return f" (did you mean {near[0]!r}? chat names are case-sensitive)" if near else ""

    def chats(self) -> list[Chat]:
        """All chats, parents before children, siblings in creation order."""
        return self.subtree(ROOT)

    def message_counts(self) -> dict[int, int]:
        """How many messages each chat holds (chat id -> count; chats without any are
        left out): one query, for the views' labels."""
        return self.store.message_counts()

    def children(self, chat: "str | Chat") -> list[Chat]:
        chat = self.get(chat)
        with self._lock:
            return [self._by_id[c] for c in self._children.get(chat.id, [])]

    def create(self, path: str, system_prompt: str | None = None) -> Chat:
        """Create the chat at ``path`` as a child of its parent path, branching at the
        parent's current last message. Its parent must exist."""
        p = normalize_path(path)
        if p == ROOT:
            raise InvalidInput("'root' always exists; name a subchat, e.g. root/topic")
        parent_path, _, name = p.rpartition("/")
        with self._lock:
            if p in self._by_path:
                raise InvalidInput(f"chat {p!r} already exists")
            try:
                parent = self.get(parent_path)
            except ChatNotFound:
                raise ChatNotFound(
                    f"cannot create {p!r}: its parent {parent_path!r} does not exist"
                    f"{self._did_you_mean(parent_path)}; "
                    f"create the parent first (%%subchat {parent_path}) or branch from an existing chat"
                ) from None
            fork = self.store.message_count(parent.id)
            row = self.store.insert_chat(parent.id, name, system_prompt, fork)
            self._after_write()
            chat = self._by_id[row.id]
        self.emit("chat-created", id=chat.id, path=chat.path)
        return chat

    def ensure(self, path: str, system_prompt: str | None = None) -> Chat:
        """The chat at ``path``, created (under an existing parent) if missing."""
        try:
            return self.get(path)
        except ChatNotFound:
            return self.create(path, system_prompt)

    def set_system_prompt(self, chat: "str | Chat", system_prompt: str | None) -> None:
        chat = self.get(chat)
        self.store.update_chat(chat.id, system_prompt=system_prompt or None)
        self._after_write()

    def rename(self, chat: "str | Chat", new_name: str) -> Chat:
        chat = self.get(chat)
        if chat.path == ROOT:
            raise InvalidInput("the root chat cannot be renamed")
        new_path = normalize_path(f"{chat.path.rpartition('/')[0]}/{new_name}")
        if new_path.count("/") != chat.path.count("/"):
            raise InvalidInput(f"a new name is one path part, not {new_name!r}")
        if new_path in self:
            raise InvalidInput(f"chat {new_path!r} already exists")
        old = chat.path
        self.store.update_chat(chat.id, name=new_path.rpartition("/")[2])
        self._after_write()
        self.emit("chat-renamed", id=chat.id, old=old, path=new_path)
        return self._by_id[chat.id]

    def delete(self, chat: "str | Chat", force: bool = False) -> list[str]:
        """Delete a chat; one with subchats needs ``force=True``. Deleting ``root`` always
        needs ``force``: it empties the tree. Returns the deleted paths."""
        chat = self.get(chat)
        sub = self.subtree(chat)
        gone, gone_ids = [c.path for c in sub], [c.id for c in sub]
        if chat.path == ROOT and not force:
            raise InvalidInput(
                "deleting root empties the whole tree (its messages and every subchat); "
                "%subchat delete root --force does it")
        if len(gone) > 1 and not force:
            raise InvalidInput(
                f"chat {chat.path!r} has {len(gone) - 1} subchat(s); "
                f"%subchat delete {chat.path} --force deletes them all"
            )
        self.store.delete_chat(chat.id)
        if chat.path == ROOT:
            self.store.insert_chat(None, ROOT, None, 0)
        self._after_write()
        self.emit("chat-deleted", paths=gone, ids=gone_ids)
        return gone

    def subtree(self, chat: "str | Chat") -> list[Chat]:
        chat = self.get(chat)
        out, stack = [], [chat.id]
        with self._lock:
            while stack:
                cid = stack.pop()
                out.append(self._by_id[cid])
                stack.extend(reversed(self._children.get(cid, [])))
        return out

    def lineage(self, chat: "str | Chat") -> list[Chat]:
        """Chats from the root down to ``chat``."""
        chat = self.get(chat)
        chain = [chat]
        while chain[-1].parent is not None:
            chain.append(chain[-1].parent)
        return chain[::-1]

    # -- messages ----------------------------------------------------------------------------
    def system_prompt_for(self, chat: "str | Chat") -> str | None:
        for c in reversed(self.lineage(chat)):
            if c.system_prompt:
                return c.system_prompt
        return None

    def _limits(self, chat: "str | Chat") -> list[tuple[int, int | None]]:
        chain = self.lineage(chat)
        return [(c.id, chain[i + 1].fork_seq if i + 1 < len(chain) else None)
                for i, c in enumerate(chain)]

    def history(self, chat: "str | Chat") -> list[Message]:
        """The messages on the path from the root to ``chat``: each ancestor's up to the
        point where the next chat down branched off, then the chat's own."""
        rows = self.store.path_messages(self._limits(chat), full=True)
        return [Message.from_row(Store._msg(r)) for r in rows]

    def context(self, chat: "str | Chat", new_user_message: str | None = None) -> list[dict[str, str]]:
        """The messages a backend is sent for ``chat``: system prompt first, then the
        inherited and own messages (empty cut replies left out), then the new message."""
        msgs: list[dict[str, str]] = []
        system = self.system_prompt_for(chat)
        if system:
            msgs.append({"role": "system", "content": system})
        # (chat_id, seq, role, content, status, tool meta) rows: the provenance is parsed
        # only for tool calls and results
        hist = self.store.path_messages(self._limits(chat), tool_meta=True)
        for i, (_, _, role, content, _, meta) in enumerate(hist):
            if meta is not None:
                msgs.append(tool_message(role, content, json.loads(meta)))
                continue
            if role == "assistant" and not content:
                continue  # a reply that failed or was stopped before its first token
            if role == "user" and i + 1 < len(hist):
                nxt = hist[i + 1]
                if nxt[2] == "assistant" and not nxt[3] and nxt[4] != "complete" and nxt[5] is None:
                    continue  # ...and the prompt it never answered (retried later)
            msgs.append({"role": role, "content": content})
        if new_user_message is not None:
            msgs.append({"role": "user", "content": new_user_message})
        return msgs

    def append(self, chat: "str | Chat", role: str, content: str, status: str = "complete",
               provenance: dict[str, Any] | None = None) -> Message:
        chat = self.get(chat)
        row = self.store.append_message(chat.id, role, content, status, provenance)
        msg = Message.from_row(row)
        self.emit("message", id=chat.id, path=chat.path, message=msg)
        return msg

    def begin_turn(self, chat: "str | Chat", prompt: str,
                   backend: str | None = None) -> tuple[Message, Message]:
        """Store a user message and its (empty, ``interrupted``) reply row together. If
        ``chat`` was deleted meanwhile (another kernel, a view), both go to a recovery
        chat (see :meth:`finish_reply`): the returned reply's ``chat_id`` says which."""
        chat = self.get(chat)
        prov = ({"finish_reason": "interrupted", "backend": backend} if backend
                else {"finish_reason": "interrupted"})
        try:
            user, reply = self.store.begin_turn(chat.id, prompt, prov)
        except StoreError:
            if self.find(chat.id) is not None:
                raise
            target = self._recovery_chat(chat.path)
            user, reply = self.store.begin_turn(target.id, prompt, dict(prov, recovered_from=chat.path))
            self._after_write()
            self._recovered(chat.id, chat.path, target, Message.from_row(reply))
        msg = Message.from_row(user)
        stored = self._by_id.get(user.chat_id, chat)
        self.emit("message", id=stored.id, path=stored.path, message=msg)
        # no tree lock here or in finish_reply: a batch calls both inside its store
        # transaction, and a view's thread may hold the tree lock waiting for the store
        # (one dict item set or popped is atomic)
        self._open_turns[reply.id] = (msg, chat.id, chat.path)
        return msg, Message.from_row(reply)

    def begin_turns(self, turns: list[tuple["Chat", str]],
                    backend: str | None = None) -> list[tuple[Message, Message]]:
        """:meth:`begin_turn` for many chats together (a batch's rows): one store call.
        Where one of the chats is gone (deleted meanwhile), nothing of the call is written
        and the turns are begun one by one instead (each as :meth:`begin_turn` does)."""
        prov = ({"finish_reason": "interrupted", "backend": backend} if backend
                else {"finish_reason": "interrupted"})
        try:
            rows = self.store.begin_turns([(chat.id, prompt) for chat, prompt in turns], prov)
        except StoreError:
            return [self.begin_turn(chat, prompt, backend) for chat, prompt in turns]
        out = []
        for (chat, _), (user, reply) in zip(turns, rows):
            msg = Message.from_row(user)
            self.emit("message", id=chat.id, path=chat.path, message=msg)
            self._open_turns[reply.id] = (msg, chat.id, chat.path)
            out.append((msg, Message.from_row(reply)))
        return out

    def begin_reply(self, chat: "str | Chat", backend: str | None = None) -> Message:
        """Store an empty ``interrupted`` reply row with no new user message: the next
        round of a tool loop answers the tool results just stored."""
        chat = self.get(chat)
        prov: dict[str, Any] = {"finish_reason": "interrupted"}
        if backend:
            prov["backend"] = backend
        return Message.from_row(self.store.append_message(chat.id, "assistant", "", "interrupted", prov))

    def defer_replies(self, on: bool = True) -> None:
        """Inside a store transaction held by this thread (a batch's write block): the
        replies :meth:`finish_reply` writes from this thread are written together by
        :meth:`flush_replies` (one statement, not one UPDATE a row: each SQLite call
        handed the GIL to the engine's thread). They are never written without it: the
        block flushes before it commits, or writes every row again if it is cut.
        ``on=False``: defer no more, and drop what was deferred (rolled back anyway)."""
        self._deferred = (threading.get_ident(), []) if on else None

    def flush_replies(self, stop: bool = False) -> None:
        """Write the replies deferred so far (``stop``: and defer no more). A reply whose
        row is gone (its chat deleted meanwhile) is recovered as :meth:`finish_reply` does:
        its message is then the recovery chat's, changed in place."""
        held = self._deferred
        if held is None:
            return
        items = held[1]
        self._deferred = None if stop else (held[0], [])
        if not items:
            return
        found = self.store.update_replies([(msg.id, msg.content, msg.status, as_json,
                                            msg.created_at) for msg, _, as_json in items])
        for (msg, began, _), ok in zip(items, found):
            if not ok:
                user, began_id, began_path = began
                got = self._recover(began_id, began_path, user, msg.content, msg.status,
                                    msg.provenance)
                msg.provenance, msg.seq, msg.id = got.provenance, got.seq, got.id
                msg.created_at, msg.chat_id = got.created_at, got.chat_id

    def finish_reply(self, chat: "str | Chat", reply: Message, content: str, status: str,
                     provenance: dict[str, Any]) -> Message:
        """Write a reply's final text, status and provenance. A reply whose chat was
        deleted while it streamed is not dropped: the exchange (its message and the reply)
        is stored in ``<nearest surviving ancestor>/recovered/<name>``, a
        ``reply-recovered`` event (id, path, to_id, to, message) says where, and the
        returned message's ``chat_id`` is that chat's."""
        chat = self.get(chat)
        opened = self._open_turns.pop(reply.id, None) if reply.id is not None else None
        user, began_id, began_path = opened or (None, chat.id, chat.path)
        content = redact(content)
        as_json, provenance = redact_json(provenance)  # (a key in a tool call's arguments)
        held = self._deferred
        if (held is not None and reply.id is not None and held[0] == threading.get_ident()
                and (reply.chat_id is None or reply.chat_id == chat.id)):
            msg = Message("assistant", content, status, provenance, reply.seq, reply.id,
                          reply.created_at, chat.id)
            # written by flush_replies(), its provenance as the JSON text made here
            held[1].append((msg, (user, began_id, began_path), as_json))
            self.emit("message", id=chat.id, path=chat.path, message=msg)
            return msg
        if reply.id is not None and self.store.update_reply(reply.id, content, status, provenance,
                                                            created_at=reply.created_at):
            where = chat  # (found only when begin_turn put it elsewhere: rare, and locks)
            if reply.chat_id is not None and reply.chat_id != chat.id:
                where = self.find(reply.chat_id) or chat
            msg = Message("assistant", content, status, provenance, reply.seq, reply.id,
                          reply.created_at, where.id)
            self.emit("message", id=where.id, path=where.path, message=msg)
            return msg
        return self._recover(began_id, began_path, user, content, status, provenance)

    def _recover(self, old_id: int, old_path: str, user: Message | None, content: str,
                 status: str, provenance: dict[str, Any]) -> Message:
        """Store an exchange whose chat is gone in a recovery chat; its reply message."""
        self.refresh(force=True)
        target = self._recovery_chat(old_path)
        prov = dict(provenance, recovered_from=old_path)
        with self.store.transaction():
            if user is not None:
                u = Message.from_row(self.store.append_message(target.id, "user", user.content))
            row = self.store.append_message(target.id, "assistant", content, status, prov)
        self._after_write()
        msg = Message.from_row(row)
        if user is not None:
            self.emit("message", id=target.id, path=target.path, message=u)
        self.emit("message", id=target.id, path=target.path, message=msg)
        self._recovered(old_id, old_path, target, msg)
        return msg

    def _recovered(self, old_id: int, old_path: str, target: Chat, msg: Message) -> None:
        self.emit("reply-recovered", id=old_id, path=old_path, to_id=target.id,
                  to=target.path, message=msg)

    def _recovery_chat(self, old_path: str) -> Chat:
        """A new chat ``<nearest surviving ancestor>/recovered/<name>`` (``-2``, ``-3``…
        when taken) for an exchange whose chat (last seen at ``old_path``) was deleted."""
        parts = old_path.split("/")
        ancestor = self.root
        for k in range(len(parts) - 1, 0, -1):
            found = self._by_path.get("/".join(parts[:k]))
            if found is not None:
                ancestor = found
                break
        folder = self.ensure(f"{ancestor.path}/{RECOVERED}")
        base = parts[-1][:90]
        name, n = base, 1
        while f"{folder.path}/{name}" in self._by_path:
            n += 1
            name = f"{base}-{n}"
        return self.create(f"{folder.path}/{name}")

    def close(self) -> None:
        self.store.close()

    def __repr__(self) -> str:
        return f"<ChatTree {self.path} ({len(self._by_id)} chats)>"
