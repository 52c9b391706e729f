"""The backend protocol.

A backend takes plain ``[{"role", "content"}]`` messages and generation options and
streams text deltas. It knows nothing of the chat tree or of IPython.

To add one, subclass :class:`Backend`, implement :meth:`Backend.stream` (a generator
that yields ``str`` deltas and, last, one :class:`Finish`), and register the class
under the ``subchat_magics.backends`` entry-point group. Closing the generator
(``gen.close()``, or an exception such as ``KeyboardInterrupt`` raised inside it)
must stop the generation: close the HTTP stream, abort the engine request.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, ClassVar, Iterable, Iterator, Sequence

from ..errors import InvalidInput
from ..structured import Constraint
from ..tools import Tool, ToolCall
from .pool import END, Pool, ThreadPool

# {"role": "system"|"user"|"assistant"|"tool", "content": str}; an assistant message that
# calls tools adds "tool_calls" (OpenAI's form), a tool result "tool_call_id" and "name"
Message = dict


@dataclass
class GenerationOptions:
    """What to generate. ``None`` means "the backend's own default"."""

    max_tokens: int = 1000
    temperature: float = 0.0
    top_p: float = 0.9
    stop: list[str] | None = None
    seed: int | None = None
    model: str | None = None
    think: bool | None = None  # None: the backend's or model's default
    extra: dict[str, Any] = field(default_factory=dict)
    #: what the reply must be (``--json``/``--choice``/``--regex``); None: free text
    constraint: Constraint | None = None
    #: the tools the model may call instead of answering (``--tools``); the reply is then
    #: either text or calls (:attr:`Finish.tool_calls`). The constraint binds the answer.
    tools: tuple[Tool, ...] | None = None
    #: a batch row: its context (the batch's instructions) is never dropped to fit a
    #: window; the reply room is lowered instead, or the row fails saying why
    keep_context: bool = False

    def validate(self) -> "GenerationOptions":
        """Check every value once (the one place the ranges are written); returns self."""
        for f in fields(self):
            check_option(f.name, getattr(self, f.name))
        return self

    def replace(self, **overrides: Any) -> "GenerationOptions":
        """A validated copy with ``overrides`` applied (``None`` values are skipped);
        an unknown option is a ``TypeError`` naming it."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown generation option(s): {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(names))}")
        changes = {k: v for k, v in overrides.items() if v is not None}
        new = replace(self, **changes)
        new.extra = dict(new.extra)
        return new.validate()


def check_option(name: str, value: Any) -> None:
    """Raise :class:`InvalidInput` if ``value`` is not valid for generation option ``name``."""
    if name == "max_tokens":
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidInput(f"max tokens must be a whole number >= 1, not {value!r}")
    elif name == "temperature":
        if not _number(value) or not 0.0 <= float(value) <= 2.0:
            raise InvalidInput(f"temperature must be between 0 and 2, not {value!r}")
    elif name == "top_p":
        if not _number(value) or not 0.0 < float(value) <= 1.0:
            raise InvalidInput(f"top_p must be in (0, 1], not {value!r}")
    elif name == "seed":
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise InvalidInput(f"seed must be a whole number, not {value!r}")
    elif name == "tools":
        if value is not None and (not isinstance(value, tuple)
                                  or not all(isinstance(t, Tool) for t in value)):
            raise InvalidInput("tools must be described with subchat_magics.tools (Toolset.of)")
    elif name == "constraint":
        if value is not None and not isinstance(value, Constraint):
            raise InvalidInput("constraint must be made with subchat_magics.structured "
                               f"(json_schema, choice, regex), not {type(value).__name__}")


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Option:
    """One of a backend's own options: its name in ``GenerationOptions.extra``, its type,
    the flag that sets it and a check (raising :class:`InvalidInput`) of its value."""

    name: str
    type: type
    help: str = ""
    validate: Callable[[Any], Any] | None = None

    @property
    def flag(self) -> str:
        return flag_of(self.name)

    def check(self, value: Any) -> None:
        if not isinstance(value, self.type) or (self.type is int and isinstance(value, bool)):
            raise InvalidInput(f"{self.flag} takes {self.type.__name__}, not {value!r}")
        if self.validate is not None:
            self.validate(value)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


