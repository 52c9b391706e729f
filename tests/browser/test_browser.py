"""The tree view in a real JupyterLab, in a real (headless) browser.

Starts JupyterLab on 127.0.0.1 with its own config/data/runtime dirs and a token, writes
a notebook, and runs ``drive.mjs`` (playwright-core driving Debian's Chromium): run all
cells, watch a reply stream into the open view, use Send, Branch and Stop. Then the store
file is read with sqlite3. Screenshots go to ``test-artifacts/browser/``.

Needs ``/usr/bin/chromium`` (apt-get install -y chromium), node, and
``npm ci --prefix tests/browser``; skipped without them, failed without them under CI."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import nbformat
import pytest

pytestmark = pytest.mark.browser

HERE = Path(__file__).resolve().parent
ARTIFACTS = HERE.parents[1] / "test-artifacts" / "browser"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
LONG_WORDS = 400  # the reply Stop cuts: echo repeats them, at 50 ms a word
NOTEBOOK = "browser_tree.ipynb"
CELLS = [
    "%load_ext subchat_magics\n%subchat backend echo",
    "%%subchat root\nHello, tree.",
    "%%subchat root/physics\nWhat is a newton?",
    "%subchat tree",
    "%%subchat root/physics\nExplain force to a child: " + " ".join(
        f"step{i}" for i in range(30)),
]


def missing() -> list[str]:
    need = []
    if not Path(CHROMIUM).exists():
        need.append(f"chromium at {CHROMIUM} (apt-get install -y chromium)")
    if shutil.which("node") is None:
        need.append("node (apt-get install -y nodejs)")
    if not (HERE / "node_modules" / "playwright-core").is_dir():
        need.append("playwright-core (npm ci --prefix tests/browser)")
    return need


@pytest.fixture(scope="module")
def browser_ready() -> None:
    need = missing()
    if need:
        message = "the browser test needs " + ", ".join(need)
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set, so this is a failure, not a skip)")
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_notebook(path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                 "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(src) for src in CELLS]
    nbformat.write(nb, path)


@contextmanager
def jupyter_lab(base: Path) -> Iterator[tuple[str, Path]]:
    """JupyterLab with its own dirs; yields the notebook's URL and the store path."""
    dirs = {name: base / name for name in
            ("config", "data", "runtime", "settings", "workspaces", "ipython", "root")}
    for d in dirs.values():
        d.mkdir(parents=True)
    # no "news" pop-up over the notebook
    (dirs["config"] / "labconfig").mkdir()
    (dirs["config"] / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    # start the notebook's kernel without asking
    tracker = dirs["settings"] / "@jupyterlab" / "notebook-extension"
    tracker.mkdir(parents=True)
    (tracker / "tracker.jupyterlab-settings").write_text(json.dumps({"autoStartDefaultKernel": True}))
    store = dirs["root"] / "browser.db"
    write_notebook(dirs["root"] / NOTEBOOK)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SUBCHAT_", "OLLAMA_", "GROQ_", "OPENAI_", "LLM_"))}
    env.update(
        JUPYTER_CONFIG_DIR=str(dirs["config"]), JUPYTER_DATA_DIR=str(dirs["data"]),
        JUPYTER_RUNTIME_DIR=str(dirs["runtime"]), JUPYTERLAB_SETTINGS_DIR=str(dirs["settings"]),
        JUPYTERLAB_WORKSPACES_DIR=str(dirs["workspaces"]), IPYTHONDIR=str(dirs["ipython"]),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        # the kernel imports this checkout's package, whatever the environment has installed
        PYTHONPATH=os.pathsep.join(p for p in (str(HERE.parents[1]), env.get("PYTHONPATH")) if p),
        SUBCHAT_STORE=str(store), SUBCHAT_ECHO_DELAY="0.05", LLM_BACKEND="echo",
        OLLAMA_HOST="http://127.0.0.1:9",
    )
    port, token = free_port(), secrets.token_hex(16)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    server_log = open(ARTIFACTS / "jupyterlab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         "--port-retries=0", f"--IdentityProvider.token={token}", "--allow-root",
         f"--ServerApp.root_dir={dirs['root']}"],
        env=env, cwd=dirs["root"], stdout=server_log, stderr=subprocess.STDOUT,
        start_new_session=True)  # its kernels join its process group: stopped together
    try:
        status = f"http://127.0.0.1:{port}/api/status?token={token}"
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"JupyterLab exited ({proc.returncode}); see {server_log.name}")
            try:
                with urllib.request.urlopen(status, timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("JupyterLab did not answer in 90 s") from None
                time.sleep(0.25)
        yield f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK}?token={token}", store
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        except ProcessLookupError:
            pass
        server_log.close()


