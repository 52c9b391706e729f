"""The one engine slot of this process: the :class:`Engine` replies go to, and what
fills or empties the slot (:func:`load`, :func:`register_vllm`, :func:`unload`,
:func:`release`, :class:`VLLMClient`).

The slot belongs to the kernel, not to the extension: ``%reload_ext`` keeps it (only
``%unload_ext`` empties it, at the end of its cell). Nothing is let go until every check
that needs no weights has passed, and a hand-registered ``LLM`` is shut down only when
the user asks to unload it. Imports the other parts of this package,
:mod:`subchat_magics.prompting` and the errors; never IPython (an IPython shell is
passed in)."""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ...errors import BackendError, InvalidInput
from ...prompting import PromptBuilder
from ..base import GenerationOptions, Message
from . import compat, discover, gpus, hub
from .driver import Driver
from .plan import (
    GiB,
    LoadSettings,
    MemoryPlan,
    Plan,
    check_engine_arg_keys,
    check_fits,
    check_model_path,
    clean_model_arg,
    first_line,
    flags_line,
    is_hub_id,
    memory_plan,
    model_label,
    plan_load,
)
from .progress import LogPhases, LogTail
from .requests import Reply, sampling_params

SEED_NOTE = ("the seed was not sent: this CPU engine runs with chunked prefill, where vLLM "
             "cannot replay a seeded request (load it with %load_vllm, which turns chunked "
             "prefill off on a CPU)")


