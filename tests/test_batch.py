"""Batches over data (``%%subchat --each``) through a real IPython shell on the echo
backend: the items, the template, the stored tree, the results, reruns, Ctrl-C, bad input."""

from __future__ import annotations

import _thread
import subprocess
import sys
import threading

import pandas as pd
import pytest

from subchat_magics.session import default_session
from subchat_magics.testing import store_rows

CHATS = "SELECT id, parent_id, name FROM chats ORDER BY id"
MESSAGES = "SELECT id, chat_id, seq, role, content, status FROM messages ORDER BY id"


def rows_of(workdir, batch_path: str) -> dict[str, list[tuple]]:
    """``{row name: [(role, content, status), ...]}`` of a batch chat's rows, read with sqlite3."""
    tree = default_session().tree
    chat = tree.get(batch_path)
    out = {}
    for kid in tree.children(chat):
        out[kid.name] = store_rows(workdir / "subchats.db",
                                   "SELECT role, content, status FROM messages WHERE chat_id = ? "
                                   "ORDER BY seq", (kid.id,))
    return out


def test_a_list_sends_one_message_per_item_into_its_own_chat(shell, workdir):
    shell.ok("%%subchat root --backend echo\nYou answer in one word.")
    shell.ns["qs"] = ["a newton", "a joule", "a watt"]
    out = shell.ok("%%subchat root --each qs --as answers --backend echo\nDefine {item} (#{index})")
    assert out.splitlines()[-1].startswith("batch root/qs: 3 items, 3 done, 0 failed · tokens ")
    assert "tokens/s" in out and "echo (" not in out  # one summary line, no output per item
    # each row inherits root's exchange: 3 messages reach the backend
    assert shell.ns["answers"] == [f"echo (3 messages): Define {q} (#{i})"
                                   for i, q in enumerate(["a newton", "a joule", "a watt"])]
    rows = rows_of(workdir, "root/qs")
    assert list(rows) == ["0", "1", "2"]
    assert rows["1"] == [("user", "Define a joule (#1)", "complete"),
                         ("assistant", "echo (3 messages): Define a joule (#1)", "complete")]
    # the batch chat itself holds no messages, and the current chat stays root
    tree = default_session().tree
    assert tree.get("root/qs").messages == [] and default_session().current == "root"
    mark = tree.get("root/qs/2").messages[-1].provenance["batch"]
    assert {k: mark[k] for k in ("of", "item")} == {"of": 3, "item": "2"}
    assert mark["digest"] and mark["request"]["backend"] == "echo"  # the row's whole request


def test_dicts_named_tuples_and_namespace_names_fill_the_template(shell, workdir):
    from collections import namedtuple

    Pt = namedtuple("Pt", "x y")
    shell.ns["people"] = [{"name": "Ada", "age": 36}, {"name": "Alan", "age": 41}]
    shell.ns["pts"] = [Pt(1, 2), Pt(3, 4)]
    shell.ns["style"] = "briefly"
    shell.ok("%%subchat root --each people --as a --backend echo\n"
             "Describe {name} ({age}) {style}; raw {{name}} and {item} and {x y} {In[}")
    assert shell.ns["a"][0] == ("echo (1 messages): Describe Ada (36) briefly; raw {name} and "
                                "{'name': 'Ada', 'age': 36} and {x y} {In[}")
    shell.ok("%%subchat root --each pts --as b --backend echo\n{x}+{y} at {index}")
    assert shell.ns["b"] == ["echo (1 messages): 1+2 at 0", "echo (1 messages): 3+4 at 1"]


def test_a_series_keeps_its_index_labels(shell, workdir):
    shell.ns["s"] = pd.Series(["red", "green"], index=["first", "second"], name="colour")
    shell.ok("%%subchat root --each s --as out --backend echo\n{index}: {item}")
    out = shell.ns["out"]
    assert isinstance(out, pd.Series) and list(out.index) == ["first", "second"]
    assert list(out) == ["echo (1 messages): first: red", "echo (1 messages): second: green"]
    assert list(rows_of(workdir, "root/s")) == ["first", "second"]


