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

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import batch as batch_mod
from . import render
from .backends.base import Availability, GenerationOptions
from .backends.registry import Selection, registry
from .batch import Batch, BatchResult
from .errors import BackendUnavailable, ChatNotFound, InvalidInput, SubchatError
from .events import Listener, Listeners
from .secrets import redact, register_secret
from .settings import getenv, set_secret, where
from .toolrun import MAX_ROUNDS, Approver, ToolRun
from .tools import Toolset
from .tree import ROOT, Chat, ChatTree, default_store_path, normalize_path
from .turn import Fanout, Turn
from .values import Limits

KEY_BACKENDS = ("groq", "openai", "ollama")  # backends whose key %subchat key can take
MAX_FANOUT = 64


class Tree(ChatTree):
    """A chat tree you can talk to: :class:`~subchat_magics.tree.ChatTree` plus
    :meth:`send` (``open_tree()`` returns one)."""

    def send(self, chat: "str | int | Chat", text: str, **kwargs: Any) -> Turn:
        """Start a turn: ``for delta in tree.send("root", "hi"): ...``; then
        ``turn.reply`` is the stored reply. Keyword arguments: ``backend`` and the
        generation options (see :class:`~subchat_magics.turn.Turn`)."""
        if kwargs.get("tools") is not None:  # answered with tools: the session's loop
            return Session.on_tree(self).send(chat, text, **kwargs)
        kwargs.pop("tools", None)
        check_prompt(text)  # before the chat is made
        target = self.ensure(chat) if isinstance(chat, str) else self.get(chat)
        return Turn(self, target, text, **kwargs)

    def batch(self, path: "str | int | Chat", items: Any, prompt: Callable[[Any, Any], str],
              progress: Callable[[Any], None] | None = None, **kwargs: Any) -> BatchResult:
        """Send ``prompt(item, index)`` for every item into ``PATH/NAME/<index>`` and wait:
        ``tree.batch("root", questions, lambda q, i: f"Answer briefly: {q}", name="qs")``.
        Returns the results in input order and the run's figures (see
        :meth:`Session.batch` for the options); a rerun sends only what is not done."""
        return Session.on_tree(self).batch(path, items, prompt, **kwargs).run(progress)


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
class Imported:
    """What :meth:`Session.import_file` did: the chats made or filled, and notes on what
    an import had to change to keep each chat's context (empty when nothing changed)."""

    paths: list[str]
    notes: list[str] = field(default_factory=list)


