"""Helpers for tests (imported by name: ``from shellkit import store_rows``; a plain
``conftest`` import would clash with ``notebooks/conftest.py`` in one pytest run)."""

from __future__ import annotations

import os
import sqlite3

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
