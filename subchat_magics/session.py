"""The core: one notebook's state around one chat tree, and every change made to it.

A :class:`Session` owns which store is open, which chat is current (held by id, so a
rename anywhere keeps it and a delete moves it to the nearest surviving ancestor, saying
so), the backend choice, the generation defaults and the keys entered in this kernel; and
it makes every change of the tree: send, fan out, branch, rename, delete, set a system
prompt, export, import. The magics and the tree view only parse, call it and display;
they learn what changed from its events (:meth:`Session.subscribe`).

Imports the tree, the turn, the views' formats (render) and the backend registry; never
IPython or ipywidgets.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from . import batch as batch_mod
from . import compare as compare_mod
from . import estimate as estimate_mod
from . import exchange, verdict
from .backends.base import Availability, Backend, GenerationOptions
from .backends.registry import Selection, registry
from .batch import Batch, BatchResult
from .errors import ChatNotFound, InvalidInput, SubchatError
from .events import Listener, Listeners
from .exchange import check_backend_name, check_prompt, check_text
from .multibatch import run_plain
from .secrets import steady
from .settings import getenv, where
from .toolrun import MAX_ROUNDS, Approver, ToolRun, run_calls
from .tools import Toolset
from .tree import ROOT, Chat, ChatTree, default_store_path, normalize_path
from .turn import Fanout, Turn
from .values import Limits
from .vote import Vote

MAX_FANOUT = 64


class Tree(ChatTree):
    """A chat tree you can talk to: :class:`~subchat_magics.tree.ChatTree` plus
    :meth:`send` and :meth:`batch` (``open_tree()`` returns one). Both go through the same
    plan as the magics (a session on this tree): the same checks and refusals, the same
    backend choice (``LLM_BACKEND``, else ``auto``) and defaults."""

    _session: "Session | None" = None

    @property
    def session(self) -> "Session":
        """The session every ``send``/``batch`` of this tree goes through."""
        if self._session is None:
            self._session = Session.on_tree(self)
        return self._session

    def send(self, chat: "str | int | Chat", text: str, **kwargs: Any) -> "Turn | ToolRun":
        """Start a turn: ``for delta in tree.send("root", "hi"): ...``; then
        ``turn.reply`` is the stored reply. Keyword arguments: ``backend``, ``system`` and
        the generation options (``max_tokens``, ``temperature``, ``top_p``, ``stop``,
        ``seed``, ``model``, ``think``, ``extra``, ``constraint``); ``tools=[f, g]`` (with
        ``approve``, ``max_rounds``) lets the model call them (a
        :class:`~subchat_magics.toolrun.ToolRun`). Everything is checked before anything
        is stored, as for a cell."""
        return self.session.send(chat, text, **kwargs)

    def batch(self, path: "str | int | Chat", items: Any, prompt: Callable[[Any, Any], str],
              progress: Callable[[Any], None] | None = None, *, estimate: bool = False,
              sample: int | None = None, **kwargs: Any) -> "BatchResult | estimate_mod.Estimate":
        """Send ``prompt(item, index)`` for every item into ``PATH/NAME/<index>`` and wait:
        ``tree.batch("root", questions, lambda q, i: f"Answer briefly: {q}", name="qs")``.
        Returns the results in input order and the run's figures (see
        :meth:`Session.batch` for the options); a rerun sends only what is not done.
        At temperature 0 identical prompts are sent once (the copies marked ``duplicate_of``).

        ``estimate=True``: size the batch instead (rows, prompt tokens, the KV budget, a
        projection from ``sample`` rows run for real and kept; default 4) and return the
        :class:`~subchat_magics.estimate.Estimate` (``.lines()`` says it)."""
        if sample is not None and not estimate:
            raise InvalidInput("sample= goes with estimate=True (the rows it times)")
        k = estimate_mod.check_sample(sample) if estimate else 0
        planned = self.session.batch(path, items, prompt, **kwargs)
        if not estimate:
            return run_plain(planned, progress)
        if planned.run_tools is not None:
            raise InvalidInput("estimate=True goes with a batch without tools")
        est = estimate_mod.count(planned, [estimate_mod.Side(
            planned.backend, planned.make_exchange(planned.chat, "x").options)])
        return estimate_mod.sample(est, planned, k, lambda: planned.run(progress))


def open_tree(path: str | os.PathLike[str] | None = None) -> Tree:
    """Open (or create) the chat tree stored at ``path`` (default: ``$SUBCHAT_STORE``
    or ``./subchats.db``)."""
    return Tree(path)


@dataclass
class Defaults:
    """What applies when a cell does not say (``%config SubchatMagics.*`` sets them)."""

    backend: str | None = None  # None: not configured -> LLM_BACKEND -> auto
    options: GenerationOptions = field(default_factory=GenerationOptions)
    system_prompt: str | None = None  # used when no chat on the path sets one
    format: str = "markdown"
    store_path: str | None = None
    update_interval: float = 0.05


@dataclass
class Deleted:
    """What :meth:`Session.delete` did: the paths deleted, and the chat that became
    current if the current one was among them."""

    paths: list[str]
    current_moved_to: str | None = None


@dataclass
class BackendInfo:
    """One row of ``%subchat backends``."""

    name: str
    availability: Availability
    auto_place: int | None  # 1-based place in the auto order; None: only by name
    description: str
    key_env: str | None = None  # the variable holding its key (%subchat key NAME), if any
    own_options: tuple[str, ...] = ()  # the flags of its own options (--num-ctx)


_F = TypeVar("_F", bound=Callable[..., Any])


def _keys_read_once(fn: _F) -> _F:
    """Plan with the keys to mask read once (:func:`~subchat_magics.secrets.steady`): a
    batch's plan masks each row's values and name, and each read of the keys looked
    ``.env`` up again (three a row, ahead of the first row sent); and with the garbage
    collector's rounds as few as while the batch runs (:func:`batch.few_collections
    <subchat_magics.batch.few_collections>`: a plan makes thousands of rows at once)."""
    @functools.wraps(fn)
    def planned(*args: Any, **kwargs: Any) -> Any:
        with steady(), batch_mod.few_collections():
            return fn(*args, **kwargs)
    return planned  # type: ignore[return-value]


class Session:
    def __init__(self, store_path: str | os.PathLike[str] | None = None):
        self.defaults = Defaults(store_path=str(store_path) if store_path else None)
        self.backend_override: str | None = None  # %subchat backend NAME
        self._tree: Tree | None = None
        self._borrowed: ChatTree | None = None  # a tree opened by someone else (on_tree)
        self._unhook: Callable[[], None] | None = None
        self._resolved: dict[str, Path] = {}
        self._lock = threading.RLock()
        self._listeners = Listeners()
        self._current_id: int | None = None  # None: the root
        self._current_chain: list[tuple[int, str]] = []  # (id, path) root..current, as last seen
        self._streaming: dict[int, set[Turn]] = {}  # chat id -> turns streaming into it
        self._noted: set[Path] = set()  # read-only stores whose note was given

    @classmethod
    def on_tree(cls, tree: ChatTree) -> "Session":
        """A session around a tree someone already opened (a tree view made from a bare
        tree): it changes that very object, so its holder sees the same chats and events.
        Closing the session leaves the tree open."""
        session = cls(store_path=tree.store.path)
        with session._lock:
            session._tree = session._borrowed = tree  # type: ignore[assignment]
            session._unhook = tree.subscribe(session._on_tree_event, relays=session._listeners)
        return session

    # -- events ------------------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(event, data)`` for every change: ``chat-created`` (id, path),
        ``chat-renamed`` (id, old, path), ``chat-deleted`` (ids, paths), ``message`` (id,
        path, message), ``reply-start``/``reply-delta``/``reply-end`` (id, path, turn,
        delta/message), ``current`` (id, path, reason), ``batch-start`` (id, path, total:
        a batch is about to make and send its rows). Returns the unsubscribe function."""
        return self._listeners.add(listener)

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        self._listeners.send(event, data)

    def _on_tree_event(self, event: str, data: dict[str, Any]) -> None:
        """The open tree's events: keep track of streaming replies, pass everything on."""
        if event in ("reply-start", "reply-end"):
            turn = data.get("turn")
            with self._lock:
                turns = self._streaming.setdefault(data["id"], set())
                if event == "reply-start":
                    turns.add(turn)
                else:
                    turns.discard(turn)
                    if not turns:
                        self._streaming.pop(data["id"], None)
        self._emit(event, data)

    # -- the tree ----------------------------------------------------------------------------
    def store_path(self) -> Path:
        """The store file, absolute. A relative setting is taken from the working folder
        the first time it is seen, so a later ``%cd`` does not switch trees."""
        raw = self.defaults.store_path or str(default_store_path())
        path = self._resolved.get(raw)
        if path is None:
            path = self._resolved[raw] = Path(raw).expanduser().resolve()
        return path

    @property
    def tree(self) -> Tree:
        """The tree at the configured store path, (re)opened when the path changes."""
        with self._lock:
            want = self.store_path()
            if self._tree is None or self._tree.store.path != want:
                new = Tree(want)
                self._close_tree()
                self._tree = new
                self._unhook = new.subscribe(self._on_tree_event, relays=self._listeners)
                self._current_id, self._current_chain = None, []
            return self._tree

    def _close_tree(self) -> None:
        if self._unhook is not None:
            self._unhook()
            self._unhook = None
        if self._tree is not None:
            if self._tree is not self._borrowed:
                self._tree.close()
            self._tree = None

    def close(self) -> None:
        with self._lock:
            self._close_tree()

    def reopen(self, restore: bool = False) -> Tree:
        """Open the store file again after it was removed or replaced while open: the file
        now at that path, or a new, empty store if there is none. ``restore``: first write
        the tree this kernel still holds (the removed file, still open) back to that path.
        The current chat goes back to root."""
        with self._lock:
            if restore:
                old = self.tree.store
                problem = old.file_problem()
                if problem is None:
                    raise InvalidInput(f"the store {old.path} is in place; nothing to restore")
                if old.path.exists():
                    raise InvalidInput(f"{old.path} {problem}: restoring would overwrite the "
                                       "file now there; %subchat reopen opens it instead")
                old.copy_to(old.path)
            self._close_tree()
            return self.tree

    def store_note(self) -> str | None:
        """Once per store opened: that it opened read-only, and how to continue in a copy
        (``None`` otherwise, and when no store is open)."""
        tree = self._tree
        if tree is None or not tree.store.read_only or tree.store.path in self._noted:
            return None
        self._noted.add(tree.store.path)
        return (f"{tree.store.path} opened read-only ({tree.store.read_only}): tree, show, "
                "export and the tree view work; to add to it, %subchat copy-to "
                "/kaggle/working/subchats.db (any writable file) copies it and continues there")

    def copy_to(self, dest: str | os.PathLike[str]) -> Tree:
        """Copy the open store to ``dest`` (a new file) and continue there: the current
        chat stays current (ids are kept). The original is not touched."""
        target = Path(dest).expanduser().resolve()
        source = self.tree.store
        if target == source.path:
            raise InvalidInput(f"{target} is the store in use; give another file")
        if target.exists():
            raise InvalidInput(f"{target} exists already; give a new file (or delete that one)")
        if not target.parent.is_dir():
            raise InvalidInput(f"folder {target.parent} does not exist; create it first")
        keep = self._current_id
        source.copy_to(target)
        self.defaults.store_path = str(target)
        tree = self.tree  # reopens at the copy
        if keep is not None and tree.find(keep) is not None:
            self._set_current(tree.get(keep), reason="copy-to")
        return tree

    def store_problem(self) -> str | None:
        """Why the open store can no longer be written (its file was removed or replaced
        while open), as a sentence, or ``None``."""
        problem = self.tree.store.file_problem()
        if problem is None:
            return None
        way = ("%subchat reopen --restore writes back what this kernel still holds, "
               "%subchat reopen starts a new store" if problem == "was removed"
               else "%subchat reopen opens the file now there")
        return f"the store file {problem} while open: nothing more can be saved to it; {way}"

    def chat(self, ref: "str | int | Chat | None" = None) -> Chat:
        """The chat ``ref`` names (a path, an id or a :class:`Chat`), or the current one."""
        if ref is None:
            return self.current_chat()
        return self.tree.get(ref)

    # -- the current chat (held by id) ---------------------------------------------------------
    def _set_current(self, chat: Chat, reason: str = "use") -> None:
        chain = [(c.id, c.path) for c in self.tree.lineage(chat)]
        changed = chat.id != self._current_id
        self._current_id = chat.id
        self._current_chain = chain
        if changed:
            self._emit("current", {"id": chat.id, "path": chat.path, "reason": reason})

    def current_chat(self) -> Chat:
        """The current chat. If it was deleted elsewhere (another kernel, a script), its
        nearest surviving ancestor becomes current and :class:`ChatNotFound` says so: a
        cell without a path never silently recreates a deleted chat."""
        tree = self.tree
        with self._lock:
            if self._current_id is None:
                return tree.root
            chat = tree.find(self._current_id)
            if chat is not None:
                return chat
            lost = self._current_chain[-1][1] if self._current_chain else "?"
            survivor = tree.root
            for cid, _ in reversed(self._current_chain[:-1]):
                found = tree.find(cid)
                if found is not None:
                    survivor = found
                    break
            self._set_current(survivor, reason="deleted elsewhere")
        raise ChatNotFound(
            f"the current chat {lost!r} was deleted (by another kernel or program); "
            f"{survivor.path} is current now: run the cell again to send there, or name a chat")

    @property
    def current(self) -> str:
        """The current chat's path (its last known path if it was deleted elsewhere)."""
        with self._lock:
            if self._current_id is None:
                return ROOT
            chat = self.tree.find(self._current_id)
            if chat is not None:
                return chat.path
            return self._current_chain[-1][1] if self._current_chain else ROOT

    @current.setter
    def current(self, path: str) -> None:
        self.use(path)

    def use(self, ref: "str | int | Chat") -> str:
        """Make the chat ``ref`` names current; returns its path."""
        chat = self.tree.get(ref)
        self._set_current(chat)
        return chat.path

    # -- backends ----------------------------------------------------------------------------
    def requested_backend(self, flag: str | None = None) -> tuple[str, str]:
        """The backend asked for, and where that came from (highest wins):
        ``--backend`` > ``%subchat backend`` > ``%config`` > ``LLM_BACKEND`` > auto."""
        for value, source in (
            (flag, "--backend"),
            (self.backend_override, "%subchat backend"),
            (self.defaults.backend, "%config SubchatMagics.backend"),
        ):
            if value:
                return check_backend_name(value), source
        env = getenv("LLM_BACKEND")
        if env:
            return check_backend_name(env, source=f"LLM_BACKEND ({where('LLM_BACKEND')})"), \
                f"LLM_BACKEND in {where('LLM_BACKEND')}"
        return "auto", "default"

    def plan(self, flag: "str | Backend | None",
             options: "GenerationOptions | list[GenerationOptions]") -> "exchange.Plan":
        """Check a request before anything is stored (:func:`subchat_magics.exchange.plan`)
        with the backend asked for here (``--backend`` > ``%subchat backend`` > ``%config``
        > ``LLM_BACKEND`` > auto)."""
        if isinstance(flag, Backend):  # a backend object (the Python API): as if by name
            return exchange.plan(flag, options)
        return exchange.plan(self.requested_backend(flag)[0], options)

    def select(self, flag: str | None = None) -> Selection:
        name, _ = self.requested_backend(flag)
        return registry().select(name)

    def set_backend(self, name: str | None) -> tuple[str, str, str]:
        """Set this session's backend (``None``: leave it); returns (asked for, where
        from, the backend that answers now)."""
        if name:
            self.backend_override = check_backend_name(name, "%subchat backend")
        requested, source = self.requested_backend()
        sel = self.select()
        return requested, source, sel.candidates[0].id if sel.candidates else "none"

    def backends(self) -> list[BackendInfo]:
        """Every backend, available or not and why, and its place in the auto order."""
        reg = registry()
        order = reg.auto_order()
        keys = reg.key_backends()
        out = []
        for name in reg.names():
            try:
                own = tuple(o.flag for o in reg.backend_class(name).own_options.values())
            except SubchatError:
                own = ()
            out.append(BackendInfo(name, reg.availability(name),
                                   order.index(name) + 1 if name in order else None,
                                   reg.describe(name), keys.get(name), own))
        return out

    def options(self, **overrides: Any) -> GenerationOptions:
        """The defaults with ``overrides`` (``None`` skipped), validated."""
        return self.defaults.options.replace(**overrides)

    # -- sending -----------------------------------------------------------------------------
    def _target(self, path: "str | int | Chat | None", *, create: bool,
                system: str | None = None) -> Chat:
        if path is None:
            return self.current_chat()
        if isinstance(path, str) and create:
            return self.tree.ensure(path, system_prompt=system)
        return self.tree.get(path)

    def send(self, path: "str | int | Chat | None", text: str, *, backend: str | None = None,
             system: str | None = None, tools: Any = None, approve: Any = None,
             max_rounds: int | None = None, limits: Limits | None = None,
             vote: int | None = None, answer: str | None = None,
             compare: "str | list[str] | None" = None, **options: Any) -> Any:
        """Start a turn in ``path`` (created under an existing parent if new) or the
        current chat, which becomes current. Iterate the turn to stream. Everything is
        checked before the tree is touched; ``system`` sets the chat's system prompt.

        ``tools`` (functions, or a :class:`~subchat_magics.tools.Toolset`): the model may
        call them; the result is a :class:`~subchat_magics.toolrun.ToolRun` that asks
        before each call (``approve=True``: run every call; ``False``: refuse them all; a
        function of the call: decide) for up to ``max_rounds`` rounds (default 5).
        ``vote=K`` (with ``answer``): K samples and their verdict (a :class:`Vote`);
        ``compare="a,b:model"``: the message to each (a :class:`Compare`)."""
        if tools is not None and (vote is not None or answer is not None or compare is not None):
            raise InvalidInput("--tools goes with one reply (or --fanout), not with --vote or "
                               "--compare")
        if vote is not None or answer is not None:
            if compare is not None:
                return self.compare(path, text, compare, backend=backend, system=system,
                                    vote=vote, answer=answer, **options)
            return self.vote(path, text, vote, answer=answer, backend=backend, system=system,
                             **options)
        if compare is not None:
            return self.compare(path, text, compare, backend=backend, system=system, **options)
        check_prompt(text)
        check_text(system, "the system prompt")
        toolset, rounds = _tools(tools, approve, max_rounds, options)
        plan = self.plan(backend, self.options(**options))
        if isinstance(path, str):
            normalize_path(path)  # a bad path is refused before anything is made
        self._check_free([path])
        chat = self._target(path, create=True, system=system)
        if system is not None and chat.system_prompt != (system or None):
            self.tree.set_system_prompt(chat, system)
        self._set_current(chat, reason="send")
        if toolset is not None:
            return self._tool_run(chat, text, toolset, plan.selection, plan.options[0],
                                  Approver.of(approve), rounds, limits)
        return Turn(self.tree, chat, text, backend=plan.selection, options=plan.options[0],
                    default_system=self.defaults.system_prompt)

    def _tool_run(self, chat: Chat, text: str, toolset: Toolset, selection: Selection,
                  opts: GenerationOptions, approver: Approver, rounds: int,
                  limits: Limits | None) -> ToolRun:
        """A message answered with tools: each round a :class:`Turn` on the plan made."""
        tree, system = self.tree, self.defaults.system_prompt

        def new_turn(follow_up: bool) -> Turn:
            return Turn(tree, chat, None if follow_up else text, backend=selection,
                        options=opts, default_system=system, follow_up=follow_up)

        return ToolRun(tree, chat, text, toolset, new_turn, approve=approver,
                       max_rounds=rounds, limits=limits or Limits())

    def _check_free(self, refs: list["str | int | Chat | None"]) -> None:
        """Refuse, before anything is written, a send into a chat with a reply streaming
        into it now (one reply per chat at a time)."""
        tree = self.tree
        chats = []
        for ref in refs:
            if ref is None:
                chats.append(self.current_chat())
            elif not isinstance(ref, str):
                chats.append(tree.get(ref))
            elif ref in tree:
                chats.append(tree.get(ref))
        batch_mod.check_not_batch(tree, chats)
        exchange.busy(tree).check(chats)

    def next_child_names(self, parent: "str | int | Chat", count: int = 1) -> list[str]:
        """Names for ``count`` new numbered subchats of ``parent``: after the highest
        plain-ASCII number among its children (``1``, ``2``...)."""
        chat = self.tree.get(parent)
        taken = [int(c.name) for c in chat.children if c.name.isascii() and c.name.isdigit()]
        start = max(taken, default=0) + 1
        return [str(i) for i in range(start, start + count)]

    def branch(self, parent: "str | int | Chat | None" = None, name: str | None = None) -> Chat:
        """Create a subchat of ``parent`` (default: the current chat) named ``name``
        (default: the next free number); it becomes current."""
        par = self._target(parent, create=False)
        name = (name or "").strip() or self.next_child_names(par)[0]
        path = normalize_path(f"{par.path}/{name}")
        if path.count("/") != par.path.count("/") + 1:
            raise InvalidInput(f"a branch name is one path part, not {name!r}")
        chat = self.tree.create(path)
        self._set_current(chat, reason="branch")
        return chat

    def fanout(self, path: "str | int | Chat | None", text: str, *, n: int | None = None,
               names: list[str] | None = None, backend: str | None = None,
               system: str | None = None, temperatures: list[float] | None = None,
               tools: Any = None, approve: Any = None, max_rounds: int | None = None,
               limits: Limits | None = None, **options: Any) -> "Fanout | list[ToolRun]":
        """Send ``text`` into several new (or named) subchats of ``path`` at once.
        Without names the children are numbered after the existing ones (``1``, ``2``...).
        Without a temperature they sample at 0.7 with seeds 1..N, so they differ.

        With ``tools`` each subchat gets its own tool loop (a list of
        :class:`~subchat_magics.toolrun.ToolRun`, run one after the other: a call runs in
        this thread); approvals are asked once per tool for all of them."""
        check_prompt(text)
        check_text(system, "the system prompt")
        toolset, rounds = _tools(tools, approve, max_rounds, options)
        if names is not None and n is not None:
            raise InvalidInput("--fanout N makes numbered subchats and --children a,b names "
                               "them: give one of the two")
        if names is None:
            if n is None or not 1 <= n <= MAX_FANOUT:
                raise InvalidInput(
                    f"--fanout takes a number of subchats from 1 to {MAX_FANOUT}, not {n!r}")
        else:
            names = [x.strip() for x in names if x.strip()]
            if not names or len(names) > MAX_FANOUT or len(set(names)) != len(names):
                raise InvalidInput(
                    f"--children takes 1 to {MAX_FANOUT} distinct names, e.g. --children a,b,c")
        count = len(names) if names is not None else n
        if temperatures is not None and len(temperatures) not in (1, count):
            raise InvalidInput(f"give one temperature, or one per subchat ({count})")
        base = self.options(**options)
        per_chat = []
        for i in range(count):
            opts = base.replace()
            if temperatures is not None:
                opts.temperature = temperatures[i if len(temperatures) > 1 else 0]
            elif options.get("temperature") is None and count > 1:
                opts.temperature = 0.7
            if opts.seed is None and count > 1:
                opts.seed = i + 1
            per_chat.append(opts.validate())
        plan = self.plan(backend, per_chat)
        if isinstance(path, str) and path not in self.tree:
            # a new path is made (under an existing parent), as --each, --vote and --compare
            # do, once the names under it are known to be valid
            new = normalize_path(path)
            for name in names or []:
                if normalize_path(f"{new}/{name}").count("/") != new.count("/") + 1:
                    raise InvalidInput("--children takes names of one path part each, e.g. a,b,c")
            parent = self._target(path, create=True)
        else:
            parent = self._target(path, create=False)
            batch_mod.check_not_batch(self.tree, [parent])  # (new rows in a batch would lie)
        if names is None:
            names = self.next_child_names(parent, count)
        paths = [normalize_path(f"{parent.path}/{name}") for name in names]
        if any(p.count("/") != parent.path.count("/") + 1 for p in paths):
            raise InvalidInput("--children takes names of one path part each, e.g. a,b,c")
        self._check_free(list(paths))
        turns = []
        chats = []
        for p, opts in zip(paths, per_chat):
            chat = self.tree.ensure(p, system_prompt=system)
            # -s sets the prompt of every chat it names, as for one chat: existing ones too
            if system is not None and chat.system_prompt != (system or None):
                self.tree.set_system_prompt(chat, system)
                chat = self.tree.get(chat.id)
            chats.append((chat, opts))
        self._set_current(parent, reason="fanout")
        if toolset is not None:
            approver = Approver.of(approve)
            if not approver.yes:
                approver.per_tool = True  # one answer per tool for every subchat
            return [self._tool_run(chat, text, toolset, plan.selection, opts, approver, rounds,
                                   limits) for chat, opts in chats]
        for chat, opts in chats:
            turns.append(Turn(self.tree, chat, text, backend=plan.selection, options=opts,
                              default_system=self.defaults.system_prompt))
        return Fanout(turns)

    def vote_options(self, k: int | None, options: dict[str, Any]) -> list[GenerationOptions]:
        """The options of K samples (``--vote K``): sampled at 0.7 unless a temperature is
        given (0 is refused: every sample would be the same answer). With ``--seed S`` the
        samples are seeded ``S + i`` (a rerun gives the same ones); without, they are
        unseeded draws: they differ, and an engine samples them all with its one random
        generator (on vLLM a seeded sample costs a generator of its own at every step:
        ~10% of a large vote batch's time on the CPU engine, see bench_verdicts)."""
        k = verdict.check_vote(k)
        if k is None:
            raise InvalidInput("--answer goes with --vote K (the samples' answers are compared)")
        base = self.options(**options)
        if options.get("temperature") is None:
            base.temperature = 0.7
        elif base.temperature == 0:
            raise InvalidInput("--vote samples several answers; at --temperature 0 every sample "
                               "is the same: give a temperature above 0 (or leave it out: 0.7)")
        if base.seed is None:
            return [base.replace() for _ in range(k)]
        return [base.replace(seed=base.seed + i) for i in range(k)]

    def vote(self, path: "str | int | Chat | None", text: str, k: int | None, *,
             answer: str | None = None, backend: "str | Backend | None" = None,
             system: str | None = None, **options: Any) -> Vote:
        """``k`` samples of ``text`` into ``k`` new numbered subchats of ``path`` (created if
        new) and the verdict, the most common answer, on ``path``'s own exchange
        (:class:`~subchat_magics.vote.Vote`). ``answer``: a regex whose first group is
        what is compared (else the parsed value under a constraint, else the stripped
        reply). On vLLM the samples are one engine request (``n=k``)."""
        check_prompt(text)
        check_text(system, "the system prompt")
        pattern = verdict.compile_answer(answer)
        per_sample = self.vote_options(k, options)
        plan = self.plan(backend, per_sample)
        if isinstance(path, str):
            normalize_path(path)
        self._check_free([path])
        chat = self._target(path, create=True, system=system)
        if system is not None and chat.system_prompt != (system or None):
            self.tree.set_system_prompt(chat, system)
            chat = self.tree.get(chat.id)
        names = self.next_child_names(chat, len(per_sample))
        samples = [self.tree.create(f"{chat.path}/{n}") for n in names]  # branch off before
        self._set_current(chat, reason="vote")
        return Vote(self.tree, chat, samples, text, per_sample, plan.selection, pattern=pattern,
                    default_system=self.defaults.system_prompt)

    def compare_plan(self, spec: "str | list[str]", options: dict[str, Any]
                     ) -> tuple[list[compare_mod.Entry], list[exchange.Plan]]:
        """Each entry of ``--compare`` planned on its own (named: it must be set up, take
        every option and serve the model it names), before anything is stored."""
        entries = compare_mod.parse_entries(spec)
        plans = []
        for e in entries:
            opts = self.options(**{**options, "model": e.model or options.get("model")})
            plans.append(exchange.plan(e.backend, opts))
        seen: dict[tuple[str, str | None], str] = {}
        for e, p in zip(entries, plans):  # two entries that name one model as it is sent
            model = p.options[0].model or p.backend.default_model()
            first = seen.setdefault((p.backend.id, model), e.spec)
            if first != e.spec:
                raise InvalidInput(f"--compare {first} and {e.spec} are the same model "
                                   f"({model or p.backend.id}); name each model once")
        for e, p in zip(entries, plans):  # (every entry set up before any server is asked)
            exchange.check_model(p.backend, e.model, f"--compare {e.spec}")
        return entries, plans

    def compare(self, path: "str | int | Chat | None", text: str, spec: "str | list[str]", *,
                backend: str | None = None, system: str | None = None,
                vote: int | None = None, answer: str | None = None,
                **options: Any) -> compare_mod.Compare:
        """``text`` to each backend or ``backend:model`` of ``spec`` at once, each into a
        new subchat of ``path`` named after its model (:class:`~subchat_magics.compare.Compare`)."""
        check_prompt(text)
        check_text(system, "the system prompt")
        if backend is not None:
            raise InvalidInput("--compare names the backends itself; leave out --backend")
        if vote is not None or answer is not None:
            raise InvalidInput("--vote goes with --compare only with --each (a table of "
                               "verdicts per model); vote on one model at a time here")
        entries, plans = self.compare_plan(spec, options)
        if isinstance(path, str):
            normalize_path(path)
        self._check_free([path])
        names = compare_mod.column_names(entries, [p.backend for p in plans],
                                           [p.options[0].model for p in plans])
        chat = self._target(path, create=True, system=system)
        if system is not None and chat.system_prompt != (system or None):
            self.tree.set_system_prompt(chat, system)
            chat = self.tree.get(chat.id)
        taken = {c.name for c in chat.children}
        paths = []
        for n in names:  # a second comparison in the same chat: echo-2, other-2…
            k, name = 1, n
            while name in taken:
                k += 1
                name = f"{n}-{k}"
            paths.append(f"{chat.path}/{name}")
        self._check_free(paths)
        kids = [self.tree.ensure(p) for p in paths]
        self._set_current(chat, reason="compare")
        system_ = self.defaults.system_prompt
        return compare_mod.Compare(
            [exchange.Exchange(self.tree, c, text, p.options[0], default_system=system_)
             for c, p in zip(kids, plans)], [p.selection for p in plans], names)

    @_keys_read_once
    def batch(self, path: "str | int | Chat | None", items: Any,
              prompt: Callable[[Any, Any], str], *, name: str = "items", fresh: bool = False,
              redo: bool = False, limit: int | None = None, concurrency: int | None = None,
              backend: str | None = None, system: str | None = None,
              known: Callable[[str], bool] | None = None, template: str | None = None,
              tools: Any = None, approve: Any = None, max_rounds: int | None = None,
              limits: Limits | None = None,
              mark: dict[str, Any] | None = None,
              planning: Callable[[str, int, int], None] | None = None,
              shape: "batch_mod.Shape | None" = None, **options: Any) -> Batch:
        """Plan a batch: ``prompt(item, index)`` is the message of each item of ``items``
        (a list, tuple, dict, sized iterable, pandas Series or DataFrame), sent into its
        own chat ``PATH/NAME/<index>`` under a batch chat ``PATH/NAME`` that holds no
        messages. A row is identified by its whole request (the message, the system prompt
        in force, the options, the constraint, the backend and the model; a digest of them
        is kept in its reply's provenance): rows already completed under the same request
        are reused, and a rerun under another request is refused, naming what changed,
        unless ``redo`` (those rows are resent, their earlier replies kept) or ``fresh`` (a
        new batch chat ``NAME-2``…). A row with a missing value (None, NaN, NaT, NA) in a
        field the template uses, or an empty message, is skipped and counted. ``limit``:
        the first K items (only those are read). ``concurrency``: requests in flight
        (remote default 4; vLLM: up to 1024 in the engine). ``system`` sets the batch
        chat's system prompt. ``template`` with ``known`` (names of the namespace) checks
        every ``{name}`` it uses. Everything is checked before the tree is touched;
        ``.run()`` sends. The batch runs on one backend: no fallback mid-way.

        ``tools`` (with ``approve``, ``max_rounds``): each row may call them, between
        rounds of the batch; approvals are asked once per tool for the whole batch.
        ``planning(stage, done, total)`` hears how far planning is, every ~0.1 s once it
        has taken a second (a big batch: nothing is sent until it ends).

        ``shape``: the rows are a vote's or a comparison's (run by
        :class:`~subchat_magics.multibatch.MultiBatch`): their request names its backends,
        models and vote, and a rerun reads their rows as such (the same rules)."""
        import time as _time

        t0 = _time.perf_counter()
        name = batch_mod.check_name(name)
        toolset, rounds = _tools(tools, approve, max_rounds, options)
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise InvalidInput(f"--limit takes a number of items >= 1, not {limit!r}")
        if limit is not None:
            limit = min(limit, sys.maxsize)  # more than any list holds: every item
        if concurrency is not None and (not isinstance(concurrency, int) or concurrency < 1):
            raise InvalidInput(f"--concurrency takes a number of requests >= 1, not {concurrency!r}")
        if fresh and redo:
            raise InvalidInput("--fresh starts a new batch chat and --redo resends rows of this "
                               "one; give one of them")
        batch_mod.pause_budget()  # (SUBCHAT_RATE_LIMIT_PAUSE checked before anything)
        check_text(system, "the system prompt")
        if template is not None and not template.strip():
            check_prompt(template)
        # a row keeps its context (the batch's instructions): never cut to fit a window
        opts = self.options(**options, keep_context=True)
        plan = self.plan(backend, opts)
        first = plan.backend
        found = (items if isinstance(items, batch_mod.Items)
                 else batch_mod.items_of(items, name, limit))
        entries = found.entries[:limit] if limit is not None else found.entries
        if not entries:
            raise InvalidInput(f"{name} is empty: there is nothing to send")
        if template is not None:
            batch_mod.check_fields(template, batch_mod.Items(entries), known or (lambda _: False))
        used = batch_mod.names_in(template) if template is not None else None
        tree = self.tree
        parent: Chat | None = None
        if isinstance(path, str):
            full = normalize_path(path)
            if full in tree:
                parent = tree.get(full)
            else:
                tree.get(full.rpartition("/")[0])  # its parent must exist (ChatNotFound)
        else:
            parent = self._target(path, create=False)
        chat_path = batch_mod.chat_path(tree, parent, name, fresh) if parent is not None else None
        existing = tree.get(chat_path) if chat_path is not None and chat_path in tree else None
        # the request every row is identified by (the prompt in force as the rows will see it)
        default_system = self.defaults.system_prompt
        above = parent if parent is not None else tree.get(full.rpartition("/")[0])
        if system:
            in_force: str | None = system
        elif system is None and existing is not None:
            in_force = exchange.system_in_force(tree, existing, default_system)[0]
        else:  # the batch chat's own prompt cleared, or a new batch chat: what it inherits
            in_force = exchange.system_in_force(tree, above, default_system)[0]
        model = opts.model or first.default_model()
        options_part = batch_mod.options_part(opts)
        system_part = batch_mod._h(in_force or "")  # (one prompt for every row: digested once)
        req_backend, req_model = first.id, model
        if shape is not None:
            req_backend, req_model = shape.backend or first.id, shape.model or model
            if shape.options:
                options_part = batch_mod._h(options_part + " " + shape.options)
        names = batch_mod.row_names(entries)
        rows = []
        said = [0.0]

        def say(stage: str, done: int) -> None:
            now = _time.perf_counter()
            if planning is not None and now - t0 >= 1.0 and now - said[0] >= 0.1:
                said[0] = now
                planning(stage, done, len(entries))

        for e, n in zip(entries, names):
            if not e.pos & 255:
                say("preparing the rows", e.pos)
            row = batch_mod.Row(e.pos, e.label, n, "")
            gone = batch_mod.missing_fields(e, used)
            if gone:
                row.status, row.reason = "skipped", f"missing: {', '.join(gone)}"
            else:
                text = prompt(e.item, e.label)
                if not isinstance(text, str):
                    raise InvalidInput(f"item {e.label!r} (position {e.pos}): the message must "
                                       f"be text (a str), not {type(text).__name__}")
                row.cut_value = bool(getattr(text, "cut", False))
                text = str(text)
                try:
                    check_text(text, "the message")
                except InvalidInput as exc:
                    raise InvalidInput(f"item {e.label!r} (position {e.pos}): {exc}") from None
                if not text.strip():
                    row.status, row.reason = "skipped", "empty message"
                row.text = text
                row.request = batch_mod.request_parts(text, in_force, opts, req_backend,
                                                      req_model, options_part, system_part)
            rows.append(row)
        notes: list[str] = []
        if existing is not None:
            say("matching the stored rows", len(rows))
            busy = exchange.busy(tree)
            notes = batch_mod.match_rows(tree, existing, rows, redo=redo,
                                         constraint=opts.constraint, busy_chat=busy.holds,
                                         shape=shape)
        # a batch is answered by one backend: once a row of it was sent, no fallback (under
        # auto a fresh batch may still pass over a backend that fails before its first token)
        selection = plan.selection
        if any(r.chat_id is not None for r in rows):
            selection = Selection(selection.requested, [first], selection.passed_over)
        skipped = [r for r in rows if r.status == "skipped"]
        if skipped:
            why: dict[str, int] = {}
            for r in skipped:
                why[r.reason or ""] = why.get(r.reason or "", 0) + 1
            notes.insert(0, f"{len(skipped)} row(s) skipped, not sent: " + ", ".join(
                f"{k} ({v})" for k, v in why.items()) + "; --as gets None for them")
        # every check passed: now the tree may change
        if parent is None:
            parent = self._target(path, create=True)
            chat_path = batch_mod.chat_path(tree, parent, name, fresh)
        chat = tree.ensure(chat_path)
        if system is not None and chat.system_prompt != (system or None):
            tree.set_system_prompt(chat, system)
            chat = tree.get(chat.id)
        self._set_current(parent, reason="batch")
        run_tools = None
        if toolset is not None:
            approver = Approver.of(approve)
            if not approver.yes:
                approver.per_tool = True  # one answer per tool for the whole batch
            lim = limits or Limits()

            def run_tools(c: Chat, calls: list) -> None:
                for _ in run_calls(tree, c, calls, toolset, approver, lim):
                    pass

        return batch_mod.Batch(tree, chat, rows, selection=selection,
                               make_exchange=lambda c, text, follow_up=False: exchange.Exchange(
                                   tree, c, text, opts, default_system=default_system,
                                   follow_up=follow_up),
                               run_tools=run_tools, max_rounds=rounds,
                               in_flight=concurrency or first.concurrency,
                               notes=notes, mark=mark,
                               planning_s=_time.perf_counter() - t0,
                               index=None if found.pandas_index is None
                               else found.pandas_index[:len(entries)])

    def streaming(self, ref: "str | int | Chat") -> list[Turn]:
        """The replies streaming into the chat ``ref`` names right now (any face)."""
        chat = self.tree.get(ref)
        with self._lock:
            return list(self._streaming.get(chat.id, ()))

    # -- editing the tree --------------------------------------------------------------------
    def rename(self, ref: "str | int | Chat", new_name: str) -> Chat:
        """Rename a chat. Everything held by id (the current chat, views' selections,
        replies streaming into it or its subchats) follows it."""
        return self.tree.rename(ref, str(new_name).strip())

    def delete(self, ref: "str | int | Chat", force: bool = False) -> Deleted:
        """Delete a chat (``force`` for one with subchats). A chat with a reply streaming
        into it (or into a subchat) cannot be deleted until the reply ends. If the
        current chat is deleted, its nearest surviving ancestor becomes current."""
        tree = self.tree
        chat = tree.get(ref)
        ids = {c.id for c in tree.subtree(chat)}
        with self._lock:
            busy = [cid for cid in ids if self._streaming.get(cid)]
        if busy:
            where_ = tree.find(busy[0])
            raise InvalidInput(
                f"a reply is streaming into {where_.path if where_ else chat.path}; stop it "
                "(Ctrl-C, or Stop in the tree view) or wait for it, then delete")
        current_gone = (self._current_id in ids) or chat.path == ROOT
        parent = chat.parent
        gone = tree.delete(chat, force=force)
        moved = None
        if current_gone:
            survivor = tree.root if chat.path == ROOT or parent is None else tree.get(parent.id)
            previous = self._current_id
            self._set_current(survivor, reason="deleted")
            if previous is not None and previous != survivor.id:
                moved = survivor.path
        return Deleted(gone, moved)

    def set_system(self, ref: "str | int | Chat", text: str | None) -> Chat:
        """Set (``''``/``None``: clear) a chat's own system prompt."""
        chat = self.tree.get(ref)
        self.tree.set_system_prompt(chat, text)
        return self.tree.get(chat.id)

    def system_of(self, ref: "str | int | Chat") -> tuple[str | None, str | None, str]:
        """(the chat's own prompt, the prompt in force, where the one in force comes
        from: ``own``, the ancestor's path, ``%config SubchatMagics.system_prompt`` or
        ``none``)."""
        chat = self.tree.get(ref)
        in_force, source = exchange.system_in_force(self.tree, chat, self.defaults.system_prompt)
        return chat.system_prompt, in_force, source

    # -- status ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        name, source = self.requested_backend()
        sel = registry().select(name)
        tree = self.tree
        return {
            "store": str(self.store_path()),
            "chats": len(tree.chats()),
            "messages": sum(tree.store.message_counts().values()),
            "read_only": tree.store.read_only,
            "store_problem": self.store_problem(),
            "current": self.current,
            "requested": name,
            "requested_from": source,
            "active": sel.candidates[0].id if sel.candidates else None,
            "passed_over": sel.passed_over,
            "auto_order": registry().auto_order(),
        }


_default: Session | None = None


def _tools(tools: Any, approve: Any, max_rounds: Any,
           options: dict[str, Any]) -> "tuple[Toolset | None, int]":
    """``tools`` described (a :class:`Toolset`) and put in ``options``, and the rounds
    allowed; --yes/--max-rounds without tools are refused."""
    if tools is None:
        if approve is not None or max_rounds is not None:
            raise InvalidInput("--yes and --max-rounds go with --tools f,g")
        return None, MAX_ROUNDS
    toolset = Toolset.of(tools)
    rounds = MAX_ROUNDS if max_rounds is None else max_rounds
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise InvalidInput(f"--max-rounds takes a whole number >= 1, not {rounds!r}")
    options["tools"] = toolset.tools
    return toolset, rounds


def default_session() -> Session:
    """The process-wide session used by the magics and :class:`SimpleLLMClient`."""
    global _default
    if _default is None:
        _default = Session()
    return _default


def reset_default_session() -> None:
    global _default
    if _default is not None:
        _default.close()
    _default = None


__all__ = ["Session", "Tree", "open_tree", "Defaults", "Deleted", "BackendInfo",
           "default_session", "reset_default_session", "check_backend_name"]
