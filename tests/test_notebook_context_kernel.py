"""The notebook as context in a real kernel (issue 12): the references, the value forms and
their limits, ``%subchat explain`` after a real exception and the ``set_next_input``
payload of ``--format code``, read off a kernel's channels (jupyter_client); and a key
typed into a cell that never reaches a loopback server, through a notebook run cell by
cell (nbclient)."""

from __future__ import annotations

import re

import nbformat
import pytest
from nbclient import NotebookClient

from subchat_magics.testing.fakeservers import FakeGroq, FakeOpenAI
from subchat_magics.testing.kernel import BACKEND_VARS, clean_env, execute, running_kernel

pytest.importorskip("pandas")

@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    with running_kernel(tmp_path_factory.mktemp("context-kernel"),
                        clean_env(LLM_BACKEND="echo")) as kc:
        yield kc


def stdout(msgs: list[dict], name: str = "stdout") -> str:
    return "".join(m["content"]["text"] for m in msgs
                   if m["msg_type"] == "stream" and m["content"]["name"] == name)


def final_reply(msgs: list[dict]) -> str:
    """The finished reply's text/plain (the last display of the cell)."""
    shown = [m for m in msgs if m["msg_type"] == "display_data"]
    return shown[-1]["content"]["data"]["text/plain"]


def sent(kc, body: str, path: str = "root") -> str:
    msgs, reply = execute(kc, f"%%subchat {path}\n{body}")
    assert reply["status"] == "ok", stdout(msgs, "stderr")
    return final_reply(msgs).split("): ", 1)[1]


def number(kc, code: str) -> int:
    """Run a cell; its execution number."""
    _, reply = execute(kc, code)
    return reply["execution_count"]


def test_cells_results_errors_and_the_last_result_in_a_kernel(kernel):
    n = number(kernel, "x = 40\nx + 2")
    e = number(kernel, "def g():\n    raise ValueError('bad value')\ng()")
    number(kernel, "'last'")
    text = sent(kernel, f"[{{In[{n}]}}] [{{Out[{n}]}}] [{{Err[{e}]}}] [{{In[-1]}}] [{{_}}] "
                        "[{Out[-3]}] [{In[}] [{Out[x]}]")
    assert text.startswith("[x = 40\nx + 2] [42] [")
    error = text.split("] [", 3)[2]
    assert "ValueError" in error and "bad value" in error and "raise ValueError('bad value')" in error
    assert not re.search(r"\x1b\[", text)
    assert text.endswith("] ['last'] [last] [42] [{In[}] [{Out[x]}]")


def test_a_missing_execution_is_one_line_on_stderr_in_a_kernel(kernel):
    msgs, reply = execute(kernel, "%%subchat root\n{Err[-1]} {In[100000]}")
    lines = stdout(msgs, "stderr").strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("UsageError: %%subchat: {Err[-1]}"), lines
    assert not [m for m in msgs if m["msg_type"] == "error"]


def test_dataframes_arrays_and_long_values_in_a_kernel(kernel):
    execute(kernel, "import pandas as pd, numpy as np\n"
                    "df = pd.DataFrame({'city': ['Oslo', 'Lima'] * 50, 'temp': range(100)})\n"
                    "arr = np.linspace(0, 1, 400).reshape(100, 4)\n"
                    "long = 'word ' * 2000")
    execute(kernel, "%config SubchatMagics.max_value_rows = 3")
    execute(kernel, "%config SubchatMagics.max_value_chars = 500")
    try:
        table = sent(kernel, "{df}")
        array = sent(kernel, "{arr}")
        cut = sent(kernel, "{long}")
        n = number(kernel, "df.head(2)")
        out = sent(kernel, f"{{Out[{n}]}}")
    finally:
        execute(kernel, "%config SubchatMagics.max_value_rows = 20")
        execute(kernel, "%config SubchatMagics.max_value_chars = 4000")
    assert table.splitlines()[0] == "DataFrame: 100 rows × 2 columns (showing the first 3 of 100 rows)"
    assert table.splitlines()[2:] == ["|  | city | temp |", "|---|---|---|", "| 0 | Oslo | 0 |",
                                      "| 1 | Lima | 1 |", "| 2 | Oslo | 2 |"]
    assert array.startswith("numpy array: shape (100, 4), dtype float64 (showing the first 3 of "
                            "100 rows)\n\n[[")
    assert len(array.splitlines()) == 5
    assert cut == "word " * 100 + "\n… (9500 more characters left out)"
    assert out.startswith("DataFrame: 2 rows × 2 columns\n\n|  | city | temp |")


