"""%%subchat and %subchat through a real InteractiveShell on the echo backend."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from subchat_magics.testing import store_rows


def test_first_message_goes_to_root_and_echo_counts_messages(shell):
    out = shell.ok("%%subchat\nhello there")
    assert out.strip() == "echo (1 messages): hello there"


def test_continuing_a_chat_sends_its_history(shell):
    shell.ok("%%subchat root\none")
    out = shell.ok("%%subchat root\ntwo")
    assert out.strip() == "echo (3 messages): two"


def test_child_inherits_parent_context(shell):
    shell.ok("%%subchat root\nparent question")
    out = shell.ok("%%subchat root/physics\nchild question")
    # parent's user + assistant, then the new message
    assert out.strip() == "echo (3 messages): child question"
    out = shell.ok("%%subchat root/physics/units\ngrandchild")
    assert out.strip() == "echo (5 messages): grandchild"


def test_path_without_root_prefix_is_under_root(shell):
    shell.ok("%%subchat physics\nx")
    assert "physics" in shell.ok("%subchat tree --text")
    shell.ok("%%subchat root/physics\ny")
    tree = shell.ok("%subchat tree --text")
    assert tree.count("physics") == 1


def test_subchat_branches_at_the_parent_point(shell):
    shell.ok("%%subchat root\nfirst")
    shell.ok("%%subchat root/a\nbranch")
    shell.ok("%%subchat root\nparent goes on")
    # the branch does not see what the parent said after it branched off
    out = shell.ok("%%subchat root/a\nagain")
    assert out.strip() == "echo (5 messages): again"


def test_system_prompt_counts_and_overrides_for_descendants(shell):
    out = shell.ok('%%subchat root --system "You are terse."\nhi')
    assert out.strip() == "echo (2 messages): hi"
    shell.ok('%%subchat root/pirate --system "Talk like a pirate."\nahoy')
    shown = shell.ok("%subchat show root/pirate")
    assert "Talk like a pirate." in shown and "You are terse." not in shown
    shell.ok("%%subchat root/pirate/deeper\nmore")
    assert "Talk like a pirate." in shell.ok("%subchat show root/pirate/deeper")
    assert "You are terse." in shell.ok("%subchat show root")


def test_the_chat_used_becomes_current(shell):
    shell.ok("%%subchat root/a\nx")
    out = shell.ok("%%subchat\ny")  # no path: the current chat, root/a
    assert out.strip() == "echo (3 messages): y"
    assert "current:  root/a" in shell.ok("%subchat status")
    shell.ok("%subchat use root")
    assert "current:  root\n" in shell.ok("%subchat status")


def test_missing_parent_is_a_usage_error_saying_how_to_create_it(shell):
    msg = shell.fails("%%subchat root/nope/child\nhi")
    assert "root/nope" in msg and "%%subchat root/nope" in msg
    assert "nope" not in shell.ok("%subchat tree --text")


def test_var_stores_the_reply(shell):
    shell.ok("%%subchat --var answer\nkeep me")
    assert shell.ns["answer"] == "echo (1 messages): keep me"


def test_interpolates_names_and_leaves_code_braces_alone(shell):
    shell.ok("topic = 'gravity'")
    body = textwrap.dedent("""\
        Explain {topic} please. {undefined_name}
        def f(): return {"a": {"b": 1}}
        s = {1, 2}
        Use {{topic}} literally.""")
    shell.ok(f"%%subchat --var r\n{body}")
    expected_prompt = body.replace("{topic} please", "gravity please").replace("{{topic}}", "{topic}")
    assert shell.ns["r"] == f"echo (1 messages): {expected_prompt}"


def test_max_tokens_cuts_the_reply_and_marks_length(shell, workdir):
    shell.ok("%%subchat --max-tokens 2 --var r\none two three four")
    assert shell.ns["r"] == "echo (1 "
    rows = store_rows(workdir / "subchats.db",
                      "SELECT status, provenance FROM messages WHERE role='assistant'")
    assert json.loads(rows[0][1])["finish_reason"] == "length"


def test_bad_input_is_a_one_line_usage_error_and_leaves_the_tree_unchanged(shell, workdir):
    shell.ok("%%subchat root/keep\nbefore")
    before = store_rows(workdir / "subchats.db", "SELECT * FROM messages ORDER BY id")
    cases = {
        "%%subchat root/new\n   \n": "empty",
        "%%subchat root/new --max-tokens -5\nhi": "max tokens",
        "%%subchat root/new --max-tokens many\nhi": "max-tokens",
        "%%subchat root/new --temperature 7\nhi": "temperature",
        "%%subchat root/new --backend nosuch\nhi": "unknown backend",
        "%%subchat root/new --frobnicate\nhi": "unrecognized",
        "%%subchat root/x/y\nhi": "does not exist",
        "%%subchat 'root/bad name!'\nhi": "bad chat path",
        "%subchat frobnicate": "unknown subcommand",
        "%subchat show root/absent": "no chat",
        "%subchat use root/absent": "no chat",
        "%subchat delete root/absent": "no chat",
        "%subchat backend nosuch": "unknown backend",
        "%subchat export root --format xml": "invalid choice",
    }
    for cell, needle in cases.items():
        msg = shell.fails(cell)
        assert needle in msg, (cell, msg)
        assert "\n" not in msg.strip(), msg
        assert msg.startswith("%"), msg  # names the magic
    after = store_rows(workdir / "subchats.db", "SELECT * FROM messages ORDER BY id")
    assert after == before
    assert "new" not in shell.ok("%subchat tree --text")


def test_help_is_available(shell):
    doc = shell.ip.find_cell_magic("subchat").__doc__
    for flag in ("--fanout", "--children", "--temperatures", "--backend", "--var"):
        assert flag in doc, flag  # %%subchat? shows every flag
    out = shell.ok("%subchat help")
    for sub in ("tree", "show", "use", "status", "export", "delete"):
        assert sub in out


def test_delete_asks_for_force_when_the_chat_has_children(shell):
    shell.ok("%%subchat root/a\nx")
    shell.ok("%%subchat root/a/b\ny")
    msg = shell.fails("%subchat delete root/a")
    assert "--force" in msg
    shell.ok("%subchat delete root/a --force")
    tree = shell.ok("%subchat tree --text")
    assert "a " not in tree and "b " not in tree


def test_export_round_trip_into_a_fresh_store(shell, workdir):
    shell.ok('%%subchat root --system "sys"\nq1')
    shell.ok("%%subchat root/a\nq2")
    shell.ok("%%subchat root/a/b\nq3")
    shell.ok("%%subchat root/c\nq4")
    shell.ok(f"%subchat export root --format json --out {workdir / 'tree.json'}")
    shell.ok(f"%subchat export root --format md --out {workdir / 'tree.md'}")
    md = (workdir / "tree.md").read_text()
    assert "q3" in md and "root/a/b" in md
    original = json.loads((workdir / "tree.json").read_text())

    shell.ok(f"%config SubchatMagics.store_path = '{workdir / 'other.db'}'")
    shell.ok(f"%subchat import {workdir / 'tree.json'}")
    shell.ok(f"%subchat export root --format json --out {workdir / 'again.json'}")
    again = json.loads((workdir / "again.json").read_text())

    def strip(data):
        return [(c["path"], c["system_prompt"], c["fork_seq"],
                 [(m["role"], m["content"], m["status"], m["provenance"]) for m in c["messages"]])
                for c in data["chats"]]

    assert strip(again) == strip(original)
    # and the imported branch answers with the inherited context
    out = shell.ok("%%subchat root/a/b\nnext")
    assert out.strip() == "echo (8 messages): next"


def test_tree_survives_a_fresh_process(shell, workdir):
    shell.ok("%%subchat root/a\nremember me")
    code = textwrap.dedent("""
        from IPython.core.interactiveshell import InteractiveShell
        ip = InteractiveShell.instance()
        ip.run_cell('%load_ext subchat_magics')
        ip.run_cell('%subchat show root/a')
        ip.run_cell('%%subchat root/a\\nand now')
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True,
                         text=True, timeout=120, env={**__import__("os").environ,
                                                      "OLLAMA_HOST": "http://127.0.0.1:9"})
    assert "remember me" in out.stdout, out.stderr
    assert "echo (3 messages): and now" in out.stdout, out.stderr


