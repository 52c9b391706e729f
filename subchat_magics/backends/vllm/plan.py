"""Load planning: what ``%load_vllm`` asks for (:class:`LoadSettings`), the model folder
check, and the ``vllm.LLM`` arguments worked out for the GPUs present (:class:`Plan`).

Pure functions of their arguments, testable without vLLM or a GPU; imports only
:mod:`subchat_magics.errors`."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ...errors import InvalidInput

# What %load_vllm uses when a flag is not given: the settings that run Qwen3-14B-AWQ on
# Kaggle's 2xT4 (TP and dtype are worked out from the GPUs present).
KAGGLE_DEFAULTS = {
    "gpu_memory_utilization": 0.91,
    "enforce_eager": True,
    "max_model_len": 5120,
    "enable_prefix_caching": True,
    "trust_remote_code": True,
    "disable_log_stats": True,
}
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
# engine arguments %load_vllm sets itself from MODEL_PATH
RESERVED_ENGINE_ARGS = ("model", "tokenizer")


def tensor_parallel_size(cuda_device_count: int) -> int:
    """One shard per visible CUDA device, at least one (CPU)."""
    return max(1, int(cuda_device_count))


def dtype_for(capabilities: Sequence[tuple[int, int]]) -> str:
    """``half`` when any GPU is below compute capability 8 (no bfloat16: T4, V100),
    else ``auto`` (the model's own dtype; on CPU too)."""
    if capabilities and min(tuple(c) for c in capabilities) < (8, 0):
        return "half"
    return "auto"


def needs_spawn(tp: int) -> bool:
    """Tensor parallel workers must be spawned, not forked, once the kernel may have
    touched CUDA: set ``VLLM_WORKER_MULTIPROC_METHOD=spawn`` before loading."""
    return int(tp) > 1


def quantization_for(config: dict[str, Any], flag: str | None) -> tuple[str | None, str | None]:
    """``(argument, label)``: the flag is passed to vLLM as given; without one vLLM reads
    the method from the model's config itself (and picks the fastest kernel for the GPU,
    e.g. ``awq_marlin`` on Ampere, ``awq`` on a T4), so only the label comes from it."""
    if flag:
        return flag, flag
    qc = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    return None, method


def max_positions(config: dict[str, Any]) -> int | None:
    for c in (config, config.get("text_config") or {}):
        if isinstance(c.get("max_position_embeddings"), int):
            return c["max_position_embeddings"]
    return None


def has_rope_scaling(config: dict[str, Any]) -> bool:
    for c in (config, config.get("text_config") or {}):
        rs = c.get("rope_scaling") or {}
        if isinstance(rs, dict) and rs.get("rope_type", rs.get("type")) not in (None, "default"):
            return True
    return False


def model_label(path: str | os.PathLike[str]) -> str:
    """A short name for a model folder: Kaggle's ``/kaggle/input/qwen-3/transformers/14b-awq/1``
    is ``qwen-3/14b-awq``; elsewhere the last part that is not a version number."""
    parts = [p for p in Path(path).parts if p not in ("/", "")]
    named = [p for p in parts if not p.isdigit()]
    if "input" in parts and parts[:1] == ["kaggle"] and len(parts) >= 5:
        i = parts.index("input")
        return f"{parts[i + 1]}/{named[-1]}" if named[-1] != parts[i + 1] else parts[i + 1]
    return named[-1] if named else str(path)


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]*[A-Za-z0-9_]")


def clean_model_arg(raw: str | os.PathLike[str]) -> str:
    return str(raw).strip().strip("'\"")


def is_hub_id(raw: str | os.PathLike[str]) -> bool:
    """``org/name`` (one slash, the Hub's characters) that is not an existing path: a
    Hugging Face model id such as ``Qwen/Qwen3-14B-AWQ``. ``./org/name`` is a folder."""
    text = clean_model_arg(raw)
    return bool(_HUB_ID.fullmatch(text)) and ".." not in text and not Path(text).exists()


