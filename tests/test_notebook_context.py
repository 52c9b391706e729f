"""The notebook as context (issue 12), in a real shell: ``{In[n]}``, ``{Out[n]}``,
``{Err[n]}``, ``{_}`` and values in a message, their limits, ``%subchat explain``,
``--format code`` and the notebook export. The same things in a real kernel are in
``test_notebook_context_kernel.py``.

Cells here run as numbered executions (``store_history=True``), as in a notebook; the
shell is shared by the tests, so numbers are read from it, never assumed."""

from __future__ import annotations

import json
import subprocess
import sys

import nbformat
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from IPython.utils.capture import capture_output

from subchat_magics import render
from subchat_magics.notebook import interpolate
from subchat_magics.testing import store_rows
from subchat_magics.testing.fakeservers import FakeOpenAI
from subchat_magics.values import Limits, cut, prompt_text

pd = pytest.importorskip("pandas")
np = pytest.importorskip("numpy")


def run(sh, source: str):
    """Run a numbered cell; return (result, captured output)."""
    with capture_output(display=True) as cap:
        result = sh.ip.run_cell(source, store_history=True)
    return result, cap


def ok(sh, source: str) -> str:
    result, cap = run(sh, source)
    assert result.success, f"{source!r} failed: {result.error_before_exec or result.error_in_exec!r}"
    return cap.stdout


def fails(sh, source: str) -> str:
    from IPython.core.error import UsageError

    result, cap = run(sh, source)
    err = result.error_before_exec or result.error_in_exec
    assert isinstance(err, UsageError), f"expected UsageError, got {err!r}\n{cap.stdout}"
    return str(err)


def sent(sh, body: str, path: str = "root", flags: str = "") -> str:
    """What a %%subchat cell sent (the echo backend replies with it)."""
    ok(sh, f"%%subchat {path} {flags} --var reply_\n{body}")
    reply = sh.ns["reply_"]
    assert reply.startswith("echo (")
    return reply.split("): ", 1)[1]


def rows(workdir) -> list[tuple]:
    return store_rows(workdir / "subchats.db",
                      "SELECT chat_id, role, content, status FROM messages ORDER BY id")


def chats(workdir) -> list[tuple]:
    return store_rows(workdir / "subchats.db", "SELECT id, parent_id, name FROM chats ORDER BY id")


@pytest.fixture
def nb(shell, monkeypatch):
    monkeypatch.setenv("LLM_BACKEND", "echo")
    return shell


# -- cells in the prompt ----------------------------------------------------------------------
def test_in_out_and_err_name_executions_by_number_and_counting_back(nb):
    first = nb.ip.execution_count
    ok(nb, "x = 40\nx + 2")
    run(nb, "def f():\n    return 1 / 0\nf()")
    text = sent(nb, f"code: {{In[{first}]}}\nresult: {{Out[{first}]}}\nprev: {{In[-1]}}\n"
                    f"error: {{Err[{first + 1}]}}\nsame: {{Err[-1]}}")
    assert text.startswith("code: x = 40\nx + 2\nresult: 42\nprev: def f():\n    return 1 / 0\nf()")
    error = text.split("error: ", 1)[1].split("\nsame: ", 1)[0]
    assert "ZeroDivisionError" in error and "division by zero" in error
    assert "Traceback" in error and "return 1 / 0" in error and "\x1b[" not in error
    assert text.endswith("same: " + error)


def test_counting_back_is_from_the_cell_that_refers(nb):
    ok(nb, "'one'")
    ok(nb, "'two'")
    assert sent(nb, "{Out[-2]} {Out[-1]} {In[-1]}") == "one two 'two'"


def test_underscore_is_the_last_result_and_other_ipython_names_stay(nb):
    ok(nb, "6 * 7")
    assert sent(nb, "{_} {__} {In} {_i1}") == "42 {__} {In} {_i1}"


def test_malformed_references_and_code_stay_as_written(nb):
    ok(nb, "1")
    body = "{In[} {Out[x]} {Err[]} {In[1.5]} {In [1]} {{In[-1]}} d = {'a': In[1]}"
    assert sent(nb, body) == "{In[} {Out[x]} {Err[]} {In[1.5]} {In [1]} {In[-1]} d = {'a': In[1]}"


