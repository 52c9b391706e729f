"""Structured output on the real vLLM engine with the tiny random-weights model: the model
writes gibberish, so every valid reply is the engine's constraint at work."""

from __future__ import annotations

import pytest

from subchat_magics.session import default_session

pytestmark = pytest.mark.vllm

SCHEMA = {"type": "object",
          "properties": {"label": {"enum": ["positive", "negative", "neutral"]},
                         "sure": {"type": "boolean"}},
          "required": ["label", "sure"], "additionalProperties": False}


def _siblings(path: str = "root"):
    tree = default_session().tree
    return [tree.get(c.id).messages[-1] for c in tree.children(tree.get(path))]


def _fanout(vshell, options: str, n: int = 20) -> list:
    vshell.ok("%%subchat root\nstart")
    vshell.ok(f"%%subchat root --fanout {n} -t 1.0 -n 200 --var out {options}\n"
              "Label: 'what a film'")
    return vshell.ns["out"]


def test_the_engine_loads_with_compact_structured_outputs(engine):
    config = engine.llm.llm_engine.vllm_config.structured_outputs_config
    assert config.backend == "xgrammar" and config.disable_any_whitespace is True


def test_twenty_sampled_choices_are_each_one_of_the_choices(vshell):
    values = _fanout(vshell, "--choice positive,negative,neutral")
    assert len(values) == 20 and set(values) <= {"positive", "negative", "neutral"}
    replies = _siblings()
    assert all(m.status == "complete" and m.content in ("positive", "negative", "neutral")
               for m in replies)
    assert all(m.provenance["constraint"]["enforced"] for m in replies)
    assert len({m.provenance["seed"] for m in replies}) == 20  # sampled, not one reply copied


def test_twenty_sampled_replies_match_the_regex_in_full(vshell):
    values = _fanout(vshell, r"--regex '[A-Z]{2}-[0-9]{3}'")
    import re

    assert len(values) == 20
    assert all(v is not None and re.fullmatch(r"[A-Z]{2}-[0-9]{3}", v) for v in values)
    assert len(set(values)) > 1  # the sampler still chose: the grammar only masked


def test_twenty_sampled_json_replies_validate_against_the_schema(vshell):
    vshell.ns["schema"] = SCHEMA
    values = _fanout(vshell, "--json schema")
    assert len(values) == 20 and all(isinstance(v, dict) for v in values)
    assert all(v["label"] in ("positive", "negative", "neutral") and isinstance(v["sure"], bool)
               for v in values)
    assert all(m.status == "complete" for m in _siblings())


def test_a_single_cell_gets_its_parsed_value(vshell):
    vshell.ok("%%subchat root -t 1.0 --seed 3 --choice yes,no --var answer\nYes or no?")
    assert vshell.ns["answer"] in ("yes", "no")


def test_choice_with_too_few_tokens_for_the_longest_is_refused_before_sending(vshell, workdir):
    vshell.ok("%%subchat root\nstart")
    before = len(default_session().tree.get("root").messages)
    error = vshell.fails("%%subchat root -n 1 --choice 'extraordinarily positive,no'\nLabel.")
    assert "--max-tokens 1 is too few" in error and "on vllm" in error
    assert len(default_session().tree.get("root").messages) == before


def test_thinking_and_a_constraint_do_not_combine_unless_best_effort(vshell, workdir):
    vshell.ok("%%subchat root\nstart")
    before = len(default_session().tree.get("root").messages)
    error = vshell.fails("%%subchat root --think --choice yes,no\nYes?")
    assert "does not go with thinking" in error and "--best-effort" in error
    assert len(default_session().tree.get("root").messages) == before
    # best effort: sent free (the random model), the answer after the thinking validated
    vshell.ok("%%subchat root --think --best-effort --choice yes,no -n 8 --var v\nYes?")
    msg = default_session().tree.get("root").messages[-1]
    assert vshell.ns["v"] is None and msg.status == "error"
    assert msg.provenance["finish_reason"].startswith("error: invalid output (")
    assert msg.provenance["constraint"]["enforced"] is False
