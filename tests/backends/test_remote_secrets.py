"""Keys stay secret: never in reprs, error messages, tracebacks we raise, status output,
stored provenance or the store file, whichever way they were given."""

from __future__ import annotations

import os

import pytest

from subchat_magics.backends.base import GenerationOptions, collect
from subchat_magics.backends.registry import registry
from subchat_magics.errors import BackendError

from .conftest import last_reply

GROQ_KEY = "gsk_SECRET_groq_key_0123456789abcdefXYZ"


def test_reprs_show_at_most_the_last_four_characters(workdir, monkeypatch):
    monkeypatch.setenv("GROQ_API_KEY", GROQ_KEY)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-SECRET-openai-0123456789abcdefXYZ")
    monkeypatch.setenv("OLLAMA_API_KEY", "ollama-SECRET-0123456789abcdefXYZ")
    for name, key in (("groq", GROQ_KEY), ("openai", "sk-SECRET-openai-0123456789abcdefXYZ"),
                      ("ollama", "ollama-SECRET-0123456789abcdefXYZ")):
        text = repr(registry().get(name)) + str(registry().get(name))
        assert key not in text and "SECRET" not in text
        assert f"…{key[-4:]}" in text  # enough to tell which key is in use


@pytest.mark.parametrize("script", [
    dict(status=401, message=f"Invalid API Key {GROQ_KEY}"),
    dict(status=500, message=f"upstream rejected {GROQ_KEY}"),
    dict(status=429, retry_after="60", message=f"slow down {GROQ_KEY}"),
    dict(chunks=["a ", "b"], error_after=1, message=f"boom {GROQ_KEY}"),
])
def test_a_server_echoing_the_key_never_gets_it_into_our_errors(workdir, monkeypatch, script):
    from subchat_magics.testing.fakeservers import FakeGroq

    with FakeGroq(key=GROQ_KEY) as server:
        monkeypatch.setenv("GROQ_BASE_URL", server.url)
        monkeypatch.setenv("GROQ_API_KEY", GROQ_KEY)
        server.configure(**script)
        with pytest.raises(BackendError) as info:
            collect(registry().get("groq").stream([{"role": "user", "content": "hi"}],
                                                  GenerationOptions()))
    exc = info.value
    assert GROQ_KEY not in str(exc) and "***" in str(exc)
    # we raise our own error alone: no SDK exception (with its message) chained to it
    assert exc.__cause__ is None and exc.__suppress_context__


def test_a_key_entered_with_subchat_key_is_used_and_shown_nowhere(shell, workdir, monkeypatch):
    from subchat_magics.testing.fakeservers import FakeGroq

    monkeypatch.setattr("getpass.getpass", lambda prompt="": GROQ_KEY)  # the user types it
    with FakeGroq(key=GROQ_KEY) as server:
        monkeypatch.setenv("GROQ_BASE_URL", server.url)
        outputs = [shell.ok("%subchat key groq")]
        outputs.append(shell.ok("%%subchat root\nhello"))  # auto: the key makes Groq available
        assert server.chat_requests()[-1].headers["authorization"] == f"Bearer {GROQ_KEY}"
        server.configure(status=401, message=f"Invalid API Key {GROQ_KEY}")
        outputs.append(shell.fails("%%subchat root --backend groq\nagain"))
        for cell in ("%subchat status", "%subchat show root -p",
                     "%subchat export root --format json", "%subchat export root --format md",
                     "%subchat backend groq"):
            outputs.append(shell.ok(cell))
        backends = shell.ok("%subchat backends")
        outputs.append(backends)
    assert last_reply().provenance["backend"] == "groq"
    assert "GROQ_API_KEY is set (from %subchat key)" in backends
    for out in outputs:
        assert GROQ_KEY not in out
    assert GROQ_KEY not in os.environ.values()
    assert all(GROQ_KEY.encode() not in p.read_bytes() for p in workdir.glob("subchats.db*"))
