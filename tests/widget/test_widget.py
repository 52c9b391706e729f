"""The live tree view at the Python level: what its widgets hold, what it sends to the
browser (recorded at the comm boundary), and its buttons, with the real shell, session,
tree and echo backend."""

from __future__ import annotations

import html
import threading
import time

import pytest
from IPython.display import display
from IPython.utils.capture import capture_output

from subchat_magics import render
from subchat_magics.widget import CHUNK_HARD, LIVE_TEXT, TreeView, _chunk_html

from .conftest import ManualClock, store_rows

CHUNK_START = _chunk_html("")[:-7]  # the streaming chunks' HTML, less "</span>"


def labels(view: TreeView) -> list[str]:
    return [label.replace("\u00a0", " ") for label in view.chats._options_labels]


def markdowns(view: TreeView) -> list[str]:
    return [m.outputs[0]["data"]["text/markdown"] for m in view._msg_widgets]


def stream_text(view: TreeView) -> str:
    n = len(view.stream.children) - 1
    return "".join(c.value for c in view._chunks[:n])


def wait_until(cond, timeout: float = 10.0) -> None:
    """Wait for another thread to get somewhere (a wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


def view_threads() -> list[threading.Thread]:
    """The view's reply workers (its render thread comes and goes by itself)."""
    return [t for t in threading.enumerate()
            if t.name.startswith("subchat-view") and t.name != "subchat-view render"]


@pytest.fixture
def view(echo_session, comms):
    v = TreeView(echo_session.tree, session=echo_session)
    yield v
    v.close()


def test_view_lists_every_chat_with_count_and_backend(shell, echo_session, comms):
    shell.ok("%%subchat root\nhello")
    shell.ok("%%subchat root/physics\nwhat is a newton?")
    echo_session.tree.create("root/physics/units")
    shell.ok("%%subchat root/chem\nwhat is a mole?")
    v = TreeView(echo_session.tree, session=echo_session)
    try:
        assert labels(v) == [
            "root · 2 msgs · echo",
            "├─ physics · 2 msgs · echo",
            "│  └─ units · 0 msgs",
            "└─ chem · 2 msgs · echo",
        ]
        assert v.chats.value == "root/chem"  # the session's current chat
    finally:
        v.close()


def test_shown_it_leaves_the_tree_as_stable_text_and_html_before_the_live_view(
        shell, echo_session, comms):
    shell.ok("%%subchat root/a\nhi")
    views = [TreeView(echo_session.tree, session=echo_session) for _ in range(2)]
    try:
        shown = []
        for v in views:
            with capture_output() as cap:
                display(v)
            shown.append(cap.outputs)
        text = render.tree_text(echo_session.tree, "root/a")
        for (static, live), v in zip(shown, views):
            assert static.data == {"text/plain": text, "text/html":
                                   f"<pre class='subchat-tree-static'>{html.escape(text)}</pre>"}
            assert live.data["text/plain"] == LIVE_TEXT  # stable: no model id in it
            assert live.data["application/vnd.jupyter.widget-view+json"]["model_id"] == v.model_id
        assert "a  (2 messages, echo)" in text
        # asked for one bundle, the view gives the tree as its fallback
        assert views[0]._repr_mimebundle_()["text/plain"] == text
    finally:
        for v in views:
            v.close()


def test_send_streams_on_a_worker_thread_and_shows_the_stored_reply(view, slow_echo):
    words = " ".join(f"w{i}" for i in range(40))
    view.input.value = words
    view.send_button.click()
    # the click has returned while the reply streams on the view's worker thread
    assert [t.name for t in view_threads()] == ["subchat-view root"]
    # (the reply's row is stored at once, empty and marked interrupted until it ends)
    assert ("assistant", "complete") not in store_rows(view.tree.path,
                                                       "SELECT role, status FROM messages")
    assert view.input.value == ""
    assert view.wait(10)
    assert markdowns(view) == [f"**user**\n\n{words}",
                               f"**assistant**\n\necho (1 messages): {words}"]
    assert labels(view) == ["root · 2 msgs · echo"]
    assert store_rows(view.tree.path, "SELECT role, status FROM messages ORDER BY id") == [
        ("user", "complete"), ("assistant", "complete")]
    assert "echo" in view.status.value and "stop" in view.status.value
    assert view_threads() == []