@pytest.mark.parametrize("ref, words", [
    ("{In[99999]}", ["{In[99999]}", "no execution 99999"]),
    ("{Out[-1]}", ["{Out[-1]}", "returned no result"]),
    ("{Err[-1]}", ["{Err[-1]}", "raised no error"]),
    ("{In[0]}", ["{In[0]}", "no execution 0"]),
])
def test_a_reference_to_a_missing_execution_is_a_usage_error_and_changes_nothing(nb, workdir,
                                                                                ref, words):
    sent(nb, "first")
    ok(nb, "y = 1")  # runs, returns nothing, raises nothing
    before = (rows(workdir), chats(workdir))
    msg = fails(nb, f"%%subchat root/new\nlook: {ref}")
    assert msg.startswith("%%subchat: ") and all(w in msg for w in words), msg
    assert "\n" not in msg and "{{" in msg  # says how to write the braces themselves
    assert (rows(workdir), chats(workdir)) == before


def test_errors_before_the_extension_was_loaded_or_after_unload_are_not_recorded(nb):
    ok(nb, "%unload_ext subchat_magics")
    run(nb, "raise ValueError('unseen')")
    ok(nb, "%load_ext subchat_magics")
    assert "raised no error" in fails(nb, "%%subchat root\n{Err[-2]}")
    assert "no error recorded yet" in ok(nb, "%subchat explain")


def test_counting_back_works_when_cells_run_without_history(nb):
    """A runner like nbval runs cells without history: no numbers, no In/Out; negative
    references count back through the cells run since the extension was loaded."""
    nb.ok("total = 2 + 3\ntotal * 2")
    nb.run("{}['missing']")
    nb.ok("'no error here'")
    out = nb.ok("%%subchat root --var reply_\n[{In[-3]}] [{Out[-3]}] [{Err[-2]}] [{Out[-1]}]")
    text = nb.ns["reply_"].split("): ", 1)[1]
    assert text.startswith("[total = 2 + 3\ntotal * 2] [10] [")
    assert "KeyError" in text and "'missing'" in text and text.endswith("] [no error here]")
    assert "note" not in out
    assert "raised no error" in nb.fails("%%subchat root\n{Err[-1]}")
    assert "only" in nb.fails("%%subchat root\n{In[-999]}")
    assert "explaining the last error (KeyError) in root" in nb.ok("%subchat explain")


# -- values that fit ----------------------------------------------------------------------------
def test_a_dataframe_is_a_markdown_table_within_the_row_and_column_limits(nb):
    nb.ns["df"] = pd.DataFrame({f"c{i}": range(i, i + 100) for i in range(30)})
    ok(nb, "%config SubchatMagics.max_value_rows = 5")
    ok(nb, "%config SubchatMagics.max_value_columns = 3")
    try:
        text = sent(nb, "look: {df}")
    finally:
        ok(nb, "%config SubchatMagics.max_value_rows = 20")
        ok(nb, "%config SubchatMagics.max_value_columns = 20")
    lines = text.splitlines()
    assert lines[0] == ("look: DataFrame: 100 rows × 30 columns (showing the first 5 of 100 rows "
                        "and the first 3 of 30 columns)")
    table = [ln for ln in lines if ln.startswith("|")]
    assert table[0] == "|  | c0 | c1 | c2 |" and table[1] == "|---|---|---|---|"
    assert table[2:] == [f"| {i} | {i} | {i + 1} | {i + 2} |" for i in range(5)]


def test_a_small_dataframe_and_a_series_are_whole_tables(nb):
    nb.ns["small"] = pd.DataFrame({"name": ["a|b", "c\nd"], "n": [1, 2]})
    nb.ns["s"] = pd.Series([1.5, 2.5, 3.5] * 10, name="price")
    text = sent(nb, "{small}\n{s}")
    assert "DataFrame: 2 rows × 2 columns\n\n|  | name | n |\n|---|---|---|\n" in text
    assert "| 0 | a\\|b | 1 |\n| 1 | c d | 2 |" in text
    assert "Series 'price': 30 rows, dtype float64 (showing the first 20 of 30 rows)" in text
    assert "|  | price |" in text and "| 19 | 2.5 |" in text and "| 20 |" not in text


