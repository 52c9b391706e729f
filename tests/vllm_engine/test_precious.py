"""Issue 15 on the real engine: the loaded model is precious (no refused command costs
it, ``%reload_ext`` keeps it, a hand-registered ``LLM`` is never shut down unasked), and
every reply's provenance is complete (cut replies keep their counts, fan-out siblings
their temperature and seed, thinking says when the template cannot think, a too-long
chat says which part does not fit)."""

from __future__ import annotations

import _thread
import gc
import json
import logging
import shutil
import threading
import weakref
from pathlib import Path

import pytest

from subchat_magics.backends import vllm as vb
from subchat_magics.backends.base import GenerationOptions, cut_finish
from subchat_magics.backends.registry import registry
from subchat_magics.errors import InvalidInput
from subchat_magics.prompting import CHATML_TEMPLATE
from subchat_magics.session import default_session

pytestmark = pytest.mark.vllm


def last_reply(path: str):
    chat = default_session().tree.get(path)
    return [m for m in chat.messages if m.role == "assistant"][-1]


def still_answers(vshell, engine, path: str = "root") -> None:
    """The same engine object is loaded and answers a cell."""
    assert vb.active_engine() is engine
    vshell.ok(f"%%subchat {path} --backend vllm --max-tokens 4\nStill there?")
    reply = last_reply(path)
    assert reply.status == "complete" and reply.provenance["completion_tokens"] == 4


def model_copy(tiny_model: Path, dest: Path, *, chat_template: str | None = None,
               break_weights: bool = False) -> Path:
    """A copy of the tiny model folder (weights linked), with another chat template or
    damaged weights."""
    dest.mkdir()
    for f in tiny_model.iterdir():
        if f.suffix == ".safetensors" and not break_weights:
            (dest / f.name).symlink_to(f)
        elif f.suffix == ".safetensors":
            (dest / f.name).write_bytes(f.read_bytes()[:200])  # a truncated file
        elif f.is_file():
            shutil.copy(f, dest / f.name)
    if chat_template is not None:
        cfg = json.loads((dest / "tokenizer_config.json").read_text())
        cfg["chat_template"] = chat_template
        (dest / "tokenizer_config.json").write_text(json.dumps(cfg))
        (dest / "chat_template.jinja").unlink(missing_ok=True)
    return dest


# -- a refused command never costs the loaded model -----------------------------------------
@pytest.mark.parametrize("engine_arg, names", [
    ("max_num_seqs=-1", ["max_num_seqs"]),
    ("max_model_len=999999", ["max_model_len", "8192"]),
    ("kv_cache_dtype=fp7", ["cache_dtype", "fp7"]),
])
def test_engine_args_vllm_refuses_are_named_and_keep_the_loaded_model(vshell, engine, tiny_model,
                                                                      engine_arg, names):
    result, cap = vshell.run(f"%load_vllm {tiny_model} --engine-arg {engine_arg}")
    err = str(result.error_in_exec)
    assert type(result.error_in_exec).__name__ == "UsageError"
    assert err.startswith("%load_vllm: vLLM rejects these engine arguments") and "\n" not in err
    assert all(name in err for name in names)
    assert "Unloading" not in cap.stdout
    still_answers(vshell, engine)


def test_a_load_that_fails_on_the_weights_says_the_old_model_was_unloaded(vshell, engine, tiny_model,
                                                                          tmp_path):
    broken = model_copy(tiny_model, tmp_path / "broken", break_weights=True)
    result, cap = vshell.run(f"%load_vllm {broken}")
    err = str(result.error_in_exec)
    assert type(result.error_in_exec).__name__ == "UsageError" and "\n" not in err
    assert f"Unloading {tiny_model.name} first." in cap.stdout
    assert "vLLM could not load broken" in err
    assert f"{tiny_model.name} was unloaded to make room for it and is no longer loaded" in err
    assert vb.active_engine() is None


@pytest.mark.parametrize("make, why", [
    ("types.SimpleNamespace(llm_engine=None)", "not a vllm.LLM"),
    ("'my model'", "it is a str, not a vllm.LLM"),
])
def test_register_vllm_refuses_a_wrong_object_and_keeps_the_loaded_model(vshell, engine, make, why):
    result, _ = vshell.run(f"import types, subchat_magics\nsubchat_magics.register_vllm({make})")
    err = result.error_in_exec
    assert isinstance(err, InvalidInput)
    assert str(err).startswith("register_vllm takes a live vllm.LLM") and why in str(err)
    assert "\n" not in str(err)
    still_answers(vshell, engine)


