"""Ctrl-C during a remote reply: the HTTP stream is closed (the server sees the client
go), the partial reply is kept marked ``interrupted``, and the next message works.

The interrupt is a real SIGINT sent to the main thread (what Jupyter's interrupt does)
once the server has sent a few chunks of a slow stream."""

from __future__ import annotations

import signal
import threading

import pytest

from subchat_magics import open_tree

from .conftest import last_reply

BACKENDS = [("ollama", "ollama"), ("groq", "groq"), ("openai", "openai_server")]
WORDS = [f"w{i} " for i in range(300)]


def interrupt_after(server, chunks: int) -> threading.Thread:
    """SIGINT the main thread once ``server`` has sent ``chunks`` chunks."""
    main = threading.main_thread().ident

    def run() -> None:
        if server.wait_for_chunks(chunks, timeout=30):
            signal.pthread_kill(main, signal.SIGINT)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("backend,fixture", BACKENDS)
def test_ctrl_c_in_a_cell_closes_the_stream_and_keeps_the_partial_reply(shell, request, backend,
                                                                         fixture):
    server = request.getfixturevalue(fixture)
    server.configure(chunks=WORDS, delay=0.02)
    mode = shell.ip.InteractiveTB.mode
    shell.ip.InteractiveTB.set_mode("Plain")  # a verbose traceback through the HTTP stack
    try:                                      # takes seconds to format
        thread = interrupt_after(server, 5)
        result, cap = shell.run(f"%%subchat root --backend {backend}\ncount slowly")
        thread.join(timeout=30)
    finally:
        shell.ip.InteractiveTB.set_mode(mode)
    assert str(result.error_in_exec) == "%%subchat: interrupted: the partial reply is kept in root"
    assert server.disconnected.wait(10), "the server never saw the client close the stream"
    reply = last_reply()
    assert reply.role == "assistant" and reply.status == "interrupted"
    assert reply.content and "".join(WORDS).startswith(reply.content)
    assert len(reply.content.split()) < len(WORDS)
    assert reply.provenance["finish_reason"] == "interrupted"
    server.configure(reply="still here")
    assert shell.ok(f"%%subchat root --backend {backend}\nnext").strip() == "still here"
    assert server.chat_requests()[-1].body["messages"][-2:] == [
        {"role": "assistant", "content": reply.content}, {"role": "user", "content": "next"}]


@pytest.mark.parametrize("backend,fixture", BACKENDS)
def test_closing_a_turn_early_closes_the_http_stream(request, tmp_path, backend, fixture):
    server = request.getfixturevalue(fixture)
    server.configure(chunks=WORDS, delay=0.01)
    tree = open_tree(tmp_path / "t.db")
    turn = tree.send("root", "count", backend=backend)
    stream = iter(turn)
    got = [next(stream) for _ in range(3)]
    stream.close()  # what a Stop button or a consumer that gives up does
    assert server.disconnected.wait(10)
    assert turn.reply.status == "interrupted" and turn.reply.content == "".join(got)
    tree.close()


@pytest.mark.parametrize("backend,fixture", BACKENDS[:2])
def test_replies_reuse_one_connection(request, tmp_path, backend, fixture):
    # a stream closed before its body's end cannot go back to the pool: read to the end.
    # (openai's sync client closes at [DONE], before the end, whoever drives it.)
    server = request.getfixturevalue(fixture)
    tree = open_tree(tmp_path / "t.db")
    for i in range(3):
        tree.send(f"root/c{i}", "hi", backend=backend).run()
    assert server.connections == 1
    tree.close()