def test_a_dataframe_gives_its_columns_as_fields_and_a_new_column_back(shell, workdir):
    df = pd.DataFrame({"question": ["Why?", "How?", "What?"], "level": [1, 2, 3]},
                      index=[10, 20, 30])
    shell.ns["df"] = df
    out = shell.ok("%%subchat root --each df --as answers --backend echo\n"
                   "Q{index} (level {level}): {question}")
    assert "3 items, 3 done" in out
    shell.ok("df['answer'] = answers")
    assert list(shell.ns["df"]["answer"]) == [
        "echo (1 messages): Q10 (level 1): Why?", "echo (1 messages): Q20 (level 2): How?",
        "echo (1 messages): Q30 (level 3): What?"]
    assert list(rows_of(workdir, "root/df")) == ["10", "20", "30"]
    assert "pandas" in sys.modules  # (the test imported it; the package never does)


def test_the_text_tree_folds_a_batch_into_one_line(shell, workdir):
    shell.ns["xs"] = list(range(25))
    shell.ok("%%subchat root --each xs --backend echo\nitem {item}")
    text = shell.ok("%subchat tree --text")
    assert "    xs  [25/25 done]" in text.splitlines()
    assert len(text.splitlines()) == 2  # root and the folded batch, not 25 rows
    shell.ok("%subchat use root/xs/7")  # a row on the current path shows, the rest stay folded
    assert shell.ok("%subchat tree --text").splitlines() == [
        "  root  (0 messages)", "    xs  [25/25 done]", "*     7  (2 messages, echo)"]


def test_a_rerun_sends_nothing_new_and_reuses_the_rows(shell, workdir):
    shell.ns["qs"] = ["a", "b", "c", "d"]
    shell.ok("%%subchat root --each qs --as first --backend echo\nsay {item}")
    before = store_rows(workdir / "subchats.db", MESSAGES), store_rows(workdir / "subchats.db", CHATS)
    out = shell.ok("%%subchat root --each qs --as again --backend echo\nsay {item}")
    assert "4 items, 4 done (4 reused), 0 failed · tokens 0 in / 0 out" in out
    assert (store_rows(workdir / "subchats.db", MESSAGES),
            store_rows(workdir / "subchats.db", CHATS)) == before
    assert shell.ns["again"] == shell.ns["first"]


def test_limit_then_the_full_run_sends_only_the_rest_and_fresh_starts_anew(shell, workdir):
    shell.ns["qs"] = [f"q{i}" for i in range(6)]
    out = shell.ok("%%subchat root --each qs --limit 2 --as a --backend echo\nsay {item}")
    assert "2 items, 2 done" in out and len(shell.ns["a"]) == 2
    out = shell.ok("%%subchat root --each qs --as a --backend echo\nsay {item}")
    assert "6 items, 6 done (2 reused)" in out
    out = shell.ok("%%subchat root --each qs --fresh --as b --backend echo\nsay {item}")
    assert "batch root/qs-2: 6 items, 6 done, 0 failed" in out
    assert len(rows_of(workdir, "root/qs-2")) == 6


def test_a_changed_template_is_refused_before_anything_is_sent(shell, workdir):
    shell.ns["qs"] = ["a", "b"]
    shell.ok("%%subchat root --each qs --backend echo\nsay {item}")
    before = store_rows(workdir / "subchats.db", MESSAGES)
    msg = shell.fails("%%subchat root --each qs --backend echo\nshout {item}")
    assert "root/qs/0 holds another message" in msg and "--fresh" in msg
    assert store_rows(workdir / "subchats.db", MESSAGES) == before


