"""Nothing lost: the store file alone holds the tree (a kernel that ran cells and was shut
down normally leaves a ``subchats.db`` that, copied alone, holds every message; so does the
file a second after a cell, while the kernel runs), and a reply whose chat another process
deletes while it streams is kept in a recovery chat, the cell saying where. Real kernels
(jupyter_client), a paced loopback server (the real Groq client) and a second process."""

from __future__ import annotations

import shutil
import sqlite3
import time

import pytest

pytest.importorskip("jupyter_client")
pytest.importorskip("ipykernel")

from subchat_magics.testing import kernel as k  # noqa: E402
from subchat_magics.testing.fakeservers import FakeGroq  # noqa: E402
from subchat_magics.tree import ChatTree  # noqa: E402


def messages_of_file_alone(store, folder) -> list[tuple[str, str]]:
    """The (chat name, content) pairs that the ``.db`` file copied alone (no ``-wal``
    beside it) holds: what a download, a dataset or an e-mail of the file would hold."""
    folder.mkdir()
    copy = folder / store.name
    shutil.copyfile(store, copy)
    conn = sqlite3.connect(str(copy))
    try:
        return conn.execute("SELECT c.name, m.content FROM messages m JOIN chats c "
                            "ON c.id = m.chat_id ORDER BY m.id").fetchall()
    finally:
        conn.close()


def text_of(msgs: list[dict]) -> str:
    out = []
    for m in msgs:
        c = m["content"]
        out.append(c.get("text", ""))
        out.extend(str(v) for v in c.get("data", {}).values())
        out.append(c.get("evalue", ""))
    return "".join(out)


def test_the_file_alone_holds_every_message_a_second_after_a_cell_and_after_shutdown(workdir):
    from jupyter_client.manager import start_new_kernel

    store = workdir / "subchats.db"
    km, kc = start_new_kernel(kernel_name="python3", cwd=str(workdir), env=k.clean_env(),
                              startup_timeout=60)
    want = []
    try:
        k.execute(kc, "%load_ext subchat_magics")
        for i in range(3):
            _, reply = k.execute(kc, f"%%subchat root/t{i} --backend echo\nmessage {i}")
            assert reply["status"] == "ok", reply
            want += [(f"t{i}", f"message {i}"), (f"t{i}", f"echo (1 messages): message {i}")]
        time.sleep(1.0)  # "within a second" of the cell
        assert messages_of_file_alone(store, workdir / "while-running") == want
        k.execute(kc, "%%subchat root/t0 --backend echo\nlast one")
        want += [("t0", "last one"), ("t0", "echo (3 messages): last one")]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)  # a notebook's "Shut down kernel": a shutdown_request
    assert not km.is_alive()
    assert messages_of_file_alone(store, workdir / "after-shutdown") == want


def test_a_reply_into_a_chat_another_process_deletes_is_kept_and_the_cell_says_where(workdir):
    words = [f"w{i} " for i in range(40)]
    with FakeGroq(key="gsk_race_key_0123456789abcdef") as server:
        env = k.clean_env(GROQ_BASE_URL=server.url, GROQ_API_KEY=server.key)
        with k.running_kernel(workdir, env=env) as kc:
            _, reply = k.execute(kc, "%%subchat root/x --backend echo\nearlier")
            assert reply["status"] == "ok"
            server.configure(chunks=words, delay=0.05)  # two seconds of streaming
            msg_id = kc.execute("%%subchat root/x --backend groq\nthe question")
            assert server.wait_for_chunks(5, timeout=30)
            other = ChatTree(workdir / "subchats.db")  # this process: a second kernel, a view
            assert other.delete("root/x") == ["root/x"]
            other.close()
            msgs = []
            while True:
                msg = kc.get_iopub_msg(timeout=60)
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                msgs.append(msg)
                if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    break
            shown = text_of(msgs)
            status_msgs, _ = k.execute(kc, "%subchat status")
            status = text_of(status_msgs)
    assert "root/x was deleted while the reply streamed" in shown, shown
    assert "kept in root/recovered/x" in shown
    assert "w39" in shown  # the whole reply was shown
    assert "current:  root\n" in status, status
    tree = ChatTree(workdir / "subchats.db")
    assert "root/x" not in tree
    kept = tree.get("root/recovered/x").messages
    assert [m.role for m in kept] == ["user", "assistant"]
    assert kept[0].content == "the question"
    assert kept[1].content == "".join(words) and kept[1].status == "complete"
    assert kept[1].provenance["recovered_from"] == "root/x"
    tree.close()


# -- Ctrl-C inside a refresh of the chat index ----------------------------------------------------
def _interrupt_after(lines: int):
    """A tracer that raises KeyboardInterrupt at the ``lines``-th line run in tree.py or
    store.py (what a Ctrl-C landing there does); returns (tracer, count so far)."""
    import sys

    seen = [0]
    wanted = {sys.modules["subchat_magics.tree"].__file__, sys.modules["subchat_magics.store"].__file__}

    def local(frame, event, arg):
        if event == "line":
            seen[0] += 1
            if seen[0] == lines:
                raise KeyboardInterrupt
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename in wanted else None

    return tracer, seen


