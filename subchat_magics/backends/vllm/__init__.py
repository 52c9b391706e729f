"""vLLM in the kernel: one engine per process, driven by one thread, streaming tokens.

``%load_vllm`` (or :func:`load`) builds a ``vllm.LLM``; :func:`register_vllm` adopts one
built by hand. The package's rooms:

- :mod:`.plan`: what a load asks for, the engine arguments for the GPUs present, and where
  its memory goes (pure);
- :mod:`.gpus`: the GPUs and driver, from ``nvidia-smi`` (or torch), parsed purely;
- :mod:`.discover`: the model folders under ``/kaggle/input`` and in the Hugging Face cache;
- :mod:`.compat`: the only module that knows vLLM (imports, version differences,
  engine-argument validation, shutdown);
- :mod:`.driver`: the thread that alone calls the engine (add, step, abort);
- :mod:`.requests`: sampling parameters, the reply accumulator, a reply's Finish;
- :mod:`.slot`: the process's one engine (load, register, unload, release);
- :mod:`.backend`: :class:`VLLMBackend`, the backend protocol over the slot.

Importing this package imports neither vLLM nor torch; that happens on load.
"""

from __future__ import annotations

from .backend import VLLMBackend
from .compat import Delta, detect_gpus, free_memory, import_vllm
from .driver import Driver
from .plan import (
    DTYPES,
    KAGGLE_DEFAULTS,
    LoadSettings,
    Plan,
    check_model_path,
    dtype_for,
    has_rope_scaling,
    max_positions,
    model_label,
    needs_spawn,
    parse_engine_arg,
    plan_load,
    quantization_for,
    tensor_parallel_size,
)
from .requests import Reply, as_error, sampling_params
from .slot import (
    Engine,
    VLLMClient,
    active_engine,
    load,
    plan_only,
    register_vllm,
    release,
    release_with_extension,
    unload,
)

__all__ = [
    "DTYPES", "KAGGLE_DEFAULTS", "Delta", "Driver", "Engine", "LoadSettings", "Plan", "Reply",
    "VLLMBackend", "VLLMClient", "active_engine", "as_error", "check_model_path", "detect_gpus",
    "dtype_for", "free_memory", "has_rope_scaling", "import_vllm", "load", "max_positions", "plan_only",
    "model_label", "needs_spawn", "parse_engine_arg", "plan_load", "quantization_for",
    "register_vllm", "release", "release_with_extension", "sampling_params",
    "tensor_parallel_size", "unload",
]
