"""The GPU-only decisions of ``%load_vllm``, as pure functions, with the values that
Kaggle's 2xT4 reports (2 devices, compute capability 7.5). No vLLM needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from subchat_magics.backends.vllm import (
    LoadSettings,
    check_model_path,
    dtype_for,
    model_label,
    needs_spawn,
    parse_engine_arg,
    plan_load,
    quantization_for,
    tensor_parallel_size,
)
from subchat_magics.errors import InvalidInput

T4_PAIR = [(7, 5), (7, 5)]
KAGGLE_MODEL = Path("/kaggle/input/qwen-3/transformers/14b-awq/1")
# the parts of Qwen3-14B-AWQ's config.json that matter here
QWEN3_14B_AWQ = {
    "architectures": ["Qwen3ForCausalLM"], "max_position_embeddings": 40960,
    "torch_dtype": "float16",
    "quantization_config": {"bits": 4, "group_size": 128, "quant_method": "awq", "version": "gemm"},
}


def test_tensor_parallel_spans_every_visible_gpu_and_is_one_on_cpu():
    assert tensor_parallel_size(2) == 2
    assert tensor_parallel_size(1) == 1
    assert tensor_parallel_size(0) == 1


def test_dtype_is_half_below_compute_capability_8_else_auto():
    assert dtype_for(T4_PAIR) == "half"
    assert dtype_for([(7, 0)]) == "half"  # V100
    assert dtype_for([(8, 0)]) == "auto"  # A100
    assert dtype_for([(9, 0), (7, 5)]) == "half"  # the weakest card decides
    assert dtype_for([]) == "auto"  # CPU


def test_workers_are_spawned_when_tensor_parallel():
    assert needs_spawn(2) is True
    assert needs_spawn(1) is False


def test_quantization_comes_from_the_config_unless_a_flag_says():
    assert quantization_for(QWEN3_14B_AWQ, None) == (None, "awq")  # vLLM reads it itself
    assert quantization_for(QWEN3_14B_AWQ, "awq") == ("awq", "awq")
    assert quantization_for({}, None) == (None, None)
    assert quantization_for({"text_config": {"quantization_config": {"quant_method": "gptq"}}}, None) \
        == (None, "gptq")


def test_the_kaggle_t4_pair_gets_the_kaggle_recipe():
    plan = plan_load(LoadSettings(str(KAGGLE_MODEL)), QWEN3_14B_AWQ, KAGGLE_MODEL, 2, T4_PAIR)
    assert plan.kwargs == {
        "model": str(KAGGLE_MODEL), "tensor_parallel_size": 2, "gpu_memory_utilization": 0.91,
        "dtype": "half", "enforce_eager": True, "max_model_len": 5120,
        "enable_prefix_caching": True, "trust_remote_code": True, "disable_log_stats": True,
    }
    assert plan.spawn is True
    assert plan.quantization_label == "awq"
    assert plan.label == "qwen-3/14b-awq"


def test_flags_and_engine_args_override_the_recipe():
    s = LoadSettings(str(KAGGLE_MODEL), tensor_parallel_size=1, gpu_memory_utilization=0.8,
                     dtype="float16", max_model_len=8192, enforce_eager=False,
                     enable_prefix_caching=False, quantization="awq",
                     engine_args={"swap_space": 4, "disable_custom_all_reduce": True})
    k = plan_load(s, QWEN3_14B_AWQ, KAGGLE_MODEL, 2, T4_PAIR).kwargs
    assert (k["tensor_parallel_size"], k["gpu_memory_utilization"], k["dtype"]) == (1, 0.8, "float16")
    assert (k["max_model_len"], k["enforce_eager"], k["enable_prefix_caching"]) == (8192, False, False)
    assert (k["quantization"], k["swap_space"], k["disable_custom_all_reduce"]) == ("awq", 4, True)


def test_a_model_shorter_than_the_default_window_gets_its_own_maximum():
    plan = plan_load(LoadSettings("m"), {"max_position_embeddings": 2048}, Path("m"), 0, [])
    assert plan.kwargs["max_model_len"] == 2048
    with pytest.raises(InvalidInput, match="use --max-model-len 2048 or less"):
        plan_load(LoadSettings("m", max_model_len=4096), {"max_position_embeddings": 2048}, Path("m"), 0, [])


def test_more_shards_than_gpus_is_refused():
    with pytest.raises(InvalidInput, match="only 2 CUDA device"):
        plan_load(LoadSettings("m", tensor_parallel_size=4), QWEN3_14B_AWQ, Path("m"), 2, T4_PAIR)


def test_cpu_gets_one_shard_and_the_models_dtype():
    k = plan_load(LoadSettings("m"), QWEN3_14B_AWQ, Path("m"), 0, []).kwargs
    assert (k["tensor_parallel_size"], k["dtype"]) == (1, "auto")


def test_model_path_must_be_a_folder_with_a_config(tmp_path):
    with pytest.raises(InvalidInput, match="no such folder"):
        check_model_path(tmp_path / "missing")
    with pytest.raises(InvalidInput, match="holds no config.json"):
        check_model_path(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(InvalidInput, match="not a model config"):
        check_model_path(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_14B_AWQ))
    path, config = check_model_path(str(tmp_path))
    assert path == tmp_path.resolve() and config["quantization_config"]["quant_method"] == "awq"


def test_model_labels_are_short():
    assert model_label("/kaggle/input/qwen-3/transformers/14b-awq/1") == "qwen-3/14b-awq"
    assert model_label("/models/Qwen3-0.6B") == "Qwen3-0.6B"
    assert model_label("/cache/tiny-qwen3-v2/") == "tiny-qwen3-v2"


def test_engine_args_are_read_as_json_where_they_parse():
    assert parse_engine_arg("swap_space=4") == ("swap_space", 4)
    assert parse_engine_arg("kv-cache-dtype=fp8") == ("kv_cache_dtype", "fp8")
    assert parse_engine_arg("disable_custom_all_reduce=true") == ("disable_custom_all_reduce", True)
    assert parse_engine_arg("seed=None") == ("seed", None)
    assert parse_engine_arg('limit_mm_per_prompt={"image": 0}') == ("limit_mm_per_prompt", {"image": 0})
    with pytest.raises(InvalidInput, match="KEY=VALUE"):
        parse_engine_arg("swap_space")


def test_loading_the_extension_imports_neither_vllm_nor_torch():
    code = (
        "import sys\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "ip = InteractiveShell.instance()\n"
        "ip.run_cell('%load_ext subchat_magics')\n"
        "import subchat_magics.backends.vllm, subchat_magics.vllm_magics, subchat_magics.prompting\n"
        "from subchat_magics.backends.registry import registry\n"
        "assert not registry().availability('vllm').ok\n"
        "assert 'load_vllm' in ip.magics_manager.magics['line']\n"
        "print(sorted(m for m in ('vllm', 'torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_load_vllm_without_vllm_installed_says_how_to_install_it(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    code = (
        "import sys\n"
        "sys.modules['vllm'] = None  # as if it were not installed\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "ip = InteractiveShell.instance()\n"
        "ip.run_cell('%load_ext subchat_magics')\n"
        f"r = ip.run_cell('%load_vllm {tmp_path}')\n"
        "print(type(r.error_in_exec).__name__, r.error_in_exec)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("UsageError %load_vllm: vLLM is not installed here")
    assert "pip install 'subchat-magics[vllm]'" in out.stdout
