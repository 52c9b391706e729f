"""What the HTTP backends (Ollama, Groq, OpenAI-compatible) share: timeouts, one
cached client per configuration, values kept for a while (:class:`Memo`), and the one
copy of the request machinery in :class:`RemoteBackend`: the rate-limit retry loop and
its budget, the mapping of an HTTP status or a transport failure to one clear message,
and the stream loop (thinking blocks, a finish that must arrive, the close). A backend
supplies how to open its stream and how to read one chunk. No SDK is imported here."""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, TypeVar

import cachetools

from ..errors import BackendError, BackendUnavailable, InvalidInput
from ..prompting import has_tool_messages
from ..secrets import mask, redact, register_secret
from ..settings import getenv
from ._tool_wire import DeltaCalls, openai_messages, tool_specs
from .base import Backend, Finish

T = TypeVar("T")

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0  # between two chunks (or before the first one)
RATE_LIMIT_RETRIES = 2
RATE_LIMIT_BUDGET_S = 10.0  # the most we wait, in all, for a rate limit to lift
RATE_LIMIT_DEFAULT_WAIT_S = 1.0  # when the server says nothing about when


@dataclass(frozen=True)
class Timeouts:
    connect: float
    read: float


def _seconds(name: str, default: float) -> float:
    raw = getenv(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or math.isinf(value):
        raise BackendError(f"{name} must be a number of seconds above 0, not {raw!r}",
                           reason="config")
    return value


def timeouts() -> Timeouts:
    """``SUBCHAT_CONNECT_TIMEOUT`` (default 5 s) and ``SUBCHAT_TIMEOUT``: how long a
    server may stay silent before the first chunk or between two (default 60 s)."""
    return Timeouts(_seconds("SUBCHAT_CONNECT_TIMEOUT", CONNECT_TIMEOUT_S),
                    _seconds("SUBCHAT_TIMEOUT", READ_TIMEOUT_S))


def check_timeouts() -> None:
    """The timeout settings, checked when a request is planned (before anything is stored):
    a bad one is an :class:`InvalidInput` naming the variable."""
    try:
        timeouts()
    except BackendError as exc:
        raise InvalidInput(f"{exc}; fix it in the environment or ./.env") from None


def secret_digest(value: str | None) -> str:
    """A stand-in for a key in cache keys, so a key is never kept in our own structures."""
    return hashlib.sha256(value.encode()).hexdigest()[:16] if value else ""


class ClientCache:
    """One SDK client per configuration (URL, key, timeouts), reused across requests so
    that a connection pool and TLS context are built once. Clients of an earlier
    configuration stay open (a stream may still be using one) until :meth:`close`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[tuple, Any] = {}

    def get(self, key: tuple, make: Callable[[], Any]) -> Any:
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = self._clients[key] = make()
            return client

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            _close_quietly(client)


class Memo:
    """Values kept for a while (a :mod:`cachetools` TTL cache behind a lock): ``ttl``
    seconds, or ``ttl(value)`` seconds where the answer decides (a server found up is
    kept longer than one found down)."""

    def __init__(self, ttl: float | Callable[[Any], float], maxsize: int = 256):
        self._lock = threading.Lock()
        if callable(ttl):
            self._cache: cachetools.Cache = cachetools.TLRUCache(
                maxsize, ttu=lambda _key, value, now: now + ttl(value), timer=time.monotonic)
        else:
            self._cache = cachetools.TTLCache(maxsize, ttl, timer=time.monotonic)

    def get(self, key: Any, compute: Callable[[], T]) -> T:
        """The value kept for ``key``, else ``compute()`` (outside the lock: it may ask a
        server), kept."""
        with self._lock:
            hit = self._cache.get(key, _MISSING)
        if hit is not _MISSING:
            return hit
        value = compute()
        with self._lock:
            self._cache[key] = value
        return value

    def peek(self, key: Any, default: Any = None) -> Any:
        with self._lock:
            return self._cache.get(key, default)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()


_MISSING = object()


def _close_quietly(client: Any) -> None:
    if client is None:
        return
    try:
        client.close()
    except Exception:  # noqa: BLE001 - closing a pool must never fail a request
        pass


# -- rate limits ---------------------------------------------------------------------------

_TRY_AGAIN = re.compile(r"try again in\s+(?:(\d+)h)?\s*(?:(\d+)m(?!s))?\s*(?:(\d+(?:\.\d+)?)(ms|s))?",
                        re.IGNORECASE)


def retry_after(headers: Mapping[str, str] | None, message: str = "") -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms``, ``retry-after`` (seconds
    or an HTTP date), else a "try again in 7.5s" in the message (Groq's wording)."""
    if headers is not None:
        ms = headers.get("retry-after-ms")
        if ms:
            try:
                return max(0.0, float(ms) / 1000)
            except ValueError:
                pass
        ra = headers.get("retry-after")
        if ra:
            try:
                return max(0.0, float(ra))
            except ValueError:
                pass
            import email.utils

            try:
                return max(0.0, email.utils.parsedate_to_datetime(ra).timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    m = _TRY_AGAIN.search(message or "")
    if m and any(m.group(i) for i in (1, 2, 3)):
        h, mins, num, unit = m.groups()
        secs = float(num or 0) / (1000 if unit == "ms" else 1)
        return int(h or 0) * 3600 + int(mins or 0) * 60 + secs
    return None


class RetryBudget:
    """At most ``RATE_LIMIT_RETRIES`` waits, ``RATE_LIMIT_BUDGET_S`` seconds in all."""

    def __init__(self, retries: int = RATE_LIMIT_RETRIES, budget_s: float = RATE_LIMIT_BUDGET_S):
        self.retries_left = retries
        self.budget_left = budget_s

    def wait(self, seconds: float | None) -> bool:
        """Sleep ``seconds`` (a default when None) and return True if the budget allows
        it; otherwise return False at once. Ctrl-C interrupts the sleep."""
        wait = RATE_LIMIT_DEFAULT_WAIT_S if seconds is None else max(0.0, seconds)
        if self.retries_left <= 0 or wait > self.budget_left:
            return False
        self.retries_left -= 1
        self.budget_left -= wait
        if wait:
            time.sleep(wait)
        return True


def when_to_retry(seconds: float | None) -> str:
    if seconds is None:
        return "retry in a minute or so"
    return f"retry in ~{max(1, math.ceil(seconds))} s"


# -- messages ------------------------------------------------------------------------------

def failure(message: str, reason: str, retry_after: float | None = None) -> BackendError:
    """A :class:`BackendError` whose message has every known key masked."""
    return BackendError(redact(message), reason=reason, retry_after=retry_after)


_ERROR_CODE = re.compile(r"^Error code: \d+ - ")


def detail(exc: BaseException, limit: int = 300) -> str:
    """A short, redacted description of an SDK or transport exception: the server's own
    message where the body has one."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    text = body.get("message") if isinstance(body, dict) else None
    if not isinstance(text, str) or not text:
        text = str(getattr(exc, "error", None) or getattr(exc, "message", None) or exc or "")
        text = _ERROR_CODE.sub("", text)
    text = " ".join(text.split()) or type(exc).__name__
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return redact(text)


def list_names(names: Iterable[str], limit: int = 12) -> str:
    names = list(names)
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def cut_message(service: str, received: int, why: str) -> str:
    return (f"the stream from {service} was cut after {received} chunk"
            f"{'' if received == 1 else 's'} ({why}); send the message again to retry")


def timeout_message(service: str, received: int, read_s: float) -> str:
    if received:
        what = f"stopped sending for {read_s:g} s after {received} chunk{'' if received == 1 else 's'}"
    else:
        what = f"sent no reply within {read_s:g} s"
    return (f"{service} {what}; the server may be overloaded or stuck "
            f"(set SUBCHAT_TIMEOUT to wait longer)")


def join_thinking(reasoning: str | None, content: str | None, state: list[bool]) -> str:
    """Reasoning deltas shown as ``<think>…</think>`` ahead of the answer.
    ``state[0]`` says whether a think block is open."""
    out = ""
    if reasoning:
        if not state[0]:
            out += "<think>\n"
            state[0] = True
        out += reasoning
    if content:
        if state[0]:
            out += "\n</think>\n\n"
            state[0] = False
        out += content
    return out


def _mapping(value: Any) -> Mapping[str, Any]:
    """``value`` where it is a JSON object, else an empty one (a server's odd field is
    read as missing, never as a crash in the middle of a reply)."""
    return value if value.__class__ is dict else {}


def _int(value: Any) -> int | None:
    return value if value.__class__ is int else None


def sse_data(response: Any, drain_lines: int = 8) -> Iterator[Any]:
    """The JSON data of each event of a server-sent event stream (``response``: an
    ``httpx`` response, streamed), to ``data: [DONE]``; then the last few lines of the body
    are read (the chunked encoding's end), so that the connection goes back to the pool,
    and the response is closed. An event whose data is ``{"error": ...}`` (an error the
    server met mid-stream) is an :class:`ErrorEvent`. Plain dicts, not the SDK's pydantic
    models: building one per chunk was most of the time a streamed token costs. Follows
    the SSE rules the SDKs follow: ``data:`` lines joined, a blank line dispatches,
    comments and other fields ignored, an event cut off by the end of the body dropped."""
    loads = json.loads
    lines = response.iter_lines()
    data: list[str] = []
    try:
        for line in lines:
            if line:
                if line.startswith("data:"):
                    data.append(line[6:] if line.startswith("data: ") else line[5:])
                continue
            if not data:
                continue
            text = data[0] if len(data) == 1 else "\n".join(data)
            data.clear()
            if text.startswith("[DONE]"):
                for _ in zip(range(drain_lines), lines):
                    pass
                return
            value = loads(text)
            if value.__class__ is dict and value.get("error"):
                error = value["error"]
                message = _mapping(error).get("message") or (error if isinstance(error, str)
                                                             else None)
                raise ErrorEvent(redact(str(message or "an error occurred during streaming")))
            yield value
    finally:
        response.close()


def safe_url(url: str) -> str:
    """``url`` without credentials or query, for messages."""
    import urllib.parse

    try:
        s = urllib.parse.urlsplit(url)
        host = s.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host + (f":{s.port}" if s.port else "")
        return urllib.parse.urlunsplit((s.scheme, netloc, s.path.rstrip("/"), "", ""))
    except ValueError:
        return redact(url)


def installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# -- the request machinery -------------------------------------------------------------------

@dataclass(frozen=True)
class Status:
    """An HTTP error answer, whichever client read it."""

    code: int
    text: str  # the server's own message, short and redacted
    headers: Mapping[str, str] | None = None
    path: str = ""


class StatusError(Exception):
    """An error status read by our own HTTP code (Ollama's client)."""

    def __init__(self, status: Status):
        super().__init__(f"{status.code}: {status.text}")
        self.status = status


class ErrorEvent(Exception):
    """The server reported an error inside a stream it had begun."""


class Thought(tuple):
    """``(reasoning, content)`` of a chunk that carries reasoning (a reader's item)."""

    __slots__ = ()


@dataclass
class Call:
    """One request as the shared machinery sees it: who is asked, what has arrived."""

    service: str
    model: str | None
    timeouts: Timeouts
    listing: bool = False  # asking for the model list, not a reply
    started: bool = False  # the server has begun the reply (the stream is open)
    received: int = 0  # chunks read so far
    finish: Finish | None = None  # set by the chunk reader once the answer is complete
    extra: dict[str, Any] = field(default_factory=dict)


#: kinds of failure other than an HTTP status, as each client names them
CONNECT, CONNECT_TIMEOUT, READ_TIMEOUT, TRANSPORT, EVENT, NOT_A_STREAM = (
    "connect", "connect-timeout", "read-timeout", "transport", "event", "not-a-stream")


class RemoteBackend(Backend):
    """What every HTTP backend does the same way. Subclasses say how to open the stream
    (:meth:`open_with_retries` takes a function) and how to read its chunks (a generator
    of ``(content, reasoning)`` pairs that sets ``call.finish``, run by :meth:`relay`),
    how their client names an error status (:meth:`as_status`) and a failure
    (:meth:`failure_kind`), and the words of a few hints."""

    def check_settings(self) -> None:
        """The timeouts every request reads, checked when it is planned."""
        check_timeouts()

    #: the setting that points at the server, named in "is X right?"
    url_var: ClassVar[str] = ""
    #: said after "is URL_VAR right?"
    url_hint: ClassVar[str] = ""
    #: what the stream should have been, in "sent something that is not ..."
    wire: ClassVar[str] = ""
    #: why a stream without a finish is cut
    no_finish: ClassVar[str] = "it ended without a finish reason"

    def __init__(self) -> None:
        self._clients = ClientCache()

    # -- hooks ---------------------------------------------------------------------------------
    def connection_hint(self) -> str:
        raise NotImplementedError

    def connect_timeout_hint(self) -> str:
        return self.connection_hint()

    def not_a_stream_hint(self) -> str:
        return f"is {self.url_var} right?"

    def no_reply(self, call: Call, why: str) -> BackendError:
        """The connection closed before the server began to answer."""
        return failure(f"cannot reach {call.service}: {self.connection_hint()}", "connection")

    def as_status(self, exc: BaseException) -> Status | None:
        """The HTTP status ``exc`` carries, if it is an error answer."""
        return exc.status if isinstance(exc, StatusError) else None

    def failure_kind(self, exc: BaseException) -> str | None:
        """One of the kinds above for ``exc``, or None."""
        return EVENT if isinstance(exc, ErrorEvent) else None

    def auth_error(self, call: Call, code: int, text: str) -> BackendError:
        raise NotImplementedError

    def missing_model(self, call: Call, text: str) -> BackendError:
        raise NotImplementedError

    # -- the one retry loop ----------------------------------------------------------------------
    def open_with_retries(self, start: Callable[[], T], call: Call) -> T:
        """``start()`` (opening the stream), again after a rate limit (429) while the
        budget lasts (``RATE_LIMIT_RETRIES`` waits, ``RATE_LIMIT_BUDGET_S`` in all, as long
        as the server asks); any other failure becomes one clear :class:`BackendError`."""
        budget = RetryBudget()
        while True:
            try:
                return start()
            except Exception as exc:  # noqa: BLE001 - mapped to one of our messages
                status = self.as_status(exc)
                if status is not None and status.code == 429 \
                        and budget.wait(retry_after(status.headers, status.text)):
                    continue
                raise self.error(exc, call) from None

    # -- the one stream loop ---------------------------------------------------------------------
    def relay(self, call: Call, chunks: Iterator[str | Thought]) -> Iterator[str | Finish]:
        """Yield the text of ``chunks`` (a reader yields a chunk's answer text as a plain
        string, or a :class:`Thought` where it carries reasoning, shown as
        ``<think>...</think>`` ahead of the answer), then the :class:`Finish` the reader
        set. A stream that ends without one is cut; a failure after the answer was
        complete (the usage or the end marker lost) is not an error. Runs once per
        chunk: it does the least it can."""
        thinking = [False]
        try:
            try:
                for item in chunks:
                    if item.__class__ is str and not thinking[0]:
                        yield item
                        continue
                    reasoning, content = item if item.__class__ is Thought else (None, item)
                    content = join_thinking(reasoning, content, thinking)
                    if content:
                        yield content
            except Exception as exc:  # noqa: BLE001 - mapped to one of our messages
                if call.finish is None or isinstance(exc, BackendError):
                    raise self.error(exc, call) from None
            if call.finish is None:
                raise failure(cut_message(call.service, call.received, self.no_finish), "stream")
            if thinking[0]:
                yield "\n</think>\n\n"
            yield call.finish
        finally:
            chunks.close()  # type: ignore[attr-defined]

    # -- the one mapping to messages ---------------------------------------------------------------
    def error(self, exc: BaseException, call: Call) -> BackendError:
        """One clear message for whatever the client raised."""
        if isinstance(exc, BackendError):
            return exc
        status = self.as_status(exc)
        if status is not None:
            return self.status_error(status, call)
        service, t = call.service, call.timeouts
        kind = self.failure_kind(exc)
        if kind == CONNECT_TIMEOUT:
            return failure(f"{service} did not accept a connection within {t.connect:g} s: "
                           f"{self.connect_timeout_hint()}", "timeout")
        if kind == READ_TIMEOUT:
            return failure(timeout_message(service, call.received, t.read), "timeout")
        if kind == CONNECT:
            return failure(f"cannot reach {service}: {self.connection_hint()}", "connection")
        if kind == TRANSPORT:
            why = detail(exc.__cause__ or exc, 120)
            if call.started or call.received:
                return failure(cut_message(service, call.received, why), "stream")
            return self.no_reply(call, why)
        text = detail(exc)
        if kind == EVENT:
            return failure(f"{service} reported an error after {call.received} chunk"
                           f"{'' if call.received == 1 else 's'}: {text}", "server")
        if kind == NOT_A_STREAM:
            return failure(f"{service} sent something that is not {self.wire} "
                           f"({detail(exc, 120)}): {self.not_a_stream_hint()}", "stream")
        return failure(f"{service} failed: {type(exc).__name__}: {text}", "backend")

    def status_error(self, status: Status, call: Call) -> BackendError:
        """An HTTP error status as one message: the key (401/403), the model or the URL
        (404), a rate limit with when to retry (429), the server (5xx), the request."""
        code, text, service = status.code, status.text, call.service
        if code in (401, 403):
            return self.auth_error(call, code, text)
        if code == 404 and call.model and not call.listing:
            return self.missing_model(call, text)
        if code == 404:
            return failure(f"{service} answered 404 to {status.path or 'the request'}: is "
                           f"{self.url_var} right?{self.url_hint}", "request")
        if code == 429:
            wait = retry_after(status.headers, text)
            return failure(f"rate-limited by {service} (429): {text}; {when_to_retry(wait)}",
                           "rate-limit", retry_after=wait)
        if code >= 500:
            return failure(f"{service} failed ({code}): {text}", "server")
        return failure(f"{service} rejected the request ({code}): {text}", "request")

    def close(self) -> None:
        self._clients.close()


class ChatCompletionsBackend(RemoteBackend):
    """A backend speaking OpenAI's streamed ``/chat/completions`` through a Stainless-made
    SDK (``groq``, ``openai``): their clients, streams and exceptions have the same shape.
    Subclasses name the SDK, where the URL and key come from, and the default model."""

    sdk_module: ClassVar[str] = ""
    key_var: ClassVar[str] = ""
    #: the request asks for usage in the last chunk (``stream_options``)
    ask_usage: ClassVar[bool] = False
    wire = "an OpenAI-style event stream"
    #: ``tools``/``tool_choice`` in the request, calls read from the stream's deltas
    supports_tools = True
    #: a tool result message carries the tool's ``name`` (Groq reads it; OpenAI does not)
    tool_result_names: ClassVar[bool] = False

    # -- hooks ---------------------------------------------------------------------------------
    def service(self, base_url: str | None) -> str:
        raise NotImplementedError

    def resolve_model(self, client: Any, base_url: str | None, options: Any, t: Timeouts) -> str:
        raise NotImplementedError

    def make_client(self, sdk: Any, base_url: str | None, key: str | None, t: Timeouts) -> Any:
        raise NotImplementedError

    def require_key(self, base_url: str | None, key: str | None) -> None:
        """Raise :class:`BackendUnavailable` when this configuration cannot work."""

    def request_fields(self, options: Any, model: str) -> dict[str, Any]:
        """More keyword arguments of ``chat.completions.create`` for ``options`` (the
        constraint's ``response_format``/``extra_body``)."""
        return {}

    # -- settings ------------------------------------------------------------------------------
    def base_url(self) -> str | None:
        return getenv(self.url_var)

    def api_key(self) -> str | None:
        key = getenv(self.key_var)
        register_secret(key)
        return key

    def _sdk(self) -> Any:
        try:
            return importlib.import_module(self.sdk_module)
        except ImportError:
            raise BackendUnavailable(
                f"the {self.sdk_module} client is not installed; install it with: "
                f"pip install 'subchat-magics[{self.extra}]'") from None

    def _transport(self) -> Any:
        """The HTTP library under the SDK (``httpx``; ``httpx2`` for newer ``openai``)."""
        timeout_cls = self._sdk().Timeout
        for name in ("httpx", "httpx2"):
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            if getattr(module, "Timeout", None) is timeout_cls:
                return module
        import httpx

        return httpx

    def client(self) -> tuple[Any, str | None, Timeouts]:
        sdk = self._sdk()
        base_url, key, t = self.base_url(), self.api_key(), timeouts()
        self.require_key(base_url, key)
        client = self._clients.get((base_url, secret_digest(key), t),
                                   lambda: self.make_client(sdk, base_url, key, t))
        return client, base_url, t

    def models(self) -> list[str]:
        """Model ids the server lists (``/models``)."""
        client, base_url, t = self.client()
        return self._list_models(client, base_url, t)

    def _list_models(self, client: Any, base_url: str | None, t: Timeouts) -> list[str]:
        try:
            listed = client.models.list()
            # openai pages, groq returns the list object
            return [m.id for m in getattr(listed, "data", None) or listed]
        except Exception as exc:  # noqa: BLE001 - mapped to one of our messages
            raise self.error(exc, Call(self.service(base_url), None, t, listing=True)) from None

    # -- how the SDK names its errors --------------------------------------------------------------
    def as_status(self, exc: BaseException) -> Status | None:
        sdk = self._sdk()
        if not isinstance(exc, sdk.APIStatusError):
            return None
        return Status(exc.status_code, detail(exc), exc.response.headers, exc.request.url.path)

    def failure_kind(self, exc: BaseException) -> str | None:
        sdk, transport = self._sdk(), self._transport()
        if isinstance(exc, (sdk.APITimeoutError, transport.TimeoutException)):
            return CONNECT_TIMEOUT if isinstance(exc.__cause__ or exc, transport.ConnectTimeout) \
                else READ_TIMEOUT
        if isinstance(exc, (sdk.APIConnectionError, transport.TransportError)):
            return TRANSPORT
        if isinstance(exc, (sdk.APIError, ErrorEvent)):  # an error event in the stream
            return EVENT
        if isinstance(exc, ValueError):
            return NOT_A_STREAM
        return None

    # -- streaming -----------------------------------------------------------------------------
    def stream(self, messages: Any, options: Any) -> Iterator[str | Finish]:
        sdk = self._sdk()
        client, base_url, t = self.client()
        model = self.resolve_model(client, base_url, options, t)
        kwargs: dict[str, Any] = dict(model=model, messages=list(messages), stream=True,
                                      temperature=options.temperature, top_p=options.top_p,
                                      max_tokens=options.max_tokens)
        if options.tools or has_tool_messages(messages):
            kwargs["messages"] = openai_messages(messages, keep_name=self.tool_result_names)
        if options.tools:
            kwargs["tools"] = tool_specs(options.tools)
            kwargs["tool_choice"] = "auto"  # the model answers or calls
        if options.stop:
            kwargs["stop"] = list(options.stop)
        if options.seed is not None:
            kwargs["seed"] = options.seed
        if self.ask_usage:
            kwargs["stream_options"] = {"include_usage": True}
        if options.constraint is not None:
            kwargs.update(self.request_fields(options, model))
        call = Call(self.service(base_url), model, t)

        # the SDK builds, sends and checks the request (its errors, its status mapping);
        # the body is read by sse_data, as plain dicts
        create = client.chat.completions.with_raw_response.create

        def start() -> Any:
            try:
                return create(**kwargs).http_response
            except sdk.BadRequestError as exc:
                # a server that does not know stream_options: go on without usage
                if "stream_options" in kwargs and "stream_options" in str(exc):
                    del kwargs["stream_options"]
                    return create(**kwargs).http_response
                raise

        response = self.open_with_retries(start, call)
        call.started = True
        try:
            yield from self.relay(call, self.read(call, sse_data(response)))
        finally:
            response.close()  # (closed already, unless closed before the first read)

    def read(self, call: Call, chunks: Any) -> Iterator[str | Thought]:
        """The text of each chunk (a :class:`Thought` where it has reasoning) of the
        stream's events (``chunks``: their JSON data, see :func:`sse_data`);
        ``call.finish`` once a finish reason has come (updated if the usage follows it).
        Runs once per chunk: plain dict lookups."""
        finish_reason = None
        usage = None
        served_model = None
        calls = DeltaCalls()
        try:
            for chunk in chunks:
                call.received += 1
                if chunk.__class__ is not dict:
                    raise ValueError(f"an event's data is not a JSON object: {str(chunk)[:60]!r}")
                served_model = chunk.get("model") or served_model
                x_groq = chunk.get("x_groq")  # on a few chunks only
                if x_groq is not None:
                    x_groq = _mapping(x_groq)
                    if x_groq.get("error"):
                        error = x_groq["error"]
                        raise ErrorEvent(redact(str(_mapping(error).get("message") or error)))
                new_usage = chunk.get("usage") or (x_groq.get("usage") if x_groq else None)
                for choice in chunk.get("choices") or ():
                    if choice.__class__ is not dict or choice.get("index"):
                        continue
                    delta = choice.get("delta")
                    if delta.__class__ is not dict:
                        delta = {}
                    # Groq says "reasoning"; vLLM and DeepSeek "reasoning_content"
                    reasoning = delta.get("reasoning") or delta.get("reasoning_content")
                    content = delta.get("content")
                    if content is not None and content.__class__ is not str:
                        content = str(content)
                    if reasoning:
                        yield Thought((str(reasoning), content))
                    elif content:
                        yield content
                    tool_deltas = delta.get("tool_calls")
                    if tool_deltas:
                        calls.add(tool_deltas if isinstance(tool_deltas, list) else ())
                    if choice.get("finish_reason"):
                        finish_reason = str(choice["finish_reason"])
                if new_usage is not None:
                    usage = _mapping(new_usage)
                if finish_reason is not None and (call.finish is None or new_usage is not None):
                    u = usage or {}
                    call.finish = Finish(
                        reason=finish_reason, model=str(served_model or call.model or "") or None,
                        prompt_tokens=_int(u.get("prompt_tokens")),
                        completion_tokens=_int(u.get("completion_tokens")),
                        cached_tokens=_int(_mapping(u.get("prompt_tokens_details")).get("cached_tokens")),
                        tool_calls=calls.calls() if calls else [])
        finally:
            chunks.close()

    # -- messages ------------------------------------------------------------------------------
    def connection_hint(self) -> str:
        raise NotImplementedError

    def auth_error(self, call: Call, code: int, text: str) -> BackendError:
        return failure(f"{self.key_var} was rejected ({code}): {text}; set a valid key in the "
                       f"environment, ./.env or with %subchat key {self.id}", "auth")

    def missing_model(self, call: Call, text: str) -> BackendError:
        service, model = call.service, call.model
        try:
            names = self.models()
        except BackendError as exc:
            if exc.reason == "request":  # /models is missing too: the URL is wrong
                return failure(f"{service} answered 404 for the chat and the model list: is "
                               f"{self.url_var} right?{self.url_hint}", "request")
            names = None
        listing = ("the model list could not be read" if names is None
                   else f"available: {list_names(names)}")
        return failure(f"model {model!r} is not served by {service}; {listing}. Pick one with "
                       f"--model or {self.id.upper()}_MODEL", "model")

    def __repr__(self) -> str:
        key = getenv(self.key_var)
        url = self.base_url()
        return (f"<{type(self).__name__} id={self.id!r}"
                + (f" url={safe_url(url)!r}" if url else "")
                + f" model={self.default_model()!r} key={mask(key)}>")
