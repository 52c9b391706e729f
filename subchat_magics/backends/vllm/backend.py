"""The ``vllm`` backend: streams replies from the engine in the slot (:mod:`.slot`),
one request or a batch, through one consume loop; a cut request is aborted at once and
its counts are kept on the stream (:func:`~subchat_magics.backends.base.cut_finish`).

Imports the backend protocol, :mod:`.slot` and :mod:`.requests`; never vLLM itself."""


from __future__ import annotations

import functools
import json
from dataclasses import replace
from typing import Any, Iterator, Sequence

from ...errors import BackendUnavailable, InvalidInput, SubchatError
from ...structured import json_schema
from ...tools import ToolCall, pseudo_answer_name, step_schema
from ..base import Availability, Backend, Finish, GenerationOptions, Message, Stream, cut_finish
from ..pool import END, Pool, ThreadPool
from . import slot
from .pool import EnginePool

#: own options that go with tools (see :meth:`VLLMBackend._tool_step`)
TOOL_OPTIONS = {"tool_choice", "tool_constraint"}
#: the fewest tokens a tool step may write (its JSON must close for the call to be valid)
STEP_MIN_TOKENS = 256


class VLLMBackend(Backend):
    """The vLLM engine loaded in this kernel (``%load_vllm``), streaming token by token.
    Thinking (Qwen3) is on when the model was loaded with ``--think`` or the request
    asks for it (``GenerationOptions.think``). ``GenerationOptions.extra`` keys that are
    ``SamplingParams`` fields (``top_k``, ``repetition_penalty``, ``ignore_eos``,
    ``structured_outputs``…) pass through. The model stays loaded until
    ``%unload_vllm``; :meth:`close` does not free it.

    Streams are :class:`~subchat_magics.backends.base.Stream` objects: once one is cut
    (closed, interrupted, the model unloaded, the engine failed) ``cut_finish(stream,
    index)`` gives the prompt, completion and cached token counts of the part that ran."""

    id = "vllm"
    description = "vLLM in this kernel (%load_vllm)"
    extra = "vllm"
    auto_priority = 10
    constraints = ("json", "choice", "regex")  # structured outputs, in the engine
    concurrency = 1024  # a batch's rows in the engine at once (its scheduler takes what fits)
    supports_tools = True  # the call constrained to the tools' schemas (see _tool_step)

    @property
    def engine(self) -> slot.Engine | None:
        return slot.active_engine()

    def available(self) -> Availability:
        engine = slot.active_engine()
        if engine is None:
            return Availability(False, "no vLLM model is loaded in this kernel; load one with "
                                       "%load_vllm MODEL_PATH, or register a vllm.LLM with "
                                       "subchat_magics.register_vllm(llm)")
        if engine.failed is not None:
            return Availability(False, f"the engine of {engine.label} failed ({engine.failed}); "
                                       "reload it with %load_vllm")
        return Availability(True, f"{engine.label} loaded in this kernel")

    def default_model(self) -> str | None:
        engine = slot.active_engine()
        return engine.label if engine is not None else None

    def cannot_enforce(self, options: GenerationOptions) -> str | None:
        engine = slot.active_engine()
        if options.constraint is not None and engine is not None and engine.thinks(options):
            return (f"vLLM applies {options.constraint} from the first token, thinking included, "
                    "so it does not go with thinking; add --no-think")
        return super().cannot_enforce(options)

    def cannot_call_tools(self, options: GenerationOptions) -> str | None:
        """The model's chat template must write the tools into the prompt (a template
        without tool support would leave the model blind to them)."""
        engine = slot.active_engine()
        if not options.tools or engine is None:
            return super().cannot_call_tools(options)
        probe = [{"role": "user", "content": "Hi"}]
        specs = [t.spec() for t in options.tools]
        try:
            with_tools = engine.builder.render_text(probe, tools=specs)
        except SubchatError:
            with_tools = None
        if with_tools is None or with_tools == engine.builder.render_text(probe):
            return (f"the chat template of {engine.label} does not write tools into the "
                    "prompt, so the model cannot call them; load a model whose template "
                    "supports tools (Qwen3, Llama 3.1+, Mistral…)")
        return None

    def check_options(self, options: GenerationOptions) -> None:
        """Own options are ``SamplingParams`` fields (``top_k``, ``repetition_penalty``,
        ``ignore_eos``, ``structured_outputs``…): any other name is refused."""
        extra = options.extra or {}
        if not extra:
            return
        from .compat import sampling_param_names

        known = set(sampling_param_names()) | {"structured_outputs", "guided_decoding"} \
            | TOOL_OPTIONS
        unknown = sorted(k for k in extra if k not in known)
        if unknown:
            raise InvalidInput(f"the vllm backend does not take {', '.join(unknown)} (its own "
                               "options are vLLM's SamplingParams fields, e.g. top_k, "
                               "repetition_penalty, and with tools tool_choice, "
                               "tool_constraint)")
        if extra.get("tool_choice") not in (None, "auto", "required"):
            raise InvalidInput(f"tool_choice is auto or required, not {extra['tool_choice']!r}")
        if not isinstance(extra.get("tool_constraint", True), bool):
            raise InvalidInput("tool_constraint is True or False")

    def count_tokens(self, text: str, options: GenerationOptions) -> int | None:
        engine = slot.active_engine()
        return engine.count_tokens(text) if engine is not None else None

    def prompt_tokens(self, messages: Sequence[Message], options: GenerationOptions) -> int | None:
        """The prompt's tokens as the engine would get them (the chat template rendered and
        tokenized, the window fitted): the same preparation a request goes through."""
        reply, _ = self._engine().prepare(messages, options)
        return reply.prompt.length

    def kv_budget(self) -> dict[str, int | None]:
        """The loaded engine's KV cache: tokens, ``max_model_len``, ``max_num_seqs`` and
        the rows of ``max_model_len`` tokens it holds at once."""
        e = self._engine()
        return {"kv_tokens": e.kv_tokens, "max_model_len": e.max_model_len,
                "max_num_seqs": e.max_num_seqs, "rows_in_flight": e.rows_in_flight}

    def _engine(self) -> slot.Engine:
        engine = slot.active_engine()
        if engine is None:
            raise BackendUnavailable(
                "no vLLM model is loaded in this kernel; load one with %load_vllm MODEL_PATH, "
                "or register a vllm.LLM with subchat_magics.register_vllm(llm)"
            )
        return engine

    def stream(self, messages: Sequence[Message], options: GenerationOptions) -> Iterator[str | Finish]:
        """One request: a pool of one in the engine (:class:`.pool.EnginePool`), the text
        a delta a step. With tools, a constrained step first (:meth:`_tool_step`)."""
        if options.tools:
            return Stream(lambda stream: self._tool_step(messages, options, stream))
        return self._one(messages, options)

    def _one(self, messages: Sequence[Message], options: GenerationOptions) -> Stream:
        """One request straight into the engine (a pool of one), whatever its options: a
        tool step's requests come here too."""
        engine = self._engine()

        def run(stream: Stream) -> Iterator[str | Finish]:
            pool = EnginePool(engine, 1, True)
            try:
                pool.submit(0, messages, options)
                while True:
                    ev = pool.next_event(0.05)
                    if ev is None:
                        continue
                    item = ev[1]
                    if item is END:
                        return
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                pool.close()
                cut = pool.cut_finish(0)
                if cut is not None:
                    stream.cut[0] = cut

        return Stream(run)

    def _tool_step(self, messages: Sequence[Message], options: GenerationOptions,
                   stream: Stream) -> Iterator[str | Finish]:
        """Answer or call, decided by the model under a constraint: the chat is rendered
        with the tools by the model's template, the reply opens the template's
        ``<tool_call>`` and the JSON that follows is constrained (structured outputs) to
        ``{"name": TOOL, "arguments": <that tool's schema>}`` for one of the tools, or to
        ``{"name": "answer"}``. A call ends the reply (``Finish.tool_calls``), valid by
        construction; "answer" is followed by a second request that streams the answer
        (with the cell's --json/--choice/--regex, if any). ``extra["tool_constraint"]
        = False`` leaves the JSON free (to measure what the constraint is worth);
        ``extra["tool_choice"] = "required"`` leaves out the answer (OpenAI's name)."""
        tools = list(options.tools or ())
        answer = pseudo_answer_name(t.name for t in tools)
        constrained = options.extra.get("tool_constraint", True) is not False
        required = options.extra.get("tool_choice") == "required"  # a call, never the answer
        extra = {**options.extra, "_prefill": "<tool_call>\n"}
        schema = step_schema(tools, None if required else answer)
        # the call is valid only once its JSON is whole: a step may take more tokens than
        # the reply's --max-tokens (a call is short; a model that runs on is cut there)
        step = replace(options, extra=extra, constraint=_step_constraint(json.dumps(schema))
                       if constrained else None,
                       max_tokens=max(options.max_tokens, STEP_MIN_TOKENS),
                       stop=None if constrained else ["</tool_call>"])
        parts: list[str] = []
        finish: Finish | None = None
        events = self._one(messages, step)
        try:
            for item in events:
                if isinstance(item, Finish):
                    finish = item
                else:
                    parts.append(item)
        finally:
            events.close()
            cut = cut_finish(events)
            if finish is None and cut is not None:
                stream.cut[0] = cut
        text = "".join(parts).strip()
        finish = finish or Finish(model=self.default_model())
        try:
            chosen = json.loads(text)
        except ValueError as exc:
            chosen = None
            why = f"the model's call is not JSON ({exc.msg} at character {exc.pos})"
        else:
            why = None if isinstance(chosen, dict) else "the model's call is not a JSON object"
        if isinstance(chosen, dict) and chosen.get("name") == answer and set(chosen) == {"name"}:
            # the model answers: stream the answer (the step's tokens are counted with it)
            inner = self._one(messages, options_without_prefill(options))
            try:
                for item in inner:
                    if isinstance(item, Finish):
                        item.extra["tool_step_tokens"] = finish.completion_tokens
                        item.extra["tool_step"] = "answer"
                    yield item
            finally:
                inner.close()
                cut = cut_finish(inner)
                if cut is not None:
                    stream.cut[0] = cut
            return
        if isinstance(chosen, dict):
            call = ToolCall.parse(str(chosen.get("name", "")), chosen.get("arguments", {}))
        else:
            call = ToolCall("", text)
            call.error = why
        finish.reason = "tool_calls" if finish.reason == "stop" else finish.reason
        finish.tool_calls = [call]
        finish.extra["tool_step"] = "constrained" if constrained else "free"
        yield finish

    def open_pool(self, size: int, deltas: bool = True) -> Pool:
        """Requests in the engine (one reply, a fan-out, a batch's rows): each goes into
        the engine when it is submitted, so every request in flight is batched. A request
        with tools goes through :meth:`stream` (its constrained step, then the answer) on a
        thread of its own, into the same engine (:class:`ToolsPool`)."""
        return ToolsPool(self, EnginePool(self._engine(), size, deltas), size)

    def unfinished_requests(self) -> int:
        """Requests the engine still holds (0 when idle)."""
        return self._engine().unfinished_requests()

    def close(self) -> None:
        """Nothing to release per instance: the engine belongs to the kernel."""

