"""One exchange, one rule: checked, then stored, then streamed — the same for a cell, a
fan-out, a batch, the tree view and the Python API. Every refusal leaves the store as it
was; under ``auto`` a backend that fails before the first token is passed over the same way
for one reply, a fan-out and a batch. Real shell, real client libraries, loopback servers."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from subchat_magics import SimpleLLMClient
from subchat_magics.errors import SubchatError
from subchat_magics.session import default_session, open_tree
from subchat_magics.structured import choice
from subchat_magics.testing import store_rows

ROWS = "SELECT chat_id, seq, role, content, status FROM messages ORDER BY id"
CHATS = "SELECT id, parent_id, name FROM chats ORDER BY id"


def snapshot(workdir):
    db = workdir / "subchats.db"
    return (store_rows(db, CHATS), store_rows(db, ROWS)) if db.exists() else None


def one_line(msg: str) -> str:
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


# every face: a cell, a fan-out, named children, a batch
CELLS = [
    "%%subchat root/x {flags}\nhello",
    "%%subchat root {flags} --fanout 2\nhello",
    "%%subchat root {flags} --children a,b\nhello",
    "%%subchat root {flags} --each qs\nsay {{item}}",
]


@pytest.mark.parametrize("cell", CELLS)
def test_a_bad_timeout_setting_is_refused_before_anything_is_stored(shell, workdir, ollama,
                                                                    monkeypatch, cell):
    shell.ok("%%subchat root --backend echo\nfirst")  # the store holds something
    shell.ns["qs"] = ["a", "b"]
    before = snapshot(workdir)
    monkeypatch.setenv("SUBCHAT_CONNECT_TIMEOUT", "0")
    msg = one_line(shell.fails(cell.format(flags="--backend ollama")))
    assert "SUBCHAT_CONNECT_TIMEOUT must be a number of seconds above 0" in msg
    assert snapshot(workdir) == before


@pytest.mark.parametrize("cell", CELLS)
def test_an_option_the_backend_does_not_take_is_refused(shell, workdir, cell):
    shell.ok("%%subchat root --backend echo\nfirst")
    shell.ns["qs"] = ["a", "b"]
    before = snapshot(workdir)
    msg = one_line(shell.fails(cell.format(flags="--backend echo --num-ctx 8192")))
    assert "the echo backend does not take --num-ctx" in msg
    assert snapshot(workdir) == before


def test_a_bad_num_ctx_value_is_refused_for_ollama_from_the_flag_and_the_setting(
        shell, workdir, ollama, monkeypatch):
    shell.ok("%%subchat root --backend echo\nfirst")
    before = snapshot(workdir)
    assert "at least 256" in one_line(shell.fails("%%subchat root --backend ollama --num-ctx 5\nhi"))
    monkeypatch.setenv("OLLAMA_NUM_CTX", "lots")
    assert "OLLAMA_NUM_CTX" in one_line(shell.fails("%%subchat root --backend ollama\nhi"))
    assert snapshot(workdir) == before


def failing_ollama(server):
    """An Ollama that answers its probe (so ``auto`` picks it first) and fails every chat."""
    server.configure(status=500, message="model crashed")


def test_auto_passes_over_a_backend_failing_before_its_first_token_for_one_reply(
        shell, ollama):
    failing_ollama(ollama)
    out = shell.ok("%%subchat root\nhello")
    assert "echo (1 messages): hello" in out and "ollama failed before its first token" in out
    reply = default_session().tree.get("root").messages[-1]
    assert reply.status == "complete" and reply.provenance["backend"] == "echo"


def test_auto_passes_over_it_for_a_fanout_too(shell, ollama):
    failing_ollama(ollama)
    shell.ok("%%subchat root --fanout 2 --var got\nhello")
    assert shell.ns["got"] == ["echo (1 messages): hello"] * 2
    tree = default_session().tree
    for path in ("root/1", "root/2"):
        reply = tree.get(path).messages[-1]
        assert reply.status == "complete" and reply.provenance["backend"] == "echo"
        assert any("ollama failed before its first token" in n for n in reply.provenance["notes"])


def test_auto_passes_over_it_for_a_batch_too(shell, ollama):
    failing_ollama(ollama)
    shell.ns["qs"] = ["a", "b", "c"]
    out = shell.ok("%%subchat root --each qs --as got\nsay {item}")
    assert "3 items, 3 done, 0 failed" in out
    assert shell.ns["got"] == [f"echo (1 messages): say {q}" for q in "abc"]
    assert {m.provenance["backend"] for c in default_session().tree.children("root/qs")
            for m in c.messages if m.role == "assistant"} == {"echo"}


def test_a_backend_named_does_not_fall_back(shell, ollama):
    failing_ollama(ollama)
    assert "500" in shell.fails("%%subchat root --backend ollama\nhello")
    assert default_session().tree.get("root").messages[-1].status == "error"


# -- one front door ------------------------------------------------------------------------------
def _cell_error(shell, cell: str) -> str:
    return shell.fails(cell).split(": ", 1)[1]


def test_the_python_api_refuses_what_the_magics_refuse(shell, workdir):
    shell.ok("%%subchat root --backend echo\nfirst")
    before = snapshot(workdir)
    tree = open_tree(workdir / "subchats.db")
    client = SimpleLLMClient(backend="groq")
    cases = [  # (the cell, the same through the API)
        ("%%subchat root --backend groq\nhi",
         [lambda: tree.send("root", "hi", backend="groq"),
          lambda: client.generate_response("root", "hi"),
          lambda: tree.batch("root", ["hi"], lambda q, i: q, backend="groq")]),
        ("%%subchat root --backend echo --num-ctx 300\nhi",
         [lambda: tree.send("root", "hi", backend="echo", extra={"num_ctx": 300}),
          lambda: tree.batch("root", ["hi"], lambda q, i: q, backend="echo",
                             extra={"num_ctx": 300})]),
        ("%%subchat root --backend ollama --choice a,b\nhi",
         [lambda: tree.send("root", "hi", backend="ollama", constraint=choice(["a", "b"]))]),
    ]
    try:
        for cell, calls in cases:
            want = _cell_error(shell, cell)
            for call in calls:
                with pytest.raises(SubchatError) as info:
                    call()
                assert str(info.value) == want
            assert snapshot(workdir) == before
    finally:
        tree.close()


def test_the_python_api_uses_the_configured_backend_choice(shell, workdir, monkeypatch):
    monkeypatch.setenv("LLM_BACKEND", "echo")
    tree = open_tree(workdir / "api.db")
    turn = tree.send("root", "hi")
    assert "".join(turn) == "echo (1 messages): hi"
    tree.close()


# -- one reply per chat at a time ----------------------------------------------------------------
@pytest.fixture
def slow(monkeypatch):
    from subchat_magics.backends.registry import registry

    monkeypatch.setenv("SUBCHAT_ECHO_DELAY", "0.02")
    registry().close()
    yield
    registry().close()


def test_a_cell_into_a_chat_with_a_reply_streaming_is_refused(shell, workdir, slow):
    shell.ok("%%subchat root/x --backend echo\nfirst")
    session = default_session()
    turn = session.send("root/x", " ".join(["word"] * 100), backend="echo")  # as the view does
    stopped: list[BaseException] = []

    def run() -> None:  # as the view's thread: its Stop ends the stream with an interrupt
        try:
            turn.run()
        except KeyboardInterrupt as exc:
            stopped.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while not turn.parts and time.monotonic() < deadline:
            time.sleep(0.01)
        before = store_rows(workdir / "subchats.db", ROWS)
        msg = one_line(shell.fails("%%subchat root/x --backend echo\nsecond"))
        assert "a reply is streaming into root/x now" in msg
        for cell in ("%%subchat root/x --backend echo --fanout 1\nx",  # (into its child: fine)
                     ):
            shell.ok(cell)
        assert "streaming into root/x" in one_line(
            shell.fails("%%subchat root --backend echo --children x\nthird"))
        assert store_rows(workdir / "subchats.db", ROWS)[:len(before)] == before
    finally:
        turn.cancel()
        worker.join(10)
    assert len(stopped) == 1 and turn.reply.status == "interrupted"  # stopped, what came kept
    shell.ok("%%subchat root/x --backend echo\nafter it ended")  # free again


def test_the_api_is_refused_while_a_cell_streams_into_the_chat(shell, workdir, slow):
    session = default_session()
    first = session.send("root", "one two three four five six", backend="echo")
    it = iter(first)
    next(it)  # streaming now (the reply row exists)
    with pytest.raises(SubchatError, match="a reply is streaming into root now"):
        session.tree.send("root", "again", backend="echo")
    for _ in it:
        pass
    assert "".join(session.tree.send("root", "again", backend="echo"))


# -- a plugin backend's key ------------------------------------------------------------------------
PLUGIN_KEY = "plk-Zq8wXv2Lm4Np6Rt0Yb3Kc5Hd7Jf9"


@pytest.fixture
def keyed_plugin(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "keyed_plugin.py").write_text(
        "import os\n"
        "from subchat_magics.backends.base import Availability, Backend, Finish\n"
        "from subchat_magics.settings import getenv\n"
        "class Keyed(Backend):\n"
        "    id = 'keyed'\n"
        "    description = 'a test plugin that needs a key'\n"
        "    key_env = 'KEYED_API_KEY'\n"
        "    def configured(self):\n"
        "        ok = bool(getenv('KEYED_API_KEY'))\n"
        "        return Availability(ok, 'KEYED_API_KEY is set' if ok else 'no KEYED_API_KEY')\n"
        "    available = configured\n"
        "    def stream(self, messages, options):\n"
        "        yield 'got: ' + messages[-1]['content']\n"
        "        yield Finish(model='keyed-1')\n")
    dist = site / "keyed_backend-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: keyed-backend\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[subchat_magics.backends]\nkeyed = keyed_plugin:Keyed\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("KEYED_API_KEY", raising=False)
    yield
    sys.modules.pop("keyed_plugin", None)


def test_a_plugin_key_is_asked_for_and_masked_like_groqs(shell, workdir, monkeypatch,
                                                          keyed_plugin):
    shell.ok("%reload_ext subchat_magics")
    assert "no KEYED_API_KEY" in shell.ok("%subchat backends")
    monkeypatch.setattr("getpass.getpass", lambda prompt="": PLUGIN_KEY)  # the user types it
    assert "KEYED_API_KEY set for this kernel" in shell.ok("%subchat key keyed")
    shell.ns["secret"] = f"the key is {PLUGIN_KEY}"
    out = shell.ok("%%subchat root --backend keyed\nplease repeat: {secret}")
    assert PLUGIN_KEY not in out and "got: please repeat: the key is ***" in out
    assert "masked" in out
    for p in workdir.glob("subchats.db*"):
        assert PLUGIN_KEY.encode() not in p.read_bytes()
    export = shell.ok("%subchat export root --format json")
    assert PLUGIN_KEY not in export


def test_backends_lists_each_declared_key_and_own_option(shell, keyed_plugin):
    shell.ok("%reload_ext subchat_magics")
    listing = shell.ok("%subchat backends").splitlines()
    line = {x.split()[0]: x for x in listing}
    assert "key KEYED_API_KEY (%subchat key keyed)" in line["keyed"]
    assert "key GROQ_API_KEY (%subchat key groq)" in line["groq"]
    assert "own options --num-ctx" in line["ollama"] and "own options" not in line["echo"]
