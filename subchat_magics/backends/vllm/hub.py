"""Hugging Face Hub model ids for ``%load_vllm``: ``Qwen/Qwen3-14B-AWQ`` is looked up in
the local Hugging Face cache (laid out as ``huggingface_hub`` lays it out:
``models--org--name/refs/main`` and ``snapshots/<rev>/...``) and, when downloads are
allowed, on the Hub (only its ``config.json``, to check the id before a loaded model is
let go). vLLM itself downloads the weights.

The Hugging Face settings are read from the environment on each call (``HF_HUB_CACHE``,
``HF_HOME``, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``, ``HF_TOKEN``), so what we say matches
what is set now. ``huggingface_hub`` is imported inside the functions; imports only
:mod:`subchat_magics.errors`."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import BackendUnavailable, InvalidInput

DEFAULT_ENDPOINT = "https://huggingface.co"
KAGGLE_INPUT = Path("/kaggle/input")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_TRUE = ("1", "on", "yes", "true")


@dataclass
class HubModel:
    """A model id, its ``config.json``, and where the weights will come from."""

    repo_id: str
    config: dict[str, Any]
    cache_dir: Path
    snapshot: Path | None  # the cached snapshot holding config and weights, or None
    offline: bool
    endpoint: str
    download_bytes: int | None = None  # the weights' size when they must be downloaded

    @property
    def cached(self) -> bool:
        return self.snapshot is not None

    def plan_line(self) -> str:
        """What ``%load_vllm`` says before loading: cache or download."""
        if self.snapshot is not None:
            return f"{self.repo_id}: using the local Hugging Face cache ({self.snapshot})"
        size = f" (~{self.download_bytes / 1e9:.1f} GB)" if self.download_bytes else ""
        return (f"{self.repo_id} is not in the local Hugging Face cache ({self.cache_dir}): vLLM "
                f"will download it{size} from {self.endpoint}")


def cache_dir() -> Path:
    """The hub cache: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is on."""
    return any((os.environ.get(v) or "").strip().lower() in _TRUE
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def cached_snapshot(repo_id: str, cache: Path, revision: str = "main") -> Path | None:
    """The cached snapshot of ``repo_id`` at ``revision`` that holds ``config.json`` and
    every weight file it needs (all the shards a ``*.index.json`` names), or None."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / revision
    try:
        commit = ref.read_text().strip() if ref.is_file() else revision
    except OSError:
        return None
    snap = repo / "snapshots" / commit
    if not (snap / "config.json").is_file():
        return None
    indexes = list(snap.glob("*.index.json"))
    for index in indexes:
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            return None
        if not shards or not all((snap / s).is_file() for s in shards):
            return None
    if not indexes and not any(p.suffix in WEIGHT_SUFFIXES and p.is_file() for p in snap.iterdir()):
        return None
    return snap


def kaggle_inputs(repo_id: str, root: Path = KAGGLE_INPUT) -> list[Path]:
    """Model folders (holding ``config.json``) under Kaggle's inputs, those whose path names
    every part of ``repo_id``'s name first."""
    if not root.is_dir():
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        if "config.json" in filenames:
            found.append(Path(dirpath))
            dirnames.clear()
        elif depth >= 5:
            dirnames.clear()
    parts = [p for p in re.split(r"[^a-z0-9]+", repo_id.split("/")[-1].lower()) if p]

    def flat(p: Path) -> str:
        return re.sub(r"[^a-z0-9]+", "", str(p).lower())

    return sorted(found, key=lambda p: (not all(x in flat(p) for x in parts), str(p)))