def test_branch_creates_a_named_subchat_under_the_selected_one_and_sends_into_it(view):
    view.send("first question")
    view.wait(10)
    view.branch_name.value = "alt"
    view.input.value = "a different angle"
    view.branch_button.click()
    view.wait(10)
    assert view.selected == "root/alt"
    assert view.branch_name.value == "" and view.input.value == ""
    # the branch inherits root's two messages, so echo saw three
    assert markdowns(view)[-1] == "**assistant**\n\necho (3 messages): a different angle"
    assert labels(view) == ["root · 2 msgs · echo", "└─ alt · 2 msgs · echo"]
    inherited = [w for w in view.transcript.children if "subchat-inherited" in w._dom_classes]
    assert inherited and inherited[0].titles == ("inherited from root (2 messages)",)


def test_branch_without_a_name_takes_the_next_number_and_without_text_sends_nothing(view):
    assert view.branch() == "root/1"
    view.select("root")
    assert view.branch() == "root/2"
    assert view.tree.get("root/2").messages == []
    assert view_threads() == []


def test_stop_halts_a_long_reply_which_is_stored_interrupted(view, slow_echo):
    words = 200
    view.input.value = " ".join(f"w{i}" for i in range(words))
    view.send_button.click()
    wait_until(lambda: "w5" in stream_text(view))
    assert view.stop_button.disabled is False
    view.stop_button.click()
    assert view.wait(10)
    status, content = store_rows(
        view.tree.path, "SELECT status, content FROM messages WHERE role = 'assistant'")[0]
    assert status == "interrupted"
    assert len(content.split()) < words
    assert "[interrupted]" in markdowns(view)[-1]
    assert "interrupted" in view.status.value
    assert labels(view) == ["root · 2 msgs · echo [interrupted]"]
    assert view.stop_button.disabled is True


def test_a_reply_from_a_cell_streams_into_the_open_view(shell, echo_session, comms):
    clock = ManualClock()
    v = TreeView(echo_session.tree, session=echo_session, clock=clock, autodraw=False)
    try:
        turn = echo_session.send("root", " ".join(f"w{i}" for i in range(30)))
        seen = []
        for i, _ in enumerate(turn):  # as %%subchat does, on this (the main) thread
            if i % 3 == 2:
                clock.now += 1  # an update is due
            v.sync()  # what the render thread does every 1/20 s
            if i == 0:
                assert "● streaming" in labels(v)[0]
                assert v.stream in v.transcript.children
            seen.append(stream_text(v))
        v.sync()
        distinct = [t for i, t in enumerate(seen) if i == 0 or t != seen[i - 1]]
        assert len(distinct) >= 3  # several intermediate texts before the final one
        assert all(len(a) < len(b) for a, b in zip(distinct, distinct[1:]))
        assert v.stream not in v.transcript.children
        assert markdowns(v)[-1] == f"**assistant**\n\n{turn.text}"
        assert "streaming" not in labels(v)[0]
    finally:
        v.close()


def test_the_render_thread_draws_a_cell_s_reply_by_itself(shell, echo_session, comms,
                                                        slow_echo):
    v = TreeView(echo_session.tree, session=echo_session)
    try:
        turn = echo_session.send("root", " ".join(f"w{i}" for i in range(30)))
        seen = set()
        for _ in turn:
            seen.add(stream_text(v))  # no sync(): whatever the render thread drew
        wait_until(lambda: v.stream not in v.transcript.children)
        assert markdowns(v)[-1] == f"**assistant**\n\n{turn.text}"
        assert len({t for t in seen if t}) >= 3
    finally:
        v.close()
    assert not [t for t in threading.enumerate() if t.name == "subchat-view render"]


