"""A batch's rows on the real engine (issue 20), the tiny random-weights model: a long
``--choice`` row keeps the parent's instructions (the reply room is what a choice can
use), a row that cannot fit with them fails saying so, and 500 ``--json`` rows with
string limits sampled at temperature 1.0 all validate."""

from __future__ import annotations

import pytest

from subchat_magics.session import default_session

pytestmark = pytest.mark.vllm

INSTRUCTIONS = "Classify each document: answer yes if it mentions a river, else no."


def test_a_long_choice_row_keeps_its_instructions_and_one_too_long_fails(vshell, engine):
    limit = engine.builder.max_model_len
    vshell.ok(f"%%subchat root/task -n 5\n{INSTRUCTIONS}")
    vshell.ok("%config SubchatMagics.max_value_chars = 0")
    context = default_session().tree.context("root/task", "x")[:-1]
    # a document that leaves ~100 tokens of the window: 1,000 reply tokens reserved would
    # have dropped the instructions; "yes"/"no" need a few
    unit = "the river "
    per = engine.builder.count([{"role": "user", "content": unit * 100}]) / 100
    fits = unit * int((limit - 100 - engine.builder.count(context)) / per)
    vshell.ns["docs"] = ["a short one", fits, unit * int(limit / per * 1.2)]
    out = vshell.ok("%%subchat root/task --each docs --choice yes,no --as labels\n{item}")
    assert "3 items, 2 done, 1 failed" in out
    assert "1 row(s) failed as too long to answer with its context" in out
    assert shell_labels(vshell)[:2] == [True, True] and vshell.ns["labels"][2] is None
    tree = default_session().tree
    reply = tree.get("root/task/docs/1").messages[1]
    whole = context + [{"role": "user", "content": fits}]
    assert reply.provenance["prompt_tokens"] == engine.builder.count(whole)  # nothing dropped
    assert not reply.provenance.get("notes") and not reply.provenance.get("dropped_messages")
    failed = tree.get("root/task/docs/2").messages[1]
    assert failed.status == "error" and "no context was dropped" in failed.provenance["error"]


def shell_labels(vshell):
    return [v in ("yes", "no") for v in vshell.ns["labels"]]


def test_five_hundred_sampled_json_rows_with_string_limits_all_validate(vshell):
    vshell.ns["schema"] = {
        "type": "object", "additionalProperties": False, "required": ["label", "why", "tag"],
        "properties": {"label": {"enum": ["positive", "negative", "neutral"]},
                       "why": {"type": "string", "maxLength": 24},
                       "tag": {"type": "string", "minLength": 2, "maxLength": 6}}}
    vshell.ns["reviews"] = [f"review number {i}: it was fine" for i in range(500)]
    out = vshell.ok("%%subchat root --each reviews --json=schema -t 1.0 -n 120 --as out\n"
                    "Label: {item}")
    bad = [(i, m.content, m.provenance.get("finish_reason"))
           for i, m in enumerate(default_session().tree.get(f"root/reviews/{k}").messages[1]
                                 for k in range(500)) if m.status != "complete"]
    # The tiny random model at temperature 1.0 now and then ends a string on bytes the grammar
    # passes but that are not UTF-8 (they decode to U+FFFD, one per byte, so the string is
    # longer than the schema allows): the check after the engine catches them and the row is
    # failed, said out loud. Every other row validates.
    undecodable = [b for b in bad if "\ufffd" in b[1]]
    assert len(undecodable) <= 2 and len(bad) == len(undecodable), (out, bad[:5])
    assert f"500 items, {500 - len(bad)} done, {len(bad)} failed" in out, (out, bad[:5])
    assert all("invalid output" in str(b[2]) for b in undecodable)
    assert all(isinstance(v, dict) and len(v["why"]) <= 24 and 2 <= len(v["tag"]) <= 6
               for v in vshell.ns["out"] if v is not None)
    assert sum(v is not None for v in vshell.ns["out"]) == 500 - len(bad)
