"""A testing kit for this package's tests and for people who write a backend plugin.

- :mod:`~subchat_magics.testing.shell`: :class:`Shell`, cells run in a real IPython shell
  with the extension loaded; :func:`store_rows`, a store file read with plain sqlite3.
- :mod:`~subchat_magics.testing.fakeservers`: :class:`FakeOllama`, :class:`FakeGroq`,
  :class:`FakeOpenAI`, loopback servers that speak the real streaming wire protocols and
  can be scripted to be slow, fail, cut the connection or hang.
- :mod:`~subchat_magics.testing.kernel`: :func:`running_kernel`, a real Jupyter kernel in a
  folder with a clean environment; :func:`execute`, a cell's messages and reply.
- :mod:`~subchat_magics.testing.vllm_server`: :class:`VLLMServer`, a real ``vllm serve``
  (the CPU build) on a loopback port: start, kill, restart, its metrics and log.
- :mod:`~subchat_magics.testing.tiny_model`: ``build()``, a tiny random-weights Qwen3
  built locally (no download) to run the real vLLM engine on; ``use_cpu_engine_settings()``.
- :mod:`~subchat_magics.testing.reliability`: the crash, concurrency and damaged-file
  harness of ``tests/reliability`` and ``bench/reliability.py``.

Importing this package imports nothing beyond it: each name is loaded on first use, and
``transformers``, ``tokenizers`` and ``torch`` only when the tiny model is built.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .fakeservers import FakeGroq, FakeOllama, FakeOpenAI, Script
    from .shell import Shell, store_rows
    from .vllm_server import VLLMServer

_NAMES = {
    "Shell": "shell",
    "store_rows": "shell",
    "FakeOllama": "fakeservers",
    "FakeGroq": "fakeservers",
    "FakeOpenAI": "fakeservers",
    "Script": "fakeservers",
    "VLLMServer": "vllm_server",
    "running_kernel": "kernel",
    "execute": "kernel",
}

__all__ = ["FakeGroq", "FakeOllama", "FakeOpenAI", "Script", "Shell", "VLLMServer", "execute",
           "running_kernel", "store_rows"]


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
