"""``%subchat import`` creates every chat of the file or none: a file whose second chat
cannot be imported leaves the tree exactly as it was (and the views hear of nothing)."""

from __future__ import annotations

import json

from subchat_magics.session import default_session
from subchat_magics.testing import store_rows


def rows(workdir):
    db = workdir / "subchats.db"
    return (store_rows(db, "SELECT * FROM chats ORDER BY id"),
            store_rows(db, "SELECT * FROM messages ORDER BY id"))


def test_a_file_with_one_bad_chat_creates_none(shell, workdir):
    shell.ok("%%subchat other\nalready here")
    shell.ok("%subchat export root --format json --out all.json")
    data = json.loads((workdir / "all.json").read_text())
    # root/fresh imports fine, then root/other already holds messages: the import fails
    data["chats"] = [c for c in data["chats"] if c["path"] != "root"]
    data["chats"].insert(0, {"path": "root/fresh", "system_prompt": None, "fork_seq": 0,
                             "messages": [{"role": "user", "content": "new", "status": "complete"}]})
    (workdir / "mixed.json").write_text(json.dumps(data))
    seen = []
    unsubscribe = default_session().subscribe(lambda event, d: seen.append(event))
    before = rows(workdir)
    try:
        err = shell.fails("%subchat import mixed.json")
    finally:
        unsubscribe()
    assert "already exists with messages" in err
    assert rows(workdir) == before  # root/fresh was not left behind
    assert "root/fresh" not in shell.ok("%subchat tree --text")
    assert "chat-created" not in seen


def test_a_good_file_imports_every_chat_in_one_go(shell, workdir):
    shell.ok("%%subchat a\none")
    shell.ok("%%subchat a/b\ntwo")
    shell.ok("%subchat export root/a --format json --out a.json")
    shell.ok("%subchat rename a old")
    out = shell.ok("%subchat import a.json")
    assert "imported 2 chats" in out
    text = shell.ok("%subchat tree --text")
    assert "old" in text and " a  " in text and " b  " in text
