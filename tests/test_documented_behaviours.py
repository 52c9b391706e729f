"""Behaviours the README promises that no other test pinned down, each through a real
InteractiveShell with the real echo backend or a loopback fake server (nothing of ours
patched): fan-out temperatures and seeds, the ``%config`` defaults, ``auto`` never picking
``openai``, ``SUBCHAT_CONNECT_TIMEOUT``, and ``delete root --force``."""

from __future__ import annotations

import socket

import pytest

from subchat_magics.backends.registry import registry
from subchat_magics.testing import store_rows
from subchat_magics.testing.fakeservers import FakeOllama, FakeOpenAI


@pytest.fixture
def ollama(workdir, monkeypatch):
    with FakeOllama(models=["m1", "m2"]) as server:
        monkeypatch.setenv("OLLAMA_HOST", server.url)
        yield server
    registry().close()  # pooled connections to the server just stopped


def _options(server):
    return [r.body["options"] for r in server.chat_requests()]


# -- fan-out -----------------------------------------------------------------------------------
def test_fanout_without_a_temperature_samples_at_0_7_with_seeds_1_to_n(shell, ollama):
    shell.ok("%%subchat root --backend ollama --fanout 3\nthree ideas")
    opts = _options(ollama)
    assert sorted((o["temperature"], o["seed"]) for o in opts) == [(0.7, 1), (0.7, 2), (0.7, 3)]


def test_fanout_temperatures_give_each_subchat_its_own(shell, ollama):
    shell.ok("%%subchat root --backend ollama --children a,b,c --temperatures 0,0.5,1\nx")
    by_chat = {r.body["messages"][-1]["content"]: r for r in ollama.chat_requests()}
    assert len(by_chat) == 1  # the same message into each child...
    temps = sorted(o["temperature"] for o in _options(ollama))
    assert temps == [0.0, 0.5, 1.0]  # ...each at its own temperature


def test_one_temperature_in_temperatures_applies_to_all(shell, ollama):
    shell.ok("%%subchat root --backend ollama --fanout 2 --temperatures 0.2\nx")
    assert [o["temperature"] for o in _options(ollama)] == [0.2, 0.2]


def test_fanout_with_a_temperature_uses_it_for_every_subchat(shell, ollama):
    shell.ok("%%subchat root --backend ollama --fanout 2 --temperature 0.3\nx")
    assert [o["temperature"] for o in _options(ollama)] == [0.3, 0.3]


def test_temperatures_need_a_fanout(shell, workdir):
    msg = shell.fails("%%subchat root --temperatures 0.1,0.2\nx")
    assert "--fanout" in msg
    assert not (workdir / "subchats.db").exists() or store_rows(
        workdir / "subchats.db", "SELECT * FROM messages") == []


# -- %config defaults ----------------------------------------------------------------------------
def test_config_system_prompt_is_used_when_no_chat_on_the_path_sets_one(shell):
    shell.ok("%config SubchatMagics.system_prompt = 'Be brief.'")
    # the echo counts the messages it got: the default system prompt is one of them
    assert shell.ok("%%subchat root\nhi").strip() == "echo (2 messages): hi"
    shell.ok("%%subchat root/own -s 'Be long.'\nhi")  # a chat's own prompt wins
    from subchat_magics.session import default_session

    context = default_session().tree.context("root/own", "next")
    assert [m["content"] for m in context if m["role"] == "system"] == ["Be long."]


def test_config_model_is_sent_to_the_server(shell, ollama):
    shell.ok("%config SubchatMagics.model = 'm2'")
    shell.ok("%%subchat root --backend ollama\nhi")
    assert ollama.chat_requests()[-1].body["model"] == "m2"
    shell.ok("%%subchat root --backend ollama -m m1\nhi")  # the cell's flag wins
    assert ollama.chat_requests()[-1].body["model"] == "m1"


def test_config_think_asks_the_server_to_think(shell, ollama):
    shell.ok("%%subchat root --backend ollama\nhi")
    assert ollama.chat_requests()[-1].body.get("think", False) is False  # off by default
    shell.ok("%config SubchatMagics.think = True")
    shell.ok("%%subchat root --backend ollama\nhi")
    assert ollama.chat_requests()[-1].body["think"] is True
    shell.ok("%%subchat root --backend ollama --no-think\nhi")
    assert ollama.chat_requests()[-1].body.get("think", False) is False


# (--format text and %config SubchatMagics.format need a kernel's display: test_kernel_display.py)


def test_config_update_interval_is_checked_and_kept(shell, caplog):
    shell.ok("%config SubchatMagics.update_interval = 0.5")
    assert shell.ip.find_cell_magic("subchat").__self__.update_interval == 0.5
    shell.ok("%config SubchatMagics.update_interval = 99")  # refused: logged by %config
    assert any("update_interval" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert shell.ip.find_cell_magic("subchat").__self__.update_interval == 0.5
    # (that updates follow it is counted through a real kernel: test_kernel_display.py)


# -- backend selection -----------------------------------------------------------------------
def test_auto_never_picks_openai_even_when_its_server_answers(shell, monkeypatch):
    with FakeOpenAI() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        out = shell.ok("%%subchat root\nhi")
        assert out.strip() == "echo (1 messages): hi"
        assert server.chat_requests() == []
        assert shell.ok("%%subchat root --backend openai\nhi").strip() == "Hello from the fake server."
    registry().close()


def test_connect_timeout_is_the_setting(shell, monkeypatch):
    # a listening socket that never accepts, its backlog full: a new connection hangs
    # in the handshake until the client gives up
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        monkeypatch.setenv("OLLAMA_HOST", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("SUBCHAT_CONNECT_TIMEOUT", "0.4")
        msg = shell.fails("%%subchat root --backend ollama -m m1\nhi")
        assert "did not accept a connection within 0.4 s" in msg and "SUBCHAT_CONNECT_TIMEOUT" in msg
        monkeypatch.setenv("SUBCHAT_CONNECT_TIMEOUT", "0")
        msg = shell.fails("%%subchat root --backend ollama -m m1\nhi")
        assert "SUBCHAT_CONNECT_TIMEOUT must be a number of seconds above 0" in msg
    finally:
        for s in fillers:
            s.close()
        server.close()
        registry().close()


# -- the tree ------------------------------------------------------------------------------------
def test_delete_root_with_force_empties_the_tree(shell, workdir):
    shell.ok("%%subchat root\nhello")
    shell.ok("%%subchat root/a\nx")
    shell.ok("%%subchat root/a/b\ny")
    assert "--force" in shell.fails("%subchat delete root")
    assert store_rows(workdir / "subchats.db", "SELECT COUNT(*) FROM messages") == [(6,)]
    shell.ok("%subchat delete root --force")
    assert store_rows(workdir / "subchats.db", "SELECT name FROM chats") == [("root",)]
    assert store_rows(workdir / "subchats.db", "SELECT * FROM messages") == []
    assert shell.ok("%%subchat root\nafresh").strip() == "echo (1 messages): afresh"
