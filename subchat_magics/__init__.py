"""subchat-magics: chat with LLMs as a tree of conversations, right in the IPython kernel.

``%load_ext subchat_magics`` registers ``%%subchat``, ``%subchat``, ``%load_vllm`` and
``%unload_vllm``. Loading is instant: backends and their SDKs are imported when used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (imported on first use, so %load_ext stays instant)
_LAZY = {
    "ChatTree": "subchat_magics.tree",
    "Chat": "subchat_magics.tree",
    "Message": "subchat_magics.tree",
    "open_tree": "subchat_magics.session",
    "Tree": "subchat_magics.session",
    "Turn": "subchat_magics.turn",
    "Session": "subchat_magics.session",
    "default_session": "subchat_magics.session",
    "SimpleLLMClient": "subchat_magics.client",
    "Backend": "subchat_magics.backends.base",
    "Finish": "subchat_magics.backends.base",
    "GenerationOptions": "subchat_magics.backends.base",
    "SubchatError": "subchat_magics.errors",
    "register_vllm": "subchat_magics.backends.vllm",
    "VLLMClient": "subchat_magics.backends.vllm",
}

__all__ = ["__version__", "load_ipython_extension", "unload_ipython_extension", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'subchat_magics' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def load_ipython_extension(ipython: Any) -> None:
    from .magics import SubchatMagics
    from .notebook import attach
    from .vllm_magics import VLLMMagics

    ipython.register_magics(SubchatMagics(ipython, open_view=_open_view))
    ipython.register_magics(VLLMMagics)
    attach(ipython)  # records each cell's error for {Err[n]} and %subchat explain


def _open_view(session: Any) -> Any:
    """The live tree view of ``session`` for ``%subchat tree`` (None without ipywidgets)."""
    try:
        from .widget import TreeView
    except ImportError:
        return None
    return TreeView(session.tree, session=session)


def unload_ipython_extension(ipython: Any) -> None:
    """Undo everything the extension holds: its magics, the handler recording cells'
    errors, a vLLM engine it loaded (driver thread and memory; a hand-registered ``LLM`` is
    left running, and ``%reload_ext`` keeps either), the remote backends' HTTP clients, the
    store connection."""
    import sys

    from .backends.registry import registry
    from .notebook import detach
    from .session import default_session

    mm = ipython.magics_manager
    for kind, names in (("cell", ("subchat",)), ("line", ("subchat", "load_vllm", "unload_vllm"))):
        for name in names:
            mm.magics[kind].pop(name, None)
    for key in [k for k, v in mm.registry.items() if type(v).__module__.startswith(__name__)]:
        mm.registry.pop(key, None)
    vllm_backend = sys.modules.get("subchat_magics.backends.vllm")
    if vllm_backend is not None:  # freed when the cell ends, unless it was %reload_ext
        vllm_backend.release_with_extension(ipython)
    detach(ipython)
    registry().close()
    default_session().close()
