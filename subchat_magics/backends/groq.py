"""The Groq backend: the official ``groq`` client, streaming chat completions.

Settings (environment, then ``./.env``, or ``%subchat key groq``): ``GROQ_API_KEY``
(required), ``GROQ_MODEL`` (else ``--model``/``%config``, else
``llama-3.3-70b-versatile``), ``GROQ_BASE_URL`` (a proxy or a test server),
``SUBCHAT_TIMEOUT``/``SUBCHAT_CONNECT_TIMEOUT``. Usage comes from ``x_groq.usage``."""

from __future__ import annotations

from typing import Any

from ..errors import BackendUnavailable
from ..settings import getenv, where
from ._remote import ChatCompletionsBackend, Timeouts, installed, safe_url
from .base import Availability, GenerationOptions

DEFAULT_MODEL = "llama-3.3-70b-versatile"
#: models that take ``response_format: json_schema`` (Groq's structured outputs); every
#: model takes ``json_object`` (valid JSON, no schema), used with --best-effort
JSON_SCHEMA_MODELS = ("openai/gpt-oss-", "moonshotai/kimi-k2-", "meta-llama/llama-4-")


class GroqBackend(ChatCompletionsBackend):
    """Streams ``/openai/v1/chat/completions`` from Groq."""

    id = "groq"
    description = "Groq cloud (GROQ_API_KEY)"
    extra = "groq"
    tool_result_names = True  # Groq's tool messages carry the tool's name
    auto_priority = 30
    sdk_module = "groq"
    key_var = "GROQ_API_KEY"
    key_env = key_var  # %subchat key, masking
    url_var = "GROQ_BASE_URL"

    constraints = ("json",)  # on the models of JSON_SCHEMA_MODELS

    def available(self) -> Availability:
        """A key is present (nothing is sent to check it)."""
        if not installed("groq"):
            return Availability(False, "the groq client is not installed; install it with: "
                                       "pip install 'subchat-magics[groq]'")
        if not self.api_key():
            return Availability(False, "GROQ_API_KEY is not set (put it in the environment or "
                                       "./.env, or run %subchat key groq)")
        return Availability(True, f"GROQ_API_KEY is set (from {where('GROQ_API_KEY')})")

    def default_model(self) -> str:
        return getenv("GROQ_MODEL") or DEFAULT_MODEL

    def service(self, base_url: str | None) -> str:
        return "Groq" if not base_url else f"Groq at {safe_url(base_url)}"

    def connection_hint(self) -> str:
        return "check the network connection (or GROQ_BASE_URL, if you set one)"

    def require_key(self, base_url: str | None, key: str | None) -> None:
        if not key:
            raise BackendUnavailable("GROQ_API_KEY is not set: put it in the environment or "
                                     "./.env, or run %subchat key groq", reason="auth")

    def make_client(self, sdk: Any, base_url: str | None, key: str | None, t: Timeouts) -> Any:
        # our own retry loop honours retry-after within a bound; the SDK's would not say so
        return sdk.Groq(api_key=key, base_url=base_url, max_retries=0,
                        timeout=sdk.Timeout(t.read, connect=t.connect))

    def resolve_model(self, client: Any, base_url: str | None, options: GenerationOptions,
                      t: Timeouts) -> str:
        return options.model or self.default_model()

    # -- structured output ---------------------------------------------------------------------
    def cannot_enforce(self, options: GenerationOptions) -> str | None:
        c = options.constraint
        if c is None:
            return None
        if c.kind != "json":
            return f"Groq cannot enforce {c} (it takes a JSON schema only)"
        model = options.model or self.default_model()
        if not model.startswith(JSON_SCHEMA_MODELS) and not _any_object(c):
            return (f"Groq's {model} takes no JSON schema (models that do: "
                    f"{', '.join(p + '*' for p in JSON_SCHEMA_MODELS)})")
        return None

    def request_fields(self, options: GenerationOptions, model: str) -> dict[str, Any]:
        """``response_format``: the JSON schema where the model takes one, else JSON mode
        (best effort: valid JSON, the schema checked when the reply is in)."""
        c = options.constraint
        if c is None or c.kind != "json":
            return {}
        if not model.startswith(JSON_SCHEMA_MODELS):  # JSON mode: any object, enforced
            return {"response_format": {"type": "json_object"}}
        return {"response_format": {"type": "json_schema", "json_schema": {
            "name": "reply", "schema": c.schema or {"type": "object"}}}}


def _any_object(c: Any) -> bool:
    """``--json`` without a schema: any JSON object, which JSON mode enforces."""
    return c.model is None and c.schema == {"type": "object"}
