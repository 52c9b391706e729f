"""Issue 14, tried as a new user would: bad input leaves the tree as it was, and nothing a
user does loses what was written. Every test goes through the real shell (or the core a
view calls); a bad-input test checks the error *and* that the store rows are unchanged."""

from __future__ import annotations

import _thread
import json
import os
import threading

import pytest

from subchat_magics.session import default_session
from subchat_magics.testing import store_rows


def snapshot(path) -> tuple[list, list]:
    """Every row of the store, read as another process would."""
    return (store_rows(path, "SELECT id, parent_id, name, system_prompt, fork_seq FROM chats ORDER BY id"),
            store_rows(path, "SELECT id, chat_id, seq, role, content, status FROM messages ORDER BY id"))


def current(shell) -> str:
    return next(line for line in shell.ok("%subchat status").splitlines()
                if line.startswith("current:")).split()[1]


def context(path: str) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in default_session().tree.context(path)]


def refused_and_unchanged(shell, workdir, cell: str, *expected: str) -> str:
    """Run a cell that must fail; the store and the current chat must be as before."""
    db = workdir / "subchats.db"
    before, cur = snapshot(db), current(shell)
    msg = shell.fails(cell)
    for text in expected:
        assert text in msg, msg
    assert "\n" not in msg.strip(), msg
    assert snapshot(db) == before
    assert current(shell) == cur
    return msg


# -- 1. importing a subtree keeps the context it inherited --------------------------------------
@pytest.fixture
def physics_export(shell, workdir):
    """root: q1 | root/physics (branched after q1's reply): q2 | root/physics/sub: q3;
    then root goes on with 'later' (not in physics' context)."""
    shell.ok('%%subchat root -s "tutor"\nq1')
    shell.ok("%%subchat root/physics\nq2")
    shell.ok("%%subchat root/physics/sub\nq3")
    shell.ok("%%subchat root\nlater")
    contexts = {p: context(p) for p in ("root/physics", "root/physics/sub")}
    shell.ok(f"%subchat export root/physics --format json --out {workdir / 'p.json'}")
    return workdir / "p.json", contexts


def test_an_imported_subtree_keeps_its_inherited_context_under_a_root_with_other_messages(
        shell, workdir, physics_export):
    file, contexts = physics_export
    data = json.loads(file.read_text())
    assert [m["content"] for m in data["inherited"]["messages"]] == ["q1", "echo (2 messages): q1"]
    assert data["inherited"]["system_prompt"] == "tutor"

    shell.ok(f"%config SubchatMagics.store_path = '{workdir / 'other.db'}'")
    shell.ok("%%subchat root\nunrelated")
    out = shell.ok(f"%subchat import {file}")
    assert "imported 2 chats" in out and "copied into it" in out and "now its own" in out
    for path, ctx in contexts.items():
        assert context(path) == ctx  # not root's 'unrelated', and nothing of its own lost
    # it answers with the context it was exported with
    assert shell.ok("%%subchat root/physics\nnext").strip() == "echo (6 messages): next"


def test_an_imported_subtree_branches_where_it_did_when_the_parent_holds_that_context(
        shell, workdir, physics_export):
    file, contexts = physics_export
    fork = store_rows(workdir / "subchats.db", "SELECT fork_seq FROM chats WHERE name = 'physics'")
    shell.ok("%subchat delete root/physics --force")
    out = shell.ok(f"%subchat import {file}")
    assert "note" not in out  # nothing had to change
    for path, ctx in contexts.items():
        assert context(path) == ctx
    assert store_rows(workdir / "subchats.db",
                      "SELECT fork_seq FROM chats WHERE name = 'physics'") == fork


def test_an_import_that_cannot_keep_the_context_is_refused_and_writes_nothing(
        shell, workdir, physics_export):
    file, _ = physics_export
    shell.ok("%%subchat root/x\nx inherits root's messages")
    refused_and_unchanged(shell, workdir, f"%subchat import {file} --into root/x",
                          "cannot import root/physics under root/x", "--into root")


