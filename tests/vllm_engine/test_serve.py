"""The ``openai`` backend against a real ``vllm serve`` (the CPU build, the tiny local
model) on a loopback port, through the real shell: streaming, the model taken from the
server's list, token counts from the server's usage, ``--fanout`` running concurrently
on the server, Ctrl-C cancelling the request on the server, ``--choice``/``--json``
enforced by the server, and the server killed mid-reply (the partial reply kept and
marked, the next cell working once it is back).

One server for the module: it takes ~40 s to start on two cores (the kill test restarts
it once more, so the module costs ~2 minutes). What a real server cannot be made to do
(rate limits, hangs, garbage) stays with the loopback fakes in ``tests/backends``."""

from __future__ import annotations

import _thread
import contextlib
import json
import threading
import time

import pytest
from IPython.core.interactiveshell import InteractiveShell

from subchat_magics.backends.base import GenerationOptions
from subchat_magics.backends.registry import registry
from subchat_magics.session import default_session
from subchat_magics.testing.vllm_server import VLLMServer

pytestmark = pytest.mark.vllm

NAME = "tiny-qwen3"
PROMPT = "Tell me a long story please"
# A reply long enough (~10-20 s of generation) that the server is still generating when
# the client acts on its fifth delta.
LONG = 8000


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """``vllm serve`` for the module, with compact JSON for structured outputs (a
    random-weights model would fill JSON's optional whitespace until max tokens)."""
    srv = VLLMServer(tiny_model, NAME, max_model_len=LONG + 100, log_dir=tmp_path_factory.mktemp("vllm-serve"), extra_args=(
        "--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
        "--enable-log-requests"))
    srv.start()
    print(f"vllm serve started in {srv.start_seconds:.1f} s")
    yield srv
    srv.stop()


@pytest.fixture
def oshell(workdir, monkeypatch, server):
    """A real shell with the extension freshly loaded, ``OPENAI_BASE_URL`` at the server
    (no model named: the backend takes the server's)."""
    from subchat_magics.session import reset_default_session
    from subchat_magics.testing import Shell

    ip = InteractiveShell.instance()
    if "subchat" in ip.magics_manager.magics["cell"]:
        ip.run_cell("%unload_ext subchat_magics", store_history=False)
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    ip.config.pop("SubchatMagics", None)  # %config from an earlier test (a system prompt...)
    reset_default_session()
    ip.run_cell("%load_ext subchat_magics", store_history=False)
    yield Shell(ip)
    ip.run_cell("%unload_ext subchat_magics", store_history=False)
    registry().close()
    reset_default_session()


def last_reply(path: str = "root"):
    return default_session().tree.get(path).messages[-1]


@contextlib.contextmanager
def at_delta(n: int, then):
    """Run ``then()`` in the turn's own thread when the ``n``-th delta of a reply arrives
    (the session's events: no clock decides where the reply is cut)."""
    seen = []

    def listener(event, data):
        if event == "reply-delta":
            seen.append(data["delta"])
            if len(seen) == n:
                then()

    unsubscribe = default_session().tree.subscribe(listener)
    try:
        yield seen
    finally:
        unsubscribe()


def ctrl_c() -> None:
    """What Jupyter's interrupt does, from the turn's own thread: SIGINT to the main
    thread; wait for it to land."""
    _thread.interrupt_main()
    threading.Event().wait(60)



def test_a_reply_streams_from_vllm_serve_with_the_servers_model_and_counts(oshell, server):
    out = oshell.ok(f"%%subchat root --backend openai -n 40\n{PROMPT}")
    reply = last_reply()
    assert reply.status == "complete"
    p = reply.provenance
    assert p["backend"] == "openai" and p["model"] == NAME  # the server's only model
    # the same request, not streamed, straight to the server: same text and counts (greedy)
    raw = server.chat({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 40,
                       "temperature": 0, "top_p": 0.9})
    assert reply.content == raw["choices"][0]["message"]["content"]
    assert reply.content in out
    assert p["prompt_tokens"] == raw["usage"]["prompt_tokens"]
    assert p["completion_tokens"] == raw["usage"]["completion_tokens"] == 40
    assert p["finish_reason"] == "length"
    # streamed: the text came in many deltas
    deltas = [d for d in registry().get("openai").stream(
        [{"role": "user", "content": PROMPT}], GenerationOptions(max_tokens=40)) if isinstance(d, str)]
    assert len(deltas) > 10 and "".join(deltas) == reply.content


