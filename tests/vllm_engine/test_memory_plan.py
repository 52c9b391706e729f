"""Issue 26's plan before the load, as pure functions: Qwen3-14B-AWQ (its real
config.json, tests/data/qwen3-14b-awq) on Kaggle's 2xT4 (recorded nvidia-smi output),
checked against a calculation by hand; a max_model_len that cannot fit is refused with
the largest that does. No vLLM needed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from subchat_magics.backends.vllm import LoadSettings, plan_load
from subchat_magics.backends.vllm.gpus import machine_from_smi
from subchat_magics.backends.vllm.plan import (
    check_fits,
    estimate_weight_bytes,
    flags_line,
    memory_plan,
    model_shape,
)
from subchat_magics.errors import InvalidInput

DATA = Path(__file__).parent.parent / "data"
CONFIG = json.loads((DATA / "qwen3-14b-awq" / "config.json").read_text())
KAGGLE_MODEL = "/kaggle/input/qwen-3/transformers/14b-awq/1"


def t4_pair():
    m = machine_from_smi((DATA / "gpus" / "t4x2_driver580.csv").read_text(),
                         (DATA / "gpus" / "t4x2_driver580.txt").read_text())
    return m


# -- the hand calculation, written out once ---------------------------------------------------
T4_BYTES = 15360 * 2**20  # nvidia-smi: 15360 MiB
# Qwen3-14B: 40 layers; hidden 5120; 40 query heads and 8 KV heads of 128; MLP 17408; vocab 151936
ATTN = 5120 * 128 * (40 + 40 + 8 + 8)  # q, o, k, v
MLP = 3 * 5120 * 17408  # gate, up, down
LINEAR = 40 * (ATTN + MLP)  # 13,212,057,600 weights, AWQ 4-bit in groups of 128
AWQ = LINEAR * 4 / 8 + LINEAR / 128 * (2 + 4 / 8)  # packed weights + fp16 scale and 4-bit zero a group
PLAIN = 151936 * 5120 * 2 + 40 * (2 * 5120 + 2 * 128) + 5120  # embeddings, lm_head, norms (fp16)
WEIGHTS = int(AWQ + PLAIN * 2)
PER_GPU = math.ceil(WEIGHTS / 2)
ACTIVATIONS = 8192 * (2 * 5120 + (40 + 16) * 128 // 2 + 3 * 17408 // 2) * 2 + 256 * 151936 * 4
OVERHEAD = ACTIVATIONS + 512 * 2**20
KV_PER_TOKEN = 2 * 40 * (8 // 2) * 128 * 2  # K and V, 40 layers, 4 KV heads per GPU, fp16


def tokens_at(utilization: float) -> int:
    room = int(T4_BYTES * utilization) - PER_GPU - OVERHEAD
    return room // (KV_PER_TOKEN * 16) * 16  # whole blocks of 16


def test_qwen3_14b_awq_on_two_t4s_matches_the_hand_calculation():
    m = t4_pair()
    plan = plan_load(LoadSettings(KAGGLE_MODEL), CONFIG, Path(KAGGLE_MODEL), len(m.gpus), m.capabilities)
    mp = memory_plan(CONFIG, plan.kwargs, [g.total for g in m.gpus])
    assert WEIGHTS == 9_976_576_000  # ~9.98 GB
    assert mp.weights_per_device == PER_GPU and mp.weights_estimated
    assert mp.overhead_per_device == OVERHEAD
    assert mp.kv_bytes_per_token == KV_PER_TOKEN == 81_920
    assert mp.kv_tokens == tokens_at(0.91) == 101_568
    assert mp.rows_in_flight == 101_568 // 5120 == 19
    assert mp.fits and mp.largest_len == 40960  # the model's own limit binds first
    first, second = mp.lines()
    assert "memory per GPU (2 × 15.00 GiB, TP 2): weights 4.65 GiB (estimated from config.json)" in first
    assert "at gpu_memory_utilization 0.91" in first
    assert second.startswith("KV cache: 101,568 tokens (80 KiB a token per device); max_model_len 5120: "
                             "19 rows in flight at full length")
    flags = flags_line(plan.kwargs, plan.spawn)
    assert flags.startswith("flags: VLLM_WORKER_MULTIPROC_METHOD=spawn; tensor_parallel_size=2")
    assert "dtype='half'" in flags and "max_model_len=5120" in flags


def test_weights_on_disk_replace_the_estimate():
    m = t4_pair()
    kwargs = plan_load(LoadSettings(KAGGLE_MODEL), CONFIG, Path(KAGGLE_MODEL), 2, m.capabilities).kwargs
    on_disk = 9_960_000_000
    mp = memory_plan(CONFIG, kwargs, [g.total for g in m.gpus], weight_bytes=on_disk)
    assert mp.weights_per_device == on_disk // 2 and not mp.weights_estimated
    assert mp.kv_tokens > tokens_at(0.91)  # a little less weight, a little more room


def test_a_length_that_cannot_fit_is_refused_with_the_largest_that_does():
    m = t4_pair()
    settings = LoadSettings(KAGGLE_MODEL, gpu_memory_utilization=0.5, max_model_len=32768)
    kwargs = plan_load(settings, CONFIG, Path(KAGGLE_MODEL), 2, m.capabilities).kwargs
    mp = memory_plan(CONFIG, kwargs, [g.total for g in m.gpus])
    assert mp.kv_tokens == tokens_at(0.5) == 20_960
    assert mp.fits is False and mp.largest_len == 20_960 and mp.rows_in_flight == 0
    assert "max_model_len 32768: does not fit, at most 20,960" in mp.lines()[1]
    with pytest.raises(InvalidInput) as err:
        check_fits(mp)
    msg = str(err.value)
    assert msg.startswith("%load_vllm: max_model_len 32768 does not fit: the KV cache holds 20,960 tokens")
    assert "use --max-model-len 20960" in msg and "nothing was unloaded" in msg and "\n" not in msg


def test_weights_larger_than_the_gpus_leave_no_room():
    m = machine_from_smi((DATA / "gpus" / "p100.csv").read_text(), None)
    big = dict(CONFIG, quantization_config=None)  # the unquantized 14B: ~29.5 GB in fp16
    kwargs = plan_load(LoadSettings("x"), big, Path("/x"), 1, m.capabilities).kwargs
    mp = memory_plan(big, kwargs, [g.total for g in m.gpus])
    assert mp.kv_room_per_device == 0 and mp.kv_tokens == 0 and mp.largest_len == 0
    with pytest.raises(InvalidInput, match="free memory or use a smaller model"):
        check_fits(mp)


def test_the_unquantized_estimate_counts_every_weight_in_16_bits():
    shape = model_shape(dict(CONFIG, quantization_config=None))
    assert estimate_weight_bytes(shape, 2) == (LINEAR + PLAIN) * 2


def test_a_config_without_sizes_gives_no_plan():
    assert memory_plan({"architectures": ["X"]}, {}, []) is None


def test_on_a_cpu_the_kv_cache_is_what_is_set():
    tiny = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "num_hidden_layers": 2, "vocab_size": 878, "intermediate_size": 256, "torch_dtype": "float32",
            "max_position_embeddings": 8192}
    mp = memory_plan(tiny, {"max_model_len": 5120, "dtype": "auto"}, [], cpu_kv_bytes=1 << 30)
    # vLLM runs a float32 model in bfloat16: 2 layers x K,V x 2 heads x 32 x 2 bytes = 512 B a token
    assert mp.kv_bytes_per_token == 512 and mp.kv_tokens == (1 << 30) // 512
    # 520,448 weights x 2 bytes
    assert mp.lines()[0] == "memory in RAM: weights 1.0 MiB (estimated from config.json), KV cache 1.00 GiB"
    explicit = memory_plan(tiny, {"max_model_len": 5120, "kv_cache_memory_bytes": 10**6}, [])
    assert explicit.kv_tokens == 10**6 // (512 * 128) * 128 == 1920 and explicit.fits is False
    unknown = memory_plan(tiny, {"max_model_len": 5120}, [])
    assert unknown.kv_tokens is None and unknown.fits is None
    check_fits(unknown)  # nothing to refuse on


# -- invariants over random models and machines ----------------------------------------------


@st.composite
def machines_and_models(draw):
    kv = draw(st.sampled_from([1, 2, 4, 8]))
    heads = kv * draw(st.sampled_from([1, 2, 4, 8]))
    config = {
        "hidden_size": heads * 128, "num_attention_heads": heads, "num_key_value_heads": kv,
        "head_dim": 128, "num_hidden_layers": draw(st.integers(1, 80)),
        "vocab_size": draw(st.integers(1000, 260000)), "intermediate_size": draw(st.integers(256, 30000)),
        "max_position_embeddings": draw(st.sampled_from([2048, 8192, 32768, 131072])),
        "torch_dtype": draw(st.sampled_from(["float16", "bfloat16", "float32"])),
    }
    if draw(st.booleans()):
        config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128}
    n = draw(st.integers(0, 4))
    totals = [draw(st.sampled_from([12, 16, 24, 40, 80])) * 2**30] * n
    kwargs = {"tensor_parallel_size": max(1, n), "gpu_memory_utilization": draw(st.floats(0.3, 0.99)),
              "max_model_len": draw(st.integers(16, 131072)), "dtype": "auto"}
    cpu = draw(st.integers(1, 8)) * 2**30
    return config, kwargs, totals, cpu


@settings(max_examples=200, deadline=None)
@given(machines_and_models())
def test_the_plan_holds_whole_blocks_within_its_room_and_the_largest_length_fits(case):
    config, kwargs, totals, cpu = case
    mp = memory_plan(config, kwargs, totals, cpu_kv_bytes=cpu)
    assert mp.kv_tokens % mp.block_size == 0
    assert mp.kv_tokens * mp.kv_bytes_per_token <= mp.kv_room_per_device
    assert mp.kv_room_per_device - mp.kv_tokens * mp.kv_bytes_per_token < mp.block_size * mp.kv_bytes_per_token
    if totals:
        assert mp.weights_per_device + mp.overhead_per_device + mp.kv_room_per_device >= mp.budget_per_device \
            or mp.kv_room_per_device == 0
    refused = False
    try:
        check_fits(mp)
    except InvalidInput:
        refused = True
    assert refused == (mp.kv_tokens < mp.max_model_len)
    assert (mp.rows_in_flight >= 1) == (not refused)
    if refused and mp.largest_len >= 16:  # the length the refusal offers does fit
        again = memory_plan(config, dict(kwargs, max_model_len=mp.largest_len), totals, cpu_kv_bytes=cpu)
        assert again.fits
        check_fits(again)
