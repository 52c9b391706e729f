"""Loopback HTTP servers that speak Ollama's, Groq's and OpenAI's streaming wire formats,
so that tests and the benchmark drive the real ``ollama``, ``groq`` and ``openai``
clients over real sockets. Only the standard library is used: the clients under test are
the only HTTP code involved.

Each server records the requests it gets (``server.requests``) and follows a
:class:`Script` set with ``server.configure(...)``: stream slowly, fail with a status
(and ``retry-after``), cut the connection after K chunks, end early without the final
line, send an error line mid-stream, or hang. Everything is bounded (delays, hangs,
sizes), listens on 127.0.0.1 only, and ``stop()`` ends every connection.

    with FakeOllama(models=["llama3.2:latest"]) as server:
        server.configure(reply="Hi there", delay=0.01)
        ... OLLAMA_HOST=server.url ...
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_DELAY_S = 1.0
MAX_HANG_S = 30.0
MAX_CHUNKS = 100_000
MAX_BODY = 10 << 20


@dataclass
class Script:
    """What the server does with chat requests until reconfigured."""

    reply: str = "Hello from the fake server."
    chunks: list[str] | None = None  # the deltas; default: ``reply`` split after spaces
    reasoning: list[str] | None = None  # thinking deltas sent before the answer
    delay: float = 0.0  # seconds before each chunk
    status: int | None = None  # answer chat requests with this HTTP error status...
    fail_times: int | None = None  # ...only the first N of them (None: all)
    retry_after: str | None = None  # ``retry-after`` header of an error answer
    message: str | None = None  # the error's message (a typical one by default)
    cut_after: int | None = None  # drop the connection after K chunks
    end_after: int | None = None  # end the body cleanly after K chunks, no final line
    error_after: int | None = None  # send an error line/event after K chunks
    hang_after: int | None = None  # go silent after K chunks (0: before the headers)
    usage: tuple[int, int] | None = None  # (prompt, completion) tokens reported
    finish_reason: str = "stop"
    model: str | None = None  # the model named in chunks (default: the one asked for)
    #: tool calls streamed after the text, each ``{"name", "arguments", "id"?}``
    #: (``arguments``: a dict, or raw text sent as the model wrote it), in each server's
    #: own wire form: OpenAI's deltas (the name, then the arguments in fragments), Groq's
    #: (one delta a call), Ollama's (one message with every call, arguments as objects)
    tool_calls: list[dict[str, Any]] | None = None
    tool_calls_times: int | None = None  # ...in the first N chat requests only (None: all)
    #: SSE servers: each event with a comment line and an ``id:`` before it and its JSON
    #: over two ``data:`` lines (as the SSE rules allow and some proxies send)
    sse_split: bool = False
    #: every chunk of the body written in pieces of this many bytes (a line, even a
    #: character, cut between reads); Ollama's lines then end in CRLF with a blank line
    split_bytes: int | None = None

    def deltas(self) -> list[str]:
        if self.chunks is not None:
            return list(self.chunks)
        words = self.reply.split(" ")
        return [w + " " for w in words[:-1]] + [words[-1]]

    def items(self) -> list[tuple[str, str]]:
        """``("reasoning" | "content", text)`` in the order they are streamed."""
        return [("reasoning", r) for r in self.reasoning or ()] + \
            [("content", d) for d in self.deltas()]

    def calls(self, request_number: int = 1) -> list[dict[str, Any]]:
        """The tool calls with an id each and their arguments as JSON text too, for the
        ``request_number``-th chat request (none after ``tool_calls_times``)."""
        if self.tool_calls_times is not None and request_number > self.tool_calls_times:
            return []
        out = []
        for i, c in enumerate(self.tool_calls or ()):
            args = c.get("arguments", {})
            text = args if isinstance(args, str) else json.dumps(args)
            out.append({"index": i, "id": c.get("id") or f"call_fake{request_number - 1}{i:03d}"
                        if request_number > 1 else c.get("id") or f"call_fake{i:04d}",
                        "name": c["name"], "arguments": args, "text": text})
        return out


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: Any = None


class _ClientGone(Exception):
    pass


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    fake: "FakeServer"

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
            return  # a client that went away or stayed idle: normal here
        self.fake.errors.append(exc)  # a bug in the fake: tests can look


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # chunked streaming, keep-alive like the real servers
    timeout = 10  # an idle keep-alive connection ends after this
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        pass  # quiet: tests read server.requests instead

    def setup(self) -> None:
        super().setup()
        # small writes go out at once, as real servers do (Go, uvicorn set TCP_NODELAY)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.fake._track(self.connection, True)
        with self.server.fake._lock:
            self.server.fake.connections += 1

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._track(self.connection, False)

    def _dispatch(self, method: str) -> None:
        fake = self.server.fake
        length = int(self.headers.get("content-length") or 0)
        if length > MAX_BODY:
            self.send_json(413, {"error": "request too large"})
            return
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        path = self.path.split("?", 1)[0]
        req = Request(method, path, {k.lower(): v for k, v in self.headers.items()}, body)
        chat = path == fake.chat_path
        with fake._lock:
            fake.requests.append(req)
            if chat:
                fake.in_flight += 1
                fake.peak_in_flight = max(fake.peak_in_flight, fake.in_flight)
        try:
            fake.handle(self, req)
        except _ClientGone:
            fake._note_disconnect()
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            fake._note_disconnect()
            self.close_connection = True
        finally:
            if chat:
                with fake._lock:
                    fake.in_flight -= 1

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch("POST")

    # -- writing -------------------------------------------------------------------------------
    def send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def send_text(self, status: int, text: str) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_stream(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def write_chunk(self, data: bytes) -> None:
        if self._peer_closed():
            raise _ClientGone
        self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))

    def end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")

    def cut(self) -> None:
        """Drop the connection in the middle of the body (no terminating chunk)."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _peer_closed(self) -> bool:
        """The client has closed its end (it would read EOF)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True


class FakeServer:
    """Base class: a threaded loopback server, its script and what it recorded."""

    chat_path = ""

    def __init__(self, models: list[str] | tuple[str, ...] = ("model-a", "model-b"),
                 key: str | None = None):
        self.models = list(models)
        self.key = key  # when set, chat and model requests need ``Authorization: Bearer key``
        self.script = Script()
        self.requests: list[Request] = []
        self.errors: list[BaseException | None] = []
        self.connections = 0  # TCP connections accepted
        self.in_flight = 0  # chat requests being answered now
        self.peak_in_flight = 0  # the most chat requests answered at once since configure()
        self.disconnected = threading.Event()  # a client went away in the middle of a stream
        self.disconnects = 0  # streams a client closed in the middle, since configure()
        #: streams begun and not yet sent in full (a stream leaves this count when its last
        #: item goes out to a client still there, or when the client is seen gone): see
        #: :meth:`owed_streams`
        self.streaming = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._sent = 0
        self._chat_count = 0
        self._conns: set[socket.socket] = set()
        self._release = threading.Event()
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.fake = self
        self._thread: threading.Thread | None = None

    # -- life ----------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"{type(self).__name__}-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "FakeServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    # -- the script ------------------------------------------------------------------------------
    def configure(self, **script: Any) -> "FakeServer":
        """Follow a new :class:`Script` from the next request on; forget what was recorded."""
        with self._lock:
            self.script = Script(**script)
            self.requests.clear()
            self._sent = 0
            self._chat_count = 0
            self.peak_in_flight = self.in_flight
            self.disconnected.clear()
            self.disconnects = 0
        return self

    def chat_requests(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path == self.chat_path]

    def wait_for_chunks(self, n: int, timeout: float = 10.0) -> bool:
        """Block until ``n`` chunks of chat streams have been sent (bounded)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._sent >= n, timeout=timeout)

    def _count_sent(self) -> None:
        with self._cond:
            self._sent += 1
            self._cond.notify_all()

    def owed_streams(self) -> int:
        """How many streams this server has begun and not sent in full. Read once a client
        has closed what it meant to close: each stream counted here must then end with
        the client seen gone (:attr:`disconnected`), since the check that the client is
        still there and the count's update happen under one lock (a stream whose last
        item went out before the client closed it is not counted)."""
        with self._lock:
            return self.streaming

    def _note_disconnect(self) -> None:
        with self._lock:
            self.disconnects += 1
        self.disconnected.set()

    def _authorized(self, req: Request) -> bool:
        return self.key is None or req.headers.get("authorization") == f"Bearer {self.key}"

    def _failing(self) -> bool:
        """Whether this chat request is one the script fails."""
        s = self.script
        with self._lock:
            self._chat_count += 1
            n = self._chat_count
        return s.status is not None and (s.fail_times is None or n <= s.fail_times)

    def _hang(self) -> None:
        self._release.wait(MAX_HANG_S)
        raise _ClientGone

    def _pause(self) -> None:
        delay = min(max(self.script.delay, 0.0), MAX_DELAY_S)
        if delay:
            time.sleep(delay)

    def _known(self, model: str | None) -> bool:
        return bool(model) and model in self.models

    def handle(self, h: _Handler, req: Request) -> None:
        raise NotImplementedError

    def _stream(self, h: _Handler, content_type: str, encode_delta: Any,
                encode_final: list[bytes], encode_error: Any) -> None:
        """The shared streaming loop: the script's items (``encode_delta(i, kind, text)``),
        then the final lines, cut, ended, failed or hung where the script says."""
        s = self.script
        if s.hang_after == 0:
            self._hang()
        h.start_stream(content_type)
        owed = [True]  # counted in self.streaming
        with self._lock:
            self.streaming += 1
        try:
            items = self._items()[:MAX_CHUNKS]
            for i, (kind, text) in enumerate(items):
                if s.cut_after is not None and i >= s.cut_after:
                    h.cut()
                    return
                if s.end_after is not None and i >= s.end_after:
                    h.end_stream()
                    return
                if s.error_after is not None and i >= s.error_after:
                    h.write_chunk(encode_error())
                    h.end_stream()
                    return
                if s.hang_after is not None and i >= s.hang_after:
                    self._hang()
                self._pause()
                if i == len(items) - 1:
                    self._last_item_out(h, owed)
                data = encode_delta(i, kind, text)
                if s.split_bytes:
                    for at in range(0, len(data), s.split_bytes):
                        h.write_chunk(data[at:at + s.split_bytes])
                        h.wfile.flush()
                else:
                    h.write_chunk(data)
                self._count_sent()
            if s.cut_after is not None and s.cut_after >= len(items):
                h.cut()
                return
            if not items:
                self._last_item_out(h, owed)
            for data in encode_final:
                h.write_chunk(data)
            h.end_stream()
        finally:
            if owed[0]:
                with self._lock:
                    self.streaming -= 1

    def _last_item_out(self, h: _Handler, owed: list[bool]) -> None:
        """Before a stream's last item: the client still there (else it is gone) and the
        stream out of :attr:`streaming`, in one step under the lock."""
        with self._lock:
            if h._peer_closed():
                raise _ClientGone
            self.streaming -= 1
            owed[0] = False

    def _items(self) -> list[tuple[str, str]]:
        """What a stream sends, in order: the script's text, then its tool calls as this
        server sends them (``("tool", json)`` items; each server encodes its own)."""
        return self.script.items() + [("tool", json.dumps(c)) for c in self.script.calls(self._chat_count)]

    def _usage(self, req: Request, deltas: list[str]) -> tuple[int, int]:
        if self.script.usage is not None:
            return self.script.usage
        msgs = (req.body or {}).get("messages") or []
        return sum(len(str(m.get("content", "")).split()) for m in msgs), len(deltas)


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime())


