"""Finding backends (entry points) and choosing one (the selection rule).

Every backend describes itself (:class:`~subchat_magics.backends.base.Backend` class
attributes): its id, its place in the ``auto`` order, its install extra. The names, the
``auto`` order (built in: vLLM loaded in this kernel → Ollama answering → Groq with a key
→ echo), ``%subchat backends`` and the install hints are all derived from them here.
Imports only the backend protocol and the error hierarchy."""

from __future__ import annotations

import importlib
import importlib.metadata
import threading
from dataclasses import dataclass, field

from ..errors import BackendUnavailable, InvalidInput
from ..secrets import declare_key_variable
from .base import Availability, Backend

GROUP = "subchat_magics.backends"

# Used when the package runs from a source tree without installed metadata.
BUILTIN = {
    "echo": "subchat_magics.backends.echo:EchoBackend",
    "vllm": "subchat_magics.backends.vllm:VLLMBackend",
    "ollama": "subchat_magics.backends.ollama:OllamaBackend",
    "groq": "subchat_magics.backends.groq:GroqBackend",
    "openai": "subchat_magics.backends.openai_compat:OpenAIBackend",
}


def _load(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass
class Selection:
    """The backends to try, in order, and why earlier ones were passed over."""

    requested: str
    candidates: list[Backend]
    passed_over: list[tuple[str, str]] = field(default_factory=list)

    @property
    def explicit(self) -> bool:
        return self.requested != "auto"


class Registry:
    """Backend classes by id, and one shared instance of each (the vLLM backend holds
    the engine, remote ones hold HTTP clients)."""

    def __init__(self) -> None:
        self._targets: dict[str, str] | None = None
        self._dists: dict[str, str] = {}
        self._classes: dict[str, type[Backend]] = {}
        self._instances: dict[str, Backend] = {}
        self._lock = threading.RLock()

    def _discover(self) -> dict[str, str]:
        if self._targets is None:
            targets = dict(BUILTIN)
            try:
                for ep in importlib.metadata.entry_points(group=GROUP):
                    targets[ep.name] = ep.value
                    if ep.dist is not None and ep.dist.name != "subchat-magics":
                        self._dists[ep.name] = ep.dist.name
            except Exception:  # noqa: BLE001 - broken metadata must not break the extension
                pass
            self._targets = targets
        return self._targets

    def names(self) -> list[str]:
        """Every backend id (built in and from entry points), in ``auto`` order first."""
        targets = self._discover()
        return sorted(targets, key=lambda n: (self._priority(n) is None, self._priority(n) or 0,
                                              list(targets).index(n)))

    def install_hint(self, name: str) -> str:
        """The ``pip install`` line that brings backend ``name``'s SDK."""
        if name in self._dists:
            return f"pip install {self._dists[name]}"
        cls = self._classes.get(name)
        extra = cls.extra if cls is not None else (name if name in BUILTIN else None)
        return f"pip install 'subchat-magics[{extra}]'" if extra else "pip install subchat-magics"

    def backend_class(self, name: str) -> type[Backend]:
        """The class of backend ``name`` (its module imported; SDKs are imported later)."""
        name = name.strip().lower()
        targets = self._discover()
        if name not in targets:
            raise InvalidInput(
                f"unknown backend {name!r}; choose one of: auto, {', '.join(self.names())}"
            )
        with self._lock:
            cls = self._classes.get(name)
            if cls is None:
                try:
                    cls = _load(targets[name])
                except ImportError as exc:
                    raise BackendUnavailable(
                        f"backend {name!r} cannot be imported ({exc}); "
                        f"install it with: {self.install_hint(name)}"
                    ) from None
                self._classes[name] = cls
                if getattr(cls, "key_env", None):
                    declare_key_variable(cls.key_env)  # masked from now on
            return cls

    def _priority(self, name: str) -> int | None:
        try:
            return self.backend_class(name).auto_priority
        except BackendUnavailable:
            return None

    def auto_order(self) -> list[str]:
        """The backends ``auto`` tries, in order: those that declare an ``auto_priority``."""
        return [n for n in self.names() if self._priority(n) is not None]

    def key_backends(self) -> dict[str, str]:
        """The backends that take an API key, by id, with the variable that holds it
        (``Backend.key_env``): what ``%subchat key NAME`` accepts."""
        out = {}
        for name in self.names():
            try:
                env = self.backend_class(name).key_env
            except BackendUnavailable:
                continue
            if env:
                out[name] = env
        return out

    def describe(self, name: str) -> str:
        try:
            return self.backend_class(name).description
        except BackendUnavailable:
            return ""

    def get(self, name: str) -> Backend:
        """The shared instance of backend ``name``."""
        name = name.strip().lower()
        cls = self.backend_class(name)
        with self._lock:
            inst = self._instances.get(name)
            if inst is None:
                inst = cls()
                self._instances[name] = inst
            return inst

    def loaded(self, name: str) -> Backend | None:
        return self._instances.get(name)

    def availability(self, name: str) -> Availability:
        try:
            return self.get(name).available()
        except BackendUnavailable as exc:
            return Availability(False, str(exc))

    def select(self, requested: str) -> Selection:
        requested = (requested or "auto").strip().lower()
        if requested != "auto":
            return Selection(requested, [self.get(requested)])
        sel = Selection("auto", [])
        for name in self.auto_order():
            av = self.availability(name)
            if av.ok:
                sel.candidates.append(self.get(name))
            elif not sel.candidates:
                sel.passed_over.append((name, av.reason))
        return sel

    def close(self) -> None:
        """Close every backend instance and forget what was discovered, so the next use
        (e.g. after ``%reload_ext``) finds backends installed meanwhile."""
        with self._lock:
            for inst in self._instances.values():
                try:
                    inst.close()
                except Exception:  # noqa: BLE001
                    pass
            self._instances.clear()
            self._targets, self._dists, self._classes = None, {}, {}


_registry: Registry | None = None


def registry() -> Registry:
    global _registry
    if _registry is None:
        _registry = Registry()
    return _registry