def test_follow_selects_the_chat_where_a_cell_starts_a_reply(shell, echo_session, comms):
    v = TreeView(echo_session.tree, session=echo_session)
    try:
        shell.ok("%%subchat root/elsewhere\nhello from a cell")
        v.sync()
        assert v.selected == "root/elsewhere"
        assert markdowns(v)[-1].endswith("hello from a cell")
        v.follow.value = False
        v.select("root")
        shell.ok("%%subchat root/other\nagain")
        v.sync()
        assert v.selected == "root"
        assert any(label.startswith("└─ other · 2 msgs") for label in labels(v))
    finally:
        v.close()


def stream_into(view: TreeView, session, text: str, max_tokens: int = 5000):
    """Stream a reply into the view's selected chat, the view drawing after every token
    (the most often its render thread could); returns the turn."""
    turn = session.send(view.selected, text, max_tokens=max_tokens)
    for _ in turn:
        view.sync()
    view.sync()
    return turn


def test_updates_are_coalesced_however_often_the_view_draws(shell, echo_session, comms):
    clock = ManualClock(step=0.01)  # each draw reads the clock: 10 ms between tokens
    v = TreeView(echo_session.tree, session=echo_session, clock=clock, autodraw=False)
    try:
        mark = comms.mark()
        turn = stream_into(v, echo_session, " ".join(f"w{i}" for i in range(300)))
        updates = [s for s in comms.since(mark)
                   if str(s.state.get("value", "")).startswith(CHUNK_START)]
        seconds = clock.now
        assert 2 <= len(updates) <= seconds / 0.05 + 2  # at most ~20 a second
        assert markdowns(v)[-1] == f"**assistant**\n\n{turn.text}"  # then the full text
    finally:
        v.close()


def test_a_streamed_reply_costs_the_same_messages_however_long(shell, echo_session, comms):
    clock = ManualClock()  # never moves: one update at the first draw, then the final one
    v = TreeView(echo_session.tree, session=echo_session, clock=clock, autodraw=False)
    try:
        counts = []
        for words in (5, 3000):
            mark = comms.mark()
            stream_into(v, echo_session, " ".join(["w"] * words))
            counts.append(len(comms.since(mark)))
        assert counts[1] <= counts[0] <= 12  # (the long one may find a chunk already right)
    finally:
        v.close()


def test_bytes_per_update_stay_flat_as_reply_and_transcript_grow(shell, echo_session, comms):
    tree = echo_session.tree
    for i in range(40):  # a long history in the chat being streamed into
        tree.append("root", "user" if i % 2 == 0 else "assistant", "x" * 2000)
    clock = ManualClock(step=0.06)  # every draw is due: the worst case for bytes
    v = TreeView(tree, session=echo_session, clock=clock, autodraw=False)
    try:
        reply_sizes = []
        for words in (500, 4000):
            mark = comms.mark()
            turn = stream_into(v, echo_session, " ".join(f"w{i:04d}" for i in range(words)))
            sizes = [s.size for s in comms.since(mark)
                     if str(s.state.get("value", "")).startswith(CHUNK_START)]
            assert len(sizes) >= words * 0.9
            reply_sizes.append((len(turn.text), max(sizes)))
        (short_len, short_max), (long_len, long_max) = reply_sizes
        assert long_len > 7 * short_len
        # a chunk is at most CHUNK_HARD plus a word: an update never carries the transcript
        assert long_max <= CHUNK_HARD + 300
        assert long_max < long_len / 5
        assert short_max < short_len + 300
    finally:
        v.close()


def test_several_views_of_one_tree_stay_consistent(echo_session, comms):
    a = TreeView(echo_session.tree, session=echo_session)
    b = TreeView(echo_session.tree, session=echo_session)
    try:
        a.send("hello")
        a.wait(10)
        a.branch("left", "go left")
        a.wait(10)
        b.sync()
        assert labels(a) == labels(b) == ["root · 2 msgs · echo", "└─ left · 2 msgs · echo"]
        assert b.selected == "root/left"  # b followed the reply a started
        assert markdowns(a) == markdowns(b)
        b.rename_name.value = "right"
        b.rename_button.click()
        a.sync()
        assert a.selected == b.selected == "root/right"
        assert labels(a) == labels(b) == ["root · 2 msgs · echo", "└─ right · 2 msgs · echo"]
        a.delete_button.click()
        a.delete_button.click()
        b.sync()
        assert labels(a) == labels(b) == ["root · 2 msgs · echo"]
        assert a.selected == b.selected == "root"
    finally:
        a.close()
        b.close()


