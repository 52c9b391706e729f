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

import gc
import hashlib
import json
import keyword
import os
import re
import socket
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Callable, Iterator

from .backends.base import Backend, GenerationOptions
from .backends.registry import Selection
from .errors import InvalidInput, SubchatError
from .exchange import Exchange, Runner, contexts_known, system_in_force
from .prompting import TOO_LONG
from .secrets import redact, steady
from .settings import getenv
from .store import ChatRow
from .tree import Chat, ChatTree, normalize_path
from .words import counted

DEFAULT_CONCURRENCY = 4  # remote backends: requests in flight
ENGINE_IN_FLIGHT = 1024  # vLLM: requests in the engine at once (its scheduler takes what fits)
CREATE_CHUNK = 256  # row chats made ahead at least (one index reload a round; rounds double)
SUBMIT_EVERY = 16  # rows handed to the pool together while the next ones are prepared
SUBMIT_MOST = 128  # ... growing with the rows sent (a group: one claim transaction)
# while a batch runs, the collector's youngest generation is collected every this many
# allocations, not every 700 (Python's default): see few_collections()
GC_YOUNG_DURING_RUN = 50_000
PROGRESS_EVERY_S = 0.1  # progress callbacks at most this often
RATE_LIMIT_PAUSE_S = 600.0  # the most a batch pauses, in all, for rate limits (429)
MARK = "batch"  # the provenance key of a row's reply
VOTE = "vote"  # the provenance key of a vote's samples and verdict (subchat_magics.vote)
_NAME_TOKEN = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
_UNSAFE = re.compile(r"[^\w.\-]")


@contextmanager
def few_collections(young: int = GC_YOUNG_DURING_RUN) -> Iterator[None]:
    """While inside, the cyclic garbage collector collects its youngest generation every
    ``young`` allocations instead of Python's default 700, and its older ones as rarely in
    proportion; the thresholds in force before are put back on the way out.

    A batch allocates a few dozen short-lived objects a row, in our thread and the
    engine's; with the default thresholds the collector ran some 100 times a second and
    scanned the whole heap (the tree's index of every chat, the notebook's data) about
    once every 1,200 rows: 0.4-0.5 s of a 5,000-row ``--choice`` run on the tiny model,
    against 0.2 s in the same rows through ``llm.generate`` (measured with gc.callbacks).
    Garbage that is not a cycle is freed at once as ever; a cycle waits at most
    ``young`` allocations. A threshold raised already (a batch inside a batch, another
    thread's batch) or a collector that is off (``gc.disable()``, or a threshold of 0,
    which Python reads as off) is left as it is."""
    old = gc.get_threshold()
    if not gc.isenabled() or old[0] == 0 or old[0] >= young:
        yield
        return
    gc.set_threshold(young, *old[1:])
    try:
        yield
    finally:
        if gc.get_threshold()[0] == young:  # (unless someone set their own meanwhile)
            gc.set_threshold(*old)


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


def items_of(value: Any, name: str = "the items", limit: int | None = None) -> Items:
    """The entries of a list, tuple, any sized iterable, a dict (keys are the labels), a
    pandas Series or DataFrame (the index labels); with ``limit`` only the first ``limit``
    are converted (a 200,000-row DataFrame tried on 3 rows costs 3 rows). A str, bytes or
    an unsized iterator is refused: it is almost never a list of items; so is a set (its
    order changes between kernels, so a batch over it could not be resumed) and a
    DataFrame with two columns of one name (one would hide the other)."""
    pd = _pandas(value)
    if pd is not None and isinstance(value, pd.DataFrame):
        dup = [str(c) for c in value.columns[value.columns.duplicated()]]
        if dup:
            raise InvalidInput(
                f"{name} has more than one column named {', '.join(map(repr, dict.fromkeys(dup)))}; "
                f"rename them first (e.g. {name}.columns = [...]) so each field is one column")
        part = value.iloc[:limit] if limit is not None else value
        cols = [str(c) for c in part.columns]
        entries = []
        for i, (label, row) in enumerate(zip(part.index, part.itertuples(index=False, name=None))):
            fields = dict(zip(cols, row))
            entries.append(Entry(i, label, fields, fields))
        return Items(entries, part.index)
    if pd is not None and isinstance(value, pd.Series):
        part = value.iloc[:limit] if limit is not None else value
        return Items([Entry(i, label, v, fields_of(v)) for i, (label, v)
                      in enumerate(zip(part.index, part.tolist()))], part.index)
    if isinstance(value, (str, bytes, bytearray)):
        raise InvalidInput(f"{name} is a {type(value).__name__}, one text, not a list of items; "
                           f"put it in a list ([{name}]) or split it")
    if isinstance(value, (set, frozenset)):
        raise InvalidInput(f"{name} is a {type(value).__name__}: it has no order that holds "
                           f"from one kernel to the next, so the batch could not be resumed; "
                           f"give sorted({name}) or list it in the order you want")
    if isinstance(value, dict):
        pairs = list(islice(value.items(), limit)) if limit is not None else value.items()
        return Items([Entry(i, k, v, fields_of(v)) for i, (k, v) in enumerate(pairs)])
    if not hasattr(value, "__iter__") or not hasattr(value, "__len__"):
        kind = "an iterator without a length" if hasattr(value, "__iter__") else "not iterable"
        raise InvalidInput(f"{name} is {kind} ({type(value).__name__}); give a list, a tuple, "
                           f"a dict, a pandas Series or DataFrame (list({name}) if it is a "
                           "generator)")
    try:
        values = list(islice(value, limit)) if limit is not None else list(value)
    except TypeError as exc:
        raise InvalidInput(f"{name} cannot be iterated ({type(value).__name__}: {exc})") from None
    return Items([Entry(i, i, v, fields_of(v)) for i, v in enumerate(values)])


def missing(value: Any) -> bool:
    """Whether ``value`` is a missing value: None, a float NaN, pandas' NA/NaT, numpy's
    NaT (never sent as the text ``nan``)."""
    if value is None:
        return True
    if isinstance(value, float):
        return value != value
    pd = _pandas(value)
    if pd is not None or type(value).__module__.partition(".")[0] == "numpy":
        pd = sys.modules.get("pandas")
        if pd is not None:
            try:
                out = pd.isna(value)
            except (TypeError, ValueError):
                return False
            return out is True or (type(out).__name__ == "bool_" and bool(out))
        try:
            return bool(value != value)
        except (TypeError, ValueError):
            return False
    return False