def plain(labels: list[str]) -> list[str]:
    return [t.replace("\u00a0", " ").strip() for t in labels]


def test_tree_view_streams_sends_branches_and_stops_in_a_real_browser(browser_ready, tmp_path):
    with jupyter_lab(tmp_path) as (url, store):
        run = subprocess.run(
            ["node", str(HERE / "drive.mjs"), url, str(ARTIFACTS)],
            cwd=HERE, capture_output=True, text=True, timeout=240,
            env={**os.environ, "CHROMIUM": CHROMIUM, "LONG_WORDS": str(LONG_WORDS)})
    (ARTIFACTS / "drive.log").write_text(run.stderr)
    (ARTIFACTS / "drive.json").write_text(run.stdout)
    lines = run.stdout.strip().splitlines()
    assert lines, f"the driver printed nothing:\n{run.stderr[-3000:]}"
    seen = json.loads(lines[-1])
    assert seen["ok"], f"{seen.get('error')}\n{run.stderr[-3000:]}"

    # the tree renders with the chats the cells made
    after_run = plain(seen["labelsAfterRun"])
    assert after_run[0].startswith("root · 2 msgs · echo")
    assert after_run[1].startswith("└─ physics · 4 msgs · echo")
    # the last cell's reply streamed into the open view: several growing texts, then done
    texts = [t for t in seen["cellStreamTexts"] if "step" in t]
    assert len(set(texts)) >= 3, texts
    assert any("step29" in a for a in seen["assistantAfterRun"])
    # Send continued the selected chat; Branch made a named subchat and sent into it
    assert plain(seen["labelsAfterSend"])[1].startswith("└─ physics · 6 msgs")
    assert any(t.startswith("└─ from-browser · 2 msgs · echo")
               for t in plain(seen["labelsAfterBranch"]))
    assert seen["headAfterBranch"].startswith("root/physics/from-browser")
    # Stop halted the long reply mid-way
    assert seen["stopStreamTexts"] >= 3
    assert any("● streaming" in t for t in plain(seen["labelsMidStream"]))
    assert "interrupted" in seen["statusAfterStop"]
    assert any("[interrupted]" in t for t in seen["assistantAfterStop"])
    # the copy button under a reply put its code block on the clipboard
    assert seen["clipboard"] == "print('copied')"

    # saved and reopened with its kernel gone: no live view, the tree (as it was when the
    # view was shown) as text instead
    assert seen["reopenedLiveViews"] == 0
    assert plain(seen["reopenedStatic"].splitlines()) == ["root  (2 messages, echo)",
                                                          "*   physics  (2 messages, echo)"]

    with sqlite3.connect(store) as db:
        rows = db.execute(
            "SELECT m.status, m.content FROM messages m JOIN chats c ON c.id = m.chat_id "
            "WHERE c.name = 'from-browser' AND m.role = 'assistant' ORDER BY m.seq").fetchall()
        chats = [r[0] for r in db.execute("SELECT name FROM chats ORDER BY id")]
    assert chats == ["root", "physics", "from-browser"]
    assert [status for status, _ in rows] == ["complete", "interrupted"]
    cut = rows[-1][1]
    requested = LONG_WORDS + 3  # "echo (N messages):" and the words sent
    assert 0 < len(cut.split()) < requested
    assert cut.startswith("echo (")