def test_fanout_runs_the_requests_concurrently_on_the_server(oshell, server):
    def batched_steps() -> float:
        # engine steps that decoded 2-8 tokens at once: several requests in one batch
        # (one request alone decodes one token a step, and prefills >8)
        return server.metric("vllm:iteration_tokens_total_bucket", le="8.0") - \
            server.metric("vllm:iteration_tokens_total_bucket", le="1.0")

    before = batched_steps()
    oshell.ok(f"%%subchat root --backend openai --fanout 3 -t 0 -n 1000\n{PROMPT}")
    deadline = time.monotonic() + 10  # the server records its metrics a little later
    while batched_steps() - before < 500 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert batched_steps() - before >= 500, "the server did not batch the three requests"
    for i in (1, 2, 3):
        reply = last_reply(f"root/{i}")
        assert reply.role == "assistant" and reply.content
        assert reply.provenance["model"] == NAME and reply.provenance["completion_tokens"] > 0


def test_ctrl_c_cancels_the_request_on_the_server(oshell, server):
    aborted = server.log_text().count("Aborted request")
    mode = oshell.ip.InteractiveTB.mode
    oshell.ip.InteractiveTB.set_mode("Plain")
    try:
        with at_delta(5, ctrl_c) as seen:
            result, _ = oshell.run(f"%%subchat root --backend openai -n {LONG}\n{PROMPT}")
    finally:
        oshell.ip.InteractiveTB.set_mode(mode)
    assert str(result.error_in_exec) == "%%subchat: interrupted: the partial reply is kept in root"
    reply = last_reply()
    assert reply.role == "assistant" and reply.status == "interrupted"
    assert reply.content == "".join(seen) and reply.provenance["finish_reason"] == "interrupted"
    # the server saw the request cancelled: it logs the abort, long before its LONG tokens
    deadline = time.monotonic() + 10
    while server.log_text().count("Aborted request") == aborted and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.log_text().count("Aborted request") == aborted + 1
    # and the chat goes on
    oshell.ok("%%subchat root --backend openai -n 5\nnext")
    assert last_reply().provenance["completion_tokens"] == 5


def test_choice_and_json_are_enforced_by_the_server(oshell, server):
    oshell.ok("%%subchat root --backend openai --choice yes,no --var answer\nYes or no?")
    assert oshell.ns["answer"] in ("yes", "no")
    assert last_reply().content in ("yes", "no")
    # (a bounded schema: a random-weights model fills an integer with digits until max tokens)
    oshell.ns["schema"] = {"type": "object", "properties": {"ok": {"type": "boolean"}},
                           "required": ["ok"], "additionalProperties": False}
    oshell.ok("%%subchat root/j --backend openai --json=schema --var data -n 60\nAll good?")
    assert isinstance(oshell.ns["data"], dict) and isinstance(oshell.ns["data"]["ok"], bool)
    assert last_reply("root/j").provenance["constraint"]["enforced"] is True


def test_the_server_killed_mid_reply_keeps_the_partial_reply_and_a_restart_serves_the_next(oshell, server):
    with at_delta(5, server.kill) as seen:
        result, _ = oshell.run(f"%%subchat root --backend openai -n {LONG}\n{PROMPT}")
    reply = last_reply()
    assert reply.role == "assistant" and reply.status == "error"  # marked...
    assert reply.content == "".join(seen) and len(seen) >= 5  # ...and what arrived is kept
    said = str(result.error_in_exec)
    assert said.startswith(f"%%subchat: the stream from the server at {server.base_url} was cut after")
    assert "send the message again to retry" in said and "\n" not in said
    # while it is down: one line saying what to do
    said = oshell.fails("%%subchat root --backend openai\nanyone there?")
    assert said.startswith(f"%%subchat: cannot reach the server at {server.base_url}") and "\n" not in said
    server.start()
    oshell.ok("%%subchat root --backend openai -n 5\nand now?")
    reply = last_reply()
    assert reply.provenance["completion_tokens"] == 5 and reply.provenance["model"] == NAME