# -- 2. the store file removed or replaced while open --------------------------------------------
def _remove_store(workdir) -> None:
    for suffix in ("", "-wal", "-shm"):
        if (workdir / f"subchats.db{suffix}").exists():
            os.remove(workdir / f"subchats.db{suffix}")


def test_a_store_removed_while_open_refuses_the_next_write_and_the_tree_can_be_restored(shell, workdir):
    shell.ok("%%subchat root\nkeep me")
    shell.ok("%%subchat root/a\nand me")
    _remove_store(workdir)
    for cell in ("%%subchat root\nwritten into the void?", "%%subchat root/new\nor here?",
                 "%subchat rename root/a b", "%subchat delete root/a"):
        msg = shell.fails(cell)
        assert "was removed while it was open; nothing was written" in msg and "reopen" in msg
        assert not (workdir / "subchats.db").exists()
    assert "removed while open" in shell.ok("%subchat status")
    shell.ok("%subchat reopen --restore")
    rows = store_rows(workdir / "subchats.db", "SELECT content FROM messages ORDER BY id")
    assert [r[0] for r in rows] == ["keep me", "echo (1 messages): keep me",
                                    "and me", "echo (3 messages): and me"]
    assert shell.ok("%%subchat root\nagain").strip() == "echo (3 messages): again"


def test_a_store_removed_while_open_can_start_afresh(shell, workdir):
    shell.ok("%%subchat root\nold")
    _remove_store(workdir)
    shell.fails("%%subchat root\nnew")
    said = shell.ok("%subchat reopen")
    # a new, empty store at the same place: nothing of the removed one comes back
    assert str(workdir / "subchats.db") in said and "(1 chat)" in said, said
    assert store_rows(workdir / "subchats.db", "SELECT COUNT(*) FROM messages") == [(0,)]
    assert shell.ok("%%subchat root\nnew").strip() == "echo (1 messages): new"
    assert store_rows(workdir / "subchats.db", "SELECT COUNT(*) FROM messages") == [(2,)]


def test_a_store_replaced_while_open_is_never_written_through_the_old_connection(shell, workdir):
    shell.ok("%%subchat root\nmine")
    shell.ok(f"%config SubchatMagics.store_path = '{workdir / 'other.db'}'")
    shell.ok("%%subchat root/theirs\ntheirs")
    shell.ok(f"%config SubchatMagics.store_path = '{workdir / 'subchats.db'}'")
    shell.ok("%subchat status")  # subchats.db is open again, other.db closed
    before = snapshot(workdir / "other.db")
    os.replace(workdir / "other.db", workdir / "subchats.db")
    msg = shell.fails("%%subchat root\nwhere does this go?")
    assert "was replaced by another file" in msg and "%subchat reopen" in msg
    assert snapshot(workdir / "subchats.db") == before
    shell.ok("%subchat reopen")
    assert "theirs" in shell.ok("%subchat tree --text")


# -- 3. a chat named with a non-ASCII digit ----------------------------------------------------
def test_a_chat_named_with_a_non_ascii_digit_does_not_break_numbering(shell):
    shell.ok("%%subchat root/²\nhi")
    out = shell.ok("%%subchat root --fanout 2\nq")
    assert "── root/1 ──" in out and "── root/2 ──" in out
    assert default_session().branch("root").path == "root/3"  # the view's Branch


# -- 4. bad options and names create nothing ----------------------------------------------------
@pytest.mark.parametrize("cell,expected", [
    ("%%subchat root --children a,b --temperatures 0.5,5\nhi", "temperature must be between 0 and 2"),
    ("%%subchat root/new\nhi \ud800", "unpaired surrogate"),
    ("%%subchat root/new -s '\ud800'\nhi", "unpaired surrogate"),
    ("%%subchat root/new -m '\ud800'\nhi", "unpaired surrogate"),
    ("%%subchat root --children a,\ud800\nhi", "bad chat path"),
    ("%%subchat root --children a,b -s '\ud800'\nhi", "unpaired surrogate"),
    ("%%subchat root/new --fanout 0\nhi", "--fanout takes"),
    ("%%subchat root/new\n   ", "the message is empty"),
    ("%%subchat root/new -n 0\nhi", "max tokens"),
    ("%%subchat root/new --backend nope\nhi", "unknown backend"),
])
def test_bad_options_and_names_are_checked_before_anything_is_written(shell, workdir, cell, expected):
    shell.ok("%%subchat root/a\nfirst")
    refused_and_unchanged(shell, workdir, cell, expected)


