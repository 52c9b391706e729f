"""A batch's rows begun together (one store call a group): the same rows as one by one,
all or none when one chat of the group is gone, and their replies found by id."""

from __future__ import annotations

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