def missing_fields(entry: Entry, names: list[str] | None) -> list[str]:
    """The fields (or ``item``) a row's message would take from a missing value: those the
    template names (all of ``item``/fields when there is no template to read)."""
    out = []
    fields = entry.fields or {}
    if names is None:  # a prompt function: the item itself, or any of its fields
        if entry.fields is None:
            return ["item"] if missing(entry.item) else []
        return [k for k, v in fields.items() if missing(v)]
    for n in names:
        if n == "item":
            if missing(entry.item):
                out.append("item")
        elif n in fields and missing(fields[n]):
            out.append(n)
    return out


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
    ``known`` (the notebook's namespace) and missing from some item with fields (the error
    names the field and the first item without it), or, for plain items, in none."""
    with_fields = [e for e in items.entries if e.fields is not None]
    for name in names_in(template):
        if name in ("item", "index"):
            continue
        holders = sum(1 for e in with_fields if name in e.fields)  # type: ignore[operator]
        if holders == 0 and known(name):
            continue  # a name of the namespace, not a field
        if holders == len(items.entries):
            continue
        if not with_fields:
            raise InvalidInput(
                f"the template names {{{name}}}, which is not {{item}}, {{index}}, a field of "
                f"the items (they have none) or a notebook variable; fix the name, or write "
                f"{{{{{name}}}}} for the braces themselves")
        first = next(e for e in items.entries if e.fields is None or name not in e.fields)
        have = sorted(first.fields or {})
        raise InvalidInput(
            f"the template names {{{name}}}, but item {first.label!r} (position {first.pos}) has "
            f"no field {name!r}" + (f" (its fields: {', '.join(have[:10])})" if have else "")
            + f"; write {{{{{name}}}}} for the braces themselves")


def row_names(entries: list[Entry]) -> list[str]:
    """Each row chat's name: its label made a path part (``/``, spaces… become ``_``);
    positions ``0``, ``1``… when labels clash or cannot be made one (or one holds a known
    key, which a chat's name would show in the tree, the store and every export)."""
    names = [_UNSAFE.sub("_", str(e.label))[:100] for e in entries]
    if len(set(names)) != len(names) or any(n in ("", ".", "..") for n in names) \
            or any(redact(n) != n for n in names):  # a key as a label: never a chat's name
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
    #: pending | done | failed | interrupted | skipped (not sent: a missing value, an
    #: empty message) | claimed (another kernel is answering it now)
    status: str = "pending"
    result: Any = None  # the reply text (or parsed value), None unless done
    reason: str | None = None  # why it failed, was cut or skipped
    reused: bool = False  # done (or kept) in an earlier run, not sent again
    chat_id: int | None = None  # the chat holding the row's answer (its latest attempt)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    request: dict[str, str] | None = None  # what identifies the request (see request_parts)
    row_chat: int | None = None  # the row's chat, once it exists
    attempt: int = 1  # 1: the row's own chat; k: its subchat attempt-k (a resend)
    target: int | None = None  # the chat the next attempt goes into, if it exists already
    cut_value: bool = False  # a value was cut to max_value_chars in its message
    room_lowered: bool = False  # its reply room was lowered to fit the window


# -- a row's identity: its whole request --------------------------------------------------------
PARTS = ("message", "system", "options", "constraint", "backend", "model")
PART_NAMES = {"message": "the message (the data or the template)",
              "system": "the system prompt in force", "options": "the generation options "
              "(-t, -n, --top-p, --seed, --think, ...)",
              "constraint": "the constraint (--json/--choice/--regex)",
              "backend": "the backend", "model": "the model"}
ATTEMPT = re.compile(r"attempt-(\d+)")


def latest_attempt(tree: ChatTree, chat: Chat) -> Chat | None:
    """The newest ``attempt-K`` subchat of a batch row that was sent again (cut, or
    ``--redo``): where its latest answer is; None for a chat without one."""
    found = [(int(m.group(1)), kid) for kid in tree.children(chat)
             if (m := ATTEMPT.fullmatch(kid.name)) is not None]
    return max(found, key=lambda a: a[0])[1] if found else None


def _h(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def options_part(opts: GenerationOptions) -> str:
    """The generation options that shape a reply, as one digest (the constraint apart)."""
    return _h(json.dumps({"max_tokens": opts.max_tokens, "temperature": opts.temperature,
                          "top_p": opts.top_p, "stop": opts.stop, "seed": opts.seed,
                          "think": opts.think, "extra": opts.extra},
                         sort_keys=True, default=str))


def request_parts(text: str, system: str | None, opts: GenerationOptions, backend: str,
                  model: str | None, options: str | None = None,
                  system_part: str | None = None) -> dict[str, str]:
    """What identifies a row's request: the message, the system prompt in force, the
    options, the constraint (kind and content), the backend and the model. ``options``
    and ``system_part``: the options' and the system prompt's parts, made once a batch."""
    c = opts.constraint
    return {"message": _h(text), "system": system_part if system_part is not None else _h(system or ""),
            "options": options if options is not None else options_part(opts),
            "constraint": f"{c.kind}:{c.digest()}" if c is not None else "",
            "backend": backend, "model": model or ""}


_SORTED_PARTS = sorted(PARTS)
_encode_str = json.encoder.encode_basestring_ascii  # (json.dumps' own, for a str)


def request_digest(parts: dict[str, str]) -> str:
    """The digest kept in a row's provenance (``batch.digest``) of its request's parts."""
    values = [parts.get(k, "") for k in _SORTED_PARTS]
    if all(v.__class__ is str for v in values):  # json.dumps' very text, without its machinery
        return _h("{" + ", ".join(f'"{k}": {_encode_str(v)}' for k, v in zip(_SORTED_PARTS, values))
                  + "}")
    return _h(json.dumps({k: parts.get(k, "") for k in PARTS}, sort_keys=True))


# -- claims: who is answering a row now -----------------------------------------------------------
def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


OWNER = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}


def owner_alive(owner: Any) -> bool:
    """Whether the process that claimed a row (its reply row's ``owner``) still runs: on
    this host, a process of that id started at that time. Another host's claim is taken as
    alive (it cannot be checked from here)."""
    if not isinstance(owner, dict):
        return False
    if owner.get("host") != OWNER["host"]:
        return True
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == OWNER["pid"] and owner.get("start") == OWNER["start"]:
        return False  # this process: a run of it that is over (its own claims are in Busy)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return owner.get("start") is None or _start_time(pid) == owner.get("start")


def claim(tree: ChatTree, heads: list[Exchange],
          begin: Callable[[list[int]], list[Exchange]]) -> list[int]:
    """Claim rows in one transaction: ``heads[i]`` is the exchange whose chat takes row
    ``i``'s first message; a row whose chat holds a message already (another kernel
    claimed it since it was planned) is left out. ``begin(kept)`` stores the kept rows'
    messages and returns the exchanges whose reply rows name this process (``owner``)
    until they end. Returns the positions kept."""
    with tree.store.transaction() as c:
        ids = [ex.chat.id for ex in heads]
        held: dict[int, int] = {}
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            held.update(c.execute(
                f"SELECT chat_id, COUNT(*) FROM messages WHERE chat_id IN "
                f"({','.join('?' * len(part))}) GROUP BY chat_id", part).fetchall())
        kept = [i for i, ex in enumerate(heads) if not held.get(ex.chat.id)]
        # the claim: every kept reply row names this process, one statement a 500 rows
        # (json_set keeps the row's provenance and adds ``owner``; keys stay sorted)
        rows = [ex.reply_row.id for ex in begin(kept) if ex.reply_row is not None]
        owner = json.dumps(OWNER, sort_keys=True)
        for i in range(0, len(rows), 500):
            part = rows[i:i + 500]
            c.execute("UPDATE messages SET provenance = json_set(COALESCE(provenance, '{}'), "
                      f"'$.owner', json(?)) WHERE id IN ({','.join('?' * len(part))})",
                      (owner, *part))
    return kept


@dataclass
class Progress:
    """Where a batch stands (what the progress bar and the summary show)."""

    total: int
    done: int = 0
    failed: int = 0
    interrupted: int = 0
    reused: int = 0
    skipped: int = 0  # not sent: a missing value or an empty message
    claimed: int = 0  # being answered by another kernel
    in_flight: int = 0
    paused: float = 0.0  # seconds left of a pause for a rate limit (0: running)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0  # since the first row was sent (generation, planning apart)
    planning_s: float = 0.0  # deciding, making the rows' chats before the first send
    finished: bool = False
    sent: int = 0  # rows handed to the backend in this run
    #: when rows of this run first ended (elapsed_s) and how many had then: the rate of
    #: time left is read from the rows ended since (the first ones carry the start's cost)
    first_end_s: float | None = None
    first_ended: int = 0

    @property
    def ended(self) -> int:
        return self.done + self.failed + self.interrupted + self.skipped + self.claimed

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def ended_here(self) -> int:
        """Rows that ended in this run (not those done before it)."""
        return self.done + self.failed + self.interrupted - self.reused

    def mark_ends(self) -> None:
        """Note when the first rows of this run ended (called as the run goes)."""
        if self.first_end_s is None and self.ended_here > 0:
            self.first_end_s, self.first_ended = self.elapsed_s, self.ended_here

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the rate of the rows that ended in this run since the first
        ones did; None (``estimating``) until then. The first rows end together, with the
        cost of the start (a connection, the engine's first steps) in their time: a rate
        that counts them says little, one read after them holds within +-50% once a tenth
        of the rows have ended (tests/test_batch_scale.py)."""
        ended_here = self.ended_here
        left = self.total - self.ended
        if left <= 0:
            return 0.0
        if self.first_end_s is None:  # (a Progress not kept by a run: the whole run's rate)
            if ended_here < max(3, min(self.sent, self.total) // 50) or self.elapsed_s < 0.3:
                return None
            return left * self.elapsed_s / ended_here
        since, span = ended_here - self.first_ended, self.elapsed_s - self.first_end_s
        if since < 2 or span <= 0:
            return None
        return left * span / since


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
        bits = [counted(s.total, "item"), f"{s.done} done" + (f" ({s.reused} reused)" if s.reused else ""),
                f"{s.failed} failed"]
        if s.interrupted:
            bits.append(f"{s.interrupted} interrupted")
        if s.skipped:
            bits.append(f"{s.skipped} skipped")
        if s.claimed:
            bits.append(f"{s.claimed} sent by another kernel")
        rate = f"{s.tokens_per_s:,.0f} tokens/s"
        plan = f" (+{s.planning_s:.2f} s planning)" if s.planning_s >= 0.01 else ""
        return (f"batch {self.path}: {', '.join(bits)} · tokens {s.prompt_tokens:,} in / "
                f"{s.completion_tokens:,} out · {s.elapsed_s:.2f} s{plan} · {rate}")

    def failed_line(self) -> str | None:
        """How many rows failed and the first one's reason (keys masked); None if none."""
        failed = [r for r in self.rows if r.status == "failed"]
        if not failed:
            return None
        return (f"failed: {counted(len(failed), 'row')}, e.g. {self.path}/{failed[0].name}: "
                f"{redact(str(failed[0].reason))[:200]}")

    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.status in ("failed", "interrupted")]

    def skipped(self) -> list[Row]:
        return [r for r in self.rows if r.status == "skipped"]


class Batch:
    """A planned batch: the rows to send and the rows reused. :meth:`run` sends them.

    Made by :meth:`subchat_magics.session.Session.batch`, which checks everything first;
    ``make_exchange(chat, text)`` makes the exchange of one row (the session's options and
    system prompt); the rows run through one :class:`~subchat_magics.exchange.Runner` on
    the planned ``selection`` (one backend: a batch never falls back mid-way).

    Nothing of a batch is ever deleted: a row resent (cut before, or ``--redo``) gets a new
    attempt, the subchat ``attempt-K`` of its row forked before the row's first message
    (the same context), and the earlier attempts stay as they were. A row is claimed in
    the same transaction that stores its message: its reply row names the process
    answering it (``owner``) until it ends, and another kernel skips it meanwhile."""

    def __init__(self, tree: ChatTree, chat: Chat, rows: list[Row], *, selection: Selection,
                 make_exchange: Callable[..., Exchange], in_flight: int,
                 notes: list[str] | None = None, index: Any = None,
                 planning_s: float = 0.0, mark: dict[str, Any] | None = None,
                 run_tools: Callable[[Chat, list], None] | None = None, max_rounds: int = 5):
        self.tree = tree
        self.index = index
        self.chat = chat
        self.rows = rows
        self.selection = selection
        self.make_exchange = make_exchange
        self.in_flight = max(1, int(in_flight))
        self.notes = notes or []
        self.mark = mark or {}  # more of the batch mark (the template's resolved references)
        self.progress = Progress(total=len(rows), planning_s=planning_s)
        for r in rows:
            if r.reused:
                self.progress.reused += 1
                if r.status == "done":
                    self.progress.done += 1
                else:
                    self.progress.failed += 1
            elif r.status == "skipped":
                self.progress.skipped += 1
            elif r.status == "claimed":
                self.progress.claimed += 1
        self._started = False
        self._first_send: float | None = None  # when the first row went to the backend
        self._ready: deque = deque()  # (row, chat) made ahead of sending
        self._group: list[Exchange] | None = None  # the rows stored in the open _writes block
        self._kids: dict[str, Chat] | None = None
        self._base: list[dict[str, str]] | None = None  # the batch chat's context, read once
        self._system: tuple[str | None, str] = (None, "none")  # ... and its system prompt
        self._rows: dict[int, Row] = {}  # id(exchange) -> its row
        # with tools: ``run_tools(chat, calls)`` runs a row's calls and stores the results
        # (the session's tool loop); the row then goes on with a follow-up exchange
        self.run_tools = run_tools
        self.max_rounds = max_rounds
        self._calling: deque = deque()  # (row, exchange) whose reply called tools
        self._rounds: dict[int, int] = {}  # row chat id -> rounds of calls so far
        self._unsent: list[Exchange] = []
        self._runner: Runner | None = None

    @property
    def backend(self) -> Backend:
        return self.selection.candidates[0]

    @property
    def path(self) -> str:
        return self.chat.path

    @property
    def to_send(self) -> int:
        return sum(1 for r in self.rows if r.status == "pending")

    def run(self, progress: Callable[[Progress], None] | None = None,
            every: float = PROGRESS_EVERY_S) -> BatchResult:
        """Send every row not done yet and wait for them; ``progress(Progress)`` is called
        at most every ``every`` seconds and once at the end. Ctrl-C (or a
        ``KeyboardInterrupt`` from ``progress``) stops every request in flight at once,
        keeps what completed, marks the cut rows ``interrupted`` and re-raises; the rows
        stay in :attr:`rows` and :meth:`result` gives what there is."""
        with steady(), few_collections():  # (the keys to mask read once, not once a row)
            return self._run(progress, every)

    def _run(self, progress: Callable[[Progress], None] | None, every: float) -> BatchResult:
        if self._started:
            raise InvalidInput("a batch runs once; plan it again to resume it")
        self._started = True
        t_plan = time.perf_counter()
        t0 = [t_plan]
        p = self.progress
        last = [0.0]

        def tick(force: bool = False) -> None:
            now = time.perf_counter()
            p.elapsed_s = now - t0[0]
            p.mark_ends()
            if progress is not None and (force or now - last[0] >= every):
                last[0] = now
                progress(p)

        tick(force=True)
        self.tree.emit("batch-start", id=self.chat.id, path=self.path, total=len(self.rows))
        pending = deque(r for r in self.rows if r.status == "pending")
        if not pending:  # every row done before: nothing to send, no backend needed
            p.finished = True
            p.elapsed_s = 0.0
            if progress is not None:
                progress(p)
            return self.result()
        runner = self._runner = Runner(self.selection, size=self.in_flight, stream_deltas=False,
                                       on_end=self._record, pause_s=pause_budget())
        started = False
        try:
            while pending or runner.flying:
                p.paused = runner.paused  # (a rate limit: nothing new is sent meanwhile)
                if pending and runner.in_flight < self.in_flight and not p.paused:
                    self._start(pending, runner)
                    if not started and self._first_send is not None:
                        started = True  # generation time counts from the first send
                        p.planning_s += self._first_send - t_plan
                        t0[0] = self._first_send
                    p.in_flight = runner.in_flight
                    if not runner.flying:
                        continue  # (every row of the group was claimed elsewhere)
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
            for ex in self._unsent:  # stored, never handed to the backend
                if ex.begun and ex.reply is None and all(f is not ex for f in runner.flying.values()):
                    ex.fail(exc)
                    self._record(ex)
            self._unsent = []
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
        notes = list(self.notes)
        cut = sum(1 for r in self.rows if r.cut_value and r.status != "skipped")
        if cut and not any("cut at" in n for n in notes):
            notes.append(f"{cut} row(s) had a value cut at max_value_chars (see %config "
                         "SubchatMagics.max_value_chars); show -p of a row names it")
        notes += fit_notes(self.rows)
        claimed = sum(1 for r in self.rows if r.status == "claimed")
        if claimed:  # found claimed at planning, or claimed by the other kernel since
            notes.append(f"{claimed} row(s) are being answered by another kernel now; run the "
                         "cell again once it ends to collect them (--as holds None for them "
                         "until then)")
        r = self._runner
        if r is not None and r.pauses:
            notes.append(f"rate-limited: the batch paused {r.pauses} time(s), {r.paused_s:.0f} s "
                         f"in all, and resent those rows (at most {pause_budget():.0f} s of "
                         "pauses: SUBCHAT_RATE_LIMIT_PAUSE)")
        return BatchResult(self.path, self.rows, self.progress,
                           interrupted=any(r.status == "interrupted" for r in self.rows),
                           notes=notes, index=self.index)

    # -- inside the run ----------------------------------------------------------------------------
    def _writes(self, runner: Runner) -> "_Writes":
        """One transaction for the rows stored in the block (a commit a row costs more than
        the engine's step on a small model). If it is cut (Ctrl-C lands inside), the
        replies it held are written again one by one, so the store says what the rows say."""
        return _Writes(self, runner)

    def _start(self, pending: deque, runner: Runner) -> None:
        """Submit rows until ``in_flight`` are in flight, together; their chats are made
        ahead, ``CREATE_CHUNK`` at a time and more (one store round and index reload each)."""
        while pending and runner.in_flight < self.in_flight:
            if not self._ready:  # chunks grow with the rows made: few index reloads
                size = max(CREATE_CHUNK, len(self._kids or ()))
                chunk = [pending[i] for i in range(min(size, len(pending)))]
                self._ready.extend(zip(chunk, self._row_chats(chunk)))
            group = []
            # the first groups small (the engine starts at once), then larger: a group's
            # claim is one transaction, and each SQLite call hands the GIL to the engine
            most = max(SUBMIT_EVERY, min(SUBMIT_MOST, self.progress.sent // 4))
            while (pending and self._ready and runner.in_flight + len(group) < self.in_flight
                   and len(group) < most):
                row, chat = self._ready.popleft()
                pending.popleft()
                with contexts_known(self.tree, *self._bases(chat)):
                    ex = self.make_exchange(chat, row.text)
                if row.request is not None and row.request.get("backend") != runner.backend.id:
                    self._moved(row, runner.backend, ex)  # (auto passed over the first)
                ex.provenance[MARK] = self.row_mark(row)
                row.status, row.chat_id = "pending", chat.id
                self._rows[id(ex)] = row
                group.append(ex)
            self._unsent = group  # (begun, not yet in flight: ended by run() if cut here)
            group = self._claim(group, runner)  # a group's messages and claims: one commit
            if group:
                self.progress.sent += len(group)
                runner.submit(group)  # the engine starts on these while we make the next
                if self._first_send is None:
                    self._first_send = time.perf_counter()
            self._unsent = []

    def _bases(self, chat: Chat) -> tuple[dict[int, list[dict[str, str]]],
                                          dict[int, tuple[str | None, str]]]:
        """``({chat.id: the batch chat's context}, {chat.id: the system prompt in force
        and its source})`` where a row's chat shares them (the row's own chat, or its
        ``attempt-K`` forked before the row's first message, neither setting a system
        prompt of its own): read from the store once a batch, not once a row. A row chat
        is empty when its message is made (the claim skips one that got a message
        meanwhile); any other chat reads its own context."""
        parent = chat.parent
        if chat.system_prompt is not None or parent is None:
            return {}, {}
        if parent.id != self.chat.id:
            if (chat.fork_seq != 0 or parent.system_prompt is not None or parent.parent is None
                    or parent.parent.id != self.chat.id):
                return {}, {}
        if self._base is None:
            self._base = self.tree.context(self.chat, None)
            system, source = system_in_force(self.tree, self.chat)
            # (the batch chat's own prompt is, for a row below it, its path's)
            self._system = (system, self.chat.path if source == "own" else source)
        return {chat.id: self._base}, {chat.id: self._system}

    def _claim(self, group: list[Exchange], runner: Runner) -> list[Exchange]:
        """Store the group's messages, claiming each row, in one transaction: a row whose
        chat got a message since it was planned (another kernel claimed it) is skipped."""
        if not group:
            return group

        def begin(mine: list[int]) -> list[Exchange]:
            runner.begin([group[i] for i in mine])
            return [group[i] for i in mine]

        kept = set(claim(self.tree, group, begin))
        for i, ex in enumerate(group):
            if i not in kept:
                row = self._rows.pop(id(ex))
                row.status, row.reason = "claimed", "answered by another kernel"
                self.progress.claimed += 1
        return [ex for i, ex in enumerate(group) if i in kept]

    def row_mark(self, row: Row) -> dict[str, Any]:
        """A row's batch mark (its reply's provenance): the row, the batch's extra, its
        request and digest, its attempt."""
        mark = {"of": len(self.rows), "item": row.name, **self.mark}
        if row.request is not None:
            mark["request"] = row.request
            mark["digest"] = request_digest(row.request)
        if row.attempt > 1:
            mark["attempt"] = row.attempt
        if row.cut_value:
            mark["cut_value"] = True
        return mark

    def _row_chats(self, rows: list[Row]) -> list[Chat]:
        """The chat each row's next attempt goes into, made where missing (one transaction,
        one index reload): the row's own chat, or its subchat ``attempt-K``."""
        tree = self.tree
        if self._kids is None:
            self._kids = {c.name: c for c in tree.children(self.chat)}
        kids = self._kids
        wanted: list[tuple[int | None, str, None, int]] = []
        attempts: list[Row] = []
        for r in rows:
            if r.target is not None:
                continue
            if r.attempt == 1:
                if r.name not in kids:
                    wanted.append((self.chat.id, r.name, None, 0))
            else:
                wanted.append((r.row_chat, f"attempt-{r.attempt}", None, 0))
                attempts.append(r)
        made: list[ChatRow] = tree.store.insert_chats(wanted)  # (one transaction)
        by_key = {(m.parent_id, m.name): m for m in made}
        for r in attempts:
            r.target = by_key[(r.row_chat, f"attempt-{r.attempt}")].id
        if made:
            tree.added(made)  # into the index as they are: no reload of every chat
            for chat in tree.find_many([row.id for row in made]):
                if chat is not None:
                    if chat.parent is not None and chat.parent.id == self.chat.id:
                        kids[chat.name] = chat
                    tree.emit("chat-created", id=chat.id, path=chat.path)
        out = []
        targets = dict(zip((r.target for r in rows if r.target is not None),
                           tree.find_many([r.target for r in rows if r.target is not None])))
        for r in rows:
            chat = targets[r.target] if r.target is not None else kids[r.name]
            r.row_chat = r.row_chat or kids[r.name].id if r.name in kids else r.row_chat
            out.append(chat)
        return out

    def _moved(self, row: Row, backend: Backend, ex: Exchange) -> None:
        """The request of a row answered by the backend auto fell back to (before any
        token of this run): the digest names the backend and model that answered."""
        row.request = dict(row.request or {}, backend=backend.id,
                           model=ex.options.model or backend.default_model() or "")

    def _call_tools(self, runner: Runner) -> None:
        """Run the calls of each row whose reply called tools, then send its next round
        (a follow-up exchange), or end the row when it has had ``max_rounds``."""
        while self._calling:
            row, ex = self._calling.popleft()
            rounds = self._rounds[ex.chat.id] = self._rounds.get(ex.chat.id, 0) + 1
            try:
                self.run_tools(ex.chat, list(ex.finish.tool_calls))  # type: ignore[misc,union-attr]
            except BaseException:  # Ctrl-C in a tool: the row is cut, counted as such
                row.status, row.reason = "interrupted", "interrupted"
                self.progress.interrupted += 1
                raise
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
        mark = ex.provenance.get(MARK)
        if (ex.backend is not None and ex.reply is not None and isinstance(mark, dict)
                and row.request is not None and row.request.get("backend") != ex.backend.id):
            self._moved(row, ex.backend, ex)  # in flight when auto fell back: fix its mark
            mark["request"], mark["digest"] = row.request, request_digest(row.request)
            self.tree.flush_replies()  # (its reply is written first, then this over it)
            prov = dict(ex.reply.provenance, **{MARK: mark})
            self.tree.store.update_reply(ex.reply.id, ex.reply.content, ex.reply.status, prov)
            for r in self.rows:  # the rows not begun yet follow
                if r.status == "pending" and r.request is not None:
                    r.request = dict(r.request, backend=row.request["backend"],
                                     model=row.request["model"])
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
        row.room_lowered = any(n.startswith("max_tokens lowered") for n in ex.notes)
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


def pause_budget() -> float:
    """``SUBCHAT_RATE_LIMIT_PAUSE``: the most seconds a batch pauses, in all, for rate
    limits before a rate-limited row fails (default 600; 0: never pause)."""
    raw = getenv("SUBCHAT_RATE_LIMIT_PAUSE")
    if raw is None:
        return RATE_LIMIT_PAUSE_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise InvalidInput(f"SUBCHAT_RATE_LIMIT_PAUSE must be a number of seconds >= 0, not "
                           f"{raw!r}")
    return value


def fit_notes(rows: list[Row]) -> list[str]:
    """What fitting the window did to rows: replies given less room, rows too long to
    answer with their context (failed: a row never loses its instructions)."""
    notes = []
    low = sum(1 for r in rows if r.room_lowered and not r.reused)
    if low:
        notes.append(f"{low} row(s) had their reply room (max_tokens) lowered to fit the "
                     "context window; show -p of a row names it")
    long = sum(1 for r in rows if r.status == "failed" and TOO_LONG in str(r.reason or ""))
    if long:
        notes.append(f"{long} row(s) failed as {TOO_LONG} (the parent's messages are never "
                     "dropped from a row); shorten those values or use a larger window")
    return notes


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


@dataclass
class Attempt:
    """One attempt of a row as stored: the row's own chat (``k`` 1) or its ``attempt-k``."""

    chat_id: int
    k: int
    messages: int = 0  # messages the chat holds
    subchats: int = 0
    user: str | None = None  # the message sent
    status: str | None = None  # its reply's status (None: no reply row)
    content: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    tools: bool = False  # its first reply called tools (the row's loop follows it)


@dataclass
class Stored:
    """A row chat as stored: its attempts (first to last) and whether a person wrote
    below them (messages after the first exchange, or subchats of their own)."""

    chat_id: int
    attempts: list[Attempt] = field(default_factory=list)
    by_hand: bool = False

    @property
    def latest(self) -> Attempt | None:
        begun = [a for a in self.attempts if a.messages]
        return begun[-1] if begun else None

    def free(self) -> Attempt | None:
        """An attempt chat made but never sent into, after the latest: the next one's."""
        last = self.latest
        for a in self.attempts:
            if not a.messages and not a.subchats and (last is None or a.k > last.k):
                return a
        return None


@dataclass
class Shape:
    """What a row of a vote or comparison batch holds below each attempt chat (the row
    chat, or its ``attempt-K``): under a vote, the K sample subchats ``1..K`` (the attempt
    chat holds the verdict exchange); under a comparison, one subchat per model named in
    ``sides`` (each holding that model's exchange or vote; the attempt chat holds
    nothing). ``backend``, ``model`` and ``options`` are the request's parts for every
    row (a comparison's: each model's, joined), ``options`` beside the generation
    options (the vote's K, its --answer)."""

    samples: int = 1
    sides: list[str] | None = None
    backend: str | None = None
    model: str | None = None
    options: str = ""

    def part(self, name: str, fork: int, count: int, kids: int, first: list[tuple]) -> bool:
        """Whether a subchat of an attempt chat is one a vote or comparison batch made:
        one this shape makes (a sample ``1..K``, a model's), or one whose first reply says
        it is a sample (``vote``) or a model's exchange (the batch mark: a batch of another
        shape ran here before), or one made and never written to."""
        if fork != 0:
            return False
        if self.sides is not None and name in self.sides:
            return True
        if self.samples > 1 and name.isdigit() and 1 <= int(name) <= self.samples:
            return True
        if not count and not kids:
            return True
        prov = first[1][3] if len(first) > 1 else {}
        return isinstance(prov.get(VOTE), dict) or isinstance(prov.get(MARK), dict)


def _attempt(cid: int, count: int, kids: int, first: list[tuple]) -> Attempt:
    att = Attempt(cid, 1, count, kids)
    if first and first[0][0] == "user":
        att.user = first[0][1]
    if len(first) > 1 and first[1][0] == "assistant":
        att.status, att.content, att.provenance = first[1][2], first[1][1], first[1][3]
        att.tools = bool(att.provenance.get("tool_calls"))
    return att


def stored_rows(tree: ChatTree, chat: Chat, shape: Shape | None = None) -> dict[str, Stored]:
    """Every row of the batch chat ``chat`` with its attempts, by row name: one query.
    With ``shape`` (a vote or comparison batch) the subchats it makes below an attempt
    are the attempt's, not a person's; a comparison's attempt is its models' exchanges
    together (complete when every model's is; its message and claim are the first
    model's)."""
    chats: dict[int, tuple] = {}
    firsts: dict[int, list[tuple]] = {}
    for cid, parent, name, fork, count, kids, seq, role, content, status, prov \
            in tree.store.batch_rows(chat.id, 3 if shape is not None else 2):
        chats[cid] = (parent, name, fork, count, kids)
        if seq is not None:
            firsts.setdefault(cid, []).append((role, content, status, prov))
    out: dict[str, Stored] = {}
    by_id: dict[int, Stored] = {}
    for cid, (parent, name, *_) in chats.items():
        if parent == chat.id:
            st = Stored(cid)
            out[name] = by_id[cid] = st
    home: dict[int, Stored] = {}  # attempt chat -> its row
    parts: dict[int, list[int]] = {}  # attempt chat -> the subchats the batch made in it
    for cid, (parent, name, fork, count, kids) in chats.items():
        if parent != chat.id and parent not in by_id:
            continue
        att = _attempt(cid, count, kids, firsts.get(cid, []))
        if parent == chat.id:
            by_id[cid].attempts.insert(0, att)
            home[cid] = by_id[cid]
            if count > 2 and not att.tools:
                by_id[cid].by_hand = True
            continue
        st = by_id[parent]
        m = ATTEMPT.fullmatch(name)
        if m is None or fork != 0 or int(m.group(1)) < 2:
            if shape is not None and shape.part(name, fork, count, kids, firsts.get(cid, [])):
                parts.setdefault(parent, []).append(cid)
            else:
                st.by_hand = True  # a subchat the user made below the row
            continue
        att.k = int(m.group(1))
        if count > 2 and not att.tools or (kids and shape is None):
            st.by_hand = True
        st.attempts.append(att)
        home[cid] = st
    if shape is not None:
        for cid, (parent, name, fork, count, kids) in chats.items():
            if parent in home and parent not in by_id:  # below an attempt-K
                if shape.part(name, fork, count, kids, firsts.get(cid, [])):
                    parts.setdefault(parent, []).append(cid)
                else:
                    home[parent].by_hand = True
        for st in out.values():
            for att in st.attempts:
                mine = parts.get(att.chat_id, [])
                att.subchats -= len(mine)
                named = {chats[c][1]: c for c in mine
                         if _marked(firsts.get(c, [])) or chats[c][1] in (shape.sides or ())}
                if not att.messages and (shape.sides is not None or named):
                    _sides(att, st, shape.sides or list(named), named, chats, firsts)
    for st in out.values():
        first, rest = st.attempts[:1], sorted(st.attempts[1:], key=lambda a: a.k)
        st.attempts = first + rest
    return out


def _marked(first: list[tuple]) -> bool:
    """Whether a chat's first reply carries the batch mark (a comparison's model's)."""
    return len(first) > 1 and isinstance(first[1][3].get(MARK), dict)


def _sides(att: Attempt, st: Stored, sides: list[str], named: dict[str, int],
           chats: dict[int, tuple], firsts: dict[int, list[tuple]]) -> None:
    """A comparison's attempt as its models' exchanges: begun when they are, complete when
    every model's is, cut while one is (its provenance then the one naming its owner)."""
    heads = []
    for n in sides:
        cid = named.get(n)
        if cid is None:
            heads.append(None)
            continue
        _, _, _, count, kids = chats[cid]
        if count > 2:
            st.by_hand = True
        heads.append(_attempt(cid, count, kids, firsts.get(cid, [])))
    begun = [h for h in heads if h is not None and h.messages]
    att.messages = sum(h.messages for h in begun)
    if not begun:
        return
    statuses = [h.status if h is not None else None for h in heads]
    if all(x == "complete" for x in statuses):
        att.status = "complete"
    elif "interrupted" in statuses or None in statuses:
        att.status = "interrupted"
    else:
        att.status = "error"
    lead = next((h for h in begun if h.status != "complete"), begun[0])
    att.user, att.content, att.provenance = begun[0].user, begun[0].content, lead.provenance


class Changed(InvalidInput):
    """A rerun whose request differs from the rows' (refused before anything is sent)."""


def stored_parts(att: Attempt) -> dict[str, str]:
    """The request an attempt was sent with: its digest's parts (or, for a row stored
    before digests, what its provenance says)."""
    mark = att.provenance.get(MARK)
    req = mark.get("request") if isinstance(mark, dict) else None
    if isinstance(req, dict):
        return {k: str(v) for k, v in req.items()}
    out = {"message": _h(att.user or "")}
    p = att.provenance
    if p.get("backend"):
        out["backend"] = p["backend"]
    if p.get("model"):
        out["model"] = p["model"]
    return out


def match_rows(tree: ChatTree, chat: Chat, rows: list[Row], *, redo: bool = False,
               constraint: Any = None,
               busy_chat: Callable[[int], bool] = lambda _: False,
               shape: Shape | None = None) -> list[str]:
    """Decide each row of a rerun from the store (one query), returning notes:

    - a row whose latest attempt completed with the same request is reused;
    - one cut or failed with the same request is resent as a new attempt (the cut one kept);
    - one being answered now by another live process is left to it (``claimed``);
    - one a person continued (messages or subchats below it) is kept as it is, never sent;
    - one whose request differs (message, system prompt in force, options, constraint,
      backend, model) is refused, naming what changed for how many rows, unless ``redo``:
      then it is resent as a new attempt, the earlier ones kept.

    ``shape``: the rows are a vote's or a comparison's (:class:`Shape`).

    Raises :class:`Changed` before anything is written."""
    stored = stored_rows(tree, chat, shape)
    notes: list[str] = []
    changed: dict[str, list[Row]] = {}
    examples: dict[str, tuple[Row, Attempt, dict[str, str]]] = {}
    kept = 0
    resend: list[tuple[Row, Stored, Attempt | None]] = []
    for r in rows:
        if r.status != "pending":
            continue  # skipped (a missing value): not sent, nothing to decide
        st = stored.get(r.name)
        if st is None:
            continue  # a new row
        r.row_chat = st.chat_id
        last = st.latest
        if last is None:  # made, never sent
            r.target = st.chat_id
            continue
        r.chat_id = last.chat_id
        if last.tools and last.status == "complete":
            # a row answered with tools: done when its loop's last message is a complete
            # answer; a loop that was cut is sent again as a new attempt
            final = tree.store.messages(last.chat_id)[-1]
            if final.role == "assistant" and final.status == "complete" \
                    and not final.provenance.get("tool_calls"):
                last.content = final.content
            else:
                last.status = "cut"
        if st.by_hand:  # never touched; a note unless it is simply done
            r.reused, r.status = True, "done" if last.status == "complete" else "failed"
            r.reason = None if last.status == "complete" else (last.status or "no reply")
            old = stored_parts(last)
            if last.status == "complete" and all(old[k] == (r.request or {}).get(k) for k in old):
                try:
                    r.result = constraint.parse(last.content) if constraint else last.content
                except SubchatError:
                    r.status, r.reason = "failed", "continued by hand; its reply does not parse"
            elif last.status == "complete":
                r.status, r.reason = "failed", "continued by hand under another request"
            kept += r.status != "done"
            continue
        if (last.status == "interrupted" and (owner_alive(last.provenance.get("owner"))
                                              or busy_chat(last.chat_id))):
            r.status, r.reason = "claimed", "answered by another kernel"
            continue
        old = stored_parts(last)
        diff = [k for k in PARTS if k in old and old[k] != (r.request or {}).get(k)]
        if diff:
            for k in diff:
                changed.setdefault(k, []).append(r)
                examples.setdefault(k, (r, last, old))
            resend.append((r, st, last))
            continue
        if last.status == "complete":
            try:
                r.result = constraint.parse(last.content) if constraint else last.content
            except SubchatError:
                resend.append((r, st, last))
                continue
            r.reused, r.status = True, "done"
            continue
        resend.append((r, st, last))  # cut or failed: a new attempt
    if changed and not redo:
        raise Changed(_changed_message(chat, rows, changed, examples))
    for r, st, _ in resend:
        free = st.free()
        if free is not None:
            r.attempt, r.target = free.k, free.chat_id
        else:
            r.attempt = max(a.k for a in st.attempts) + 1
            r.target = None
    if changed:
        n = len({id(r) for rs in changed.values() for r in rs})
        notes.append(f"--redo: {n} row(s) resent under the new request; their earlier replies "
                     "are kept (each row's attempt-N subchats hold the new ones)")
    if kept:
        notes.append(f"{kept} row(s) without a complete reply to this request were continued "
                     "by hand; they are kept as they are (not sent again)")
    return notes  # (rows another kernel answers: status "claimed", noted by Batch.result)


def _changed_message(chat: Chat, rows: list[Row], changed: dict[str, list[Row]],
                     examples: dict[str, tuple]) -> str:
    sent = sum(1 for r in rows if r.chat_id is not None)
    bits = []
    for k in PARTS:
        if k not in changed:
            continue
        r, att, old = examples[k]
        bit = f"{PART_NAMES[k]} for {len(changed[k])} of {sent} row(s)"
        if k == "message":
            bit += (f" ({chat.path}/{r.name} holds another message than item {r.label!r} "
                    "gives now)")
        elif k in ("backend", "model"):
            bit += f" ({old.get(k) or '?'} -> {(r.request or {}).get(k) or '?'})"
        bits.append(bit)
    return (f"{chat.path} was run with another request: {'; '.join(bits)}. Nothing was sent; "
            "a batch is answered under one request. --redo resends those rows (their "
            "earlier replies are kept), --fresh starts a new batch chat")


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
        names = {c.id: c.name for c in chat.children}
        firsts = {cid: ex[1] for cid, ex in first_exchanges(tree, chat).items() if len(ex) > 1}
        marked = [ex[3] for cid, ex in firsts.items() if marks_row(names.get(cid, ""), ex[3])]
        shape = None
        if not marked:  # a comparison's rows hold nothing: its models' subchats carry the mark
            marked, sides = _compare_marks(tree, chat)
            if not marked:
                continue
            shape = Shape(sides=sides)
        total = max(int(p[MARK].get("of") or 0) for p in marked)
        stored = stored_rows(tree, chat, shape)
        rows = len(stored)
        s = Summary(chat.id, max(total, rows), rows=rows)
        for st in stored.values():  # a row counts as its latest attempt says
            last = st.latest
            status = loop_status(tree, last) if last is not None else None
            if status is None:
                continue
            if status == "complete":
                s.done += 1
            elif status == "error":
                s.failed += 1
            else:
                s.interrupted += 1
        out[chat.id] = s
    return out


def loop_status(tree: ChatTree, att: Attempt) -> str | None:
    """An attempt's status as a row's: its first reply's, but a reply that called tools
    is complete only when its loop ended in a complete answer (else the loop was cut:
    ``interrupted``), as a rerun decides."""
    if att.tools and att.status == "complete":
        final = tree.store.messages(att.chat_id)[-1]
        if final.role != "assistant" or final.status != "complete" \
                or final.provenance.get("tool_calls"):
            return "interrupted"
    return att.status


def _compare_marks(tree: ChatTree, chat: Chat) -> tuple[list[dict[str, Any]], list[str]]:
    """A comparison batch's marks and model names: the first replies of the subchats of
    ``chat``'s rows (rows that hold no messages) that carry the batch mark naming their
    row. One query; ([], []) when ``chat`` is no comparison's batch chat."""
    rows: dict[int, str] = {}
    found = []
    for cid, parent, name, _, count, _, seq, role, _, _, prov in tree.store.batch_rows(chat.id, 2):
        if parent == chat.id:
            if not count:
                rows[cid] = name
        elif parent in rows and seq == 1 and role == "assistant":
            mark = prov.get(MARK)
            if isinstance(mark, dict) and str(mark.get("item", rows[parent])) == rows[parent]:
                found.append((name, prov))
    sides = list(dict.fromkeys(name for name, _ in found))
    return [prov for _, prov in found], sides


def marks_row(name: str, provenance: dict[str, Any]) -> bool:
    """Whether a first reply in the subchat ``name`` is a batch row's: it carries the
    batch mark naming that row (a vote's samples ``1..K``, a comparison's model subchats
    and ``attempt-K`` subchats name another chat: their parent is not a batch chat)."""
    mark = provenance.get(MARK)
    return isinstance(mark, dict) and ("item" not in mark or str(mark["item"]) == name)


def is_batch_chat(tree: ChatTree, chat: Chat) -> bool:
    """Whether ``chat`` is a batch chat: no messages, and subchats that are its rows (a
    row's first reply carries the batch mark naming it; a comparison's row holds nothing
    and its models' subchats carry the mark naming the row)."""
    kids = tree.children(chat)
    if not kids or tree.store.message_count(chat.id):
        return False
    names = {c.id: c.name for c in kids}
    firsts = first_exchanges(tree, chat)
    if any(len(ex) > 1 and marks_row(names[cid], ex[1][3]) for cid, ex in firsts.items()):
        return True
    return any(len(ex) > 1 and marks_row(k.name, ex[1][3])
               for k in kids if k.id not in firsts and k.children
               for ex in first_exchanges(tree, k).values())


def check_not_batch(tree: ChatTree, chats: list[Chat]) -> None:
    """Refuse a message into a batch chat (it would stop being one), with the ways on."""
    for chat in chats:
        if is_batch_chat(tree, chat):
            parent = chat.parent.path if chat.parent is not None else "root"
            raise InvalidInput(
                f"{chat.path} is a batch chat (one subchat per row); a message into it would "
                f"make it a plain chat. %%subchat {parent} continues the parent, "
                f"%%subchat {chat.path}/ROW continues one row, and --as VAR then {{VAR}} puts "
                "the results into a message")


def first_exchanges(tree: ChatTree, chat: Chat) -> dict[int, list[tuple]]:
    """The first two messages of each subchat of ``chat`` (a batch's rows): ``{chat_id:
    [(role, content, status, provenance), ...]}``, one query for all; a subchat with no
    messages is absent."""
    out: dict[int, list[tuple]] = {}
    for cid, _, role, content, status, prov in tree.store.first_exchanges(chat.id):
        out.setdefault(cid, []).append((role, content, status, prov))
    return out


__all__ = ["Batch", "BatchResult", "Entry", "Items", "Progress", "Row", "Shape", "Summary", "claim",
           "items_of", "fields_of", "check_fields", "names_in", "row_names", "summaries",
           "first_exchanges", "DEFAULT_CONCURRENCY", "ENGINE_IN_FLIGHT"]


class _Writes:
    """:meth:`Batch._writes`'s block. A class, not a generator: a block never exited is
    never finalized by the garbage collector on another thread (a pool's, inside its HTTP
    client's lock) while this one holds the store (that deadlocked a batch)."""

    __slots__ = ("batch", "runner", "tx")

    def __init__(self, batch: Batch, runner: Runner) -> None:
        self.batch, self.runner = batch, runner
        self.tx = batch.tree.store.transaction()

    def __enter__(self) -> None:
        self.batch._group = []
        try:
            self.tx.__enter__()
        except BaseException:
            self.batch._group = None
            raise
        self.batch.tree.defer_replies()  # the rows' replies: one statement at the end

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        b = self.batch
        try:
            try:
                if kind is None:
                    try:
                        b.tree.flush_replies(stop=True)
                    except BaseException as err:  # (cut while writing: rolled back below)
                        kind, exc, tb = type(err), err, err.__traceback__
                        self.tx.__exit__(kind, exc, tb)
                        raise
                else:
                    b.tree.defer_replies(False)  # (rolled back: every row is written below)
                self.tx.__exit__(kind, exc, tb)
            except BaseException:
                if kind is None:
                    kind = BaseException  # the commit failed: write the rows one by one
                raise
            finally:
                if kind is not None:
                    ended = [ex for ex in self.runner.flying.values() if ex.reply is not None]
                    for ex in (b._group or []) + ended:  # (cut mid-store)
                        r = ex.reply
                        if r is not None:
                            b.tree.store.update_reply(r.id, r.content, r.status, r.provenance)
        finally:
            b._group = None
        return False
