"""nbval runs ``kaggle_vllm.ipynb`` on this machine's CPU against the tests' tiny Qwen3
model: its path goes to the kernel in ``SUBCHAT_VLLM_MODEL`` (the notebook's default is
the Kaggle model), with the CPU settings of ``tests/vllm_engine/conftest.py``. Where vLLM is not
installed the notebook is left out, except under CI, where it must run."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HAVE_VLLM = importlib.util.find_spec("vllm") is not None

collect_ignore: list[str] = []
if not HAVE_VLLM and not os.environ.get("CI"):
    collect_ignore.append("kaggle_vllm.ipynb")


def pytest_configure(config):
    if not HAVE_VLLM or os.environ.get("SUBCHAT_VLLM_MODEL"):
        return
    sys.path.insert(0, str(HERE.parent / "tests" / "vllm_engine"))
    import tiny_model

    cache = tiny_model.cache_root()
    for sub in ("vllm", "tmp", "rpc"):
        (cache / sub).mkdir(parents=True, exist_ok=True)
    # the kernel nbval starts inherits these
    os.environ["SUBCHAT_VLLM_MODEL"] = str(tiny_model.build())
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache / "vllm"))
    os.environ.setdefault("VLLM_RPC_BASE_PATH", str(cache / "rpc"))
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # vLLM logs stay out of the saved outputs