def test_store_path_from_environment(shell, workdir, monkeypatch):
    monkeypatch.setenv("SUBCHAT_STORE", str(workdir / "elsewhere.db"))
    shell.ok("%%subchat\nhi")
    assert (workdir / "elsewhere.db").exists()
    assert not (workdir / "subchats.db").exists()
    assert str(workdir / "elsewhere.db") in shell.ok("%subchat status")


def test_a_file_that_is_not_a_store_is_named_and_never_overwritten(shell, workdir):
    bad = workdir / "subchats.db"
    bad.write_bytes(b"this is not sqlite at all\n" * 100)
    before = bad.read_bytes()
    msg = shell.fails("%%subchat\nhi")
    assert str(bad) in msg and "SUBCHAT_STORE" in msg
    assert bad.read_bytes() == before


def _make_read_only(path):
    """Read-only even for root: the immutable attribute where we can set it (CI runs as
    root, who ignores permission bits), else permission bits."""
    import os
    import subprocess

    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)
    mode = path.stat().st_mode
    os.chmod(path, 0o555 if path.is_dir() else 0o444)
    return lambda: os.chmod(path, mode)


def test_a_read_only_store_location_is_a_clear_error(shell, workdir):
    ro = workdir / "ro"
    ro.mkdir()
    undo = _make_read_only(ro)
    try:
        shell.ok(f"%config SubchatMagics.store_path = '{ro / 'x.db'}'")
        msg = shell.fails("%%subchat\nhi")
        assert "read-only" in msg and str(ro) in msg and "SUBCHAT_STORE" in msg
        assert not (ro / "x.db").exists()
    finally:
        undo()


