"""A batch (``%%subchat --each``) in the live tree view: one line with its progress and
counts, not a line per row; what the view sends stays the same size as rows are added."""

from __future__ import annotations

import pytest

from subchat_magics.widget import TreeView

from .test_widget import labels, wait_until


@pytest.mark.parametrize("rows, flags", [(12, "--concurrency 4"), (6, "--compare echo,echo:b")])
def test_a_batch_is_one_line_with_its_counts_while_it_runs_and_after(shell, echo_session, comms,
                                                                      slow_echo, rows, flags):
    """A plain batch, and a comparison (its rows hold nothing; its models' subchats carry
    the batch mark naming the row): the view folds the batch chat, not each row, into one
    line, live and after."""
    shell.ok("%%subchat root\nhello")
    v = TreeView(echo_session.tree, session=echo_session)
    try:
        shell.ns["qs"] = [f"q{i}" for i in range(rows)]
        seen: list[list[str]] = []
        unsubscribe = echo_session.subscribe(
            lambda event, data: seen.append(labels(v)) if event == "reply-end" else None)
        try:
            shell.ok(f"%%subchat root --each qs {flags}\nsay {{item}}")
        finally:
            unsubscribe()
        v.refresh()
        done = f"└─ qs · [{rows}/{rows} done]"
        wait_until(lambda: labels(v)[-1] == done)
        assert labels(v) == ["root · 2 msgs · echo", done]
        # while it ran: never a line per row
        assert seen and max(len(ls) for ls in seen) == 2, seen
    finally:
        v.close()


def test_a_view_opened_on_a_finished_batch_folds_it_and_shows_a_selected_row(shell,
                                                                             echo_session, comms):
    shell.ns["xs"] = list(range(30))
    shell.ok("%%subchat root --each xs\nn {item}")
    v = TreeView(echo_session.tree, session=echo_session)
    try:
        assert labels(v) == ["root · 0 msgs", "└─ xs · [30/30 done]"]
        v.select("root/xs/7")
        assert labels(v) == ["root · 0 msgs", "└─ xs · [30/30 done]",
                             "   └─ 7 · 2 msgs · echo"]
        assert v.chats.value == "root/xs/7"
    finally:
        v.close()


def test_the_views_messages_do_not_grow_with_the_rows(shell, echo_session, comms):
    v = TreeView(echo_session.tree, session=echo_session)
    try:
        sizes = []
        for n in (20, 200):
            shell.ns["xs"] = list(range(n))
            mark = comms.mark()
            shell.ok("%%subchat root --each xs --fresh\nn {item}")
            v.refresh()
            want = f"{n}/{n} done"
            wait_until(lambda: any(want in label for label in labels(v)))  # noqa: B023
            sent = [s.size for s in comms.to(v.chats, mark, "_options_labels")]
            sizes.append(max(sent))
        # the tree's list holds one line a batch: 10x the rows is not 10x the bytes
        assert sizes[1] < sizes[0] * 1.5
    finally:
        v.close()


def test_compare_on_a_batch_row_shows_one_page_of_its_siblings(shell, echo_session, comms):
    # issue 20: compare on a row of 2,000 opened 4,005 widgets (~4 MB to the browser)
    shell.ns["xs"] = list(range(300))
    shell.ok("%%subchat root --each xs\nn {item}")
    v = TreeView(echo_session.tree, session=echo_session)
    try:
        v.select("root/xs/150")
        mark = comms.mark()
        v.compare.value = True
        grid = [w for w in v.transcript.children if "subchat-compare" in w._dom_classes][0]
        heads = [t.splitlines()[0] for t in
                 (c.outputs[0]["data"]["text/markdown"] for c in grid.children)]
        assert heads == [f"**root/xs/{i}** (2 messages)" for i in range(146, 154)]
        head = [w for w in v.transcript.children if "subchat-transcript-head" in w._dom_classes][0]
        assert "8 of 300 siblings" in head.value
        sent = comms.since(mark)
        assert sum(s.msg_type == "comm_open" for s in sent) < 40  # a page, not 300 columns
        assert sum(s.size for s in sent) < 100_000
        v.select("root/xs/0")  # the first row: the page starts there
        grid = [w for w in v.transcript.children if "subchat-compare" in w._dom_classes][0]
        assert len(grid.children) == 8
        assert grid.children[0].outputs[0]["data"]["text/markdown"].startswith("**root/xs/0**")
    finally:
        v.close()


def test_a_view_follows_a_vote_and_a_comparison_streaming_as_exchanges(shell, echo_session,
                                                                        comms, slow_echo):
    """A vote's samples and a comparison's models stream as exchanges (not a cell's turn):
    the view draws them as any reply instead of failing on what a turn has."""
    shell.ok("%%subchat root\nhello")
    v = TreeView(echo_session.tree, session=echo_session)
    try:
        shell.ok("%%subchat root/v --vote 2\nsay it")
        v.refresh()
        shell.ok("%%subchat root/c --compare echo,echo:b\nsay it")
        v.refresh()
        wait_until(lambda: any(label.endswith("b · 2 msgs · echo") for label in labels(v)))
    finally:
        v.close()
