"""The view holds chats by identity: a rename (from the view, another view or the
``%subchat rename`` magic, of the selected chat or of an ancestor) keeps its selection
on the same chat, a delete moves it to the nearest surviving ancestor, and a reply keeps
streaming into a chat renamed meanwhile. All of it learnt from the core's events. Real
shell, session, tree and echo backend; the browser side recorded at the comm boundary."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import subchat_magics.widget as widget_package
from subchat_magics.session import open_tree
from subchat_magics.widget import TreeView

from .conftest import store_rows
from .test_widget import labels, markdowns, stream_text, wait_until

PACKAGE = Path(widget_package.__file__).parent


@pytest.fixture
def deep(shell, echo_session):
    """root → a → b → c, each with one exchange."""
    shell.ok("%%subchat root\nhello")
    shell.ok("%%subchat root/a\nin a")
    shell.ok("%%subchat root/a/b\nin b")
    shell.ok("%%subchat root/a/b/c\nin c")
    return echo_session


@pytest.fixture
def open_view(deep, comms):
    views = []

    def make(select: str | None = None) -> TreeView:
        v = TreeView(deep.tree, session=deep)
        views.append(v)
        if select:
            v.select(select)
        return v

    yield make
    for v in views:
        v.close()


def head(view: TreeView) -> str:
    return view.transcript_pane.head.value


def inherited_title(view: TreeView) -> str:
    acc = [w for w in view.transcript.children if "subchat-inherited" in w._dom_classes]
    return acc[0].titles[0]


def test_renaming_the_selected_chat_from_the_view_keeps_it_selected_and_current(
        shell, deep, open_view):
    v = open_view("root/a/b")
    chat_id = v.selected_id
    assert deep.current == "root/a/b"  # selecting made it the session's current chat
    v.rename_name.value = "renamed"
    v.rename_button.click()
    assert v.selected == "root/a/renamed" and v.selected_id == chat_id
    assert v.chats.value == "root/a/renamed"
    assert deep.current_chat().id == chat_id and deep.current == "root/a/renamed"
    assert "<b>root/a/renamed</b>" in head(v)
    assert "   └─ renamed · 2 msgs · echo" in labels(v)
    shell.ok("%%subchat\nnext")  # a cell without a path goes to the same chat
    v.sync()
    assert store_rows(deep.tree.path, "SELECT COUNT(*) FROM messages WHERE chat_id = ?",
                      (chat_id,)) == [(4,)]
    assert "   └─ renamed · 4 msgs · echo" in labels(v)


def test_renaming_an_ancestor_from_another_view_keeps_the_selection(deep, open_view):
    a = open_view("root/a/b/c")
    b = open_view("root/a")
    chat_id = a.selected_id
    b.rename("x")
    a.sync()
    assert a.selected == "root/x/b/c" and a.selected_id == chat_id
    assert b.selected == "root/x"
    assert a.chats.value == "root/x/b/c"
    assert "<b>root/x/b/c</b>" in head(a)
    assert inherited_title(a) == "inherited from root/x/b (6 messages)"


def test_renames_with_the_magic_keep_the_selection_on_the_same_chat(shell, deep, open_view):
    v = open_view("root/a/b")
    chat_id = v.selected_id
    shell.ok("%subchat rename root/a/b bee")  # the selected chat
    v.sync()
    assert v.selected == "root/a/bee" and v.selected_id == chat_id
    assert "<b>root/a/bee</b>" in head(v)
    shell.ok("%subchat rename root/a ay")  # its parent
    v.sync()
    assert v.selected == "root/ay/bee" and v.selected_id == chat_id
    assert v.chats.value == "root/ay/bee"
    assert inherited_title(v) == "inherited from root/ay (4 messages)"
    assert labels(v) == ["root · 2 msgs · echo", "└─ ay · 2 msgs · echo",
                         "   └─ bee · 2 msgs · echo", "      └─ c · 2 msgs · echo"]
    # and the user's next pick in the list is the chat under its new path
    v.chats.value = "root/ay"
    assert deep.current == "root/ay"


def test_deleting_the_selected_chat_moves_the_selection_to_its_parent(shell, deep, open_view):
    v = open_view("root/a/b/c")
    other = open_view("root/a/b/c")
    v.delete_button.click()
    v.delete_button.click()
    other.sync()
    assert v.selected == other.selected == "root/a/b"
    assert "<b>root/a/b</b>" in head(other)
    assert deep.current == "root/a/b"  # the session moved its current chat the same way
    shell.ok("%subchat delete root/a/b")  # from the magic, selected in both views
    v.sync()
    other.sync()
    assert v.selected == other.selected == "root/a"
    assert labels(v) == ["root · 2 msgs · echo", "└─ a · 2 msgs · echo"]


def test_deleting_an_ancestor_moves_the_selection_to_the_nearest_survivor(
        shell, deep, open_view):
    v = open_view("root/a/b/c")
    shell.ok("%subchat delete root/a/b --force")
    v.sync()
    assert v.selected == "root/a"
    v.select("root/a")
    v.branch("d")
    v.branch("e")  # root/a/d/e
    w = open_view("root/a/d/e")
    v.select("root/a")
    v.delete()  # the view deletes an ancestor of what the other view shows
    w.sync()
    assert v.selected == w.selected == "root"
    assert "<b>root</b>" in head(w)
    assert labels(w) == ["root · 2 msgs · echo"]


def test_a_reply_streaming_into_a_chat_renamed_meanwhile_lands_in_that_chat(
        shell, deep, open_view, slow_echo):
    v = open_view("root/a/b/c")
    chat_id = v.selected_id
    words = " ".join(f"w{i}" for i in range(60))
    turn = v.send(words)
    wait_until(lambda: "w3" in stream_text(v))
    shell.ok("%subchat rename root/a/b/c renamed")  # the chat itself
    shell.ok("%subchat rename root/a parent")  # and an ancestor
    v.sync()
    assert v.selected == "root/parent/b/renamed"
    assert set(v._streams) == {"root/parent/b/renamed"}
    assert v.stream in v.transcript.children  # still streaming, in the same chat
    before = stream_text(v)
    wait_until(lambda: len(stream_text(v)) > len(before) + 20)  # ...and still growing
    assert v.wait(10)
    assert turn.reply.status == "complete"
    # in the store: the reply is the renamed chat's, the same row that was streaming
    assert store_rows(deep.tree.path, "SELECT chat_id, status, content FROM messages "
                                      "WHERE id = ?", (turn.reply.id,)) == [
        (chat_id, "complete", turn.text)]
    assert store_rows(deep.tree.path, "SELECT name FROM chats WHERE id = ?", (chat_id,)) == [
        ("renamed",)]
    # in the view: the chat's transcript ends with it, the label counts it
    assert markdowns(v)[-1] == f"**assistant**\n\n{turn.text}"
    assert v.stream not in v.transcript.children
    assert labels(v)[-1] == "      └─ renamed · 4 msgs · echo"
    assert "root/parent/b/renamed: echo" in v.status.value


def test_a_view_of_a_bare_tree_changes_that_tree_through_a_session_of_its_own(
        workdir, comms):
    tree = open_tree(workdir / "bare.db")
    seen = []
    tree.subscribe(lambda event, data: seen.append((event, data.get("path"))))
    v = TreeView(tree)
    try:
        assert v.session.tree is tree
        v.branch("topic")
        v.rename("renamed")
        assert v.selected == "root/renamed" and v.session.current == "root/renamed"
        assert ("chat-created", "root/topic") in seen and ("chat-renamed", "root/renamed") in seen
        tree.create("root/renamed/by-hand")  # the holder's own change reaches the view
        v.sync()
        assert labels(v)[-1] == "   └─ by-hand · 0 msgs"
    finally:
        v.close()
    assert tree.get("root/renamed/by-hand")  # closing the view leaves the tree open
    tree.close()


def module_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_the_view_state_and_the_frame_scheduler_import_no_widgets():
    for name in ("state.py", "render_loop.py"):
        imports = module_imports(PACKAGE / name)
        assert not {i for i in imports if i.split(".")[0] in ("ipywidgets", "IPython")}, name
    for path in PACKAGE.glob("*.py"):
        assert not {i for i in module_imports(path) if "magic" in i}, path.name


def test_the_view_never_changes_the_tree_itself():
    """Every change goes through the session: no module of the view calls the tree's
    writing methods."""
    writes = re.compile(r"\btree\.(create|ensure|rename|delete|send|append|begin_turn|"
                        r"finish_reply|set_system_prompt)\(")
    for path in PACKAGE.glob("*.py"):
        assert not writes.findall(path.read_text()), path.name