def test_a_read_only_store_file_is_a_clear_error_and_kept(shell, workdir):
    shell.ok("%%subchat\nbefore")
    store = workdir / "subchats.db"
    shell.ok("%config SubchatMagics.store_path = 'other.db'")
    shell.ok("%subchat status")  # the session moves to other.db, closing the first store
    undo = _make_read_only(store)
    try:
        before = store.read_bytes()
        shell.ok(f"%config SubchatMagics.store_path = '{store}'")
        msg = shell.fails("%%subchat\nafter")
        assert "read-only" in msg and str(store) in msg
        assert store.read_bytes() == before
    finally:
        undo()


def test_config_sets_defaults(shell, caplog):
    shell.ok("%config SubchatMagics.max_tokens = 3")
    shell.ok("%%subchat --var r\na b c d e")
    assert shell.ns["r"] == "echo (1 messages): "
    result, _ = shell.run("%config SubchatMagics.temperature = 9.0")
    # traitlets rejects it and IPython's %config logs the error (it does not raise)
    assert result.success
    rejected = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("SubchatMagics.temperature" in m for m in rejected), rejected
    # the default stays
    assert "temperature=0.0" in shell.ok("%subchat status")


def test_fanout_creates_siblings_answering_the_same_message(shell):
    shell.ok("%%subchat root\nseed")
    shell.ok("%%subchat root --fanout 3 --var rs\nsame question")
    assert shell.ns["rs"] == ["echo (3 messages): same question"] * 3
    tree = shell.ok("%subchat tree --text")
    for name in ("1", "2", "3"):
        assert f"  {name}  (2 messages" in tree
    shell.ok("%%subchat root --children x,y\nnamed")
    assert "x  (2 messages" in shell.ok("%subchat tree --text")


@pytest.mark.parametrize("flags", ["--fanout 2", "--children x,y", "--fanout 2 --tools f --yes"])
def test_fanout_into_a_new_path_creates_it_like_each_vote_and_compare(shell, workdir, flags):
    """The trial: --fanout into a path that did not exist yet was refused, while --each,
    --vote and --compare create theirs."""
    shell.ok('def f(x: int) -> int:\n    """Doubles x."""\n    return 2 * x')
    shell.ok("%%subchat root -b echo\nseed")
    shell.ok(f"%%subchat root/new -b echo {flags}\nhi")
    tree = shell.ok("%subchat tree --text")
    kids = ["x", "y"] if "children" in flags else ["1", "2"]
    assert "  new  (0 messages)" in tree and all(f"    {k}  (" in tree for k in kids), tree
    assert "root/new" in shell.ok("%subchat status")  # the fan-out's parent is current
    # a parent that is missing too: one line, nothing stored
    before = store_rows(workdir / "subchats.db", "SELECT * FROM chats ORDER BY id")
    msg = shell.fails(f"%%subchat root/none/new -b echo {flags}\nhi")
    assert "root/none" in msg and "\n" not in msg
    assert store_rows(workdir / "subchats.db", "SELECT * FROM chats ORDER BY id") == before
    for bad in ("--children a/b,c", "--children 'a b'", "--fanout 0"):
        msg = shell.fails(f"%%subchat root/other -b echo {bad}\nhi")
        assert "\n" not in msg
        assert store_rows(workdir / "subchats.db", "SELECT * FROM chats ORDER BY id") == before


def test_unload_removes_the_magics(shell):
    shell.ok("%unload_ext subchat_magics")
    result, _ = shell.run("%subchat tree")
    assert not result.success
    shell.ok("%load_ext subchat_magics")
    shell.ok("%subchat tree --text")


def test_load_ext_imports_no_backend_sdk():
    code = ("import sys; from IPython.core.interactiveshell import InteractiveShell;"
            "ip = InteractiveShell.instance(); ip.run_cell('%load_ext subchat_magics');"
            "heavy = [m for m in ('vllm', 'torch', 'groq', 'ollama', 'openai', 'transformers',"
            " 'ipywidgets', 'httpx') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_changing_folder_keeps_the_same_tree(shell, workdir):
    shell.ok("%%subchat\nfirst")
    (workdir / "sub").mkdir()
    shell.ok(f"%cd {workdir / 'sub'}")
    out = shell.ok("%%subchat\nsecond")
    assert out.strip().endswith("echo (3 messages): second")
    assert not (workdir / "sub" / "subchats.db").exists()
