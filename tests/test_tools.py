"""The notebook's functions as tools (``%%subchat --tools f,g``) on the offline echo
backend and through a real shell: described from their signatures, every call checked
against its schema, asked about (or --yes), run, stored as messages of the chat and sent
back; bad input refused before the tree is touched."""

from __future__ import annotations

import json
from typing import Annotated, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from subchat_magics.errors import InvalidInput
from subchat_magics.session import open_tree
from subchat_magics.testing import store_rows
from subchat_magics.tools import ToolCall, Toolset, describe, step_schema
from subchat_magics.values import Limits

DEFS = '''
import pandas as pd
sales = pd.DataFrame({"region": ["north", "south", "east"], "units": [12, 7, 30]})
calls = []

def lookup(region: str) -> int:
    """Units sold in a region.

    Args:
        region: the region's name, e.g. north
    """
    calls.append(("lookup", region))
    return int(sales.loc[sales.region == region, "units"].sum())

def top(n: int = 1) -> list:
    """The regions that sold most."""
    calls.append(("top", n))
    return sales.nlargest(n, "units").region.tolist()
'''


def rows(workdir):
    db = workdir / "subchats.db"
    if not db.exists():
        return None
    return (store_rows(db, "SELECT id, parent_id, name FROM chats ORDER BY id"),
            store_rows(db, "SELECT id, chat_id, seq, role, content, status, provenance "
                           "FROM messages ORDER BY id"))


# -- describing -----------------------------------------------------------------------------
def test_a_function_is_described_from_its_signature_hints_and_docstring():
    def lookup(region: str, limit: int = 3, *, exact: bool | None = None) -> int:
        """Units sold in a region.

        Longer text.

        Args:
            region: the region's name,
                e.g. north
            limit (int): at most this many
        Returns:
            a count
        """
        return 0

    tool = describe(lookup)
    assert tool.name == "lookup"
    assert tool.description == "Units sold in a region.\n\nLonger text."
    props = tool.parameters["properties"]
    assert props["region"] == {"type": "string", "description": "the region's name, e.g. north"}
    assert props["limit"]["type"] == "integer" and props["limit"]["default"] == 3
    assert props["limit"]["description"] == "at most this many"
    assert props["exact"]["anyOf"] == [{"type": "boolean"}, {"type": "null"}]
    assert tool.parameters["required"] == ["region"]
    assert tool.spec()["function"]["name"] == "lookup"


def _no_hint(x):  # noqa: ANN001 - the point of the test
    return x


def _star(*values: int) -> int:
    return 0


def _kw(**values: int) -> int:
    return 0


class _Opaque:
    pass


async def _async(x: int) -> int:
    return x


def _opaque(x: _Opaque) -> int:
    return 0


@pytest.mark.parametrize("fn, words", [
    (3, "not a function but int"),
    (lambda x: x, "cannot be a tool name"),
    (_no_hint, "parameter x has no type hint"),
    (_star, "*values cannot be described"),
    (_kw, "**values cannot be described"),
    (len, "a builtin (len) cannot be a tool"),
    (_opaque, "cannot be described as JSON Schema"),
    (_async, "an async function"),
])
def test_a_callable_that_cannot_be_described_is_refused_in_one_line(fn, words):
    with pytest.raises(InvalidInput) as err:
        describe(fn)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_two_tools_with_one_name_are_refused():
    def f(x: int) -> int:
        return x

    g = f
    with pytest.raises(InvalidInput, match="two tools are named f"):
        Toolset.of([f, g])


# -- running a call -------------------------------------------------------------------------
def _toolset(log):
    def area(width: float, height: float = 1.0) -> float:
        """Area of a rectangle."""
        log.append((width, height))
        return width * height

    def fail(x: int) -> int:
        """Always fails."""
        raise ValueError(f"bad x {x}")

    def huge(n: int) -> str:
        """A long result."""
        return "x" * n

    class Unprintable:
        def __str__(self):
            raise RuntimeError("no")

    def weird(n: int) -> object:
        """An unprintable result."""
        return Unprintable()

    return Toolset.of([area, fail, huge, weird])


