"""A kernel killed at any moment loses nothing that had completed, and leaves no garbage.

Each kill is a SIGKILL: no ``finally`` runs, no reply is marked, nothing is flushed. A
fresh process then opens the store and checks it (``testing.reliability.check_store``):
``PRAGMA integrity_check``, every chat's parent, every message exactly as sent, every
reply exactly the echo of its message, every cell the journal saw finish still there, and
the reply that was cut either absent or kept and marked ``interrupted``.

``bench/reliability.py`` runs the same loop with more kills and bigger messages.
"""

from __future__ import annotations

import os
import random
import sqlite3

import pytest

from subchat_magics.testing import reliability as h

# Random moments, the same on every run (SUBCHAT_KILL_SEED picks others); the seed is
# printed and named in every failure message.
SEED = int(os.environ.get("SUBCHAT_KILL_SEED", "20261130"))
KILLS = 9  # three of each workload; bench/reliability.py runs 50


def test_sigkill_at_random_moments_loses_no_completed_message(tmp_path):
    print(f"SUBCHAT_KILL_SEED={SEED}")
    rng = random.Random(SEED)
    store, journal = tmp_path / "subchats.db", tmp_path / "journal.jsonl"
    rounds = []
    for rnd in range(1, KILLS + 1):
        mode = ("stream", "write", "store")[rnd % 3]
        rounds.append(h.kill_round(store, tmp_path, journal, rnd, mode, rng, max_size=300_000))
        check = h.check_store(store, journal)
        assert check.ok, f"seed {SEED}, after kill {rnd} ({rounds[-1]}): {check.problems[:5]}"
    assert check.done_ops > 0 and check.messages > 0, f"seed {SEED}: the workers did nothing"


def test_sigkill_inside_a_write_transaction_leaves_the_store_as_before_it(tmp_path):
    store = tmp_path / "subchats.db"
    wal = h.kill_inside_write(store, before=20)
    assert wal.uncommitted > 0, "the kill should land while the transaction's pages are in the WAL"
    check = h.check_store(store)
    assert check.ok, check.problems
    conn = sqlite3.connect(store)
    try:
        small = conn.execute("SELECT m.content FROM messages m JOIN chats c ON c.id = m.chat_id "
                             "WHERE c.name = 'small' ORDER BY m.seq").fetchall()
        big = conn.execute("SELECT COUNT(*) FROM messages m JOIN chats c ON c.id = m.chat_id "
                           "WHERE c.name = 'big'").fetchone()[0]
    finally:
        conn.close()
    assert [r[0] for r in small] == [f"small {k}" for k in range(20)]
    assert big == 0  # the cut transaction is gone entirely, not half-written


@pytest.fixture
def kernel_dir(tmp_path):
    pytest.importorskip("jupyter_client")
    pytest.importorskip("ipykernel")
    return tmp_path


def _kernel_rows(store):
    conn = sqlite3.connect(store)
    try:
        return conn.execute("SELECT c.name, m.role, m.content, m.status FROM messages m JOIN chats c "
                            "ON c.id = m.chat_id ORDER BY c.name, m.seq").fetchall()
    finally:
        conn.close()


def test_a_kernel_killed_mid_reply_keeps_the_message_and_at_most_a_marked_part_of_the_reply(kernel_dir):
    store = kernel_dir / "subchats.db"
    seen = h.kernel_kill(store, kernel_dir, interrupt_first=False, kill_after_updates=3)
    assert seen["updates"] >= 3  # the reply was streaming when the kernel died
    check = h.check_store(store)
    assert check.ok, check.problems
    rows = _kernel_rows(store)
    assert rows[:3] == [
        ("before", "user", "completed first", "complete"),
        ("before", "assistant", "echo (1 messages): completed first", "complete"),
        ("kernel", "user", seen["words"], "complete"),
    ]
    # the cut reply: absent, or kept with what was saved in time and marked interrupted
    assert len(rows) == 3 or (len(rows) == 4 and rows[3][1:4:2] == ("assistant", "interrupted"))


def test_a_kernel_interrupted_mid_reply_then_killed_keeps_the_partial_reply_marked(kernel_dir):
    store = kernel_dir / "subchats.db"
    seen = h.kernel_kill(store, kernel_dir, interrupt_first=True, kill_after_updates=3)
    assert seen["interrupted"]
    check = h.check_store(store)
    assert check.ok, check.problems
    rows = _kernel_rows(store)
    assert rows[:3] == [
        ("before", "user", "completed first", "complete"),
        ("before", "assistant", "echo (1 messages): completed first", "complete"),
        ("kernel", "user", seen["words"], "complete"),
    ]
    name, role, content, status = rows[3]
    assert (name, role, status) == ("kernel", "assistant", "interrupted")
    whole = f"echo (1 messages): {seen['words']}"
    assert whole.startswith(content) and len(content) < len(whole)
