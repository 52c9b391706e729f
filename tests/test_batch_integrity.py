"""A batch is a dataset (issue 20): a row is its whole request, nothing of a batch is ever
deleted, rows continued by hand are never touched, missing and odd data are said out loud.
Through a real IPython shell on the echo backend; the store read back with sqlite3."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from subchat_magics.session import default_session
from subchat_magics.testing import store_rows

CHATS = "SELECT id, parent_id, name FROM chats ORDER BY id"
MESSAGES = "SELECT id, chat_id, seq, role, content, status FROM messages ORDER BY id"


def snapshot(workdir):
    return (store_rows(workdir / "subchats.db", CHATS),
            store_rows(workdir / "subchats.db", MESSAGES))


def contents(workdir) -> list[str]:
    return [r[0] for r in store_rows(workdir / "subchats.db", "SELECT content FROM messages")]


def test_a_rerun_with_a_constraint_never_deletes_rows_continued_by_hand(shell, workdir):
    shell.ns["qs"] = ["alpha", "beta"]
    shell.ok("%%subchat root/work --backend echo\nThe task.")
    shell.ok("%%subchat root/work --each qs --backend echo\nsay {item}")
    shell.ok("%%subchat root/work/qs/0 --backend echo\na follow-up typed by hand")
    shell.ok("%%subchat root/work/qs/0/deeper --backend echo\ndeeper still")
    before = snapshot(workdir)
    msg = shell.fails("%%subchat root/work --each qs --choice good,bad --backend echo\nsay {item}")
    # the changed constraint is named, with how many rows, and nothing was written
    assert "the constraint (--json/--choice/--regex) for 1 of 2 row(s)" in msg
    assert "--redo" in msg and "--fresh" in msg and "\n" not in msg
    assert snapshot(workdir) == before
    # --redo resends the untouched row only; the hand-continued one stays exactly as it was
    out = shell.ok("%%subchat root/work --each qs --choice good,bad --redo --as labels "
                   "--backend echo\nsay {item}")
    assert "continued by hand" in out
    tree = default_session().tree
    assert "root/work/qs/0/deeper" in tree
    assert [m.content for m in tree.get("root/work/qs/0").messages][2] == "a follow-up typed by hand"
    assert set(before[1]) <= set(snapshot(workdir)[1])  # every message that was there still is
    assert shell.ns["labels"] == [None, "good"]


def test_a_changed_system_prompt_or_options_is_refused_and_redo_keeps_the_old_replies(
        shell, workdir):
    shell.ns["qs"] = ["a", "b"]
    shell.ok("%%subchat root --each qs -s 'Answer in French.' --backend echo\nsay {item}")
    before = snapshot(workdir)
    msg = shell.fails("%%subchat root --each qs -s 'Answer in German.' -t 0.9 -n 5 "
                      "--backend echo\nsay {item}")
    assert "the system prompt in force for 2 of 2 row(s)" in msg
    assert "the generation options" in msg
    assert snapshot(workdir) == before  # not even the batch chat's prompt changed
    assert default_session().tree.get("root/qs").system_prompt == "Answer in French."
    msg = shell.fails("%%subchat root --each qs -m other-model --backend echo\nsay {item}")
    assert "the model for 2 of 2 row(s)" in msg and "-> other-model" in msg
    out = shell.ok("%%subchat root --each qs -s 'Answer in German.' --redo --backend echo\n"
                   "say {item}")
    assert "2 items, 2 done, 0 failed" in out and "--redo: 2 row(s) resent" in out
    tree = default_session().tree
    row = tree.get("root/qs/0")
    old = row.messages[1]
    assert old.status == "complete" and old.content == "echo (2 messages): say a"
    new = tree.get("root/qs/0/attempt-2").messages
    assert new[0].content == "say a" and new[1].provenance["batch"]["attempt"] == 2
    # the context of the new attempt is the row's (not the old attempt's): 2 messages
    assert new[1].content == "echo (2 messages): say a"
    # the row's own chat says where its newest answer is
    shown = shell.ok("%subchat show root/qs/0")
    assert shown.rstrip().endswith("--- sent again: the latest attempt is root/qs/0/attempt-2 "
                                   "(complete) ---")
    assert "sent again" not in shell.ok("%subchat show root/qs/0/attempt-2")
    # a rerun under the German prompt now reuses the new attempts
    out = shell.ok("%%subchat root --each qs --as a --backend echo\nsay {item}")
    assert "2 done (2 reused)" in out and shell.ns["a"] == ["echo (2 messages): say a",
                                                            "echo (2 messages): say b"]
    assert "[2/2 done]" in shell.ok("%subchat tree --text")


def test_a_resume_on_another_backend_is_refused(shell, workdir, monkeypatch):
    from subchat_magics.testing.fakeservers import FakeOpenAI

    shell.ns["qs"] = ["a", "b", "c"]
    shell.ok("%%subchat root --each qs --limit 2 --backend echo\nsay {item}")
    with FakeOpenAI() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-000000000000")
        monkeypatch.setenv("OPENAI_MODEL", "m")
        before = snapshot(workdir)
        msg = shell.fails("%%subchat root --each qs --backend openai\nsay {item}")
        assert "the backend for 2 of 2 row(s) (echo -> openai)" in msg
        assert snapshot(workdir) == before and server.chat_requests() == []


def test_missing_values_and_empty_rows_are_skipped_and_said(shell, workdir):
    shell.ns["df"] = pd.DataFrame({"text": ["ok", None, "fine", "  ", "x"],
                                   "n": [1.0, 2.0, math.nan, 4.0, 5.0],
                                   "when": [pd.Timestamp(0)] * 4 + [pd.NaT]})
    out = shell.ok("%%subchat root --each df --as out --backend echo\n{text} / {n}")
    # ("x" lacks only `when`, which the template does not use: it is sent)
    assert "5 items, 3 done, 0 failed, 2 skipped" in out
    assert "2 row(s) skipped, not sent: missing: text (1), missing: n (1)" in out
    assert list(shell.ns["out"]) == ["echo (1 messages): ok / 1.0", None, None,
                                     "echo (1 messages):    / 4.0", "echo (1 messages): x / 5.0"]
    assert "nan" not in " ".join(contents(workdir)) and "None" not in " ".join(contents(workdir))
    shell.ns["qs"] = [None, "b", float("nan"), pd.NA]
    out = shell.ok("%%subchat root --each qs --as o2 --backend echo\nsay {item}")
    assert "4 items, 1 done, 0 failed, 3 skipped" in out and "missing: item (3)" in out
    assert shell.ns["o2"] == [None, "echo (1 messages): say b", None, None]


def test_the_empty_row_of_a_list_is_skipped_not_a_refusal(shell, workdir):
    shell.ns["qs"] = ["a", "", "c"]
    out = shell.ok("%%subchat root --each qs --as o --backend echo\n{item}")
    assert "3 items, 2 done, 0 failed, 1 skipped" in out and "empty message (1)" in out
    assert shell.ns["o"][1] is None


@pytest.mark.parametrize("setup, line, body, expected", [
    ("import pandas as pd; d = pd.DataFrame([[1, 2]], columns=['a', 'a'])", "--each d", "{a}",
     "more than one column named 'a'; rename them first"),
    ("s = {'b', 'a'}", "--each s", "{item}", "give sorted(s)"),
    ("q = ['x']", "--each q", "Translate {itme} please",
     "the template names {itme}, which is not {item}, {index}, a field"),
    ("q = ['x']", "--each q --as q", "{item}", "--as q would overwrite the items of --each q"),
    ("q = ['x']", "--each q --fresh --redo", "{item}", "give one of them"),
])
def test_odd_data_is_refused_with_the_fix_and_nothing_written(shell, workdir, setup, line, body,
                                                              expected):
    shell.ok("%%subchat root --backend echo\nhello")
    shell.ok(setup)
    before = snapshot(workdir)
    msg = shell.fails(f"%%subchat root {line} --backend echo\n{body}")
    assert expected in msg and "\n" not in msg
    assert snapshot(workdir) == before


def test_a_message_into_the_batch_chat_is_refused_with_the_way_on(shell, workdir):
    shell.ns["qs"] = ["a", "b"]
    shell.ok("%%subchat root --each qs --backend echo\nsay {item}")
    before = snapshot(workdir)
    msg = shell.fails("%%subchat root/qs --backend echo\nhello batch")
    assert "root/qs is a batch chat" in msg and "%%subchat root continues the parent" in msg
    assert snapshot(workdir) == before
    msg = shell.fails("%%subchat root/qs --fanout 2 --backend echo\nhello batch")
    assert "is a batch chat" in msg and snapshot(workdir) == before
    # a row itself can be continued
    shell.ok("%%subchat root/qs/0 --backend echo\nmore")


def test_cut_rows_are_resent_as_a_new_attempt_and_the_cut_one_is_kept(shell, workdir):
    from subchat_magics import open_tree

    tree = open_tree(workdir / "subchats.db")
    session = default_session().on_tree(tree)
    batch = session.batch("root", list(range(40)), lambda x, i: f"n {x}", name="n",
                          backend="echo", concurrency=2)

    def progress(p):
        if p.ended >= 3 and not p.finished:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        batch.run(progress, every=0)
    cut = [r.name for r in batch.result().rows if r.status == "interrupted"]
    assert cut
    before = store_rows(workdir / "subchats.db", MESSAGES)
    again = session.batch("root", list(range(40)), lambda x, i: f"n {x}", name="n",
                          backend="echo").run()
    assert again.stats.done == 40
    after = store_rows(workdir / "subchats.db", MESSAGES)
    assert set(before) <= set(after)  # the cut attempts are still there, word for word
    for name in cut:
        assert tree.get(f"root/n/{name}/attempt-2").messages[1].status == "complete"


def test_a_relative_reference_in_the_template_is_pinned_so_a_rerun_resumes(shell, workdir):
    shell.ns["qs"] = ["a", "b", "c"]
    ip = shell.ip
    ip.run_cell("def f(x):\n    return x + 1", store_history=True)
    r = ip.run_cell("%%subchat root --each qs --limit 2 --backend echo\nGiven {In[-1]}, answer "
                    "{item}", store_history=True)
    assert r.error_in_exec is None
    ip.run_cell("y = 2", store_history=True)  # {In[-1]} now names another cell
    r = ip.run_cell("%%subchat root --each qs --as out --backend echo\nGiven {In[-1]}, answer "
                    "{item}", store_history=True)
    assert r.error_in_exec is None, r.error_in_exec
    assert all("def f(x)" in v for v in ip.user_ns["out"])


def test_a_cut_value_is_counted_and_named(shell, workdir):
    shell.ok("%config SubchatMagics.max_value_chars = 50")
    shell.ns["docs"] = ["short", "x" * 200, "y" * 300]
    out = shell.ok("%%subchat root --each docs --backend echo\nRead {item}")
    assert "2 row(s) had a value cut at max_value_chars" in out
    prov = default_session().tree.get("root/docs/1").messages[1].provenance
    assert prov["batch"]["cut_value"] is True


def test_limit_reads_only_the_first_k_items(tmp_path):
    from subchat_magics.batch import items_of

    seen = []

    class Counting:
        def __len__(self):
            return 10**6

        def __iter__(self):
            for i in range(10**6):
                seen.append(i)
                yield i

    assert [e.item for e in items_of(Counting(), "c", limit=3).entries] == [0, 1, 2]
    assert len(seen) == 3
    df = pd.DataFrame({"a": range(200_000)})
    assert len(items_of(df, "df", limit=3).entries) == 3


def test_show_of_a_batch_chat_prints_its_summary(shell, workdir):
    shell.ns["qs"] = ["a", "b", "c"]
    shell.ok("%%subchat root --each qs --choice yes,no --backend echo\nsay {item}")
    out = shell.ok("%subchat show root/qs")
    assert "batch" in out and "3/3 done" in out and "--choice" in out


def test_the_progress_line_says_estimating_until_rows_have_finished():
    from subchat_magics.batch import Progress
    from subchat_magics.batch_view import progress_line

    p = Progress(total=1000, sent=1000, elapsed_s=0.05)
    assert progress_line("root/qs", p).endswith("estimating")
    p.done, p.elapsed_s = 100, 2.0  # 100 rows in 2 s: 900 left at that rate is 18 s
    assert progress_line("root/qs", p).endswith("0:18 left")
    p.paused = 30.0  # a rate limit: the line says the batch waits, not an estimate
    assert progress_line("root/qs", p).endswith("paused: rate-limited, resuming in 0:30")


def test_show_p_of_a_failed_row_names_the_reason(shell, workdir, monkeypatch):
    from subchat_magics.testing.fakeservers import FakeOpenAI

    shell.ns["qs"] = ["a"]
    with FakeOpenAI() as server:
        server.configure(status=400, message="model crashed")
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-000000000000")
        monkeypatch.setenv("OPENAI_MODEL", "other-model")
        out = shell.ok("%%subchat root --each qs --backend openai\nsay {item}")
    assert "1 failed" in out
    out = shell.ok("%subchat show root/qs/0 -p")
    assert "error: " in out and "model crashed" in out and "batch row 0 of 1" in out


@pytest.mark.parametrize("setup, flag, expected", [
    ("labels = ['a', 'b']", "--choice lables", "no variable 'lables' in the notebook"),
    ("d = {'a': 1, 'b': 2}", "--choice d", "'d' is a dict, not a list or tuple of choices"),
    ("n = 3", "--choice n", "'n' is a int, not a list or tuple"),
    ("", "--choice yes", "no variable 'yes'"),
    ("one = ['x']", "--choice one", "one value is no choice"),
    ("", "--choice x,x", "--choice lists a choice twice"),
])
def test_a_choice_that_is_not_a_list_or_has_one_value_is_refused(shell, workdir, setup, flag,
                                                                  expected):
    shell.ok("%%subchat root --backend echo\nhello")
    if setup:
        shell.ok(setup)
    shell.ns["qs"] = ["a"]
    before = snapshot(workdir)
    for cell in (f"%%subchat root {flag} --backend echo\nsay",
                 f"%%subchat root --each qs {flag} --backend echo\nsay {{item}}"):
        msg = shell.fails(cell)
        assert expected in msg and "\n" not in msg
    assert snapshot(workdir) == before


def test_json_with_raw_control_characters_inside_strings_parses_as_the_grammar_allows():
    from subchat_magics import structured

    c = structured.from_options(json="", namespace={})
    assert c.parse('{"label": "a\tb\x06c"}') == {"label": "a\tb\x06c"}
    with pytest.raises(structured.InvalidOutput):
        c.parse('{"label": "a"')  # (still JSON: an unclosed object is refused)