def test_delete_asks_for_confirmation_and_removes_the_subtree(view):
    view.branch("a")
    view.branch("b")  # root/a/b
    view.select("root/a")
    view.delete_button.click()
    assert "root/a" in view.tree
    assert "Confirm" in view.delete_button.description
    assert "and its 1 subchat" in view.status.value
    view.send_button.click()  # any other action cancels the confirmation
    assert view.delete_button.description == "Delete"
    view.delete_button.click()
    view.delete_button.click()
    assert "root/a" not in view.tree and "root/a/b" not in view.tree
    assert view.selected == "root"
    assert "deleted root/a, root/a/b" in view.status.value


def test_mistakes_are_reported_in_the_status_line(view, slow_echo):
    view.send_button.click()
    assert "write a message first" in view.status.value
    view.rename_button.click()
    assert "write the new name first" in view.status.value
    view.input.value = "x " * 50
    view.send_button.click()
    wait_until(lambda: "root" in view._streams)
    view.input.value = "again"
    view.send_button.click()
    assert "still streaming" in view.status.value
    view.stop()
    view.wait(10)
    view.rename_name.value = "bad/name"
    view.branch("a")
    view.rename_button.click()
    assert "subchat-error" in view.status.value and "one path part" in view.status.value


def test_provenance_is_shown_on_demand(view):
    view.send("hello")
    view.wait(10)
    assert ">" not in markdowns(view)[-1]
    view.provenance.value = True
    assert "\n\n> echo · 1 in / 4 out tokens" in markdowns(view)[-1]


def test_compare_shows_the_last_exchange_of_each_sibling(shell, echo_session, comms):
    shell.ok("%%subchat root\nname a colour")
    shell.ok("%%subchat root --fanout 2\nand another?")
    v = TreeView(echo_session.tree, session=echo_session)
    try:
        v.select("root/1")
        v.compare.value = True
        grid = [w for w in v.transcript.children if "subchat-compare" in w._dom_classes][0]
        texts = [c.outputs[0]["data"]["text/markdown"] for c in grid.children]
        assert [t.splitlines()[0] for t in texts] == ["**root/1** (2 messages)",
                                                      "**root/2** (2 messages)"]
        assert all("echo (3 messages): and another?" in t for t in texts)
        v.compare.value = False
        assert markdowns(v)[-1] == "**assistant**\n\necho (3 messages): and another?"
    finally:
        v.close()


def test_close_stops_its_reply_unsubscribes_and_leaves_no_threads(echo_session, comms,
                                                                 slow_echo):
    v = TreeView(echo_session.tree, session=echo_session)
    v.send(" ".join(["word"] * 200))
    wait_until(lambda: "root" in v._streams)
    v.close()
    assert view_threads() == []
    assert store_rows(echo_session.tree.path,
                      "SELECT status FROM messages WHERE role = 'assistant'") == [("interrupted",)]
    mark = comms.mark()
    echo_session.send("root", "after the view is gone").run()
    assert comms.since(mark) == []
    assert v.comm is None


def test_a_tool_run_from_a_cell_shows_its_calls_and_results_in_the_open_view(
        shell, echo_session, comms):
    def lookup(region: str) -> int:
        """Units sold in a region."""
        return 12

    v = TreeView(echo_session.tree, session=echo_session, clock=ManualClock(), autodraw=False)
    try:
        run = echo_session.send("root", "How many?", tools=[lookup], approve=True)
        for _ in run:
            v.sync()
        v.sync()
        shown = markdowns(v)
        assert shown[0] == "**user**\n\nHow many?"
        assert shown[1] == "**assistant**\n\n- calls `lookup(region='')`"
        assert shown[2].startswith("**tool** `lookup`\n\n<details><summary>result</summary>")
        assert "\n12\n" in shown[2]
        assert shown[3].startswith("**assistant**\n\necho (3 messages): How many?")
    finally:
        v.close()
