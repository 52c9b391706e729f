"""The ``openai`` backend keeps one connection across replies (the SDK alone opens a new
one for each: it stops reading at ``data: [DONE]``), still drops it at once when a reply
is cut, and a ``--fanout`` that is the first use of the SDK in the process works."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from subchat_magics.backends.base import GenerationOptions, collect
from subchat_magics.backends.registry import registry

MESSAGES = [{"role": "user", "content": "hi"}]


def test_one_connection_serves_many_replies(openai_server):
    backend = registry().get("openai")
    openai_server.configure(reply="short reply")
    for _ in range(20):
        text, finish = collect(backend.stream(MESSAGES, GenerationOptions(max_tokens=5)))
        assert text == "short reply" and finish.reason == "stop"
    assert openai_server.connections == 1  # /models and 20 replies, one TCP connection


def test_a_reply_closed_midway_still_drops_its_connection(openai_server):
    backend = registry().get("openai")
    openai_server.configure(chunks=[f"w{i} " for i in range(200)], delay=0.01)
    stream = backend.stream(MESSAGES, GenerationOptions(max_tokens=5))
    assert next(iter(stream))
    stream.close()  # what Ctrl-C does
    assert openai_server.disconnected.wait(5)  # at once, not after reading the rest


def test_a_fanout_that_first_imports_the_sdk_works(openai_server, tmp_path):
    script = textwrap.dedent("""
        from IPython.core.interactiveshell import InteractiveShell
        from subchat_magics.testing import Shell
        sh = Shell(InteractiveShell.instance())
        sh.ok("%load_ext subchat_magics")
        print(sh.ok("%%subchat root --backend openai --fanout 4\\nhi"))
    """)
    env = {**os.environ, "OPENAI_BASE_URL": openai_server.base_url}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("Hello from the fake server.") == 4