def test_tree_send_of_a_non_string_says_it_is_not_text_and_makes_no_chat(shell, workdir):
    from subchat_magics import open_tree

    tree = open_tree(workdir / "subchats.db")
    shell.ok("%subchat status")
    before = snapshot(workdir / "subchats.db")
    result, _ = shell.run("from subchat_magics import open_tree\n"
                          f"open_tree({str(workdir / 'subchats.db')!r}).send('root/new', 123)")
    assert "must be text" in str(result.error_in_exec) and "int" in str(result.error_in_exec)
    assert snapshot(workdir / "subchats.db") == before
    tree.close()


# -- 5. -s with --children sets every named chat -------------------------------------------------
def test_system_with_children_sets_the_prompt_of_every_named_chat_existing_ones_too(shell, workdir):
    shell.ok('%%subchat root/a -s "old"\nhi')
    shell.ok('%%subchat root --children a,b -s "new"\nq')
    assert "system prompt of root/a: 'new'" in shell.ok("%subchat system root/a")
    assert "system prompt of root/b: 'new'" in shell.ok("%subchat system root/b")
    sent = [r[0] for r in store_rows(workdir / "subchats.db",
                                     "SELECT system_prompt FROM chats WHERE name IN ('a', 'b')")]
    assert sent == ["new", "new"]


# -- 6. {name} whose __str__ fails --------------------------------------------------------------
@pytest.mark.parametrize("body", ["raise RuntimeError('no text')", "return 5"])
def test_a_name_whose_str_fails_is_a_one_line_error_naming_it(shell, workdir, body):
    shell.ok(f"class Odd:\n    def __str__(self):\n        {body}\nodd = Odd()")
    shell.ok("%%subchat root\nfirst")
    msg = refused_and_unchanged(shell, workdir, "%%subchat root/new\nlook at {odd}", "{odd}", "str(odd)")
    assert "Traceback" not in msg


# -- 7. IPython's own names stay literal ------------------------------------------------------------
def test_ipython_own_names_are_not_interpolated_unless_the_notebook_assigned_them(shell):
    shell.ok("1 + 1")  # IPython now holds an output in _
    text = "for x in {__}: {___} {In} {Out} {exit} {quit} {get_ipython} {_ih} {_oh} {_dh}"
    assert shell.ok(f"%%subchat root\n{text}").strip() == f"echo (1 messages): {text}"
    # {_} is the one exception (issue 12): the last result
    assert shell.ok("%%subchat root/last\n{_}").strip() == "echo (3 messages): 2"
    ip = shell.ip
    try:
        shell.ok("_ = 'mine'")
        assert shell.ok("%%subchat root\n{_}").strip() == "echo (3 messages): mine"
    finally:
        ip.user_ns["_"] = ip.user_ns_hidden.get("_", "")


# -- 8. --var names -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["class", "None", "1x", "a-b"])
def test_var_refuses_keywords_and_non_identifiers(shell, workdir, name):
    shell.ok("%%subchat root\nfirst")
    refused_and_unchanged(shell, workdir, f"%%subchat root/new --var {name}\nhi", "--var", repr(name))
    assert name not in shell.ns


# -- 9. deleting root ---------------------------------------------------------------------------
def test_deleting_root_always_asks_for_force(shell, workdir):
    shell.ok("%%subchat root\nprecious")  # root has messages but no subchats
    refused_and_unchanged(shell, workdir, "%subchat delete root", "--force", "empties")
    shell.ok("%subchat delete root --force")
    assert store_rows(workdir / "subchats.db", "SELECT COUNT(*) FROM messages") == [(0,)]


