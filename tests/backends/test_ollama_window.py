"""Ollama's context window and thinking, as the requests carry them (FakeOllama records
each request; ``/api/show`` says the model's context length): ``num_ctx`` is sent with
every request, grows with the chat in powers of two up to the model's limit, comes from
``--num-ctx`` or ``OLLAMA_NUM_CTX`` when given, and a chat that cannot fit is fitted by
vLLM's rule with a note, never cut silently by the server. Thinking is off
(``think: false``) unless ``--think``."""

from __future__ import annotations

import pytest

from subchat_magics.testing import store_rows

from .conftest import last_reply


def sent(ollama) -> dict:
    return ollama.chat_requests()[-1].body


def test_num_ctx_is_sent_with_every_request_and_think_is_off(shell, ollama):
    shell.ok("%%subchat root --backend ollama\nhello")
    body = sent(ollama)
    assert body["options"]["num_ctx"] == 4096  # a short chat: the floor
    assert body["think"] is False
    assert last_reply().provenance["num_ctx"] == 4096  # in the reply's provenance
    shell.ok("%%subchat root --backend ollama --think\nhello again")
    assert sent(ollama)["think"] is True


def test_num_ctx_grows_with_the_chat_in_powers_of_two(shell, ollama):
    long = "word " * 6000  # 30,000 bytes: ~10,000 tokens estimated
    shell.ok(f"%%subchat root --backend ollama -n 500\nRead this: {long}")
    assert sent(ollama)["options"]["num_ctx"] == 16384
    assert len(sent(ollama)["messages"]) == 1  # nothing dropped: it fits the model (131072)


def test_a_chat_longer_than_the_models_window_drops_its_oldest_turns_with_a_note(shell, ollama):
    ollama.context_length = 8192
    page = "word " * 3000  # ~5,000 tokens estimated per message
    for i in range(3):
        shell.ok(f"%%subchat root --backend ollama -n 200\nPage {i}: {page}")
    body = sent(ollama)
    assert body["options"]["num_ctx"] == 8192  # the model's limit, not more
    # only the newest message fits: the two older turns (4 messages) were dropped
    assert [m["content"][:7] for m in body["messages"]] == ["Page 2:"]
    notes = last_reply().provenance["notes"]
    assert "dropped the 2 oldest turns (4 messages) to fit num_ctx 8192" in notes
    assert any("estimated" in n for n in notes)


def test_the_newest_message_alone_too_long_is_an_error_saying_what_to_do(shell, ollama):
    ollama.context_length = 4096
    book = "word " * 20000
    result, cap = shell.run(f"%%subchat root --backend ollama\n{book}")
    text = str(result.error_in_exec) + cap.stdout + cap.stderr
    assert "the message is too long for the context window" in text
    assert "num_ctx is 4096" in text
    assert not ollama.chat_requests()  # nothing was sent


def test_max_tokens_is_lowered_to_what_the_window_leaves(shell, ollama):
    ollama.context_length = 4096
    page = "word " * 1200  # ~2,000 tokens estimated, of 4096
    shell.ok(f"%%subchat root --backend ollama -n 4000\n{page}")
    body = sent(ollama)
    assert body["options"]["num_ctx"] == 4096
    assert body["options"]["num_predict"] < 4000
    assert any(n.startswith("max_tokens lowered from 4000 to") and n.endswith("to fit num_ctx 4096")
               for n in last_reply().provenance["notes"])


def test_num_ctx_comes_from_the_flag_then_the_environment(shell, ollama, monkeypatch):
    monkeypatch.setenv("OLLAMA_NUM_CTX", "6000")
    shell.ok("%%subchat root --backend ollama\nhello")
    assert sent(ollama)["options"]["num_ctx"] == 6000
    shell.ok("%%subchat root --backend ollama --num-ctx 2048 -n 100\nhello")
    assert sent(ollama)["options"]["num_ctx"] == 2048


BAD_NUM_CTX = [("--num-ctx 10", "--num-ctx"), ("", "OLLAMA_NUM_CTX")]


def _send_bad_num_ctx(shell, ollama, monkeypatch, line) -> str:
    if not line:
        monkeypatch.setenv("OLLAMA_NUM_CTX", "lots")
    return shell.fails(f"%%subchat root --backend ollama {line}\nhello")  # a UsageError


def _rows(workdir) -> list:
    return [store_rows(workdir / "subchats.db", f"SELECT * FROM {t} ORDER BY id")
            for t in ("chats", "messages")]


@pytest.mark.parametrize("line, where", BAD_NUM_CTX)
def test_a_bad_num_ctx_is_one_line(shell, ollama, monkeypatch, line, where):
    msg = _send_bad_num_ctx(shell, ollama, monkeypatch, line)
    assert msg.startswith("%%subchat: ") and "\n" not in msg.strip(), msg
    assert f"{where} must be a whole number of tokens, at least 256" in msg
    assert not ollama.chat_requests()


@pytest.mark.parametrize("line, where", BAD_NUM_CTX)
def test_a_bad_num_ctx_leaves_the_store_unchanged(shell, ollama, workdir, monkeypatch, line, where):
    shell.ok("%%subchat root --backend ollama\nfirst")
    ollama.configure(reply="never sent")
    before = _rows(workdir)
    _send_bad_num_ctx(shell, ollama, monkeypatch, line)
    assert _rows(workdir) == before


def test_a_server_that_does_not_say_the_models_length_gets_what_the_chat_needs(shell, ollama):
    ollama.context_length = None
    long = "word " * 60000  # ~100,000 tokens estimated
    shell.ok(f"%%subchat root --backend ollama -n 100\n{long}")
    assert sent(ollama)["options"]["num_ctx"] == 131072
