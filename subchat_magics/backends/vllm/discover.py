"""Models found, not typed: the model folders under Kaggle's inputs and in the local
Hugging Face cache, what each is (architecture, quantization, size on disk) and whether
it fits the visible GPUs; a model chosen by its number or a unique part of its name; the
folders closest to a path that does not exist.

Kaggle's inputs are ``/kaggle/input/MODEL/FRAMEWORK/VARIATION/VERSION`` (datasets one or
two levels deep); ``SUBCHAT_KAGGLE_INPUT`` points elsewhere (tests, other layouts).
Pure file-system reads; imports neither vLLM nor torch. Every unreadable folder or
config is a note, never an exception."""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ...errors import InvalidInput
from . import hub
from .plan import (
    KAGGLE_DEFAULTS,
    estimate_weight_bytes,
    model_label,
    model_shape,
    quantization_for,
)

#: how deep a model folder may sit under the inputs root (MODEL/FRAMEWORK/VARIATION/VERSION)
KAGGLE_DEPTH = 4
INPUT_ENV = "SUBCHAT_KAGGLE_INPUT"
WEIGHT_SUFFIXES = hub.WEIGHT_SUFFIXES
_MAX_FOLDERS = 5000  # a huge dataset tree is cut off, not walked for minutes


def kaggle_input() -> Path:
    """Kaggle's inputs root: ``$SUBCHAT_KAGGLE_INPUT``, else ``/kaggle/input``."""
    return Path(os.environ.get(INPUT_ENV) or hub.KAGGLE_INPUT).expanduser()


@dataclass
class FoundModel:
    """A model folder: where, what, how big, and whether it fits the GPUs."""

    path: Path
    name: str
    source: str  # "kaggle" or "hf-cache"
    architecture: str | None
    quantization: str | None
    weight_bytes: int
    fits: bool | None = None  # None: no GPU to compare with
    note: str = ""
    repo_id: str | None = None  # a Hugging Face cache entry's id

    @property
    def loadable(self) -> bool:
        return self.architecture is not None and self.weight_bytes > 0

    def ref(self) -> str:
        """What ``%load_vllm`` is given to load it."""
        return self.repo_id or str(self.path)


@dataclass
class Found:
    models: list[FoundModel] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def weight_size(folder: Path) -> int:
    """Bytes of the weight files directly in ``folder`` (links followed)."""
    total = 0
    try:
        for f in folder.iterdir():
            if f.suffix in WEIGHT_SUFFIXES:
                try:
                    total += f.stat().st_size
                except OSError:
                    pass
    except OSError:
        return 0
    return total