def test_an_array_is_its_shape_dtype_and_a_head(nb):
    nb.ns["arr"] = np.arange(3000, dtype=np.int32).reshape(1000, 3)
    text = sent(nb, "{arr}")
    head = text.splitlines()
    assert head[0] == "numpy array: shape (1000, 3), dtype int32 (showing the first 20 of 1000 rows)"
    assert "[57 58 59]]" in text and "60" not in text


def test_a_long_value_is_cut_with_a_note_of_what_was_left_out(nb):
    nb.ns["long"] = "x" * 10_000
    ok(nb, "%config SubchatMagics.max_value_chars = 100")
    try:
        text = sent(nb, "{long}")
        assert text == "x" * 100 + "\n… (9900 more characters left out)"
        ok(nb, "%config SubchatMagics.max_value_chars = 0")  # 0: no cut
        assert sent(nb, "{long}") == "x" * 10_000
    finally:
        ok(nb, "%config SubchatMagics.max_value_chars = 4000")
    magics = nb.ip.magics_manager.registry["SubchatMagics"]
    run(nb, "%config SubchatMagics.max_value_rows = 0")  # refused (traitlets logs why)
    assert magics.max_value_rows == 20


def test_a_long_traceback_keeps_its_end():
    tb = "Traceback\n" + "frame\n" * 2000 + "ValueError: the point"
    out = cut(tb, 300, keep="ends")
    assert out.startswith("Traceback") and out.endswith("ValueError: the point")
    assert "characters left out" in out and len(out) < 400


