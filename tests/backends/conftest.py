"""Fixtures for the remote backends: loopback fake servers (from
``subchat_magics.testing.fakeservers``) and the environment pointed at them. The shared
``shell``/``workdir`` fixtures come from ``tests/conftest.py``."""

from __future__ import annotations

import pytest

from subchat_magics.backends.registry import registry
from subchat_magics.settings import forget_secrets
from subchat_magics.testing.fakeservers import FakeGroq, FakeOllama, FakeOpenAI

# settings the remote backends read, beyond those tests/conftest.py clears
REMOTE_VARS = ("GROQ_BASE_URL", "OLLAMA_API_KEY", "SUBCHAT_TIMEOUT", "SUBCHAT_CONNECT_TIMEOUT",
               "GROQ_LOG", "OPENAI_LOG")


@pytest.fixture(autouse=True)
def remote_env(monkeypatch):
    """No remote setting from the machine leaks in; shared backend instances (and their
    pooled connections) are dropped after each test."""
    for var in REMOTE_VARS:
        monkeypatch.delenv(var, raising=False)
    forget_secrets()  # keys entered with %subchat key live for the process: one test's only
    yield
    forget_secrets()
    registry().close()


@pytest.fixture
def ollama(workdir, monkeypatch):
    """A fake Ollama server; ``OLLAMA_HOST`` points at it."""
    with FakeOllama() as server:
        monkeypatch.setenv("OLLAMA_HOST", server.url)
        yield server


@pytest.fixture
def groq(workdir, monkeypatch):
    """A fake Groq API; ``GROQ_BASE_URL`` points at it and ``GROQ_API_KEY`` is its key."""
    with FakeGroq() as server:
        monkeypatch.setenv("GROQ_BASE_URL", server.url)
        monkeypatch.setenv("GROQ_API_KEY", server.key)
        yield server


@pytest.fixture
def openai_server(workdir, monkeypatch):
    """A fake OpenAI-compatible server (no key needed); ``OPENAI_BASE_URL`` points at it."""
    with FakeOpenAI() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        yield server


def last_reply(path: str = "root"):
    """The last stored message of chat ``path`` in the default session's tree."""
    from subchat_magics.session import default_session

    return default_session().tree.get(path).messages[-1]
