"""The ``vllm`` backend: streams replies from the engine in the slot (:mod:`.slot`),
one request or a batch, through one consume loop; a cut request is aborted at once and
its counts are kept on the stream (:func:`~subchat_magics.backends.base.cut_finish`).

Imports the backend protocol, :mod:`.slot` and :mod:`.requests`; never vLLM itself."""

from __future__ import annotations

from typing import Iterator, Sequence

from ...errors import BackendUnavailable, InvalidInput
from ..base import Availability, Backend, Finish, GenerationOptions, Message, Stream, cut_finish
from . import slot
from .pool import EnginePool


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

    def check_options(self, options: GenerationOptions) -> None:
        """Own options are ``SamplingParams`` fields (``top_k``, ``repetition_penalty``,
        ``ignore_eos``, ``structured_outputs``…): any other name is refused."""
        extra = options.extra or {}
        if not extra:
            return
        from .compat import sampling_param_names

        known = set(sampling_param_names()) | {"structured_outputs", "guided_decoding"}
        unknown = sorted(k for k in extra if k not in known)
        if unknown:
            raise InvalidInput(f"the vllm backend does not take {', '.join(unknown)} (its own "
                               "options are vLLM's SamplingParams fields, e.g. top_k, "
                               "repetition_penalty)")

    def count_tokens(self, text: str, options: GenerationOptions) -> int | None:
        engine = slot.active_engine()
        return engine.count_tokens(text) if engine is not None else None

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
        a delta a step."""
        batch = self.stream_batch([(messages, options)])

        def run(stream: Stream) -> Iterator[str | Finish]:
            try:
                for _, item in batch:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                batch.close()
                cut = cut_finish(batch)
                if cut is not None:
                    stream.cut[0] = cut

        return Stream(run)

    def open_pool(self, size: int, deltas: bool = True) -> EnginePool:
        """Requests in the engine (one reply, a fan-out, a batch's rows): each goes into
        the engine when it is submitted, so every request in flight is batched."""
        return EnginePool(self._engine(), size, deltas)

    def unfinished_requests(self) -> int:
        """Requests the engine still holds (0 when idle)."""
        return self._engine().unfinished_requests()

    def close(self) -> None:
        """Nothing to release per instance: the engine belongs to the kernel."""
