"""Batches (``%%subchat --each``) against the loopback servers: ``--concurrency N``
requests in flight, rate limits retried as for one cell, a failing row among good ones,
and Ctrl-C closing every stream in flight, then a rerun sending only the rest."""

from __future__ import annotations

import signal
import threading

import pytest

from subchat_magics.session import default_session

BACKENDS = [("ollama", "ollama"), ("groq", "groq"), ("openai", "openai_server")]


def peak_in_flight(session) -> tuple[list[int], callable]:
    """Track how many replies stream at once (reply-start minus reply-end events)."""
    now, peak = [0], [0]

    def listener(event, data):
        if event == "reply-start":
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        elif event == "reply-end":
            now[0] -= 1

    return peak, session.subscribe(listener)


@pytest.mark.parametrize("backend,fixture", BACKENDS)
def test_concurrency_keeps_n_requests_in_flight_at_the_server(shell, request, backend, fixture):
    server = request.getfixturevalue(fixture)
    shell.ns["qs"] = [f"q{i}" for i in range(16)]
    peaks, served, bodies_sent = {}, {}, []
    for n in (1, 8):
        # ~0.3 s a request: long enough (on a loaded machine too) that the requests of one wave overlap at the server
        server.configure(reply="one two three four five", delay=0.03)
        peak, unsubscribe = peak_in_flight(default_session())
        try:
            out = shell.ok(f"%%subchat root --each qs --fresh --concurrency {n} --as out "
                           f"--backend {backend}\nsay {{item}}")
        finally:
            unsubscribe()
        peaks[n], served[n] = peak[0], server.peak_in_flight
        bodies_sent += [r.body["messages"][-1]["content"] for r in server.chat_requests()]
        assert "16 items, 16 done, 0 failed" in out
        assert shell.ns["out"] == ["one two three four five"] * 16
    assert peaks == {1: 1, 8: 8}
    # the server itself saw one request at a time, then eight at once (how much faster
    # that is, is bench/bench_batch.py's to measure)
    assert served == {1: 1, 8: 8}
    assert sorted(bodies_sent) == sorted([f"say q{i}" for i in range(16)] * 2)


def test_the_default_is_four_in_flight_and_rate_limits_are_retried(shell, ollama):
    ollama.configure(reply="ok", status=429, retry_after="0.1", fail_times=3)
    shell.ns["qs"] = list(range(10))
    peak, unsubscribe = peak_in_flight(default_session())
    try:
        out = shell.ok("%%subchat root --each qs --as out --backend ollama\nn {item}")
    finally:
        unsubscribe()
    assert "10 items, 10 done, 0 failed" in out and shell.ns["out"] == ["ok"] * 10
    assert peak[0] == 4
    assert len(ollama.chat_requests()) == 13  # 3 answered 429, each retried


def test_a_failing_row_is_marked_with_its_reason_and_the_batch_goes_on(shell, openai_server):
    openai_server.configure(reply="fine", status=500, fail_times=1, message="boom")
    shell.ns["qs"] = ["a", "b", "c", "d"]
    out = shell.ok("%%subchat root --each qs --concurrency 1 --as out --backend openai\n"
                   "say {item}")
    assert "4 items, 3 done, 1 failed" in out
    assert "failed: 1 row, e.g. root/qs/0:" in out
    assert shell.ns["out"] == [None, "fine", "fine", "fine"]
    tree = default_session().tree
    reply = tree.get("root/qs/0").messages[-1]
    assert reply.status == "error" and reply.provenance["finish_reason"].startswith("error")
    assert "[3/4 done, 1 failed]" in shell.ok("%subchat tree --text")
    # a rerun sends the failed row only
    openai_server.configure(reply="fine now")
    out = shell.ok("%%subchat root --each qs --concurrency 1 --as out --backend openai\n"
                   "say {item}")
    assert "4 items, 4 done (3 reused), 0 failed" in out
    assert [r.body["messages"][-1]["content"] for r in openai_server.chat_requests()] == ["say a"]
    assert shell.ns["out"] == ["fine now", "fine", "fine", "fine"]


def pool_closed(before: set[threading.Thread]) -> None:
    """Wait for the pool threads a batch started (they close their streams at their next
    chunk; the cell does not wait for them)."""
    for t in set(threading.enumerate()) - before:
        if t.name.startswith("subchat-pool-"):
            t.join(10)
            assert not t.is_alive(), f"{t.name} never ended"


