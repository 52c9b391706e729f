"""One request: its sampling parameters (from :class:`GenerationOptions`), the reply
accumulator that collects what the engine streamed, and the :class:`Finish` (with
provenance) of a reply that ended or was cut.

Imports :mod:`.compat` for the parameters' vLLM names, the backend protocol
(:mod:`..base`), :mod:`subchat_magics.prompting` and the errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...errors import BackendError, InvalidInput, SubchatError
from ...prompting import Prompt
from ...structured import Constraint
from ..base import Finish, GenerationOptions
from .compat import Delta, delta_sampling_params, is_request_rejection


def structured_outputs(constraint: Constraint) -> dict[str, Any]:
    """The structured-output fields for ``constraint`` (the same names in vLLM's
    ``StructuredOutputsParams`` and the older ``GuidedDecodingParams``)."""
    return {"json": dict(constraint.schema or {"type": "object"})} if constraint.kind == "json" \
        else {"choice": list(constraint.choices)} if constraint.kind == "choice" \
        else {"regex": constraint.pattern}


def sampling_params(options: GenerationOptions, max_tokens: int, constrain: bool = True,
                    samples: int = 1, seeds: bool = True) -> Any:
    """vLLM ``SamplingParams`` for ``options`` (streaming deltas); ``options.extra`` keys
    that are ``SamplingParams`` fields (``top_k``, ``repetition_penalty``…) pass through.
    ``options.constraint`` becomes vLLM's structured outputs unless ``constrain`` is false
    (thinking is on: the constraint would bind the thinking too; the reply is validated
    afterwards instead). ``samples`` > 1: one request of that many samples (``n``; the
    engine gives sample ``i`` the seed ``seed + i``). ``seeds`` False: the engine cannot
    replay a seeded request (a CPU engine with chunked prefill), so no seed is sent."""
    base: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": float(options.temperature),
        "top_p": float(options.top_p),
    }
    if options.seed is not None and seeds:
        base["seed"] = int(options.seed)
    if samples > 1:
        base["n"] = int(samples)
    if options.stop:
        base["stop"] = list(options.stop)
    extra = options.extra
    if options.constraint is not None and constrain:
        extra = {**extra, "structured_outputs": structured_outputs(options.constraint)}
    return delta_sampling_params(base, extra)


@dataclass
class Reply:
    """What one request has streamed so far, and how it was asked for."""

    prompt: Prompt
    options: GenerationOptions
    thinking: str | None = None  # "on", "off", "unsupported" (None: not said)
    rid: str = ""
    parts: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    cached: int | None = None
    finished: bool = False  # the engine ended it (its Finish was yielded)
    in_engine: bool = False  # the engine holds it: closing the stream must abort it
    generated: int | None = None  # tokens generated, where more than ``ids`` (a cut final-only row)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def add(self, d: Delta) -> None:
        self.ids.extend(d.token_ids)
        if d.num_cached_tokens is not None:
            self.cached = d.num_cached_tokens
        if d.text:
            self.parts.append(d.text)

    def finish(self, model: str, reason: str | None) -> Finish:
        """The Finish of this reply; for one that was cut, the counts of the part that ran."""
        p = self.prompt
        extra: dict[str, Any] = {"temperature": float(self.options.temperature)}
        if self.options.seed is not None:
            extra["seed"] = int(self.options.seed)
        if self.thinking is not None:
            extra["thinking"] = self.thinking
        if p.notes:
            extra["notes"] = list(p.notes)
        if p.dropped_messages:
            extra["dropped_messages"] = p.dropped_messages
        if not p.exact:
            extra["prompt_render"] = "plain"
        return Finish(reason=reason or "stop", model=model, prompt_tokens=p.length,
                      completion_tokens=max(len(self.ids), self.generated or 0), cached_tokens=self.cached, extra=extra)


def as_error(exc: BaseException) -> BaseException:
    """An engine exception as ours: a rejected request is the user's to fix, the rest is
    the backend's."""
    if isinstance(exc, SubchatError):
        return exc
    if is_request_rejection(exc):
        return InvalidInput(f"vLLM refused the request: {exc}")
    return BackendError(f"vLLM failed: {type(exc).__name__}: {exc}", reason="model")