def options_without_prefill(options: GenerationOptions) -> GenerationOptions:
    """``options`` for the answer after a tool step: the tools still rendered by the
    template, nothing prefilled."""
    return replace(options, extra={k: v for k, v in options.extra.items() if k != "_prefill"})


@functools.lru_cache(maxsize=64)
def _step_constraint(schema_json: str) -> Any:
    """The constraint of a tool step, checked once per set of tools (checking a schema
    against its meta-schema takes milliseconds: not once per round)."""
    return json_schema(json.loads(schema_json))


class ToolsPool(Pool):
    """The engine's pool, and threads for the requests with tools (each a constrained step
    and maybe an answer: :meth:`VLLMBackend.stream`); both feed the one engine, which
    batches every request in flight."""

    MAX_THREADS = 64

    def __init__(self, backend: VLLMBackend, engine_pool: EnginePool, size: int):
        self.size = engine_pool.size
        self.engine_pool = engine_pool
        self.threads = ThreadPool(backend, min(max(1, size), self.MAX_THREADS))
        self._plain = self._tooled = 0  # requests sent each way so far

    def submit(self, index: int, messages: Sequence[Message], options: GenerationOptions) -> None:
        self.submit_many([(index, messages, options)])

    def submit_many(self, requests: Sequence[tuple[int, Sequence[Message], GenerationOptions]]
                    ) -> None:
        plain = [r for r in requests if not r[2].tools]
        if plain:
            self._plain += len(plain)
            self.engine_pool.submit_many(plain)
        for index, messages, options in requests:
            if options.tools:
                self._tooled += 1
                self.threads.submit(index, messages, options)

    def submit_samples(self, indices: Sequence[int], messages: Sequence[Message],
                       options: Sequence[GenerationOptions]) -> None:
        """K samples of one message (``--vote K``): ONE engine request with ``n=K``
        (without this the base pool's K separate requests would be sent)."""
        if any(o.tools for o in options):  # refused earlier; kept safe: one thread each
            self.submit_many([(i, messages, o) for i, o in zip(indices, options)])
            return
        self._plain += len(indices)
        self.engine_pool.submit_samples(indices, messages, options)

    def next_event(self, timeout: float = 0.05) -> Any:
        if not self._tooled:
            return self.engine_pool.next_event(timeout)
        if not self._plain:
            return self.threads.next_event(timeout)
        return self.engine_pool.next_event(0) or self.threads.next_event(timeout / 2) \
            or self.engine_pool.next_event(timeout / 2)

    def comes_whole(self, options: GenerationOptions) -> bool:
        return not options.tools and self.engine_pool.whole  # (a tools request streams)

    def cut_finish(self, index: int) -> Finish | None:
        return self.engine_pool.cut_finish(index) or self.threads.cut_finish(index)

    def close(self) -> None:
        self.threads.close()
        self.engine_pool.close()

    def join(self, timeout: float) -> None:
        self.threads.join(timeout)