def test_plain_values_import_neither_pandas_nor_numpy():
    code = ("import sys\n"
            "from subchat_magics.notebook import interpolate\n"
            "from subchat_magics.values import prompt_text\n"
            "class T: pass\n"
            "print(interpolate('{a} {b} {c}', {'a': 1, 'b': [1, 2], 'c': T()}).text[:3])\n"
            "print(prompt_text('x', {'k': 1.5}))\n"
            "print([m for m in ('pandas', 'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["1 [", "{'k': 1.5}", "[]"]


def test_prompt_text_of_a_value_from_a_library_lookalike_uses_str():
    class DataFrame:  # not pandas': its module is this test's
        def __str__(self):
            return "mine"

    assert prompt_text("d", DataFrame(), Limits()) == "mine"


# -- keys ---------------------------------------------------------------------------------------
def test_a_known_key_in_an_interpolated_cell_is_masked_and_the_cell_says_so(nb, workdir,
                                                                           monkeypatch):
    key = "sk-typed-into-a-cell-0123456789"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    ok(nb, f"token = '{key}'")
    out = ok(nb, "%%subchat root --var reply_\nwhy? {In[-1]} {token}")
    assert "note: a key was masked in {In[-1]}, {token} before sending" in out
    assert key not in nb.ns["reply_"] and "token = '***'" in nb.ns["reply_"]
    assert all(key not in r[2] for r in rows(workdir))


# -- %subchat explain -----------------------------------------------------------------------------
def test_explain_sends_the_last_error_with_its_code_to_the_current_chat(nb, workdir):
    assert ok(nb, "%subchat explain").strip() == (
        "%subchat explain: no error recorded yet (errors are recorded from the cells run "
        "after %load_ext subchat_magics)")
    sent(nb, "hello", path="root/debug")
    run(nb, "data = {'a': 1}\ndata['b']")
    run(nb, "%%subchat root/nowhere/deep\nan error of ours is not the one explained")
    out = ok(nb, "%subchat explain")
    assert "explaining the last error (KeyError) in root/debug" in out
    msgs = store_rows(workdir / "subchats.db",
                      "SELECT m.content FROM messages m JOIN chats c ON c.id = m.chat_id "
                      "WHERE c.name = 'debug' AND m.role = 'user' ORDER BY m.id")
    prompt = msgs[-1][0]
    assert "Explain the cause" in prompt and "propose a fix" in prompt
    assert "```python\ndata = {'a': 1}\ndata['b']\n```" in prompt
    assert "KeyError" in prompt and "'b'" in prompt


def test_explain_n_into_a_path_and_its_bad_input(nb, workdir):
    run(nb, "int('x')")
    n = nb.ip.execution_count - 1
    ok(nb, "1 + 1")
    out = ok(nb, f"%subchat explain {n} --into root/why")
    assert f"explaining the ValueError of execution {n} in root/why" in out
    before = (rows(workdir), chats(workdir))
    assert fails(nb, f"%subchat explain {n + 1}").startswith(
        f"%subchat explain: execution {n + 1} raised no error")
    assert "no execution 99999" in fails(nb, "%subchat explain 99999")
    assert "%subchat explain" in fails(nb, "%subchat explain x")
    assert (rows(workdir), chats(workdir)) == before


# -- replies as code ------------------------------------------------------------------------------
def test_format_code_puts_the_fenced_blocks_in_the_next_input(nb, workdir):
    nb.ip.rl_next_input = None
    out = ok(nb, "%%subchat root --format code\nTry:\n```python\nimport math\n```\nthen\n"
                 "~~~\nprint(math.pi)\n~~~\ndone")
    assert nb.ip.rl_next_input == "import math\n\nprint(math.pi)"
    assert "note: its code is the next input:\nimport math" in out
    assert rows(workdir)[-1][1:] == ("assistant", "echo (1 messages): Try:\n```python\nimport "
                                     "math\n```\nthen\n~~~\nprint(math.pi)\n~~~\ndone", "complete")


def test_format_code_without_fences_takes_the_whole_reply(nb):
    nb.ip.rl_next_input = None
    ok(nb, "%%subchat root -f code\nx = 1")
    assert nb.ip.rl_next_input == "echo (1 messages): x = 1"


def test_format_code_on_an_empty_reply_stores_it_and_adds_no_cell(nb, workdir, monkeypatch):
    with FakeOpenAI() as server:
        server.configure(chunks=[])
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-local-0123456789abcdef")
        nb.ip.rl_next_input = None
        out = ok(nb, "%%subchat root --backend openai --format code\nsay nothing")
    assert nb.ip.rl_next_input is None
    assert "note: the reply has no text, so no cell was added (it is stored)" in out
    assert rows(workdir)[-1][1:3] == ("assistant", "")


def test_format_code_with_fanout_is_refused_before_anything_is_written(nb, workdir):
    sent(nb, "first")
    before = (rows(workdir), chats(workdir))
    assert "--format code" in fails(nb, "%%subchat root --fanout 2 --format code\nhi")
    assert (rows(workdir), chats(workdir)) == before


@pytest.mark.parametrize("reply, code", [
    ("no code here", "no code here"),
    ("<think>hmm ```x```</think>Use:\n```py\na = 1\n```", "a = 1"),
    ("````\n```nested```\n````", "```nested```"),
    ("```\n\n```", "```\n\n```"),  # an empty block is not code: the reply itself
    ("", ""),
])
def test_reply_code(reply, code):
    assert render.reply_code(reply) == code


# -- a chat as a notebook -----------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="{}ab_[]-1 In", max_size=30))
def test_escaped_braces_come_back_unchanged_through_the_cell(text):
    assert interpolate(render.escape_braces(text), {"a": "A", "_": "U"}).text == text


def _export(sh, path: str, out) -> dict:
    ok(sh, f"%subchat export {path} --format ipynb --out {out}")
    data = json.loads(out.read_text(encoding="utf-8"))
    nbformat.validate(nbformat.from_dict(data))
    return data


def _cells(data: dict) -> list[tuple[str, str]]:
    return [(c["cell_type"], c["source"]) for c in data["cells"]]


def test_an_export_as_ipynb_has_a_load_cell_and_one_cell_per_message_in_tree_order(nb, workdir):
    sent(nb, "What is {x}?", flags="--system 'Be brief.'")
    sent(nb, "branch", path="root/early")
    sent(nb, "later in root")
    sent(nb, "end", path="root/late")
    ok(nb, "from subchat_magics import default_session\n"
           "default_session().set_system('root/late', 'two\\nlines')")
    data = _export(nb, "root", workdir / "tree.ipynb")
    cells = _cells(data)
    assert cells[1][0] == "code" and cells[1][1].endswith("%load_ext subchat_magics")
    code = [s for k, s in cells if k == "code"][1:]
    assert code[0] == "%%subchat root --system 'Be brief.'\nWhat is {{x}}?"
    assert code[1] == "%%subchat root/early\nbranch"
    assert code[2] == "%%subchat root\nlater in root"
    assert code[3] == ("from subchat_magics import default_session\n"
                       "chat = default_session().branch('root', 'late')\n"
                       "chat = default_session().set_system('root/late', 'two\\nlines')")
    assert code[4] == "%%subchat root/late\nend"
    heads = [s.split("\n")[0] for k, s in cells if k == "markdown"]
    assert heads == ["# Chat tree export: root", "## root", "## root/early", "## root (continued)",
                     "## root/late"]
    outputs = [c["outputs"] for c in data["cells"] if c["source"].startswith("%%subchat root/early")]
    assert outputs[0][1]["data"]["text/plain"] == "echo (4 messages): branch"


def test_a_subtree_export_carries_the_context_it_inherits(nb, workdir):
    sent(nb, "one")
    sent(nb, "two", path="root/a")
    sent(nb, "after", path="root")
    sent(nb, "three", path="root/a/b")
    data = _export(nb, "root/a/b", workdir / "sub.ipynb")
    code = [s for k, s in _cells(data) if k == "code"][1:]
    assert code == ["%%subchat root\none", "%%subchat root/a\ntwo", "%%subchat root/a/b\nthree"]


def test_export_to_a_place_that_cannot_be_written_is_one_line(nb, workdir):
    sent(nb, "x")
    msg = fails(nb, f"%subchat export root --format ipynb --out {workdir}/no/such/dir/t.ipynb")
    assert msg.startswith("%subchat: cannot write") and "\n" not in msg


def test_the_exported_notebook_reruns_under_nbval_on_echo(nb, workdir):
    sent(nb, "Q1 {{literal}}", flags="--system 'Be brief.'")
    sent(nb, "Q2", path="root/b1")
    sent(nb, "Q3")
    sent(nb, "Q4", path="root/b2")
    sent(nb, "Q5", path="root/b1/deeper")
    ok(nb, "from subchat_magics import default_session\n"
           "default_session().branch('root', 'empty');")
    out = workdir / "rerun.ipynb"
    _export(nb, "root", out)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval",
         "--nbval-current-env", str(out)], capture_output=True, text=True, cwd=workdir,
        env={**__import__("os").environ, "LLM_BACKEND": "echo"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_a_table_cut_by_characters_says_how_many_rows_it_shows(nb, caplog):
    """A wide table: twenty rows do not fit in max_value_chars, so it stops between rows
    and its note counts the rows that are there, not the twenty it would have shown."""
    import numpy as np

    nb.ns["wide"] = pd.DataFrame(np.random.default_rng(3).random((100_000, 30)),
                                 columns=[f"feature_{i}" for i in range(30)])
    text = sent(nb, "look: {wide}")
    lines = text.splitlines()
    body = [ln for ln in lines if ln.startswith("|")][2:]
    assert 1 <= len(body) < 20 and len(text) <= 4000 + len("look: ")
    assert lines[0] == (f"look: DataFrame: 100000 rows × 30 columns (showing the first "
                        f"{len(body)} of 100000 rows and the first 20 of 30 columns)")
    assert "characters left out" not in text  # cut between rows, not in one
    # floats at 6 significant digits (a setting), not their full repr
    first = body[0].split(" | ")[1]
    assert first == f"{nb.ns['wide'].iloc[0, 0]:.6g}" and len(first) <= 10
    ok(nb, "%config SubchatMagics.max_value_digits = 3")
    try:
        again = sent(nb, "look: {wide}")
    finally:
        ok(nb, "%config SubchatMagics.max_value_digits = 6")
    rows3 = [ln for ln in again.splitlines() if ln.startswith("|")][2:]
    assert rows3[0].split(" | ")[1] == f"{nb.ns['wide'].iloc[0, 0]:.3g}"
    assert len(rows3) > len(body)  # shorter cells: more rows fit, and the note says so
    assert f"showing the first {len(rows3)} of 100000 rows" in again
    nb.run("%config SubchatMagics.max_value_digits = 0")
    assert "max_value_digits must be 1 or more" in caplog.text  # refused, and kept
    assert sent(nb, "look: {wide}") == text


def test_floats_in_a_table_read_as_written_and_keep_their_whole_part(nb):
    nb.ns["prices"] = pd.Series([0.1 + 0.2, 123456789.5, 1.5e-7, float("nan")], name="p")
    text = sent(nb, "{prices}")
    cells = [ln.split(" | ")[1].rstrip(" |") for ln in text.splitlines() if ln.startswith("| ")][1:]
    assert cells == ["0.3", "123456790", "1.5e-07", "nan"]
