"""What a notebook receives while %%subchat streams, read off a real kernel's iopub channel."""

from __future__ import annotations

import pytest

from subchat_magics.testing.kernel import clean_env, execute, final_display, running_kernel


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    with running_kernel(tmp_path_factory.mktemp("kernel"), clean_env(LLM_BACKEND="echo")) as kc:
        yield kc


def _run(kc, code: str) -> list[dict]:
    return execute(kc, code)[0]


def test_a_reply_streams_into_one_display_then_shows_markdown(kernel):
    _run(kernel, "import os; os.environ['SUBCHAT_ECHO_DELAY'] = '0.01'")
    words = " ".join(f"w{i}" for i in range(120))
    msgs = _run(kernel, f"%%subchat root\n{words}")
    updates = [m for m in msgs if m["msg_type"] == "update_display_data"]
    texts = [m["content"]["data"]["text/plain"] for m in updates]
    partial = [t for t in texts if t and t.startswith("echo")]
    assert len(set(partial)) >= 3, "several intermediate states should be shown"
    assert all(len(a) <= len(b) for a, b in zip(partial, partial[1:], strict=False))
    final = [m for m in msgs if m["msg_type"] == "display_data"][-1]["content"]["data"]
    assert final["text/plain"] == f"echo (1 messages): {words}"
    assert final["text/markdown"] == f"echo (1 messages): {words}"
    assert texts[-1] == ""  # the live display ends empty: the final display replaces it


def test_updates_are_coalesced_whatever_the_token_rate(kernel):
    _run(kernel, "import os; os.environ['SUBCHAT_ECHO_DELAY'] = '0'")
    words = " ".join(f"w{i}" for i in range(3000))
    msgs = _run(kernel, f"%%subchat root/fast\n{words}")
    updates = [m for m in msgs if m["msg_type"] == "update_display_data"]
    assert len(updates) < 3000 / 10  # 3,000 deltas, far fewer updates
    # with an interval longer than the whole reply, only the first delta and the end are
    # drawn: coalescing shown by counting, whatever the machine's speed
    _run(kernel, "%config SubchatMagics.update_interval = 10")
    try:
        msgs = _run(kernel, f"%%subchat root/fast2\n{words}")
    finally:
        _run(kernel, "%config SubchatMagics.update_interval = 0.05")
    updates = [m for m in msgs if m["msg_type"] == "update_display_data"]
    assert 1 <= len(updates) <= 3, [m["content"]["data"]["text/plain"][:40] for m in updates]
    final = [m for m in msgs if m["msg_type"] == "display_data"][-1]["content"]["data"]
    assert final["text/plain"].startswith("echo (3 messages): w0 w1 ")


def test_errors_are_one_line_usage_errors_in_the_kernel(kernel):
    msgs = _run(kernel, "%%subchat root/no/such\nhi")
    errors = [m for m in msgs if m["msg_type"] == "error"]
    streams = "".join(m["content"].get("text", "") for m in msgs if m["msg_type"] == "stream")
    # IPython shows a UsageError as one line on stderr, never as a traceback
    assert errors == [], errors
    stderr = "".join(m["content"]["text"] for m in msgs
                     if m["msg_type"] == "stream" and m["content"]["name"] == "stderr")
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("UsageError: %%subchat") and "root/no" in lines[0], lines[0]
    assert "Traceback" not in streams


_final = final_display


def test_format_text_shows_the_finished_reply_without_markdown(kernel):
    _run(kernel, "import os; os.environ['SUBCHAT_ECHO_DELAY'] = '0'")
    assert "text/markdown" in _final(_run(kernel, "%%subchat root/fmt\n*hi*"))
    final = _final(_run(kernel, "%%subchat root/fmt --format text\n*hi*"))
    assert "text/markdown" not in final and final["text/plain"].endswith("messages): *hi*")


def test_config_format_sets_the_default_format(kernel):
    _run(kernel, "%config SubchatMagics.format = 'text'")
    try:
        final = _final(_run(kernel, "%%subchat root/fmt2\n*hi*"))
        assert "text/markdown" not in final and final["text/plain"].endswith("messages): *hi*")
        assert "text/markdown" in _final(_run(kernel, "%%subchat root/fmt2 --format markdown\nx"))
    finally:
        _run(kernel, "%config SubchatMagics.format = 'markdown'")
