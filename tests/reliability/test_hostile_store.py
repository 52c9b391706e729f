"""A store file that is damaged, foreign, too new, read-only or on a full disk: the user
gets one clear message naming the file and what to do, the file is never overwritten or
deleted, and a backup is made before any migration.

Read-only locations and a real full disk need a private mount namespace (root and
``unshare``); elsewhere the read-only case falls back to file permissions and the full
disk cannot be made (skipped; under ``CI`` a failure)."""

from __future__ import annotations

import os
import random
import re
import shutil
import sqlite3

import pytest

from subchat_magics.errors import StoreError
from subchat_magics.store import FULL_CHECK_MAX_BYTES, SCHEMA_VERSION, Store
from subchat_magics.testing import reliability as h
from subchat_magics.tree import ChatTree


@pytest.fixture
def base(tmp_path_factory):
    """A clean store with 12 chats (not in the test's working folder)."""
    path = tmp_path_factory.mktemp("base") / "subchats.db"
    want = h.make_store(path)
    return path, want


def _copy(base, workdir, name="subchats.db"):
    path = workdir / name
    shutil.copyfile(base[0], path)
    return path


def _refused(shell, path, *words):
    before = h.snapshot(path)
    shell.ok(f"%config SubchatMagics.store_path = {str(path)!r}")
    msg = shell.fails("%%subchat\nhello")
    assert str(path) in msg, msg
    for word in words:
        assert word in msg, msg
    assert h.snapshot(path) == before  # not one byte written, not even the mtime
    shell.fails("%subchat tree --text")  # and it stays refused
    assert h.snapshot(path) == before
    return msg


@pytest.mark.parametrize("cut", [0.0, 0.3, 0.7, 0.98])
def test_a_truncated_store_is_refused_and_left_as_it_is(shell, workdir, base, cut):
    path = _copy(base, workdir)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(max(50, int(size * cut)) // 4096 * 4096 or 50)
    msg = _refused(shell, path, "damaged", ".recover", "SUBCHAT_STORE")
    assert "\n" not in msg


def test_a_store_with_a_zeroed_page_is_refused(shell, workdir, base):
    path = _copy(base, workdir)
    conn = sqlite3.connect(path)
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'messages'").fetchone()[0]
    conn.close()
    with open(path, "r+b") as f:
        f.seek((root - 1) * 4096)
        f.write(b"\0" * 4096)
    _refused(shell, path, "damaged")


def test_random_damage_only_ever_gives_clear_usage_errors(shell, workdir, base):
    rng = random.Random(6)
    outcomes = []
    for k in range(24):
        path = _copy(base, workdir, f"damaged{k}.db")
        what = h.corrupt(path, rng, ("truncate", "bytes", "page")[k % 3])
        probe = h.probe_store(shell.ip, path, base[1])
        assert not probe.unexpected, (what, probe.unexpected)
        outcomes.append(probe.outcome)
    assert "refused" in outcomes  # the damage was real


def test_damage_in_a_big_store_is_found_at_open_in_the_chats_and_on_read_in_messages(shell, workdir):
    # above FULL_CHECK_MAX_BYTES opening checks only the chats table (opening stays fast)
    path = workdir / "big.db"
    tree = ChatTree(path)
    chat = tree.create("root/big")
    for k in range(20):
        tree.append(chat, "user", f"{k} " + "y" * (1 << 20))
    tree.close()
    assert path.stat().st_size > FULL_CHECK_MAX_BYTES
    conn = sqlite3.connect(path)
    chats_root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'chats'").fetchone()[0]
    conn.close()
    damaged_chats = workdir / "chats.db"
    shutil.copyfile(path, damaged_chats)
    with open(damaged_chats, "r+b") as f:
        f.seek((chats_root - 1) * 4096 + 8)
        f.write(os.urandom(200))
    _refused(shell, damaged_chats, "damaged")
    # bytes overwritten inside a message: opening works, reading that chat says so
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(b"\xff\xfe" * 8)
    shell.ok(f"%config SubchatMagics.store_path = {str(path)!r}")
    assert "big" in shell.ok("%subchat tree --text")
    msg = shell.fails("%subchat show root/big")
    assert "damaged" in msg and str(path) in msg and len(msg) < 1000


def test_a_foreign_sqlite_file_is_refused_and_left_as_it_is(shell, workdir):
    path = workdir / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    conn.execute("INSERT INTO notes (text) VALUES ('keep me')")
    conn.commit()
    conn.close()
    _refused(shell, path, "another program", "notes")


def test_an_empty_sqlite_file_another_program_marked_is_not_taken_over(shell, workdir):
    path = workdir / "marked.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 7")  # no tables, but not ours to write into
    conn.close()
    _refused(shell, path, "another program")


def test_a_store_from_a_newer_version_is_refused_with_the_upgrade_to_run(shell, workdir, base):
    path = _copy(base, workdir)
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    _refused(shell, path, "newer", "pip install -U subchat-magics")


