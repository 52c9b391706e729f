"""Batches over data: one message per item of a list or a DataFrame, each in its own chat.

A batch is a chat ``PATH/NAME`` that holds no messages (so every row inherits ``PATH``'s
context) with one subchat per item, ``PATH/NAME/<index>``, holding that item's exchange.
Rows go through the backend's pool (:mod:`subchat_magics.backends.pool`): on vLLM every
row in flight is in the engine at once, batched continuously; remote backends keep
``concurrency`` requests in flight. Each row is stored the moment it ends, so running the
same batch again sends only the rows without a complete reply to the same message.

A row's reply records ``batch: {"of": N, "item": NAME}`` in its provenance; that mark is
how the text tree and the tree view recognise a batch and fold it into one line
(:func:`summaries`).

Core: imports the exchange, the tree and the backends; never IPython, never pandas (a value
is a pandas one only if pandas is already imported).
"""

from __future__ import annotations

import keyword
import re
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .backends.base import Backend, GenerationOptions
from .backends.registry import Selection
from .errors import InvalidInput, SubchatError
from .exchange import Exchange, Runner
from .tree import Chat, ChatTree, normalize_path

DEFAULT_CONCURRENCY = 4  # remote backends: requests in flight
ENGINE_IN_FLIGHT = 1024  # vLLM: requests in the engine at once (its scheduler takes what fits)
CREATE_CHUNK = 256  # row chats made ahead at least (one index reload a round; rounds double)
SUBMIT_EVERY = 16  # rows handed to the pool together while the next ones are prepared
PROGRESS_EVERY_S = 0.1  # progress callbacks at most this often
MARK = "batch"  # the provenance key of a row's reply
_NAME_TOKEN = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
_UNSAFE = re.compile(r"[^\w.\-]")


# -- the items -----------------------------------------------------------------------------------
@dataclass
class Entry:
    """One item: its position, its label (``{index}``), the item (``{item}``) and its
    fields (``{field}``: a mapping's keys, a DataFrame row's columns, a named tuple's)."""

    pos: int
    label: Any
    item: Any
    fields: dict[str, Any] | None = None


@dataclass
class Items:
    """The items of a batch, and whether (and how) they came from pandas."""

    entries: list[Entry]
    pandas_index: Any = None  # the index of a Series/DataFrame input (results keep it)


def _pandas(value: Any) -> Any:
    """pandas, if ``value`` is one of its objects (it is then already imported)."""
    mods = {c.__module__.partition(".")[0] for c in type(value).__mro__}
    return sys.modules.get("pandas") if "pandas" in mods else None


def items_of(value: Any, name: str = "the items") -> Items:
    """The entries of a list, tuple, any sized iterable, a dict (keys are the labels), a
    pandas Series or DataFrame (the index labels). A str, bytes or an unsized iterator is
    refused: it is almost never a list of items."""
    pd = _pandas(value)
    if pd is not None and isinstance(value, pd.DataFrame):
        cols = [str(c) for c in value.columns]
        entries = [Entry(i, label, dict(zip(cols, row)), dict(zip(cols, row)))
                   for i, (label, row) in enumerate(zip(value.index,
                                                        value.itertuples(index=False, name=None)))]
        return Items(entries, value.index)
    if pd is not None and isinstance(value, pd.Series):
        return Items([Entry(i, label, v, fields_of(v)) for i, (label, v)
                      in enumerate(zip(value.index, value.tolist()))], value.index)
    if isinstance(value, (str, bytes, bytearray)):
        raise InvalidInput(f"{name} is a {type(value).__name__}, one text, not a list of items; "
                           f"put it in a list ([{name}]) or split it")
    if isinstance(value, dict):
        return Items([Entry(i, k, v, fields_of(v)) for i, (k, v) in enumerate(value.items())])
    if not hasattr(value, "__iter__") or not hasattr(value, "__len__"):
        kind = "an iterator without a length" if hasattr(value, "__iter__") else "not iterable"
        raise InvalidInput(f"{name} is {kind} ({type(value).__name__}); give a list, a tuple, "
                           f"a dict, a pandas Series or DataFrame (list({name}) if it is a "
                           "generator)")
    try:
        values = list(value)
    except TypeError as exc:
        raise InvalidInput(f"{name} cannot be iterated ({type(value).__name__}: {exc})") from None
    return Items([Entry(i, i, v, fields_of(v)) for i, v in enumerate(values)])