def check_model_path(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """The model folder and its ``config.json``; :class:`InvalidInput` if either is missing."""
    raw = clean_model_arg(path)
    if not raw:
        raise InvalidInput("%load_vllm needs MODEL_PATH, a folder holding a model (config.json, weights)")
    p = Path(raw).expanduser()
    if not p.exists():
        raise InvalidInput(
            f"%load_vllm: no such folder {raw!r}; give the path of a local model folder "
            "(with config.json), e.g. /kaggle/input/qwen-3/transformers/14b-awq/1, or a "
            "Hugging Face model id, e.g. Qwen/Qwen3-14B-AWQ"
        )
    if not p.is_dir() or not (p / "config.json").is_file():
        raise InvalidInput(
            f"%load_vllm: {raw!r} holds no config.json; give the folder that holds the "
            "model's config.json and weights"
        )
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"%load_vllm: cannot read {p / 'config.json'}: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidInput(f"%load_vllm: {p / 'config.json'} is not a model config")
    return p.resolve(), config


@dataclass
class LoadSettings:
    """What ``%load_vllm`` asks for. ``None`` means "the Kaggle default, adapted to the
    machine" (see :data:`KAGGLE_DEFAULTS`)."""

    model: str
    tensor_parallel_size: int | None = None
    gpu_memory_utilization: float | None = None
    dtype: str | None = None
    max_model_len: int | None = None
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    quantization: str | None = None
    think: bool = False
    engine_args: dict[str, Any] = field(default_factory=dict)
    verbose: bool = False  # vLLM's own log in the cell while loading


@dataclass
class Plan:
    """The engine arguments worked out for a load, and what to say about them. ``path``
    is the model folder, or a Hugging Face model id (a ``str``)."""

    path: Path | str
    label: str
    kwargs: dict[str, Any]
    quantization_label: str | None
    spawn: bool


def check_engine_arg_keys(engine_args: dict[str, Any]) -> None:
    """``--engine-arg`` may not set what MODEL_PATH sets, nor a key that is no name."""
    for key in engine_args:
        if key in RESERVED_ENGINE_ARGS or not key.isidentifier():
            raise InvalidInput(f"%load_vllm: --engine-arg {key}=... cannot be set here")


def plan_load(settings: LoadSettings, config: dict[str, Any], path: Path | str,
              cuda_device_count: int, capabilities: Sequence[tuple[int, int]]) -> Plan:
    """The ``vllm.LLM`` keyword arguments for ``settings`` on a machine with these GPUs.
    ``path``: the model folder, or a Hugging Face model id (a ``str``: vLLM fetches it)."""
    tp = settings.tensor_parallel_size or tensor_parallel_size(cuda_device_count)
    if settings.tensor_parallel_size and cuda_device_count and tp > cuda_device_count:
        raise InvalidInput(
            f"%load_vllm: --tp {tp} but only {cuda_device_count} CUDA device(s) are visible; "
            f"use --tp {cuda_device_count} or less"
        )
    positions = max_positions(config)
    max_len = settings.max_model_len
    if max_len is None:
        max_len = KAGGLE_DEFAULTS["max_model_len"]
        if positions and not has_rope_scaling(config):
            max_len = min(max_len, positions)
    elif positions and max_len > positions and not has_rope_scaling(config) \
            and os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN") != "1":
        raise InvalidInput(
            f"%load_vllm: --max-model-len {max_len} exceeds the model's "
            f"max_position_embeddings ({positions}); use --max-model-len {positions} or less"
        )
    quant, quant_label = quantization_for(config, settings.quantization)
    kwargs: dict[str, Any] = {
        "model": str(path),
        "tensor_parallel_size": tp,
        "gpu_memory_utilization": settings.gpu_memory_utilization or KAGGLE_DEFAULTS["gpu_memory_utilization"],
        "dtype": settings.dtype or dtype_for(capabilities),
        "enforce_eager": settings.enforce_eager,
        "max_model_len": max_len,
        "enable_prefix_caching": settings.enable_prefix_caching,
        "trust_remote_code": KAGGLE_DEFAULTS["trust_remote_code"],
        "disable_log_stats": KAGGLE_DEFAULTS["disable_log_stats"],
    }
    if quant:
        kwargs["quantization"] = quant
    kwargs.update(settings.engine_args)
    label = path if isinstance(path, str) else model_label(path)
    return Plan(path, label, kwargs, quant_label, needs_spawn(kwargs["tensor_parallel_size"]))


def parse_engine_arg(item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as JSON where it parses (numbers, true/false, null,
    lists, objects), else kept as a string; ``-`` in KEY means ``_``."""
    key, sep, value = item.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key.isidentifier():
        raise InvalidInput(f"%load_vllm: --engine-arg takes KEY=VALUE, e.g. --engine-arg max_num_seqs=16, "
                           f"not {item!r}")
    value = value.strip()
    low = value.lower()
    if low in ("true", "false"):
        return key, low == "true"
    if low in ("none", "null"):
        return key, None
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (vLLM's run to pages)."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""
