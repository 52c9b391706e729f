"""Helpers for tests (imported by name: ``from shellkit import store_rows``; a plain
``conftest`` import would clash with ``notebooks/conftest.py`` in one pytest run)."""

from __future__ import annotations

import os
import sqlite3


def store_rows(path: os.PathLike | str, sql: str, args: tuple = ()) -> list[tuple]:
    """Read the store file directly, with sqlite3, as another process would."""
    conn = sqlite3.connect(str(path))
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()
