"""API keys entered in this kernel (``%subchat key NAME``): which backends take one comes
from their declarations (``Backend.key_env``), so a plugin's key is asked for and masked like
Groq's. A key is kept in this process only: never in ``os.environ``, the store or the
notebook.

Imports the backend registry and the settings; never the tree, the core or IPython."""

from __future__ import annotations

from .backends.registry import registry
from .errors import InvalidInput
from .secrets import register_secret
from .settings import set_secret


def key_backends() -> dict[str, str]:
    """The backends that take a key, by id, with the variable that holds it."""
    return registry().key_backends()


def set_key(backend: str, value: str) -> str:
    """Keep ``backend``'s API key in this process; returns the variable it stands for."""
    known = key_backends()
    if backend not in known:
        raise InvalidInput(f"no key is used by {backend!r}; one of: {', '.join(known)}")
    var = known[backend]
    value = (value or "").strip()
    if not value:
        raise InvalidInput(f"no key entered; {var} unchanged")
    register_secret(value)
    set_secret(var, value)
    return var


__all__ = ["key_backends", "set_key"]
