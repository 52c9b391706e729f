"""A batch row keeps its context (issue 20): the parent chat holds the batch's
instructions, so a long row is never answered without them. The reply room is what the
answer can use (a ``--choice``: its longest choice), it is lowered before anything else,
and a row that cannot fit with its context fails, saying so, counted in the summary.
Through a real shell on the loopback Ollama server (``OLLAMA_NUM_CTX`` fixes the window;
the request bodies say what was sent)."""

from __future__ import annotations

from subchat_magics.session import default_session

INSTRUCTIONS = "Classify each document: answer yes if it mentions a river, else no."


def bodies(ollama) -> dict[str, dict]:
    """The chat requests by the row's own (last) message."""
    return {b["messages"][-1]["content"][:12]: b for b in (r.body for r in ollama.chat_requests())}


def test_a_long_choice_row_keeps_the_instructions_and_a_too_long_one_fails_saying_so(
        shell, ollama, monkeypatch):
    monkeypatch.setenv("OLLAMA_NUM_CTX", "4096")
    shell.ok("%config SubchatMagics.max_value_chars = 0")  # (no cut: the rows are long)
    ollama.configure(reply="yes")
    shell.ok(f"%%subchat root/task --backend ollama\n{INSTRUCTIONS}")
    # ~3,400 tokens (estimated): with 1,000 reply tokens reserved it would not fit, with
    # the 2-3 tokens that "yes"/"no" take it does; ~5,000 tokens cannot fit at all
    shell.ns["docs"] = ["a short one", "long " + "word " * 2000, "huge " + "word " * 3000]
    ollama.configure(reply="yes")
    out = shell.ok("%%subchat root/task --each docs --choice yes,no --best-effort --as labels "
                   "--backend ollama\n{item}")
    assert "3 items, 2 done, 1 failed" in out
    assert "failed: 1 row, e.g. root/task/docs/2: too long to answer with its context" in out
    assert "1 row(s) failed as too long to answer with its context" in out
    assert shell.ns["labels"] == ["yes", "yes", None]
    sent = bodies(ollama)
    assert set(sent) == {"a short one", "long word wo"}  # the huge row was never sent
    long = sent["long word wo"]
    # the instructions went with the long row (nothing dropped), the room left was used
    assert long["messages"][0]["content"] == INSTRUCTIONS
    assert long["options"]["num_ctx"] == 4096
    tree = default_session().tree
    prov = tree.get("root/task/docs/1").messages[1].provenance
    assert not prov.get("dropped_messages") and not prov.get("notes")
    failed = tree.get("root/task/docs/2").messages[1]
    assert failed.status == "error" and "no context was dropped" in failed.provenance["error"]
    assert "lowered" not in out  # room a choice could never use is no loss


def test_a_free_text_row_has_its_reply_room_lowered_not_its_context_dropped(
        shell, ollama, monkeypatch):
    monkeypatch.setenv("OLLAMA_NUM_CTX", "4096")
    shell.ok("%config SubchatMagics.max_value_chars = 0")  # (no cut: the rows are long)
    ollama.configure(reply="A river.")
    shell.ok(f"%%subchat root/task --backend ollama\n{INSTRUCTIONS}")
    shell.ns["docs"] = ["short", "long " + "word " * 2000]
    out = shell.ok("%%subchat root/task --each docs --backend ollama\n{item}")
    assert "2 items, 2 done, 0 failed" in out
    assert "1 row(s) had their reply room (max_tokens) lowered to fit the context window" in out
    long = bodies(ollama)["long word wo"]
    assert long["messages"][0]["content"] == INSTRUCTIONS  # kept
    assert 0 < long["options"]["num_predict"] < 1000
    notes = default_session().tree.get("root/task/docs/1").messages[1].provenance["notes"]
    assert any(n.startswith("max_tokens lowered from 1000 to") for n in notes)
    assert not any(n.startswith("dropped") for n in notes)


def test_a_single_cell_still_drops_its_oldest_turns_as_a_chat_does(shell, ollama, monkeypatch):
    # (a chat is not a batch row: its oldest turns go, with a note, as before)
    monkeypatch.setenv("OLLAMA_NUM_CTX", "4096")
    shell.ok(f"%%subchat root/task --backend ollama\n{INSTRUCTIONS}")
    out = shell.ok("%%subchat root/task --backend ollama\nlong " + "word " * 2000)
    assert "dropped the 1 oldest turn (2 messages)" in out


def test_a_bounded_regex_row_reserves_only_its_longest_match(shell, ollama, monkeypatch):
    monkeypatch.setenv("OLLAMA_NUM_CTX", "4096")
    shell.ok("%config SubchatMagics.max_value_chars = 0")
    ollama.configure(reply="123")
    shell.ok(f"%%subchat root/task --backend ollama\n{INSTRUCTIONS}")
    shell.ns["docs"] = ["short", "long " + "word " * 2000]
    out = shell.ok("%%subchat root/task --each docs --regex '\\d{3}' --best-effort --as codes "
                   "--backend ollama\n{item}")
    assert "2 items, 2 done, 0 failed" in out and "lowered" not in out
    assert shell.ns["codes"] == ["123", "123"]
    assert bodies(ollama)["long word wo"]["messages"][0]["content"] == INSTRUCTIONS