def test_ctrl_c_closes_every_stream_in_flight_and_a_rerun_sends_only_the_rest(shell, groq):
    words = [f"w{i} " for i in range(40)]
    groq.configure(chunks=words, delay=0.01)  # ~0.4 s a row
    shell.ns["qs"] = [f"q{i}" for i in range(24)]
    main = threading.main_thread().ident
    ended = []

    def listener(event, data):
        if event == "reply-end" and data["message"].status == "complete":
            ended.append(1)
            if len(ended) == 6:  # SIGINT, as Jupyter's interrupt, once six rows are stored
                signal.pthread_kill(main, signal.SIGINT)

    unsubscribe = default_session().subscribe(listener)
    before = set(threading.enumerate())
    try:
        result, cap = shell.run("%%subchat root --each qs --concurrency 4 --as out "
                                "--backend groq\nsay {item}")
    finally:
        unsubscribe()
    pool_closed(before)
    from IPython.core.error import UsageError

    assert isinstance(result.error_in_exec, UsageError)  # the summary and one line, no traceback
    assert "interrupted:" in str(result.error_in_exec) and "batch root/qs: 24 items" in cap.stdout
    assert len(groq.chat_requests()) < 24  # the rows not started were never sent
    out = shell.ns["out"]
    kept = [i for i, v in enumerate(out) if v is not None]
    assert 6 <= len(kept) < 24 and all(out[i] == "".join(words) for i in kept)
    tree = default_session().tree
    last = [tree.get(c.id).messages[-1:] for c in tree.children(tree.get("root/qs"))]
    cut = [m[0] for m in last if m and m[0].status == "interrupted"]  # (unsent rows: empty)
    assert 1 <= len(cut) <= 4
    # a stream the server had not sent in full when the pool closed it is seen closed
    # (one it had sent to its end may still be cut here: its last chunks were not read)
    if groq.owed_streams():
        assert groq.disconnected.wait(10), "the server never saw a stream closed"
    groq.configure(reply="rest")
    out = shell.ok("%%subchat root --each qs --concurrency 4 --as out --backend groq\nsay {item}")
    assert f"24 items, 24 done ({len(kept)} reused), 0 failed" in out
    sent = sorted(r.body["messages"][-1]["content"] for r in groq.chat_requests())
    assert sent == sorted(f"say q{i}" for i in range(24) if i not in kept)


@pytest.mark.parametrize("backend,fixture", BACKENDS)
def test_ctrl_c_mid_stream_closes_each_rows_stream_at_the_server(shell, request, backend, fixture):
    server = request.getfixturevalue(fixture)
    words = [f"w{i} " for i in range(300)]
    server.configure(chunks=words, delay=0.02)  # ~6 s a row: every row in flight is mid-stream
    shell.ns["qs"] = [f"q{i}" for i in range(12)]
    main = threading.main_thread().ident

    def interrupt() -> None:  # SIGINT, as Jupyter's interrupt, once the rows have begun
        if server.wait_for_chunks(20, timeout=30):
            signal.pthread_kill(main, signal.SIGINT)

    before = set(threading.enumerate())
    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    result, cap = shell.run(f"%%subchat root --each qs --concurrency 4 --as out "
                            f"--backend {backend}\nsay {{item}}")
    thread.join(30)
    from IPython.core.error import UsageError

    assert isinstance(result.error_in_exec, UsageError) and "interrupted:" in str(result.error_in_exec)
    pool_closed(before)
    sent = len(server.chat_requests())
    assert 1 <= sent <= 4
    # every request sent was closed mid-stream: the server saw each client go
    for _ in range(200):
        if server.disconnects >= sent and not server.owed_streams():
            break
        threading.Event().wait(0.05)
    assert (server.disconnects, server.owed_streams()) == (sent, 0)
    tree = default_session().tree
    last = [tree.get(c.id).messages[-1:] for c in tree.children(tree.get("root/qs"))]
    cut = [m[0] for m in last if m]
    assert len(cut) == sent and all(m.status == "interrupted" for m in cut)
    assert all("".join(words).startswith(m.content) and len(m.content) < len("".join(words))
               for m in cut)
    assert shell.ns["out"] == [None] * 12
    server.configure(reply="rest")
    out = shell.ok(f"%%subchat root --each qs --concurrency 4 --as out --backend {backend}\n"
                   "say {item}")
    assert "12 items, 12 done, 0 failed" in out and shell.ns["out"] == ["rest"] * 12
    assert sorted(r.body["messages"][-1]["content"] for r in server.chat_requests()) == sorted(
        f"say q{i}" for i in range(12))
