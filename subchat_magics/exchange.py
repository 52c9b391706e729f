"""The exchange: the one rule at the centre of the product, in one room.

**Checked, then stored, then streamed.** :func:`plan` checks everything a request will use
before anything is written: the generation options, the chosen backend's own options (a
typed, closed set each backend declares: ``--num-ctx`` is Ollama's, and refused on echo),
the settings it will read (``SUBCHAT_TIMEOUT``, hosts…), whether it is set up, whether it
can keep the constraint. It picks the backends to try (under ``auto``: every available one
that passes those checks, in order) and returns a :class:`Plan`.

An :class:`Exchange` is one message into one chat and its reply, with public steps:
:meth:`~Exchange.begin` (the user message and an empty reply row, one commit),
:meth:`~Exchange.feed` (a delta or the backend's :class:`Finish`), :meth:`~Exchange.end`
(validate and store the reply with its provenance) and :meth:`~Exchange.fail` (keep what
arrived, marked). A :class:`Runner` drives any number of exchanges through one pool API
(:mod:`subchat_magics.backends.pool`): one reply is a pool of one streamed in the caller's
thread, a fan-out or a batch the backend's own pool (vLLM: the engine) or threads. Under
``auto`` a backend that fails before the first token of any exchange of the run is passed
over for the next one — the same rule for one reply, a fan-out and a batch.

A chat takes one reply at a time (:meth:`Busy.claim`): a second exchange into a chat with
a reply streaming is refused, from a cell, the tree view or the Python API alike.

Imports the tree and the backends; never the session, the faces or IPython.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

from .backends.base import Backend, Finish, GenerationOptions
from .backends.pool import END, Pool, open_pool
from .backends.registry import Selection, registry
from .errors import BackendError, BackendUnavailable, InvalidInput, SubchatError
from .secrets import redact
from .structured import InvalidOutput

if TYPE_CHECKING:
    from .tree import Chat, ChatTree, Message

SAVE_EVERY_S = 2.0  # while streaming, the partial reply is written this often
PARTIAL = "\ufffd"  # what a character cut mid-way decodes to
RATE_LIMIT_WAIT_S = 5.0  # a batch's pause for a rate limit that does not say how long
CONFIG_SYSTEM = "%config SubchatMagics.system_prompt"


# -- the prompt in force ---------------------------------------------------------------------------
def system_in_force(tree: "ChatTree", chat: "Chat",
                    default_system: str | None = None) -> tuple[str | None, str]:
    """(the system prompt sent with ``chat``, where it comes from): ``own``, the path of
    the ancestor that sets it, ``%config SubchatMagics.system_prompt``, or ``none``. The
    one resolver: the turn, ``show``, ``system``, exports and the tree view all ask it."""
    for c in reversed(tree.lineage(chat)):
        if c.system_prompt:
            return c.system_prompt, "own" if c.id == chat.id else c.path
    if default_system:
        return default_system, CONFIG_SYSTEM
    return None, "none"


def context(tree: "ChatTree", chat: "Chat", text: str | None,
            default_system: str | None = None) -> list[dict[str, str]]:
    """The messages a backend receives for ``text`` sent into ``chat``: the prompt in force
    first (the tree's, else the configured one), the path from the root, the message."""
    bases = tree.__dict__.get("_context_bases")  # (a batch's rows: see contexts_known)
    base = bases.get(chat.id) if bases and text is not None else None
    if base is not None:
        messages = [*base, {"role": "user", "content": text}]
    else:
        messages = tree.context(chat, text)
    if default_system and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": default_system})
    return messages


@contextmanager
def contexts_known(tree: "ChatTree", bases: dict[int, list[dict[str, str]]],
                   systems: dict[int, tuple[str | None, str]] | None = None) -> Iterator[None]:
    """While inside, :func:`context` of a chat in ``bases`` is that base and the message,
    without reading the store: a batch's row chats, which the batch knows hold no
    message yet (it claims each in the transaction that stores its message, and skips one
    that got a message meanwhile), share their batch chat's context, read once.
    ``systems``: ``{chat.id: (system prompt, source)}`` of those chats as
    :func:`system_in_force` gives it without the configured prompt (``(None, "none")``
    where no chat sets one), found once for the batch, not by walking each row's lineage."""
    held = tree.__dict__.get("_context_bases"), tree.__dict__.get("_context_systems")
    tree.__dict__["_context_bases"] = bases
    tree.__dict__["_context_systems"] = systems
    try:
        yield
    finally:
        tree.__dict__["_context_bases"], tree.__dict__["_context_systems"] = held


# -- checks ----------------------------------------------------------------------------------------
def check_text(text: str | None, what: str) -> None:
    """Refuse text the store cannot hold (an unpaired surrogate), before anything is written."""
    if text is None:
        return
    if not isinstance(text, str):
        raise InvalidInput(f"{what} must be text, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(
            f"{what} holds {exc.object[exc.start:exc.end]!a} (an unpaired surrogate, not valid "
            "Unicode); remove that character and run it again") from None


def check_prompt(text: str) -> None:
    if not isinstance(text, str):
        raise InvalidInput(f"the message must be text (a str), not {type(text).__name__}")
    if not text.strip():
        raise InvalidInput("the message is empty; write the prompt in the cell body")
    check_text(text, "the message")


def check_backend_name(name: str, source: str = "backend") -> str:
    n = str(name).strip().lower()
    known = ["auto", *registry().names()]
    if n not in known:
        raise InvalidInput(
            f"unknown backend {name!r} (from {source}); choose one of: {', '.join(known)}")
    return n


def check_for(backend: Backend, opts: GenerationOptions) -> None:
    """Everything ``backend`` will use for ``opts``, checked without asking any server:
    its own options (a closed set: one it does not take is refused), their values, and
    the settings it reads. Raises :class:`InvalidInput` with the fix."""
    backend.check_options(opts)
    backend.check_settings()


def check_model(backend: Backend, model: str | None, source: str = "--model") -> None:
    """Refuse, before anything is stored, a model ``backend`` does not serve: vLLM in this
    kernel serves the model it loaded; a server that lists its models (``models()``:
    Ollama, OpenAI-compatible, Groq) is asked once (a server that cannot be reached is
    refused here too, with its own message). A backend that lists none (echo) takes any."""
    if not model:
        return
    if backend.id == "vllm":
        loaded = backend.default_model()
        if loaded and model not in (loaded, loaded.rstrip("/").rpartition("/")[2]):
            raise InvalidInput(f"vllm does not serve the model {model!r} (from {source}): this "
                               f"kernel has {loaded} loaded; name it, or compare another backend")
        return
    listing = getattr(backend, "models", None)
    if not callable(listing):
        return
    served = list(listing())
    if model in served or f"{model}:latest" in served:
        return
    raise InvalidInput(f"{backend.id} does not serve the model {model!r} (from {source}); it "
                       f"serves: {', '.join(served[:20]) or 'none'}"
                       + (" …" if len(served) > 20 else ""))


def check_constraint(first: Backend, opts: GenerationOptions) -> None:
    """Refuse a constraint ``first`` cannot enforce (unless best effort) and a ``--choice``
    that ``max_tokens`` cannot spell."""
    c = opts.constraint
    if c is None:
        return
    why = first.cannot_enforce(opts)
    if why and not c.best_effort:
        raise InvalidInput(f"{why}; add --best-effort to send it anyway and validate the reply")
    if c.kind == "choice":
        need = {x: first.count_tokens(x, opts) or 1 for x in c.choices}
        longest = max(need, key=lambda x: need[x])
        if opts.max_tokens < need[longest]:
            raise InvalidInput(f"--max-tokens {opts.max_tokens} is too few to write the choice "
                               f"{longest!r} ({need[longest]} tokens on {first.id}); give at "
                               f"least --max-tokens {need[longest]}")


def check_tools(backend: Backend, opts: GenerationOptions) -> None:
    """Refuse tools ``backend`` cannot offer (or a model that cannot call them)."""
    why = backend.cannot_call_tools(opts) if opts.tools else None
    if why:
        raise InvalidInput(f"{why}; use a backend that can (vllm, ollama, openai, groq, echo)")


def _fits(backend: Backend, opts: GenerationOptions) -> bool:
    """Whether a fallback under ``auto`` can take this request as it is."""
    try:
        check_for(backend, opts)
        check_tools(backend, opts)
        c = opts.constraint
        return c is None or c.best_effort or backend.cannot_enforce(opts) is None
    except SubchatError:
        return False


def choose(requested: "str | Backend", opts: GenerationOptions | Sequence[GenerationOptions]
           ) -> Selection:
    """The backends a request goes to, every check passed. ``requested`` is a backend id,
    ``auto``, or a backend object (a plugin's instance, used as if asked for by name). A backend asked for by name must be set up (a model loaded, a key, the SDK)
    and take every option; under ``auto`` the first available one must, and the fallbacks
    that cannot are dropped."""
    many = list(opts) if isinstance(opts, (list, tuple)) else [opts]
    selection = (Selection(requested.id, [requested]) if isinstance(requested, Backend)
                 else registry().select(requested))
    if not selection.explicit and any(o.tools for o in many):
        # with tools, ``auto`` passes over the backends that cannot offer them
        able = [b for b in selection.candidates
                if all(b.cannot_call_tools(o) is None for o in many)]
        if able:
            gone = [(b.id, "cannot call tools") for b in selection.candidates if b not in able]
            selection = Selection(selection.requested, able, selection.passed_over + gone)
    if not selection.candidates:
        raise BackendUnavailable("no backend is available; "
                                 + "; ".join(f"{n}: {r}" for n, r in selection.passed_over))
    first, *rest = selection.candidates
    if selection.explicit:
        ready = first.configured()
        if not ready.ok:
            raise BackendUnavailable(ready.reason)
    for o in many:
        check_for(first, o)
        check_tools(first, o)
        check_constraint(first, o)
    rest = [b for b in rest if all(_fits(b, o) for o in many)]
    return Selection(selection.requested, [first, *rest], selection.passed_over)


@dataclass
class Plan:
    """A checked request: the backends to try (in order) and the options of each exchange."""

    selection: Selection
    options: list[GenerationOptions]

    @property
    def backend(self) -> Backend:
        return self.selection.candidates[0]


def plan(requested: "str | Backend", options: GenerationOptions | Sequence[GenerationOptions]) -> Plan:
    """Check a request before anything is written (see :func:`choose`)."""
    many = list(options) if isinstance(options, (list, tuple)) else [options]
    for o in many:
        check_text(o.model, "the model name")
    return Plan(choose(requested, many), many)


# -- one reply per chat ----------------------------------------------------------------------------
class Busy:
    """The chats of one tree with a reply streaming now (per tree object: every face of a
    kernel shares its session's tree). :meth:`claim` refuses a second reply into a chat."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, "Exchange"] = {}

    def check(self, chats: Iterable["Chat"]) -> None:
        with self._lock:
            for chat in chats:
                if chat.id in self._held:
                    raise InvalidInput(
                        f"a reply is streaming into {chat.path} now; stop it (Ctrl-C, or Stop in "
                        "the tree view) or wait for it, then send again")

    def claim(self, exchange: "Exchange") -> None:
        with self._lock:
            if exchange.chat.id in self._held and self._held[exchange.chat.id] is not exchange:
                raise InvalidInput(
                    f"a reply is streaming into {exchange.chat.path} now; stop it (Ctrl-C, or "
                    "Stop in the tree view) or wait for it, then send again")
            self._held[exchange.chat.id] = exchange

    def release(self, exchange: "Exchange") -> None:
        with self._lock:
            if self._held.get(exchange.chat.id) is exchange:
                del self._held[exchange.chat.id]

    def holds(self, chat_id: int) -> bool:
        return chat_id in self._held


def busy(tree: "ChatTree") -> Busy:
    """The :class:`Busy` of ``tree`` (made on first use)."""
    held = tree.__dict__.get("_busy_chats")
    if held is None:
        held = tree.__dict__.setdefault("_busy_chats", Busy())
    return held


# -- one exchange ----------------------------------------------------------------------------------
class Exchange:
    """One message into one chat and its reply. Built after :func:`plan`; ``begin`` stores
    the message, ``feed``/``end``/``fail`` take the stream and store the reply.

    ``messages`` is what the backend receives (the context from the root and the message);
    ``provenance`` is recorded with the reply, beside what the backend reports."""

    def __init__(self, tree: "ChatTree", chat: "Chat", text: str | None,
                 options: GenerationOptions, *, default_system: str | None = None,
                 follow_up: bool = False):
        self.tree = tree
        self.chat = chat
        self.text_sent = text
        self.options = options
        #: no new user message: the reply answers what the chat ends with (a tool loop's
        #: next round, after the tool results); ``text`` is None
        self.follow_up = follow_up
        self.messages = context(tree, chat, None if follow_up else text, default_system)
        self.provenance: dict[str, Any] = {}
        known = tree.__dict__.get("_context_systems")  # (a batch's rows: see contexts_known)
        pair = known.get(chat.id) if known else None
        if pair is None:
            system, source = system_in_force(tree, chat, default_system)
        elif pair[0] or not default_system:
            system, source = pair
        else:
            system, source = default_system, CONFIG_SYSTEM
        if system:  # what was sent, in the reply's provenance
            self.provenance["system_from"] = source
            if source == CONFIG_SYSTEM:  # not in the tree: keep the text itself
                self.provenance["system_prompt"] = system
        self.parts: list[str] = []
        self.notes: list[str] = []
        self.backend: Backend | None = None
        self.finish: Finish | None = None
        self.error: BaseException | None = None
        self.value: Any = None  # the parsed reply under a constraint
        self.user_message: "Message | None" = None
        self.reply: "Message | None" = None
        self.reply_row: "Message | None" = None
        self._t0 = 0.0
        self._ttft: float | None = None
        self.whole = False  # it came back whole (no token-by-token arrival to time)
        self._saved_at = 0.0

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def begun(self) -> bool:
        return self.reply_row is not None

    # what a view reads of a reply streaming (as of a Turn): a batch's, a vote's and a
    # comparison's replies stream as exchanges
    @property
    def done(self) -> bool:
        return self.reply is not None

    @property
    def provenance_extra(self) -> dict[str, Any]:
        return self.provenance

    def begin(self, backend: Backend) -> None:
        """Store the user message and an empty reply row (marked interrupted until it
        ends); :meth:`announce` tells the listeners once that is committed."""
        busy(self.tree).claim(self)
        self.backend = backend
        try:
            if self.follow_up:
                self.reply_row = self.tree.begin_reply(self.chat, backend.id)
            else:
                self.user_message, self.reply_row = self.tree.begin_turn(
                    self.chat, self.text_sent, backend.id)
        except BaseException:
            self.abandon()
            raise
        self._t0 = self._saved_at = time.perf_counter()

    @staticmethod
    def begin_many(exchanges: Sequence["Exchange"], backend: Backend) -> None:
        """:meth:`begin` for many exchanges of one tree (a batch's rows): their messages
        and reply rows stored by one store call. The caller holds the transaction."""
        plain = [ex for ex in exchanges if not ex.follow_up]
        if len(plain) < 2:
            for ex in exchanges:
                ex.begin(backend)
            return
        tree = plain[0].tree
        held = busy(tree)
        try:
            for ex in plain:
                held.claim(ex)
                ex.backend = backend
            pairs = tree.begin_turns([(ex.chat, ex.text_sent) for ex in plain], backend.id)
        except BaseException:
            for ex in plain:
                ex.abandon()
            raise
        now = time.perf_counter()
        for ex, (user, reply) in zip(plain, pairs):
            ex.user_message, ex.reply_row = user, reply
            ex._t0 = ex._saved_at = now
        for ex in exchanges:
            if ex.follow_up:
                ex.begin(backend)

    def announce(self) -> None:
        self.tree.emit("reply-start", id=self.chat.id, path=self.chat.path, turn=self)

    def abandon(self) -> None:
        """Forget a begin whose commit did not happen (a full disk): nothing was stored."""
        self.user_message = self.reply_row = None
        busy(self.tree).release(self)

    def restart(self, backend: Backend, note: str) -> None:
        """Hand the exchange to a fallback backend before its first token."""
        self.backend = backend
        self.notes.append(note)
        self.finish = None
        self._t0 = time.perf_counter()

    def feed(self, item: "str | Finish") -> str | None:
        """Take one item of the backend's stream; returns the delta to show, if any.
        Runs once per chunk, so it does the least it can."""
        if item.__class__ is not str:
            if isinstance(item, Finish):
                self.finish = item
                self.notes.extend(item.extra.get("notes", ()))
            return None
        if not item:
            return None
        now = perf_counter()
        if self._ttft is None:
            self._ttft = now - self._t0
        self.parts.append(item)
        tree = self.tree
        if tree.has_listeners:  # build the event only for someone listening (an open view)
            tree.emit("reply-delta", id=self.chat.id, path=self.chat.path, turn=self, delta=item)
        # a killed kernel keeps most of the reply; one that came back whole is stored by
        # its Finish, handed over right after it (an UPDATE a row before it was wasted)
        if now - self._saved_at >= SAVE_EVERY_S and not self.whole:
            self._saved_at = now
            tree.store.update_reply(self.reply_row.id, self.text, "interrupted")  # type: ignore[union-attr]
        return item

    def fail(self, exc: BaseException, cut: Finish | None = None) -> BaseException:
        """Store what arrived, marked (``interrupted`` or ``error: reason``); returns the
        exception to raise for ``exc`` (keys redacted)."""
        self.finish = self.finish or cut
        self.error = exc
        if isinstance(exc, (KeyboardInterrupt, GeneratorExit)):
            self.end("interrupted", "interrupted")
            return exc
        if isinstance(exc, BackendError):
            self.end("error", f"error: {exc.reason}")
            return BackendError(redact(str(exc)), reason=exc.reason, retry_after=exc.retry_after)
        if isinstance(exc, SubchatError):
            self.end("error", f"error: {type(exc).__name__}")
            return exc
        name = self.backend.id if self.backend else "backend"
        self.end("error", f"error: {type(exc).__name__}")
        return BackendError(redact(f"{name} failed: {type(exc).__name__}: {exc}"), reason="backend")

    def end(self, status: str = "complete", finish_reason: str | None = None,
            cut: Finish | None = None) -> None:
        """Store the reply (once): validated against the constraint when it completed."""
        if self.reply is not None or self.reply_row is None:
            return
        self.finish = self.finish or cut
        if finish_reason is None:
            finish_reason = (self.finish.reason if self.finish else None) or "stop"
        if finish_reason == "length" and self.parts and self.parts[-1].endswith(PARTIAL):
            # stopped at max tokens inside a character: its bytes decode to U+FFFD, which
            # is no text the model wrote (nor counted as such by a constraint)
            self.parts = [self.text.rstrip(PARTIAL)]
            self.notes.append("it stopped at max tokens inside a character; that "
                              "character's undecodable bytes (U+FFFD) were left out")
        if (status == "complete" and self.options.constraint is not None
                and not (self.finish and self.finish.tool_calls)):  # binds the answer only
            status, finish_reason = self._validate(finish_reason)
        try:
            self._store(status, finish_reason, time.perf_counter() - self._t0)
        finally:
            busy(self.tree).release(self)

    def _enforced(self) -> bool:
        try:
            return self.backend is not None and self.backend.cannot_enforce(self.options) is None
        except SubchatError:
            return False

    def _validate(self, finish_reason: str) -> tuple[str, str]:
        try:
            self.value = self.options.constraint.parse(self.text)  # type: ignore[union-attr]
        except InvalidOutput as exc:
            why = str(exc) + ("; it stopped at max tokens" if finish_reason == "length" else "")
            self.error = InvalidOutput(f"invalid output ({why})")
            return "error", f"error: invalid output ({why})"
        return "complete", finish_reason

    def _store(self, status: str, finish_reason: str, duration: float) -> None:
        f = self.finish or Finish()
        b = self.backend
        prov: dict[str, Any] = {
            "backend": b.id if b else None,
            "model": f.model or self.options.model or (b.default_model() if b else None),
            "prompt_tokens": f.prompt_tokens,
            "completion_tokens": f.completion_tokens,
            "cached_tokens": f.cached_tokens,
            # a reply that came back whole has no first-token time to tell (not its duration)
            "ttft_s": round(self._ttft, 6) if self._ttft is not None and not self.whole else None,
            "duration_s": round(duration, 6),
            "finish_reason": finish_reason,
        }
        if status == "error" and self.error is not None:
            prov["error"] = redact(str(self.error))[:500]
        if self.notes:
            prov["notes"] = list(self.notes)
        if f.tool_calls:  # the reply called tools instead of answering
            prov["tool_calls"] = [call.to_dict() for call in f.tool_calls]
        if self.options.tools:  # what the model was offered (exports carry them)
            prov["tools"] = [t.spec() for t in self.options.tools]
        c = self.options.constraint
        if c is not None:  # what the reply had to be, and whether the backend enforced it
            prov["constraint"] = dict(c.provenance(), enforced=self._enforced())
        if f.extra:
            prov.update({k: v for k, v in f.extra.items() if k not in prov})
        prov.update({k: v for k, v in self.provenance.items() if k not in prov})
        prov = {k: v for k, v in prov.items() if v is not None}
        self.reply = self.tree.finish_reply(self.chat, self.reply_row, self.text, status, prov)
        self.tree.emit("reply-end", id=self.chat.id, path=self.chat.path, turn=self,
                       message=self.reply)


# -- the runner ------------------------------------------------------------------------------------
class InlinePool(Pool):
    """A pool of one: the request's ``backend.stream`` read in the caller's thread (one
    reply needs no thread; Ctrl-C lands in the read and closes the stream at once)."""

    size = 1

    def __init__(self, backend: Backend):
        self.backend = backend
        self._gen: Any = None
        self._index = 0
        self._cut: dict[int, Finish] = {}
        self._end_due = False
        self._pending: Any = None  # the event texts() stopped at, for next_event

    def submit(self, index: int, messages: Sequence[Any], options: GenerationOptions) -> None:
        if self._gen is not None:
            raise SubchatError("a pool of one takes one request")
        self._index = index
        self._gen = self.backend.stream(messages, options)

    def texts(self) -> Iterator[str]:
        """The stream's items while they are text: the fast path of one reply (no event
        tuple per chunk). The first other item, the end or an exception is kept for
        :meth:`next_event`, which hands it on as it would have."""
        gen = self._gen
        if gen is None or self._pending is not None:
            return
        try:
            for item in gen:
                if item.__class__ is not str:
                    self._pending = (self._index, item)
                    return
                yield item
        except (KeyboardInterrupt, GeneratorExit):
            raise
        except BaseException as exc:
            self._finish_gen()
            self._end_due = True  # (the exception, then the end, as next_event gives them)
            self._pending = (self._index, exc)
            return
        self._finish_gen()
        self._pending = (self._index, END)

    def next_event(self, timeout: float = 0.05) -> Any:
        pending = self._pending
        if pending is not None:
            self._pending = None
            return pending
        gen = self._gen
        if gen is None:
            if self._end_due:
                self._end_due = False
                return self._index, END
            return None
        try:
            return self._index, next(gen)
        except StopIteration:
            self._finish_gen()
            return self._index, END
        except BaseException as exc:
            if isinstance(exc, (KeyboardInterrupt, GeneratorExit)):
                raise
            self._finish_gen()
            self._end_due = True  # (the exception, then the end, as from any pool)
            return self._index, exc

    def _finish_gen(self) -> None:
        gen, self._gen = self._gen, None
        if gen is not None:
            gen.close()
            cut = getattr(gen, "cut", None)
            if isinstance(cut, dict) and 0 in cut:
                self._cut[self._index] = cut[0]

    def cut_finish(self, index: int) -> Finish | None:
        return self._cut.get(index)

    def close(self) -> None:
        self._finish_gen()


class Runner:
    """Drives exchanges through one pool: submit, then take events until every exchange
    has ended. ``single``: the one exchange is read in the caller's thread; otherwise the
    backend's own pool (vLLM's engine) or ``size`` threads.

    Under ``auto`` (``selection`` not explicit), while no exchange of the run has received
    anything, a backend that fails with a :class:`BackendError` is passed over for the next
    candidate, and every exchange in flight is resent there (the reply says so).

    ``pause_s`` (a batch): a rate limit (429) that an exchange met before its first token,
    once the backend's own retries are spent, pauses the run for the time the server asks
    (:attr:`paused`: the caller sends nothing new meanwhile) and then resends the exchange,
    up to ``pause_s`` seconds of pauses in all; past that the exchange fails as usual."""

    def __init__(self, selection: Selection, *, size: int = 1, single: bool = False,
                 stream_deltas: bool = True, on_end: Callable[[Exchange], None] | None = None,
                 join_s: float = 0.0, pause_s: float = 0.0):
        self.selection = selection
        self.candidates = list(selection.candidates)
        self.backend = self.candidates[0]
        self.size = max(1, int(size))
        self.single = single
        self.stream_deltas = stream_deltas
        self.on_end = on_end
        self.join_s = join_s  # how long close() waits for the pool's threads to end
        self.flying: dict[int, Exchange] = {}
        self.first_error: BaseException | None = None
        self._next_index = 0
        self._pool: Pool | None = None
        self._heard = False  # anything received from the backend in this run
        self.handled = False  # whether the last step handled an event
        self._reported: set[Exchange] = set()  # exchanges on_end was called with
        self.pause_left_s = max(0.0, float(pause_s))  # rate-limit pauses still allowed
        self.paused_s = 0.0  # seconds paused so far
        self.pauses = 0
        self.resume_at = 0.0  # perf_counter time the pause ends
        self._held: dict[int, Exchange] = {}  # rate-limited, resent when the pause ends

    def _open(self) -> Pool:
        if self._pool is None:
            self._pool = (InlinePool(self.backend) if self.single
                          else open_pool(self.backend, self.size, deltas=self.stream_deltas))
        return self._pool

    @property
    def in_flight(self) -> int:
        return len(self.flying)

    @property
    def paused(self) -> float:
        """Seconds left of a rate-limit pause (0: not paused)."""
        return max(0.0, self.resume_at - perf_counter()) if self._held else 0.0

    def _hold(self, index: int, exc: BackendError) -> bool:
        """Hold a rate-limited exchange until the pause ends, if the budget allows."""
        wait = exc.retry_after if exc.retry_after is not None else RATE_LIMIT_WAIT_S
        now = perf_counter()
        extra = max(0.0, now + wait - max(self.resume_at, now))  # beyond the pause on now
        if extra > self.pause_left_s:
            return False
        if self.resume_at <= now:
            self.pauses += 1
        self.pause_left_s -= extra
        self.paused_s += extra
        self.resume_at = max(self.resume_at, now + wait)
        self._held[index] = self.flying[index]
        return True

    def _resume(self) -> None:
        """The pause is over: resend the held exchanges (the same stored message)."""
        held = [self.flying.pop(i) for i in list(self._held)]
        self._held.clear()
        for ex in held:
            ex.restart(self.backend, "rate-limited before its first token; sent again after "
                                     "the batch paused")
        self.submit(held)

    def begin(self, exchanges: Sequence[Exchange]) -> None:
        """Store the exchanges' messages (one commit) without sending them yet; a commit
        that fails (a full disk) leaves no exchange claiming its chat."""
        if not exchanges:
            return
        try:
            with exchanges[0].tree.store.transaction():
                Exchange.begin_many(exchanges, self.backend)
        except BaseException:
            for ex in exchanges:
                ex.abandon()
            raise
        for ex in exchanges:
            ex.announce()

    def submit(self, exchanges: Sequence[Exchange]) -> None:
        """Send begun exchanges, together (an engine adds them before its next step)."""
        pool = self._open()
        whole = getattr(pool, "comes_whole", None) or (lambda options: False)  # (a plugin's pool)
        batch = []
        for ex in exchanges:
            index = self._next_index
            self._next_index += 1
            self.flying[index] = ex
            ex.whole = whole(ex.options)
            batch.append((index, ex.messages, ex.options))
        pool.submit_many(batch)

    def submit_samples(self, exchanges: Sequence[Exchange]) -> None:
        """Send begun exchanges that are samples of one message (``--vote K``: the same
        messages, options that differ only in the seed) as one group: on vLLM one engine
        request of K samples (the prompt computed once), elsewhere K requests in flight."""
        pool = self._open()
        whole = getattr(pool, "comes_whole", None) or (lambda options: False)
        indices = []
        for ex in exchanges:
            index = self._next_index
            self._next_index += 1
            self.flying[index] = ex
            ex.whole = whole(ex.options)
            indices.append(index)
        pool.submit_samples(indices, exchanges[0].messages, [ex.options for ex in exchanges])

    def events(self, timeout: float = 0.05) -> Iterator[tuple[Exchange, str]]:
        """Every delta as ``(exchange, delta)`` until no exchange is in flight; an exchange
        that ends is stored (``on_end`` is called with it)."""
        while self.flying:
            item = self.step(timeout)
            if item is not None:
                yield item

    def step(self, timeout: float = 0.05) -> tuple[Exchange, str] | None:
        """Handle one event of the pool: a delta is returned with its exchange; a finish,
        an error or the end of a request stores the reply. None after ``timeout`` seconds
        without an event, or for an event that is not a delta."""
        pool = self._open()
        if self._held and perf_counter() >= self.resume_at:
            self._resume()
        ev = pool.next_event(timeout)
        self.handled = ev is not None
        if ev is None:
            return None
        index, item = ev
        ex = self.flying.get(index)
        if ex is None or index in self._held:
            return None
        if item is END:
            del self.flying[index]
            if ex.reply is None:  # a stream that ended without its Finish
                ex.end(cut=pool.cut_finish(index))
                self._ended(ex)
            return None
        if ex.reply is not None:
            return None
        if isinstance(item, BaseException):
            if (not self._heard and isinstance(item, BackendError)
                    and not self.selection.explicit and len(self.candidates) > 1):
                self._fall_back(item)
                return None
            if (self.pause_left_s and isinstance(item, BackendError) and not ex.parts
                    and item.reason == "rate-limit" and self._hold(index, item)):
                return None
            error = ex.fail(item, pool.cut_finish(index))
            self.first_error = self.first_error or error
            self._ended(ex)
            return None
        self._heard = True
        delta = ex.feed(item)
        if item.__class__ is not str:  # a Finish
            ex.end()
            self._ended(ex)
            return None
        return (ex, delta) if delta else None

    def texts(self) -> Iterator[str]:
        """A pool of one (``single``): the exchange's text deltas straight from its stream,
        each fed to it as :meth:`step` feeds it, until the stream yields anything else
        (its finish, an error, its end), which the next :meth:`step` handles."""
        pool = self._pool
        if not isinstance(pool, InlinePool) or len(self.flying) != 1:
            return
        [ex] = self.flying.values()
        if ex.reply is not None:
            return
        feed = ex.feed
        for item in pool.texts():
            self._heard = True
            delta = feed(item)
            if delta:
                yield delta

    def _ended(self, ex: Exchange) -> None:
        if self.on_end is not None and ex not in self._reported:
            self._reported.add(ex)
            self.on_end(ex)

    def _fall_back(self, exc: BaseException) -> None:
        """Resend everything in flight to the next candidate."""
        failed = self.candidates.pop(0)
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self.backend = self.candidates[0]
        note = (f"{failed.id} failed before its first token ({redact(str(exc))}); "
                f"used {self.backend.id}")
        waiting = list(self.flying.values())
        self.flying.clear()
        for ex in waiting:
            ex.restart(self.backend, note)
        self.submit(waiting)

    def close(self, exc: BaseException | None = None) -> None:
        """Stop every request in flight at once; each keeps what arrived, marked as ``exc``
        says (interrupted by default)."""
        pool = self._pool
        if pool is not None:
            pool.close()
        reason = exc if exc is not None else KeyboardInterrupt()
        for index, ex in list(self.flying.items()):
            if ex.reply is None:
                ex.fail(reason, pool.cut_finish(index) if pool is not None else None)
            self._ended(ex)  # (one whose end was cut by the interrupt, too)
        self.flying.clear()
        self._held.clear()
        if pool is not None and self.join_s:
            pool.join(self.join_s)


__all__ = ["Exchange", "Runner", "Plan", "plan", "choose", "Busy", "busy", "system_in_force",
           "context", "contexts_known", "check_text", "check_prompt", "check_backend_name",
           "check_for", "check_constraint", "check_model", "CONFIG_SYSTEM", "InlinePool"]