def test_a_call_with_invalid_arguments_is_never_run_and_says_why():
    log: list = []
    ts = _toolset(log)
    for call, words in [
        (ToolCall.parse("area", '{"width": "wide"}'), "'wide' is not of type 'number'"),
        (ToolCall.parse("area", '{"height": 2}'), "'width' is a required property"),
        (ToolCall.parse("area", '{"width": 1, "depth": 2}'), "Additional properties"),
        (ToolCall.parse("area", '{"width": 1'), "not JSON"),
        (ToolCall.parse("area", "[1, 2]"), "not a JSON object"),
        (ToolCall.parse("os_system", '{"cmd": "rm -rf /"}'), "no tool named 'os_system'"),
    ]:
        result = ts.run(call)
        assert result.status == "error" and words in result.content, result.content
    assert log == []  # nothing ran
    ok = ts.run(ToolCall.parse("area", '{"width": 2, "height": 3}'))
    assert (ok.status, ok.content, log) == ("ok", "6.0", [(2, 3)])


def test_a_tool_that_raises_sends_back_its_type_message_and_last_frames():
    result = _toolset([]).run(ToolCall("fail", {"x": 4}))
    assert result.status == "error"
    assert result.content.startswith("error: ValueError: bad x 4")
    assert "in fail" in result.content and "pydantic" not in result.content


def test_a_huge_or_unprintable_result_is_cut_or_named(monkeypatch):
    ts = _toolset([])
    result = ts.run(ToolCall("huge", {"n": 50_000}), Limits(chars=100))
    assert len(result.content) < 200 and "49900 more characters left out" in result.content
    assert ts.run(ToolCall("weird", {"n": 1})).content == \
        "<a Unprintable that cannot be written as text>"


def test_a_result_holding_a_key_is_masked(monkeypatch):
    monkeypatch.setenv("GROQ_API_KEY", "gsk_secret_value_1234")

    def leak() -> str:
        """Leaks."""
        return "the key is gsk_secret_value_1234"

    assert Toolset.of([leak]).run(ToolCall("leak", {})).content == "the key is ***"


def test_the_step_schema_admits_exactly_the_calls_and_the_answer():
    from jsonschema import Draft202012Validator

    ts = _toolset([])
    v = Draft202012Validator(step_schema(ts.tools, "answer"))
    assert v.is_valid({"name": "area", "arguments": {"width": 1.5}})
    assert v.is_valid({"name": "answer"})
    assert not v.is_valid({"name": "area", "arguments": {"width": "x"}})
    assert not v.is_valid({"name": "rm", "arguments": {}})
    assert not v.is_valid({"name": "answer", "arguments": {}})


# -- through the shell, on echo ---------------------------------------------------------------
def test_tools_are_called_run_stored_and_sent_back(shell, workdir):
    shell.ok(DEFS)
    out = shell.ok("%%subchat root/sales --backend echo --tools lookup,top --yes\n"
                   "Which region sold most?")
    assert shell.ns["calls"] == [("lookup", ""), ("top", 1)]  # each once, minimal valid args
    assert "🔧 lookup(region='') → 0" in out and "🔧 top() → ['east']" in out
    assert "tool results: lookup → 0; top → ['east']" in out
    msgs = rows(workdir)[1]
    assert [(m[3], m[4]) for m in msgs] == [
        ("user", "Which region sold most?"), ("assistant", ""), ("tool", "0"),
        ("assistant", ""), ("tool", "['east']"),
        ("assistant", "echo (5 messages): Which region sold most?\n"
                      "tool results: lookup → 0; top → ['east']")]
    first_call = json.loads(msgs[1][6])["tool_calls"][0]
    assert first_call["name"] == "lookup" and first_call["arguments"] == {"region": ""}
    assert json.loads(msgs[2][6])["tool_call_id"] == first_call["id"]
    assert json.loads(msgs[2][6])["tool_status"] == "ok"
    # a subchat inherits the calls and results as context, in the backends' chat format
    assert "echo (7 messages): and?" in shell.ok("%%subchat root/sales/more --backend echo\nand?")
    from subchat_magics.session import default_session

    ctx = default_session().tree.context("root/sales/more")
    assert ctx[1]["tool_calls"][0]["function"] == {"name": "lookup", "arguments": '{"region": ""}'}
    assert ctx[2] == {"role": "tool", "content": "0", "tool_call_id": first_call["id"],
                      "name": "lookup"}


