"""A real notebook, run cell by cell in a real kernel (nbclient), uses a Groq key given
through the environment or a ``.env`` file, talks to a fake Groq server, fails once
against a server that echoes the key back, exports its chats and logs everything at
DEBUG. Then the key's bytes must be in none of: the saved ``.ipynb``, the store, the
exports, the log file.

(``%subchat key`` asks with ``getpass``, which nbclient cannot answer; that path is
covered in a real shell by ``test_remote_secrets.py``.)"""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

from subchat_magics.testing.fakeservers import FakeGroq

KEY = "gsk_NOTEBOOK_secret_4f9a2c7e1b3d5a6f8e0c"

CELLS = [
    "import logging, sys\n"
    "logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, force=True)\n"
    "logging.getLogger().addHandler(logging.FileHandler('kernel.log'))",
    "%load_ext subchat_magics",
    "%%subchat root\nSay hello.",
    "%%subchat root/child --backend groq --model llama-3.1-8b-instant\nAnd then?",
    "%subchat status",
    "%subchat backends",
    "%subchat show root/child -p",
    "from subchat_magics.backends.registry import registry\nregistry().get('groq')",
    "from subchat_magics import SimpleLLMClient\n"
    "SimpleLLMClient(backend='groq').generate_response('root', 'Once more.')",
    "import os\nos.environ['GROQ_BASE_URL'] = {bad_url!r}",  # a server that echoes the key
    "%%subchat root/bad --backend groq\nThis one fails.",
    "os.environ['GROQ_BASE_URL'] = {url!r}",
    "%subchat export root --format md --out export.md",
    "%subchat export root --format json --out export.json",
]


def run_notebook(cwd, url: str, bad_url: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c.replace("{bad_url!r}", repr(bad_url))
                                          .replace("{url!r}", repr(url))) for c in CELLS]
    client = NotebookClient(nb, timeout=60, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def outputs_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        parts.append(out.get("evalue", ""))
        parts.extend(str(v) for v in out.get("data", {}).values())
    return "".join(parts)


@pytest.mark.parametrize("source", ["environment", ".env"])
def test_the_key_is_in_no_saved_file_and_no_log(tmp_path, monkeypatch, source):
    for var in ("LLM_BACKEND", "SUBCHAT_STORE", "GROQ_API_KEY", "GROQ_MODEL", "OPENAI_API_KEY",
                "OPENAI_BASE_URL", "OLLAMA_MODEL", "GROQ_LOG", "SUBCHAT_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OLLAMA_HOST", "http://127.0.0.1:9")  # auto must pick Groq
    with FakeGroq(key=KEY) as server, FakeGroq(key=None) as bad:
        bad.configure(status=401, message=f"Invalid API Key: {KEY}")
        monkeypatch.setenv("GROQ_BASE_URL", server.url)
        if source == "environment":
            monkeypatch.setenv("GROQ_API_KEY", KEY)
        else:
            (tmp_path / ".env").write_text(f"GROQ_API_KEY={KEY}\n")
        nb = run_notebook(tmp_path, server.url, bad.url)
        # the key really was used, by every path that sends
        assert len(server.chat_requests()) == 3
        assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in server.chat_requests())
        assert bad.requests and bad.requests[0].headers["authorization"] == f"Bearer {KEY}"

    texts = [outputs_text(c) for c in nb.cells]
    assert "Hello from the fake server." in texts[2] and "Hello from the fake server." in texts[3]
    assert "backend:  groq" in texts[4]
    assert "GROQ_API_KEY was rejected (401)" in texts[10] and "***" in texts[10]
    saved = tmp_path / "secrets.ipynb"
    nbformat.write(nb, str(saved))
    files = [saved, tmp_path / "export.md", tmp_path / "export.json", tmp_path / "kernel.log",
             *tmp_path.glob("subchats.db*")]
    assert (tmp_path / "subchats.db").exists() and (tmp_path / "export.md").stat().st_size
    log = (tmp_path / "kernel.log").read_text()
    assert "POST" in log and "chat/completions" in log  # the HTTP traffic was logged
    for path in files:
        assert KEY.encode() not in path.read_bytes(), f"the key leaked into {path.name}"