@dataclass
class BackendInfo:
    """One row of ``%subchat backends``."""

    name: str
    availability: Availability
    auto_place: int | None  # 1-based place in the auto order; None: only by name
    description: str


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
            session._unhook = tree.subscribe(session._on_tree_event)
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
                self._unhook = new.subscribe(self._on_tree_event)
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

    def _choose(self, flag: str | None, opts: GenerationOptions) -> Selection:
        """The backends a request goes to, checked before anything is stored: a backend
        asked for by name that is not set up to be tried at all (no model loaded, no key,
        no SDK) is refused here, and the constraint must be one it can keep."""
        selection = self.select(flag)
        if selection.explicit and selection.candidates:
            ready = selection.candidates[0].configured()
            if not ready.ok:
                raise BackendUnavailable(ready.reason)
        return check_constraint(selection, opts)

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
        return [BackendInfo(name, reg.availability(name),
                            order.index(name) + 1 if name in order else None, reg.describe(name))
                for name in reg.names()]

    def set_key(self, backend: str, value: str) -> str:
        """Keep ``backend``'s API key in this process only (never in ``os.environ``, the
        store or the notebook). Returns the variable it stands for."""
        if backend not in KEY_BACKENDS:
            raise InvalidInput(f"no key is used by {backend!r}; one of: {', '.join(KEY_BACKENDS)}")
        value = (value or "").strip()
        var = f"{backend.upper()}_API_KEY"
        if not value:
            raise InvalidInput(f"no key entered; {var} unchanged")
        register_secret(value)
        set_secret(var, value)
        return var

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
             **options: Any) -> "Turn | ToolRun":
        """Start a turn in ``path`` (created under an existing parent if new) or the
        current chat, which becomes current. Iterate the turn to stream. Everything is
        checked before the tree is touched; ``system`` sets the chat's system prompt.

        ``tools`` (functions, or a :class:`~subchat_magics.tools.Toolset`): the model may
        call them; the result is a :class:`~subchat_magics.toolrun.ToolRun` that asks
        before each call (``approve=True``: run every call; a function of the call:
        decide) for up to ``max_rounds`` rounds (default 5)."""
        check_prompt(text)
        check_text(system, "the system prompt")
        toolset = Toolset.of(tools) if tools is not None else None
        if toolset is None and (approve is not None or max_rounds is not None):
            raise InvalidInput("--yes and --max-rounds go with --tools f,g")
        if toolset is not None:
            options["tools"] = toolset.tools
        opts = self.options(**options)
        check_text(opts.model, "the model name")
        selection = self._choose(backend, opts)
        if toolset is not None:
            selection = check_tools(selection, opts)
            rounds = MAX_ROUNDS if max_rounds is None else max_rounds
            if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
                raise InvalidInput(f"--max-rounds takes a whole number >= 1, not {rounds!r}")
        if isinstance(path, str):
            normalize_path(path)  # a bad path is refused before anything is made
        chat = self._target(path, create=True, system=system)
        if system is not None and chat.system_prompt != (system or None):
            self.tree.set_system_prompt(chat, system)
        self._set_current(chat, reason="send")
        if toolset is not None:
            tree = self.tree
            return ToolRun(tree, chat, text, toolset,
                           lambda follow_up: self._turn(chat, text, selection, opts,
                                                        follow_up=follow_up),
                           approve=approve, max_rounds=rounds, limits=limits or Limits())
        return self._turn(chat, text, selection, opts)

    def _turn(self, chat: Chat, text: str, selection: Selection, opts: GenerationOptions,
              tree: ChatTree | None = None, follow_up: bool = False) -> Turn:
        tree = tree or self.tree  # (a batch passes it: its rows need not look it up again)
        turn = Turn(tree, chat, text, backend=selection, options=opts,
                    default_system=self.defaults.system_prompt, follow_up=follow_up)
        system, source = render.system_source(tree, chat, self.defaults.system_prompt)
        if system:  # what was sent, in the reply's provenance
            turn.provenance_extra["system_from"] = source
            if source == render.CONFIG_SYSTEM:  # not in the tree: keep the text itself
                turn.provenance_extra["system_prompt"] = system
        return turn

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
        toolset = Toolset.of(tools) if tools is not None else None
        if toolset is None and (approve is not None or max_rounds is not None):
            raise InvalidInput("--yes and --max-rounds go with --tools f,g")
        if toolset is not None:
            options["tools"] = toolset.tools
            rounds = MAX_ROUNDS if max_rounds is None else max_rounds
            if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
                raise InvalidInput(f"--max-rounds takes a whole number >= 1, not {rounds!r}")
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
        check_text(base.model, "the model name")
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
        selection = self._choose(backend, base)
        if toolset is not None:
            selection = check_tools(selection, base)
        parent = self._target(path, create=False)  # must exist: fan-out branches from it
        if names is None:
            names = self.next_child_names(parent, count)
        paths = [normalize_path(f"{parent.path}/{name}") for name in names]
        if any(p.count("/") != parent.path.count("/") + 1 for p in paths):
            raise InvalidInput("--children takes names of one path part each, e.g. a,b,c")
        turns = []
        for p, opts in zip(paths, per_chat):
            chat = self.tree.ensure(p, system_prompt=system)
            # -s sets the prompt of every chat it names, as for one chat: existing ones too
            if system is not None and chat.system_prompt != (system or None):
                self.tree.set_system_prompt(chat, system)
                chat = self.tree.get(chat.id)
            turns.append((chat, opts))
        self._set_current(parent, reason="fanout")
        if toolset is not None:
            approver = Approver.of(approve)
            if not approver.yes:
                approver.per_tool = True  # one answer per tool for every subchat
            return [ToolRun(self.tree, chat, text, toolset,
                            lambda follow_up, chat=chat, opts=opts: self._turn(
                                chat, text, selection, opts, follow_up=follow_up),
                            approve=approver, max_rounds=rounds, limits=limits or Limits())
                    for chat, opts in turns]
        return Fanout([self._turn(chat, text, selection, opts) for chat, opts in turns])

    def batch(self, path: "str | int | Chat | None", items: Any,
              prompt: Callable[[Any, Any], str], *, name: str = "items", fresh: bool = False,
              limit: int | None = None, concurrency: int | None = None,
              backend: str | None = None, system: str | None = None,
              known: Callable[[str], bool] | None = None, template: str | None = None,
              **options: Any) -> Batch:
        """Plan a batch: ``prompt(item, index)`` is the message of each item of ``items``
        (a list, tuple, dict, sized iterable, pandas Series or DataFrame), sent into its
        own chat ``PATH/NAME/<index>`` under a batch chat ``PATH/NAME`` that holds no
        messages. Rows already completed with the same message are reused; ``fresh``
        starts a new batch chat (``NAME-2``…). ``limit``: the first K items. ``concurrency``:
        requests in flight (remote default 4; vLLM: up to 1024 in the engine). ``system``
        sets the batch chat's system prompt. ``template`` with ``known`` (names of the
        namespace) checks that every ``{field}`` it names is in every item. Everything is
        checked before the tree is touched; ``.run()`` sends."""
        name = batch_mod.check_name(name)
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise InvalidInput(f"--limit takes a number of items >= 1, not {limit!r}")
        if concurrency is not None and (not isinstance(concurrency, int) or concurrency < 1):
            raise InvalidInput(f"--concurrency takes a number of requests >= 1, not {concurrency!r}")
        check_text(system, "the system prompt")
        opts = self.options(**options)
        check_text(opts.model, "the model name")
        selection = self._choose(backend, opts)
        if not selection.candidates:
            raise InvalidInput("no backend is available")
        found = items if isinstance(items, batch_mod.Items) else batch_mod.items_of(items, name)
        entries = found.entries[:limit] if limit is not None else found.entries
        if not entries:
            raise InvalidInput(f"{name} is empty: there is nothing to send")
        if template is not None:
            batch_mod.check_fields(template, batch_mod.Items(entries), known or (lambda _: False))
        texts = []
        for e in entries:
            text = prompt(e.item, e.label)
            try:
                check_prompt(text)
            except InvalidInput as exc:
                raise InvalidInput(f"item {e.label!r} (position {e.pos}): {exc}") from None
            texts.append(text)
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
        names = batch_mod.row_names(entries)
        chat_path = self._batch_chat_path(parent, name, fresh) if parent is not None else None
        rows = [batch_mod.Row(e.pos, e.label, n, t) for e, n, t in zip(entries, names, texts)]
        stale: list[int] = []
        notes: list[str] = []
        if chat_path is not None and chat_path in tree:
            stale, notes = self._match_rows(tree.get(chat_path), rows, opts)
        # every check passed: now the tree may change
        if parent is None:
            parent = self._target(path, create=True)
            chat_path = self._batch_chat_path(parent, name, fresh)
        chat = tree.ensure(chat_path)
        if system is not None and chat.system_prompt != (system or None):
            tree.set_system_prompt(chat, system)
            chat = tree.get(chat.id)
        self._set_current(parent, reason="batch")
        backend_ = selection.candidates[0]
        if concurrency is None:
            concurrency = (batch_mod.ENGINE_IN_FLIGHT if hasattr(backend_, "open_pool")
                           else batch_mod.DEFAULT_CONCURRENCY)
        return batch_mod.Batch(tree, chat, rows, backend=backend_,
                               make_turn=lambda c, text: self._turn(c, text, selection, opts,
                                                                    tree),
                               in_flight=concurrency, stale=stale, notes=notes,
                               index=None if found.pandas_index is None
                               else found.pandas_index[:len(entries)])

    def _batch_chat_path(self, parent: Chat, name: str, fresh: bool) -> str:
        """``PARENT/NAME``; with ``fresh`` the first of ``NAME``, ``NAME-2``… that is free."""
        path = normalize_path(f"{parent.path}/{name}")
        if not fresh:
            chat = self.tree.get(path) if path in self.tree else None
            if chat is not None and self.tree.store.message_count(chat.id):
                raise InvalidInput(f"{path} holds messages, so it is not a batch chat; name the "
                                   "batch otherwise (--each of another variable) or use --fresh")
            return path
        k, candidate = 1, path
        while candidate in self.tree:
            k += 1
            candidate = f"{path}-{k}"
        return candidate

    def _match_rows(self, chat: Chat, rows: list["batch_mod.Row"],
                    opts: GenerationOptions) -> tuple[list[int], list[str]]:
        """Mark the rows an earlier run completed with the same message as reused; return
        the row chats holding only a cut or failed reply (made again before sending) and
        notes. A row chat holding another message is refused: the data or the template
        changed since, and mixing two runs in one batch would lie."""
        tree = self.tree
        kids = {c.name: c for c in tree.children(chat)}
        firsts = batch_mod.first_exchanges(tree, chat)
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
        in_force, source = render.system_source(self.tree, chat, self.defaults.system_prompt)
        return chat.system_prompt, in_force, source

    # -- export / import ---------------------------------------------------------------------
    def export(self, ref: "str | int | Chat | None", fmt: str | None = None,
               out: str | os.PathLike[str] | None = None) -> tuple[str, str, int]:
        """The subtree of a chat as Markdown (``md``), re-importable JSON (``json``) or a
        notebook that reruns it (``ipynb``), keys masked. With ``out`` the file is written.
        Returns (text, format, chats)."""
        tree = self.tree
        chat = self.chat(ref)
        if fmt is None:
            suffix = str(out).rpartition(".")[2] if out is not None else ""
            fmt = suffix if suffix in ("json", "ipynb") else "md"
        if fmt not in ("md", "json", "ipynb"):
            raise InvalidInput(f"export format is md, json or ipynb, not {fmt!r}")
        render_ = {"json": render.export_json, "ipynb": render.export_notebook,
                   "md": render.export_markdown}[fmt]
        text = render_(tree, chat, self.defaults.system_prompt)
        text = redact(text)
        if out is not None:
            target = Path(out).expanduser()
            try:
                target.write_text(text, encoding="utf-8")
            except (OSError, UnicodeError, ValueError) as exc:
                reason = getattr(exc, "strerror", None) or type(exc).__name__
                raise InvalidInput(f"cannot write {str(out)!r}: {reason}; choose another file") from None
        return text, fmt, len(tree.subtree(chat))

    def import_file(self, file: str | os.PathLike[str], into: str | None = None) -> Imported:
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
        return import_data(self.tree, data, into)

    # -- status ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        name, source = self.requested_backend()
        sel = registry().select(name)
        return {
            "store": str(self.store_path()),
            "store_problem": self.store_problem(),
            "current": self.current,
            "requested": name,
            "requested_from": source,
            "active": sel.candidates[0].id if sel.candidates else None,
            "passed_over": sel.passed_over,
            "auto_order": registry().auto_order(),
        }


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
        check_text(c.get("system_prompt"), f"the system prompt of {c['path']!r}")
        for m in c.get("messages", []):
            check_text(m["content"], f"a message of {c['path']!r}")
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