def test_a_list_of_functions_in_a_variable_can_be_named(shell, workdir):
    shell.ok(DEFS + "\nmy_tools = [lookup, top]")
    shell.ok("%%subchat root --backend echo --tools my_tools --yes\nhi")
    assert [c[0] for c in shell.ns["calls"]] == ["lookup", "top"]


def test_show_p_gives_each_call_with_its_timing_and_exports_keep_them(shell, workdir):
    shell.ok(DEFS)
    shell.ok("%%subchat root --backend echo --tools lookup --yes\nhi")
    shown = shell.ok("%subchat show -p")
    assert "[assistant] calls lookup(region='')" in shown
    assert "[tool lookup] 0 (" in shown and " ms)" in shown
    md = shell.ok("%subchat export root --format md")
    assert "calls `lookup(region='')`" in md and "**tool** `lookup`" in md
    shell.ok("%subchat export root --format json --out t.json")
    data = json.loads((workdir / "t.json").read_text())
    roles = [m["role"] for m in data["chats"][0]["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant"]
    from subchat_magics.session import default_session

    default_session().tree.create("root/copy")
    shell.ok("%subchat import t.json --into root/copy")
    ctx = default_session().tree.context("root/copy/root")[-4:]
    assert [m["role"] for m in ctx] == roles and ctx[1]["tool_calls"]
    shell.ok("%subchat export root --format ipynb --out t.ipynb")
    nb = json.loads((workdir / "t.ipynb").read_text())
    cell = next(c for c in nb["cells"] if c["cell_type"] == "code" and "--tools" in c["source"])
    assert cell["source"].startswith("%%subchat root --tools lookup")
    texts = [o["data"]["text/plain"] for o in cell["outputs"] if o["data"]["text/plain"]]
    assert texts[0] == "🔧 lookup(region='') → 0" and texts[-1].startswith("echo (3 messages)")


def test_max_rounds_stops_the_loop_and_says_so(shell, workdir):
    shell.ok(DEFS)
    out = shell.ok("%%subchat root --backend echo --tools lookup,top --yes --max-rounds 1 "
                   "--var answer\nhi")
    assert "stopped after 1 round(s) of tool calls (--max-rounds 1)" in out
    assert shell.ns["calls"] == [("lookup", "")] and shell.ns["answer"] is None
    assert [m[3] for m in rows(workdir)[1]] == ["user", "assistant", "tool"]


def test_the_constraint_binds_the_final_answer_only(shell, workdir):
    shell.ok(DEFS)
    shell.ok("schema = {'type': 'object', 'properties': {'region': {'type': 'string'}}, "
             "'required': ['region']}")
    shell.ok("%%subchat root --backend echo --tools top --yes --json schema --var v\nWho?")
    assert shell.ns["v"] == {"region": ""}
    last = rows(workdir)[1][-1]
    assert (last[3], last[5], json.loads(last[4])) == ("assistant", "complete", {"region": ""})


def test_a_refused_call_is_sent_back_as_refused():
    import tempfile

    tree = open_tree(tempfile.mkdtemp() + "/s.db")
    ran: list = []

    def delete_all(table: str) -> str:
        """Deletes a table."""
        ran.append(table)
        return "done"

    asked: list = []
    run = tree.send("root", "clean up", backend="echo", tools=[delete_all],
                    approve=lambda call: asked.append(call.signature()) or False)
    text = "".join(run)
    assert ran == [] and asked == ["delete_all(table='')"]
    assert "delete_all → refused: the user did not allow this call" in text
    tool_msg = tree.history("root")[2]
    assert tool_msg.role == "tool" and tool_msg.provenance["tool_status"] == "refused"
    tree.close()


@pytest.mark.parametrize("cell, words", [
    ("%%subchat root --backend echo --tools nope\nhi", "no variable 'nope'"),
    ("%%subchat root --backend echo --tools sales\nhi", "not a function but DataFrame"),
    ("%%subchat root --backend echo --tools lookup,lookup\nhi", "two tools are named lookup"),
    ("%%subchat root --backend echo --yes\nhi", "--yes and --max-rounds go with --tools"),
    ("%%subchat root --backend echo --tools lookup --max-rounds 0\nhi", "--max-rounds takes"),
    ("%%subchat root --backend echo --tools lookup --fanout 0\nhi", "--fanout takes a number"),
    ("%%subchat root --backend echo --tools lookup --each xs --max-rounds 0\n{item}",
     "--max-rounds takes"),
    ("%%subchat root --backend echo --tools len\nhi", "len is a Python builtin"),
    ("%%subchat root --backend echo --tools lookup,print\nhi", "print is a Python builtin"),
    ("%%subchat root --backend echo --tools length\nhi", "length: a builtin (len)"),
    ("%%subchat root --backend echo --tools untyped\nhi", "untyped: parameter n has no type hint"),
    ("%%subchat root --backend echo --tools lam\nhi", "lam: parameter x has no type hint"),
])
def test_bad_tool_input_is_one_line_and_leaves_the_store_unchanged(shell, workdir, cell, words):
    shell.ok(DEFS + "\nxs = [1, 2]\nlength = len\nlam = lambda x: x\n"
             "class Untyped:\n    def __call__(self, n):\n        return n\nuntyped = Untyped()")
    shell.ok("%%subchat root --backend echo\nfirst")
    before = rows(workdir)
    msg = shell.fails(cell)
    assert words in msg and msg.startswith("%%subchat") and "\n" not in msg, msg
    assert rows(workdir) == before


def test_a_callable_instance_or_a_partial_is_a_tool_named_after_its_variable(shell, workdir):
    shell.ok(DEFS + '''
import functools

class Scaled:
    """Units sold in a region, scaled."""
    def __init__(self, k):
        self.k = k
    def __call__(self, region: str) -> int:
        calls.append(("scaled", region))
        return self.k * lookup(region)

def units_in(region: str, factor: int) -> int:
    """Units in a region times a factor."""
    calls.append(("units_in", region, factor))
    return factor

double = Scaled(2)
triple = functools.partial(units_in, factor=3)
''')
    shell.ok("%%subchat root --backend echo --tools double,triple --yes\nhow many?")
    assert shell.ns["calls"][0] == ("scaled", "") and shell.ns["calls"][2] == ("units_in", "", 3)
    from subchat_magics.session import default_session

    msgs = default_session().tree.get("root").messages
    assert [c["name"] for m in msgs for c in m.tool_calls] == ["double", "triple"]
    tools = {t.name: t for t in Toolset.of([describe(shell.ns["double"], label="double"),
                                             describe(shell.ns["triple"], label="triple")])}
    assert tools["double"].description == "Units sold in a region, scaled."
    assert tools["triple"].description == "Units in a region times a factor."
    assert tools["triple"].parameters["properties"]["factor"]["default"] == 3
    assert tools["triple"].parameters["required"] == ["region"]


def test_fanout_with_tools_gives_each_subchat_its_own_loop(shell, workdir):
    shell.ok(DEFS)
    out = shell.ok("%%subchat root --backend echo --fanout 2 --tools lookup,top --yes "
                   "--var answers\nWhich region?")
    assert "── root/1 ──" in out and "── root/2 ──" in out
    assert [c[0] for c in shell.ns["calls"]] == ["lookup", "top", "lookup", "top"]
    assert [a.splitlines()[0] for a in shell.ns["answers"]] == [
        "echo (5 messages): Which region?"] * 2
    from subchat_magics.session import default_session

    tree = default_session().tree
    for path in ("root/1", "root/2"):
        assert [m.role for m in tree.get(path).messages] == [
            "user", "assistant", "tool", "assistant", "tool", "assistant"]


#: a tool whose second call is cut by a Ctrl-C (the SIGINT Jupyter sends) while it runs
SLOW_SECOND_CALL = '''
import _thread, time
seen = []
def slow(x: int) -> int:
    """Slow."""
    seen.append(x)
    if len(seen) == 2:
        _thread.interrupt_main()
        time.sleep(5)
    return x
'''


def test_ctrl_c_in_a_fanout_tool_loop_names_every_subchat_in_its_one_line(shell, workdir):
    """--fanout with --tools runs each subchat's loop in turn: Ctrl-C in the second one's
    tool says in one line what each subchat holds (answered, cut, not sent), not only the
    cut one's calls; --var holds the answers that came."""
    shell.ok(SLOW_SECOND_CALL)
    result, cap = shell.run("%%subchat root/f --fanout 3 --tools slow --yes --var v\nhi")
    msg = str(result.error_in_exec)
    assert msg == ("%%subchat: interrupted: 0 finished tool calls kept in root/f/2; "
                   "root/f/1 finished; root/f/3 not sent"), msg
    assert "Traceback" not in cap.stdout + cap.stderr
    assert shell.ns["v"][0].startswith("echo (3 messages): hi") and shell.ns["v"][1:] == [None, None]


def test_fanout_approvals_are_asked_once_per_tool_for_every_subchat(shell, workdir):
    from subchat_magics.session import default_session
    from subchat_magics.toolrun import Approver

    shell.ok(DEFS)
    asked: list[str] = []
    answers = {"lookup": "y", "top": "n"}
    approver = Approver(ask=lambda prompt: asked.append(prompt) or answers[prompt[4:].split("(")[0]])
    runs = default_session().fanout("root", "Which?", n=3, backend="echo",
                                    tools=[shell.ns["lookup"], shell.ns["top"]], approve=approver)
    for run in runs:
        run.run()
    assert len(asked) == 2 and asked[0].endswith("(for all of them): ")
    assert [c[0] for c in shell.ns["calls"]] == ["lookup"] * 3  # top refused for all three
    assert all("top → refused" in run.text for run in runs)


def test_a_front_end_that_cannot_ask_says_to_add_yes_in_one_line(shell, workdir):
    shell.ok(DEFS)  # pytest captures stdin: input() cannot ask here, as under nbval
    msg = shell.fails("%%subchat root --backend echo --tools lookup\nhi")
    assert "cannot ask before running lookup here" in msg and "add --yes" in msg
    assert "\n" not in msg and shell.ns["calls"] == []
    from subchat_magics.session import default_session

    # the model's call can only be known after sending (here, where the shell cannot tell
    # ahead that input() fails): it keeps a result saying truly why it did not run, so the
    # chat stays a valid context
    msgs = default_session().tree.get("root").messages
    assert [m.role for m in msgs] == ["user", "assistant", "tool"]
    assert msgs[2].content.startswith("not run: no approval was possible (this front end "
                                      "cannot ask") and "--yes" in msgs[2].content
    assert "interrupted" not in msgs[2].content and msgs[2].provenance["tool_status"] == "refused"


def test_a_closed_stdin_says_to_add_yes_not_interrupted(shell, workdir, monkeypatch):
    """input() at the end of its stdin (a terminal IPython fed by a pipe) raises EOFError:
    no one can answer, so the cell says to add --yes, as where there is no stdin at all."""
    import io

    shell.ok(DEFS)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # the process's stdin, at its end
    msg = shell.fails("%%subchat root --backend echo --tools lookup\nhi")
    assert "cannot ask before running lookup here (no stdin: EOFError)" in msg, msg
    assert "add --yes" in msg and "interrupted" not in msg and shell.ns["calls"] == []


def test_a_tool_interrupted_by_ctrl_c_keeps_every_finished_step(shell, workdir):
    shell.ok(DEFS + '''
def slow(x: int) -> int:
    """Interrupted."""
    raise KeyboardInterrupt
''')
    result, cap = shell.run("%%subchat root --backend echo --tools lookup,slow --yes --var v\nhi")
    assert str(result.error_in_exec) == "%%subchat: interrupted: 1 finished tool call kept in root"
    assert "Traceback" not in cap.stdout + cap.stderr and shell.ns["v"] == ""
    msgs = rows(workdir)[1]
    assert [(m[3], m[5]) for m in msgs] == [
        ("user", "complete"), ("assistant", "complete"), ("tool", "complete"),
        ("assistant", "complete"), ("tool", "interrupted")]
    # the chat stays valid for the next message: every call has its result
    assert "echo (6 messages): again" in shell.ok("%%subchat root --backend echo\nagain")


# -- invariant --------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["tools", "plain", "branch"]),
                          st.integers(1, 3), st.booleans()), min_size=1, max_size=8))
