"""nbval runs ``kaggle_vllm.ipynb`` on this machine's CPU against the tests' tiny Qwen3
model (``subchat_magics.testing.tiny_model``): its path goes to the kernel in
``SUBCHAT_VLLM_MODEL`` (the notebook's default is the Kaggle model), with the CPU engine
settings the vLLM tests use. Where vLLM is not installed the notebook is left out, except
under CI, where it must run."""

from __future__ import annotations

import importlib.util
import os

import pytest

HAVE_VLLM = importlib.util.find_spec("vllm") is not None

collect_ignore: list[str] = []
if not HAVE_VLLM and not os.environ.get("CI"):
    collect_ignore.append("kaggle_vllm.ipynb")


def pytest_configure(config):
    if not HAVE_VLLM or os.environ.get("SUBCHAT_VLLM_MODEL"):
        return
    from subchat_magics.testing import tiny_model

    # the kernel nbval starts inherits these; vLLM logs stay out of the saved outputs
    tiny_model.use_cpu_engine_settings(log_level="ERROR", tmpdir=False)
    os.environ["SUBCHAT_VLLM_MODEL"] = str(tiny_model.build())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under ``bash .ci/fast`` (SUBCHAT_SKIP_IS_FAILURE set) a skipped notebook cell is a
    failure, as a skipped test is (tests/conftest.py)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") \
            and os.environ.get("SUBCHAT_SKIP_IS_FAILURE"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped, and SUBCHAT_SKIP_IS_FAILURE is set (bash .ci/fast): {reason}"
