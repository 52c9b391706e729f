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