def where_to_get_it(repo_id: str) -> str:
    """The end of every "cannot get this model" line: turn internet on, or use a Kaggle input."""
    inputs = kaggle_inputs(repo_id)
    if inputs:
        path = f"%load_vllm {inputs[0]}"
    else:
        path = "%load_vllm /kaggle/input/MODEL/transformers/VARIATION/VERSION (the folder with config.json)"
    return ("turn internet on (Kaggle: Settings > Turn on internet; and unset HF_HUB_OFFLINE), "
            f"or add the model as a Kaggle input (Add Input > Models) and load its folder: {path}")


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub's host opens within ``timeout`` seconds (no
    internet: the name does not resolve, or nothing answers)."""
    import socket
    import urllib.parse

    split = urllib.parse.urlsplit(url)
    port = split.port or (443 if split.scheme == "https" else 80)
    try:
        with socket.create_connection((split.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub() -> Any:
    try:
        import huggingface_hub
        import huggingface_hub.errors  # noqa: F401 - a submodule, not an attribute
    except ImportError:
        raise BackendUnavailable("huggingface_hub is not installed, so model ids cannot be looked up; "
                                 "pip install huggingface_hub, or give the model's folder") from None
    return huggingface_hub


def _read_config(path: Path, repo_id: str) -> dict[str, Any]:
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"%load_vllm: cannot read the config.json of {repo_id} ({exc})") from None
    if not isinstance(config, dict):
        raise InvalidInput(f"%load_vllm: the config.json of {repo_id} is not a model config")
    return config


def resolve(repo_id: str) -> HubModel:
    """Look ``repo_id`` up: in the cache (offline), or on the Hub (its ``config.json``).
    :class:`InvalidInput` with one line saying what to do when it cannot be had."""
    cache, off, url = cache_dir(), offline(), endpoint()
    snap = cached_snapshot(repo_id, cache)
    if off:
        if snap is None:
            raise InvalidInput(
                f"%load_vllm: {repo_id} is not in the local Hugging Face cache ({cache}) and "
                f"downloads are off (HF_HUB_OFFLINE=1); {where_to_get_it(repo_id)}")
        return HubModel(repo_id, _read_config(snap / "config.json", repo_id), cache, snap, True, url)
    hub = _hub()
    errors = hub.errors
    if not reachable(url):
        # huggingface_hub would retry for ~20 s before saying the same
        if snap is not None:
            return HubModel(repo_id, _read_config(snap / "config.json", repo_id), cache, snap, False, url)
        raise InvalidInput(
            f"%load_vllm: cannot reach the Hugging Face Hub ({url}) and {repo_id} is not in the "
            f"local cache ({cache}); {where_to_get_it(repo_id)}")
    token = os.environ.get("HF_TOKEN") or None
    try:
        path = hub.hf_hub_download(repo_id, "config.json", cache_dir=str(cache), endpoint=url,
                                   token=token, etag_timeout=10)
    except errors.GatedRepoError:
        raise InvalidInput(
            f"%load_vllm: {repo_id} is gated on the Hugging Face Hub; accept its terms on "
            f"{url}/{repo_id} and set HF_TOKEN, or add the model as a Kaggle input") from None
    except errors.RepositoryNotFoundError:
        raise InvalidInput(
            f"%load_vllm: there is no model {repo_id!r} on the Hugging Face Hub ({url}) (or it is "
            "private: set HF_TOKEN); check the spelling, e.g. Qwen/Qwen3-14B-AWQ, or give the "
            "folder of a local model") from None
    except errors.LocalEntryNotFoundError:  # no connection, and nothing cached
        raise InvalidInput(
            f"%load_vllm: cannot reach the Hugging Face Hub ({url}) and {repo_id} is not in the "
            f"local cache ({cache}); {where_to_get_it(repo_id)}") from None
    except (errors.EntryNotFoundError, errors.RemoteEntryNotFoundError):
        raise InvalidInput(
            f"%load_vllm: {repo_id} on the Hugging Face Hub has no config.json, so it is not a "
            "model vLLM can load; give a model id such as Qwen/Qwen3-14B-AWQ") from None
    except errors.HfHubHTTPError as exc:
        raise InvalidInput(f"%load_vllm: the Hugging Face Hub refused {repo_id}: "
                           f"{str(exc).splitlines()[0][:200]}") from None
    config = _read_config(Path(path), repo_id)
    snap = cached_snapshot(repo_id, cache)
    size = None if snap is not None else _download_size(hub, repo_id, url, token)
    return HubModel(repo_id, config, cache, snap, False, url, size)


def _download_size(hub: Any, repo_id: str, url: str, token: str | None) -> int | None:
    """The weights' size in bytes (the Hub's file list), or None where it cannot say."""
    try:
        info = hub.HfApi(endpoint=url, token=token).model_info(repo_id, files_metadata=True)
        sizes = [s.size or 0 for s in info.siblings or ()
                 if str(s.rfilename).endswith(WEIGHT_SUFFIXES)]
        return sum(sizes) or None
    except Exception:  # noqa: BLE001 - a size is a nicety: never fail a load over it
        return None
