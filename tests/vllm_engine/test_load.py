"""``%load_vllm`` / ``%unload_vllm`` on the real engine: bad input stops before any
engine work, unloading frees the engine for real, a hand-built ``vllm.LLM`` can be
registered, and another model loads in the same kernel."""

from __future__ import annotations

import gc
import weakref

import pytest

from subchat_magics.backends import vllm as vb
from subchat_magics.session import default_session

pytestmark = pytest.mark.vllm


def last_reply(path: str):
    chat = default_session().tree.get(path)
    return [m for m in chat.messages if m.role == "assistant"][-1]


@pytest.mark.parametrize("line, expected", [
    ("/no/such/model", "no such folder '/no/such/model'"),
    ("{tmp}", "holds no config.json"),
    ("{model} --tp 0", "--tp must be 1 or more"),
    ("{model} --gpu-memory-utilization 1.5", "--gpu-memory-utilization must be in (0, 1]"),
    ("{model} --max-model-len 4", "--max-model-len must be at least 16"),
    ("{model} --max-model-len 100000", "exceeds the model's max_position_embeddings (8192)"),
    ("{model} --dtype fp7", "invalid choice: 'fp7'"),
    ("{model} --tp two", "invalid int value: 'two'"),
    ("{model} --engine-arg swap_space", "--engine-arg takes KEY=VALUE"),
    ("{model} --engine-arg no_such_option=1", "unknown engine argument(s) no_such_option"),
    ("{model} --bogus", "unrecognized arguments: --bogus"),
    ("{model} --unload", "--unload takes no MODEL_PATH"),
])
def test_bad_load_vllm_input_is_a_usage_error_and_keeps_the_loaded_model(vshell, engine, tiny_model,
                                                                          tmp_path, line, expected):
    line = line.format(model=tiny_model, tmp=tmp_path)
    err = vshell.fails(f"%load_vllm {line}")
    assert err.startswith("%load_vllm")
    assert expected in err
    assert vb.active_engine() is engine  # nothing was unloaded


def test_load_vllm_help_lists_every_flag(vshell):
    doc = vshell.ip.find_line_magic("load_vllm").__doc__
    for flag in ("--tp", "--gpu-memory-utilization", "--dtype", "--max-model-len", "--no-enforce-eager",
                 "--no-prefix-caching", "--quantization", "--think", "--engine-arg", "--plan", "--unload"):
        assert flag in doc


def test_unload_frees_the_engine_and_a_hand_built_llm_can_be_registered(vshell, engine, tiny_model):
    ref = weakref.ref(engine.llm)
    del engine
    out = vshell.ok("%unload_vllm")
    assert f"Unloaded {tiny_model.name}." in out
    gc.collect()
    assert ref() is None  # the LLM is gone, not just forgotten
    assert vb.active_engine() is None
    assert "No vLLM model is loaded." in vshell.ok("%load_vllm --unload")
    err = vshell.fails("%%subchat root --backend vllm\nHello?")
    assert "no vLLM model is loaded" in err and "%load_vllm" in err

    # the seed notebook's way: build the LLM in a cell, then register it
    vshell.ok(
        "import vllm\n"
        f"llm = vllm.LLM({str(tiny_model)!r}, enforce_eager=True, max_model_len=1024, "
        "dtype='float32', disable_log_stats=True)\n"
        "import subchat_magics\n"
        "subchat_magics.register_vllm(llm)\n"
    )
    registered = vb.active_engine()
    assert registered.llm is vshell.ns["llm"] and registered.max_model_len == 1024
    vshell.ok("%%subchat root --max-tokens 8\nHello?")
    p = last_reply("root").provenance
    assert p["backend"] == "vllm" and p["completion_tokens"] == 8
    vshell.ok("from subchat_magics import VLLMClient\nVLLMClient.set_model(llm)")
    assert vb.active_engine() is registered  # the same engine, not a second driver
    assert vb.VLLMClient.get_model() is vshell.ns["llm"]

    # another model (here: the same folder, other settings) loads in the same kernel
    out = vshell.ok(f"%load_vllm {tiny_model} --max-model-len 2048 --dtype float32 --no-prefix-caching")
    assert f"Unloading {tiny_model.name} first." in out
    assert "dtype float32 · TP 1 · max length 2048 · prefix caching off" in out
    assert vshell.ns["llm"].llm_engine.engine_core is not None
    reloaded = vb.active_engine()
    assert reloaded.owned and reloaded.max_model_len == 2048
    vshell.ok("%%subchat root --max-tokens 8\nAnd now?")
    assert last_reply("root").provenance["completion_tokens"] == 8


def test_a_failed_engine_is_a_clear_error_and_loading_again_fixes_it(vshell, engine, tiny_model):
    engine.llm.llm_engine.engine_core.shutdown()  # the engine dies under us
    err = vshell.fails("%%subchat root --backend vllm --max-tokens 5\nHello?")
    assert "the vLLM engine failed" in err and "reload the model with %load_vllm" in err
    reply = last_reply("root")
    assert reply.status == "error" and reply.provenance["backend"] == "vllm"
    status = vshell.ok("%subchat status")
    assert "passed over vllm: the engine of" in status  # auto does not pick it
    vshell.ok(f"%load_vllm {tiny_model}")
    vshell.ok("%%subchat root --backend vllm --max-tokens 5\nHello again?")
    assert last_reply("root").provenance["completion_tokens"] == 5
