"""Ctrl-C during a reply keeps what arrived, marked interrupted."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError

from subchat_magics.testing import store_rows


def test_interrupt_keeps_the_partial_reply_marked(shell, workdir):
    shell.ok("%subchat status")
    words = " ".join(f"w{i}" for i in range(200))
    result, cap, seen = shell.run_cut(f"%%subchat root\n{words}", after=5)
    # one line that says what was kept (as a batch's Ctrl-C), no traceback of our frames
    assert isinstance(result.error_in_exec, UsageError)
    assert str(result.error_in_exec) == "%%subchat: interrupted: the partial reply is kept in root"
    assert "Traceback" not in cap.stdout + cap.stderr and "magics.py" not in cap.stdout + cap.stderr
    rows = store_rows(workdir / "subchats.db",
                      "SELECT role, content, status FROM messages ORDER BY seq")
    assert rows[0] == ("user", words, "complete")
    role, content, status = rows[1]
    assert role == "assistant" and status == "interrupted"
    assert content == "".join(seen) == "echo (1 messages): w0 w1 "  # the five deltas shown
    # the tree goes on: the next message sees the partial reply as context
    out = shell.ok("%%subchat root\nnext")
    assert out.strip() == "echo (3 messages): next"


def test_interrupted_under_a_constraint_var_is_none_not_a_partial_string(shell, workdir):
    # issue 20: --var held '{"label": "positive", ' after Ctrl-C; a batch row gives None
    shell.ns["schema"] = {"type": "object", "properties": {
        k: {"type": "string"} for k in ("label", "reason", "source", "detail")},
        "required": ["label", "reason", "source", "detail"]}
    shell.ns["v"] = "before"
    result, _, seen = shell.run_cut("%%subchat root --backend echo --json=schema --var v\nLabel it.",
                              after=2)
    assert isinstance(result.error_in_exec, UsageError)
    assert "interrupted: the partial reply is kept in root" in str(result.error_in_exec)
    assert len(seen) == 2 and shell.ns["v"] is None
    status = store_rows(workdir / "subchats.db", "SELECT status FROM messages ORDER BY seq")
    assert status[-1] == ("interrupted",)


def test_ctrl_c_in_a_fanout_says_one_line_naming_where_the_replies_are_kept(shell, workdir):
    shell.ok("%%subchat root -b echo\nseed")
    words = " ".join(f"w{i}" for i in range(200))
    result, cap, _ = shell.run_cut(f"%%subchat root -b echo --fanout 2 --var rs\n{words}", after=6)
    msg = str(result.error_in_exec)
    assert msg.startswith("%%subchat: interrupted: ") and msg.endswith("kept in root/1, root/2")
    assert "Traceback" not in cap.stdout + cap.stderr
    assert len(shell.ns["rs"]) == 2 and "".join(shell.ns["rs"])  # --var: what arrived
    statuses = store_rows(workdir / "subchats.db",
                          "SELECT status FROM messages WHERE role = 'assistant' ORDER BY id")
    assert statuses[1:] == [("interrupted",), ("interrupted",)]


@pytest.mark.parametrize("flags, var, kept_in", [
    ("-b echo --vote 2", None, "root/q/1, root/q/2"),
    ("--compare echo,echo:other", {"echo": "", "other": ""}, "root/q/echo, root/q/other"),
])
def test_ctrl_c_in_a_vote_or_comparison_says_one_line_naming_where_the_replies_are_kept(
        shell, workdir, flags, var, kept_in):
    """As a fan-out's: one line, not the KeyboardInterrupt's traceback; --var set (no
    verdict under a vote; under --compare each model's partial reply)."""
    shell.ok("%%subchat root -b echo\nseed")
    words = " ".join(f"w{i}" for i in range(200))
    result, cap, _ = shell.run_cut(f"%%subchat root/q {flags} --var got\n{words}", after=6)
    msg = str(result.error_in_exec)
    assert msg.startswith("%%subchat: interrupted: ") and msg.endswith(f"kept in {kept_in}"), msg
    assert "Traceback" not in cap.stdout + cap.stderr
    got = shell.ns["got"]
    if var is None:
        assert got is None
    else:
        assert set(got) == set(var) and "".join(got.values())  # what arrived
    statuses = store_rows(workdir / "subchats.db",
                          "SELECT status FROM messages WHERE role = 'assistant' ORDER BY id")
    assert statuses[1:] == [("interrupted",), ("interrupted",)]
    assert "verdict" not in shell.ok("%subchat show root/q/1" if var is None else "%subchat show root/q/echo")


@pytest.mark.parametrize("flags", ["", "--vote 2"])
def test_ctrl_c_while_an_estimate_times_its_sample_says_one_line(shell, workdir, flags):
    """--estimate runs --sample K rows for real: Ctrl-C there ends in one line (not the
    KeyboardInterrupt's traceback), the rows that finished are kept, and the batch then
    runs, reusing them."""
    shell.ns["qs"] = [" ".join(f"w{i}-{j}" for j in range(40)) for i in range(8)]
    result, cap, _ = shell.run_cut(f"%%subchat root -b echo --each qs {flags} --estimate "
                             "--sample 4 --concurrency 2\n{item}", after=30)
    msg = str(result.error_in_exec)
    assert isinstance(result.error_in_exec, UsageError), result.error_in_exec
    assert msg.startswith("%%subchat: interrupted while timing the sample: ") and "\n" not in msg, msg
    assert "kept as rows of the batch" in msg
    assert "Traceback" not in cap.stdout + cap.stderr
    out = shell.ok(f"%%subchat root -b echo --each qs {flags}\n{{item}}")
    assert "8 items, 8 done" in out
