"""Issue 26 on the real engine: the tiny model in a fake ``/kaggle/input``
(``SUBCHAT_KAGGLE_INPUT``) is listed and loaded by its number or a part of its name; the
plan printed before a load matches the KV cache the engine then reports; a length that
cannot fit, a block size the attention backend refuses and a value of the wrong type
are refused before the loaded model is let go."""

from __future__ import annotations

import json
import re

import pytest

from subchat_magics.backends import vllm as vb

from .test_precious import still_answers

pytestmark = pytest.mark.vllm


@pytest.fixture
def kaggle(workdir, tiny_model, monkeypatch):
    """Kaggle's layout: MODEL/FRAMEWORK/VARIATION/VERSION, the tiny model's folder linked in."""
    root = workdir / "input"
    version = root / "tiny-qwen3" / "transformers" / "default" / "1"
    version.parent.mkdir(parents=True)
    version.symlink_to(tiny_model, target_is_directory=True)
    lora = root / "my-lora" / "transformers" / "r8" / "1"
    lora.mkdir(parents=True)
    (lora / "adapter_config.json").write_text(json.dumps({"r": 8}))
    broken = root / "broken" / "transformers" / "x" / "2"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{not json")
    monkeypatch.setenv("SUBCHAT_KAGGLE_INPUT", str(root))
    monkeypatch.setenv("HF_HUB_CACHE", str(workdir / "hf"))
    return root


def test_the_load_prints_the_plan_first(first_load_output):
    lines = first_load_output.splitlines()
    memory = next(i for i, ln in enumerate(lines) if ln.startswith("memory in RAM: weights"))
    assert lines[memory + 1].startswith("KV cache: ") and "rows in flight at full length" in lines[memory + 1]
    assert memory < next(i for i, ln in enumerate(lines) if ln.startswith("Loading "))


def test_the_plan_matches_the_kv_cache_the_engine_reports(vshell, engine, tiny_model):
    out = vshell.ok(f"%load_vllm {tiny_model} --plan")
    assert out.startswith(f"Plan for {tiny_model.name} (nothing loaded):")
    planned = int(re.search(r"KV cache: ([\d,]+) tokens", out).group(1).replace(",", ""))
    reported = engine.llm.llm_engine.vllm_config.cache_config.kv_cache_size_tokens
    assert abs(planned - reported) <= 0.10 * reported, (planned, reported)
    assert vb.active_engine() is engine  # a plan loads nothing and unloads nothing


def test_load_vllm_lists_the_kaggle_inputs_and_loads_by_number(vshell, engine, kaggle, tiny_model):
    listing = vshell.ok("%load_vllm")
    assert "3. tiny-qwen3/default" in listing and "Qwen3ForCausalLM · unquantized" in listing
    assert "(config.json is not JSON)" in listing and "an adapter (LoRA), not a model" in listing
    out = vshell.ok("%load_vllm 3")
    assert f"Unloading {engine.label} first." in out
    assert "Loading tiny-qwen3/default with vLLM" in out
    loaded = vb.active_engine()
    assert loaded is not engine and loaded.model_path == str(tiny_model.resolve())
    vshell.ok("%%subchat --backend vllm --max-tokens 3\nhello")


def test_a_partial_name_plans_the_same_model_as_its_path(vshell, engine, kaggle):
    by_name = vshell.ok("%load_vllm tiny --plan")
    by_path = vshell.ok(f"%load_vllm {kaggle / 'tiny-qwen3' / 'transformers' / 'default' / '1'} --plan")
    assert by_name == by_path and by_name.startswith("Plan for tiny-qwen3/default")


def test_a_number_out_of_range_keeps_the_loaded_model(vshell, engine, kaggle):
    err = vshell.fails("%load_vllm 7")
    assert err == "%load_vllm 7: there are 3 model(s) in the list (1 to 3); %load_vllm without a path lists them"
    still_answers(vshell, engine)


def test_a_folder_without_weights_is_refused_and_keeps_the_loaded_model(vshell, engine, tiny_model,
                                                                       tmp_path):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model / "config.json").read_text())
    result, cap = vshell.run(f"%load_vllm {folder}")
    err = str(result.error_in_exec)
    assert err.startswith(f"%load_vllm: '{folder}' holds config.json but no weight files (.safetensors")
    assert "Unloading" not in cap.stdout
    still_answers(vshell, engine)


def test_a_length_that_cannot_fit_is_refused_before_the_model_is_let_go(vshell, engine, tiny_model):
    result, cap = vshell.run(f"%load_vllm {tiny_model} --engine-arg kv_cache_memory_bytes=1000000")
    err = str(result.error_in_exec)
    assert type(result.error_in_exec).__name__ == "UsageError" and "\n" not in err
    assert err.startswith("%load_vllm: max_model_len 5120 does not fit: the KV cache holds 1,920 tokens")
    assert "use --max-model-len 1920" in err
    assert "max_model_len 5120: does not fit, at most 1,920" in cap.stdout
    assert "Unloading" not in cap.stdout
    still_answers(vshell, engine)


@pytest.mark.parametrize("engine_arg, says", [
    ("block_size=7", "block_size 7: the CPU_ATTN attention backend vLLM uses here takes block sizes "
                     "multiples of 32"),
    ("max_num_seqs=abc", "max_num_seqs takes an integer (or None) (got 'abc')"),
    ("enforce_eager=maybe", "enforce_eager takes true or false (got 'maybe')"),
])
def test_engine_args_of_the_wrong_type_or_block_size_keep_the_loaded_model(vshell, engine, tiny_model,
                                                                          engine_arg, says):
    result, cap = vshell.run(f"%load_vllm {tiny_model} --engine-arg {engine_arg}")
    err = str(result.error_in_exec)
    assert type(result.error_in_exec).__name__ == "UsageError" and "\n" not in err
    assert err.startswith("%load_vllm: vLLM rejects these engine arguments: ") and says in err
    assert err.endswith("nothing was unloaded")
    assert "Unloading" not in cap.stdout
    still_answers(vshell, engine)


def test_engine_args_are_converted_to_the_declared_types(vshell, engine, tiny_model):
    vshell.ok(f"%load_vllm {tiny_model} --engine-arg max_num_seqs='\"8\"' --engine-arg block_size=64")
    loaded = vb.active_engine()
    assert loaded.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs == 8
    assert loaded.block_size == 64
