"""What ``%load_vllm`` says while loading, read from vLLM's own log lines: the lines of a
GPU load (as vLLM 0.32 writes them; no GPU here) become one line a phase, each said once,
in order; warnings are counted, not shown. (The CPU load is seen end to end in
``test_hub_ids.py``.)"""

from __future__ import annotations

from subchat_magics.backends.vllm.progress import LogPhases, LogTail

GPU_LOG = """\
INFO Initializing a V1 LLM engine (v0.32.0) with config: model='/kaggle/input/qwen-3/transformers/14b-awq/1'
WARNING Casting torch.bfloat16 to torch.float16.
INFO Starting to load model /kaggle/input/qwen-3/transformers/14b-awq/1...
INFO Loading weights took 61.27 seconds
INFO Model loading took 4.61 GiB memory and 63.050911 seconds
INFO Available KV cache memory: 6.12 GiB
INFO GPU KV cache size: 40,096 tokens
INFO Profiling CUDA graph memory: PIECEWISE=51
INFO Graph capturing finished in 14 secs, took 0.52 GiB
INFO init engine (profile, create kv cache, warmup model) took 38.20 seconds
WARNING Something else.
"""


def test_a_gpu_load_is_one_line_a_phase():
    said: list[str] = []
    phases = LogPhases(said.append)
    for line in GPU_LOG.splitlines():
        phases.feed(line)
    assert said == [
        "loading weights…",
        "weights loaded in 61.3 s",
        "the model takes 4.61 GiB; profiling memory…",
        "KV cache: 40,096 tokens",
        "capturing CUDA graphs…",
        "CUDA graphs captured in 14 s",
        "engine initialised in 38.2 s",
    ]
    assert phases.warnings == 2


def test_the_log_file_is_read_as_it_grows_and_removed(tmp_path):
    path = tmp_path / "load.log"
    path.write_text("")
    said: list[str] = []
    tail = LogTail(str(path), LogPhases(said.append)).start()
    with open(path, "a") as f:
        f.write("INFO Starting to load model m...\nINFO Loading weights took 1.00 sec")
        f.flush()
        f.write("onds\n")
    tail.stop()
    assert said == ["loading weights…", "weights loaded in 1.0 s"]
    assert not path.exists()
