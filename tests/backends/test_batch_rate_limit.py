"""A rate limit in the middle of a batch (issue 20): when the server asks for longer
than one request's own retries allow, the whole batch pauses for as long as it asks
(nothing new is sent meanwhile), then resends the rate-limited rows and goes on; past
``SUBCHAT_RATE_LIMIT_PAUSE`` seconds of pauses those rows fail as before. Through a real
shell on the loopback Groq and Ollama servers (their own clients, real 429 answers)."""

from __future__ import annotations

import pytest

from subchat_magics.session import default_session
from subchat_magics.testing import store_rows

MESSAGES = "SELECT chat_id, role, content, status FROM messages ORDER BY id"


@pytest.mark.parametrize("fixture", ["groq", "ollama"])
def test_a_batch_pauses_for_a_rate_limit_then_sends_every_row_once(shell, request, fixture,
                                                                    workdir):
    server = request.getfixturevalue(fixture)
    # every request of the first wave is refused, and each one's own retries too (2 each):
    # only the batch's pause gets them through
    server.configure(reply="ok", status=429, retry_after="0.2", fail_times=12)
    shell.ns["qs"] = [f"q{i}" for i in range(8)]
    seen = []
    unsubscribe = default_session().subscribe(lambda e, d: seen.append(e))
    try:
        out = shell.ok(f"%%subchat root --each qs --as out --backend {fixture}\nsay {{item}}")
    finally:
        unsubscribe()
    assert "8 items, 8 done, 0 failed" in out
    assert "note: rate-limited: the batch paused 1 time(s)" in out
    assert shell.ns["out"] == ["ok"] * 8
    answered = server.chat_requests()
    assert len(answered) == 12 + 8  # 12 refused, then each row once
    # every row holds its message once and one reply: nothing sent twice into the store
    rows = store_rows(workdir / "subchats.db", MESSAGES)
    assert sorted(c for _, role, c, _ in rows if role == "user") == sorted(f"say q{i}" for i in range(8))
    assert [s for _, role, _, s in rows if role == "assistant"] == ["complete"] * 8
    tree = default_session().tree
    notes = tree.get("root/qs/0").messages[1].provenance.get("notes", [])
    assert any("rate-limited before its first token" in n for n in notes)


def test_a_rate_limit_longer_than_the_pause_budget_fails_the_rows_saying_when(
        shell, groq, monkeypatch, workdir):
    monkeypatch.setenv("SUBCHAT_RATE_LIMIT_PAUSE", "1")
    groq.configure(reply="ok", status=429, retry_after="30")
    shell.ns["qs"] = ["a", "b"]
    out = shell.ok("%%subchat root --each qs --as out --backend groq\nsay {item}")
    assert "2 items, 0 done, 2 failed" in out
    assert "rate-limited by" in out
    error = default_session().tree.get("root/qs/0").messages[1].provenance["error"]
    assert "retry in ~30 s" in error
    assert shell.ns["out"] == [None, None]
    assert len(groq.chat_requests()) == 2  # no wait of 30 s: failed at once


def test_a_bad_pause_budget_is_refused_before_anything_is_stored(shell, groq, monkeypatch,
                                                                 workdir):
    shell.ok("%%subchat root --backend echo\nhello")
    before = store_rows(workdir / "subchats.db", MESSAGES)
    monkeypatch.setenv("SUBCHAT_RATE_LIMIT_PAUSE", "soon")
    shell.ns["qs"] = ["a"]
    msg = shell.fails("%%subchat root --each qs --backend groq\nsay {item}")
    assert "SUBCHAT_RATE_LIMIT_PAUSE must be a number of seconds >= 0, not 'soon'" in msg
    assert "\n" not in msg
    assert store_rows(workdir / "subchats.db", MESSAGES) == before
    assert not groq.chat_requests()


def test_ctrl_c_while_paused_ends_in_the_summary_and_a_rerun_sends_the_rest(shell, groq,
                                                                          workdir):
    import _thread
    import threading
    import time

    groq.configure(reply="ok", status=429, retry_after="30")  # a pause of 30 s
    shell.ns["qs"] = ["a", "b", "c"]
    done = threading.Event()

    def press_ctrl_c_once_paused():
        while not done.is_set() and len(groq.chat_requests()) < 3:
            time.sleep(0.01)
        time.sleep(0.2)  # (the batch is waiting out the 30 s now)
        if not done.is_set():
            _thread.interrupt_main()

    t = threading.Thread(target=press_ctrl_c_once_paused, daemon=True)
    t.start()
    try:
        result, cap = shell.run("%%subchat root --each qs --as out --backend groq\nsay {item}")
    finally:
        done.set()
    # Ctrl-C ended the pause: had the 30 s run out, the held rows would have been resent
    assert "3 items, 0 done, 0 failed, 3 interrupted" in cap.stdout
    assert len(groq.chat_requests()) == 3
    assert str(result.error_in_exec) == ("%%subchat: interrupted: 3 row(s) not done; run the "
                                         "cell again to send only those")
    assert shell.ns["out"] == [None, None, None]
    groq.configure(reply="ok")
    out = shell.ok("%%subchat root --each qs --as out --backend groq\nsay {item}")
    assert "3 items, 3 done, 0 failed" in out and shell.ns["out"] == ["ok"] * 3
