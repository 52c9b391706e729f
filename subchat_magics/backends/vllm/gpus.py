"""The GPUs of this machine as vLLM will meet them: count, names, compute capability,
memory, the driver and the highest CUDA it supports.

Read from ``nvidia-smi`` (a subprocess, a short timeout), or from torch's device
properties where there is no ``nvidia-smi``. The parsing is pure (:func:`parse_query`,
:func:`parse_cuda_version`, :func:`from_torch_properties`) so that recorded outputs can be
fed to it; only :func:`probe` runs anything. Imports neither vLLM nor torch (torch only
inside :func:`probe`, when ``nvidia-smi`` gave nothing and torch is installed: asking
torch initialises CUDA in this process)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

MiB = 1 << 20
GiB = 1 << 30

#: what ``nvidia-smi`` is asked (``--format=csv``: a header, then one line per GPU)
QUERY_FIELDS = ("index", "name", "compute_cap", "memory.total", "memory.free", "driver_version")
QUERY_COMMAND = ("nvidia-smi", "--query-gpu=" + ",".join(QUERY_FIELDS), "--format=csv")

#: the lowest Linux driver of each CUDA release (NVIDIA's CUDA toolkit release notes, table 3),
#: for when ``nvidia-smi`` does not print its "CUDA Version" (checked 2026-12-05)
DRIVER_CUDA = (
    ((580, 65), (13, 0)), ((575, 51), (12, 9)), ((570, 26), (12, 8)), ((560, 28), (12, 6)),
    ((555, 42), (12, 5)), ((550, 54), (12, 4)), ((545, 23), (12, 3)), ((535, 54), (12, 2)),
    ((530, 30), (12, 1)), ((525, 60), (12, 0)), ((520, 61), (11, 8)), ((515, 43), (11, 7)),
    ((510, 39), (11, 6)), ((470, 42), (11, 4)),
)


@dataclass(frozen=True)
class GPU:
    """One CUDA device. Memory in bytes (``free`` None where unknown)."""

    index: int
    name: str
    capability: tuple[int, int]
    total: int
    free: int | None = None

    @property
    def cc(self) -> str:
        return f"{self.capability[0]}.{self.capability[1]}"

    @property
    def pcie(self) -> bool:
        """Presumed to talk to its peers over PCIe (no NVLink): every card but the SXM ones."""
        return "SXM" not in self.name.upper() and "NVLINK" not in self.name.upper()


@dataclass
class Machine:
    """What :func:`probe` found: the GPUs, the driver, and what went wrong finding them."""

    gpus: list[GPU] = field(default_factory=list)
    driver: str | None = None
    driver_cuda: tuple[int, int] | None = None
    source: str = "none"  # "nvidia-smi", "torch" or "none"
    problems: list[str] = field(default_factory=list)

    @property
    def capabilities(self) -> list[tuple[int, int]]:
        return [g.capability for g in self.gpus]


def _number(text: str) -> float:
    m = re.search(r"-?\d+(?:\.\d+)?", text)
    if not m:
        raise ValueError(f"no number in {text!r}")
    return float(m.group())


def parse_query(text: str) -> tuple[list[GPU], str | None]:
    """The GPUs and the driver version from ``nvidia-smi --query-gpu=index,name,compute_cap,
    memory.total,memory.free,driver_version --format=csv`` (header optional, ``nounits``
    or not). Raises ``ValueError`` on text that is not that table."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if lines and lines[0].lower().startswith("index"):
        lines = lines[1:]
    gpus: list[GPU] = []
    driver = None
    for ln in lines:
        cells = [c.strip() for c in ln.split(",")]
        if len(cells) != len(QUERY_FIELDS):
            raise ValueError(f"unexpected nvidia-smi line {ln!r}")
        index, name, cap, total, free, drv = cells
        major, _, minor = cap.partition(".")
        gpus.append(GPU(int(index), name, (int(major), int(minor or 0)),
                        int(_number(total) * MiB), int(_number(free) * MiB)))
        driver = drv or driver
    return gpus, driver


