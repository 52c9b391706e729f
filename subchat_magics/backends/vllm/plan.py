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
    (or the same under ``$SUBCHAT_KAGGLE_INPUT``) is ``qwen-3/14b-awq``; elsewhere the last
    part that is not a version number."""
    p = Path(path)
    roots = [Path("/kaggle/input")]
    if os.environ.get("SUBCHAT_KAGGLE_INPUT"):
        roots.insert(0, Path(os.environ["SUBCHAT_KAGGLE_INPUT"]).expanduser())
    for root in roots:
        try:
            parts = p.relative_to(root).parts
        except ValueError:
            continue
        if len(parts) == 4:  # MODEL/FRAMEWORK/VARIATION/VERSION
            return parts[0] if parts[2] == parts[0] else f"{parts[0]}/{parts[2]}"
        named = [x for x in parts if not x.isdigit()]
        if named:
            return "/".join(named)
    named = [x for x in p.parts if x not in ("/", "") and not x.isdigit()]
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


# -- memory: weights, KV cache room, tokens that fit ----------------------------------------
GiB = 1 << 30
#: what vLLM's LLM class schedules at most per step and holds at most, unless told
DEFAULT_MAX_BATCHED_TOKENS = 8192
DEFAULT_MAX_NUM_SEQS = 256
#: the KV cache's block size: vLLM's default on GPUs, and the CPU backend's
GPU_BLOCK_SIZE, CPU_BLOCK_SIZE = 16, 128
#: memory per GPU outside torch's tensors (CUDA context, cuBLAS workspaces, NCCL buffers):
#: an estimate, the same for every card
NON_TORCH_BYTES = 512 << 20
_DTYPE_BYTES = {"half": 2, "float16": 2, "bfloat16": 2, "float": 4, "float32": 4,
                "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}


@dataclass(frozen=True)
class ModelShape:
    """The parts of a ``config.json`` that size a model in memory."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int
    tied: bool
    experts: int = 0
    expert_intermediate: int = 0
    quant_method: str | None = None
    quant_bits: int | None = None
    quant_group: int | None = None
    dtype: str | None = None