def test_a_ctrl_c_anywhere_in_a_refresh_leaves_a_whole_index_and_every_command_works(workdir):
    import random
    import sys

    store = workdir / "subchats.db"
    tree, other = ChatTree(store), ChatTree(store)
    for p in ("root/a", "root/a/b", "root/c", "root/c/d", "root/c/d/e"):
        other.create(p)
        other.append(p, "user", f"in {p}")
    rng = random.Random(21)
    tracer, seen = _interrupt_after(10 ** 9)
    sys.settrace(tracer)
    try:
        tree.refresh(force=True)
    finally:
        sys.settrace(None)
    lines = seen[0]  # lines one refresh runs
    interrupted = 0
    for trial in range(80):
        # another connection changes the tree, so the refresh has something to do
        paths = [c.path for c in other.chats() if c.path != "root"]
        op = rng.choice(["create", "rename", "delete"] if paths else ["create"])
        if op == "create":
            other.create(f"{rng.choice(paths + ['root'])}/n{trial}")
        elif op == "rename":
            other.rename(rng.choice(paths), f"r{trial}")
        else:
            other.delete(rng.choice(paths), force=True)
        tracer, seen = _interrupt_after(rng.randrange(1, lines + 5))
        sys.settrace(tracer)
        try:
            tree.refresh(force=rng.random() < 0.5)
        except KeyboardInterrupt:
            interrupted += 1
        finally:
            sys.settrace(None)
        # the index is whole: every chat under its own path, every child known
        index = tree._index
        assert all(index.paths[c.path] is c for c in index.chats.values())
        assert len(index.paths) == len(index.chats)
        assert all(cid in index.chats for kids in index.children.values() for cid in kids)
        # and every command works and sees the tree as it is now
        want = sorted(c.path for c in other.chats())
        assert sorted(c.path for c in tree.chats()) == want
        for path in want:
            chat = tree.get(path)
            assert chat.path == path and tree.lineage(chat)[-1] is chat
            tree.context(chat)
        made = tree.create(f"root/t{trial}")
        tree.append(made, "user", "hello")
        assert tree.delete(made) == [f"root/t{trial}"]
    print(f"{interrupted} of 80 refreshes interrupted")
    assert interrupted > 20  # the interrupts really landed inside refreshes
    tree.close()
    other.close()


# -- no finished reply is ever dropped, whatever is deleted meanwhile --------------------------
from hypothesis import HealthCheck, event, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CHATS = ["root/a", "root/a/b", "root/a/b/c", "root/d"]
ops = st.lists(st.tuples(st.sampled_from(["begin", "delete", "delete-streaming", "finish", "create"]),
                         st.integers(0, len(CHATS) - 1), st.integers(0, 5)), max_size=25)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=ops)
# found by this test: a chat deleted and made again, a new reply there taking the freed
# ids of the old reply's rows; the old reply must not be written into the new one
@example(steps=[("begin", 0, 0), ("delete", 0, 0), ("create", 0, 0), ("begin", 0, 0),
                ("finish", 0, 0)])
def test_every_finished_reply_is_stored_once_after_its_message_whatever_was_deleted(tmp_path_factory, steps):
    folder = tmp_path_factory.mktemp("race")
    mine, other = ChatTree(folder / "s.db"), ChatTree(folder / "s.db")  # two connections
    open_turns: list = []
    for p in CHATS:
        other.create(p)
    try:
        for k, (op, which, pick) in enumerate(steps):
            path = CHATS[which]
            if op == "create":
                for p in CHATS[: which + 1] if path.startswith("root/a") else [path]:
                    if p not in other and p.rpartition("/")[0] in other:
                        other.create(p)
            elif op == "delete" and path in other:
                other.delete(path, force=True)
            elif op == "delete-streaming" and open_turns:  # the chat a reply streams into
                gone = open_turns[pick % len(open_turns)][0].path
                if gone in other:
                    other.delete(gone, force=True)
            elif op == "begin" and path in mine:
                chat = mine.get(path)
                user, reply = mine.begin_turn(chat, f"question {k}")
                open_turns.append((chat, reply, k))
            elif op == "finish" and open_turns:
                chat, reply, q = open_turns.pop(pick % len(open_turns))
                msg = mine.finish_reply(chat, reply, f"answer {q}", "complete", {"q": q})
                # read back by another connection, at once: the reply is there, once,
                # right after its message (a later delete may remove it: the user's choice)
                kept = other.find(msg.chat_id)
                assert kept is not None, q
                texts = [(m.content, m.status) for m in kept.messages]
                at = [i for i, (t, _) in enumerate(texts) if t == f"answer {q}"]
                assert len(at) == 1 and texts[at[0]][1] == "complete"
                assert at[0] > 0 and texts[at[0] - 1][0] == f"question {q}"
                if "recovered_from" in msg.provenance:
                    ancestor, _, name = kept.path.rpartition("/recovered/")
                    assert msg.provenance["recovered_from"].startswith(ancestor + "/")
                    assert name.startswith(msg.provenance["recovered_from"].rpartition("/")[2])
                    event("a reply was recovered")
    finally:
        mine.close()
        other.close()