def test_a_dead_llm_is_refused_and_a_live_one_replaces_the_loaded_model(vshell, engine, tiny_model):
    # a hand-built LLM, registered while the %load_vllm model is loaded: it replaces it
    vshell.ok(
        "import vllm, subchat_magics\n"
        f"llm = vllm.LLM({str(tiny_model)!r}, enforce_eager=True, max_model_len=1024, "
        "dtype='float32', disable_log_stats=True)\n"
        "subchat_magics.register_vllm(llm)\n"
    )
    registered = vb.active_engine()
    assert registered.llm is vshell.ns["llm"] and not registered.owned
    still_answers(vshell, registered)
    out = vshell.ok("%unload_vllm")  # the user asks: it is shut down, and says so
    assert "the engine of the vllm.LLM you registered is shut down" in out
    vshell.ok(f"%load_vllm {tiny_model}")
    loaded = vb.active_engine()
    result, _ = vshell.run("subchat_magics.register_vllm(llm)")
    err = result.error_in_exec
    assert isinstance(err, InvalidInput) and "its engine was shut down" in str(err)
    still_answers(vshell, loaded)


# -- the extension's lifetime is not the model's --------------------------------------------
def test_reload_ext_keeps_the_loaded_model(vshell, engine):
    vshell.ok("%reload_ext subchat_magics")
    assert not engine.driver.stopped
    still_answers(vshell, engine)


def test_unload_ext_frees_a_loaded_model(vshell, engine):
    ref = weakref.ref(engine.llm)
    del engine
    out = vshell.ok("%unload_ext subchat_magics")
    assert "Unloaded" in out
    assert vb.active_engine() is None
    gc.collect()
    assert ref() is None


def test_unload_ext_leaves_a_hand_registered_llm_running(vshell, tiny_model):
    vshell.ok(
        "import vllm, subchat_magics\n"
        f"llm = vllm.LLM({str(tiny_model)!r}, enforce_eager=True, max_model_len=1024, "
        "dtype='float32', disable_log_stats=True)\n"
        "subchat_magics.register_vllm(llm)\n"
    )
    out = vshell.ok("%unload_ext subchat_magics")
    assert "the vllm.LLM you registered is still running and yours" in out
    assert vb.active_engine() is None
    vshell.ok("out = llm.generate('Hello', vllm.SamplingParams(max_tokens=3), use_tqdm=False)")
    assert len(vshell.ns["out"][0].outputs[0].token_ids) == 3  # still the user's, and working
    vshell.ok("%load_ext subchat_magics\nsubchat_magics.register_vllm(llm)")
    still_answers(vshell, vb.active_engine())
    vshell.ok("%unload_vllm")


# -- complete provenance ----------------------------------------------------------------------
def test_a_closed_stream_keeps_the_counts_of_the_part_that_ran(vshell, engine):
    backend = registry().get("vllm")
    stream = backend.stream([{"role": "user", "content": "Count to a thousand."}],
                            GenerationOptions(max_tokens=3000, temperature=0.5, seed=7))
    got = [next(stream) for _ in range(3)]
    stream.close()
    f = cut_finish(stream)
    assert f is not None and f.reason == "interrupted"
    assert f.prompt_tokens > 5 and f.completion_tokens >= len(got) and f.cached_tokens is not None
    assert (f.extra["temperature"], f.extra["seed"]) == (0.5, 7)
    assert engine.unfinished_requests() == 0


def test_a_closed_batch_keeps_the_counts_of_every_request(vshell, engine):
    backend = registry().get("vllm")
    batch = backend.stream_batch([([{"role": "user", "content": f"Story {i}"}],
                                   GenerationOptions(max_tokens=3000, seed=i)) for i in range(3)])
    for _ in range(9):
        next(batch)
    batch.close()
    finishes = [cut_finish(batch, i) for i in range(3)]
    assert all(f is not None and f.prompt_tokens > 5 for f in finishes)
    assert [f.extra["seed"] for f in finishes] == [0, 1, 2]
    assert sum(f.completion_tokens for f in finishes) >= 9


def test_a_reply_cut_by_an_unload_keeps_its_counts(vshell, engine):
    backend = registry().get("vllm")
    stream = backend.stream([{"role": "user", "content": "A long tale."}], GenerationOptions(max_tokens=3000))
    got = [next(stream) for _ in range(3)]
    vb.unload()
    with pytest.raises(Exception, match="unloaded"):
        for _ in range(3000):
            next(stream)
    f = cut_finish(stream)
    assert f is not None and f.completion_tokens >= len(got) and f.prompt_tokens > 5



def test_a_reply_stopped_mid_stream_keeps_its_token_counts(vshell, engine):
    stop_after = []

    def on_event(ev, data):
        if ev == "reply-delta":
            stop_after.append(1)
            if len(stop_after) == 5:
                data["turn"].cancel()  # the widget's Stop

    unsubscribe = default_session().tree.subscribe(on_event)
    try:
        vshell.run("%%subchat root --max-tokens 3000\nWrite a very long story about the sea.")
    finally:
        unsubscribe()
    p = last_reply("root").provenance
    assert p["finish_reason"] == "interrupted"
    assert p["prompt_tokens"] > 5 and p["completion_tokens"] >= 5 and "cached_tokens" in p


