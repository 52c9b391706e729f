"""Errors about a filled-in reference name it as the cell wrote it: ``{In[-999]}`` is
"In[-999]", not the execution number it counts back to; a chat path that a value makes
invalid (``root/{bad}`` with a space in ``bad``) says so, not "unrecognized arguments".
The store is unchanged by either."""

from __future__ import annotations

from subchat_magics.testing.shell import store_rows


def test_a_reference_far_back_is_named_as_written(shell, workdir):
    shell.ok("%%subchat root --backend echo\nfirst")
    shell.ip.run_cell("1 + 1", store_history=True)
    before = store_rows(workdir / "subchats.db", "SELECT count(*) FROM messages")
    result = shell.ip.run_cell("%%subchat root --backend echo\nsee {In[-999]}",
                               store_history=True)  # a numbered cell, as in a notebook
    err = str(result.error_in_exec or result.error_before_exec)
    assert type(result.error_in_exec).__name__ == "UsageError"
    assert "In[-999]" in err and "999 back" in err and "\n" not in err
    assert "-9" not in err.replace("In[-999]", "").replace("{In[-999]}", "")  # no "-984"
    assert store_rows(workdir / "subchats.db", "SELECT count(*) FROM messages") == before


def test_a_path_made_invalid_by_a_filled_value_says_why(shell, workdir):
    shell.ok("%%subchat root --backend echo\nfirst")
    shell.ns["bad"] = "a b"
    err = shell.fails("%%subchat root/{bad} --backend echo\nhello")
    assert "unrecognized arguments" not in err
    assert "root/{bad}" in err and "'root/a b'" in err and "not a valid chat name" in err
    assert "space" in err and "\n" not in err
    shell.ns["bad"] = "x!y"
    err = shell.fails("%%subchat root/{bad} --backend echo\nhello")
    assert "'root/x!y'" in err and "not a valid chat name" in err
    shell.ns["good"] = "topic"
    assert "echo" in shell.ok("%%subchat root/{good} --backend echo\nhello")
    assert store_rows(workdir / "subchats.db", "SELECT name FROM chats ORDER BY id") == [
        ("root",), ("topic",)]
