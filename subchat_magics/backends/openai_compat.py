"""Any OpenAI-compatible server (``vllm serve``, llama.cpp's server, LM Studio, TGI,
OpenAI itself) through the official ``openai`` client.

Settings (environment, then ``./.env``): ``OPENAI_BASE_URL`` (e.g.
``http://127.0.0.1:8000/v1``; default OpenAI's API), ``OPENAI_API_KEY`` (optional for
local servers; ``%subchat key openai``), ``OPENAI_MODEL`` (else ``--model``/``%config``,
else the first model the server lists at ``/models``),
``SUBCHAT_TIMEOUT``/``SUBCHAT_CONNECT_TIMEOUT``."""

from __future__ import annotations

from typing import Any

from ..errors import BackendUnavailable
from ..settings import getenv, where
from ._remote import (
    Call,
    ChatCompletionsBackend,
    Memo,
    Timeouts,
    failure,
    installed,
    safe_url,
    secret_digest,
)
from .base import Availability, GenerationOptions

#: sent when no key is set: local servers ignore it, the SDK insists on one
NO_KEY = "EMPTY"
MODELS_TTL_S = 60.0


def pooled_transport(httpx: Any) -> Any:
    """An ``httpx`` transport whose pool keeps enough connections for a fan-out or a batch
    (a connection goes back to it once :func:`~._remote.sse_data` has read a reply's body
    to its end, which the SDK's own stream reader does not do: it stops at ``[DONE]``)."""
    return httpx.HTTPTransport(limits=httpx.Limits(max_connections=1000,
                                                   max_keepalive_connections=100,
                                                   keepalive_expiry=5.0))


class OpenAIBackend(ChatCompletionsBackend):
    """Streams ``/chat/completions`` from an OpenAI-compatible server."""

    id = "openai"
    description = "any OpenAI-compatible server (OPENAI_BASE_URL): vllm serve, llama.cpp, LM Studio"
    extra = "openai"
    # never picked by auto: a base URL alone does not say the server is up or wanted
    sdk_module = "openai"
    key_var = "OPENAI_API_KEY"
    key_env = key_var  # %subchat key, masking
    url_var = "OPENAI_BASE_URL"
    ask_usage = True
    url_hint = " (it usually ends in /v1)"

    constraints = ("json",)  # response_format; --choice/--regex where the server is vLLM

    def __init__(self) -> None:
        super().__init__()
        self._first_model = Memo(MODELS_TTL_S)  # (url, key digest) -> the first model listed
        self._vllm = Memo(MODELS_TTL_S)  # (url, key digest) -> whether /models says vllm

    def available(self) -> Availability:
        """A server URL or a key is configured (nothing is sent to check it)."""
        if not installed("openai"):
            return Availability(False, "the openai client is not installed; install it with: "
                                       "pip install 'subchat-magics[openai]'")
        url = self.base_url()
        if url:
            return Availability(True, f"OPENAI_BASE_URL is {safe_url(url)}")
        if self.api_key():
            return Availability(True, f"OPENAI_API_KEY is set (from {where('OPENAI_API_KEY')}); "
                                      "using api.openai.com")
        return Availability(False, "neither OPENAI_BASE_URL nor OPENAI_API_KEY is set: "
                                   "set OPENAI_BASE_URL to your server (e.g. "
                                   "http://127.0.0.1:8000/v1 for `vllm serve`), or OPENAI_API_KEY "
                                   "for OpenAI's API")

    def default_model(self) -> str | None:
        return getenv("OPENAI_MODEL")

    def service(self, base_url: str | None) -> str:
        return f"the server at {safe_url(base_url)}" if base_url else "the OpenAI API"

    def connection_hint(self) -> str:
        return "is it running at that address? (set OPENAI_BASE_URL, e.g. http://127.0.0.1:8000/v1)"

    def require_key(self, base_url: str | None, key: str | None) -> None:
        if not base_url and not key:
            raise BackendUnavailable(
                "set OPENAI_BASE_URL to your server (e.g. http://127.0.0.1:8000/v1 for "
                "`vllm serve`), or OPENAI_API_KEY for OpenAI's API", reason="config")

    def make_client(self, sdk: Any, base_url: str | None, key: str | None, t: Timeouts) -> Any:
        timeout = sdk.Timeout(t.read, connect=t.connect)
        return sdk.OpenAI(api_key=key or NO_KEY, base_url=base_url, max_retries=0, timeout=timeout,
                          http_client=sdk.DefaultHttpxClient(
                              timeout=timeout, transport=pooled_transport(self._transport())))

    def stream_batch(self, requests: Any) -> Any:
        # the SDK imported here, on the caller's thread: the fan-out's threads importing
        # openai (and httpx under it) at once can meet a partly initialised httpx
        self._sdk()
        self._transport()
        return super().stream_batch(requests)

    def resolve_model(self, client: Any, base_url: str | None, options: GenerationOptions,
                      t: Timeouts) -> str:
        model = options.model or self.default_model()
        if model:
            return model

        def first() -> str:
            names = self._list_models(client, base_url, t)
            if not names:
                raise failure(f"{self.service(base_url)} lists no model; pass --model or set "
                              "OPENAI_MODEL", "model")
            return names[0]

        return self._first_model.get((base_url, secret_digest(self.api_key())), first)

    # -- structured output ---------------------------------------------------------------------
    def is_vllm(self) -> bool:
        """Whether the server is vLLM (``vllm serve``): its ``/models`` say ``owned_by:
        "vllm"``. Asked once a minute per server; a server that does not answer is not."""
        client, base_url, t = self.client()

        def ask() -> bool:
            try:
                listed = client.models.list()
                owners = {getattr(m, "owned_by", None)
                          for m in getattr(listed, "data", None) or listed}
            except Exception:  # noqa: BLE001 - cannot tell: the request itself will say what is wrong
                owners = set()
            return "vllm" in owners

        return self._vllm.get((base_url, secret_digest(self.api_key())), ask)

    def cannot_enforce(self, options: GenerationOptions) -> str | None:
        c = options.constraint
        if c is None or c.kind in self.constraints:
            return None
        if self.is_vllm():
            return None
        return (f"{self.service(self.base_url())} is not a vLLM server (its /models do not say "
                f"owned_by vllm), and only vLLM's server enforces {c}")

    def request_fields(self, options: GenerationOptions, model: str) -> dict[str, Any]:
        """``response_format`` with the JSON schema; for ``--choice``/``--regex`` vLLM's own
        ``structured_outputs`` field (in the body, beside OpenAI's fields)."""
        c = options.constraint
        if c is None:
            return {}
        if c.kind == "json":
            return {"response_format": {"type": "json_schema", "json_schema": {
                "name": "reply", "schema": c.schema or {"type": "object"}, "strict": True}}}
        if not self.is_vllm():
            return {}  # best effort: sent as asked, validated when it is in
        spec = {"choice": list(c.choices)} if c.kind == "choice" else {"regex": c.pattern}
        return {"extra_body": {"structured_outputs": spec}}

    def close(self) -> None:
        super().close()
        self._first_model.clear()
        self._vllm.clear()

    def auth_error(self, call: Call, code: int, text: str) -> Any:
        if not self.api_key():
            return failure(f"{call.service} wants a key ({code}): {text}; set OPENAI_API_KEY in "
                           "the environment or ./.env, or run %subchat key openai", "auth")
        return super().auth_error(call, code, text)