class Engine:
    """A ``vllm.LLM``, the driver thread that alone calls it, and its prompt builder.
    Not made directly: see :func:`load` and :func:`register_vllm`. ``owned`` is False
    for an ``LLM`` the user built and registered."""

    def __init__(self, llm: Any, *, owned: bool, label: str, think: bool = False,
                 load_seconds: float | None = None, quantization: str | None = None,
                 model_path: str | None = None):
        facts = compat.engine_facts(llm)
        self.llm = llm
        self.owned = owned
        self.label = label
        self.think = think
        self.load_seconds = load_seconds
        self.quantization = quantization
        self.model_path = model_path or facts["model_path"] or label
        self.max_model_len = facts["max_model_len"]
        self.dtype = facts["dtype"]
        self.tensor_parallel_size = facts["tensor_parallel_size"]
        self.block_size = facts["block_size"]
        self.prefix_caching = facts["prefix_caching"]
        self.kv_tokens = facts.get("kv_tokens")
        self.max_num_seqs = facts.get("max_num_seqs")
        self.seeds = bool(facts.get("seeds", True))
        self.builder = PromptBuilder(llm.get_tokenizer(), self.max_model_len)
        self._choice_need: dict[tuple, int] = {}  # a --choice's longest choice, in tokens
        self.driver = Driver(llm.llm_engine)

    def __repr__(self) -> str:
        return f"<vLLM engine {self.label} ({self.dtype}, TP {self.tensor_parallel_size})>"

    def summary(self) -> str:
        """One line: model, dtype, TP, max length, prefix caching, thinking, load time."""
        bits = [self.label, f"dtype {self.dtype}", f"TP {self.tensor_parallel_size}",
                f"max length {self.max_model_len}"]
        if self.quantization:
            bits.append(self.quantization)
        bits.append("prefix caching " + ("on" if self.prefix_caching else "off"))
        if self.think:
            bits.append("thinking on" if self.builder.has_thinking_switch
                        else "no thinking switch in the chat template (--think changes nothing)")
        if self.load_seconds is not None:
            bits.append(f"loaded in {self.load_seconds:.1f} s")
        return " · ".join(bits)

    # -- requests ----------------------------------------------------------------------------
    def prepare(self, messages: Sequence[Message], options: GenerationOptions,
                samples: int = 1, params_memo: dict | None = None) -> tuple[Reply, Any]:
        """The fitted prompt of a request (as a fresh :class:`Reply`) and its sampling
        parameters. A too-long chat or a bad option raises here, before the engine.
        ``params_memo`` (a pool's, for the rows of one batch that share their options):
        the ``SamplingParams`` made once for each options object and reply room, and
        handed to the engine for every such request (vLLM copies them for each request,
        as ``llm.generate`` does with one ``SamplingParams`` for a list of prompts)."""
        think = self.think if options.think is None else bool(options.think)
        # a tool step (``_prefill``: the reply starts inside the template's <tool_call>)
        # is written without thinking: its JSON is constrained from the first token
        prefill = str(options.extra.get("_prefill", ""))
        if prefill:
            think = False
        tools = [t.spec() for t in options.tools] if options.tools else None
        prompt = self.builder.build(messages, int(options.max_tokens), think=think, tools=tools,
                                    prefill=prefill, need=self.reply_need(options, think),
                                    keep_context=options.keep_context)
        if self.builder.has_thinking_switch:
            thinking = "on" if think else "off"
        elif think:
            thinking = "unsupported"
            prompt.notes.append(f"the chat template of {self.label} has no thinking switch: "
                                "thinking is not on, and --think changes nothing")
        else:
            thinking = None
        if options.seed is not None and not self.seeds:
            prompt.notes.append(SEED_NOTE)
        if params_memo is None:
            return Reply(prompt, options, thinking), sampling_params(
                options, prompt.max_tokens, constrain=thinking != "on", samples=samples,
                seeds=self.seeds)
        key = (id(options), prompt.max_tokens, thinking != "on", samples)
        held = params_memo.get(key)
        if held is None or held[0] is not options:  # (the options kept: an id is not reused)
            held = params_memo[key] = (options, sampling_params(
                options, prompt.max_tokens, constrain=thinking != "on", samples=samples,
                seeds=self.seeds))
        return Reply(prompt, options, thinking), held[1]

    def encoded(self, requests: Sequence[tuple[Any, Sequence[Message], GenerationOptions]]
                ) -> contextlib.AbstractContextManager:
        """While inside, the rows among ``requests`` (one options object: a batch's group)
        find their own part of the prompt encoded already, all together
        (:meth:`PromptBuilder.rows_encoded`)."""
        if len(requests) < 2:
            return contextlib.nullcontext()
        options = requests[0][2]
        if options.tools or options.extra.get("_prefill") or any(
                r[2] is not options for r in requests):
            return contextlib.nullcontext()
        think = self.think if options.think is None else bool(options.think)
        return self.builder.rows_encoded([r[1] for r in requests], think)

    @property
    def rows_in_flight(self) -> int | None:
        """Sequences of ``max_model_len`` tokens the KV cache holds at once (capped by
        ``max_num_seqs``); None where the engine does not say."""
        if not self.kv_tokens or not self.max_model_len:
            return None
        rows = self.kv_tokens // self.max_model_len
        return min(rows, self.max_num_seqs) if self.max_num_seqs else rows

    def reply_need(self, options: GenerationOptions, think: bool) -> int | None:
        """The most tokens an answer can use, where the constraint bounds it (without
        thinking: a ``--choice``'s longest choice, a bounded ``--regex``'s longest match at
        4 tokens a character, each and the stop token)."""
        c = options.constraint
        if c is None or think or options.tools:
            return None
        if c.kind == "choice" and c.choices:
            key = tuple(c.choices)  # (each row of a --choice batch asks: encoded once)
            need = self._choice_need.get(key)
            if need is None:
                need = max(len(self.builder.encode(x)) for x in c.choices) + 1
                if len(self._choice_need) > 64:
                    self._choice_need.clear()
                self._choice_need[key] = need
            return need
        most = c.longest_regex_match()
        return 4 * most + 1 if most is not None else None

    def thinks(self, options: GenerationOptions) -> bool:
        """Whether a request with ``options`` runs with thinking on."""
        think = self.think if options.think is None else bool(options.think)
        return think and self.builder.has_thinking_switch

    def count_tokens(self, text: str) -> int:
        return len(self.builder.encode(text))

    def remember(self, reply: Reply) -> None:
        """Keep the ids a request generated, for the prompts that continue its chat."""
        self.builder.remember(reply.prompt.token_ids, reply.text, reply.ids)

    # -- the driver --------------------------------------------------------------------------
    @property
    def failed(self) -> str | None:
        """Why the engine failed (it must be loaded again), or None."""
        return self.driver.failed

    def submit(self, items: Sequence[tuple[list[int], Any, Any]], sink: queue.SimpleQueue) -> list[str]:
        return self.driver.submit(items, sink)

    @property
    def requests_added(self) -> int:
        """Engine requests added through this engine's driver (a vote of K samples is one)."""
        return self.driver.requests_added

    def abort(self, rids: Sequence[str]) -> dict[str, int]:
        """Abort requests; how many tokens each had generated (where vLLM says)."""
        return self.driver.abort(rids)

    def next_event(self, sink: queue.SimpleQueue) -> tuple[Any, Any]:
        return self.driver.next_event(sink)

    def call(self, fn: Callable[[Any], Any], timeout: float = 60.0) -> Any:
        """Run ``fn(llm_engine)`` on the driver thread (between steps)."""
        return self.driver.call(fn, timeout)

    def unfinished_requests(self) -> int:
        """Requests the engine still holds (0 once every reply ended or was aborted)."""
        return self.driver.unfinished_requests()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the driver (requests in flight end with an error); the engine stays up."""
        self.driver.stop(timeout)

    def shutdown(self, *, keep_distributed: bool = False) -> None:
        """Stop the driver and shut the engine core down (it can then be collected)."""
        self.stop()
        llm, self.llm = self.llm, None
        if llm is not None:
            compat.shutdown_engine(llm, keep_distributed=keep_distributed)
        del llm


# -- the slot -------------------------------------------------------------------------------
_state_lock = threading.RLock()
_active: Engine | None = None


def active_engine() -> Engine | None:
    """The engine replies go to, or None."""
    return _active


def _take() -> Engine | None:
    global _active
    with _state_lock:
        engine, _active = _active, None
    return engine


def _activate(engine: Engine) -> None:
    global _active
    with _state_lock:
        _active = engine


def unload(echo: Callable[[str], None] | None = None) -> str | None:
    """Stop and free the active engine (its GPU/CPU memory too); what ``%unload_vllm``
    does. Returns its label, or None when none was loaded. A hand-registered ``LLM`` is
    shut down as well (you asked to unload it): drop your own reference to it
    (``del llm``) for its memory to go."""
    return _unload(echo)


def _unload(echo: Callable[[str], None] | None = None, *, survivor: bool = False) -> str | None:
    """:func:`unload`; ``survivor``: another engine lives on in this process (a
    hand-built ``LLM`` about to be registered), whose distributed state must stay."""
    engine = _take()
    if engine is None:
        return None
    label, owned = engine.label, engine.owned
    engine.shutdown(keep_distributed=survivor)
    del engine
    compat.free_memory(keep_distributed=survivor)
    if echo:
        echo(f"Unloaded {label}." if owned else
             f"Unloaded {label}: the engine of the vllm.LLM you registered is shut down (it cannot "
             "generate any more); drop your reference to it (del llm) to free its memory.")
    return label


def release(echo: Callable[[str], None] | None = None) -> str | None:
    """Empty the slot as ``%unload_ext`` does: a model loaded by ``%load_vllm`` is freed;
    a hand-registered ``LLM`` is left running and yours (only our driver stops)."""
    with _state_lock:
        engine = _active
        if engine is None:
            return None
        if engine.owned:
            return unload(echo)
        _take()
    engine.stop()
    if echo:
        echo(f"Released {engine.label}: the vllm.LLM you registered is still running and yours "
             "(subchat_magics.register_vllm(llm) uses it again; %unload_vllm would shut it down).")
    return engine.label


def release_with_extension(ipython: Any) -> None:
    """Called by ``unload_ipython_extension``. ``%reload_ext`` unloads the extension and
    loads it again in the same cell: the engine is the kernel's and must survive that. So
    the slot is emptied (:func:`release`) when the cell ends, and only if the extension's
    magics were not registered again meanwhile."""
    events = getattr(ipython, "events", None)
    if events is None:  # no shell events to wait for: release now
        release(echo=print)
        return

    def at_cell_end(*_args: Any) -> None:
        try:
            events.unregister("post_run_cell", at_cell_end)
        except ValueError:
            pass
        if "load_vllm" not in ipython.magics_manager.magics["line"]:
            release(echo=print)

    events.register("post_run_cell", at_cell_end)


def load(settings: LoadSettings, echo: Callable[[str], None] | None = print) -> Engine:
    """Load a model as ``%load_vllm`` does and make it the active engine.

    Everything that needs no weights is checked before a loaded model is let go: the
    folder and its config (or the model id, in the Hugging Face cache or on the Hub),
    our flags, and vLLM's own validation of the engine arguments. Only a failure while
    building the new engine costs the old model, and the error then says so.

    While the engine builds, vLLM's log goes to a file (``settings.verbose``: to the
    cell, as vLLM writes it) and ``echo`` gets a line per phase read from it."""
    say = echo or (lambda _s: None)
    path: Any
    found = None
    if is_hub_id(settings.model):
        found = hub.resolve(clean_model_arg(settings.model))
        path, config = found.repo_id, found.config
    else:
        path, config = check_model_path(settings.model)
    check_engine_arg_keys(settings.engine_args)
    if "vllm" not in sys.modules:
        say("Importing vLLM…")
    vllm = compat.import_vllm()
    if found is None and not discover.weight_size(path):
        raise InvalidInput(
            f"%load_vllm: {clean_model_arg(settings.model)!r} holds config.json but no weight "
            f"files ({', '.join(discover.WEIGHT_SUFFIXES)}); give the folder that holds them "
            "(%load_vllm without a path lists the models found)")
    n, caps = compat.detect_gpus()
    plan = _named(plan_load(settings, config, path, n, caps), settings, found)
    plan.kwargs.update(compat.coerce_engine_args(settings.engine_args))
    if n == 0:
        # a CPU engine: chunked prefill off, so seeded requests (--seed, --vote's samples)
        # never meet the generator rewind a CPU torch.Generator cannot do
        plan.kwargs.setdefault("enable_chunked_prefill", False)
    memory = _memory_plan(plan, config, found, compat.gpu_totals(n))
    if memory is not None:
        for line in memory.lines():
            say(line)
    check_fits(memory)  # before anything is let go
    for key, value in compat.structured_outputs_defaults(compat.engine_arg_names()).items():
        plan.kwargs.setdefault(key, value)  # an --engine-arg of the same name wins
    if plan.spawn:
        # before CUDA is touched in this process: forked TP workers would inherit it
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    phases = LogPhases(lambda line: say(f"  · {line}"))
    with _vllm_log(phases, settings.verbose) as more:
        say(f"Reading the config of {plan.label} and checking the engine arguments…")
        compat.validate_engine_args({**plan.kwargs, **more}, set(settings.engine_args))
        # every check that needs no weights is done: only now let go of the model in use
        previous = _active.label if _active is not None else None
        if previous is not None:
            say(f"Unloading {previous} first.")
            unload()
        k = plan.kwargs
        if found is not None:
            say(found.plan_line())
        say(f"Loading {plan.label} with vLLM {getattr(vllm, '__version__', '?')}: dtype {k['dtype']}, "
            f"TP {k['tensor_parallel_size']}, max length {k['max_model_len']}"
            + (f", {plan.quantization_label}" if plan.quantization_label else "") + "…")
        t0 = time.perf_counter()
        holder: dict[str, Any] = {}
        try:
            compat.build_llm(vllm, {**k, **more}, holder)
        except KeyboardInterrupt:
            holder.clear()
            compat.free_memory()
            raise
        except Exception as exc:  # noqa: BLE001 - vLLM raises many kinds; say what failed
            holder.clear()
            compat.free_memory()
            lost = (f"; {previous} was unloaded to make room for it and is no longer loaded "
                    "(load it again with %load_vllm)") if previous is not None else ""
            raise BackendError(f"vLLM could not load {plan.label}: {type(exc).__name__}: "
                               f"{first_line(exc)}{_load_hint(exc)}{lost}", reason="model") from None
    engine = Engine(holder.pop("llm"), owned=True, label=plan.label, think=settings.think,
                    load_seconds=time.perf_counter() - t0, quantization=plan.quantization_label,
                    model_path=str(path))
    _activate(engine)
    said = engine.summary()
    if phases.warnings:
        said += (f" ({phases.warnings} warning{'s' if phases.warnings != 1 else ''} from vLLM "
                 "not shown: %load_vllm --verbose shows its log)")
    say(f"vLLM ready: {said}")
    return engine


def _named(plan: Plan, settings: LoadSettings, found: Any) -> Plan:
    """The label of the folder as given (a Kaggle input linked elsewhere keeps its name)."""
    if found is None:
        plan.label = model_label(Path(clean_model_arg(settings.model)).expanduser().absolute())
    return plan


def _weights_on_disk(path: Any, found: Any) -> int | None:
    """Bytes of the model's weight files: in its folder, its cached snapshot, or the
    download's size; None where unknown (the plan then estimates them from the config)."""
    folder = getattr(found, "snapshot", None) if found is not None else path
    if folder is not None:
        size = discover.weight_size(Path(folder))
        if size:
            return size
    return getattr(found, "download_bytes", None) if found is not None else None