def model_shape(config: dict[str, Any]) -> ModelShape | None:
    """The model's shape from its config (``text_config`` of a multimodal one), or None
    where the config lacks what sizes it."""
    c = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    try:
        hidden = int(c["hidden_size"])
        heads = int(c["num_attention_heads"])
        layers = int(c["num_hidden_layers"])
        vocab = int(c.get("vocab_size") or config["vocab_size"])
    except (KeyError, TypeError, ValueError):
        return None
    kv = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or hidden // heads)
    qc = config.get("quantization_config") or c.get("quantization_config") or {}
    qc = qc if isinstance(qc, dict) else {}
    bits = qc.get("bits") or qc.get("w_bit")
    group = qc.get("group_size") or qc.get("q_group_size")
    return ModelShape(
        layers, hidden, heads, kv, head_dim, vocab, int(c.get("intermediate_size") or 4 * hidden),
        bool(c.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
        int(c.get("num_experts") or c.get("num_local_experts") or 0),
        int(c.get("moe_intermediate_size") or 0),
        qc.get("quant_method"), int(bits) if bits else None,
        int(group) if isinstance(group, int) and group > 0 else None,
        c.get("torch_dtype") or c.get("dtype") or config.get("torch_dtype") or config.get("dtype"),
    )


def dtype_bytes(dtype: str | None, shape: ModelShape | None = None) -> int:
    """Bytes of one value in ``dtype`` (``auto``: the model's own; a float32 model runs
    in 16 bits on a GPU, as vLLM's ``auto`` does, and in 32 on a CPU, see :func:`memory_plan`)."""
    d = (dtype or "auto").replace("torch.", "")
    if d == "auto":
        d = (shape.dtype if shape else None) or "float16"
    return _DTYPE_BYTES.get(str(d), 2)


def estimate_weight_bytes(shape: ModelShape, value_bytes: int = 2) -> int:
    """The weights' size worked out from the shape: embeddings (and an untied output
    layer) and norms in ``value_bytes``; the linear layers in it too, or, quantized
    (AWQ/GPTQ: ``bits`` a weight plus, per group of ``group_size``, a 16-bit scale and a
    ``bits`` zero point), in ``bits/8 + (2 + bits/8) / group`` bytes a weight."""
    attn = shape.hidden * shape.head_dim * (2 * shape.heads + 2 * shape.kv_heads)
    if shape.experts:
        mlp = shape.experts * 3 * shape.hidden * (shape.expert_intermediate or shape.intermediate)
        router = shape.hidden * shape.experts
    else:
        mlp, router = 3 * shape.hidden * shape.intermediate, 0
    linear = shape.layers * (attn + mlp)
    plain = shape.vocab * shape.hidden * (1 if shape.tied else 2) \
        + shape.layers * (2 * shape.hidden + 2 * shape.head_dim + router) + shape.hidden
    if shape.quant_bits and shape.quant_method in ("awq", "gptq", "awq_marlin", "gptq_marlin",
                                                   "compressed-tensors"):
        group = shape.quant_group or 128
        linear_bytes = linear * shape.quant_bits / 8 + linear / group * (2 + shape.quant_bits / 8)
    else:
        linear_bytes = linear * value_bytes
    return int(linear_bytes + plain * value_bytes)


def kv_bytes_per_token(shape: ModelShape, tp: int, value_bytes: int) -> int:
    """KV cache bytes one token takes on each device: K and V of every layer, for the KV
    heads that device holds (a head is copied where there are fewer heads than devices)."""
    heads_here = max(1, shape.kv_heads // max(1, tp))
    return 2 * shape.layers * heads_here * shape.head_dim * value_bytes


def activation_bytes(shape: ModelShape, tp: int, value_bytes: int, batched_tokens: int,
                     max_num_seqs: int) -> int:
    """vLLM's profiling run, estimated: ``batched_tokens`` through one layer (residual and
    normed hidden states, this device's share of q/k/v and of the MLP's gate, up and
    activation) plus the sampler's float32 logits for ``max_num_seqs`` rows."""
    inter = shape.expert_intermediate if shape.experts else shape.intermediate
    per_token = 2 * shape.hidden + (shape.heads + 2 * shape.kv_heads) * shape.head_dim // tp \
        + 3 * inter // tp
    return batched_tokens * per_token * value_bytes + max_num_seqs * shape.vocab * 4


def size(n: float) -> str:
    """Bytes in GiB, or MiB below one GiB."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / (1 << 20):.1f} MiB"


@dataclass
class MemoryPlan:
    """What a load would put where, per device. Bytes; ``kv_tokens`` is the KV cache's
    size in tokens (whole blocks), None where it cannot be worked out."""

    device: str  # "GPU" or "CPU"
    devices: int
    tp: int
    weights_per_device: int
    weights_estimated: bool
    budget_per_device: int | None
    overhead_per_device: int
    kv_room_per_device: int | None
    kv_bytes_per_token: int
    kv_tokens: int | None
    block_size: int
    max_model_len: int
    max_positions: int | None
    max_num_seqs: int
    gpu_memory_utilization: float
    note: str = ""

    @property
    def fits(self) -> bool | None:
        return None if self.kv_tokens is None else self.kv_tokens >= self.max_model_len

    @property
    def largest_len(self) -> int | None:
        """The longest ``max_model_len`` whose one sequence fits the KV cache."""
        if self.kv_tokens is None:
            return None
        return min(self.kv_tokens, self.max_positions) if self.max_positions else self.kv_tokens

    @property
    def rows_in_flight(self) -> int | None:
        """Sequences of ``max_model_len`` tokens the KV cache holds at once (capped by
        ``max_num_seqs``)."""
        if self.kv_tokens is None:
            return None
        return min(self.max_num_seqs, self.kv_tokens // self.max_model_len)

    def lines(self) -> list[str]:
        """The two lines ``--plan`` and the load print."""
        est = " (estimated from config.json)" if self.weights_estimated else ""
        if self.device == "GPU":
            total = self.budget_per_device / self.gpu_memory_utilization
            first = (f"memory per GPU ({self.devices} × {size(total)}, TP {self.tp}): weights "
                     f"{size(self.weights_per_device)}{est}, activations and CUDA "
                     f"~{size(self.overhead_per_device)}, KV cache "
                     + (size(self.kv_room_per_device) if self.kv_room_per_device is not None else "?")
                     + f" at gpu_memory_utilization {self.gpu_memory_utilization:g}")
        else:
            first = (f"memory in RAM: weights {size(self.weights_per_device)}{est}, KV cache "
                     + (size(self.kv_room_per_device) if self.kv_room_per_device is not None
                        else "sized by vLLM from free RAM (set VLLM_CPU_KVCACHE_SPACE=GiB to fix it)"))
        if self.kv_tokens is None:
            second = (f"KV cache: {self.kv_bytes_per_token / 1024:.0f} KiB a token per device; "
                      f"max_model_len {self.max_model_len}")
        else:
            second = (f"KV cache: {self.kv_tokens:,} tokens ({self.kv_bytes_per_token / 1024:.0f} KiB a "
                      f"token per device); max_model_len {self.max_model_len}: "
                      + (f"{self.rows_in_flight} rows in flight at full length"
                         if self.fits else f"does not fit, at most {self.largest_len:,}"))
        return [first + (f"; {self.note}" if self.note else ""), second]


def memory_plan(config: dict[str, Any], kwargs: dict[str, Any], device_totals: Sequence[int],
                weight_bytes: int | None = None, cpu_kv_bytes: int | None = None) -> MemoryPlan | None:
    """Where a load's memory goes, worked out from the model's config and the engine
    arguments (``kwargs``, as :func:`plan_load` makes them), like vLLM's own profiling:
    each GPU gives ``total × gpu_memory_utilization``; the weights (``weight_bytes`` as on
    disk, else estimated from the config), the profiling run's activations and what CUDA
    holds outside torch come off it; the rest is KV cache, in whole blocks.
    ``device_totals``: each GPU's memory (empty: a CPU, where the KV cache is
    ``kv_cache_memory_bytes``, or ``cpu_kv_bytes`` from ``VLLM_CPU_KVCACHE_SPACE``).
    None where the config cannot size the model."""
    shape = model_shape(config)
    if shape is None:
        return None
    def num(key: str, default: Any, kind: type = int) -> Any:
        value = kwargs.get(key)
        if value is None or value == "":
            return default
        try:
            if isinstance(value, bool) or (kind is int and float(value) != int(float(value))):
                raise ValueError
            return kind(float(value)) if kind is int else kind(value)
        except (TypeError, ValueError):
            raise InvalidInput(f"%load_vllm: vLLM rejects these engine arguments: {key} takes "
                               f"{'an integer' if kind is int else 'a number'} (got {value!r}); "
                               "nothing was unloaded") from None

    tp = num("tensor_parallel_size", 1) or 1
    gpu = bool(device_totals)
    dtype = str(kwargs.get("dtype") or "auto")
    if dtype == "auto" and (shape.dtype or "") in ("float32", "float"):
        dtype = "bfloat16"  # vLLM's auto runs a float32 model in 16 bits (GPU and CPU alike)
    value = dtype_bytes(dtype, shape)
    kv_dtype = str(kwargs.get("kv_cache_dtype") or "auto")
    kv_value = value if kv_dtype == "auto" else _DTYPE_BYTES.get(kv_dtype, value)
    estimated = weight_bytes is None
    weights = weight_bytes if weight_bytes is not None else estimate_weight_bytes(shape, value)
    per_device = -(-weights // tp)
    per_token = kv_bytes_per_token(shape, tp, kv_value)
    block = num("block_size", 0) or (GPU_BLOCK_SIZE if gpu else CPU_BLOCK_SIZE)
    seqs = num("max_num_seqs", 0) or DEFAULT_MAX_NUM_SEQS
    max_len = num("max_model_len", 0) or max_positions(config) or 0
    batched = num("max_num_batched_tokens", 0) or DEFAULT_MAX_BATCHED_TOKENS  # chunked prefill
    gmu = num("gpu_memory_utilization", 0.0, float) or KAGGLE_DEFAULTS["gpu_memory_utilization"]
    explicit = num("kv_cache_memory_bytes", None)
    note = ""
    if gpu:
        budget = int(min(device_totals) * gmu)
        overhead = activation_bytes(shape, tp, value, batched, seqs) + NON_TORCH_BYTES
        room: int | None = max(0, budget - per_device - overhead)
        if explicit:
            room = int(explicit)
            note = "KV cache set by kv_cache_memory_bytes"
        if not kwargs.get("enforce_eager", True):
            note = (note + "; " if note else "") + "CUDA graphs not counted"
    else:
        budget, overhead = None, 0
        room = int(explicit) if explicit else cpu_kv_bytes
    tokens = None if room is None else (room // (per_token * block)) * block
    return MemoryPlan("GPU" if gpu else "CPU", len(device_totals), tp, per_device, estimated, budget,
                      overhead, room, per_token, tokens, block, max_len, max_positions(config), seqs,
                      gmu, note)


def check_fits(mp: MemoryPlan | None) -> None:
    """Refuse a ``max_model_len`` whose one sequence does not fit the KV cache (vLLM would
    refuse it only after the weights are loaded, and a loaded model let go)."""
    if mp is None or mp.fits is not False:
        return
    hint = (f"use --max-model-len {mp.largest_len}" if mp.largest_len and mp.largest_len >= 16
            else "free memory or use a smaller model")
    if mp.device == "GPU" and mp.gpu_memory_utilization < 0.95:
        hint += " or a higher --gpu-memory-utilization"
    if mp.device == "GPU":  # the activations are an estimate: let the user set the cache
        hint += " (or size the KV cache yourself: --engine-arg kv_cache_memory_bytes=N)"
    raise InvalidInput(
        f"%load_vllm: max_model_len {mp.max_model_len} does not fit: the KV cache holds "
        f"{mp.kv_tokens:,} tokens ({size(mp.kv_room_per_device or 0)} per {mp.device}); {hint}; "
        "nothing was unloaded")


def flags_line(kwargs: dict[str, Any], spawn: bool) -> str:
    """The engine arguments a load would pass, one line (environment settings first)."""
    env = "VLLM_WORKER_MULTIPROC_METHOD=spawn; " if spawn else ""
    shown = {k: v for k, v in kwargs.items() if k not in ("model", "log_config_file")}
    return "flags: " + env + ", ".join(f"{k}={v!r}" for k, v in shown.items())