class FakeOllama(FakeServer):
    """Ollama's API: NDJSON ``/api/chat``, ``/api/tags``, ``/api/version``, ``/api/show``
    (whose ``model_info`` holds ``llama.context_length``: set ``context_length``, None for
    a server that does not say)."""

    chat_path = "/api/chat"
    version = "0.12.6"
    context_length: int | None = 131072

    def __init__(self, models: list[str] | tuple[str, ...] = ("llama3.2:latest", "qwen3:0.6b"),
                 key: str | None = None):
        super().__init__(models, key)

    def _known(self, model: str | None) -> bool:
        return bool(model) and (model in self.models or f"{model}:latest" in self.models)

    def _items(self) -> list[tuple[str, str]]:
        calls = self.script.calls(self._chat_count)  # Ollama sends every call in one message
        return self.script.items() + ([("tool", json.dumps(calls))] if calls else [])

    def handle(self, h: _Handler, req: Request) -> None:
        if req.path == "/api/version" and req.method == "GET":
            h.send_json(200, {"version": self.version})
        elif req.path == "/api/tags" and req.method == "GET":
            if not self._authorized(req):
                h.send_json(401, {"error": "unauthorized"})
                return
            h.send_json(200, {"models": [{
                "name": m, "model": m, "modified_at": "2026-11-01T10:00:00.000000000Z",
                "size": 2_019_393_189, "digest": "a80c4f17acd5" + "0" * 52,
                "details": {"parent_model": "", "format": "gguf", "family": "llama",
                            "families": ["llama"], "parameter_size": "3.2B",
                            "quantization_level": "Q4_K_M"}} for m in self.models]})
        elif req.path == "/api/chat" and req.method == "POST":
            self._chat(h, req)
        elif req.path == "/api/show" and req.method == "POST":
            model = (req.body or {}).get("model") if isinstance(req.body, dict) else None
            if not self._known(model):
                h.send_json(404, {"error": f"model '{model}' not found"})
                return
            info: dict[str, Any] = {"general.architecture": "llama", "general.parameter_count": 3212749888}
            if self.context_length is not None:
                info["llama.context_length"] = self.context_length
            h.send_json(200, {"modelfile": "", "parameters": "", "template": "{{ .Prompt }}",
                              "details": {"format": "gguf", "family": "llama"},
                              "model_info": info, "capabilities": ["completion"]})
        else:
            h.send_text(404, "404 page not found")

    def _chat(self, h: _Handler, req: Request) -> None:
        s = self.script
        body = req.body if isinstance(req.body, dict) else {}
        model = body.get("model")
        if not self._authorized(req):
            h.send_json(401, {"error": "unauthorized"})
            return
        if self._failing():
            default = {401: "unauthorized", 404: f'model "{model}" not found, try pulling it first',
                       429: "too many requests", 500: "llama runner process has terminated"}
            headers = {"Retry-After": s.retry_after} if s.retry_after is not None else None
            h.send_json(s.status, {"error": s.message or default.get(s.status, "error")}, headers)
            return
        if not self._known(model):
            h.send_json(404, {"error": f'model "{model}" not found, try pulling it first'})
            return
        deltas = s.deltas()
        shown = s.model or model
        prompt, completion = self._usage(req, deltas)
        final = {"model": shown, "created_at": _now_iso(),
                 "message": {"role": "assistant", "content": ""}, "done": True,
                 "done_reason": s.finish_reason, "total_duration": 1_234_567,
                 "load_duration": 12_345, "prompt_eval_count": prompt,
                 "prompt_eval_duration": 23_456, "eval_count": completion,
                 "eval_duration": 345_678}
        if body.get("stream") is False:
            final["message"]["content"] = "".join(deltas)
            if s.tool_calls:
                final["message"]["tool_calls"] = [{"id": c["id"], "function": {
                    "index": c["index"], "name": c["name"], "arguments": c["arguments"]}}
                    for c in s.calls(self._chat_count)]
            h.send_json(200, final)
            return

        def line(payload: dict) -> bytes:
            return json.dumps(payload, ensure_ascii=False).encode() + (
                b"\r\n\n" if s.split_bytes else b"\n")

        def chunk(i: int, kind: str, text: str) -> bytes:
            message: dict[str, Any] = {"role": "assistant",
                                       "content": text if kind == "content" else ""}
            if kind == "reasoning":
                message["thinking"] = text
            if kind == "tool":
                calls = json.loads(text)
                message["tool_calls"] = [{"id": c["id"], "function": {
                    "index": c["index"], "name": c["name"], "arguments": c["arguments"]}}
                    for c in calls]
            return line({"model": shown, "created_at": _now_iso(), "message": message,
                         "done": False})

        self._stream(
            h, "application/x-ndjson", chunk,
            [line(final)],
            lambda: line({"error": s.message or "an error was encountered while running the model"}),
        )


