"""Fixtures for the widget tests: a comm that records what ipywidgets would send to the
browser (the ipywidgets/``comm`` boundary; nothing of ours is replaced), a clock the test
moves by hand, and the echo backend made slow for Stop."""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass, field
from typing import Any

import comm
import pytest
from comm.base_comm import BaseComm

from subchat_magics.backends.registry import registry
from subchat_magics.session import default_session


@dataclass
class Sent:
    msg_type: str  # comm_open, comm_msg, comm_close
    comm_id: str
    data: dict[str, Any]
    size: int  # bytes of the message content as JSON, as a kernel would put it on the wire
    thread: str

    @property
    def state(self) -> dict[str, Any]:
        return (self.data or {}).get("state", {})


@dataclass
class CommLog:
    sent: list[Sent] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def mark(self) -> int:
        return len(self.sent)

    def since(self, mark: int) -> list[Sent]:
        with self.lock:
            return self.sent[mark:]

    def to(self, widget: Any, since: int = 0, key: str | None = None) -> list[Sent]:
        """Updates sent to one widget (optionally: those that change ``key``)."""
        return [s for s in self.since(since) if s.comm_id == widget.model_id and
                s.msg_type == "comm_msg" and (key is None or key in s.state)]


@pytest.fixture
def comms(monkeypatch):
    """Every widget created in the test gets a comm that records its messages."""
    log = CommLog()

    class RecordingComm(BaseComm):
        def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
            content = {"data": data or {}, "comm_id": self.comm_id, **keys}
            size = len(json.dumps(content, default=str))
            with log.lock:
                log.sent.append(Sent(msg_type, self.comm_id, data or {}, size,
                                     threading.current_thread().name))

    monkeypatch.setattr(comm, "create_comm", lambda *a, **k: RecordingComm(*a, **k))
    return log


class ManualClock:
    """A clock for the coalescer: it moves only when the test says so, or by ``step`` at
    each reading."""

    def __init__(self, step: float = 0.0):
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def store_rows(path: Any, sql: str, args: tuple = ()) -> list[tuple]:
    """Read the store file directly, with sqlite3, as another process would."""
    conn = sqlite3.connect(str(path))
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


@pytest.fixture
def echo_session(shell):
    """The magics' session on the echo backend, in a fresh folder."""
    shell.ok("%subchat backend echo")
    return default_session()


@pytest.fixture
def slow_echo(monkeypatch):
    """The echo backend at 20 ms a word (a new shared instance reads the setting), and a
    fresh one afterwards."""
    monkeypatch.setenv("SUBCHAT_ECHO_DELAY", "0.02")
    registry().close()
    yield
    monkeypatch.delenv("SUBCHAT_ECHO_DELAY")
    registry().close()