def test_fanout_siblings_cut_by_ctrl_c_keep_their_token_counts(vshell, engine):
    deltas = []

    def on_event(ev, data):
        if ev == "reply-delta":
            deltas.append(1)
            if len(deltas) == 6:  # mid-stream, from another thread, as a kernel interrupt is
                threading.Timer(0.01, _thread.interrupt_main).start()

    unsubscribe = default_session().tree.subscribe(on_event)
    try:
        result, _ = vshell.run("%%subchat root --fanout 2 --max-tokens 3000\nA very long story.")
    finally:
        unsubscribe()
    assert str(result.error_in_exec) == ("%%subchat: interrupted: 2 partial replies kept in "
                                         "root/1, root/2")
    for i, path in enumerate(("root/1", "root/2"), start=1):
        p = last_reply(path).provenance
        assert p["finish_reason"] == "interrupted" and p["seed"] == i
        assert p["prompt_tokens"] > 5 and p["completion_tokens"] >= 1
    assert engine.unfinished_requests() == 0


def test_each_fanout_sibling_records_its_temperature_and_seed(vshell, engine):
    vshell.ok("%%subchat root --max-tokens 5\nName a colour.")
    vshell.ok("%%subchat root --fanout 3 --max-tokens 5\nAnother one?")
    for i, path in enumerate(("root/1", "root/2", "root/3"), start=1):
        p = last_reply(path).provenance
        assert (p["temperature"], p["seed"]) == (0.7, i)
    vshell.ok("%%subchat root --max-tokens 5 --temperature 0.2\nAnd one more?")
    p = last_reply("root").provenance
    assert p["temperature"] == 0.2 and "seed" not in p


def test_think_on_a_template_without_a_thinking_switch_says_so(vshell, tiny_model, tmp_path):
    plain = model_copy(tiny_model, tmp_path / "chatml", chat_template=CHATML_TEMPLATE)
    out = vshell.ok(f"%load_vllm {plain} --think")
    assert "no thinking switch in the chat template (--think changes nothing)" in out
    assert "thinking on" not in out
    out = vshell.ok("%%subchat root --max-tokens 4\nWhy is the sea blue?")
    assert "note: the chat template of chatml has no thinking switch" in out
    assert last_reply("root").provenance["thinking"] == "unsupported"


def test_thinking_is_in_the_provenance_where_the_template_can_think(vshell, engine):
    vshell.ok("%%subchat root --think --max-tokens 4\nWhy is the sea blue?")
    assert last_reply("root").provenance["thinking"] == "on"
    vshell.ok("%%subchat root --max-tokens 4\nAnd the sky?")
    assert last_reply("root").provenance["thinking"] == "off"


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self.lock = threading.Lock()

    def emit(self, record):
        with self.lock:
            self.messages.append(record.getMessage())


def test_a_too_long_message_is_ours_to_report_and_says_which_part(vshell, engine):
    records = _Records()
    log = logging.getLogger("transformers")
    log.addHandler(records)
    try:
        # longer than the tokenizer's model_max_length (8192): transformers would warn
        err = vshell.fails('%%subchat root --system "Be brief."\n' + "the river " * 5000)
    finally:
        log.removeHandler(records)
    assert not [m for m in records.messages if "Token indices sequence length" in m]
    tok = engine.builder.tokenizer
    assert not getattr(tok, "deprecation_warnings", {}).get(
        "sequence-length-is-longer-than-the-specified-maximum")
    assert "the message is too long" in err and "of which the system prompt is" in err
    err = vshell.fails('%%subchat root/sys --system "' + "the sea " * 3000 + '"\nHi')
    assert "the system prompt is too long for the model" in err and "--system" in err
    still_answers(vshell, engine)


def test_a_row_that_ended_just_before_ctrl_c_keeps_its_counts(vshell, engine):
    """A request whose last output was read but whose Finish was not handed out yet when
    the batch was closed (a Ctrl-C between the two) keeps its counts like any cut
    request: they were lost, and the row was stored cut with no token counts."""
    backend = registry().get("vllm")
    batch = backend.stream_batch([([{"role": "user", "content": f"Count {i}"}],
                                   GenerationOptions(max_tokens=2, temperature=0.0,
                                                     extra={"ignore_eos": True}))
                                  for i in range(4)])
    texts: dict[int, int] = {}
    for index, item in batch:
        if isinstance(item, str):
            texts[index] = texts.get(index, 0) + 1
            if texts[index] == 2:  # its second and last token: its Finish comes next
                break
    else:
        raise AssertionError("no request gave two pieces of text")
    batch.close()
    f = cut_finish(batch, index)
    assert f is not None and f.prompt_tokens > 3 and f.completion_tokens == 2
