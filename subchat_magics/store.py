"""The chat tree on disk: one SQLite file (stdlib ``sqlite3``).

- ``PRAGMA application_id`` marks the file as ours; ``PRAGMA user_version`` is the schema
  version, upgraded by :data:`MIGRATIONS` after a backup copy is made.
- WAL journal and a busy timeout, so two kernels can share one tree. The WAL is
  checkpointed (PASSIVE: never waits, never blocks a reader) within
  :data:`CHECKPOINT_AFTER_S` of every commit, and emptied (TRUNCATE) when the store is
  closed and when the interpreter exits: the ``.db`` file alone then holds every committed
  message (a copy of it, a download, a dataset made from it).
- A read-only store with a ``-wal`` beside it (what a killed kernel leaves) is read from a
  private copy of the two files, so the pages in the WAL are not lost to ``immutable=1``.
- Every write is one transaction; a file that is not a store is never written to. Text is
  written with every known key masked (:func:`secrets.redact`).
"""

from __future__ import annotations

import atexit
import json
import os
import sqlite3
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

from .errors import StoreError
from .secrets import redact, redact_json

APPLICATION_ID = 0x53554243  # "SUBC"
SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 10_000
# Opening checks the file's b-trees (PRAGMA quick_check, linear in the file size: ~0.17 s
# for 15 MB here). Above this size only the chats table is checked, so that opening
# stays well under a second; damage in a message page is then reported when it is read.
FULL_CHECK_MAX_BYTES = 16 << 20
RETRIES = 5  # extra tries on SQLITE_BUSY after the busy timeout (e.g. during WAL recovery)
# A commit is checkpointed into the .db file this long after it (one background timer for
# the commits of that span: a streaming reply's saves or a batch's rows cost one checkpoint)
CHECKPOINT_AFTER_S = 0.25
# how long the checkpoint at close/exit waits for another kernel's readers to finish
CLOSE_WAIT_MS = 500

SCHEMA_V1 = """
CREATE TABLE chats (
    id            INTEGER PRIMARY KEY,
    parent_id     INTEGER REFERENCES chats(id) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    system_prompt TEXT,
    fork_seq      INTEGER NOT NULL DEFAULT 0,
    created_at    REAL NOT NULL,
    UNIQUE (parent_id, name)
);
CREATE UNIQUE INDEX chats_one_root ON chats(name) WHERE parent_id IS NULL;
CREATE TABLE messages (
    id          INTEGER PRIMARY KEY,
    chat_id     INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
    seq         INTEGER NOT NULL,
    role        TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'system', 'tool')),
    content     TEXT NOT NULL,
    status      TEXT NOT NULL DEFAULT 'complete',
    provenance  TEXT,
    created_at  REAL NOT NULL,
    UNIQUE (chat_id, seq)
);
"""



def _one_root(conn: sqlite3.Connection) -> None:
    """0 -> 1: schema 0 is schema 1 without the ``chats_one_root`` index (a second root
    was not yet refused by the file itself). Fails, leaving the store as it was, on a
    store that holds two roots."""
    conn.execute("CREATE UNIQUE INDEX chats_one_root ON chats(name) WHERE parent_id IS NULL")


def _tool_role(conn: sqlite3.Connection) -> None:
    """1 -> 2: messages may have the role ``tool`` (a tool's result; the calls live in the
    assistant message's provenance). SQLite cannot change a CHECK constraint in place, so
    the table is copied into a new one, ids and all (nothing refers to a message)."""
    new = SCHEMA_V1[SCHEMA_V1.index("CREATE TABLE messages"):].replace(
        "CREATE TABLE messages", "CREATE TABLE messages_v2", 1)
    conn.execute(new)
    conn.execute("INSERT INTO messages_v2 (id, chat_id, seq, role, content, status, provenance, "
                 "created_at) SELECT id, chat_id, seq, role, content, status, provenance, "
                 "created_at FROM messages")
    conn.execute("DROP TABLE messages")
    conn.execute("ALTER TABLE messages_v2 RENAME TO messages")


# version N -> function upgrading a connection from N to N+1 (inside one transaction)
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {0: _one_root, 1: _tool_role}


@dataclass
class ChatRow:
    id: int
    parent_id: int | None
    name: str
    system_prompt: str | None
    fork_seq: int
    created_at: float


@dataclass
class MessageRow:
    id: int
    chat_id: int
    seq: int
    role: str
    content: str
    status: str
    provenance: dict[str, Any]
    created_at: float


def _opens_for_writing(path: Path) -> bool:
    """Whether the file can really be opened for writing (``os.access`` says yes to root
    even for an immutable file). Opening with r+ changes nothing."""
    try:
        with open(path, "r+b"):
            return True
    except OSError:
        return False