def test_ctrl_c_mid_batch_keeps_what_completed_and_a_rerun_sends_only_the_rest(
        shell, workdir, monkeypatch):
    monkeypatch.setenv("SUBCHAT_ECHO_DELAY", "0.01")  # ~0.1 s a row, 4 in flight
    shell.ns["qs"] = [f"q{i}" for i in range(30)]
    ended = []
    never = threading.Event()

    def listener(event, data):
        # Ctrl-C (the SIGINT Jupyter sends) once the fifth row is stored
        if event == "reply-end" and data["message"].status == "complete":
            ended.append(data["path"])
            if len(ended) == 5:
                _thread.interrupt_main()
                never.wait(30)  # ends when the KeyboardInterrupt is raised here

    unsubscribe = default_session().tree.subscribe(listener)
    try:
        result, cap = shell.run("%%subchat root --each qs --as out --backend echo\nsay {item}")
    finally:
        unsubscribe()
    # Ctrl-C ends in the summary line and one note (a UsageError: no traceback, and a
    # queue of cells stops there)
    from IPython.core.error import UsageError

    assert isinstance(result.error_in_exec, UsageError)
    assert "interrupted: 25 row(s) not done; run the cell again" in str(result.error_in_exec)
    assert "batch root/qs: 30 items, 5 done, 0 failed, 3 interrupted" in cap.stdout
    out = shell.ns["out"]
    done = [i for i, v in enumerate(out) if v is not None]
    assert len(done) == 5 and all(out[i] == f"echo (1 messages): say q{i}" for i in done)
    statuses = store_rows(workdir / "subchats.db",
                          "SELECT m.status, COUNT(*) FROM messages m WHERE role = 'assistant' "
                          "GROUP BY m.status")
    # the fifth was one of 4 in flight: the other 3 are cut, the rest never sent
    assert dict(statuses) == {"complete": 5, "interrupted": 3}
    kept = store_rows(workdir / "subchats.db", "SELECT id, content FROM messages WHERE status = "
                      "'complete' AND role = 'assistant' ORDER BY id")
    monkeypatch.setenv("SUBCHAT_ECHO_DELAY", "0")
    out = shell.ok("%%subchat root --each qs --as out --backend echo\nsay {item}")
    assert "30 items, 30 done (5 reused), 0 failed" in out
    assert shell.ns["out"] == [f"echo (1 messages): say q{i}" for i in range(30)]
    again = store_rows(workdir / "subchats.db", "SELECT id, content FROM messages WHERE status = "
                       "'complete' AND role = 'assistant' ORDER BY id")
    assert again[:5] == kept  # the five done before are the same rows, not sent again
    rows = rows_of(workdir, "root/qs")
    assert len(rows) == 30 and all(len(r) == 2 for r in rows.values())  # cut rows made anew


def test_a_keyboard_interrupt_from_the_progress_callback_stops_the_python_api(tmp_path):
    from subchat_magics import open_tree

    tree = open_tree(tmp_path / "t.db")
    calls = []

    def progress(p):
        calls.append(p.ended)
        if p.ended >= 3 and not p.finished:
            raise KeyboardInterrupt

    session = default_session().on_tree(tree)
    batch = session.batch("root", list(range(200)), lambda x, i: f"n {x}", name="n",
                          backend="echo", concurrency=2)
    with pytest.raises(KeyboardInterrupt):
        batch.run(progress, every=0)
    r = batch.result()
    assert r.interrupted and 3 <= r.stats.done < 200
    assert r.results[:3] == ["echo (1 messages): n 0", "echo (1 messages): n 1",
                             "echo (1 messages): n 2"]
    cut = sum(1 for row in r.rows if row.status == "interrupted")
    assert 1 <= cut <= 2  # those in flight (2 at most); the rest never sent
    assert sum(1 for row in r.rows if row.status == "pending") == 200 - r.stats.done - cut


def test_the_python_api_runs_in_a_script_without_ipython(tmp_path):
    code = (
        "import sys\n"
        "from subchat_magics import open_tree\n"
        "tree = open_tree(sys.argv[1])\n"
        "r = tree.batch('root', ['x', 'y'], lambda item, i: f'{i}:{item}', name='xs',"
        " backend='echo')\n"
        "print(r.results, r.stats.done, r.summary().split(' · ')[0])\n"
        "print('IPython' in sys.modules, 'pandas' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s.db")], check=True,
                         capture_output=True, text=True).stdout.splitlines()
    assert out[0] == ("['echo (1 messages): 0:x', 'echo (1 messages): 1:y'] 2 "
                      "batch root/xs: 2 items, 2 done, 0 failed")
    assert out[1] == "False False"


