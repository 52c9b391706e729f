"""The Ollama backend: Ollama's HTTP API at ``OLLAMA_HOST``, spoken as the official
``ollama`` client speaks it (its errors, its request body) over one pooled ``httpx``
client, reading the NDJSON stream as plain dicts: a pydantic model built per chunk was a
sixth of the time of a streamed token.

Settings (environment, then ``./.env``): ``OLLAMA_HOST`` (default
``http://127.0.0.1:11434``), ``OLLAMA_NUM_CTX`` (the context window; else worked out per
request, see :meth:`OllamaBackend.window`), ``OLLAMA_MODEL`` (else ``--model``/``%config``, else the
most recently pulled model), ``OLLAMA_API_KEY`` for servers behind a key,
``SUBCHAT_TIMEOUT``/``SUBCHAT_CONNECT_TIMEOUT``."""

from __future__ import annotations

import json
import math
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from ..errors import BackendError, BackendUnavailable, InvalidInput
from ..prompting import fit_window, has_tool_messages
from ..secrets import mask, redact, register_secret
from ..settings import getenv
from . import _remote
from ._remote import (
    CONNECT,
    CONNECT_TIMEOUT,
    NOT_A_STREAM,
    READ_TIMEOUT,
    TRANSPORT,
    Call,
    ErrorEvent,
    Status,
    StatusError,
    Thought,
    failure,
)
from ._tool_wire import ollama_calls, ollama_messages, tool_specs
from .base import Availability, Finish, GenerationOptions, Message, Option

DEFAULT_HOST = "http://127.0.0.1:11434"
PROBE_TIMEOUT_S = 0.5
PROBE_TTL_OK_S = 10.0
PROBE_TTL_DOWN_S = 3.0  # a server started a moment ago is found a few seconds later
INSTALL_HINT = "install it with: pip install 'subchat-magics[ollama]'"
# The context window: Ollama's own default (4096 since 0.6; 2048 before) silently cuts the
# start of a longer prompt, so num_ctx is sent with every request. It grows in powers of
# two from this floor (Ollama reloads the model when num_ctx changes: steps, not every
# size), up to the model's own limit (/api/show).
MIN_NUM_CTX = 4096
BYTES_PER_TOKEN = 3.0  # no tokenizer here: UTF-8 bytes / 3 overestimates English, fits CJK
TOKENS_PER_MESSAGE = 8  # the chat template's markers around each message
SHOW_TTL_S = 300.0


def estimate_tokens(messages: Sequence[Message]) -> int:
    """Tokens ``messages`` take in a prompt, estimated without a tokenizer (on the high
    side for English text, so that a chat is cut by us, with a note, not by Ollama)."""
    return sum(TOKENS_PER_MESSAGE + math.ceil(len(str(m.get("content") or "").encode("utf-8"))
                                              / BYTES_PER_TOKEN) for m in messages) + 4


def step_num_ctx(need: int) -> int:
    """The smallest power of two >= ``need``, and at least :data:`MIN_NUM_CTX`."""
    return max(MIN_NUM_CTX, 1 << max(0, int(need) - 1).bit_length())


def check_num_ctx(value: Any, source: str) -> int:
    try:
        n = int(str(value).strip())
    except ValueError:
        n = 0
    if n < 256:
        raise InvalidInput(f"{source} must be a whole number of tokens, at least 256 (e.g. 8192), "
                           f"not {value!r}")
    return n


@dataclass
class Window:
    """The context window of one request: ``num_ctx``, the messages kept, the reply's
    ``num_predict``, and the notes that say what was dropped or lowered."""

    num_ctx: int
    messages: list[Message]
    max_tokens: int
    model_limit: int | None = None
    dropped_messages: int = 0
    notes: list[str] = field(default_factory=list)


def normalize_host(host: str | None) -> str:
    """``OLLAMA_HOST`` as the ollama client reads it: ``host``, ``host:port``, ``:port``
    or a URL; the port defaults to 11434 unless a scheme is given."""
    host = (host or "").strip()
    port = 11434
    scheme, sep, rest = host.partition("://")
    if not sep:
        scheme, rest = "http", host
    elif scheme == "http":
        port = 80
    elif scheme == "https":
        port = 443
    split = urllib.parse.urlsplit(f"{scheme}://{rest}")
    try:
        port = split.port or port
    except ValueError:
        pass
    name = split.hostname or "127.0.0.1"
    if ":" in name:
        name = f"[{name}]"
    path = split.path.rstrip("/")
    return f"{scheme}://{name}:{port}{path}"