def _read_only_mount(path: Path) -> bool:
    """Whether ``path`` lies on a file system mounted read-only (a Kaggle input dataset,
    a read-only bind mount): even root cannot write there, whatever the permissions say."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _fix_hint(path: Path) -> str:
    return (
        "choose another file with the SUBCHAT_STORE environment variable or "
        f"%config SubchatMagics.store_path = '...'; {path.name} was left untouched"
    )


def _damaged(path: Path, detail: str) -> StoreError:
    detail = " ".join(detail.replace("*** in database main ***", "").split())  # one line
    return StoreError(
        f"chat store {path} is damaged ({detail[:200]}); it was left untouched: keep a copy, "
        f"salvage what is readable with the sqlite3 tool (sqlite3 {path.name} .recover), "
        f"or {_fix_hint(path).partition('; ')[0]}"
    )


def _busy(exc: BaseException) -> bool:
    msg = str(exc)
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in msg or "busy" in msg)


_open_stores: "weakref.WeakSet[Store]" = weakref.WeakSet()


@atexit.register
def _checkpoint_all() -> None:
    """At interpreter exit (a kernel shut down, a script ending): every open store's WAL
    goes into its file, so the file alone holds the tree; private read-only copies are
    removed."""
    for store in list(_open_stores):
        if store._lock.acquire(timeout=2):  # a thread stuck in a write must not hang the exit
            try:
                store.checkpoint("TRUNCATE")
                store._drop_copy()  # a read-only store's private copy goes with the process
            finally:
                store._lock.release()


# a new message's id: above every id in the table and every id this connection has seen
_NEXT_MESSAGE = "MAX((SELECT COALESCE(MAX(id), 0) FROM messages), ?) + 1"


def _insert_many(c: sqlite3.Connection, into: str, values: list, width: int, rows_each: int) -> None:
    """INSERT ``values`` (``width`` a row, flat) into ``into`` ("table (columns)"),
    ``rows_each`` rows a statement (SQLite allows 32,766 values a statement)."""
    step = width * rows_each
    row = "(" + ",".join("?" * width) + ")"
    for i in range(0, len(values), step):
        part = values[i:i + step]
        c.execute(f"INSERT INTO {into} VALUES " + ",".join([row] * (len(part) // width)), part)


def _undo_savepoint(c: sqlite3.Connection, name: str, exc: BaseException) -> BaseException:
    """Roll the savepoint ``name`` back and release it (if the connection still can);
    returns ``exc``, to be wrapped and raised."""
    try:
        c.execute(f"ROLLBACK TO {name}")
        c.execute(f"RELEASE {name}")
    except sqlite3.Error:
        pass
    return exc


class Store:
    """A connection to one store file. Not shared across threads: use one per thread
    (``Store(path)`` is cheap once the file exists)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path).expanduser().resolve()
        #: why this store opened read-only (a Kaggle input, a read-only folder or file),
        #: or ``None``: it can be read and written
        self.read_only: str | None = self._check_location()
        # one connection may serve the kernel's thread and generation threads
        self._lock = threading.RLock()
        self._depth = 0  # transactions open on this connection (an outer one holds the rest)
        self._timer: threading.Timer | None = None  # the pending checkpoint, if any
        self._timer_pid = os.getpid()
        self._closed = False
        self._copy_dir: Path | None = None  # the private copy a read-only WAL store is read from
        # reply id -> created_at of the replies begun here: an update checks both, so a
        # reply whose row was deleted (its chat deleted elsewhere) never writes into a
        # new row that reused its id
        self._replies: dict[int, float] = {}
        # the highest chat id this connection has seen: SQLite gives a new row the highest
        # id + 1, so deleting the newest chat would let the next one take its id, and a
        # handle held on the deleted chat (the current chat, a streaming reply's) would
        # quietly name the new one. New chats here get ids above every id seen here.
        self._seen_chat = 0
        self._seen_message = 0  # the same for messages (a reply is updated by its id)
        try:
            self.conn = sqlite3.connect(
                self._uri(), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                check_same_thread=False, uri=True,
            )
        except sqlite3.Error as exc:
            self._drop_copy()
            raise StoreError(f"cannot open chat store {self.path}: {exc}; {_fix_hint(self.path)}") from None
        try:
            self._prepare()
        except StoreError:
            self.conn.close()
            self._drop_copy()
            raise
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            self._drop_copy()
            if "not a database" in str(exc):
                raise StoreError(
                    f"{self.path} is not a subchat-magics chat store (not an SQLite file); "
                    f"{_fix_hint(self.path)}"
                ) from None
            raise self._wrap(exc) from None
        self._identity = self._file_identity()
        _open_stores.add(self)

    # -- the file under us -------------------------------------------------------------------
    def _file_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def file_problem(self) -> str | None:
        """Why the file this connection writes to is no longer the one at :attr:`path`
        (removed, or replaced by another file), or ``None``. One ``stat``: cheap enough
        to run before every write."""
        now = self._file_identity()
        if now == self._identity:
            return None
        return "was removed" if now is None else "was replaced by another file"

    def check_file(self) -> None:
        """Refuse to write when the file was removed or replaced while open: a write
        would go into a file nobody can open again, and vanish with the process."""
        error = self._moved_error()
        if error is not None:
            raise error

    def _moved_error(self) -> StoreError | None:
        problem = self.file_problem() if getattr(self, "_identity", None) is not None else None
        if problem is None:
            return None
        way = ("%subchat reopen --restore writes back the tree this kernel still holds, "
               "%subchat reopen starts a new, empty store there" if problem == "was removed"
               else "%subchat reopen opens the file now there")
        return StoreError(f"chat store {self.path} {problem} while it was open; nothing was "
                          f"written: {way}")

    def copy_to(self, dest: str | os.PathLike[str]) -> None:
        """Write a copy of the whole store, as this connection sees it, to ``dest`` (the
        SQLite backup API: works while the file it came from is gone)."""
        with self._lock:
            try:
                self._backup(dest)
            except sqlite3.Error as exc:
                raise StoreError(f"cannot copy chat store {self.path} to {dest}: {exc}") from None

    def _backup(self, dest: str | os.PathLike[str]) -> None:
        """The whole store copied page by page to ``dest`` (SQLite's backup API)."""
        dst = sqlite3.connect(str(dest))
        try:
            self.conn.backup(dst)
        finally:
            dst.close()

    # -- opening ------------------------------------------------------------------------
    def _uri(self) -> str:
        """The SQLite URI to open: read-write, or read-only. In a folder nobody can write
        (a Kaggle input), ``immutable=1``: SQLite then needs no lock or index files beside
        the store, which it could not create there. But ``immutable=1`` ignores the WAL:
        when a ``-wal`` with pages in it lies beside the file (a kernel was killed, or
        the folder was saved while one ran), the file and its WAL are copied to a private
        temporary folder and that copy is opened read-only (:attr:`read_only` says so)."""
        uri = f"file:{quote(str(self.path))}"
        if self.read_only is None:
            return uri
        folder_writable = os.access(self.path.parent, os.W_OK) and not _read_only_mount(self.path)
        if folder_writable:
            return uri + "?mode=ro"
        wal = Path(f"{self.path}-wal")
        try:
            has_wal = wal.stat().st_size > 0
        except OSError:
            has_wal = False
        if has_wal:
            try:
                copy = self._private_copy(wal)
            except OSError as exc:
                self.read_only += (f"; its {wal.name} could not be read ({exc.strerror or exc}), "
                                   "so what only it holds is not shown")
            else:
                self.read_only += (f"; the {wal.name} beside it holds pages not yet in the file, "
                                   f"so both were copied to {copy.parent} and are read from there")
                return f"file:{quote(str(copy))}?mode=ro"
        return uri + "?mode=ro&immutable=1"

    def _private_copy(self, wal: Path) -> Path:
        """The store and its WAL copied into a new private temporary folder (removed on
        close); SQLite rebuilds the WAL index there from the WAL."""
        import shutil  # here: only a read-only store with a WAL needs it (opening stays quick)
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="subchat-read-only-"))
        self._copy_dir = folder
        copy = folder / self.path.name
        try:
            shutil.copyfile(self.path, copy)
            shutil.copyfile(wal, f"{copy}-wal")
        except OSError:
            self._drop_copy()
            raise
        return copy

    def _drop_copy(self) -> None:
        if self._copy_dir is not None:
            import shutil

            shutil.rmtree(self._copy_dir, ignore_errors=True)
            self._copy_dir = None

    def read_only_error(self) -> StoreError:
        return StoreError(
            f"chat store {self.path} is read-only ({self.read_only}): it can be read, shown "
            "and exported, not written; to continue the tree, copy it somewhere writable and "
            "switch to the copy: %subchat copy-to /kaggle/working/subchats.db (or any writable "
            "file)")

    def _check_location(self) -> str | None:
        """Refuse a path that cannot be a store; say why an existing store can only be
        read (it then opens read-only), or ``None``."""
        p = self.path
        if p.is_dir():
            raise StoreError(f"chat store path {p} is a folder; give a file name, e.g. {p / 'subchats.db'}")
        if p.exists():
            if not os.access(p, os.R_OK):
                raise StoreError(f"chat store {p} cannot be read (permissions); {_fix_hint(p)}")
            if _read_only_mount(p):
                return "it is on a read-only file system"
            if not os.access(p.parent, os.W_OK):
                return "its folder cannot be written"
            if not os.access(p, os.W_OK) or not _opens_for_writing(p):
                return "the file cannot be written"
            return None
        if not p.parent.exists():
            raise StoreError(f"folder {p.parent} for the chat store does not exist; create it or {_fix_hint(p)}")
        if not os.access(p.parent, os.W_OK) or _read_only_mount(p.parent):
            raise StoreError(
                f"cannot create the chat store {p}: folder {p.parent} is read-only; "
                "set SUBCHAT_STORE or %config SubchatMagics.store_path to a writable file"
            )

    def _prepare(self) -> None:
        c = self.conn
        c.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        def snapshot() -> tuple[int, int, list]:
            # one read transaction: a kernel creating the store at this very moment is seen
            # either before its schema commit or after it, never half-way
            c.execute("BEGIN")
            try:
                return (c.execute("PRAGMA application_id").fetchone()[0],
                        c.execute("PRAGMA user_version").fetchone()[0],
                        c.execute("SELECT type, name FROM sqlite_master").fetchall())
            finally:
                c.execute("COMMIT")

        app_id, version, objects = self._retry(snapshot)
        tables = [name for kind, name in objects if kind == "table"]
        if self.read_only and app_id == APPLICATION_ID and version < SCHEMA_VERSION:
            raise StoreError(
                f"chat store {self.path} has the older schema version {version} and is read-only "
                f"({self.read_only}), so it cannot be upgraded in place; copy the file somewhere "
                "writable (e.g. cp it to /kaggle/working/) and open the copy")
        if self.read_only and app_id == 0 and version == 0 and not objects:
            raise StoreError(f"{self.path} is an empty file in a read-only place, not a chat store; "
                             f"{_fix_hint(self.path)}")
        if app_id == 0 and version == 0 and not objects:
            # an empty file (or one just made by another kernel: _create re-checks)
            self._create()
        elif app_id != APPLICATION_ID:
            raise StoreError(
                f"{self.path} is an SQLite file of another program (tables: "
                f"{', '.join(tables[:5]) or 'none'}), not a subchat-magics chat store; {_fix_hint(self.path)}"
            )
        elif version > SCHEMA_VERSION:
            raise StoreError(
                f"chat store {self.path} has schema version {version}, newer than this "
                f"subchat-magics understands ({SCHEMA_VERSION}); upgrade with "
                "pip install -U subchat-magics, or use another store file"
            )
        else:
            self._check_damage(tables if version == SCHEMA_VERSION else None)
            if version < SCHEMA_VERSION:
                self._migrate(version)
        c.execute("PRAGMA foreign_keys = ON")
        if self.read_only:
            return  # journal settings are written to the file: nothing to set on a read-only one
        mode = self._retry(lambda: c.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        if str(mode).lower() != "wal":  # e.g. a file system without shared memory
            c.execute("PRAGMA journal_mode = DELETE")
        c.execute("PRAGMA synchronous = NORMAL")

    def _check_damage(self, tables: list[str] | None) -> None:
        """Refuse a store whose structure is damaged (a truncated copy, bytes overwritten)
        before anything is written to it. ``tables``: those found, when the schema is ours."""
        missing = {"chats", "messages"} - set(tables) if tables is not None else ()
        if missing:
            raise _damaged(self.path, f"table {', '.join(sorted(missing))} missing")
        if self.path.stat().st_size <= FULL_CHECK_MAX_BYTES:
            pragma = "PRAGMA quick_check"
        elif sqlite3.sqlite_version_info >= (3, 33):  # a check of one table came in 3.33
            pragma = "PRAGMA quick_check(chats)"
        else:
            return
        rows = self._retry(lambda: self.conn.execute(pragma).fetchall())
        if [r[0] for r in rows] != ["ok"]:
            raise _damaged(self.path, f"quick_check: {rows[0][0]}")

    def _create(self) -> None:
        with self.transaction() as c:
            # Re-check inside the write lock: another kernel may have created it meanwhile.
            if c.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID:
                return
            for stmt in SCHEMA_V1.split(";"):
                if stmt.strip():
                    c.execute(stmt)
            c.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def backup_path(self, version: int) -> Path:
        """A file name for the copy made before upgrading from ``version`` that no
        existing file has (an earlier backup is never overwritten)."""
        base = self.path.with_name(f"{self.path.name}.bak-v{version}")
        backup, n = base, 1
        while backup.exists() or backup.is_symlink():
            backup, n = base.with_name(f"{base.name}.{n}"), n + 1
        return backup

    def _migrate(self, version: int) -> None:
        backup = self.backup_path(version)
        try:
            self._backup(backup)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot back up {self.path} to {backup} before upgrading it: {exc}") from None
        try:
            with self.transaction() as c:
                # another kernel may have upgraded it while we made the copy
                version = c.execute("PRAGMA user_version").fetchone()[0]
                while version < SCHEMA_VERSION:
                    step = MIGRATIONS.get(version)
                    if step is None:
                        raise StoreError(f"no migration from schema version {version}")
                    step(c)
                    version += 1
                    c.execute(f"PRAGMA user_version = {version}")
        except Exception as exc:  # noqa: BLE001 - a failed step must not leave a half-upgraded store
            raise StoreError(
                f"cannot upgrade chat store {self.path} from schema version {version} ({exc}); "
                f"it was left as it was, and a copy is in {backup.name}"
            ) from None

    # -- transactions ----------------------------------------------------------------------
    def transaction(self) -> "_Transaction":
        """``BEGIN IMMEDIATE`` … ``COMMIT``; rolled back on any exception. Inside an outer
        transaction (an import) it joins it: the outer one commits."""
        return _Transaction(self)

    # -- checkpoints: the .db file alone holds what was committed -----------------------------
    def _checkpoint_soon(self) -> None:
        """Checkpoint within :data:`CHECKPOINT_AFTER_S` (one timer for a burst of commits)."""
        if self._timer is not None and self._timer_pid == os.getpid():
            return
        timer = threading.Timer(CHECKPOINT_AFTER_S, self._timed_checkpoint)
        timer.daemon = True
        self._timer, self._timer_pid = timer, os.getpid()
        timer.start()

    def _timed_checkpoint(self) -> None:
        with self._lock:
            self._timer = None
            self.checkpoint()

    def checkpoint(self, mode: str = "PASSIVE") -> bool:
        """Copy the WAL's committed pages into the file. ``PASSIVE`` never waits (a reader
        in another kernel keeps the pages it reads in the WAL until the next one);
        ``TRUNCATE`` also empties the WAL, waiting up to :data:`CLOSE_WAIT_MS` for readers.
        True when every page went into the file. Errors are left to the next write."""
        with self._lock:
            if self.read_only or self._closed or self._depth:
                return False
            try:
                if mode != "PASSIVE":
                    self.conn.execute(f"PRAGMA busy_timeout = {CLOSE_WAIT_MS}")
                try:
                    busy, log, done = self.conn.execute(
                        f"PRAGMA wal_checkpoint({mode})").fetchone()
                finally:
                    if mode != "PASSIVE":
                        self.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            except sqlite3.Error:
                return False
            return not busy and (log == -1 or log == done)

    def _rollback(self) -> None:
        # SQLite rolls back by itself after some errors (a full disk, an I/O error)
        if self.conn.in_transaction:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    @staticmethod
    def _retry(fn: Callable[[], Any]) -> Any:
        """``fn()``, tried again while the store stays busy after the busy timeout."""
        for attempt in range(RETRIES + 1):
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if not _busy(exc) or attempt == RETRIES:
                    raise
                time.sleep(0.05 * (attempt + 1))

    def _wrap(self, exc: BaseException) -> StoreError:
        moved = self._moved_error()  # an I/O error because the file is gone says so
        if moved is not None:
            return moved
        msg = str(exc)
        if isinstance(exc, UnicodeEncodeError):
            return StoreError(
                f"cannot save text holding {exc.object[exc.start:exc.end]!a} (an unpaired surrogate, "
                "not valid Unicode) in the chat store; remove that character and run the cell again")
        if isinstance(exc, sqlite3.IntegrityError):
            why = ("another kernel may have changed the tree meanwhile: %subchat tree shows it "
                   "as it is now" if "FOREIGN KEY" in msg or "UNIQUE" in msg else
                   "the data does not fit the store's schema; run the cell again with valid input")
            return StoreError(f"chat store {self.path} refused the change ({msg}); {why}")
        if "readonly" in msg or "read-only" in msg:
            return StoreError(f"chat store {self.path} is read-only; {_fix_hint(self.path)}")
        if "full" in msg:
            return StoreError(f"the disk holding {self.path} is full; free space or {_fix_hint(self.path)}")
        if "malformed" in msg or "corrupt" in msg or "Could not decode" in msg:
            return _damaged(self.path, msg.partition(" with text ")[0])
        if _busy(exc):
            return StoreError(
                f"chat store {self.path} stayed locked by another kernel for more than "
                f"{BUSY_TIMEOUT_MS // 1000} s; run the cell again")
        if isinstance(exc, sqlite3.ProgrammingError) and "closed" in msg:
            return StoreError(
                f"the connection to chat store {self.path} was closed (the extension was "
                "unloaded, or another store was opened); run %subchat tree again for a new view")
        if "disk I/O error" in msg or "unable to open" in msg:
            return StoreError(
                f"cannot read or write the chat store {self.path} ({msg}): is the disk full or gone, "
                f"or was the file moved? {_fix_hint(self.path)}")
        return StoreError(f"chat store {self.path}: {msg[:300]}")

    def data_version(self) -> int:
        """Changes whenever another connection commits (PRAGMA data_version)."""
        return self._read("PRAGMA data_version")[0][0]

    # -- chats -------------------------------------------------------------------------------
    def _read(self, sql: str, args: tuple | list = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._retry(lambda: self.conn.execute(sql, args).fetchall())
            except sqlite3.DatabaseError as exc:
                raise self._wrap(exc) from None

    def load_chats(self) -> list[ChatRow]:
        rows = self._read(
            "SELECT id, parent_id, name, system_prompt, fork_seq, created_at FROM chats ORDER BY id"
        )
        if rows:
            self._seen_chat = max(self._seen_chat, rows[-1][0])
        return [ChatRow(*r) for r in rows]

    def message_counts(self) -> dict[int, int]:
        return dict(self._read("SELECT chat_id, COUNT(*) FROM messages GROUP BY chat_id"))

    def insert_chat(self, parent_id: int | None, name: str, system_prompt: str | None,
                    fork_seq: int) -> ChatRow:
        now = time.time()
        system_prompt = redact(system_prompt) if system_prompt else system_prompt
        with self.transaction() as c:
            try:
                cur = c.execute(
                    "INSERT INTO chats (id, parent_id, name, system_prompt, fork_seq, created_at) "
                    "VALUES (MAX((SELECT COALESCE(MAX(id), 0) FROM chats), ?) + 1, ?,?,?,?,?)",
                    (self._seen_chat, parent_id, name, system_prompt, fork_seq, now),
                )
            except sqlite3.IntegrityError:
                # another kernel made the same chat first: use theirs
                rows = c.execute(
                    "SELECT id, parent_id, name, system_prompt, fork_seq, created_at FROM chats "
                    "WHERE name = ? AND parent_id IS ?", (name, parent_id)).fetchall()
                if not rows:
                    raise
                return ChatRow(*rows[0])
            self._seen_chat = max(self._seen_chat, cur.lastrowid)
            return ChatRow(cur.lastrowid, parent_id, name, system_prompt, fork_seq, now)

    def insert_chats(self, chats: list[tuple[int | None, str, str | None, int]]) -> list[ChatRow]:
        """:meth:`insert_chat` for many ``(parent_id, name, system_prompt, fork_seq)`` at
        once (a batch's row chats): one read of the next id and one insert a few hundred
        chats, in one transaction. Where one of them exists already (another kernel made
        it), they are inserted one by one, as :meth:`insert_chat` does (theirs is used)."""
        if not chats:
            return []
        now = time.time()
        rows = [(pid, name, redact(sp) if sp else sp, fork) for pid, name, sp, fork in chats]
        with self.transaction() as c:
            c.execute("SAVEPOINT insert_chats")  # (all or none, then one by one)
            try:
                (last,) = c.execute("SELECT COALESCE(MAX(id), 0) FROM chats").fetchone()
                first = max(last, self._seen_chat) + 1
                out = [ChatRow(first + i, *row, now) for i, row in enumerate(rows)]
                values = [v for r in out for v in (r.id, r.parent_id, r.name, r.system_prompt,
                                                    r.fork_seq, r.created_at)]
                _insert_many(c, "chats (id, parent_id, name, system_prompt, fork_seq, created_at)",
                             values, 6, 500)
            except sqlite3.IntegrityError:
                c.execute("ROLLBACK TO insert_chats")
                c.execute("RELEASE insert_chats")
                return [self.insert_chat(*chat) for chat in chats]
            except sqlite3.DatabaseError as exc:
                raise self._wrap(_undo_savepoint(c, "insert_chats", exc)) from None
            c.execute("RELEASE insert_chats")
            self._seen_chat = max(self._seen_chat, out[-1].id)
        return out

    def update_chat(self, chat_id: int, **fields: Any) -> None:
        if fields.get("system_prompt"):
            fields["system_prompt"] = redact(fields["system_prompt"])
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self.transaction() as c:
            c.execute(f"UPDATE chats SET {cols} WHERE id = ?", (*fields.values(), chat_id))

    def delete_chat(self, chat_id: int) -> None:
        with self.transaction() as c:
            c.execute("DELETE FROM chats WHERE id = ?", (chat_id,))

    # -- messages ----------------------------------------------------------------------------
    def append_message(self, chat_id: int, role: str, content: str, status: str = "complete",
                       provenance: dict[str, Any] | None = None) -> MessageRow:
        now = time.time()
        content = redact(content)
        prov, provenance = redact_json(provenance) if provenance else (None, provenance)
        with self.transaction() as c:
            seq = c.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM messages WHERE chat_id = ?",
                            (chat_id,)).fetchone()[0]
            cur = c.execute(
                "INSERT INTO messages (id, chat_id, seq, role, content, status, provenance, "
                f"created_at) VALUES ({_NEXT_MESSAGE}, ?,?,?,?,?,?,?)",
                (self._seen_message, chat_id, seq, role, content, status, prov, now),
            )
            self._seen_message = max(self._seen_message, cur.lastrowid)
        return MessageRow(cur.lastrowid, chat_id, seq, role, content, status, provenance or {}, now)

    def begin_turn(self, chat_id: int, prompt: str,
                   provenance: dict[str, Any]) -> tuple[MessageRow, MessageRow]:
        """The user message and its reply's row, in one transaction. The reply starts
        empty and marked ``interrupted``: a process killed mid-reply leaves exactly that,
        and a reply always sits right after its message, whoever else writes."""
        now = time.time()
        prompt = redact(prompt)
        prov, provenance = redact_json(provenance)
        with self.transaction() as c:
            # the next seq and the next id in one read, both rows in one insert (the write
            # lock is held from BEGIN IMMEDIATE: nobody else takes those ids meanwhile)
            seq, last = c.execute(
                "SELECT (SELECT COALESCE(MAX(seq), -1) + 1 FROM messages WHERE chat_id = ?), "
                "(SELECT COALESCE(MAX(id), 0) FROM messages)", (chat_id,)).fetchone()
            first = max(last, self._seen_message) + 1
            ids = [first, first + 1]
            c.execute(
                "INSERT INTO messages (id, chat_id, seq, role, content, status, provenance, "
                "created_at) VALUES (?,?,?,?,?,?,?,?), (?,?,?,?,?,?,?,?)",
                (first, chat_id, seq, "user", prompt, "complete", None, now,
                 first + 1, chat_id, seq + 1, "assistant", "", "interrupted", prov, now))
            self._seen_message = max(self._seen_message, ids[1])
        self._replies[ids[1]] = now
        return (MessageRow(ids[0], chat_id, seq, "user", prompt, "complete", {}, now),
                MessageRow(ids[1], chat_id, seq + 1, "assistant", "", "interrupted", provenance, now))

    def begin_turns(self, turns: list[tuple[int, str]], provenance: dict[str, Any]
                    ) -> list[tuple[MessageRow, MessageRow]]:
        """:meth:`begin_turn` for many chats at once (a batch's rows): each chat's user
        message and empty ``interrupted`` reply row, with the same ``provenance``; one read
        of the chats' next seqs, one insert a few hundred turns, in one transaction. A chat
        that is gone (deleted meanwhile) fails the whole call with a :class:`StoreError`
        and nothing is written: the caller then begins the turns one by one."""
        if not turns:
            return []
        now = time.time()
        prov, provenance = redact_json(provenance)
        prompts = [redact(prompt) for _, prompt in turns]
        out: list[tuple[MessageRow, MessageRow]] = []
        with self.transaction() as c:
            c.execute("SAVEPOINT begin_turns")  # (inside a batch's transaction: all or none)
            try:
                seqs: dict[int, int] = {}
                ids = list(dict.fromkeys(cid for cid, _ in turns))
                for i in range(0, len(ids), 500):
                    part = ids[i:i + 500]
                    seqs.update(c.execute(
                        "SELECT chat_id, MAX(seq) + 1 FROM messages WHERE chat_id IN "
                        f"({','.join('?' * len(part))}) GROUP BY chat_id", part).fetchall())
                (last,) = c.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()
                next_id = max(last, self._seen_message) + 1
                values: list[Any] = []
                for (cid, _), prompt in zip(turns, prompts):
                    seq = seqs.get(cid, 0)
                    seqs[cid] = seq + 2  # (a chat named twice: its turns follow each other)
                    values += (next_id, cid, seq, "user", prompt, "complete", None, now,
                               next_id + 1, cid, seq + 1, "assistant", "", "interrupted", prov, now)
                    out.append((MessageRow(next_id, cid, seq, "user", prompt, "complete", {}, now),
                                MessageRow(next_id + 1, cid, seq + 1, "assistant", "", "interrupted",
                                           dict(provenance), now)))
                    next_id += 2
                _insert_many(c, "messages (id, chat_id, seq, role, content, status, provenance, "
                             "created_at)", values, 8, 400)  # 200 turns a statement
            except sqlite3.DatabaseError as exc:
                raise self._wrap(_undo_savepoint(c, "begin_turns", exc)) from None
            c.execute("RELEASE begin_turns")
            self._seen_message = max(self._seen_message, next_id - 1)
        for _, reply in out:
            self._replies[reply.id] = now
        return out

    def update_reply(self, message_id: int, content: str, status: str,
                     provenance: dict[str, Any] | None = None,
                     created_at: float | None = None) -> bool:
        """Write what a reply holds now (while streaming, and once when it ends). False
        when its row is gone (its chat was deleted meanwhile): nothing was written. A
        reply begun on this connection is matched by id and creation time (an id freed
        by a delete may be taken by a new message), until its final write (the one with
        ``provenance``); ``created_at`` gives that time for any reply."""
        content = redact(content)
        born = (self._replies.get(message_id) if provenance is None
                else self._replies.pop(message_id, None))
        born = created_at if created_at is not None else born
        where = "id = ?" if born is None else "id = ? AND created_at = ?"
        key = (message_id,) if born is None else (message_id, born)
        with self.transaction() as c:
            if provenance is None:
                cur = c.execute(f"UPDATE messages SET content = ?, status = ? WHERE {where}",
                                (content, status, *key))
            else:
                cur = c.execute(
                    f"UPDATE messages SET content = ?, status = ?, provenance = ? WHERE {where}",
                    (content, status, redact_json(provenance)[0], *key))
            return cur.rowcount > 0

    def update_replies(self, replies: list[tuple[int, str, str, "dict[str, Any] | str",
                                                float | None]]) -> list[bool]:
        """The final :meth:`update_reply` of many replies ``(id, content, status,
        provenance, created_at)`` in one statement (one transaction), not one call a
        reply; ``provenance`` is a dict, or the JSON text :func:`redact_json` made of it.
        For each, whether its row was found (False: its chat was deleted meanwhile, and
        nothing of it was written)."""
        rows = []
        for message_id, content, status, provenance, created_at in replies:
            born = self._replies.pop(message_id, None)
            born = created_at if created_at is not None else born
            prov = provenance if isinstance(provenance, str) else redact_json(provenance)[0]
            rows.append((redact(content), status, prov, message_id, born))
        sql = "UPDATE messages SET content = ?, status = ?, provenance = ? WHERE id = ?"
        with self.transaction() as c:
            if sqlite3.sqlite_version_info >= (3, 33):  # UPDATE FROM: one statement, one
                # call (an executemany steps each row apart, taking the GIL back each time)
                n = 0
                for i in range(0, len(rows), 1000):
                    part = rows[i:i + 1000]
                    n += c.execute(
                        "UPDATE messages SET content = v.column2, status = v.column3, "
                        "provenance = v.column4 FROM (VALUES "
                        + ",".join(["(?,?,?,?,?)"] * len(part)) + ") AS v "
                        "WHERE messages.id = v.column1 "
                        "AND (v.column5 IS NULL OR messages.created_at = v.column5)",
                        [x for r in part for x in (r[3], r[0], r[1], r[2], r[4])]).rowcount
            else:
                plain = [r[:4] for r in rows if r[4] is None]
                timed = [r for r in rows if r[4] is not None]
                n = (c.executemany(sql, plain).rowcount if plain else 0) + (
                    c.executemany(sql + " AND created_at = ?", timed).rowcount if timed else 0)
            if n == len(rows):
                return [True] * n
            # some row is gone (its chat deleted meanwhile): which
            return [c.execute("SELECT 1 FROM messages WHERE id = ?" + (
                "" if r[4] is None else " AND created_at = ?"),
                r[3:4] if r[4] is None else r[3:]).fetchone() is not None for r in rows]

    def messages(self, chat_id: int, limit: int | None = None) -> list[MessageRow]:
        sql = ("SELECT id, chat_id, seq, role, content, status, provenance, created_at FROM messages "
               "WHERE chat_id = ? ")
        args: tuple = (chat_id,)
        if limit is not None:
            sql += "AND seq < ? "
            args = (chat_id, limit)
        sql += "ORDER BY seq"
        return [self._msg(r) for r in self._read(sql, args)]

    def path_messages(self, limits: list[tuple[int, int | None]], full: bool = False,
                      tool_meta: bool = False) -> list[tuple]:
        """Messages of a path in one query: ``limits`` is ``[(chat_id, seq_limit), ...]``
        from the root down (``None``: all). Rows are ``(chat_id, seq, role, content,
        status)`` in path order, or full message rows with ``full=True``; ``tool_meta``
        adds a sixth column, the provenance text of tool messages and of assistant
        messages that call tools (None for the rest: nothing else is parsed)."""
        if not limits:
            return []
        cols = ("m.id, m.chat_id, m.seq, m.role, m.content, m.status, m.provenance, m.created_at"
                if full else "m.chat_id, m.seq, m.role, m.content, m.status")
        if tool_meta and not full:
            cols += (", CASE WHEN m.role = 'tool' OR (m.role = 'assistant' AND "
                     "instr(m.provenance, '\"tool_calls\"') > 0) THEN m.provenance END")
        out: list[tuple] = []
        for start in range(0, len(limits), 400):
            part = limits[start:start + 400]
            values = ",".join("(?,?,?)" for _ in part)
            args: list = []
            for i, (cid, lim) in enumerate(part):
                args += [start + i, cid, -1 if lim is None else lim]
            out += self._read(
                f"WITH want(pos, cid, lim) AS (VALUES {values}) "
                f"SELECT {cols} FROM want JOIN messages m ON m.chat_id = want.cid "
                "AND (want.lim < 0 OR m.seq < want.lim) ORDER BY want.pos, m.seq", args)
        return out

    def first_exchanges(self, parent_id: int) -> list[tuple]:
        """The first two messages (seq 0 and 1) of every child of chat ``parent_id``, in one
        query (a batch's rows): ``(chat_id, seq, role, content, status, provenance)``."""
        rows = self._read(
            "SELECT m.chat_id, m.seq, m.role, m.content, m.status, m.provenance FROM chats c "
            "JOIN messages m ON m.chat_id = c.id AND m.seq < 2 WHERE c.parent_id = ? "
            "ORDER BY m.chat_id, m.seq", (parent_id,))
        return [(*r[:5], json.loads(r[5]) if r[5] else {}) for r in rows]

    def batch_rows(self, parent_id: int, depth: int = 2) -> list[tuple]:
        """A batch's rows and their attempts in one query: every child of ``parent_id``
        and every grandchild (``depth`` 3: and their children: a vote's samples or a
        comparison's models below an ``attempt-K``), each with its message count, its own
        subchat count, its fork point and its first two messages: ``(chat_id, parent_id,
        name, fork_seq, messages, subchats, seq, role, content, status, provenance)`` (the
        last five None for a chat without messages), ordered by chat id and seq."""
        if depth > 2:
            rows = self._read(
                "WITH RECURSIVE r(id, parent_id, name, fork_seq, d) AS ("
                " SELECT id, parent_id, name, fork_seq, 1 FROM chats WHERE parent_id = ?"
                " UNION ALL SELECT c.id, c.parent_id, c.name, c.fork_seq, r.d + 1 FROM chats c"
                " JOIN r ON c.parent_id = r.id WHERE r.d < ?) "
                "SELECT r.id, r.parent_id, r.name, r.fork_seq,"
                " (SELECT COUNT(*) FROM messages WHERE chat_id = r.id),"
                " (SELECT COUNT(*) FROM chats WHERE parent_id = r.id),"
                " m.seq, m.role, m.content, m.status, m.provenance "
                "FROM r LEFT JOIN messages m ON m.chat_id = r.id AND m.seq < 2 "
                "ORDER BY r.id, m.seq", (parent_id, depth))
            return [(*r[:10], json.loads(r[10]) if r[10] else {}) for r in rows]
        rows = self._read(
            "WITH r(id, parent_id, name, fork_seq) AS ("
            " SELECT id, parent_id, name, fork_seq FROM chats WHERE parent_id = ?"
            " UNION ALL SELECT c.id, c.parent_id, c.name, c.fork_seq FROM chats c"
            " JOIN chats p ON c.parent_id = p.id WHERE p.parent_id = ?) "
            "SELECT r.id, r.parent_id, r.name, r.fork_seq,"
            " (SELECT COUNT(*) FROM messages WHERE chat_id = r.id),"
            " (SELECT COUNT(*) FROM chats WHERE parent_id = r.id),"
            " m.seq, m.role, m.content, m.status, m.provenance "
            "FROM r LEFT JOIN messages m ON m.chat_id = r.id AND m.seq < 2 "
            "ORDER BY r.id, m.seq", (parent_id, parent_id))
        return [(*r[:10], json.loads(r[10]) if r[10] else {}) for r in rows]

    def last_replies(self) -> dict[int, tuple[str, dict[str, Any]]]:
        """Each chat's last assistant message: ``{chat_id: (status, provenance)}``."""
        rows = self._read(
            "SELECT chat_id, status, provenance FROM messages WHERE id IN "
            "(SELECT MAX(id) FROM messages WHERE role = 'assistant' GROUP BY chat_id)")
        return {r[0]: (r[1], json.loads(r[2]) if r[2] else {}) for r in rows}

    def message_count(self, chat_id: int) -> int:
        return self._read("SELECT COUNT(*) FROM messages WHERE chat_id = ?", (chat_id,))[0][0]

    @staticmethod
    def _msg(r: tuple) -> MessageRow:
        return MessageRow(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]) if r[6] else {}, r[7])

    def integrity_ok(self) -> bool:
        return self._read("PRAGMA integrity_check")[0][0] == "ok"

    def close(self) -> None:
        """Empty the WAL into the file (TRUNCATE) and close; a private read-only copy is
        removed."""
        with self._lock:
            if self._closed:
                return
            timer, self._timer = self._timer, None
            if timer is not None:
                timer.cancel()
            self.checkpoint("TRUNCATE")
            self._closed = True
            try:
                self.conn.close()
            except sqlite3.Error:
                pass
            self._drop_copy()
        _open_stores.discard(self)