def fields_of(value: Any) -> dict[str, Any] | None:
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields") and hasattr(value, "_asdict"):
        return dict(value._asdict())
    pd = _pandas(value)
    if pd is not None and isinstance(value, pd.Series):
        return {str(k): v for k, v in value.items()}
    return None


def names_in(template: str) -> list[str]:
    """The ``{name}`` references of a template, in order, once each (``{{x}}`` is not one)."""
    out = [m.group(1) for m in _NAME_TOKEN.finditer(template) if m.group(1)]
    return list(dict.fromkeys(out))


def check_fields(template: str, items: Items, known: Callable[[str], bool]) -> None:
    """Refuse, before any request, a ``{name}`` that is not ``item``/``index``, not
    ``known`` (the notebook's namespace) and missing from some item with fields: the
    error names the field and the first item without it."""
    with_fields = [e for e in items.entries if e.fields is not None]
    if not with_fields:
        return
    for name in names_in(template):
        if name in ("item", "index"):
            continue
        holders = sum(1 for e in with_fields if name in e.fields)  # type: ignore[operator]
        if holders == 0 and known(name):
            continue  # a name of the namespace, not a field
        if holders == len(items.entries):
            continue
        first = next(e for e in items.entries if e.fields is None or name not in e.fields)
        have = sorted(first.fields or {})
        raise InvalidInput(
            f"the template names {{{name}}}, but item {first.label!r} (position {first.pos}) has "
            f"no field {name!r}" + (f" (its fields: {', '.join(have[:10])})" if have else "")
            + f"; write {{{{{name}}}}} for the braces themselves")


def row_names(entries: list[Entry]) -> list[str]:
    """Each row chat's name: its label made a path part (``/``, spaces… become ``_``);
    positions ``0``, ``1``… when labels clash or cannot be made one."""
    names = [_UNSAFE.sub("_", str(e.label))[:100] for e in entries]
    if len(set(names)) != len(names) or any(n in ("", ".", "..") for n in names):
        return [str(e.pos) for e in entries]
    return names


def check_name(name: str, what: str = "--each") -> str:
    name = str(name)
    if not re.fullmatch(r"[\w.\-]{1,100}", name) or name in (".", ".."):
        raise InvalidInput(f"{what} {name!r} cannot name a chat: letters, digits, '_', '-', '.'")
    return name


def check_var(name: str | None, what: str = "--as") -> None:
    if name is not None and (not name.isidentifier() or keyword.iskeyword(name)):
        raise InvalidInput(f"{what} needs a Python name that is not a keyword, not {name!r}")