_NO_MESSAGE: dict[str, Any] = {}


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _status(r: Any, path: str) -> StatusError:
    """An error answer, read as the ollama client reads it (``{"error": ...}`` or text)."""
    r.read()
    text = r.text
    try:
        said = json.loads(text).get("error")
        text = said if isinstance(said, str) and said else text
    except (ValueError, AttributeError):
        pass
    return StatusError(Status(r.status_code, redact(" ".join(text.split())[:300]) or
                              f"HTTP {r.status_code}", r.headers, path))


def _sdk() -> Any:
    try:
        import ollama
    except ImportError:
        raise BackendUnavailable(f"the ollama client is not installed; {INSTALL_HINT}") from None
    return ollama


def ndjson_lines(response: Any) -> Iterator[str]:
    """The lines of a streamed NDJSON body (``response``: an ``httpx`` response), each as
    text without its end; blank lines skipped, the last line kept without its end. Split
    from the body's bytes here, not by httpx's text and line decoders: they are two more
    generators a chunk, and a streamed token is one chunk (one line) of Ollama's body."""
    rest = b""
    for chunk in response.iter_bytes():
        if rest:
            chunk, rest = rest + chunk, b""
        if b"\n" not in chunk:
            rest = chunk
            continue
        *lines, rest = chunk.split(b"\n")
        for line in lines:
            if line.strip():
                yield line.decode(errors="replace")
    if rest.strip():
        yield rest.decode(errors="replace")