class _FakeChatCompletions(FakeServer):
    """OpenAI's streamed chat completions over SSE (shared by the Groq and OpenAI fakes)."""

    prefix = ""
    reasoning_field = "reasoning_content"  # vLLM's and DeepSeek's name
    owned_by = "fake"  # what /models says of each model ("vllm" for a vllm serve)

    @property
    def chat_path(self) -> str:  # type: ignore[override]
        return f"{self.prefix}/chat/completions"

    @property
    def base_url(self) -> str:
        return f"{self.url}{self.prefix}"

    def handle(self, h: _Handler, req: Request) -> None:
        if req.path == f"{self.prefix}/models" and req.method == "GET":
            if not self._authorized(req):
                self._error(h, 401)
                return
            h.send_json(200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 1_700_000_000,
                 "owned_by": self.owned_by}
                for m in self.models]})
        elif req.path == self.chat_path and req.method == "POST":
            self._chat(h, req)
        else:
            h.send_json(404, {"error": {"message": f"Unknown request URL: {req.method} {req.path}",
                                        "type": "invalid_request_error", "code": "unknown_url"}})

    def _error(self, h: _Handler, status: int, model: str | None = None,
               message: str | None = None, retry_after: str | None = None) -> None:
        default = {
            401: ("Invalid API Key", "invalid_request_error", "invalid_api_key"),
            404: (f"The model `{model}` does not exist or you do not have access to it.",
                  "invalid_request_error", "model_not_found"),
            429: (f"Rate limit reached for model `{model}` on requests per minute (RPM): "
                  "Limit 30, Used 30, Requested 1. Please try again in 2s.", "requests",
                  "rate_limit_exceeded"),
            500: ("Internal Server Error", "internal_server_error", None),
        }.get(status, ("error", "invalid_request_error", None))
        headers = {"Retry-After": retry_after} if retry_after is not None else None
        h.send_json(status, {"error": {"message": message or default[0], "type": default[1],
                                       "code": default[2]}}, headers)

    def _chat(self, h: _Handler, req: Request) -> None:
        s = self.script
        body = req.body if isinstance(req.body, dict) else {}
        model = body.get("model")
        if not self._authorized(req):
            self._error(h, 401, model)
            return
        if self._failing():
            self._error(h, s.status, model, s.message, s.retry_after)  # type: ignore[arg-type]
            return
        if not self._known(model):
            self._error(h, 404, model)
            return
        deltas = s.deltas()
        shown = s.model or model
        prompt, completion = self._usage(req, deltas)
        cid = f"chatcmpl-{len(self.requests):08d}"
        created = int(time.time())

        def event(choices: list, **more: Any) -> bytes:
            payload = {"id": cid, "object": "chat.completion.chunk", "created": created,
                       "model": shown, "system_fingerprint": "fp_fake", "choices": choices, **more}
            text = json.dumps(payload)
            if s.sse_split:
                cut = text.index(", ") + 1
                return (b": keep-alive\n\nid: " + cid.encode() + b"\ndata: " + text[:cut].encode()
                        + b"\ndata:" + text[cut:].encode() + b"\n\n")
            return b"data: " + text.encode() + b"\n\n"

        def delta(i: int, kind: str, text: str) -> bytes:
            if kind == "tool":
                content: dict[str, Any] = {"tool_calls": [self._tool_delta(json.loads(text))]}
            elif kind == "reasoning":
                content = {self.reasoning_field: text}
            else:
                content = {"content": text}
            if i == 0:
                content = {"role": "assistant", **({"content": None} if kind == "tool" else {}),
                           **content}
            return event([{"index": 0, "delta": content, "logprobs": None, "finish_reason": None}])

        usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                 "total_tokens": prompt + completion}
        final = self._final(event, usage, body)
        self._stream(
            h, "text/event-stream", delta, final + [b"data: [DONE]\n\n"],
            lambda: b"data: " + json.dumps({"error": {
                "message": s.message or "The server had an error while processing your request.",
                "type": "internal_server_error"}}).encode() + b"\n\n",
        )

    def _final(self, event: Any, usage: dict, body: dict) -> list[bytes]:
        raise NotImplementedError

    def _items(self) -> list[tuple[str, str]]:
        """OpenAI's form: a call's first delta has its index, id, type and name with empty
        arguments; the arguments follow in fragments."""
        out = self.script.items()
        for c in self.script.calls(self._chat_count):
            out.append(("tool", json.dumps({"index": c["index"], "id": c["id"], "type": "function",
                                            "function": {"name": c["name"], "arguments": ""}})))
            text = c["text"]
            for k in range(0, len(text), 7):
                out.append(("tool", json.dumps({"index": c["index"],
                                                "function": {"arguments": text[k:k + 7]}})))
        return out

    def _tool_delta(self, item: dict[str, Any]) -> dict[str, Any]:
        return item

    def _finish_reason(self) -> str:
        s = self.script
        calls = s.calls(self._chat_count)
        return "tool_calls" if calls and s.finish_reason == "stop" else s.finish_reason


