"""Unloading the extension leaves nothing running or open: no thread, no SQLite
connection (the store's WAL is checkpointed away), no socket.

The widget's views and a loaded vLLM model have their own unload tests (with the widget
and the vLLM backend); these cover the core, the echo backend and a remote client."""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from subchat_magics.session import reset_default_session
from subchat_magics.testing.fakeservers import FakeOllama


def _threads() -> set[tuple[int, str]]:
    return {(t.ident, t.name) for t in threading.enumerate() if t.is_alive()}


def _open_files() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # closed while listing (the listing's own fd)
            pass
    return out


def _sockets() -> int:
    return sum(1 for target in _open_files() if target.startswith("socket:"))


def _under(folder: Path) -> list[str]:
    return [t for t in _open_files() if t.startswith(str(folder))]


def _cells(ip, *sources):
    for source in sources:
        with capture_output():
            result = ip.run_cell(source, store_history=False)
        assert result.success, (source, result.error_before_exec or result.error_in_exec)


@pytest.fixture
def bare_shell(workdir):
    """A real shell with the extension *not* loaded (the test loads and unloads it)."""
    reset_default_session()
    ip = InteractiveShell.instance()
    ip.config.pop("SubchatMagics", None)
    yield ip
    if "subchat_magics" in ip.extension_manager.loaded:
        ip.run_cell("%unload_ext subchat_magics", store_history=False)
    reset_default_session()


def test_unloading_leaves_no_thread_connection_or_file_open(bare_shell, workdir):
    ip = bare_shell
    gc.collect()
    threads, sockets = _threads(), _sockets()
    _cells(ip, "%load_ext subchat_magics",
           "%%subchat root --backend echo\nhello",
           "%%subchat root --backend echo --fanout 3\nthree at once",  # threads per request
           "%%subchat root/a --backend echo -n 2\ncut short",
           "%subchat tree --text", "%subchat show root/a -p", "%subchat status",
           "%subchat export root --out tree.json", "%subchat import tree.json --into root/a",
           "%subchat rename root/a b", "%subchat delete root/b --force")
    assert _under(workdir), "the store should be open while the extension is loaded"
    _cells(ip, "%unload_ext subchat_magics")
    gc.collect()
    assert _threads() == threads
    assert _under(workdir) == []  # no connection to the store, no -wal/-shm mapping
    assert not (workdir / "subchats.db-wal").exists()  # the last connection closed cleanly
    assert _sockets() == sockets
    # and it loads again, onto the same tree
    _cells(ip, "%load_ext subchat_magics", "%%subchat root --backend echo\nagain",
           "%unload_ext subchat_magics")
    assert _under(workdir) == []


def test_a_stopped_fanout_leaves_no_thread(bare_shell, workdir):
    from subchat_magics.backends.echo import EchoBackend
    from subchat_magics.session import default_session
    from subchat_magics.turn import Fanout, Turn

    threads = _threads()
    _cells(ip := bare_shell, "%load_ext subchat_magics", "%%subchat root --backend echo\nstart")
    tree = default_session().tree
    slow = EchoBackend(delay=0.01)
    fan = Fanout([Turn(tree, tree.create(f"root/{k}"), " ".join(["w"] * 200), backend=slow)
                  for k in range(4)])
    stream = iter(fan)
    next(stream)
    fan.cancel()  # the widget's Stop
    with pytest.raises(KeyboardInterrupt):
        for _ in stream:
            pass
    assert {t.reply.status for t in fan.turns} == {"interrupted"}
    _cells(ip, "%unload_ext subchat_magics")
    assert _threads() == threads


def _client_connections(port: int) -> int:
    """Established TCP connections from this process to 127.0.0.1:``port``."""
    ours = {t[8:-1] for t in _open_files() if t.startswith("socket:[")}
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "01" and int(f[2].rsplit(":", 1)[1], 16) == port and f[9] in ours:
                count += 1
    return count


def test_unloading_after_a_remote_reply_leaves_no_connection(bare_shell, workdir, monkeypatch):
    pytest.importorskip("ollama")
    with FakeOllama() as server:
        monkeypatch.setenv("OLLAMA_HOST", server.url)
        port = int(server.url.rsplit(":", 1)[1])
        _cells(bare_shell, "%load_ext subchat_magics", "%%subchat root --backend ollama\nhello",
               "%subchat backends", "%unload_ext subchat_magics")
        gc.collect()
        assert _client_connections(port) == 0