def test_every_call_in_a_context_is_answered_before_the_next_turn(tmp_path_factory, ops):
    """Over random sequences of tool runs (any rounds limit, some calls refused), plain
    messages and branches, every chat's context pairs each call with its result."""
    tree = open_tree(tmp_path_factory.mktemp("inv") / "s.db")

    def a(x: int) -> int:
        """A."""
        return x

    def b(y: str) -> str:
        """B."""
        return y

    chats = ["root"]
    for i, (op, rounds, allow) in enumerate(ops):
        path = chats[i % len(chats)]
        if op == "branch":
            chats.append(tree.create(f"{path}/c{i}").path)
        elif op == "tools":
            tree.send(path, f"q{i}", backend="echo", tools=[a, b], max_rounds=rounds,
                      approve=lambda call, allow=allow: allow).run()
        else:
            tree.send(path, f"p{i}", backend="echo").run()
    for path in chats:
        ctx = tree.context(path)
        open_ids: list[str] = []
        for m in ctx:
            if m["role"] == "tool":
                assert m["tool_call_id"] in open_ids
                open_ids.remove(m["tool_call_id"])
                continue
            assert open_ids == [], (path, ctx)
            open_ids = [c["id"] for c in m.get("tool_calls", [])]
        assert open_ids == []
    tree.close()


