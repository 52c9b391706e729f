"""Replies from the real vLLM engine through ``%%subchat``: streaming, Ctrl-C, fan-out,
fitting the window, prefix reuse. The tiny model's replies are gibberish; what is
checked is the plumbing."""

from __future__ import annotations

import _thread
import threading

import pytest

from subchat_magics.backends.base import GenerationOptions
from subchat_magics.backends.registry import registry
from subchat_magics.session import default_session

pytestmark = pytest.mark.vllm


def last_reply(path: str):
    chat = default_session().tree.get(path)
    return [m for m in chat.messages if m.role == "assistant"][-1]


def test_load_vllm_uses_the_kaggle_defaults_adapted_to_cpu(vshell, first_load_output, engine,
                                                           tiny_model):
    out = first_load_output
    label = tiny_model.name
    assert f"Loading {label} with vLLM" in out
    summary = [line for line in out.splitlines() if line.startswith("vLLM ready:")]
    assert len(summary) == 1
    assert f"{label} · dtype " in summary[0]
    assert "· TP 1 · max length 5120 ·" in summary[0]
    assert "prefix caching on" in summary[0] and "loaded in" in summary[0]
    cfg = engine.llm.llm_engine.vllm_config
    assert cfg.model_config.max_model_len == 5120
    assert cfg.model_config.enforce_eager is True
    assert cfg.cache_config.enable_prefix_caching is True
    assert cfg.parallel_config.tensor_parallel_size == 1
    assert cfg.model_config.trust_remote_code is True
    status = vshell.ok("%subchat status")
    assert "backend:  vllm" in status


def test_reply_streams_several_deltas_before_it_ends(vshell):
    events: list[str] = []
    unsubscribe = default_session().tree.subscribe(lambda ev, data: events.append(ev))
    try:
        vshell.ok("%%subchat root --max-tokens 40\nTell me about the river that flows north.")
    finally:
        unsubscribe()
    assert events.count("reply-delta") >= 5
    assert events.index("reply-end") > max(i for i, e in enumerate(events) if e == "reply-delta")
    reply = last_reply("root")
    assert reply.status == "complete" and reply.content
    p = reply.provenance
    assert p["backend"] == "vllm" and p["model"].startswith("tiny-qwen3-")
    assert p["completion_tokens"] == 40 and p["finish_reason"] == "length"
    assert p["prompt_tokens"] > 10 and p["ttft_s"] > 0


def test_ctrl_c_aborts_the_request_and_keeps_the_partial_reply(vshell, engine):
    deltas = []

    def on_event(ev, data):
        if ev == "reply-delta":
            deltas.append(data["delta"])
            if len(deltas) == 5:  # mid-stream, from another thread, as a kernel interrupt is
                threading.Timer(0.01, _thread.interrupt_main).start()

    unsubscribe = default_session().tree.subscribe(on_event)
    try:
        result, _ = vshell.run("%%subchat root --max-tokens 3000\nWrite a very long story about the sea.")
    finally:
        unsubscribe()
    assert str(result.error_in_exec) == "%%subchat: interrupted: the partial reply is kept in root"
    assert engine.unfinished_requests() == 0
    reply = last_reply("root")
    assert reply.status == "interrupted"
    assert reply.provenance["finish_reason"] == "interrupted"
    assert reply.content and reply.content.startswith("".join(deltas[:5]))
    assert len(deltas) < 3000
    # the engine is fine afterwards
    vshell.ok("%%subchat root --max-tokens 5\nStill there?")
    assert last_reply("root").status == "complete"


def test_closing_a_stream_aborts_its_request_at_once(vshell, engine):
    backend = registry().get("vllm")
    stream = backend.stream([{"role": "user", "content": "Count to a thousand."}],
                            GenerationOptions(max_tokens=3000))
    got = [next(stream) for _ in range(3)]
    assert all(isinstance(d, str) for d in got)
    assert engine.unfinished_requests() == 1
    stream.close()
    assert engine.unfinished_requests() == 0


def test_fanout_sends_the_siblings_to_the_engine_together(vshell, engine):
    vshell.ok("%%subchat root --max-tokens 5\nName a colour.")
    in_flight: list[int] = []

    def on_event(ev, data):
        if ev == "reply-delta" and not in_flight:
            in_flight.append(engine.unfinished_requests())

    unsubscribe = default_session().tree.subscribe(on_event)
    try:
        out = vshell.ok("%%subchat root --fanout 3 --max-tokens 120 --var answers\nAnother one?")
    finally:
        unsubscribe()
    assert in_flight == [3]  # all three were in the engine at the first token: one batch
    tree = default_session().tree
    assert [c.path for c in tree.children("root")] == ["root/1", "root/2", "root/3"]
    for path in ("root/1", "root/2", "root/3"):
        reply = last_reply(path)
        assert reply.status == "complete" and reply.provenance["backend"] == "vllm"
        assert reply.provenance["completion_tokens"] <= 120
        assert path in out
    answers = vshell.ns["answers"]
    assert len(answers) == 3 and len(set(answers)) == 3  # sampled with seeds 1, 2, 3
    assert engine.unfinished_requests() == 0