def test_explain_after_a_real_exception_streams_the_cause_and_fix_request(kernel):
    execute(kernel, "%%subchat root/explained\nstart")
    n = number(kernel, "import json\njson.loads('{not json')")
    msgs, reply = execute(kernel, "%subchat explain")
    assert reply["status"] == "ok"
    assert "explaining the last error (JSONDecodeError) in root/explained" in stdout(msgs)
    answer = final_reply(msgs)
    assert re.match(r"echo \(\d+ messages\): This notebook cell", answer), answer[:80]
    assert "```python\nimport json\njson.loads('{not json')\n```" in answer
    assert "JSONDecodeError" in answer and "Expecting property name" in answer
    assert f"Cell In[{n}], line 2" in answer  # the traceback as the notebook showed it
    assert "\x1b[" not in answer
    shown = [m for m in msgs if m["msg_type"] == "display_data"][-1]["content"]["data"]
    assert "text/markdown" in shown  # streamed and shown like any cell


def test_format_code_sends_a_set_next_input_payload(kernel):
    msgs, reply = execute(kernel, "%%subchat root/code --format code\n"
                                  "Here:\n```python\nimport math\nmath.sqrt(2)\n```")
    payloads = [p for p in reply.get("payload", []) if p.get("source") == "set_next_input"]
    assert payloads == [{"source": "set_next_input", "text": "import math\nmath.sqrt(2)",
                         "replace": False}]
    assert "note: its code is in a new cell below (not run)" in stdout(msgs)
    assert re.match(r"echo \(\d+ messages\): Here:\n```python", final_reply(msgs))


# -- a key typed into a cell never reaches the server -----------------------------------------
KEY = "gsk_TYPED_into_a_cell_9f8e7d6c5b4a3210"


@pytest.mark.parametrize("server_kind, source", [("groq", "environment"), ("openai", ".env")])
def test_a_key_typed_into_a_cell_and_referenced_does_not_reach_the_server(tmp_path, monkeypatch,
                                                                           server_kind, source):
    fake = FakeGroq(key=KEY) if server_kind == "groq" else FakeOpenAI(key=KEY)
    var = "GROQ_API_KEY" if server_kind == "groq" else "OPENAI_API_KEY"
    for name in BACKEND_VARS:  # the kernel nbclient starts inherits this environment
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OLLAMA_HOST", "http://127.0.0.1:9")
    with fake as server:
        if server_kind == "groq":
            monkeypatch.setenv("GROQ_BASE_URL", server.url)
        else:
            monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
            monkeypatch.setenv("OPENAI_MODEL", "model-a")
        if source == "environment":
            monkeypatch.setenv(var, KEY)
        else:
            (tmp_path / ".env").write_text(f"{var}={KEY}\n")
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(c) for c in [
            "%load_ext subchat_magics",
            f"import requests_like\nclient = requests_like.Client(token='{KEY}')",  # raises
            f"url = 'https://api.example/v1?key={KEY}'\nurl",
            f"%%subchat root --backend {server_kind}\nWhy? {{In[-2]}}\n{{Err[-2]}}\n{{Out[-1]}}",
            f"%%subchat root/2 --backend {server_kind}\n{{url}}",
        ]]
        NotebookClient(nb, timeout=60, kernel_name="python3", allow_errors=True,
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
        bodies = [str(r.body) for r in server.chat_requests()]
    assert len(bodies) == 2, [c.get("outputs") for c in nb.cells]
    assert all(KEY not in b for b in bodies), "the key reached the server"
    assert "token='***'" in bodies[0] and "ModuleNotFoundError" in bodies[0]
    assert "key=***" in bodies[1]
    notes = ["".join(o.get("text", "") for o in nb.cells[i].outputs) for i in (3, 4)]
    assert re.search(r"note: a key was masked in \{In\[-2\]\}, .*\{Out\[-1\]\} before sending",
                     notes[0]), notes[0]
    assert "note: a key was masked in {url} before sending" in notes[1]
    saved = tmp_path / "saved.ipynb"
    nbformat.write(nb, str(saved))
    assert KEY.encode() not in (tmp_path / "subchats.db").read_bytes()
