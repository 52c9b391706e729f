"""A real Jupyter kernel for tests: started in a folder with a clean environment (no
backend settings from the machine), cells executed and their messages read off the
kernel's channels, as a notebook frontend sees them. Needs jupyter_client and ipykernel
(the ``test`` extra)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

# settings a test kernel must not inherit from the machine
BACKEND_VARS = ("LLM_BACKEND", "SUBCHAT_STORE", "GROQ_API_KEY", "GROQ_BASE_URL", "GROQ_MODEL",
                "OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL", "OLLAMA_HOST",
                "OLLAMA_MODEL", "OLLAMA_API_KEY", "SUBCHAT_ECHO_DELAY", "SUBCHAT_TIMEOUT",
                "SUBCHAT_CONNECT_TIMEOUT")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without backend settings; Ollama pointed at a closed
    port (so ``auto`` never finds a real server); ``extra`` added."""
    env = {k: v for k, v in os.environ.items() if k not in BACKEND_VARS}
    env["OLLAMA_HOST"] = "http://127.0.0.1:9"
    env.update(extra)
    return env


@contextmanager
def running_kernel(cwd: str | os.PathLike[str], env: dict[str, str] | None = None,
           load_extension: bool = True) -> Iterator[Any]:
    """A started kernel's client (``python3`` kernel spec) working in ``cwd``, with
    ``%load_ext subchat_magics`` run; shut down on exit."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", cwd=str(cwd),
                              env=clean_env() if env is None else env, extra_arguments=[],
                              startup_timeout=60)
    try:
        if load_extension:
            execute(kc, "%load_ext subchat_magics")
        yield kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def execute(kc: Any, code: str, timeout: float = 60) -> tuple[list[dict], dict]:
    """Run a cell (stored in the history, numbered): its iopub messages up to idle, and
    its execute_reply content (payloads such as ``set_next_input`` are there)."""
    msg_id = kc.execute(code)
    msgs = []
    while True:
        msg = kc.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        msgs.append(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    while True:
        reply = kc.get_shell_msg(timeout=timeout)
        if reply["parent_header"].get("msg_id") == msg_id:
            return msgs, reply["content"]


def final_display(msgs: list[dict]) -> dict[str, Any]:
    """The data of the last ``display_data`` a cell sent (a reply's finished form)."""
    return [m for m in msgs if m["msg_type"] == "display_data"][-1]["content"]["data"]