# -- 10. case and spelling of paths ------------------------------------------------------------
def test_a_path_starting_with_ROOT_is_refused_with_the_spelling_it_meant(shell, workdir):  # noqa: N802
    shell.ok("%%subchat root/physics\nhi")
    refused_and_unchanged(shell, workdir, "%%subchat ROOT/y\nhi", "did you mean 'root/y'", "case-sensitive")
    refused_and_unchanged(shell, workdir, "%%subchat Root\nhi", "did you mean 'root'")
    msg = shell.fails("%subchat show root/Physics")
    assert "did you mean 'root/physics'" in msg
    refused_and_unchanged(shell, workdir, "%%subchat root/Physics/units\nhi", "did you mean 'root/physics'")
    # a chat named ROOT under root is still possible, written in full
    shell.ok("%%subchat root/ROOT\nhi")


# -- 11. the configured system prompt is visible ---------------------------------------------------
def test_the_configured_system_prompt_shows_in_system_show_provenance_and_export(shell, workdir):
    shell.ok("%config SubchatMagics.system_prompt = 'Be brief.'")
    assert shell.ok("%%subchat root\nhi").strip() == "echo (2 messages): hi"
    cfg = "%config SubchatMagics.system_prompt"
    assert f"inherits the system prompt 'Be brief.' (from {cfg})" in shell.ok("%subchat system root")
    shown = shell.ok("%subchat show root -p")
    assert f"[system] Be brief. (from {cfg})" in shown
    assert f"system prompt: from {cfg}" in shown
    prov = json.loads(store_rows(workdir / "subchats.db",
                                 "SELECT provenance FROM messages WHERE role = 'assistant'")[0][0])
    assert prov["system_from"] == cfg and prov["system_prompt"] == "Be brief."
    shell.ok(f"%subchat export root --format json --out {workdir / 'e.json'}")
    chat = json.loads((workdir / "e.json").read_text())["chats"][0]
    assert chat["system_prompt"] is None  # not the chat's own ...
    assert (chat["system_prompt_in_force"], chat["system_prompt_from"]) == ("Be brief.", cfg)  # ... but sent
    assert f"*system* (from {cfg}): Be brief." in shell.ok("%subchat export root --format md")


# -- 12. SimpleLLMClient's options ----------------------------------------------------------------
@pytest.mark.parametrize("call,error,name", [
    ("SimpleLLMClient(bogus=1)", TypeError, "bogus"),
    ("SimpleLLMClient(max_token=5)", TypeError, "max_token"),
    ("SimpleLLMClient(temperature=9)", Exception, "temperature"),
    ("SimpleLLMClient(backend='nope')", Exception, "nope"),
])
def test_simple_client_refuses_unknown_options_naming_them(shell, call, error, name):
    result, _ = shell.run(f"from subchat_magics import SimpleLLMClient\n{call}")
    assert isinstance(result.error_in_exec, error) and name in str(result.error_in_exec)


# -- 13. settings out of range ------------------------------------------------------------------
def test_update_interval_out_of_range_is_refused_and_kept(shell, caplog):
    shell.run("%config SubchatMagics.update_interval = -1")
    assert "update_interval must be between 0 and 10" in caplog.text
    assert shell.ok("print(get_ipython().find_magic('subchat').__self__.update_interval)").strip() == "0.05"
    assert default_session().defaults.update_interval == 0.05


@pytest.mark.parametrize("cell,expected", [
    ("%%subchat root --fanout 2 --temperatures ''\nhi", "--temperatures takes numbers"),
    ("%%subchat root --fanout 2 --temperatures 0.5,,1\nhi", "--temperatures takes numbers"),
    ("%%subchat root --fanout 3 --children p,q\nhi", "give one of the two"),
    ("%%subchat root --temperatures 0.5\nhi", "--temperatures goes with --fanout"),
    ("%%subchat root/v --vote 3 --temperatures 0,1\nhi", "--temperatures goes with --fanout"),
    ("%%subchat root/c --compare echo,echo:b --temperatures 0,1\nhi", "--temperatures goes with --fanout"),
    ("%%subchat root --each items --temperatures 0.5\n{item}", "--temperatures goes with --fanout"),
])
def test_fanout_settings_that_cannot_all_apply_are_one_line_errors(shell, workdir, cell, expected):
    shell.ok("%%subchat root\nfirst")
    shell.ns["items"] = ["a", "b"]
    refused_and_unchanged(shell, workdir, cell, expected)


