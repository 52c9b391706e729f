"""A store in a read-only place (a Kaggle input dataset: a read-only file system) opens
read-only by itself and says so: tree, show and export work; a cell that would write says
how to continue in a writable copy, and ``%subchat copy-to`` makes that copy and switches
to it. The read-only place is real: a read-only bind mount in a private mount namespace,
with the extension in a real shell inside it."""

from __future__ import annotations

import json
import os

import pytest

from subchat_magics import open_tree
from subchat_magics.testing import reliability as h

INSIDE = """
store = Path({store!r})
mount("--bind", str(store.parent), str(store.parent))
mount("-o", "remount,bind,ro", str(store.parent))
from IPython.utils.capture import capture_output
def cell(src):
    with capture_output() as cap:
        result = ip.run_cell(src, store_history=False)
    err = result.error_before_exec or result.error_in_exec
    return dict(ok=result.success, out=cap.stdout, error=(type(err).__name__ + ": " + str(err)) if err else None)
before = h.snapshot(store)
steps = {{}}
ip.run_cell(f"%config SubchatMagics.store_path = {{str(store)!r}}", store_history=False)
steps["tree"] = cell("%subchat tree --text")
steps["show"] = cell("%subchat show root/topic")
steps["export"] = cell("%subchat export root --format json --out {out}/export.json")
steps["status"] = cell("%subchat status")
steps["write"] = cell("%%subchat root/topic\\nmore please")
steps["new_chat"] = cell("%%subchat root/other\\nhello")
untouched = h.snapshot(store) == before
steps["copy"] = cell("%subchat copy-to {out}/copy.db")
steps["continue"] = cell("%%subchat\\nmore please")
steps["show_copy"] = cell("%subchat show")
steps["status_copy"] = cell("%subchat status")
print("\\nRESULT " + json.dumps(dict(steps=steps, untouched=untouched and h.snapshot(store) == before)))
"""


@pytest.fixture
def read_only_run(workdir):
    def run(store):
        out = workdir / "out"
        out.mkdir()
        result = h.run_unshared(h.unshared_script(INSIDE, store=str(store), out=str(out)))
        if result is None:
            if os.environ.get("CI"):
                pytest.fail("a private mount namespace (root, unshare) is needed for this test")
            pytest.skip("needs root and unshare for a read-only mount")
        return result, out
    return run


def make_store(folder):
    folder.mkdir()
    tree = open_tree(folder / "subchats.db")
    tree.send("root", "first question", backend="echo").run()
    tree.send("root/topic", "a subchat question", backend="echo").run()
    tree.close()
    return folder / "subchats.db"


def test_a_store_on_a_read_only_file_system_is_read_and_copied_to_continue(read_only_run, workdir):
    store = make_store(workdir / "input")
    result, out = read_only_run(store)
    steps = result["steps"]
    for name in ("tree", "show", "export", "status"):
        assert steps[name]["ok"], (name, steps[name])
    assert "topic" in steps["tree"]["out"] and "opened read-only" in steps["tree"]["out"]
    assert "a subchat question" in steps["show"]["out"]
    assert "read-only: it is on a read-only file system" in steps["status"]["out"]
    assert (out / "export.json").exists()
    for name in ("write", "new_chat"):
        err = steps[name]["error"]
        assert err.startswith("UsageError") and "read-only" in err and "%subchat copy-to" in err
        assert "\n" not in err
    assert result["untouched"]  # nothing written, not even a lock file's worth
    assert steps["copy"]["ok"] and "copy.db" in steps["copy"]["out"]
    assert "current chat: root/topic" in steps["copy"]["out"]
    assert steps["continue"]["ok"], steps["continue"]
    assert "more please" in steps["show_copy"]["out"]
    assert str(out / "copy.db") in steps["status_copy"]["out"]
    assert "read-only" not in steps["status_copy"]["out"]
    copy = open_tree(out / "copy.db")
    assert [m.content for m in copy.get("root/topic").messages][-2] == "more please"
    assert len(open_tree(store).get("root/topic").messages) == 2  # the original as it was


