"""Every documented environment variable is read through the one settings path that also
reads ``./.env`` (environment first)."""

from __future__ import annotations

from subchat_magics.backends.registry import registry


def test_echo_delay_comes_from_dotenv_and_the_environment_wins(shell, workdir, monkeypatch):
    echo = registry().get("echo")
    assert echo.delay == 0.0
    (workdir / ".env").write_text("SUBCHAT_ECHO_DELAY=0.25\n")
    assert echo.delay == 0.25
    monkeypatch.setenv("SUBCHAT_ECHO_DELAY", "0.5")
    assert echo.delay == 0.5


def test_a_bad_echo_delay_is_one_line_and_stores_nothing(shell, workdir, monkeypatch):
    """SUBCHAT_ECHO_DELAY is checked as the timeouts are: a value that is no number of
    seconds >= 0 is refused before anything is stored (not read as 0 or slept forever)."""
    from subchat_magics.testing import store_rows

    shell.ok("%%subchat root\nhello")
    db = workdir / "subchats.db"
    before = store_rows(db, "SELECT * FROM messages"), store_rows(db, "SELECT * FROM chats")
    for bad in ("x", "-1", "nan", "inf"):
        monkeypatch.setenv("SUBCHAT_ECHO_DELAY", bad)
        msg = shell.fails("%%subchat root/e --backend echo\nhi")
        assert "SUBCHAT_ECHO_DELAY must be a number of seconds >= 0" in msg and repr(bad) in msg
        assert "\n" not in msg
        shell.ns["qs"] = ["a", "b"]
        assert "SUBCHAT_ECHO_DELAY" in shell.fails("%%subchat root --each qs\n{item}")
        assert (store_rows(db, "SELECT * FROM messages"), store_rows(db, "SELECT * FROM chats")) == before
    monkeypatch.setenv("SUBCHAT_ECHO_DELAY", "0")
    assert "echo (3 messages): hi" in shell.ok("%%subchat root/e --backend echo\nhi")