def test_closing_a_batch_aborts_every_request_in_it(vshell, engine):
    backend = registry().get("vllm")
    batch = backend.stream_batch([([{"role": "user", "content": f"Story {i}"}],
                                   GenerationOptions(max_tokens=3000)) for i in range(4)])
    for _ in range(8):
        next(batch)
    assert engine.unfinished_requests() == 4
    batch.close()
    assert engine.unfinished_requests() == 0


def test_a_long_chat_drops_its_oldest_turns_to_fit_the_window(vshell, engine):
    # three turns of ~1,600 tokens fill most of the 5,120-token window
    long = "the river " * 800
    vshell.ok('%%subchat root --system "Answer briefly." --max-tokens 5\n' + long)
    for i in range(2):
        vshell.ok(f"%%subchat root --max-tokens 5\n{i} {long}")
    context = default_session().tree.context("root", "And the sea?")
    assert engine.builder.count(context) + 400 > 5120
    out = vshell.ok("%%subchat root --max-tokens 400\nAnd the sea?")
    assert "note: dropped the 1 oldest turn (2 messages) to fit max_model_len 5120" in out
    p = last_reply("root").provenance
    assert p["dropped_messages"] == 2
    assert p["notes"] == ["dropped the 1 oldest turn (2 messages) to fit max_model_len 5120"]
    kept = [context[0]] + context[3:]  # the system prompt stays
    assert p["prompt_tokens"] == engine.builder.count(kept)
    assert p["completion_tokens"] == 400  # the dropped turn made room for all of it


def test_a_message_too_long_for_the_window_is_a_clear_error(vshell, engine):
    err = vshell.fails("%%subchat root\n" + "the river " * 3000)
    assert "%%subchat" in err and "too long" in err and "--max-model-len" in err
    assert "VLLMValidationError" not in err
    assert engine.unfinished_requests() == 0


def test_a_child_chat_reuses_the_cached_tokens_of_its_parents_last_request(vshell, engine):
    # a parent context longer than two CPU cache blocks (128 tokens), and an answer that
    # crosses a block boundary, so that only an as-it-ran prompt caches all of it
    vshell.ok('%%subchat root --system "You are a geographer." --max-tokens 120\n'
              + "Describe the mountain, the river and the city to the north. " * 30)
    parent = last_reply("root").provenance
    ran = parent["prompt_tokens"] + parent["completion_tokens"]
    assert ran >= 300
    vshell.ok("%%subchat root/child --max-tokens 5\nAnd to the south?")
    child = last_reply("root/child").provenance
    block = engine.block_size
    # everything the parent's request ran, up to its last token (never fed back), in
    # whole blocks; a naive re-render would stop before the parent's answer
    assert child["cached_tokens"] >= (ran - 1) // block * block > parent["prompt_tokens"] // block * block
    # a sibling gets the same, and %subchat show reports it
    vshell.ok("%%subchat root/sibling --max-tokens 5\nAnd to the east?")
    assert last_reply("root/sibling").provenance["cached_tokens"] == child["cached_tokens"]
    shown = vshell.ok("%subchat show root/child -p")
    assert f"{child['cached_tokens']} cached" in shown


def test_thinking_renders_the_prompt_without_the_empty_think_block(vshell, engine):
    msgs = [{"role": "user", "content": "Why is the sea blue?"}]
    off = engine.builder.build(msgs, 10).token_ids
    on = engine.builder.build(msgs, 10, think=True).token_ids
    tok = engine.llm.get_tokenizer()
    assert tok.decode(off).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.decode(on).endswith("<|im_start|>assistant\n")
    vshell.ok("%%subchat root --think --max-tokens 5\nWhy is the sea blue?")
    assert last_reply("root").provenance["prompt_tokens"] == len(on)


def test_no_think_overrides_a_model_loaded_with_think(vshell, engine):
    msgs = [{"role": "user", "content": "Why is the grass green?"}]
    off = engine.builder.build(msgs, 10).token_ids
    on = engine.builder.build(msgs, 10, think=True).token_ids
    engine.think = True  # as %load_vllm --think leaves it
    try:
        vshell.ok("%%subchat root/grass-on --max-tokens 5\nWhy is the grass green?")
        assert last_reply("root/grass-on").provenance["prompt_tokens"] >= len(on)
        vshell.ok("%%subchat root/grass-off --no-think --max-tokens 5\nWhy is the grass green?")
        on_tokens = last_reply("root/grass-on").provenance["prompt_tokens"]
        off_tokens = last_reply("root/grass-off").provenance["prompt_tokens"]
        assert off_tokens - on_tokens == len(off) - len(on)  # the empty think block is back
    finally:
        engine.think = False


def test_replies_started_from_two_threads_share_the_engine(vshell, engine):
    # as a cell and the widget would: each consumer on its own thread, one engine
    backend = registry().get("vllm")
    texts: dict[int, str] = {}
    in_flight: list[int] = []
    started = threading.Barrier(2)

    def reply(i: int) -> None:
        stream = backend.stream([{"role": "user", "content": f"Thread {i} asks about the sea."}],
                                GenerationOptions(max_tokens=300))
        parts = [next(stream)]
        started.wait(timeout=30)
        if i == 0:
            in_flight.append(engine.unfinished_requests())
        parts += [d for d in stream if isinstance(d, str)]
        texts[i] = "".join(parts)

    threads = [threading.Thread(target=reply, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert in_flight == [2]
    assert set(texts) == {0, 1} and all(texts.values())
    assert engine.unfinished_requests() == 0
