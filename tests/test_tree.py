"""The chat tree and its store, without IPython."""

from __future__ import annotations

import sqlite3

import pytest

from subchat_magics import SimpleLLMClient, open_tree
from subchat_magics.errors import ChatNotFound, InvalidInput, StoreError
from subchat_magics.session import Session
from subchat_magics.store import APPLICATION_ID, SCHEMA_VERSION
from subchat_magics.tree import normalize_path


def test_paths_are_normalized_under_root():
    assert normalize_path("root") == "root"
    assert normalize_path("physics/units") == "root/physics/units"
    assert normalize_path("/physics/") == "root/physics"
    for bad in ("root/a b", "root//x", "root/../x", "root/a\x00", "root/" + "x" * 101):
        with pytest.raises(InvalidInput):
            normalize_path(bad)


def test_context_is_system_then_path_messages_then_new(tmp_path):
    tree = open_tree(tmp_path / "t.db")
    tree.set_system_prompt("root", "sys")
    tree.send("root", "q1", backend="echo").run()
    tree.create("root/a")
    tree.send("root/a", "q2", backend="echo").run()
    ctx = tree.context("root/a", "q3")
    assert [m["role"] for m in ctx] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert ctx[0]["content"] == "sys" and ctx[1]["content"] == "q1" and ctx[-1]["content"] == "q3"


def test_a_failed_turn_is_kept_but_left_out_of_the_context(tmp_path):
    tree = open_tree(tmp_path / "t.db")
    tree.append("root", "user", "lost question")
    tree.append("root", "assistant", "", status="error", provenance={"finish_reason": "error: x"})
    tree.append("root", "user", "kept question")
    tree.append("root", "assistant", "partial", status="interrupted")
    assert [m["content"] for m in tree.context("root")] == ["kept question", "partial"]
    assert len(tree.root.messages) == 4


def test_provenance_is_recorded(tmp_path):
    tree = open_tree(tmp_path / "t.db")
    turn = tree.send("root", "a b c", backend="echo")
    assert "".join(turn) == "echo (1 messages): a b c"
    p = turn.reply.provenance
    assert p["backend"] == "echo" and p["model"] == "echo" and p["finish_reason"] == "stop"
    assert p["prompt_tokens"] == 3 and p["completion_tokens"] == 6
    assert p["ttft_s"] >= 0 and p["duration_s"] >= p["ttft_s"]


def test_closing_a_turn_early_keeps_the_partial_reply_interrupted(tmp_path):
    tree = open_tree(tmp_path / "t.db")
    turn = tree.send("root", "one two three four five", backend="echo")
    it = iter(turn)
    assert next(it) == "echo "
    it.close()
    assert turn.reply.status == "interrupted" and turn.reply.content == "echo "


def test_tree_reopens_with_everything(tmp_path):
    tree = open_tree(tmp_path / "t.db")
    tree.create("root/a")
    tree.create("root/a/b", system_prompt="deep")
    tree.send("root/a/b", "hello", backend="echo").run()
    tree.close()
    again = open_tree(tmp_path / "t.db")
    assert [c.path for c in again.chats()] == ["root", "root/a", "root/a/b"]
    assert again.get("root/a/b").system_prompt == "deep"
    assert [m.content for m in again.get("root/a/b").messages] == ["hello", "echo (2 messages): hello"]


def test_another_connection_sees_new_chats(tmp_path):
    one, two = open_tree(tmp_path / "t.db"), open_tree(tmp_path / "t.db")
    one.create("root/from-one")
    assert "root/from-one" in two  # data_version moved: the index is reloaded


def test_rename_and_delete(tmp_path):
    tree = open_tree(tmp_path / "t.db")
    tree.create("root/a")
    tree.create("root/a/b")
    tree.rename("root/a", "z")
    assert [c.path for c in tree.chats()] == ["root", "root/z", "root/z/b"]
    with pytest.raises(InvalidInput, match="--force"):
        tree.delete("root/z")
    assert tree.delete("root/z", force=True) == ["root/z", "root/z/b"]
    with pytest.raises(ChatNotFound):
        tree.get("root/z/b")


def test_newer_schema_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "t.db"
    open_tree(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match="newer"):
        open_tree(path)
    assert path.read_bytes() == before


def test_foreign_sqlite_file_is_refused(tmp_path):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE invoices (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="another program"):
        open_tree(path)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID
    conn.close()


def test_simple_llm_client_is_the_seed_spelling(tmp_path):
    session = Session(tmp_path / "t.db")
    client = SimpleLLMClient(backend="echo", session=session)
    assert client.generate_response("root", "hello") == "echo (1 messages): hello"
    node = session.tree.ensure("root/child")
    assert "".join(client.generate_response_stream(node, "again")) == "echo (3 messages): again"
    assert [m.role for m in session.tree.get("root/child").messages] == ["user", "assistant"]


def test_a_third_party_backend_is_found_by_entry_point(tmp_path, monkeypatch):
    pkg = tmp_path / "site"
    (pkg / "shout_backend.py").parent.mkdir()
    (pkg / "shout_backend.py").write_text(
        "from subchat_magics.backends.base import Backend, Finish\n"
        "class Shout(Backend):\n"
        "    id = 'shout'\n"
        "    def stream(self, messages, options):\n"
        "        yield messages[-1]['content'].upper()\n"
        "        yield Finish(model='shout-1')\n")
    dist = pkg / "shout_backend-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shout-backend\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[subchat_magics.backends]\nshout = shout_backend:Shout\n")
    monkeypatch.syspath_prepend(str(pkg))
    from subchat_magics.backends.registry import Registry

    reg = Registry()
    assert "shout" in reg.names()
    tree = open_tree(tmp_path / "t.db")
    turn = tree.send("root", "quiet please", backend=reg.get("shout"))
    assert "".join(turn) == "QUIET PLEASE"
    assert turn.reply.provenance["model"] == "shout-1"


def test_a_store_with_an_orphan_chat_is_a_clear_error(tmp_path):
    import sqlite3

    from subchat_magics.errors import StoreError

    tree = open_tree(tmp_path / "t.db")
    tree.send("root/a", "hi", backend="echo").run()
    tree.close()
    conn = sqlite3.connect(tmp_path / "t.db")  # damage made by hand, as another program could
    conn.execute("PRAGMA foreign_keys = OFF")
    conn.execute("UPDATE chats SET parent_id = 999999 WHERE name = 'a'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="damaged .*parent #999999"):
        open_tree(tmp_path / "t.db")
