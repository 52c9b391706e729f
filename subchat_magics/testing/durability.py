"""What a store file holds when it leaves the kernel that wrote it: shared by the tests
(``tests/test_durability.py``, ``tests/test_read_only_store.py``) and ``bench/reliability.py``.

- :func:`file_alone`: the messages the ``.db`` file copied alone holds (a download, a
  dataset made from a working folder, an e-mail: no ``-wal`` travels with it).
- :func:`with_wal`: the messages the file and its ``-wal`` hold together (what SQLite
  recovers when both are opened somewhere writable): the truth to compare with.
- :func:`kill_leaving_wal`: a real kernel (jupyter_client) writes, then is SIGKILLed right
  after a commit, before that commit is checkpointed: the ``.db`` + ``-wal`` pair it leaves
  holds a message only the WAL has.
- :data:`READ_ONLY_INSIDE`: a script for :func:`reliability.run_unshared` that mounts the
  store's folder read-only for real and uses it through a real shell's magics.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

QUERY = ("SELECT c.name, m.role, m.content FROM messages m JOIN chats c ON c.id = m.chat_id "
         "ORDER BY c.name, m.seq")
LAST_WORDS = "last words, committed a moment before the kernel was killed"


def _read(path: Path, immutable: bool = False) -> list[tuple[str, str, str]]:
    uri = f"file:{path}?mode=ro&immutable=1" if immutable else f"file:{path}"
    conn = sqlite3.connect(uri, uri=True)
    try:
        return [tuple(r) for r in conn.execute(QUERY).fetchall()]
    finally:
        conn.close()


def file_alone(store: str | os.PathLike[str]) -> list[tuple[str, str, str]]:
    """(chat name, role, content) of every message the ``.db`` file alone holds."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / Path(store).name
        shutil.copyfile(store, copy)
        return _read(copy)


def with_wal(store: str | os.PathLike[str]) -> list[tuple[str, str, str]]:
    """The same with the ``-wal`` beside the file (copied, so the original is untouched)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / Path(store).name
        shutil.copyfile(store, copy)
        wal = Path(f"{store}-wal")
        if wal.exists():
            shutil.copyfile(wal, f"{copy}-wal")
        return _read(copy)


def kill_leaving_wal(workdir: str | os.PathLike[str], cells: int = 3,
                     timeout: float = 60.0) -> dict[str, Any]:
    """A real kernel in ``workdir`` sends ``cells`` echo cells to ``root/a``, then in one
    cell appends :data:`LAST_WORDS` and SIGKILLs itself (within the checkpoint delay, so
    that message is only in the WAL). Returns the store's path and the kernel's pid."""
    from jupyter_client.manager import KernelManager

    from .kernel import clean_env, execute

    store = Path(workdir) / "subchats.db"
    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(workdir), env=clean_env())
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=timeout)
        execute(kc, "%load_ext subchat_magics", timeout)
        for i in range(cells):
            _, reply = execute(kc, f"%%subchat root/a --backend echo\nquestion {i}", timeout)
            assert reply["status"] == "ok", reply
        pid = km.provisioner.process.pid
        kc.execute("from subchat_magics.session import default_session\n"
                   "import os, signal\n"
                   "t = default_session().tree\n"
                   f"t.append(t.get('root/a'), 'user', {LAST_WORDS!r})\n"
                   "os.kill(os.getpid(), signal.SIGKILL)")
        deadline = time.monotonic() + timeout
        while km.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        km.provisioner.process.wait()
    finally:
        kc.stop_channels()
        km.cleanup_resources()
    return {"store": str(store), "pid": pid, "signal": signal.SIGKILL.name}


# Runs inside a private mount namespace (reliability.unshared_script): the store's folder
# bound read-only over itself, then every reading command and copy-to in a real shell.
READ_ONLY_INSIDE = """
store = Path({store!r})
mount("--bind", str(store.parent), str(store.parent))
mount("-o", "remount,bind,ro", str(store.parent))
from IPython.utils.capture import capture_output
def cell(src):
    with capture_output() as cap:
        result = ip.run_cell(src, store_history=False)
    err = result.error_before_exec or result.error_in_exec
    return dict(ok=result.success, out=cap.stdout,
                error=(type(err).__name__ + ": " + str(err)) if err else None)
wal = Path(str(store) + "-wal")
def snap():
    return h.snapshot(store), h.snapshot(wal) if wal.exists() else None
before = snap()
steps = {{}}
ip.run_cell(f"%config SubchatMagics.store_path = {{str(store)!r}}", store_history=False)
steps["tree"] = cell("%subchat tree --text")
steps["status"] = cell("%subchat status")
steps["show"] = cell("%subchat show root/a")
steps["export"] = cell("%subchat export root --format json --out {out}/export.json")
steps["write"] = cell("%%subchat root/a\\nmore please")
untouched = snap() == before
steps["copy"] = cell("%subchat copy-to {out}/copy.db")
steps["continue"] = cell("%%subchat root/a\\nmore please")
print("\\nRESULT " + json.dumps(dict(steps=steps, untouched=untouched)))
"""


def shut_down_normally(workdir: str | os.PathLike[str], cells: int = 3,
                       timeout: float = 60.0) -> dict[str, Any]:
    """A real kernel in ``workdir`` sends ``cells`` echo cells (to two chats), waits a
    second, and is shut down as a notebook's "Shut down kernel" does (a shutdown request,
    not a kill). Returns what the file alone held a second after the last cell, what the
    file and its WAL held then (the truth), and what the file alone held after shutdown."""
    from jupyter_client.manager import start_new_kernel

    from .kernel import clean_env, execute

    store = Path(workdir) / "subchats.db"
    km, kc = start_new_kernel(kernel_name="python3", cwd=str(workdir), env=clean_env(),
                              startup_timeout=timeout)
    try:
        execute(kc, "%load_ext subchat_magics", timeout)
        for i in range(cells):
            _, reply = execute(kc, f"%%subchat root/c{i % 2} --backend echo\nmessage {i}", timeout)
            assert reply["status"] == "ok", reply
        time.sleep(1.0)
        running_alone, truth = file_alone(store), with_wal(store)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    return {"running_alone": running_alone, "truth": truth, "after_alone": file_alone(store),
            "stopped": not km.is_alive()}
