"""Two kernels on one tree: concurrent writers lose nothing and keep their order, and a
tree opened in one process sees what another added once refreshed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from subchat_magics import open_tree
from subchat_magics.errors import StoreError
from subchat_magics.testing import reliability as h
from subchat_magics.tree import ChatTree


def test_two_processes_appending_1000_messages_each_lose_nothing(tmp_path):
    store = tmp_path / "subchats.db"  # created by whichever writer gets there first
    codes = h.run_writers(store, ["a", "b"], 1000, pace=0.0005)
    assert codes == [0, 0]
    assert h.check_writers(store, ["a", "b"], 1000) == []
    assert h.interleavings(store) > 1  # they really wrote at the same time


def test_two_processes_writing_back_to_back_lose_nothing(tmp_path):
    # no pause between writes: the busy handler serialises them; still nothing lost
    store = tmp_path / "subchats.db"
    assert h.run_writers(store, ["a", "b"], 1000) == [0, 0]
    assert h.check_writers(store, ["a", "b"], 1000) == []


def test_two_shells_running_cells_at_once_keep_every_turn(tmp_path):
    store = tmp_path / "subchats.db"
    ChatTree(store).close()
    ctx = h.context()
    procs, events = [], []
    for rnd, home in ((1, "root/a"), (2, "root/b")):
        ready = ctx.Event()
        cfg = dict(store=str(store), workdir=str(tmp_path), journal=str(tmp_path / "journal.jsonl"),
                   round=rnd, mode="stream", seed=rnd, ops=12, home=home, max_size=20_000)
        proc = ctx.Process(target=h.run_worker, args=(cfg, ready), daemon=True)
        proc.start()
        procs.append(proc)
        events.append(ready)
    for proc in procs:
        proc.join(120)
    assert [p.exitcode for p in procs] == [0, 0], h.read_journal(tmp_path / "journal.jsonl")[-3:]
    check = h.check_store(store, tmp_path / "journal.jsonl")
    assert check.ok, check.problems[:5]
    assert check.done_ops == 24 and check.dangling == 0


def _other_process(store, code):
    script = f"from subchat_magics.tree import ChatTree\ntree = ChatTree({str(store)!r})\n"
    script += textwrap.dedent(code)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


def test_a_tree_sees_chats_another_process_added_after_refresh(tmp_path):
    store = tmp_path / "subchats.db"
    tree = ChatTree(store)
    tree.append(tree.root, "user", "mine")
    assert not tree.refresh()  # nothing new yet
    _other_process(store, """
        chat = tree.create("root/theirs")
        tree.append(chat, "user", "from the other kernel")
        tree.create("root/theirs/deeper")
    """)
    assert tree.refresh()
    paths = [c.path for c in tree.chats()]
    assert paths == ["root", "root/theirs", "root/theirs/deeper"]
    assert [m.content for m in tree.get("root/theirs").messages] == ["from the other kernel"]
    tree.close()


def test_the_magics_show_and_continue_a_chat_another_kernel_added(shell, workdir):
    shell.ok("%%subchat root\nhello")
    _other_process(workdir / "subchats.db", """
        chat = tree.create("root/other")
        tree.append(chat, "user", "their question")
        tree.append(chat, "assistant", "their answer")
    """)
    assert "other" in shell.ok("%subchat tree --text")
    # root's two messages (inherited) + the other kernel's two + the new one
    assert shell.ok("%%subchat root/other\nand mine").strip() == "echo (5 messages): and mine"


def test_writing_to_a_chat_another_kernel_deleted_is_a_clear_store_error(tmp_path):
    store = tmp_path / "subchats.db"
    tree = ChatTree(store)
    chat = tree.create("root/gone")
    _other_process(store, 'tree.delete("root/gone")')
    with pytest.raises(StoreError, match="another kernel"):
        tree.append(chat, "user", "into a chat that is no longer there")
    assert "root/gone" not in tree
    tree.close()


def test_two_kernels_replying_in_one_chat_keep_each_reply_with_its_message(tmp_path):
    store = tmp_path / "subchats.db"
    first, second = open_tree(store), open_tree(store)  # two connections, as two kernels
    slow = first.send("root", "first question", backend="echo")
    stream = iter(slow)
    next(stream)  # the first kernel's message is saved and its reply is streaming...
    second.send("root", "second question", backend="echo").run()  # ...when the other sends
    for _ in stream:
        pass
    msgs = first.get("root").messages
    by_seq = {m.seq: m for m in msgs}
    for m in msgs:  # the store says which question each reply answers...
        if m.role == "assistant":
            asked = by_seq[m.provenance.get("reply_to", m.seq - 1)]
            assert asked.role == "user" and m.content.endswith(asked.content), (
                f"reply {m.seq} ({m.content!r}) is stored after {asked.content!r}")
    context = first.context("root")  # ...and the next prompt pairs them
    assert [m["role"] for m in context] == ["user", "assistant"] * 2
    for question, answer in zip(context[::2], context[1::2]):
        assert answer["content"].endswith(question["content"])
    first.close()
    second.close()