# -- a run ---------------------------------------------------------------------------------------
@dataclass
class Row:
    """One item's row: where it is stored, what was sent, and how it ended."""

    pos: int
    label: Any
    name: str
    text: str
    status: str = "pending"  # pending | done | failed | interrupted
    result: Any = None  # the reply text (or parsed value), None unless done
    reason: str | None = None  # why it failed or was cut
    reused: bool = False  # done in an earlier run, not sent again
    chat_id: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Progress:
    """Where a batch stands (what the progress bar and the summary show)."""

    total: int
    done: int = 0
    failed: int = 0
    interrupted: int = 0
    reused: int = 0
    in_flight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0
    finished: bool = False

    @property
    def ended(self) -> int:
        return self.done + self.failed + self.interrupted

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the rate of the rows sent in this run (None before the first)."""
        sent = self.ended - self.reused
        left = self.total - self.ended
        if left <= 0:
            return 0.0
        if sent <= 0 or self.elapsed_s <= 0:
            return None
        return left * self.elapsed_s / sent


@dataclass
class BatchResult:
    """What a batch gave: ``results`` in input order (None for a row that did not
    complete), every row, and the figures of this run."""

    path: str
    rows: list[Row]
    stats: Progress
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)
    index: Any = None  # the pandas index of the input's rows, if it was pandas

    @property
    def results(self) -> list[Any]:
        return [r.result if r.status == "done" else None for r in self.rows]

    def output(self, name: str | None = None) -> Any:
        """The results as the input was: a list, or a pandas Series with the input's index
        (``name`` its name) when the input was a Series or a DataFrame."""
        values = self.results
        if self.index is None:
            return values
        pd = sys.modules["pandas"]
        return pd.Series(values, index=self.index, name=name, dtype=object)

    def summary(self) -> str:
        s = self.stats
        bits = [f"{s.total} items", f"{s.done} done" + (f" ({s.reused} reused)" if s.reused else ""),
                f"{s.failed} failed"]
        if s.interrupted:
            bits.append(f"{s.interrupted} interrupted")
        rate = f"{s.tokens_per_s:,.0f} tokens/s"
        return (f"batch {self.path}: {', '.join(bits)} · tokens {s.prompt_tokens:,} in / "
                f"{s.completion_tokens:,} out · {s.elapsed_s:.2f} s · {rate}")

    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.status in ("failed", "interrupted")]


class Batch:
    """A planned batch: the rows to send and the rows reused. :meth:`run` sends them.

    Made by :meth:`subchat_magics.session.Session.batch`, which checks everything first;
    ``make_exchange(chat, text)`` makes the exchange of one row (the session's options and
    system prompt); the rows run through one :class:`~subchat_magics.exchange.Runner` on
    the planned ``selection``."""

    def __init__(self, tree: ChatTree, chat: Chat, rows: list[Row], *, selection: Selection,
                 make_exchange: Callable[..., Exchange], in_flight: int,
                 stale: list[int] | None = None, notes: list[str] | None = None,
                 index: Any = None, run_tools: Callable[[Chat, list], None] | None = None,
                 max_rounds: int = 5):
        self.tree = tree
        self.index = index
        self.chat = chat
        self.rows = rows
        self.selection = selection
        self.make_exchange = make_exchange
        self.in_flight = max(1, int(in_flight))
        self.stale = stale or []  # row chats holding a cut reply: made again before sending
        self.notes = notes or []
        self.progress = Progress(total=len(rows))
        for r in rows:
            if r.reused:
                self.progress.reused += 1
                if r.status == "done":
                    self.progress.done += 1
                else:
                    self.progress.failed += 1
        self._started = False
        self._ready: deque = deque()  # (row, chat) made ahead of sending
        self._group: list[Exchange] | None = None  # the rows stored in the open _writes block
        self._kids: dict[str, Chat] | None = None
        self._rows: dict[int, Row] = {}  # id(exchange) -> its row
        # with tools: ``run_tools(chat, calls)`` runs a row's calls and stores the results
        # (the session's tool loop); the row then goes on with a follow-up exchange
        self.run_tools = run_tools
        self.max_rounds = max_rounds
        self._calling: deque = deque()  # (row, exchange) whose reply called tools
        self._rounds: dict[int, int] = {}  # row chat id -> rounds of calls so far

    @property
    def backend(self) -> Backend:
        return self.selection.candidates[0]

    @property
    def path(self) -> str:
        return self.chat.path

    @property
    def to_send(self) -> int:
        return sum(1 for r in self.rows if not r.reused)

    def run(self, progress: Callable[[Progress], None] | None = None,
            every: float = PROGRESS_EVERY_S) -> BatchResult:
        """Send every row not done yet and wait for them; ``progress(Progress)`` is called
        at most every ``every`` seconds and once at the end. Ctrl-C (or a
        ``KeyboardInterrupt`` from ``progress``) stops every request in flight at once,
        keeps what completed, marks the cut rows ``interrupted`` and re-raises; the rows
        stay in :attr:`rows` and :meth:`result` gives what there is."""
        if self._started:
            raise InvalidInput("a batch runs once; plan it again to resume it")
        self._started = True
        t0 = time.perf_counter()
        p = self.progress
        last = [0.0]

        def tick(force: bool = False) -> None:
            now = time.perf_counter()
            p.elapsed_s = now - t0
            if progress is not None and (force or now - last[0] >= every):
                last[0] = now
                progress(p)

        tick(force=True)
        self.tree.emit("batch-start", id=self.chat.id, path=self.path, total=len(self.rows))
        self._drop_stale()
        pending = deque(r for r in self.rows if not r.reused)
        if not pending:  # every row done before: nothing to send, no backend needed
            p.finished = True
            tick(force=True)
            return self.result()
        runner = Runner(self.selection, size=self.in_flight, stream_deltas=False,
                        on_end=self._record)
        try:
            while pending or runner.flying:
                if pending and runner.in_flight < self.in_flight:
                    self._start(pending, runner)
                    p.in_flight = runner.in_flight
                with self._writes(runner):  # the rows that ended together: one commit
                    runner.step(0.05)
                    while (runner.handled and runner.flying
                           and not (pending and runner.in_flight < self.in_flight // 2 + 1)):
                        runner.step(0)  # (top up the engine before handling the rest)
                if self._calling:  # outside the write transaction: a tool may take its time
                    self._call_tools(runner)
                p.in_flight = runner.in_flight
                tick()
        except BaseException as exc:
            runner.close(exc)
            p.in_flight = 0
            p.finished = True
            tick(force=True)
            raise
        finally:
            runner.close()
        p.in_flight = 0
        p.finished = True
        tick(force=True)
        return self.result()

    def result(self) -> BatchResult:
        """The rows as they stand (after :meth:`run`, or after it was interrupted)."""
        return BatchResult(self.path, self.rows, self.progress,
                           interrupted=any(r.status == "interrupted" for r in self.rows),
                           notes=list(self.notes), index=self.index)

    # -- inside the run ----------------------------------------------------------------------------
    @contextmanager
    def _writes(self, runner: Runner) -> Iterator[None]:
        """One transaction for the rows stored in the block (a commit a row costs more than
        the engine's step on a small model). If it is cut (Ctrl-C lands inside), the
        replies it held are written again one by one, so the store says what the rows say."""
        self._group = []
        try:
            with self.tree.store.transaction():
                yield
        except BaseException:
            ended = [ex for ex in runner.flying.values() if ex.reply is not None]  # (cut mid-store)
            for ex in self._group + ended:
                r = ex.reply
                if r is not None:
                    self.tree.store.update_reply(r.id, r.content, r.status, r.provenance)
            raise
        finally:
            self._group = None

    def _drop_stale(self) -> None:
        for cid in self.stale:
            chat = self.tree.find(cid)
            if chat is not None:
                self.tree.delete(chat, force=True)
        self.stale = []

    def _start(self, pending: deque, runner: Runner) -> None:
        """Submit rows until ``in_flight`` are in flight, together; their chats are made
        ahead, ``CREATE_CHUNK`` at a time and more (one store round and index reload each)."""
        while pending and runner.in_flight < self.in_flight:
            if not self._ready:  # chunks grow with the rows made: few index reloads
                size = max(CREATE_CHUNK, len(self._kids or ()))
                chunk = [pending[i] for i in range(min(size, len(pending)))]
                self._ready.extend(zip(chunk, self._row_chats(chunk)))
            group = []
            while (pending and self._ready and runner.in_flight + len(group) < self.in_flight
                   and len(group) < SUBMIT_EVERY):
                row, chat = self._ready.popleft()
                pending.popleft()
                ex = self.make_exchange(chat, row.text)
                ex.provenance[MARK] = {"of": len(self.rows), "item": row.name}
                row.status, row.chat_id = "pending", chat.id
                self._rows[id(ex)] = row
                group.append(ex)
            runner.begin(group)  # a group's messages: one commit
            runner.submit(group)  # the engine starts on these while we make the next

    def _row_chats(self, rows: list[Row]) -> list[Chat]:
        tree = self.tree
        if self._kids is None:
            self._kids = {c.name: c for c in tree.children(self.chat)}
        kids = self._kids
        with tree.store.transaction():
            made = [tree.store.insert_chat(self.chat.id, r.name, None, 0).id
                    for r in rows if r.name not in kids]
        if made:
            tree.refresh(force=True)
            for cid in made:
                chat = tree.find(cid)
                if chat is not None:
                    kids[chat.name] = chat
                    tree.emit("chat-created", id=chat.id, path=chat.path)
        return [kids[r.name] for r in rows]

    def _call_tools(self, runner: Runner) -> None:
        """Run the calls of each row whose reply called tools, then send its next round
        (a follow-up exchange), or end the row when it has had ``max_rounds``."""
        while self._calling:
            row, ex = self._calling.popleft()
            rounds = self._rounds[ex.chat.id] = self._rounds.get(ex.chat.id, 0) + 1
            self.run_tools(ex.chat, list(ex.finish.tool_calls))  # type: ignore[misc,union-attr]
            if rounds >= self.max_rounds:
                row.status = "failed"
                row.reason = (f"stopped after {rounds} round(s) of tool calls (--max-rounds "
                              f"{self.max_rounds}), no answer")
                self.progress.failed += 1
                continue
            nxt = self.make_exchange(ex.chat, None, follow_up=True)
            self._rows[id(nxt)] = row
            runner.begin([nxt])
            runner.submit([nxt])

    def _record(self, ex: Exchange) -> None:
        row = self._rows.pop(id(ex), None)
        if row is None:
            return
        if self._group is not None:
            self._group.append(ex)
        reply = ex.reply
        p = self.progress
        f = ex.finish
        if f is not None:
            row.prompt_tokens += f.prompt_tokens or 0
            row.completion_tokens += f.completion_tokens or 0
            p.prompt_tokens += f.prompt_tokens or 0
            p.completion_tokens += f.completion_tokens or 0
        status = reply.status if reply is not None else "interrupted"
        if (status == "complete" and self.run_tools is not None and f is not None
                and f.tool_calls):
            self._calling.append((row, ex))  # its calls run after this step's commit
            return
        if status == "complete":
            row.status, row.reason = "done", None
            row.result = ex.value if ex.options.constraint is not None else ex.text
            p.done += 1
        elif status == "interrupted":
            row.status, row.reason = "interrupted", "interrupted"
            p.interrupted += 1
        else:
            row.status = "failed"
            row.reason = (reply.provenance.get("error") or reply.provenance.get("finish_reason")
                          if reply is not None else "error")
            p.failed += 1


# -- resuming ---------------------------------------------------------------------------------------
def chat_path(tree: ChatTree, parent: Chat, name: str, fresh: bool) -> str:
    """``PARENT/NAME``; with ``fresh`` the first of ``NAME``, ``NAME-2``… that is free."""
    path = normalize_path(f"{parent.path}/{name}")
    if not fresh:
        chat = tree.get(path) if path in tree else None
        if chat is not None and tree.store.message_count(chat.id):
            raise InvalidInput(f"{path} holds messages, so it is not a batch chat; name the "
                               "batch otherwise (--each of another variable) or use --fresh")
        return path
    k, candidate = 1, path
    while candidate in tree:
        k += 1
        candidate = f"{path}-{k}"
    return candidate


def match_rows(tree: ChatTree, chat: Chat, rows: list[Row],
               opts: GenerationOptions) -> tuple[list[int], list[str]]:
    """Mark the rows an earlier run completed with the same message as reused; return
    the row chats holding only a cut or failed reply (made again before sending) and
    notes. A row chat holding another message is refused: the data or the template
    changed since, and mixing two runs in one batch would lie."""
    kids = {c.name: c for c in tree.children(chat)}
    firsts = first_exchanges(tree, chat)
    stale: list[int] = []
    notes: list[str] = []
    kept = 0
    for r in rows:
        c = kids.get(r.name)
        if c is None:
            continue
        ex = firsts.get(c.id) or []
        if not ex:
            continue  # made, never sent
        if ex[0][0] != "user" or ex[0][1] != r.text:
            raise InvalidInput(
                f"{c.path} holds another message than item {r.label!r} gives now (the data "
                f"or the template changed since that batch ran); --fresh starts a new batch "
                f"chat, or %subchat delete {chat.path} --force removes the old one")
        if len(ex) > 1 and ex[1][2] == "complete" and ex[1][3].get("tool_calls"):
            # a row answered with tools: done when its last message is a complete answer
            last = tree.store.messages(c.id)[-1]
            if last.role == "assistant" and last.status == "complete" \
                    and not last.provenance.get("tool_calls"):
                ex = [ex[0], (last.role, last.content, last.status, last.provenance)]
            elif not c.children:
                stale.append(c.id)  # its loop was cut: sent again from the start
                continue
        if len(ex) > 1 and ex[1][2] == "complete":
            r.reused, r.status, r.chat_id = True, "done", c.id
            r.result = ex[1][1]
            if opts.constraint is not None:
                try:
                    r.result = opts.constraint.parse(ex[1][1])
                except SubchatError:
                    r.reused, r.status, r.result = False, "pending", None
                    stale.append(c.id)
            continue
        if tree.store.message_count(c.id) <= 2 and not c.children:
            stale.append(c.id)
        else:  # a cut row that was continued by hand: kept as it is, not sent again
            r.reused, r.status, r.chat_id = True, "failed", c.id
            r.reason = ex[1][2] if len(ex) > 1 else "no reply"
            kept += 1
    if kept:
        notes.append(f"{kept} row(s) without a complete first reply were continued by hand; "
                     "they are kept as they are (not sent again)")
    return stale, notes


# -- what the tree holds -----------------------------------------------------------------------------
@dataclass
class Summary:
    """A batch chat as the tree shows it: ``[987/1000 done, 13 failed]``."""

    chat_id: int
    total: int
    done: int = 0
    failed: int = 0
    interrupted: int = 0
    rows: int = 0  # row chats present

    def label(self) -> str:
        bits = [f"{self.done}/{self.total} done"]
        if self.failed:
            bits.append(f"{self.failed} failed")
        if self.interrupted:
            bits.append(f"{self.interrupted} interrupted")
        return f"[{', '.join(bits)}]"


def summaries(tree: ChatTree, counts: dict[int, int] | None = None) -> dict[int, Summary]:
    """Every batch chat of ``tree`` (a chat holding no messages whose subchats' first
    replies carry the batch mark), by chat id, with its rows' counts: a row is done when
    its first reply completed, failed when it ended in an error, interrupted otherwise
    (cut, or streaming now). One query a candidate (a chat with subchats and no messages)."""
    counts = tree.store.message_counts() if counts is None else counts
    candidates = [c for c in tree.chats() if not counts.get(c.id) and c.children]
    out: dict[int, Summary] = {}
    for chat in candidates:
        firsts = {cid: ex[1] for cid, ex in first_exchanges(tree, chat).items() if len(ex) > 1}
        marked = [ex[3] for ex in firsts.values() if isinstance(ex[3].get(MARK), dict)]
        if not marked:
            continue
        total = max(int(p[MARK].get("of") or 0) for p in marked)
        rows = len(tree.children(chat))
        s = Summary(chat.id, max(total, rows), rows=rows)
        for _, _, status, _ in firsts.values():
            if status == "complete":
                s.done += 1
            elif status == "error":
                s.failed += 1
            else:
                s.interrupted += 1
        out[chat.id] = s
    return out


def first_exchanges(tree: ChatTree, chat: Chat) -> dict[int, list[tuple]]:
    """The first two messages of each subchat of ``chat`` (a batch's rows): ``{chat_id:
    [(role, content, status, provenance), ...]}``, one query for all; a subchat with no
    messages is absent."""
    out: dict[int, list[tuple]] = {}
    for cid, _, role, content, status, prov in tree.store.first_exchanges(chat.id):
        out.setdefault(cid, []).append((role, content, status, prov))
    return out


__all__ = ["Batch", "BatchResult", "Entry", "Items", "Progress", "Row", "Summary",
           "items_of", "fields_of", "check_fields", "names_in", "row_names", "summaries",
           "first_exchanges", "DEFAULT_CONCURRENCY", "ENGINE_IN_FLIGHT"]
