"""Ctrl-C during a reply keeps what arrived, marked interrupted."""

from __future__ import annotations

import _thread
import threading

from subchat_magics.testing import store_rows


def test_interrupt_keeps_the_partial_reply_marked(shell, workdir, monkeypatch):
    monkeypatch.setenv("SUBCHAT_ECHO_DELAY", "0.02")
    started = threading.Event()
    seen = []

    def listener(event, data):
        if event == "reply-delta":
            seen.append(data["delta"])
            if len(seen) == 5:
                started.set()

    shell.ok("%subchat status")
    from subchat_magics.session import default_session

    unsubscribe = default_session().tree.subscribe(listener)
    timer = threading.Thread(target=lambda: started.wait(30) and _thread.interrupt_main())
    timer.start()
    words = " ".join(f"w{i}" for i in range(200))
    result, _ = shell.run(f"%%subchat root\n{words}")
    timer.join()
    unsubscribe()
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    rows = store_rows(workdir / "subchats.db",
                      "SELECT role, content, status FROM messages ORDER BY seq")
    assert rows[0] == ("user", words, "complete")
    role, content, status = rows[1]
    assert role == "assistant" and status == "interrupted"
    assert content.startswith("echo (1 messages): w0") and len(content.split()) < 100
    # the tree goes on: the next message sees the partial reply as context
    out = shell.ok("%%subchat root\nnext")
    assert out.strip() == "echo (3 messages): next"