def _cpu_kv_bytes() -> int | None:
    raw = (os.environ.get("VLLM_CPU_KVCACHE_SPACE") or "").strip()
    return int(raw) * GiB if raw.isdigit() and int(raw) > 0 else None


def _memory_plan(plan: Plan, config: dict[str, Any], found: Any, totals: Sequence[int]) -> MemoryPlan | None:
    return memory_plan(config, plan.kwargs, totals, _weights_on_disk(plan.path, found), _cpu_kv_bytes())


def plan_only(settings: LoadSettings, echo: Callable[[str], None] | None = print) -> Plan:
    """What ``%load_vllm MODEL --plan`` prints, without loading (and without importing
    vLLM: the GPUs come from ``nvidia-smi``): weights per GPU, the KV cache room at the
    chosen ``gpu_memory_utilization``, the tokens that fit, the rows in flight at
    ``max_model_len``, and the engine arguments. A ``max_model_len`` that cannot fit is
    said, with the largest that does."""
    say = echo or (lambda _s: None)
    found = None
    if is_hub_id(settings.model):
        found = hub.resolve(clean_model_arg(settings.model))
        path, config = found.repo_id, found.config
    else:
        path, config = check_model_path(settings.model)
    check_engine_arg_keys(settings.engine_args)
    if "vllm" in sys.modules:
        n, caps = compat.detect_gpus()
        totals = compat.gpu_totals(n)
    else:
        machine = gpus.probe(use_torch=False)
        n, caps, totals = len(machine.gpus), machine.capabilities, [g.total for g in machine.gpus]
    plan = _named(plan_load(settings, config, path, n, caps), settings, found)
    memory = _memory_plan(plan, config, found, totals)
    say(f"Plan for {plan.label} (nothing loaded):")
    if memory is None:
        say("  the config does not say enough (hidden_size, layers, heads, vocab) to size it")
    else:
        for line in memory.lines():
            say("  " + line)
        if memory.fits is False:
            say(f"  --max-model-len {memory.largest_len} would fit"
                if memory.largest_len and memory.largest_len >= 16 else
                "  no length fits: free memory or use a smaller model")
    say("  " + flags_line(plan.kwargs, plan.spawn))
    return plan