class FakeGroq(_FakeChatCompletions):
    """Groq's API: SSE ``/openai/v1/chat/completions`` with usage under ``x_groq``, and
    ``/openai/v1/models``. Give the client the bare ``url`` as its base URL."""

    prefix = "/openai/v1"
    reasoning_field = "reasoning"

    def __init__(self, models: list[str] | tuple[str, ...] = ("llama-3.3-70b-versatile",
                                                                "llama-3.1-8b-instant"),
                 key: str | None = "gsk_fake_key_0123456789abcdef"):
        super().__init__(models, key)

    def _final(self, event: Any, usage: dict, body: dict) -> list[bytes]:
        usage = {"queue_time": 0.01, "prompt_time": 0.002, "completion_time": 0.05,
                 "total_time": 0.052, **usage}
        return [event([{"index": 0, "delta": {}, "logprobs": None,
                        "finish_reason": self._finish_reason()}],
                      x_groq={"id": "req_fake", "usage": usage})]

    def _items(self) -> list[tuple[str, str]]:
        """Groq's form: each call whole in one delta (index, id, type, name, arguments)."""
        return self.script.items() + [
            ("tool", json.dumps({"index": c["index"], "id": c["id"], "type": "function",
                                 "function": {"name": c["name"], "arguments": c["text"]}}))
            for c in self.script.calls(self._chat_count)]


class FakeOpenAI(_FakeChatCompletions):
    """An OpenAI-compatible server (as ``vllm serve`` answers): SSE
    ``/v1/chat/completions`` with a usage chunk when asked, and ``/v1/models``.
    Give the client ``base_url`` (it ends in ``/v1``)."""

    prefix = "/v1"
    cached_tokens: int | None = None

    def __init__(self, models: list[str] | tuple[str, ...] = ("Qwen/Qwen3-0.6B", "other-model"),
                 key: str | None = None):
        super().__init__(models, key)

    def _final(self, event: Any, usage: dict, body: dict) -> list[bytes]:
        out = [event([{"index": 0, "delta": {}, "logprobs": None,
                       "finish_reason": self._finish_reason()}])]
        if (body.get("stream_options") or {}).get("include_usage"):
            if self.cached_tokens is not None:
                usage = {**usage, "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}
            out.append(event([], usage=usage))
        return out


__all__ = ["FakeGroq", "FakeOllama", "FakeOpenAI", "FakeServer", "Request", "Script"]