# -- smaller --------------------------------------------------------------------------------------
def test_an_interrupt_before_the_first_token_says_nothing_arrived_and_sets_the_var(shell, workdir,
                                                                                   monkeypatch):
    monkeypatch.setenv("SUBCHAT_ECHO_DELAY", "1")
    started = threading.Event()
    unsubscribe = default_session().tree.subscribe(
        lambda event, data: event == "reply-start" and started.set())
    timer = threading.Thread(target=lambda: started.wait(30) and _thread.interrupt_main())
    timer.start()
    try:
        result, cap = shell.run("%%subchat root --var answer\nhello")
    finally:
        timer.join()
        unsubscribe()
    assert str(result.error_in_exec) == ("%%subchat: interrupted: nothing arrived; the message "
                                         "is kept in root")
    shown = cap.stdout
    assert "[interrupted: nothing arrived]" in shown and "partial reply kept" not in shown
    assert shell.ns["answer"] == ""


def test_a_chat_cannot_be_deleted_while_a_reply_streams_into_it(shell, workdir):
    shell.ok("%%subchat root/a\nfirst")
    turn = default_session().send("root/a/b", "streaming")
    stream = iter(turn)
    next(stream)  # the reply has started
    try:
        refused_and_unchanged(shell, workdir, "%subchat delete root/a --force", "streaming into root/a/b")
    finally:
        for _ in stream:
            pass
    shell.ok("%subchat delete root/a --force")


def test_a_closed_store_says_to_open_the_tree_again(shell, workdir):
    shell.ok("%%subchat root\nhi")
    tree = default_session().tree  # what a view holds
    shell.ok("%unload_ext subchat_magics")
    try:
        with pytest.raises(Exception, match=r"run %subchat tree again") as err:
            tree.append("root", "user", "late")
        assert "Cannot operate" not in str(err.value)
    finally:
        shell.ok("%load_ext subchat_magics")


def test_the_cell_magic_help_names_the_cell_magic_with_aligned_usage(shell):
    doc = shell.ip.find_cell_magic("subchat").__doc__
    usage = doc.split("::\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert usage[0].startswith("  %%subchat [")
    col = len("  %%subchat ")
    assert all(line.startswith(" " * col + "[") for line in usage[1:]), usage


def test_the_markdown_export_shows_where_each_subchat_branched(shell):
    shell.ok("%%subchat root\nq1")
    shell.ok("%%subchat root/a\nq2")
    shell.ok("%%subchat root/a/b\nq3")
    md = shell.ok("%subchat export root --format md")
    assert "*branched from root after its message 2*" in md
    assert "*branched from root/a after its message 2*" in md
    sub = shell.ok("%subchat export root/a --format md")
    assert "(inherits 2 messages not in this export)" in sub


def test_a_trailing_comment_on_a_magic_line_is_ignored(shell, workdir):
    assert "three" not in shell.ok("%%subchat root --fanout 3   # three siblings\nhi")
    assert shell.ok("%%subchat root/units  # a subchat\nAnd a joule?").strip().endswith(
        ": And a joule?")
    assert current(shell) == "root/units"  # the comment is not part of the path
    assert [r[0] for r in store_rows(workdir / "subchats.db", "SELECT name FROM chats WHERE name LIKE '%#%'")] == []
    assert "  3" in shell.ok("%subchat tree --text   # the tree")
    assert "(" in shell.ok("%subchat show root/units -p   # the transcript, with provenance")
    # a # inside quotes or inside a word is text
    shell.ok('%subchat system root/units "C# and # signs"')
    assert "'C# and # signs'" in shell.ok("%subchat system root/units")