@contextlib.contextmanager
def _vllm_log(phases: LogPhases, verbose: bool) -> Iterator[dict[str, Any]]:
    """While a load is checked and built: vLLM's log in a file read by ``phases`` (or,
    ``verbose``, left to vLLM). Yields the engine arguments that say so to vLLM."""
    if verbose:
        yield {}
        return
    fd, log_path = tempfile.mkstemp(prefix="subchat-vllm-load-", suffix=".log")
    os.close(fd)
    tail = LogTail(log_path, phases).start()
    try:
        with compat.log_to_file(log_path) as more:
            yield more
    finally:
        tail.stop()


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

    The object is checked first (a live ``vllm.LLM``, its engine not shut down); a wrong
    one is an :class:`InvalidInput` and the loaded model stays. A model loaded before is
    then unloaded. Registering the same ``LLM`` again only updates ``think``. We never
    shut a registered ``LLM`` down unless you ask (``%unload_vllm``)."""
    why = compat.why_not_usable(llm)
    if why is not None:
        raise InvalidInput(f"register_vllm takes a live vllm.LLM, and {why}; build one with "
                           "llm = vllm.LLM(MODEL_PATH, ...) and register that")
    with _state_lock:
        current = _active
        if current is not None and current.llm is llm:
            current.think = think
            return current
    label = label or model_label(str(getattr(llm.llm_engine.model_config, "model", "model")))
    engine = Engine(llm, owned=False, label=label, think=think)
    if current is not None:
        _unload(survivor=True)
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
        engine = _active
        return engine.llm if engine is not None else None

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
