"""Finding backends (entry points) and choosing one (the selection rule).

``auto`` takes the first available of vLLM (a model is loaded in this kernel) →
Ollama (the server answers) → Groq (a key is present) → echo."""

from __future__ import annotations

import importlib
import importlib.metadata
import threading
from dataclasses import dataclass, field

from ..errors import BackendUnavailable, InvalidInput
from .base import Availability, Backend

GROUP = "subchat_magics.backends"
AUTO_ORDER = ("vllm", "ollama", "groq", "echo")

# Used when the package runs from a source tree without installed metadata.
BUILTIN = {
    "echo": "subchat_magics.backends.echo:EchoBackend",
    "vllm": "subchat_magics.backends.vllm:VLLMBackend",
    "ollama": "subchat_magics.backends.ollama:OllamaBackend",
    "groq": "subchat_magics.backends.groq:GroqBackend",
    "openai": "subchat_magics.backends.openai_compat:OpenAIBackend",
}
EXTRAS = {"vllm": "vllm", "ollama": "ollama", "groq": "groq", "openai": "openai"}


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
        self._instances: dict[str, Backend] = {}
        self._lock = threading.RLock()

    def _discover(self) -> dict[str, str]:
        if self._targets is None:
            targets = dict(BUILTIN)
            try:
                for ep in importlib.metadata.entry_points(group=GROUP):
                    targets[ep.name] = ep.value
            except Exception:  # noqa: BLE001 - broken metadata must not break the extension
                pass
            self._targets = targets
        return self._targets

    def names(self) -> list[str]:
        return list(self._discover())

    def get(self, name: str) -> Backend:
        """The shared instance of backend ``name``."""
        name = name.strip().lower()
        targets = self._discover()
        if name not in targets:
            raise InvalidInput(
                f"unknown backend {name!r}; choose one of: auto, {', '.join(targets)}"
            )
        with self._lock:
            inst = self._instances.get(name)
            if inst is None:
                try:
                    cls = _load(targets[name])
                except ImportError as exc:
                    extra = EXTRAS.get(name, name)
                    raise BackendUnavailable(
                        f"backend {name!r} cannot be imported ({exc}); "
                        f"install it with: pip install 'subchat-magics[{extra}]'"
                    ) from None
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
        for name in AUTO_ORDER:
            av = self.availability(name)
            if av.ok:
                sel.candidates.append(self.get(name))
            elif not sel.candidates:
                sel.passed_over.append((name, av.reason))
        return sel

    def close(self) -> None:
        with self._lock:
            for inst in self._instances.values():
                try:
                    inst.close()
                except Exception:  # noqa: BLE001
                    pass
            self._instances.clear()


_registry: Registry | None = None


def registry() -> Registry:
    global _registry
    if _registry is None:
        _registry = Registry()
    return _registry