class _Transaction:
    """One ``with store.transaction()`` block. A class and not a generator on purpose: a
    block left without its exit (an interrupt landing between enter and the block) must
    not be finalized later by the garbage collector on whichever thread happens to collect
    it (a pool thread inside an HTTP client's lock), rolling back or writing from there."""

    __slots__ = ("store", "outer")

    def __init__(self, store: Store) -> None:
        self.store = store
        self.outer = False

    def __enter__(self) -> sqlite3.Connection:
        s = self.store
        s._lock.acquire()
        began = False
        try:
            c = s.conn
            if s._depth:  # inside an outer transaction (an import): its commit is ours
                s._depth += 1
                return c
            if s.read_only:
                raise s.read_only_error()
            s.check_file()
            if c.in_transaction:  # one left open all the same: nothing of it was committed
                s._rollback()
            try:
                s._retry(lambda: c.execute("BEGIN IMMEDIATE"))
            except sqlite3.Error as exc:
                raise s._wrap(exc) from None
            began = True
            s._depth, self.outer = 1, True
            return c
        except BaseException:  # (an interrupt too: nothing stays open or held)
            if began:
                s._depth, self.outer = 0, False
                s._rollback()
            s._lock.release()
            raise

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        s = self.store
        try:
            if not self.outer:
                s._depth -= 1
                return False
            try:
                if kind is None:
                    try:
                        s.conn.execute("COMMIT")
                    except sqlite3.Error as err:
                        s._rollback()
                        raise s._wrap(err) from None
                    s._checkpoint_soon()
                    return False
                s._rollback()
                if issubclass(kind, (sqlite3.Error, UnicodeEncodeError)):
                    raise s._wrap(exc) from None
                return False
            finally:
                s._depth = 0
        finally:
            s._lock.release()