@dataclass
class Finish:
    """The last item of a stream: why it ended and what it cost."""

    reason: str = "stop"  # "stop" | "length" | anything the backend reports
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: the tools the model called instead of answering (a request with ``tools`` only)
    tool_calls: list[ToolCall] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, {}, [])}


@dataclass
class Availability:
    ok: bool
    reason: str


BatchEvent = tuple  # (index, str | Finish | BaseException)


class Backend:
    """Base class of every backend. Subclasses set ``id`` and implement ``stream``.

    A backend describes itself with class attributes; the registry derives the backend
    names, the ``auto`` order, ``%subchat backends`` and the install hints from them."""

    id: ClassVar[str] = ""
    #: one line for ``%subchat backends`` and the help of ``--backend``
    description: ClassVar[str] = ""
    #: the optional extra that installs this backend's SDK (``pip install subchat-magics[extra]``)
    extra: ClassVar[str | None] = None
    #: where ``auto`` tries this backend (lower first); ``None``: only when asked for by name.
    #: Built in: vllm 10, ollama 20, groq 30, echo 1000 (the offline fallback, always last).
    auto_priority: ClassVar[int | None] = None
    #: the generation options this backend honours (the rest are ignored by it)
    options: ClassVar[tuple[str, ...]] = ("max_tokens", "temperature", "top_p", "stop", "seed",
                                          "model", "think")
    #: this backend's own options (``GenerationOptions.extra``): a typed, closed set. An
    #: option it does not declare is refused before anything is stored (``--num-ctx`` is
    #: Ollama's). Each :class:`Option` names its type, its flag and its check.
    own_options: ClassVar[dict[str, "Option"]] = {}
    #: the environment variable holding this backend's API key (``None``: it takes none).
    #: ``%subchat key ID`` asks for it, and its value is masked wherever text is shown,
    #: sent or stored.
    key_env: ClassVar[str | None] = None
    #: requests a batch keeps in flight by default (``--concurrency``)
    concurrency: ClassVar[int] = 4
    #: the kinds of :class:`~subchat_magics.structured.Constraint` this backend enforces
    #: while generating (``json``, ``choice``, ``regex``); others only with best effort
    constraints: ClassVar[tuple[str, ...]] = ()
    #: whether this backend can offer tools to the model (``GenerationOptions.tools``)
    supports_tools: ClassVar[bool] = False

    def available(self) -> Availability:
        """Whether ``auto`` selection may use this backend now, and why (not)."""
        return Availability(True, "ready")

    def configured(self) -> Availability:
        """Whether this backend is set up to be tried at all (an SDK installed, a model
        loaded, a key present), answered without asking any server. A backend asked for by
        name that is not is refused before anything is stored. Defaults to
        :meth:`available`; a backend whose ``available`` asks a server overrides it."""
        return self.available()

    def default_model(self) -> str | None:
        return None

    def check_options(self, options: GenerationOptions) -> None:
        """Refuse, before anything is stored, an own option this backend does not take or
        a value it cannot use (:attr:`own_options`)."""
        for name, value in (options.extra or {}).items():
            spec = self.own_options.get(name)
            if spec is None:
                takes = ", ".join(o.flag for o in self.own_options.values()) or "none"
                raise InvalidInput(f"the {self.id} backend does not take {flag_of(name)} "
                                   f"(its own options: {takes})")
            spec.check(value)

    def check_settings(self) -> None:
        """Refuse, before anything is stored, a setting this backend would read and could
        not use (``SUBCHAT_TIMEOUT``, a host…), without asking any server."""

    def cannot_enforce(self, options: GenerationOptions) -> str | None:
        """Why this backend cannot enforce ``options.constraint`` while generating (one
        clause, said before anything is sent), or None when it can or there is none.
        The default reads :attr:`constraints`; backends whose answer depends on the model
        or the server override it."""
        c = options.constraint
        if c is None or c.kind in self.constraints:
            return None
        return f"the {self.id} backend cannot enforce {c} while generating"

    def cannot_call_tools(self, options: GenerationOptions) -> str | None:
        """Why this backend cannot offer ``options.tools`` (one clause, said before anything
        is sent), or None. Reads :attr:`supports_tools`; backends whose answer depends on
        the model override it."""
        if not options.tools or self.supports_tools:
            return None
        return f"the {self.id} backend cannot call tools"

    def count_tokens(self, text: str, options: GenerationOptions) -> int | None:
        """How many tokens ``text`` takes in a reply, where the backend can count them
        exactly (a tokenizer at hand); None: it cannot say."""
        return None

    def prompt_tokens(self, messages: Sequence[Message], options: GenerationOptions) -> int | None:
        """The tokens ``messages`` take as the prompt this backend would send (its chat
        template and tokenizer), where it can count them exactly; None: it cannot say
        (``--estimate`` then estimates them, and says so)."""
        return None

    def kv_budget(self) -> dict[str, int | None] | None:
        """The KV cache of an engine in this process (``kv_tokens``, ``max_model_len``,
        ``max_num_seqs``, ``rows_in_flight``); None for a server's (not known here)."""
        return None

    def stream(self, messages: Sequence[Message], options: GenerationOptions) -> Iterator[str | Finish]:
        raise NotImplementedError

    def open_pool(self, size: int, deltas: bool = True) -> Pool:
        """The pool several requests stream through (:mod:`.pool`): by default ``size``
        threads each reading one request's :meth:`stream` (remote servers batch on their
        side); a backend that batches natively (vLLM's engine) returns its own.
        ``deltas=False``: each request may come back whole (nobody reads it as it comes)."""
        return ThreadPool(self, size)

    def stream_batch(
        self, requests: Sequence[tuple[Sequence[Message], GenerationOptions]]
    ) -> Iterator[BatchEvent]:
        """Several requests at once, through :meth:`open_pool`. Yields ``(index, item)``
        where item is a delta, the request's :class:`Finish`, or the exception that ended
        it. Closing it stops every request (their counts: :func:`cut_finish`)."""
        requests = list(requests)

        def run(stream: Stream) -> Iterator[BatchEvent]:
            pool = self.open_pool(max(1, min(len(requests), self.concurrency)))
            open_ = set(range(len(requests)))
            try:
                pool.submit_many([(i, m, o) for i, (m, o) in enumerate(requests)])
                while open_:
                    ev = pool.next_event(0.05)
                    if ev is None:
                        continue
                    index, item = ev
                    if item is END:
                        open_.discard(index)
                        continue
                    yield index, item
            finally:
                pool.close()
                for index in range(len(requests)):
                    cut = pool.cut_finish(index)
                    if cut is not None:
                        stream.cut[index] = cut

        return Stream(run)

    def close(self) -> None:
        """Release clients, sockets, engines."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} id={self.id!r}>"


def collect(items: Iterable[str | Finish]) -> tuple[str, Finish]:
    """Drain a stream into ``(text, finish)`` (for tests and simple callers)."""
    parts: list[str] = []
    finish = Finish()
    for item in items:
        if isinstance(item, Finish):
            finish = item
        else:
            parts.append(item)
    return "".join(parts), finish


class Stream:
    """A backend's stream that can still tell, once cut, what the part that ran cost.

    ``Stream(run)`` calls ``run(stream)``, a generator function, lazily (nothing runs
    before the first ``next``, as with a plain generator), and iterates it. A reply cut
    before its :class:`Finish` (closed, interrupted, failed, the model unloaded) cannot
    yield one; the generator records it instead in ``stream.cut[index]`` (index 0 for
    :meth:`Backend.stream`, the request's index for :meth:`Backend.stream_batch`), and
    the caller reads it with :func:`cut_finish` after closing the stream."""

    def __init__(self, run: Callable[["Stream"], Iterator[Any]]):
        self.cut: dict[int, Finish] = {}
        self._gen = run(self)

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> Any:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()


def cut_finish(stream: Any, index: int = 0) -> Finish | None:
    """The :class:`Finish` a cut stream recorded for request ``index`` (what the part that
    ran cost), or None: the stream ended with its own Finish, or its backend cannot say
    (a plain generator). Read it after ``stream.close()``."""
    cut = getattr(stream, "cut", None)
    return cut.get(index) if isinstance(cut, dict) else None
