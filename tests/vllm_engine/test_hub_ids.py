"""``%load_vllm org/name``: a Hugging Face model id. Offline, from a cache folder laid out
as ``huggingface_hub`` lays it out (holding the tiny model), the id loads and replies; a
missing id says in one line what to do (online and offline), and the Hub's answers come
from a loopback server speaking its protocol (``HF_ENDPOINT``).

The loading test runs in a fresh Python process: the Hugging Face settings
(``HF_HOME``, ``HF_HUB_OFFLINE``) are read by ``huggingface_hub`` when it is imported, as
they are in a notebook (set before the kernel starts, or before the first import)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from subchat_magics.backends.vllm import hub

REPO_ID = "tiny-org/tiny-qwen3"
REVISION = "0123456789abcdef0123456789abcdef01234567"
TINY_CONFIG = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "max_position_embeddings": 8192}


def hf_cache(root: Path, model: Path, repo_id: str = REPO_ID) -> Path:
    """``root/hub`` laid out as huggingface_hub does: blobs named by their hash, a snapshot
    of symlinks to them, and ``refs/main`` naming the snapshot."""
    repo = root / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / REVISION
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    for f in sorted(model.iterdir()):
        if f.is_file():
            data = f.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return root / "hub"


def test_an_org_name_that_is_no_folder_is_a_hub_id(tmp_path, monkeypatch):
    from subchat_magics.backends.vllm.plan import is_hub_id

    monkeypatch.chdir(tmp_path)
    assert is_hub_id("Qwen/Qwen3-14B-AWQ")
    assert is_hub_id("'meta-llama/Llama-3.2-1B-Instruct'")
    (tmp_path / "local" / "model").mkdir(parents=True)
    assert not is_hub_id("local/model")  # an existing folder wins
    for text in ("/kaggle/input/qwen-3/transformers/14b-awq/1", "./a/b", "a/b/c", "~/m", "../m/x", "m"):
        assert not is_hub_id(text)


def test_a_missing_hub_id_offline_is_one_line_saying_to_turn_internet_on(shell, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = shell.fails("%load_vllm Qwen/Qwen3-14B-AWQ")
    assert "\n" not in err
    assert err.startswith("%load_vllm: Qwen/Qwen3-14B-AWQ is not in the local Hugging Face cache "
                          f"({tmp_path / 'hf' / 'hub'})")
    assert "HF_HUB_OFFLINE=1" in err and "turn internet on" in err
    assert "add the model as a Kaggle input" in err and "%load_vllm /kaggle/input/" in err


def test_a_kaggle_input_holding_the_model_is_named_in_the_message(tmp_path):
    for folder in ("other/transformers/7b/1", "qwen-3/transformers/14b-awq/1", "qwen-3/transformers/8b/1"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "config.json").write_text("{}")
    found = hub.kaggle_inputs("Qwen/Qwen3-14B-AWQ", root=tmp_path)
    assert found[0] == tmp_path / "qwen-3/transformers/14b-awq/1"
    assert len(found) == 3


def test_a_partly_downloaded_snapshot_is_not_taken_for_a_cached_model(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_CONFIG))
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    cache = hf_cache(tmp_path, model)
    assert hub.cached_snapshot(REPO_ID, cache) == cache / f"models--tiny-org--tiny-qwen3/snapshots/{REVISION}"
    (cache / f"models--tiny-org--tiny-qwen3/snapshots/{REVISION}/model.safetensors").unlink()
    assert hub.cached_snapshot(REPO_ID, cache) is None


class FakeHub:
    """The Hub's answers to ``hf_hub_download``: a known repo's ``config.json``; an unknown
    repo is 401 with ``X-Error-Code: RepoNotFound``, as huggingface.co answers."""

    def __init__(self, repos: dict[str, dict]):
        self.repos = repos
        self.paths: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _answer(self, body: bool) -> None:
                fake.paths.append(self.path)
                parts = self.path.split("/")  # /org/name/resolve/rev/config.json
                repo = "/".join(parts[1:3])
                if repo not in fake.repos:
                    data = b'{"error":"Repository Not Found"}'
                    self.send_response(401)
                    self.send_header("X-Error-Code", "RepoNotFound")
                    self.send_header("X-Error-Message", "Repository not found")
                else:
                    data = json.dumps(fake.repos[repo]).encode()
                    self.send_response(200)
                    self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                    self.send_header("X-Repo-Commit", REVISION)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_HEAD(self):  # noqa: N802
                self._answer(False)

            def do_GET(self):  # noqa: N802
                self._answer(True)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")  # installed with vLLM; not in the fast tier's venv
    server = FakeHub({})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    yield server
    server.close()


def test_a_hub_id_that_does_not_exist_online_is_one_line(shell, fake_hub):
    err = shell.fails("%load_vllm no-such-org/no-such-model")
    assert "\n" not in err
    assert err.startswith(f"%load_vllm: there is no model 'no-such-org/no-such-model' on the Hugging "
                          f"Face Hub ({fake_hub.url})")
    assert "check the spelling" in err
    assert any(p.startswith("/no-such-org/no-such-model/") for p in fake_hub.paths)  # it asked


def test_an_unreachable_hub_with_nothing_cached_says_to_turn_internet_on(shell, tmp_path, monkeypatch):
    import socket

    pytest.importorskip("huggingface_hub")
    with socket.socket() as s:  # a port held bound, not listening: it refuses (and no
        s.bind(("127.0.0.1", 0))  # other process can take it meanwhile)
        port = s.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        err = shell.fails("%load_vllm Qwen/Qwen3-14B-AWQ")
    assert "\n" not in err
    assert "cannot reach the Hugging Face Hub" in err and "turn internet on" in err


def test_a_hub_id_online_is_checked_before_loading(fake_hub):
    fake_hub.repos[REPO_ID] = TINY_CONFIG
    found = hub.resolve(REPO_ID)
    assert found.config["model_type"] == "qwen3" and not found.cached
    assert found.plan_line().startswith(f"{REPO_ID} is not in the local Hugging Face cache")
    assert f"from {fake_hub.url}" in found.plan_line()


LOAD_SCRIPT = textwrap.dedent("""
    from IPython.core.interactiveshell import InteractiveShell
    from subchat_magics.testing import Shell
    from subchat_magics.testing.tiny_model import use_cpu_engine_settings

    use_cpu_engine_settings(log_level="INFO")
    sh = Shell(InteractiveShell.instance())
    sh.ok("%load_ext subchat_magics")
    sh.ok("%config SubchatMagics.store_path = 'subchats.db'")
    print("=== load", flush=True)
    result, cap = sh.run("%load_vllm {repo} --max-model-len 512")
    print(cap.stdout, flush=True)
    assert result.success, (cap.stdout, cap.stderr, result.error_in_exec)
    print("=== reply", flush=True)
    print(sh.ok("%%subchat root -n 8\\nHello"), flush=True)
    print(sh.ok("%subchat show root -p"), flush=True)
    print("=== verbose", flush=True)
    print(sh.ok("%load_vllm {repo} --max-model-len 256 --verbose"), flush=True)
    print("=== end", flush=True)