CORRUPT_INSIDE = """
store = Path({store!r})
mount("--bind", str(store.parent), str(store.parent))
mount("-o", "remount,bind,ro", str(store.parent))
ip.run_cell(f"%config SubchatMagics.store_path = {{str(store)!r}}", store_history=False)
result = ip.run_cell("%subchat tree --text", store_history=False)
err = result.error_before_exec or result.error_in_exec
print("\\nRESULT " + json.dumps(dict(error=type(err).__name__ + ": " + str(err))))
"""


def test_a_read_only_store_that_is_also_damaged_is_one_clear_line(workdir):
    store = make_store(workdir / "input")
    data = bytearray(store.read_bytes())
    data[4096:8192] = b"\x00" * 4096  # a zeroed page
    store.write_bytes(bytes(data))
    result = h.run_unshared(h.unshared_script(CORRUPT_INSIDE, store=str(store)))
    if result is None:
        if os.environ.get("CI"):
            pytest.fail("a private mount namespace (root, unshare) is needed for this test")
        pytest.skip("needs root and unshare for a read-only mount")
    err = result["error"]
    assert err.startswith("UsageError") and "damaged" in err and "\n" not in err


def test_copy_to_refuses_an_existing_file_and_changes_nothing(shell, workdir):
    shell.ok("%%subchat\nhello")
    (workdir / "taken.db").write_text("not mine")
    err = shell.fails("%subchat copy-to taken.db")
    assert "exists already" in err
    assert (workdir / "taken.db").read_text() == "not mine"
    assert str(workdir / "subchats.db") in shell.ok("%subchat status")


def test_copy_to_a_writable_file_continues_there_with_the_current_chat(shell, workdir):
    shell.ok("%%subchat a\nhello")
    shell.ok("%subchat copy-to saved.db")
    shell.ok("%%subchat\nagain")
    saved = open_tree(workdir / "saved.db")
    assert [m.content for m in saved.get("root/a").messages][2] == "again"
    assert len(open_tree(workdir / "subchats.db").get("root/a").messages) == 2


def test_a_killed_kernels_store_and_wal_on_a_read_only_mount_open_with_every_message(workdir):
    """What a kernel killed with SIGKILL leaves (``subchats.db`` + ``-wal``, the last
    commit only in the WAL), mounted read-only for real: every command reads every
    message, and ``copy-to`` carries all of them into a copy that continues."""
    pytest.importorskip("jupyter_client")
    from subchat_magics.testing import durability as d

    folder = workdir / "input"
    folder.mkdir()
    killed = d.kill_leaving_wal(folder)
    store = folder / "subchats.db"
    wal = folder / "subchats.db-wal"
    assert wal.exists() and wal.stat().st_size > 0
    truth = d.with_wal(store)
    assert ("a", "user", d.LAST_WORDS) in truth
    # the case this is about: the last commit is in the WAL only, which immutable=1 ignores
    assert ("a", "user", d.LAST_WORDS) not in d.file_alone(store), killed
    out = workdir / "out"
    out.mkdir()
    result = h.run_unshared(h.unshared_script(d.READ_ONLY_INSIDE, store=str(store), out=str(out)))
    if result is None:
        if os.environ.get("CI"):
            pytest.fail("a private mount namespace (root, unshare) is needed for this test")
        pytest.skip("needs root and unshare for a read-only mount")
    steps = result["steps"]
    for name in ("tree", "status", "show", "export", "copy", "continue"):
        assert steps[name]["ok"], (name, steps[name])
    assert d.LAST_WORDS in steps["show"]["out"]
    assert "-wal" in steps["tree"]["out"] and "copied to" in steps["tree"]["out"]  # said once
    assert "copied to" not in steps["show"]["out"]
    err = steps["write"]["error"]
    assert err.startswith("UsageError") and "read-only" in err and "\n" not in err
    assert result["untouched"]  # neither the file nor its WAL was written
    exported = json.loads((out / "export.json").read_text())
    got = sorted((c["path"].rpartition("/")[2], m["role"], m["content"])
                 for c in exported["chats"] for m in c["messages"])
    assert got == sorted(truth)
    copied = d.with_wal(out / "copy.db")
    assert copied[:len(truth)] == truth and copied[-2][2] == "more please"