@pytest.mark.parametrize("setup, line, body, expected", [
    ("", "--each nothing", "x {item}", "no variable 'nothing' in the notebook"),
    ("n = 5", "--each n", "x {item}", "is not iterable (int)"),
    ("e = []", "--each e", "x {item}", "e is empty: there is nothing to send"),
    ("g = (i for i in range(3))", "--each g", "x {item}", "an iterator without a length"),
    ("t = 'abc'", "--each t", "x {item}", "one text, not a list of items"),
    ("q = [1, 2]", "--each q --as for", "x {item}", "--as needs a Python name that is not a keyword"),
    ("q = [1, 2]", "--each q --as 2x", "x {item}", "not '2x'"),
    ("d = [{'a': 1}, {'b': 2}]", "--each d", "x {a}",
     "the template names {a}, but item 1 (position 1) has no field 'a' (its fields: b)"),
    ("d = [{'a': 1}]", "--each d", "x {aa}", "item 0 (position 0) has no field 'aa'"),
    ("q = [1, 2]", "--each q --fanout 2", "x", "--each does not go with --fanout"),
    ("q = [1, 2]", "--each q --children a,b", "x", "--each does not go with --children"),
    ("q = [1, 2]", "--each q --concurrency 0", "x", "--concurrency takes a number of requests >= 1"),
    ("q = [1, 2]", "--each q --limit 0", "x", "--limit takes a number of items >= 1"),
    ("q = [1, 2]", "--as out", "x", "go with --each NAME"),
    ("q = [1, 2]", "--each q --var v", "x", "--each does not go with --var"),
    ("q = [1, 2]", "--each q", "   ", "the message is empty"),
    ("q = [1, 2]", "root/missing/deeper --each q", "x", "'root/missing'"),
])
def test_bad_input_is_one_line_and_leaves_the_tree_as_it_was(shell, workdir, setup, line,
                                                              body, expected):
    shell.ok("%%subchat root --backend echo\nhello")
    if setup:
        shell.ok(setup)
    before = (store_rows(workdir / "subchats.db", CHATS),
              store_rows(workdir / "subchats.db", MESSAGES))
    msg = shell.fails(f"%%subchat {line} --backend echo\n{body}")
    assert expected in msg and "\n" not in msg
    assert (store_rows(workdir / "subchats.db", CHATS),
            store_rows(workdir / "subchats.db", MESSAGES)) == before


def test_structured_output_applies_to_every_row_and_as_gets_the_parsed_values(shell, workdir):
    shell.ns["reviews"] = ["great", "awful", "meh"]
    shell.ok("%%subchat root --each reviews --as labels --choice pos,neg --backend echo\n"
             "Label: {item}")
    assert shell.ns["labels"] == ["pos", "pos", "pos"]  # echo answers the first choice
    shell.ns["schema"] = {"type": "object", "properties": {"n": {"type": "integer"}},
                          "required": ["n"]}
    shell.ok("%%subchat root --each reviews --fresh --as values --json schema --backend echo\n"
             "Rate: {item}")
    assert all(isinstance(v, dict) and isinstance(v["n"], int) for v in shell.ns["values"])


def test_a_rerun_after_the_extension_is_loaded_again_reuses_the_stored_rows(shell, workdir):
    # what a kernel restart leaves: the store file and nothing in memory
    shell.ns["qs"] = ["x", "y", "z"]
    shell.ok("%%subchat root --each qs --system 'Be brief.' --as a --backend echo\n{item}?")
    assert default_session().tree.get("root/qs").system_prompt == "Be brief."
    assert shell.ns["a"][0] == "echo (2 messages): x?"  # the batch chat's system prompt
    shell.ok("%unload_ext subchat_magics")
    from subchat_magics.session import reset_default_session

    reset_default_session()
    shell.ok("%load_ext subchat_magics")
    out = shell.ok("%%subchat root --each qs --as b --backend echo\n{item}?")
    assert "3 items, 3 done (3 reused), 0 failed" in out and shell.ns["b"] == shell.ns["a"]