""")


@pytest.mark.vllm
def test_a_hub_id_loads_offline_from_the_hugging_face_cache_with_progress(tmp_path, tiny_model):
    hf_cache(tmp_path / "hf", tiny_model)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "VLLM_LOGGING"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_ENDPOINT="http://127.0.0.1:9")  # nothing answers there: offline for real
    proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT.format(repo=REPO_ID)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    load = out.split("=== load", 1)[1].split("=== reply", 1)[0]
    assert f"{REPO_ID}: using the local Hugging Face cache ({tmp_path / 'hf' / 'hub'}" in load
    assert f"Loading {REPO_ID} with vLLM" in load
    assert "Reading the config of" in load
    assert "· loading weights…" in load and "· weights loaded" in load
    assert f"vLLM ready: {REPO_ID} · " in load
    # vLLM's own log (INFO here) stays out of the cell, and out of the process's output
    before_verbose = out.split("=== verbose", 1)[0]
    assert "Initializing a V1 LLM engine" not in before_verbose
    reply = out.split("=== reply", 1)[1].split("=== verbose", 1)[0]
    assert "vllm" in reply and REPO_ID in reply  # the provenance: the model answered
    verbose = out.split("=== verbose", 1)[1]
    assert "Initializing a V1 LLM engine" in verbose  # --verbose: vLLM's log as vLLM writes it
