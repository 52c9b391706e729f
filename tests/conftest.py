"""Shared fixtures: a real IPython InteractiveShell with the extension loaded, working in
a fresh folder (so ``./subchats.db`` is a new store) with no backend settings from the
machine leaking in."""

from __future__ import annotations

import pytest
from IPython.core.interactiveshell import InteractiveShell

from subchat_magics.session import reset_default_session
from subchat_magics.testing import Shell

BACKEND_VARS = ("LLM_BACKEND", "SUBCHAT_STORE", "OLLAMA_HOST", "OLLAMA_MODEL", "GROQ_API_KEY",
                "GROQ_MODEL", "OPENAI_BASE_URL", "OPENAI_API_KEY", "OPENAI_MODEL",
                "SUBCHAT_ECHO_DELAY", "GROQ_BASE_URL", "OLLAMA_API_KEY", "SUBCHAT_TIMEOUT",
                "SUBCHAT_CONNECT_TIMEOUT")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working folder with no backend settings in the environment. Ollama is
    pointed at a closed loopback port so that ``auto`` never finds a real server."""
    for var in BACKEND_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OLLAMA_HOST", "http://127.0.0.1:9")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def shell(workdir):
    """A real InteractiveShell with ``%load_ext subchat_magics`` done, in a fresh folder."""
    reset_default_session()
    ip = InteractiveShell.instance()
    ip.config.pop("SubchatMagics", None)  # %config from an earlier test
    ip.run_cell("%load_ext subchat_magics", store_history=False)
    sh = Shell(ip)
    yield sh
    ip.run_cell("%unload_ext subchat_magics", store_history=False)
    for name in [k for k in ip.user_ns if not k.startswith("_")]:
        if name not in ("In", "Out", "exit", "quit", "get_ipython"):
            ip.user_ns.pop(name, None)
    reset_default_session()
