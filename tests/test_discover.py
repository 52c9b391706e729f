"""Issue 26: models found, not typed. A fake ``/kaggle/input`` (``SUBCHAT_KAGGLE_INPUT``)
in Kaggle's MODEL/FRAMEWORK/VARIATION/VERSION layout holding model folders, a LoRA-only
folder, a broken config.json and a folder without weights; ``%load_vllm`` without a path
lists them, a number or a unique part of a name picks one (``--plan``: no vLLM needed),
and a mistyped path suggests the closest folders. The real shell, no GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from subchat_magics.backends.vllm import discover
from subchat_magics.errors import InvalidInput

DATA = Path(__file__).parent / "data"
TINY = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "num_hidden_layers": 2, "vocab_size": 878,
        "intermediate_size": 256, "torch_dtype": "float32", "max_position_embeddings": 8192}


def model_folder(folder: Path, config: dict, weights: int = 2_000_000) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    if weights:
        (folder / "model.safetensors").write_bytes(b"\0" * weights)
    return folder


@pytest.fixture
def kaggle(workdir, monkeypatch):
    """/kaggle/input as Kaggle lays it out, and an empty Hugging Face cache."""
    root = workdir / "input"
    model_folder(root / "tiny-qwen3" / "transformers" / "default" / "1", TINY)
    awq = json.loads((DATA / "qwen3-14b-awq" / "config.json").read_text())
    model_folder(root / "qwen-3" / "transformers" / "14b-awq" / "1", awq, weights=0)
    lora = root / "my-lora" / "transformers" / "r8" / "1"
    lora.mkdir(parents=True)
    (lora / "adapter_config.json").write_text(json.dumps({"r": 8, "base_model_name_or_path": "Qwen/Qwen3-14B"}))
    (lora / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
    broken = root / "broken" / "transformers" / "x" / "2"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{not json")
    monkeypatch.setenv("SUBCHAT_KAGGLE_INPUT", str(root))
    monkeypatch.setenv("HF_HUB_CACHE", str(workdir / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def test_every_model_folder_is_found_and_described(kaggle):
    found = discover.find_models([15360 * 2**20] * 2, kaggle)
    by_name = {m.name: m for m in found.models}
    assert list(by_name) == ["broken/x", "my-lora/r8", "qwen-3/14b-awq", "tiny-qwen3/default"]
    tiny = by_name["tiny-qwen3/default"]
    assert (tiny.architecture, tiny.quantization, tiny.weight_bytes, tiny.fits) == \
        ("Qwen3ForCausalLM", None, 2_000_000, True)
    assert by_name["broken/x"].note == "config.json is not JSON" and not by_name["broken/x"].loadable
    assert by_name["my-lora/r8"].note.startswith("an adapter (LoRA), not a model")
    awq = by_name["qwen-3/14b-awq"]
    assert awq.quantization == "awq" and awq.note == "no weight files in this folder (the config describes ~10.0 GB)"


def test_load_vllm_without_a_path_lists_the_models(shell, kaggle):
    out = shell.ok("%load_vllm")
    lines = out.splitlines()
    assert lines[0] == "Models found (no GPU); load one with %load_vllm N or a unique part of its name:"
    assert lines[7].strip().startswith("4. tiny-qwen3/default") and "Qwen3ForCausalLM · unquantized · 2.0 MB" in lines[7]
    assert str(kaggle / "tiny-qwen3" / "transformers" / "default" / "1") in lines[8]
    assert "(config.json is not JSON)" in lines[2]


def test_an_empty_input_folder_says_where_models_come_from(shell, workdir, monkeypatch):
    monkeypatch.setenv("SUBCHAT_KAGGLE_INPUT", str(workdir / "nothing"))
    monkeypatch.setenv("HF_HUB_CACHE", str(workdir / "hf"))
    out = shell.ok("%load_vllm")
    assert out.startswith("No model folders found under") and "Add Input → Models" in out


def test_an_input_root_that_is_a_file_is_a_note(shell, workdir, monkeypatch):
    (workdir / "input-file").write_text("x")
    monkeypatch.setenv("SUBCHAT_KAGGLE_INPUT", str(workdir / "input-file"))
    monkeypatch.setenv("HF_HUB_CACHE", str(workdir / "hf"))
    out = shell.ok("%load_vllm")
    assert f"note: {workdir / 'input-file'} is not a folder" in out


def test_a_number_and_a_partial_name_pick_the_same_model_for_the_plan(shell, kaggle):
    by_number = shell.ok("%load_vllm 4 --plan")
    by_name = shell.ok("%load_vllm TINY-QWEN --plan")
    assert by_number == by_name
    assert by_number.startswith("Plan for tiny-qwen3/default (nothing loaded):")
    assert "memory in RAM: weights 1.9 MiB" in by_number and "flags: tensor_parallel_size=1" in by_number


@pytest.mark.parametrize("line, expected", [
    ("%load_vllm 9", "%load_vllm 9: there are 4 model(s) in the list (1 to 4)"),
    ("%load_vllm 0 --plan", "%load_vllm 0: there are 4 model(s) in the list (1 to 4)"),
    ("%load_vllm 1", "%load_vllm: broken/x cannot be loaded: config.json is not JSON"),
    ("%load_vllm 2 --plan", "%load_vllm: my-lora/r8 cannot be loaded: an adapter (LoRA)"),
    ("%load_vllm 3", "%load_vllm: qwen-3/14b-awq cannot be loaded: no weight files in this folder"),
    ("%load_vllm transformers", "'transformers' matches 4 models (1. broken/x, 2. my-lora/r8"),
    ("%load_vllm llama", "no such folder 'llama', and no model found here is named like it"),
    ("%load_vllm tiny-qwen4", "no model found here is named like it; the closest names: tiny-qwen3/default"),
    ("%load_vllm --plan", "--plan needs MODEL_PATH"),
    ("%load_vllm 4 --plan --engine-arg max_num_seqs=abc", "max_num_seqs takes an integer (got 'abc')"),
    ("%load_vllm 4 --plan --engine-arg block_size=1.5", "block_size takes an integer (got 1.5)"),
])
def test_a_bad_choice_is_one_line(shell, kaggle, line, expected):
    err = shell.fails(line)
    assert err.startswith("%load_vllm") and expected in err and "\n" not in err


def test_a_mistyped_kaggle_path_suggests_the_closest_folders(shell, kaggle):
    wrong = kaggle / "tiny-qwen" / "transformers" / "defualt" / "2"
    err = shell.fails(f"%load_vllm {wrong}")
    assert f"no such folder '{wrong}'" in err
    assert f"the closest existing folders: {kaggle / 'tiny-qwen3' / 'transformers' / 'default' / '1'}" in err


def test_the_closest_folders_follow_each_level(kaggle):
    close = discover.closest_folders(str(kaggle / "qwen3" / "transformer" / "14b-awq" / "3"))
    assert close[0] == str(kaggle / "qwen-3" / "transformers" / "14b-awq" / "1")


def test_a_choice_picks_by_number_or_unique_part(kaggle):
    found = discover.find_models((), kaggle)
    assert discover.choose(found, "4").name == "tiny-qwen3/default"
    assert discover.choose(found, "default").name == "tiny-qwen3/default"
    with pytest.raises(InvalidInput, match="there are 4 model"):
        discover.choose(found, "5")


def test_models_in_the_hugging_face_cache_are_listed_by_id(workdir, monkeypatch):
    cache = workdir / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    repo = cache / "models--Qwen--Tiny"
    snap = repo / "snapshots" / "abc123"
    model_folder(snap, TINY, weights=1000)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    found = discover.find_models((), workdir / "none", cache)
    assert [(m.name, m.source, m.ref()) for m in found.models] == [("Qwen/Tiny", "hf-cache", "Qwen/Tiny")]
    assert discover.resolve("tiny", (), workdir / "none") == "Qwen/Tiny"
    assert discover.resolve("qwen/tiny", (), workdir / "none") == "Qwen/Tiny"  # its exact id
    # a full id is the Hub's, never widened to a cached model that merely contains it
    assert discover.resolve("Qwen/Tin", (), workdir / "none") == "Qwen/Tin"



def test_a_folder_without_weights_still_has_a_plan(shell, kaggle):
    folder = kaggle / "qwen-3" / "transformers" / "14b-awq" / "1"
    plan = shell.ok(f"%load_vllm {folder} --plan")  # from config.json alone; no GPU here: a CPU
    assert "memory in RAM: weights 9.29 GiB (estimated from config.json)" in plan


# -- invariants of a choice over random lists ------------------------------------------------
NAMES = st.lists(st.text("abcdefgh-/", min_size=1, max_size=12), min_size=1, max_size=8, unique=True)


@settings(max_examples=200, deadline=None)
@given(NAMES, st.data())
def test_a_choice_is_the_one_model_it_names_or_a_one_line_refusal(names, data):
    found = discover.Found([discover.FoundModel(Path("/in") / f"m{i}", n, "kaggle", "X", None, 1)
                            for i, n in enumerate(names)])
    n = data.draw(st.integers(-2, len(names) + 2))
    if 1 <= n <= len(names):
        assert discover.choose(found, str(n)).name == names[n - 1]
    else:
        with pytest.raises(InvalidInput) as err:
            discover.choose(found, str(abs(n)) if n >= 0 else f"x{n}")
        assert "\n" not in str(err.value)
    part = data.draw(st.text("abcdefgh-/", min_size=1, max_size=4))
    exact = [m for m in found.models if m.name == part]
    holding = [m for m in found.models if part in m.name or part in str(m.path)]
    try:
        chosen = discover.choose(found, part)
    except InvalidInput as exc:
        assert "\n" not in str(exc) and not exact and len(holding) != 1
    else:
        assert [chosen] == (exact or holding)  # an exact name wins, else the one holding it
