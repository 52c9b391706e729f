"""Which backend answers: the ``auto`` order (vLLM → Ollama → Groq → echo) with live fake
servers, every override level, the ``.env`` file, and failures that must never switch
backends silently."""

from __future__ import annotations

import os
import sys

from .conftest import last_reply


def test_auto_prefers_a_live_ollama_over_groq(shell, ollama, groq):
    shell.ok("%%subchat root\nhello")
    assert len(ollama.chat_requests()) == 1 and groq.chat_requests() == []
    assert last_reply().provenance["backend"] == "ollama"
    status = shell.ok("%subchat status")
    assert "backend:  ollama (asked for 'auto' by default)" in status
    assert "passed over vllm" in status and "passed over ollama" not in status


def test_auto_passes_over_a_silent_ollama_for_groq_and_status_says_why(shell, groq):
    # tests/conftest.py points OLLAMA_HOST at a closed port
    shell.ok("%%subchat root\nhello")
    assert len(groq.chat_requests()) == 1
    assert last_reply().provenance["backend"] == "groq"
    status = shell.ok("%subchat status")
    assert "backend:  groq" in status
    assert "passed over ollama: no Ollama server answers at http://127.0.0.1:9" in status
    assert groq.key not in status


def test_auto_falls_back_to_echo_with_no_server_and_no_key(shell, workdir):
    assert shell.ok("%%subchat root\nhello").strip() == "echo (1 messages): hello"
    status = shell.ok("%subchat status")
    assert "passed over ollama" in status and "passed over groq: GROQ_API_KEY is not set" in status


def test_auto_skips_an_ollama_without_models(shell, groq, monkeypatch):
    from subchat_magics.testing.fakeservers import FakeOllama

    with FakeOllama(models=[]) as empty:
        monkeypatch.setenv("OLLAMA_HOST", empty.url)
        shell.ok("%%subchat root\nhello")
        status = shell.ok("%subchat status")
    assert len(groq.chat_requests()) == 1
    assert "has no model pulled" in status


def test_auto_passes_over_an_ollama_that_fails_before_its_first_token(shell, ollama, groq):
    ollama.configure(status=500)
    out = shell.ok("%%subchat root\nhello")
    assert "Hello from the fake server." in out
    assert "note: ollama failed before its first token" in out and "used groq" in out
    reply = last_reply()
    assert reply.provenance["backend"] == "groq"
    assert any("ollama failed" in n for n in reply.provenance["notes"])


def test_under_auto_a_failure_after_the_first_token_is_not_switched(shell, ollama, groq):
    ollama.configure(chunks=["one ", "two ", "three"], cut_after=2)
    msg = shell.fails("%%subchat root\ncount")
    assert "cut after 2 chunks" in msg
    assert groq.chat_requests() == []
    assert (last_reply().content, last_reply().provenance["backend"]) == ("one two ", "ollama")


def test_an_explicit_backend_that_fails_is_an_error_never_a_switch(shell, ollama, groq):
    ollama.configure(status=500)
    msg = shell.fails("%%subchat root --backend ollama\nhello")
    assert "failed (500)" in msg
    shell.ok("%subchat backend ollama")
    msg = shell.fails("%%subchat root\nhello")
    assert "failed (500)" in msg
    assert groq.chat_requests() == []


def test_every_override_level_in_order(shell, ollama, groq, openai_server, monkeypatch):
    def answered() -> str:
        return last_reply().provenance["backend"]

    shell.ok("%%subchat root\n1")
    assert answered() == "ollama"  # auto
    monkeypatch.setenv("LLM_BACKEND", "groq")
    shell.ok("%%subchat root\n2")
    assert answered() == "groq"  # LLM_BACKEND beats auto
    shell.ok("%config SubchatMagics.backend = 'openai'")
    shell.ok("%%subchat root\n3")
    assert answered() == "openai"  # %config beats LLM_BACKEND
    shell.ok("%subchat backend ollama")
    shell.ok("%%subchat root\n4")
    assert answered() == "ollama"  # %subchat backend beats %config
    shell.ok("%%subchat root --backend groq\n5")
    assert answered() == "groq"  # --backend beats everything
    shell.ok("%%subchat root\n6")
    assert answered() == "ollama"  # ...for its own cell only
    assert [len(s.chat_requests()) for s in (ollama, groq, openai_server)] == [3, 2, 1]


def test_llm_backend_in_a_dotenv_file_is_read(shell, ollama, openai_server, workdir):
    (workdir / ".env").write_text("LLM_BACKEND=openai\n")
    shell.ok("%%subchat root\nhello")
    assert last_reply().provenance["backend"] == "openai"
    assert "LLM_BACKEND in .env" in shell.ok("%subchat status")


def test_groq_settings_from_a_dotenv_file_and_nothing_in_the_environment(shell, workdir):
    from subchat_magics.testing.fakeservers import FakeGroq

    with FakeGroq(key="gsk_from_dotenv_0123456789abcdef") as server:
        (workdir / ".env").write_text(
            f"GROQ_API_KEY=gsk_from_dotenv_0123456789abcdef\nGROQ_BASE_URL={server.url}\n"
            "GROQ_MODEL=llama-3.1-8b-instant\n")
        shell.ok("%%subchat root\nhello")  # auto: no Ollama, a Groq key in .env
        [req] = server.chat_requests()
        assert req.headers["authorization"] == "Bearer gsk_from_dotenv_0123456789abcdef"
        assert req.body["model"] == "llama-3.1-8b-instant"
        assert "GROQ_API_KEY" not in os.environ
        assert "GROQ_API_KEY is set (from .env)" in shell.ok("%subchat backends")


def test_ollama_settings_from_a_dotenv_file(shell, workdir, monkeypatch):
    from subchat_magics.testing.fakeservers import FakeOllama

    monkeypatch.delenv("OLLAMA_HOST")
    with FakeOllama() as server:
        (workdir / ".env").write_text(f"OLLAMA_HOST={server.url}\nOLLAMA_MODEL=qwen3:0.6b\n")
        shell.ok("%%subchat root\nhello")
        assert server.chat_requests()[-1].body["model"] == "qwen3:0.6b"
    assert last_reply().provenance["backend"] == "ollama"


def test_a_missing_client_library_is_a_hint_not_a_crash(shell, workdir, monkeypatch):
    monkeypatch.setenv("GROQ_API_KEY", "gsk_present_but_no_sdk_0123")
    monkeypatch.setitem(sys.modules, "groq", None)  # as if not installed
    backends = shell.ok("%subchat backends")
    assert "pip install 'subchat-magics[groq]'" in backends
    assert shell.ok("%%subchat root\nhi").strip() == "echo (1 messages): hi"  # auto goes on
    msg = shell.fails("%%subchat root --backend groq\nhi")
    assert "pip install 'subchat-magics[groq]'" in msg
