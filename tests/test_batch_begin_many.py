"""A batch's rows begun together (one store call a group): the same rows as one by one,
all or none when one chat of the group is gone, and their replies found by id."""

from __future__ import annotations

import sqlite3

import pytest

from subchat_magics.tree import ChatTree


def rows(tree: ChatTree) -> list[tuple]:
    return tree.store._read("SELECT id, chat_id, seq, role, content, status, provenance "
                            "FROM messages ORDER BY id")


def test_begin_turns_writes_what_begin_turn_writes(tmp_path):
    one, many = ChatTree(tmp_path / "one.db"), ChatTree(tmp_path / "many.db")
    for tree in (one, many):
        tree.create("b")
        for i in range(5):
            tree.create(f"b/{i}")
        tree.append("b/2", "user", "earlier")  # a chat that holds a message already
    texts = [f"row {i}" for i in range(5)]
    singles = [one.begin_turn(f"b/{i}", t, "echo") for i, t in enumerate(texts)]
    pairs = many.begin_turns([(many.get(f"b/{i}"), t) for i, t in enumerate(texts)], "echo")
    strip = [(r[1:]) for r in rows(one)]
    assert [(r[1:]) for r in rows(many)] == strip
    assert [(u.seq, r.seq) for u, r in pairs] == [(u.seq, r.seq) for u, r in singles]
    assert [r.seq for _, r in pairs] == [1, 1, 2, 1, 1]
    for (_, reply), i in zip(pairs, range(5)):  # each reply row is found and finished
        msg = many.finish_reply(f"b/{i}", reply, f"answer {i}", "complete", {"backend": "echo"})
        assert msg.chat_id == many.get(f"b/{i}").id
    got = [(m.role, m.content, m.status) for m in many.get("b/4").messages]
    assert got == [("user", "row 4", "complete"), ("assistant", "answer 4", "complete")]


def test_a_gone_chat_writes_nothing_of_the_group_then_one_by_one(tmp_path):
    tree = ChatTree(tmp_path / "t.db")
    tree.create("b")
    chats = [tree.create(f"b/{i}") for i in range(3)]
    before = rows(tree)
    tree.store.delete_chat(chats[1].id)  # another kernel deleted it; this index still has it
    try:
        with tree.store.transaction():
            tree.store.begin_turns([(c.id, "x") for c in chats], {"backend": "echo"})
    except Exception as exc:  # noqa: BLE001 - what the store says is checked below
        assert "refused" in str(exc) or "FOREIGN" in str(exc), exc
    else:
        raise AssertionError("a turn into a deleted chat was stored")
    assert rows(tree) == before  # all or none: the two live chats got nothing either


@pytest.mark.parametrize("sqlite", [None, (3, 32, 0)], ids=["update-from", "old-sqlite"])
def test_replies_deferred_in_a_write_block_are_written_as_one_by_one(tmp_path, monkeypatch, sqlite):
    """A batch's write block writes the replies ended in it together (one UPDATE FROM;
    an executemany on an SQLite before 3.33): the rows are what finish_reply writes one
    by one, and a reply whose chat another connection deleted meanwhile is recovered,
    as without deferring."""
    if sqlite is not None:
        monkeypatch.setattr(sqlite3, "sqlite_version_info", sqlite)
    one, many = ChatTree(tmp_path / "one.db"), ChatTree(tmp_path / "many.db")
    for tree in (one, many):
        tree.create("b")
        for i in range(4):
            tree.create(f"b/{i}")
    texts = [f"row {i}" for i in range(4)]
    singles = [one.begin_turn(f"b/{i}", t, "echo") for i, t in enumerate(texts)]
    pairs = many.begin_turns([(many.get(f"b/{i}"), t) for i, t in enumerate(texts)], "echo")
    prov = {"backend": "echo", "finish_reason": "stop", "note": "sk-" + "x" * 40}
    for i, (_, reply) in enumerate(singles):
        one.finish_reply(f"b/{i}", reply, f"answer {i}", "complete", dict(prov))
    with many.store.transaction():
        many.defer_replies()
        msgs = [many.finish_reply(f"b/{i}", reply, f"answer {i}", "complete", dict(prov))
                for i, (_, reply) in enumerate(pairs)]
        many.flush_replies(stop=True)
    assert [r[1:] for r in rows(many)] == [r[1:] for r in rows(one)]
    assert [m.chat_id for m in msgs] == [many.get(f"b/{i}").id for i in range(4)]

    # a chat another connection deleted while its reply ran: the reply is recovered
    chat = many.get("b/2")
    gone = many.begin_turns([(chat, "last")], "echo")[0][1]
    assert ChatTree(tmp_path / "many.db").delete("b/2", force=True)
    with many.store.transaction():
        many.defer_replies()
        msg = many.finish_reply(chat, gone, "kept", "complete", dict(prov))
        many.flush_replies(stop=True)
    kept = many.get("b/recovered/2")
    assert msg.chat_id == kept.id and msg.provenance["recovered_from"] == "root/b/2"
    assert [(m.content, m.status) for m in kept.messages] == [("last", "complete"),
                                                              ("kept", "complete")]