def test_a_folder_as_the_store_path_is_refused(shell, workdir):
    folder = workdir / "chats"
    folder.mkdir()
    shell.ok(f"%config SubchatMagics.store_path = {str(folder)!r}")
    msg = shell.fails("%%subchat\nhello")
    assert "is a folder" in msg and str(folder) in msg
    assert list(folder.iterdir()) == []


def test_garbage_in_the_wal_file_does_not_touch_committed_messages(workdir, base):
    path = _copy(base, workdir)
    wal = workdir / "subchats.db-wal"
    wal.write_bytes(os.urandom(50_000))  # not a valid WAL: SQLite ignores it
    tree = ChatTree(path)
    try:
        assert tree.store.integrity_ok()
        assert {c.path: [m.content for m in c.messages] for c in tree.chats() if c.messages} == base[1]
    finally:
        tree.close()


READ_ONLY = """
store = Path({store!r})
mount("--bind", str(store.parent), str(store.parent))
mount("-o", "remount,bind,ro", str(store.parent))
before = h.snapshot(store) if store.exists() else None
probe = h.probe_store(ip, store, None)
print("\\nRESULT " + json.dumps(dict(outcome=probe.outcome, messages=probe.messages, unexpected=probe.unexpected,
                      untouched=before is None or h.snapshot(store) == before)))
"""


@pytest.mark.parametrize("exists", [True, False], ids=["existing-store", "new-store"])
def test_a_read_only_location_is_a_clear_error_and_the_file_is_untouched(shell, workdir, base, exists):
    folder = workdir / "ro"
    folder.mkdir()
    path = _copy(base, folder) if exists else folder / "subchats.db"
    result = h.run_unshared(h.unshared_script(READ_ONLY, store=str(path)))
    if result is None:  # not root: file permissions do the same
        if os.geteuid() == 0:
            pytest.skip("root without mount namespaces: read-only cannot be simulated")
        os.chmod(folder, 0o555)
        try:
            before = h.snapshot(path) if exists else None
            probe = h.probe_store(shell.ip, path, None)
            result = dict(outcome=probe.outcome, messages=probe.messages,
                          unexpected=probe.unexpected,
                          untouched=before is None or h.snapshot(path) == before)
        finally:
            os.chmod(folder, 0o755)
    assert result["unexpected"] == [] and result["untouched"], result
    # an existing store opens read-only (tree and export work) and refuses the write;
    # a new one cannot be made there at all
    assert result["outcome"] == ("reported-on-read" if exists else "refused")
    assert "read-only" in result["messages"][0] and str(path) in result["messages"][0]
    assert exists == path.exists()


FILL_THEN_FREE = """
folder = Path({folder!r})
mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder))
store = folder / "subchats.db"
ip.run_cell(f"%config SubchatMagics.store_path = {{str(store)!r}}", store_history=False)
def cell(src):
    result = ip.run_cell(src, store_history=False)
    err = result.error_before_exec or result.error_in_exec
    return None if err is None else [type(err).__name__, str(err)]
first = cell("%%subchat root\\nsaved before the disk filled")
filler = folder / "filler"
with open(filler, "wb", buffering=0) as f:  # the disk fills up: every free block taken
    try:
        while True:
            f.write(b"x" * 4096)
    except OSError:
        pass
full = [cell("%%subchat root\\n" + "z" * 100_000), cell("%%subchat root/new\\n" + "z" * 100_000)]
filler.unlink()  # space freed
after = cell("%%subchat root\\nafter space was freed")
from subchat_magics.session import default_session
default_session().close()
check = h.check_store(store)
from subchat_magics.tree import ChatTree
tree = ChatTree(store)
contents = [m.content for m in tree.get("root").messages]
paths = [c.path for c in tree.chats()]
tree.close()
print("\\nRESULT " + json.dumps(dict(first=first, full=full, after=after, ok=check.ok,
                      problems=check.problems, contents=contents, paths=paths)))
"""


def test_a_full_disk_is_a_clear_error_and_what_was_saved_stays(workdir):
    folder = workdir / "small"
    folder.mkdir()
    result = h.run_unshared(h.unshared_script(FILL_THEN_FREE, folder=str(folder)))
    if result is None:
        pytest.skip("no private mount namespace here: a full disk cannot be made")
    assert result["first"] is None, result
    for err in result["full"]:
        assert err is not None and err[0] == "UsageError", result["full"]
        assert "full" in err[1] and "subchats.db" in err[1], err
    assert result["after"] is None, result
    assert result["ok"], result["problems"]
    contents = result["contents"]
    assert contents[:2] == ["saved before the disk filled",
                            "echo (1 messages): saved before the disk filled"]
    assert contents[-1].startswith("echo") and contents[-2] == "after space was freed"
    assert "root/new" not in result["paths"]  # the cell refused by the full disk made no chat


FULL_DISK = """
folder = Path({folder!r})
mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder))
store = folder / "subchats.db"
ip.run_cell(f"%config SubchatMagics.store_path = {{str(store)!r}}", store_history=False)
sent, errors, unexpected = 0, [], []
for k in range(200):
    result = ip.run_cell(f"%%subchat root\\nmessage {{k}} " + "f" * 20_000, store_history=False)
    err = result.error_before_exec or result.error_in_exec
    if err is None:
        sent += 1
    elif type(err).__name__ == "UsageError":
        errors.append(str(err))
        if len(errors) > 3:
            break
    else:
        unexpected.append(repr(err))
        break
from subchat_magics.session import default_session
default_session().close()
check = h.check_store(store)
print("\\nRESULT " + json.dumps(dict(sent=sent, errors=errors, unexpected=unexpected, ok=check.ok,
                      problems=check.problems, messages=check.messages)))
"""


