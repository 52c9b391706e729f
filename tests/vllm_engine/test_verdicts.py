"""--vote on the real vLLM engine with the tiny model: K samples are ONE engine request
with n=K (the driver's count of requests added shows it), a constraint's verdict is one
of its choices, and --each --vote 4 over 64 rows."""

from __future__ import annotations

import pytest

from subchat_magics.backends.vllm import slot
from subchat_magics.session import default_session

pytestmark = pytest.mark.vllm


def test_vote_8_is_one_engine_request_of_8_samples(vshell, engine):
    before = slot.active_engine().requests_added
    vshell.ok("%%subchat root/v --vote 8 -n 8 --var v\nSay something.")
    assert slot.active_engine().requests_added - before == 1
    tree = default_session().tree
    kids = tree.children(tree.get("root/v"))
    assert len(kids) == 8
    texts = [c.messages[1].content for c in kids]
    assert len(set(texts)) > 1  # sampled at 0.7 (unseeded draws): they differ
    prov = tree.get("root/v").messages[1].provenance["vote"]
    assert prov["k"] == 8 and vshell.ns["v"] == prov["answer"]


def test_a_constrained_vote_gives_one_of_the_choices(vshell, engine):
    before = slot.active_engine().requests_added
    vshell.ok("%%subchat root/c --vote 6 --choice red,green,blue --no-think --var v\nA colour?")
    assert slot.active_engine().requests_added - before == 1
    assert vshell.ns["v"] in ("red", "green", "blue")


def test_each_vote_4_over_64_rows(vshell, engine):
    vshell.ns["qs"] = [f"question {i}" for i in range(64)]
    before = slot.active_engine().requests_added
    out = vshell.ok("%%subchat root --each qs --vote 4 -n 6 --as t\n{item}?")
    assert "64 done" in out, out
    assert slot.active_engine().requests_added - before == 64
    t = vshell.ns["t"]
    # a DataFrame once pandas is imported (by an earlier test too), else a list of dicts
    rows = t.to_dict("records") if hasattr(t, "to_dict") else t
    assert len(rows) == 64 and all(len(row["answers"]) == 4 for row in rows)


def test_a_seeded_vote_batch_beyond_the_token_budget_runs_on_the_cpu_engine(vshell, engine):
    """512 seeded samples of 40-token prompts: more prompt tokens than one engine step
    takes. With chunked prefill, vLLM would cut a seeded prefill and rewind its generator,
    which a CPU torch.Generator cannot do ('CPU Generator does not use offset'): the CPU
    load turns chunked prefill off, so the seeds are sent and the batch runs."""
    assert engine.seeds
    vshell.ns["qs"] = [f"question {i}: " + "tell me about the colour of the sky " * 4
                       for i in range(128)]
    out = vshell.ok("%%subchat root --each qs --vote 4 -n 2 --seed 1 --as t\n{item}?")
    assert "128 done" in out, out
    tree = default_session().tree
    sample = tree.get("root/qs/5/3").messages[1]
    assert sample.provenance.get("seed") == 3 and not sample.provenance.get("notes")


def test_estimate_counts_prompt_tokens_with_the_engines_tokenizer(vshell, engine):
    """On vLLM the prompt tokens --estimate counts are those the engine then gets (the
    chat template and tokenizer), and the KV budget is the loaded engine's."""
    vshell.ns["qs"] = [f"question {i} " * (i + 1) for i in range(12)]
    out = vshell.ok("%%subchat root --each qs --estimate --sample 4 -n 4 --as e\n{item}?")
    e = vshell.ns["e"]
    assert e.exact and "counted with the model's tokenizer" in out, out
    assert e.kv["kv_tokens"] == engine.kv_tokens > 0
    assert f"rows in flight at max_model_len {engine.max_model_len}" in out
    assert e.sample_rows == 4 and e.left == 8
    vshell.ok("%%subchat root --each qs -n 4\n{item}?")
    tree = default_session().tree
    stored = sum(tree.get(f"root/qs/{i}").messages[1].provenance["prompt_tokens"]
                 for i in range(12))
    assert e.prompt_tokens == stored