class OllamaBackend(_remote.RemoteBackend):
    """Streams ``/api/chat`` from an Ollama server."""

    id = "ollama"
    description = "a local Ollama server (OLLAMA_HOST)"
    extra = "ollama"
    auto_priority = 20
    constraints = ("json",)  # format: the JSON schema (it has no choice or regex option)
    own_options = {"num_ctx": Option("num_ctx", int, "the context window in tokens",
                                     lambda v: check_num_ctx(v, "--num-ctx"))}
    key_env = "OLLAMA_API_KEY"  # a key for an Ollama behind a proxy (optional)
    supports_tools = True  # ``tools`` in the request; whole calls in the stream
    url_var = "OLLAMA_HOST"
    wire = "Ollama's NDJSON"
    no_finish = "it ended without its final `done` line"

    def __init__(self) -> None:
        super().__init__()
        # host -> (Availability, model names): a server found up is asked again after
        # 10 s, one found down after 3 s
        self._probes = _remote.Memo(lambda v: PROBE_TTL_OK_S if v[0].ok else PROBE_TTL_DOWN_S)
        self._limits = _remote.Memo(SHOW_TTL_S)  # (host, model) -> context length or None

    # -- settings ------------------------------------------------------------------------------
    def check_settings(self) -> None:
        super().check_settings()
        raw = getenv("OLLAMA_NUM_CTX")
        if raw is not None and str(raw).strip():
            check_num_ctx(raw, "OLLAMA_NUM_CTX")

    def host(self) -> str:
        return normalize_host(getenv("OLLAMA_HOST") or DEFAULT_HOST)

    def default_model(self) -> str | None:
        return getenv("OLLAMA_MODEL")

    def _client(self, host: str, t: _remote.Timeouts) -> Any:
        """An ``httpx.Client`` for ``host`` with the headers the ollama client sends."""
        ollama = _sdk()
        import httpx

        headers = self._auth_headers()

        def make() -> Any:
            return httpx.Client(
                base_url=host, follow_redirects=True,
                headers={"Content-Type": "application/json", "Accept": "application/json",
                         "User-Agent": f"ollama-python/{getattr(ollama, '__version__', '0')} "
                                       "(subchat-magics)", **headers},
                timeout=httpx.Timeout(t.read, connect=t.connect))

        key = _remote.secret_digest(headers.get("authorization"))
        return self._clients.get((host, key, t), make)

    # -- availability --------------------------------------------------------------------------
    def configured(self) -> Availability:
        """Installed is enough: the server is asked when a message is sent (an
        unreachable one is recorded with the reply, as any failed attempt)."""
        if not _remote.installed("ollama"):
            return Availability(False, f"the ollama client is not installed; {INSTALL_HINT}")
        return Availability(True, "installed")

    def available(self) -> Availability:
        """The server answers ``/api/tags`` within 0.5 s and has a model pulled. The
        answer is kept a few seconds (``auto`` asks on every cell)."""
        if not _remote.installed("ollama"):
            return Availability(False, f"the ollama client is not installed; {INSTALL_HINT}")
        host = self.host()
        return self._probes.get(host, lambda: self._probe(host))[0]

    def _probe(self, host: str) -> tuple[Availability, list[str]]:
        # the standard library, so that asking costs no import of httpx or the SDK
        import http.client

        split = urllib.parse.urlsplit(host)
        conn_cls = http.client.HTTPSConnection if split.scheme == "https" else \
            http.client.HTTPConnection
        conn = conn_cls(split.hostname or "127.0.0.1", split.port, timeout=PROBE_TIMEOUT_S)
        try:
            conn.request("GET", f"{split.path}/api/tags", headers=self._auth_headers())
            r = conn.getresponse()
            body = r.read(1 << 20)
            if r.status != 200:
                return Availability(False, f"Ollama at {host} answered {r.status} to /api/tags"), []
            names = [m.get("name") or m.get("model") for m in json.loads(body).get("models", [])]
        except (OSError, http.client.HTTPException, ValueError, AttributeError) as exc:
            return Availability(False, f"no Ollama server answers at {host} "
                                       f"({_remote.detail(exc, 80)}); start `ollama serve` "
                                       "or set OLLAMA_HOST"), []
        finally:
            conn.close()
        names = [n for n in names if n]
        if not names:
            return Availability(False, f"Ollama at {host} has no model pulled; "
                                       "run `ollama pull llama3.2`"), []
        return Availability(True, f"Ollama answers at {host} ({len(names)} model"
                                  f"{'' if len(names) == 1 else 's'} pulled)"), names

    def _auth_headers(self) -> dict[str, str]:
        key = getenv("OLLAMA_API_KEY")
        register_secret(key)
        return {"authorization": f"Bearer {key}"} if key else {}

    def models(self) -> list[str]:
        """Names of the models pulled on the server (``/api/tags``), newest first."""
        _sdk()
        host = self.host()
        t = _remote.timeouts()
        client = self._client(host, t)
        try:
            r = client.get("/api/tags")
            if not r.is_success:
                raise _status(r, "/api/tags")
            listed = r.json().get("models") or []
            return [n for n in (m.get("model") or m.get("name") for m in listed) if n]
        except Exception as exc:  # noqa: BLE001 - mapped to one of our messages
            raise self.error(exc, Call(self.service(host), None, t, listing=True)) from None

    def service(self, host: str) -> str:
        return f"Ollama at {host}"

    # -- streaming -----------------------------------------------------------------------------
    def stream(self, messages: Sequence[Message], options: GenerationOptions) -> Iterator[str | Finish]:
        _sdk()
        host = self.host()
        t = _remote.timeouts()
        client = self._client(host, t)
        model = options.model or self.default_model() or self._newest_model(host)
        window = self.window(messages, options, self.context_length(client, host, model))
        sampling: dict[str, Any] = {"temperature": options.temperature, "top_p": options.top_p,
                                    "num_predict": window.max_tokens, "num_ctx": window.num_ctx}
        if options.stop:
            sampling["stop"] = list(options.stop)
        if options.seed is not None:
            sampling["seed"] = options.seed
        # thinking models think unless told otherwise: off unless asked for, as on vLLM
        extra: dict[str, Any] = {"think": bool(options.think)}
        if options.constraint is not None and options.constraint.kind == "json":
            extra["format"] = options.constraint.schema or {"type": "object"}  # the answer only
        if options.tools:
            extra["tools"] = tool_specs(options.tools)
        messages_out = ollama_messages(window.messages) if has_tool_messages(window.messages) \
            else [dict(m) for m in window.messages]
        body = {"model": model, "messages": messages_out, "stream": True,
                "options": sampling, **extra}
        said: dict[str, Any] = {"num_ctx": window.num_ctx}
        if window.notes:
            said["notes"] = list(window.notes)
        if window.dropped_messages:
            said["dropped_messages"] = window.dropped_messages
        call = Call(self.service(host), model, t, extra=said)

        def start() -> Any:
            r = client.send(client.build_request("POST", "/api/chat", json=body), stream=True)
            if not r.is_success:
                try:
                    raise _status(r, "/api/chat")
                finally:
                    r.close()
            return r

        response = self.open_with_retries(start, call)
        yield from self.relay(call, self.read(call, response))

    def read(self, call: Call, response: Any) -> Iterator[str | Thought]:
        """The text of each NDJSON line (a :class:`Thought` where it has thinking);
        ``call.finish`` from the ``done`` line. The body is read to its end, so the
        connection is reused."""
        loads = json.loads
        calls: list = []  # Ollama sends each call whole, in a message of its own
        try:
            for line in ndjson_lines(response):
                part = loads(line)
                msg = part.get("message", _NO_MESSAGE) if part.__class__ is dict else None
                if msg.__class__ is not dict:
                    raise ValueError(f"not a chat chunk: {line[:80]}")
                err = part.get("error")
                if err:
                    raise ErrorEvent(str(err))
                call.received += 1
                content, thought = msg.get("content"), msg.get("thinking")
                if content.__class__ is not str and content is not None \
                        or thought.__class__ is not str and thought is not None:
                    raise ValueError(f"not a chat chunk: {str(part)[:80]}")
                if thought:
                    yield Thought((thought, content))
                elif content:
                    yield content
                if msg.get("tool_calls"):
                    calls += ollama_calls(msg)
                if part.get("done"):
                    reason = part.get("done_reason") or "stop"
                    call.finish = Finish(reason="tool_calls" if calls and reason == "stop" else reason,
                                         model=part.get("model") or call.model,
                                         prompt_tokens=_count(part.get("prompt_eval_count")),
                                         completion_tokens=_count(part.get("eval_count")),
                                         extra=call.extra, tool_calls=calls)
        finally:
            response.close()

    # -- the context window ---------------------------------------------------------------------
    def context_length(self, client: Any, host: str, model: str) -> int | None:
        """The model's context length (``/api/show``: ``model_info["<arch>.context_length"]``),
        kept a few minutes; None where the server does not say."""

        def ask() -> int | None:
            try:
                r = client.post("/api/show", json={"model": model})
                info = r.json().get("model_info") if r.is_success else None
                if isinstance(info, dict):
                    lengths = [v for k, v in info.items() if k.endswith(".context_length")
                               and isinstance(v, int) and v > 0]
                    return lengths[0] if lengths else None
            except Exception:  # noqa: BLE001 - no limit known: the window grows with the chat
                pass
            return None

        return self._limits.get((host, model), ask)

    def window(self, messages: Sequence[Message], options: GenerationOptions,
               model_limit: int | None) -> Window:
        """``num_ctx`` for this request: ``--num-ctx`` (``options.extra["num_ctx"]``), else
        ``OLLAMA_NUM_CTX``, else the chat's estimated length plus ``max_tokens`` in powers of
        two from 4096, at most ``model_limit``. A chat that does not fit is fitted as vLLM
        fits it (the oldest turns below the system prompt dropped, or ``max_tokens``
        lowered), and the notes say so; a message that cannot fit at all is an error."""
        msgs = [dict(m) if m["role"] == "tool" or m.get("tool_calls") else
                {"role": m["role"], "content": m["content"]} for m in messages]
        max_tokens = int(options.max_tokens)
        given = (options.extra or {}).get("num_ctx")
        if given is not None:
            num_ctx = check_num_ctx(given, "--num-ctx")
        elif getenv("OLLAMA_NUM_CTX"):
            num_ctx = check_num_ctx(getenv("OLLAMA_NUM_CTX"), "OLLAMA_NUM_CTX")
        else:
            num_ctx = step_num_ctx(estimate_tokens(msgs) + max_tokens)
            if model_limit:
                num_ctx = min(num_ctx, model_limit)

        def too_long(system: list[Message], newest: list[Message]) -> str:
            both = estimate_tokens(system + newest)
            what = "the system prompt" if system and estimate_tokens(system) >= num_ctx else "the message"
            room = (f"raise --num-ctx or OLLAMA_NUM_CTX (the model allows {model_limit})"
                    if model_limit and model_limit > num_ctx else "use a model with a longer context")
            return (f"{what} is too long for the context window: ~{both} prompt tokens (estimated), "
                    f"and num_ctx is {num_ctx}; shorten {what}, or {room}")

        c = options.constraint
        need = None  # the most an answer can use (a choice's longest, a bounded regex's)
        if c is not None and not options.think and not options.tools:
            if c.kind == "choice" and c.choices:
                need = max(estimate_tokens([{"role": "assistant", "content": x}])
                           for x in c.choices) + 1
            elif c.longest_regex_match() is not None:
                need = 4 * c.longest_regex_match() + 1  # type: ignore[operator]
        fit = fit_window(msgs, max_tokens, num_ctx, lambda kept: (estimate_tokens(kept), None),
                         too_long, window="num_ctx", need=need,
                         keep_context=options.keep_context)
        notes = list(fit.notes)
        if notes:
            notes.append("token counts for Ollama are estimated (~3 bytes of text a token; "
                         "no tokenizer here)")
        return Window(num_ctx, fit.messages, fit.max_tokens, model_limit, fit.dropped_messages, notes)

    def _newest_model(self, host: str) -> str:
        hit = self._probes.peek(host)
        if hit and hit[1]:
            return hit[1][0]  # listed a moment ago by ``available()``
        names = self.models()
        if not names:
            raise failure(f"Ollama at {host} has no model pulled; run `ollama pull llama3.2` "
                          "(or another model) first", "model")
        return names[0]

    # -- how httpx names a failure, and the words ----------------------------------------------
    def failure_kind(self, exc: BaseException) -> str | None:
        import httpx

        if isinstance(exc, httpx.ConnectError) or type(exc) is ConnectionError:
            return CONNECT
        if isinstance(exc, httpx.ConnectTimeout):
            return CONNECT_TIMEOUT
        if isinstance(exc, httpx.TimeoutException):
            return READ_TIMEOUT
        if isinstance(exc, ValueError):  # a line that is not JSON, or not a chat chunk
            return NOT_A_STREAM
        if isinstance(exc, (httpx.TransportError, ConnectionError)):
            return TRANSPORT
        return super().failure_kind(exc)

    def connection_hint(self) -> str:
        return "is `ollama serve` running at that address? (set OLLAMA_HOST)"

    def connect_timeout_hint(self) -> str:
        return "is the address right? (set OLLAMA_HOST, SUBCHAT_CONNECT_TIMEOUT)"

    def not_a_stream_hint(self) -> str:
        return "is OLLAMA_HOST an Ollama server?"

    def no_reply(self, call: Call, why: str) -> BackendError:
        return failure(f"{call.service} closed the connection without a reply ({why}): is it an "
                       "Ollama server? (set OLLAMA_HOST)", "connection")

    def auth_error(self, call: Call, code: int, text: str) -> BackendError:
        return failure(f"{call.service} refused the request ({code}): {text}; set "
                       "OLLAMA_API_KEY if the server needs a key", "auth")

    def missing_model(self, call: Call, text: str) -> BackendError:
        try:
            names = self.models()
        except BackendError:
            names = None
        if names is None:
            listing = "the list of pulled models could not be read"
        else:
            listing = f"available: {_remote.list_names(names)}"
        return failure(f"model {call.model!r} is not pulled on {call.service} ({text}); {listing}. "
                       f"Run `ollama pull {call.model}` or pick one with --model / OLLAMA_MODEL",
                       "model")

    def close(self) -> None:
        super().close()
        self._probes.clear()
        self._limits.clear()

    def __repr__(self) -> str:
        key = getenv("OLLAMA_API_KEY")
        return (f"<OllamaBackend id='ollama' host={self.host()!r} model={self.default_model()!r}"
                + (f" key={mask(key)}" if key else "") + ">")