class _Point(BaseModel):
    x: int
    y: Annotated[float, Field(gt=0.5)]


def _a(kind: Literal["x", "y"], n: Annotated[int, Field(ge=5)], tags: list[str]) -> int:
    """A."""
    return 0


def _b(name: Annotated[str, Field(min_length=3, pattern="^[a-z]+$")], p: _Point,
       maybe: int | None = None) -> int:
    """B."""
    return 0


def test_echo_calls_each_tool_with_arguments_valid_against_its_schema():
    from subchat_magics.tools import example_arguments, schema_error

    for fn in (_a, _b):
        params = describe(fn, name=fn.__name__.strip("_")).parameters
        args = example_arguments(params)
        assert schema_error(params, args) is None, (fn.__name__, args)


def test_echo_calls_a_tool_taking_dates_times_and_uuids_with_values_it_accepts(shell, workdir):
    """echo's call is a valid instance of the schema: a string with a format (a date, a
    date-time, a time, a duration, a UUID) gets a value of that format, so the tool runs
    instead of failing pydantic's validation on an empty string."""
    shell.ok('''
import datetime, uuid
got = []
def when(day: datetime.date, at: datetime.datetime, t: datetime.time, span: datetime.timedelta,
         key: uuid.UUID) -> str:
    """Takes typed values."""
    got.append((day, at, t, span, key))
    return "ran"
''')
    out = shell.ok("%%subchat root --tools when --yes\nWhen?")
    assert "tool results: when → ran" in out, out
    assert len(shell.ns["got"]) == 1


