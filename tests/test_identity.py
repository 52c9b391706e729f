"""Chats are held by identity: the current chat follows renames, a delete moves it to the
nearest surviving ancestor (and says so), a chat deleted by another process is never
silently recreated, and a reply streaming into a renamed chat lands in that chat. Run
through a real InteractiveShell on the echo backend."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from subchat_magics.session import default_session
from subchat_magics.testing import store_rows


def chats(workdir) -> list[str]:
    """Every chat path in the store, read with sqlite3 as another process would."""
    rows = store_rows(workdir / "subchats.db", "SELECT id, parent_id, name FROM chats")
    by_id = {r[0]: r for r in rows}

    def path(cid):
        _, parent, name = by_id[cid]
        return name if parent is None else f"{path(parent)}/{name}"

    return sorted(path(r[0]) for r in rows)


def messages_of(workdir, path: str) -> list[str]:
    tree = default_session().tree
    return [m.content for m in tree.get(path).messages]


def test_renaming_the_current_chat_keeps_it_current_under_its_new_path(shell, workdir):
    shell.ok("%%subchat zz\nhello")
    shell.ok("%subchat rename zz yy")
    shell.ok("%%subchat\nnext")
    assert chats(workdir) == ["root", "root/yy"]  # no new zz
    assert messages_of(workdir, "root/yy")[2] == "next"
    assert "* " in [line for line in shell.ok("%subchat tree --text").splitlines()
                    if "yy" in line][0]


def test_renaming_an_ancestor_keeps_the_current_chat_under_the_new_path(shell, workdir):
    shell.ok("%%subchat a\none")
    shell.ok("%%subchat a/b\ntwo")
    shell.ok("%subchat rename a top")
    assert "root/top/b" in shell.ok("%subchat status")
    shell.ok("%%subchat\nthree")
    assert chats(workdir) == ["root", "root/top", "root/top/b"]
    assert messages_of(workdir, "root/top/b")[-2] == "three"


def test_deleting_the_current_chat_makes_its_parent_current_and_says_so(shell, workdir):
    shell.ok("%%subchat a\none")
    shell.ok("%%subchat a/b\ntwo")
    out = shell.ok("%subchat delete a/b")
    assert "current chat: root/a" in out
    shell.ok("%%subchat\nthree")
    assert chats(workdir) == ["root", "root/a"]
    assert messages_of(workdir, "root/a")[-2] == "three"


def test_deleting_an_ancestor_of_the_current_chat_makes_the_survivor_current(shell, workdir):
    shell.ok("%%subchat a\none")
    shell.ok("%%subchat a/b\ntwo")
    shell.ok("%%subchat a/b/c\nthree")
    out = shell.ok("%subchat delete a --force")
    assert "current chat: root" in out
    shell.ok("%%subchat\nfour")
    assert chats(workdir) == ["root"]
    assert messages_of(workdir, "root")[-2] == "four"


def test_deleting_another_chat_leaves_the_current_one_alone(shell, workdir):
    shell.ok("%%subchat a\none")
    shell.ok("%%subchat b\ntwo")
    out = shell.ok("%subchat delete a")
    assert "current chat" not in out
    assert "current:  root/b" in shell.ok("%subchat status")


def test_a_chat_deleted_by_another_process_is_not_recreated_by_a_cell_without_a_path(
        shell, workdir):
    shell.ok("%%subchat a\none")
    shell.ok("%%subchat a/b\ntwo")
    script = textwrap.dedent(f"""
        from subchat_magics import open_tree
        open_tree({str(workdir / 'subchats.db')!r}).delete('root/a/b')
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    before = store_rows(workdir / "subchats.db", "SELECT * FROM messages ORDER BY id")
    err = shell.fails("%%subchat\nthree")
    assert "root/a/b" in err and "deleted" in err and "root/a is current now" in err
    assert chats(workdir) == ["root", "root/a"]  # not recreated
    assert store_rows(workdir / "subchats.db", "SELECT * FROM messages ORDER BY id") == before
    shell.ok("%%subchat\nthree")  # the survivor is current: the next cell goes there
    assert messages_of(workdir, "root/a")[-2] == "three"


def test_a_reply_streaming_into_a_chat_that_is_renamed_meanwhile_lands_in_that_chat(
        shell, workdir):
    session = default_session()
    shell.ok("%%subchat a\nfirst")
    turn = session.send("root/a", "one two three four", backend="echo")
    stream = iter(turn)
    next(stream)  # the reply has started
    shell.ok("%subchat rename a renamed")
    rest = "".join(stream)
    assert rest
    assert chats(workdir) == ["root", "root/renamed"]
    assert messages_of(workdir, "root/renamed")[-1] == "echo (3 messages): one two three four"
    assert turn.chat.path == "root/renamed"


def test_a_chat_with_a_reply_streaming_cannot_be_deleted(shell, workdir):
    session = default_session()
    shell.ok("%%subchat a\nfirst")
    turn = session.send("root/a", "one two three", backend="echo")
    stream = iter(turn)
    next(stream)
    err = shell.fails("%subchat delete a")
    assert "streaming" in err
    assert "".join(stream)
    shell.ok("%subchat delete a")
    assert chats(workdir) == ["root"]


def test_events_name_chats_by_id(shell, workdir):
    session = default_session()
    seen = []
    unsubscribe = session.subscribe(lambda event, data: seen.append((event, data)))
    try:
        shell.ok("%%subchat a\nhello")
        shell.ok("%subchat rename a b")
        shell.ok("%subchat delete b")
    finally:
        unsubscribe()
    created = next(d for e, d in seen if e == "chat-created")
    renamed = next(d for e, d in seen if e == "chat-renamed")
    deleted = next(d for e, d in seen if e == "chat-deleted")
    assert created["id"] == renamed["id"] and deleted["ids"] == [created["id"]]
    assert (renamed["old"], renamed["path"]) == ("root/a", "root/b")
    kinds = [e for e, _ in seen]
    assert kinds.index("reply-start") < kinds.index("reply-end")
    moves = [d for e, d in seen if e == "current"]
    assert [m["path"] for m in moves] == ["root/a", "root"]