def test_a_real_full_disk_keeps_every_saved_turn(workdir):
    folder = workdir / "tiny"
    folder.mkdir()
    result = h.run_unshared(h.unshared_script(FULL_DISK, folder=str(folder)))
    if result is None:
        pytest.skip("no private mount namespace here: a real full disk cannot be made")
    assert result["unexpected"] == [] and result["errors"], result
    assert all("full" in e or "disk" in e for e in result["errors"]), result["errors"]
    assert result["ok"], result["problems"]
    # every cell that succeeded left its two messages; a failed one at most its question
    assert result["sent"] * 2 <= result["messages"] <= result["sent"] * 2 + len(result["errors"])


def _make_v1(path):
    """Turn a store into a real schema-1 file: messages whose role cannot be ``tool``
    (the table rebuilt with schema 1's CHECK, ids kept), ``user_version`` 1."""
    conn = sqlite3.connect(path)
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'messages'").fetchone()[0]
    old = re.sub(r'CREATE TABLE "?messages"?', "CREATE TABLE messages_v1",
                 sql.replace("'system', 'tool')", "'system')"), count=1)
    assert old != sql
    conn.execute(old)
    conn.execute("INSERT INTO messages_v1 SELECT * FROM messages")
    conn.execute("DROP TABLE messages")
    conn.execute("ALTER TABLE messages_v1 RENAME TO messages")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()


def _make_v0(path):
    """Turn a store into a real schema-0 file: schema 1 without the one-root index,
    ``user_version`` 0 (what the store's first release wrote)."""
    _make_v1(path)
    conn = sqlite3.connect(path)
    conn.execute("DROP INDEX chats_one_root")
    conn.execute("PRAGMA user_version = 0")
    conn.commit()
    conn.close()


def _dump(p):
    conn = sqlite3.connect(p)
    try:
        head = [conn.execute(f"PRAGMA {k}").fetchone()[0] for k in ("application_id", "user_version")]
        return head, list(conn.iterdump())
    finally:
        conn.close()


def test_a_migration_backs_up_the_store_first_and_never_overwrites_a_backup(workdir, base):
    assert SCHEMA_VERSION == 2, "add a fixture of the version before ours and its migration test"
    path = _copy(base, workdir)
    _make_v0(path)
    old = _dump(path)
    Store(path).close()
    backup = workdir / "subchats.db.bak-v0"
    assert _dump(backup) == old  # the copy is the store as it was before the upgrade
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'chats_one_root'").fetchone()
    conn.close()
    # a second upgrade keeps the first backup and writes a new one beside it
    first_backup = h.snapshot(backup)
    _make_v0(path)
    Store(path).close()
    assert h.snapshot(backup) == first_backup
    assert _dump(workdir / "subchats.db.bak-v0.1") == old
    tree = ChatTree(path)
    assert {c.path: [m.content for m in c.messages] for c in tree.chats() if c.messages} == base[1]
    tree.close()


def test_a_schema_1_store_upgrades_to_tool_messages_keeping_every_message(workdir, base):
    path = _copy(base, workdir)
    _make_v1(path)
    conn = sqlite3.connect(path)
    before = conn.execute("SELECT * FROM messages ORDER BY id").fetchall()
    chat_id = before[0][1]
    with pytest.raises(sqlite3.IntegrityError):  # the fixture is a real schema 1
        conn.execute("INSERT INTO messages (chat_id, seq, role, content, created_at) "
                     "VALUES (?, 999, 'tool', 'x', 0)", (chat_id,))
    conn.close()
    store = Store(path)
    try:
        assert store._read("SELECT * FROM messages ORDER BY id") == before  # ids and all
        row = store.append_message(chat_id, "tool", "42", provenance={"tool_call_id": "c1"})
        assert store.messages(chat_id)[-1].role == "tool" and row.provenance["tool_call_id"] == "c1"
    finally:
        store.close()
    assert (workdir / "subchats.db.bak-v1").exists()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    conn.close()


def test_a_failed_migration_leaves_the_store_as_it_was(workdir, base):
    path = _copy(base, workdir)
    _make_v0(path)
    conn = sqlite3.connect(path)  # schema 0 allowed a second root: the upgrade cannot go on
    conn.execute("INSERT INTO chats (parent_id, name, fork_seq, created_at) VALUES (NULL, 'root', 0, 0)")
    conn.commit()
    conn.close()
    before = _dump(path)
    with pytest.raises(StoreError, match="left as it was") as err:
        Store(path)
    assert str(path) in str(err.value) and "bak-v0" in str(err.value)
    assert _dump(path) == before  # version 0, no index, both roots: exactly as it was
    assert _dump(workdir / "subchats.db.bak-v0") == before
