"""Run cells in a real IPython shell with the extension loaded, and read a store file as
another process would.

:class:`Shell` wraps a real :class:`~IPython.core.interactiveshell.InteractiveShell`: run
a cell and get its captured output (``run``), run one that must succeed and get its
stdout (``ok``), or one that must fail with a ``UsageError`` and get the message
(``fails``), or one cut by a real Ctrl-C after its N-th streamed delta (``run_cut``).
Nothing is patched: the magics, the tree and the backend are the real ones.

    from IPython.core.interactiveshell import InteractiveShell
    from subchat_magics.testing import Shell

    sh = Shell(InteractiveShell.instance())
    sh.ok("%load_ext subchat_magics")
    assert "echo (1 messages): hi" in sh.ok("%%subchat root --backend echo\nhi")

:func:`store_rows` runs one SQL query on a store file with :mod:`sqlite3` directly.
"""

from __future__ import annotations

import _thread
import os
import sqlite3
import threading

from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output


def store_rows(path: os.PathLike | str, sql: str, args: tuple = ()) -> list[tuple]:
    """Read the store file directly, with sqlite3, as another process would."""
    conn = sqlite3.connect(str(path))
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


class Shell:
    """A thin helper over a real InteractiveShell: run cells, capture what they show."""

    def __init__(self, ip: InteractiveShell):
        self.ip = ip

    @property
    def ns(self) -> dict:
        return self.ip.user_ns

    def run(self, source: str):
        """Run a cell; return (result, captured output)."""
        with capture_output(display=True) as cap:
            result = self.ip.run_cell(source, store_history=False)
        return result, cap

    def run_cut(self, source: str, after: int):
        """Run a cell with a Ctrl-C landing after its ``after``-th streamed delta:
        ``interrupt_main`` is the SIGINT Jupyter sends, and the listener waits until it is
        raised (no clock decides where the reply is cut). Returns (result, captured
        output, the deltas seen)."""
        from subchat_magics.session import default_session

        seen: list[str] = []
        never = threading.Event()

        def listener(event: str, data: dict) -> None:
            if event == "reply-delta":
                seen.append(data["delta"])
                if len(seen) == after:
                    _thread.interrupt_main()
                    never.wait(60)

        unsubscribe = default_session().tree.subscribe(listener)
        try:
            result, cap = self.run(source)
        finally:
            unsubscribe()
        return result, cap, seen

    def ok(self, source: str) -> str:
        """Run a cell that must succeed; return its stdout."""
        result, cap = self.run(source)
        if not result.success:
            raise AssertionError(f"cell failed: {source!r}\n{cap.stdout}\n{cap.stderr}\n"
                                 f"{result.error_before_exec or result.error_in_exec!r}")
        return cap.stdout

    def fails(self, source: str) -> str:
        """Run a cell that must fail with a UsageError; return the error message."""
        from IPython.core.error import UsageError

        result, cap = self.run(source)
        err = result.error_before_exec or result.error_in_exec
        assert isinstance(err, UsageError), f"expected UsageError, got {err!r}\n{cap.stdout}"
        return str(err)