def test_progress_is_reported_at_most_about_ten_times_a_second(tmp_path, monkeypatch):
    from subchat_magics import open_tree
    from subchat_magics.batch import PROGRESS_EVERY_S
    from subchat_magics.batch_view import progress_line

    monkeypatch.setenv("SUBCHAT_ECHO_DELAY", "0.004")  # ~30 ms a row, 4 in flight: ~1 s
    tree = open_tree(tmp_path / "t.db")
    seen = []  # (the batch's own elapsed time at each report, the line it shows)
    result = tree.batch("root", list(range(120)), lambda x, i: f"n {x}", name="n",
                        backend="echo", progress=lambda p: seen.append(
                            (p.elapsed_s, progress_line("root/n", p))))
    assert result.stats.done == 120
    # judged on the batch's own clock (what each report says), not on this test's
    reported = [s[0] for s in seen]
    assert reported == sorted(reported)
    assert len(seen) <= reported[-1] / PROGRESS_EVERY_S + 3  # the first, one per 0.1 s, the last
    gaps = [b - a for a, b in zip(reported[1:-2], reported[2:-1])]
    assert all(g >= PROGRESS_EVERY_S for g in gaps), gaps
    assert seen[-1][1].startswith("root/n  ████████████████████ 120/120 · ")
    assert "tokens/s" in seen[len(seen) // 2][1] and " left" in seen[len(seen) // 2][1]


def test_in_a_terminal_the_progress_is_one_line_rewritten_in_place(shell, monkeypatch):
    import io

    from subchat_magics.batch import Progress
    from subchat_magics.batch_view import BatchProgress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    view = BatchProgress(shell.ip, "root/qs")
    view(Progress(total=10, done=3, failed=1, completion_tokens=40, elapsed_s=2.0))
    view(Progress(total=10, done=10, completion_tokens=100, elapsed_s=4.0, finished=True))
    view.close()
    out = term.getvalue()
    assert out.startswith("\rroot/qs  ████████░░░░░░░░░░░░ 4/10 · 1 failed · 20 tokens/s · 0:03 left")
    assert "\rroot/qs  ████████████████████ 10/10 · 25 tokens/s · 0:04" in out
    assert out.endswith("\r") and "\n" not in out  # taken away; the summary line follows


def test_a_long_planning_shows_how_far_it_is_before_the_first_row(shell, monkeypatch):
    # issue 20: a big batch spent seconds planning with no line at all; now the line says
    # it is planning, and how far, once planning has taken a second
    import io
    import time

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    class Slow:  # a value whose text takes a while to make (a heavy object's __str__)
        def __init__(self, n):
            self.n = n

        def __str__(self):
            time.sleep(0.001)
            return f"doc {self.n}"

    shell.ns["docs"] = [Slow(i) for i in range(1500)]
    term = Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    result = shell.ip.run_cell("%%subchat root --each docs --limit 1400 --backend echo\n{item}")
    monkeypatch.undo()
    assert result.success, result.error_in_exec
    out = term.getvalue()
    planning = [line for line in out.split("\r") if "planning:" in line]
    assert planning and planning[0].startswith("--each docs  planning: preparing the rows ")
    assert planning[-1].rstrip().endswith("/1,400")
    # planning is said before the first row's progress, which names the batch chat
    first_bar = out.index("root/docs  ")
    assert out.index("planning:") < first_bar
    assert "batch root/docs: 1400 items, 1400 done" in out


def test_ctrl_c_while_planning_is_one_line_and_nothing_is_sent(shell, workdir):
    import _thread
    import threading

    from subchat_magics.testing import store_rows

    never = threading.Event()

    class Heavy:
        def __init__(self, n):
            self.n = n

        def __str__(self):
            if self.n == 50:  # Ctrl-C lands while the 50th row's text is being made
                _thread.interrupt_main()
                never.wait(60)
            return f"doc {self.n}"

    shell.ok("%%subchat root --backend echo\nhello")
    before = store_rows(workdir / "subchats.db", "SELECT id, chat_id, content FROM messages")
    shell.ns["docs"] = [Heavy(i) for i in range(100)]
    msg = shell.fails("%%subchat root --each docs --backend echo\n{item}")
    assert msg == ("%%subchat: interrupted while planning the batch; no row was sent: run "
                   "the cell again to start it")
    assert store_rows(workdir / "subchats.db", "SELECT id, chat_id, content FROM messages") \
        == before
    assert "root/docs" not in default_session().tree


def test_a_limit_beyond_any_list_takes_every_item(shell):
    shell.ns["xs"] = ["a", "b"]
    out = shell.ok("%%subchat root -b echo --each xs --limit 99999999999999999999 --as r\n{item}")
    assert "2 done" in out and shell.ns["r"] == ["echo (1 messages): a", "echo (1 messages): b"]
