"""Tools in a real Jupyter kernel: each call asked through the notebook's stdin (the
kernel's ``input_request``, answered as a frontend does), a refused call sent back as
refused, and Ctrl-C (the kernel's interrupt) landing in a running tool."""

from __future__ import annotations

import queue
import sqlite3
import time

import pytest

from subchat_magics.testing.kernel import clean_env, execute

DEFS = '''
ran = []
def lookup(region: str) -> int:
    """Units sold in a region."""
    ran.append(("lookup", region))
    return 12

def wipe(table: str) -> str:
    """Deletes a table."""
    ran.append(("wipe", table))
    return "wiped"

def slow(x: int) -> int:
    """Takes a long time."""
    import time
    print("slow started", flush=True)
    time.sleep(60)
    return x
'''


@pytest.fixture
def kernel(tmp_path):
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", cwd=str(tmp_path),
                              env=clean_env(LLM_BACKEND="echo"), startup_timeout=60)
    try:
        execute(kc, "%load_ext subchat_magics")
        execute(kc, DEFS)
        yield km, kc, tmp_path
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def _messages(path):
    conn = sqlite3.connect(path / "subchats.db")
    try:
        return conn.execute("SELECT role, content, status FROM messages ORDER BY id").fetchall()
    finally:
        conn.close()


def _until_idle(kc, msg_id, timeout=60):
    msgs = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        msgs.append(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return msgs
    raise AssertionError("the cell did not end")


def _reply(kc, msg_id, timeout=30):
    while True:
        msg = kc.get_shell_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") == msg_id:
            return msg["content"]


def _stream_text(msgs):
    return "".join(m["content"].get("text", "") for m in msgs if m["msg_type"] == "stream")


def test_ctrl_c_in_a_single_reply_says_one_line_and_keeps_the_partial_reply(tmp_path):
    """The trial: a kernel interrupt in a plain %%subchat cell showed a 7-frame traceback.
    Now one line says where the partial reply is kept; --var holds what arrived."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", cwd=str(tmp_path), startup_timeout=60,
                              env=clean_env(LLM_BACKEND="echo", SUBCHAT_ECHO_DELAY="0.05"))
    try:
        execute(kc, "%load_ext subchat_magics")
        words = " ".join(f"w{i}" for i in range(400))  # ~20 s at this delay
        msg_id = kc.execute(f"%%subchat root/x --var got\n{words}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until the reply is streaming
            rows = _messages(tmp_path) if (tmp_path / "subchats.db").exists() else []
            if len(rows) == 2 and rows[1][1]:
                break
            time.sleep(0.1)
        km.interrupt_kernel()
        msgs = _until_idle(kc, msg_id, timeout=30)
        reply = _reply(kc, msg_id)
        assert (reply["status"], reply["ename"]) == ("error", "UsageError")
        assert not [m for m in msgs if m["msg_type"] == "error"]
        out = _stream_text(msgs)
        assert out.strip() == ("UsageError: %%subchat: interrupted: the partial reply is kept "
                               "in root/x"), out
        stored = _messages(tmp_path)
        assert [(r, s) for r, _, s in stored] == [("user", "complete"), ("assistant", "interrupted")]
        got = execute(kc, "print(repr(got))")[0]
        assert _stream_text(got).strip() == repr(stored[1][1])
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_a_tools_cell_sent_without_stdin_is_refused_before_anything_is_stored(kernel):
    """The trial: a front end that cannot answer input() (nbval, papermill) got "add --yes"
    but the chat kept 3 messages, the tool's saying "the user stopped the run". The kernel
    knows the cell came without stdin, so the cell is refused before it is sent."""
    km, kc, path = kernel
    execute(kc, "%%subchat root\nfirst")
    before = _messages(path)
    msg_id = kc.execute("%%subchat root --tools lookup,wipe\nHow much did north sell?",
                        allow_stdin=False)
    msgs = _until_idle(kc, msg_id)
    reply = _reply(kc, msg_id)
    assert (reply["status"], reply["ename"]) == ("error", "UsageError")
    out = _stream_text(msgs).strip()
    assert out.startswith("UsageError: %%subchat: --tools asks before each call") and \
        "add --yes" in out and "\n" not in out, out
    assert _messages(path) == before
    assert execute(kc, "print(ran)")[0][-2]["content"]["text"].strip() == "[]"
    # with --yes the same cell runs without asking
    msg_id = kc.execute("%%subchat root --tools lookup --yes\nHow much?", allow_stdin=False)
    _until_idle(kc, msg_id)
    assert _reply(kc, msg_id)["status"] == "ok"


def test_each_call_is_asked_through_stdin_and_a_refusal_is_sent_back(kernel):
    km, kc, path = kernel
    msg_id = kc.execute("%%subchat root --tools lookup,wipe\nHow much did north sell?",
                        allow_stdin=True)
    prompts = []
    for answer in ("y", "n"):
        req = kc.get_stdin_msg(timeout=30)
        assert req["msg_type"] == "input_request"
        prompts.append(req["content"]["prompt"])
        kc.input(answer)
    msgs = _until_idle(kc, msg_id)
    assert prompts[0].startswith("run lookup(region='')? [y]es / [n]o / [a]lways lookup")
    assert prompts[1].startswith("run wipe(table='')?")
    assert execute(kc, "print(ran)")[0][-2]["content"]["text"].strip() == "[('lookup', '')]"
    shown = [m["content"]["data"]["text/plain"] for m in msgs if m["msg_type"] == "display_data"]
    assert "🔧 lookup(region='') → 12" in shown
    assert any(s.startswith("🔧 wipe(table='') → refused") and s.endswith("[refused]")
               for s in shown)
    stored = _messages(path)
    assert [r for r, _, _ in stored] == ["user", "assistant", "tool", "assistant", "tool",
                                         "assistant"]
    assert stored[4][1].startswith("refused: the user did not allow this call")
    assert "wipe → refused" in stored[5][1]  # the model was told


def test_ctrl_c_in_a_running_tool_stops_the_loop_and_keeps_the_finished_calls(kernel):
    km, kc, path = kernel
    msg_id = kc.execute("%%subchat root --tools lookup,slow --yes\nhi")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until the tool runs
        try:
            msg = kc.get_iopub_msg(timeout=1)
        except queue.Empty:
            continue
        if msg["msg_type"] == "stream" and "slow started" in msg["content"]["text"]:
            break
    else:
        raise AssertionError("the slow tool never started")
    km.interrupt_kernel()
    msgs = _until_idle(kc, msg_id, timeout=30)  # the tool sleeps 60 s: this ends only if cut
    reply = _reply(kc, msg_id)
    # the cell ends in error (a queue of cells stops there) with one line, no traceback
    assert (reply["status"], reply["ename"]) == ("error", "UsageError")
    assert not [m for m in msgs if m["msg_type"] == "error"]  # (no traceback was sent)
    out = "".join(m["content"].get("text", "") for m in msgs if m["msg_type"] == "stream")
    assert out.splitlines()[-1] == ("UsageError: %%subchat: interrupted: 1 finished tool call "
                                    "kept in root")
    assert "Traceback" not in out and "magics.py" not in out
    assert [(r, s) for r, _, s in _messages(path)] == [
        ("user", "complete"), ("assistant", "complete"), ("tool", "complete"),
        ("assistant", "complete"), ("tool", "interrupted")]
    # the kernel is usable and the chat goes on
    assert "echo (6 messages)" in str(execute(kc, "%%subchat root\nagain")[0])