def test_each_row_of_a_batch_runs_its_own_tool_loop_and_a_rerun_reuses_the_answers(
        shell, workdir):
    shell.ok(DEFS + "\nregions = ['north', 'south', 'east']")
    out = shell.ok("%%subchat root --each regions --tools lookup --yes --as answers\n"
                   "How many in {item}?")
    assert "3 done" in out or "3/3" in out, out
    assert shell.ns["calls"] == [("lookup", "")] * 3
    assert [a.splitlines() for a in shell.ns["answers"]] == [
        [f"echo (3 messages): How many in {r}?", "tool results: lookup → 0"]
        for r in ("north", "south", "east")]
    from subchat_magics.session import default_session

    tree = default_session().tree
    assert [m.role for m in tree.get("root/regions/0").messages] == [
        "user", "assistant", "tool", "assistant"]
    again = shell.ok("%%subchat root --each regions --tools lookup --yes --as again\n"
                     "How many in {item}?")
    assert shell.ns["calls"] == [("lookup", "")] * 3  # nothing sent again, no call run again
    assert shell.ns["again"] == shell.ns["answers"], again


def test_a_batch_row_cut_in_its_tool_loop_is_counted_not_done_in_the_cell_tree_and_show(
        shell, workdir):
    """Ctrl-C while a row's tool runs: the row's first reply (the call) is complete but
    the row has no answer: the cell counts it interrupted, and the tree and show count it
    not done (they read a tool row by its loop's last message, as a rerun does)."""
    shell.ok(SLOW_SECOND_CALL + 'qs = ["a", "b", "c", "d"]')
    result, cap = shell.run("%%subchat root --each qs --tools slow --yes --concurrency 1\n{item}")
    assert "interrupted: 3 row(s) not done" in str(result.error_in_exec)
    assert "4 items, 1 done, 0 failed, 1 interrupted" in cap.stdout, cap.stdout
    assert "qs  [1/4 done, 1 interrupted]" in shell.ok("%subchat tree --text")
    assert "batch of 4 rows: 1/4 done, 1 interrupted" in shell.ok("%subchat show root/qs")
    out = shell.ok("%%subchat root --each qs --tools slow --yes\n{item}")
    assert "4 items, 4 done (1 reused)" in out
    assert "qs  [4/4 done]" in shell.ok("%subchat tree --text")


def test_a_batch_asks_once_per_tool_and_stops_rows_at_max_rounds(shell, workdir):
    from subchat_magics.session import default_session
    from subchat_magics.toolrun import Approver

    shell.ok(DEFS)
    asked: list[str] = []
    approver = Approver(ask=lambda prompt: asked.append(prompt) or "y")
    result = default_session().batch(
        "root", ["a", "b", "c", "d"], lambda item, i: f"About {item}", name="qs",
        backend="echo", tools=[shell.ns["lookup"], shell.ns["top"]], approve=approver,
        max_rounds=1).run()
    assert len(asked) == 1 and asked[0].startswith("run lookup(region='')")
    assert [c[0] for c in shell.ns["calls"]] == ["lookup"] * 4
    assert [r.status for r in result.rows] == ["failed"] * 4
    assert "stopped after 1 round(s) of tool calls" in result.rows[0].reason