def read_config(folder: Path) -> tuple[dict[str, Any] | None, str]:
    """The folder's ``config.json`` as a dict, or None and why."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except OSError as exc:
        return None, f"config.json unreadable ({exc.strerror or exc})"
    except ValueError:
        return None, "config.json is not JSON"
    if not isinstance(config, dict):
        return None, "config.json is not a model config"
    return config, ""


def fits_gpus(weight_bytes: int, device_totals: Sequence[int],
              utilization: float = KAGGLE_DEFAULTS["gpu_memory_utilization"]) -> bool | None:
    """Whether the weights, spread over every GPU, leave room for a KV cache (at least a
    tenth of each GPU's share). None without GPUs."""
    if not device_totals:
        return None
    share = weight_bytes / len(device_totals)
    return share < min(device_totals) * utilization * 0.9


def describe(folder: Path, source: str, device_totals: Sequence[int], *,
             name: str | None = None, repo_id: str | None = None) -> FoundModel | None:
    """A :class:`FoundModel` for a folder holding ``config.json`` (None: no config.json)."""
    if not (folder / "config.json").is_file():
        return None
    config, why = read_config(folder)
    label = name or model_label(folder)
    size = weight_size(folder)
    if config is None:
        return FoundModel(folder, label, source, None, None, size, None, why, repo_id)
    archs = config.get("architectures") or (config.get("text_config") or {}).get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else None
    _, quant = quantization_for(config, None)
    note = ""
    if arch is None:
        note = ("an adapter (LoRA), not a model: load its base model and pass it with "
                "--engine-arg enable_lora=true" if (folder / "adapter_config.json").is_file()
                else "config.json names no architectures")
    elif size == 0:
        shape = model_shape(config)
        note = "no weight files in this folder"
        if shape is not None:
            note += f" (the config describes ~{estimate_weight_bytes(shape) / 1e9:.1f} GB)"
    fits = fits_gpus(size, device_totals) if size else None
    return FoundModel(folder, label, source, arch, quant, size, fits, note, repo_id)


def _walk(root: Path, depth: int, notes: list[str]) -> list[Path]:
    """Folders holding ``config.json`` or ``adapter_config.json`` up to ``depth`` below ``root``."""
    out: list[Path] = []
    seen = 0
    frontier = [root]
    for level in range(depth + 1):
        nxt: list[Path] = []
        for d in frontier:
            seen += 1
            if seen > _MAX_FOLDERS:
                notes.append(f"stopped after {_MAX_FOLDERS} folders under {root}")
                return out
            if level and ((d / "config.json").is_file() or (d / "adapter_config.json").is_file()):
                out.append(d)
                continue
            try:
                children = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
            except PermissionError:
                notes.append(f"{d}: not readable (permission denied)")
                continue
            except OSError as exc:
                if d != root:
                    notes.append(f"{d}: not readable ({exc.strerror or exc})")
                continue
            nxt.extend(children)
        frontier = nxt
    return out


def _cache_models(cache: Path, device_totals: Sequence[int], notes: list[str]) -> list[FoundModel]:
    out = []
    try:
        repos = sorted(p for p in cache.glob("models--*") if p.is_dir())
    except OSError:
        return out
    for repo in repos:
        repo_id = repo.name[len("models--"):].replace("--", "/", 1)
        snap = hub.cached_snapshot(repo_id, cache)
        if snap is None:
            continue
        m = describe(snap, "hf-cache", device_totals, name=repo_id, repo_id=repo_id)
        if m is not None:
            m.weight_bytes = m.weight_bytes or weight_size(snap)
            out.append(m)
    return out


def find_models(device_totals: Sequence[int] = (), root: Path | None = None,
                cache: Path | None = None) -> Found:
    """Every model folder under the Kaggle inputs (to ``MODEL/FRAMEWORK/VARIATION/VERSION``)
    and in the Hugging Face cache, in that order, each described."""
    found = Found()
    root = kaggle_input() if root is None else root
    if root.is_dir():
        for folder in _walk(root, KAGGLE_DEPTH, found.notes):
            name = model_label(folder)
            m = describe(folder, "kaggle", device_totals, name=name)
            if m is None:  # only an adapter_config.json
                m = FoundModel(folder, name, "kaggle", None, None, weight_size(folder),
                               None, "an adapter (LoRA), not a model: load its base model and pass "
                               "it with --engine-arg enable_lora=true")
            found.models.append(m)
    elif root.exists():
        found.notes.append(f"{root} is not a folder")
    found.models.extend(_cache_models(hub.cache_dir() if cache is None else cache, device_totals,
                                      found.notes))
    return found


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def listing(found: Found, device_totals: Sequence[int] = (), root: Path | None = None) -> str:
    """The numbered list ``%load_vllm`` prints without a path."""
    root = kaggle_input() if root is None else root
    if not found.models:
        lines = [f"No model folders found under {root} or in the Hugging Face cache "
                 f"({hub.cache_dir()}). On Kaggle: Add Input → Models, then %load_vllm again; "
                 "elsewhere: %load_vllm PATH or %load_vllm org/name."]
    else:
        gpus = (f"{len(device_totals)} GPU(s) of {min(device_totals) / (1 << 30):.1f} GiB"
                if device_totals else "no GPU")
        lines = [f"Models found ({gpus}); load one with %load_vllm N or a unique part of its name:"]
        for i, m in enumerate(found.models, 1):
            fit = {True: "fits", False: "too big for these GPUs", None: ""}[m.fits]
            bits = [m.architecture or "-", m.quantization or "unquantized",
                    _size(m.weight_bytes) if m.weight_bytes else "no weights"]
            if fit:
                bits.append(fit)
            where = m.repo_id and f"hf cache {m.repo_id}" or str(m.path)
            lines.append(f"  {i:>2}. {m.name:28} {' · '.join(bits)}")
            lines.append(f"      {where}" + (f"  ({m.note})" if m.note else ""))
    lines.extend(f"note: {n}" for n in found.notes)
    return "\n".join(lines)


def choose(found: Found, what: str) -> FoundModel:
    """The model ``%load_vllm N`` or ``%load_vllm PART`` means: a number from the list, or
    the one model whose name or path holds ``PART`` (case-insensitive)."""
    text = what.strip()
    models = found.models
    if text.isdigit():
        n = int(text)
        if not models:
            raise InvalidInput(f"%load_vllm {text}: no models were found to choose from; "
                               "%load_vllm without a path lists them")
        if not 1 <= n <= len(models):
            raise InvalidInput(f"%load_vllm {text}: there are {len(models)} model(s) in the list "
                               f"(1 to {len(models)}); %load_vllm without a path lists them")
        m = models[n - 1]
    else:
        low = text.lower()
        hits = [m for m in models if low in (m.name.lower(), (m.repo_id or "").lower())] or \
            [m for m in models if low in m.name.lower() or low in str(m.path).lower()
             or (m.repo_id and low in m.repo_id.lower())]  # an exact name wins over parts
        if not hits:
            raise InvalidInput(f"%load_vllm: {text!r} is no folder here and names none of the "
                               f"{len(models)} model(s) found; %load_vllm without a path lists them")
        if len(hits) > 1:
            names = ", ".join(f"{models.index(m) + 1}. {m.name}" for m in hits[:6])
            raise InvalidInput(f"%load_vllm: {text!r} matches {len(hits)} models ({names}); "
                               "give its number or more of its name")
        m = hits[0]
    if not m.loadable:
        raise InvalidInput(f"%load_vllm: {m.name} cannot be loaded: {m.note or 'no weights'}")
    return m


def closest_folders(raw: str, limit: int = 3) -> list[str]:
    """Existing folders nearest to a path that does not exist: the deepest part that
    exists, then at each missing level the nearest names (so a wrong version number or
    a typo in a Kaggle path still leads to the model)."""
    p = Path(raw).expanduser()
    parts = p.parts
    base = Path(parts[0]) if p.is_absolute() else Path(".")
    rest = parts[1:] if p.is_absolute() else parts
    candidates = [base]
    for part in rest:
        nxt: list[Path] = []
        for c in candidates:
            if (c / part).is_dir():
                nxt.append(c / part)
                continue
            try:
                names = sorted(d.name for d in c.iterdir() if d.is_dir())
            except OSError:
                continue
            close = difflib.get_close_matches(part, names, n=limit, cutoff=0.4)
            if not close and len(names) <= limit:
                close = names
            nxt.extend(c / n for n in close)
        if not nxt:
            break
        candidates = nxt[:limit * 2]
    out = [str(c) for c in candidates if c != base and c.is_dir()]
    out.sort(key=lambda s: -difflib.SequenceMatcher(None, s, str(p)).ratio())
    return out[:limit]




def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or os.sep + os.sep in text


def resolve(raw: str, device_totals: Sequence[int] = (), root: Path | None = None) -> str:
    """What ``%load_vllm WHAT`` loads: an existing folder as given; a number from the
    list; a found model's exact name; a Hugging Face id (``org/name``: never widened to a
    cached model whose id merely contains it); a unique part of a found model's name;
    else an :class:`InvalidInput` that names the closest folders or names."""
    from .plan import clean_model_arg, is_hub_id

    text = clean_model_arg(raw)
    if not text or Path(text).expanduser().exists():
        return text
    if text.isdigit():
        return choose(find_models(device_totals, root), text).ref()
    if not _looks_like_path(text):
        found = find_models(device_totals, root)
        low = text.lower()
        exact = [m for m in found.models if low in (m.name.lower(), (m.repo_id or "").lower())]
        if len(exact) == 1:
            return choose(found, str(found.models.index(exact[0]) + 1)).ref()
        if is_hub_id(text):  # org/name: a Hub id unless it is exactly a found model's name
            return text
        if any(low in m.name.lower() or low in str(m.path).lower()
               or (m.repo_id and low in m.repo_id.lower()) for m in found.models):
            return choose(found, text).ref()
        names = {m.name.lower(): m.name for m in found.models}
        close = [names[n] for n in difflib.get_close_matches(low, list(names), n=3, cutoff=0.3)]
        raise InvalidInput(
            f"%load_vllm: no such folder {text!r}, and no model found here is named like it"
            + (f"; the closest names: {', '.join(close)}" if close else "")
            + "; %load_vllm without a path lists the models found")
    close = closest_folders(text)
    raise InvalidInput(
        f"%load_vllm: no such folder {text!r}"
        + (f"; the closest existing folders: {', '.join(close)}" if close else
           "; give the path of a local model folder (with config.json), e.g. "
           "/kaggle/input/qwen-3/transformers/14b-awq/1, or a Hugging Face model id, e.g. "
           "Qwen/Qwen3-14B-AWQ")
        + "; %load_vllm without a path lists the models found")
