"""What ``%load_vllm`` says while an engine loads: vLLM's own log (which :func:`.compat.
log_to_file` sends to a file instead of the cell) read as it grows, and turned into a
few lines: loading weights, weights loaded, compiling, the KV cache, capturing graphs,
engine ready. vLLM's warnings are counted, not shown (``--verbose`` shows the whole log).

No vLLM import here: only the text of its log lines is read (one record a line,
``LEVEL message``). Imports nothing of the package."""

from __future__ import annotations

import os
import re
import threading
from typing import Callable

POLL_S = 0.25
_RULES: list[tuple[str, re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    ("weights", re.compile(r"Starting to load model"), lambda m: "loading weights…"),
    ("loaded", re.compile(r"Loading weights took ([\d.]+) seconds"),
     lambda m: f"weights loaded in {float(m[1]):.1f} s"),
    ("in-memory", re.compile(r"Model loading took ([\d.]+) GiB(?: memory)? and ([\d.]+) seconds"),
     lambda m: f"the model takes {float(m[1]):.2f} GiB; profiling memory…"),
    ("compile", re.compile(r"Dynamo bytecode transform|Compiling a graph|Warming up model for the compilation"),
     lambda m: "compiling the model (torch.compile)…"),
    ("kv", re.compile(r"KV cache size: ([\d,]+) tokens"),
     lambda m: f"KV cache: {m[1]} tokens"),
    ("graphs", re.compile(r"Capturing CUDA graphs|Profiling CUDA graph memory"),
     lambda m: "capturing CUDA graphs…"),
    ("graphs-done", re.compile(r"Graph capturing finished in (\d+) secs?"),
     lambda m: f"CUDA graphs captured in {m[1]} s"),
    ("ready", re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+)"),
     lambda m: f"engine initialised in {float(m[1]):.1f} s"),
]


class LogPhases:
    """Turns vLLM's log lines into the phase lines of a load, each said once."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self.seen: set[str] = set()
        self.warnings = 0
        self.errors: list[str] = []

    def feed(self, line: str) -> None:
        level, _, message = line.partition(" ")
        if level == "WARNING":
            self.warnings += 1
        elif level in ("ERROR", "CRITICAL"):
            self.errors.append(message)
        for key, pattern, text in _RULES:
            m = pattern.search(message)
            if m and key not in self.seen:
                self.seen.add(key)
                self.say(text(m))
                return


class LogTail:
    """Reads a growing log file on a thread and feeds each complete line to ``phases``."""

    def __init__(self, path: str, phases: LogPhases):
        self.path = path
        self.phases = phases
        self._stop = threading.Event()
        self._offset = 0
        self._rest = b""
        self._thread = threading.Thread(target=self._run, name="subchat-load-log", daemon=True)

    def start(self) -> "LogTail":
        self._thread.start()
        return self

    def _read(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return
        self._offset += len(data)
        lines = (self._rest + data).split(b"\n")
        self._rest = lines.pop()
        for raw in lines:
            self.phases.feed(raw.decode("utf-8", "replace"))

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            self._read()

    def stop(self) -> None:
        """Read what is left, stop the thread, remove the files."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._read()
        for p in (self.path, self.path + ".json"):
            try:
                os.unlink(p)
            except OSError:
                pass
