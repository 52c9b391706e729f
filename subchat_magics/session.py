"""A notebook's state around one chat tree: which store, which chat is current, which
backend and generation defaults apply. The magics and :class:`SimpleLLMClient` share the
default session, so they select backends the same way."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends.base import GenerationOptions
from .backends.registry import Selection, registry
from .errors import InvalidInput
from .settings import getenv, where
from .tree import ROOT, ChatTree, default_store_path, normalize_path
from .turn import Fanout, Turn, validate_options


@dataclass
class Defaults:
    """Generation defaults (``%config SubchatMagics.*`` sets them in a notebook)."""

    backend: str | None = None  # None: not configured -> LLM_BACKEND -> auto
    max_tokens: int = 1000
    temperature: float = 0.0
    top_p: float = 0.9
    model: str | None = None
    think: bool | None = None
    system_prompt: str | None = None
    format: str = "markdown"
    store_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Session:
    def __init__(self, store_path: str | os.PathLike[str] | None = None):
        self.defaults = Defaults(store_path=str(store_path) if store_path else None)
        self.current = ROOT
        self.backend_override: str | None = None  # %subchat backend NAME
        self._tree: ChatTree | None = None
        self._resolved: dict[str, Path] = {}
        self._lock = threading.RLock()

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
    def tree(self) -> ChatTree:
        """The tree at the configured store path, (re)opened when the path changes."""
        with self._lock:
            want = self.store_path()
            if self._tree is None or self._tree.store.path != want:
                old, self._tree = self._tree, ChatTree(want)
                if old is not None:
                    old.close()
                if self.current not in self._tree:
                    self.current = ROOT
            return self._tree

    def use(self, path: str) -> str:
        self.current = self.tree.get(path).path
        return self.current

    def close(self) -> None:
        with self._lock:
            if self._tree is not None:
                self._tree.close()
                self._tree = None

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

    def select(self, flag: str | None = None) -> Selection:
        name, _ = self.requested_backend(flag)
        return registry().select(name)

    def options(self, **overrides: Any) -> GenerationOptions:
        d = self.defaults
        opts = GenerationOptions(max_tokens=d.max_tokens, temperature=d.temperature,
                                 top_p=d.top_p, model=d.model, think=d.think, extra=dict(d.extra))
        for k, v in overrides.items():
            if v is not None:
                setattr(opts, k, v)
        validate_options(opts)
        return opts

    # -- sending -----------------------------------------------------------------------------
    def prepare_chat(self, path: str | None, system: str | None = None):
        """The chat a cell talks to: ``path`` (created under an existing parent if new) or
        the current chat. ``system`` sets that chat's system prompt."""
        tree = self.tree
        target = normalize_path(path) if path else self.current
        chat = tree.ensure(target, system_prompt=system)
        if system is not None and chat.system_prompt != system:
            tree.set_system_prompt(chat, system)
            chat = tree.get(chat.path)
        self.current = chat.path
        return chat

    def send(self, path: str | None, text: str, *, backend: str | None = None,
             system: str | None = None, **options: Any) -> Turn:
        """Start a turn in ``path`` (or the current chat). Iterate it to stream.
        Everything is checked before the tree is touched."""
        check_prompt(text)
        opts = self.options(**options)
        selection = self.select(backend)
        chat = self.prepare_chat(path, system)
        return Turn(self.tree, chat, text, backend=selection, options=opts,
                    default_system=self.defaults.system_prompt)

    def fanout(self, path: str | None, text: str, *, n: int | None = None,
               names: list[str] | None = None, backend: str | None = None,
               system: str | None = None, temperatures: list[float] | None = None,
               **options: Any) -> Fanout:
        """Send ``text`` into several new (or named) subchats of ``path`` at once.
        Without names the children are numbered after the existing ones (``1``, ``2``...).
        Without a temperature they sample at 0.7 with seeds 1..N, so they differ."""
        check_prompt(text)
        if names is None:
            if n is None or n < 1 or n > 64:
                raise InvalidInput(f"--fanout takes a number of subchats from 1 to 64, not {n!r}")
        else:
            names = [x.strip() for x in names if x.strip()]
            if not names or len(names) > 64 or len(set(names)) != len(names):
                raise InvalidInput("--children takes 1 to 64 distinct names, e.g. --children a,b,c")
        count = len(names) if names is not None else n
        if temperatures is not None and len(temperatures) not in (1, count):
            raise InvalidInput(f"give one temperature, or one per subchat ({count})")
        base = self.options(**options)
        selection = self.select(backend)
        tree = self.tree
        parent_path = normalize_path(path) if path else self.current
        parent = tree.get(parent_path)  # must exist: fan-out branches from it
        if names is None:
            taken = [int(c.name) for c in parent.children if c.name.isdigit()]
            start = max(taken, default=0) + 1
            names = [str(i) for i in range(start, start + count)]
        paths = [normalize_path(f"{parent.path}/{name}") for name in names]
        turns = []
        for i, p in enumerate(paths):
            opts = GenerationOptions(**{**base.__dict__, "extra": dict(base.extra)})
            if temperatures is not None:
                opts.temperature = temperatures[i if len(temperatures) > 1 else 0]
            elif options.get("temperature") is None and count > 1:
                opts.temperature = 0.7
            if opts.seed is None and count > 1:
                opts.seed = i + 1
            validate_options(opts)
            chat = tree.ensure(p, system_prompt=system)
            turns.append(Turn(tree, chat, text, backend=selection, options=opts,
                              default_system=self.defaults.system_prompt))
        self.current = parent.path
        return Fanout(turns)

    # -- status ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        name, source = self.requested_backend()
        sel = registry().select(name)
        return {
            "store": str(self.store_path().resolve()),
            "current": self.current,
            "requested": name,
            "requested_from": source,
            "active": sel.candidates[0].id if sel.candidates else None,
            "passed_over": sel.passed_over,
            "auto_order": registry().auto_order(),
        }


def check_prompt(text: str) -> None:
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput("the message is empty; write the prompt in the cell body")


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