def parse_cuda_version(text: str) -> tuple[int, int] | None:
    """The "CUDA Version: 12.4" of ``nvidia-smi``'s table (or ``-q``'s ``CUDA Version : 12.4``)."""
    m = re.search(r"CUDA Version\s*:\s*(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def cuda_of_driver(driver: str | None) -> tuple[int, int] | None:
    """The highest CUDA a Linux driver supports, from :data:`DRIVER_CUDA`."""
    if not driver:
        return None
    try:
        parts = tuple(int(p) for p in driver.split(".")[:2])
    except ValueError:
        return None
    for floor, cuda in DRIVER_CUDA:
        if parts >= floor:
            return cuda
    return None


def from_torch_properties(props: Iterable[Any]) -> list[GPU]:
    """GPUs from ``torch.cuda.get_device_properties(i)`` objects (``name``, ``major``,
    ``minor``, ``total_memory``)."""
    out = []
    for i, p in enumerate(props):
        out.append(GPU(i, str(p.name), (int(p.major), int(p.minor)), int(p.total_memory)))
    return out


def cuda_from_int(value: int | None) -> tuple[int, int] | None:
    """CUDA's integer form (12040) as (12, 4)."""
    if not value:
        return None
    return int(value) // 1000, (int(value) % 1000) // 10


def machine_from_smi(query_text: str, header_text: str | None) -> Machine:
    """A :class:`Machine` from recorded ``nvidia-smi`` outputs (the query, and the plain
    table for its CUDA version); a problem line instead of an exception on bad text."""
    try:
        gpus, driver = parse_query(query_text)
    except (ValueError, IndexError) as exc:
        return Machine(source="nvidia-smi", problems=[f"nvidia-smi printed what we cannot read ({exc})"])
    cuda = parse_cuda_version(header_text or "") or cuda_of_driver(driver)
    return Machine(gpus, driver, cuda, "nvidia-smi")


def visible(found: list[GPU], env: str | None) -> list[GPU]:
    """The GPUs ``CUDA_VISIBLE_DEVICES`` leaves (by index; UUIDs and unset: all)."""
    if env is None or not env.strip():
        return found if env is None else []
    try:
        wanted = [int(x) for x in env.split(",") if x.strip()]
    except ValueError:
        return found
    by_index = {g.index: g for g in found}
    return [by_index[i] for i in wanted if i in by_index]


def _run(cmd: Sequence[str], timeout: float) -> tuple[int, str]:
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, f"{cmd[0]} did not answer within {timeout:g} s"
    except OSError as exc:
        return -1, f"{cmd[0]} could not run ({exc.strerror or exc})"
    return done.returncode, (done.stdout if done.returncode == 0 else (done.stderr or done.stdout))


def probe(timeout: float = 5.0, use_torch: bool = True) -> Machine:
    """Ask ``nvidia-smi``; where it is missing or fails, torch (only if installed). Never
    raises: what went wrong is in ``problems``."""
    problems: list[str] = []
    if shutil.which("nvidia-smi"):
        rc, out = _run(QUERY_COMMAND, timeout)
        if rc == 0:
            _rc2, header = _run(("nvidia-smi",), timeout)
            m = machine_from_smi(out, header if _rc2 == 0 else None)
            m.gpus = visible(m.gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
            if m.gpus or m.problems:
                return m
        else:
            first = (out.strip().splitlines() or ["no output"])[0][:200]
            problems.append(f"nvidia-smi failed: {first}")
    else:
        problems.append("no nvidia-smi on PATH")
    import glob
    import sys

    devices = bool(glob.glob("/dev/nvidia[0-9]*"))
    if use_torch and not devices and "torch" not in sys.modules:
        problems.append("no /dev/nvidia* device")  # torch would find none either: not imported
    elif use_torch:
        import importlib.util

        if importlib.util.find_spec("torch") is not None:
            try:
                import torch

                if torch.cuda.is_available():
                    n = torch.cuda.device_count()
                    gpus = from_torch_properties(torch.cuda.get_device_properties(i) for i in range(n))
                    drv = None
                    try:
                        drv = cuda_from_int(torch._C._cuda_getDriverVersion())
                    except Exception:  # noqa: BLE001 - an older torch: no driver version
                        pass
                    return Machine(gpus, None, drv, "torch", problems)
            except Exception as exc:  # noqa: BLE001 - a broken CUDA install: say so
                problems.append(f"torch cannot use CUDA ({type(exc).__name__}: "
                                f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})")
    return Machine(problems=problems)