def check_constraint(selection: Selection, opts: GenerationOptions) -> Selection:
    """Refuse, before anything is sent, a constraint the chosen backend cannot enforce
    (unless it is best effort) and a ``--choice`` that ``max_tokens`` cannot spell. Under
    ``auto`` the fallbacks that cannot enforce it are dropped. Returns the selection."""
    c = opts.constraint
    if c is None or not selection.candidates:
        return selection
    first, *rest = selection.candidates
    why = first.cannot_enforce(opts)
    if why and not c.best_effort:
        raise InvalidInput(f"{why}; add --best-effort to send it anyway and validate the reply")
    if not c.best_effort:
        rest = [b for b in rest if b.cannot_enforce(opts) is None]
    if c.kind == "choice":
        need = {x: first.count_tokens(x, opts) or 1 for x in c.choices}
        longest = max(need, key=lambda x: need[x])
        if opts.max_tokens < need[longest]:
            raise InvalidInput(f"--max-tokens {opts.max_tokens} is too few to write the choice "
                               f"{longest!r} ({need[longest]} tokens on {first.id}); give at "
                               f"least --max-tokens {need[longest]}")
    return Selection(selection.requested, [first, *rest], selection.passed_over)


def check_tools(selection: Selection, opts: GenerationOptions) -> Selection:
    """Refuse, before anything is sent, tools the chosen backend cannot offer; under
    ``auto`` the fallbacks that cannot are dropped."""
    if not opts.tools or not selection.candidates:
        return selection
    first, *rest = selection.candidates
    why = first.cannot_call_tools(opts)
    if why and selection.explicit:
        raise InvalidInput(f"{why}; use a backend that can (vllm, ollama, openai, groq, echo)")
    able = [b for b in selection.candidates if b.cannot_call_tools(opts) is None]
    if not able:
        raise InvalidInput(f"{why}; no backend here can call tools")
    return Selection(selection.requested, able, selection.passed_over)


def check_text(text: str | None, what: str) -> None:
    """Refuse text the store cannot hold (an unpaired surrogate), before anything is written."""
    if text is None:
        return
    if not isinstance(text, str):
        raise InvalidInput(f"{what} must be text, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(
            f"{what} holds {exc.object[exc.start:exc.end]!a} (an unpaired surrogate, not valid "
            "Unicode); remove that character and run it again") from None


def check_prompt(text: str) -> None:
    if not isinstance(text, str):
        raise InvalidInput(f"the message must be text (a str), not {type(text).__name__}")
    if not text.strip():
        raise InvalidInput("the message is empty; write the prompt in the cell body")
    check_text(text, "the message")


def check_backend_name(name: str, source: str = "backend") -> str:
    n = str(name).strip().lower()
    known = ["auto", *registry().names()]
    if n not in known:
        raise InvalidInput(
            f"unknown backend {name!r} (from {source}); choose one of: {', '.join(known)}"
        )
    return n


_default: Session | None = None


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


__all__ = ["Session", "Tree", "open_tree", "Defaults", "Deleted", "Imported", "BackendInfo",
           "default_session", "reset_default_session", "check_backend_name"]
