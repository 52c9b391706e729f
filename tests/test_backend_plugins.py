"""A backend from another package (an entry point) describes itself and joins ``auto`` at
the priority it declares, as the built-in backends do. Installed for real: a dist-info
folder on sys.path, found by importlib.metadata, then picked up by ``%reload_ext``."""

from __future__ import annotations

import sys

import pytest


def install_plugin(site, name: str, priority: int | None) -> None:
    module = site / f"{name}_plugin.py"
    module.parent.mkdir(exist_ok=True)
    module.write_text(
        "from subchat_magics.backends.base import Backend, Finish\n"
        f"class Plugin(Backend):\n"
        f"    id = {name!r}\n"
        f"    description = 'a test plugin that shouts'\n"
        f"    auto_priority = {priority!r}\n"
        "    def stream(self, messages, options):\n"
        "        yield messages[-1]['content'].upper()\n"
        f"        yield Finish(model='{name}-1')\n")
    dist = site / f"{name}_backend-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-backend\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[subchat_magics.backends]\n{name} = {name}_plugin:Plugin\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    for name in [m for m in sys.modules if m.endswith("_plugin")]:
        del sys.modules[name]  # the next test installs its own copy


def test_a_plugin_joins_auto_at_its_declared_priority(shell, site):
    install_plugin(site, "shout", 15)  # after vllm (10), before ollama (20)
    shell.ok("%reload_ext subchat_magics")  # as after pip install
    listing = shell.ok("%subchat backends")
    line = next(x for x in listing.splitlines() if x.startswith("shout"))
    assert "available" in line and "[auto #2]" in line
    assert "[auto #1]" in next(x for x in listing.splitlines() if x.startswith("vllm"))
    assert "auto order: vllm -> shout -> ollama -> groq -> echo" in shell.ok("%subchat status")
    shell.ok("%%subchat\nquiet please\n")  # auto: vllm has no model, so the plugin answers
    out = shell.ok("%subchat show -p")
    assert "QUIET PLEASE" in out and "shout-1" in out


def test_a_plugin_without_a_priority_is_chosen_only_by_name(shell, site):
    install_plugin(site, "whisper", None)
    shell.ok("%reload_ext subchat_magics")
    assert "[by name only]" in next(
        x for x in shell.ok("%subchat backends").splitlines() if x.startswith("whisper"))
    assert "whisper" not in shell.ok("%subchat status")
    shell.ok("%%subchat\nhello")
    assert "echo (1 messages): hello" in shell.ok("%subchat show")
    shell.ok("%%subchat --backend whisper\nquiet")
    assert "QUIET" in shell.ok("%subchat show")


def test_an_unknown_backend_lists_the_plugins_too(shell, site):
    install_plugin(site, "shout", 15)
    shell.ok("%reload_ext subchat_magics")
    err = shell.fails("%%subchat --backend nope\nhi")
    assert "shout" in err and "echo" in err


def test_a_plugin_that_cannot_call_tools_is_refused_by_name_and_passed_over_by_auto(shell, site):
    install_plugin(site, "shout", 15)
    shell.ok("%reload_ext subchat_magics")
    shell.ok('def lookup(region: str) -> int:\n    """Units."""\n    return 12')
    shell.ok("%%subchat\nfirst")
    before = shell.ok("%subchat show")
    msg = shell.fails("%%subchat --backend shout --tools lookup --yes\nhow many?")
    assert "the shout backend cannot call tools" in msg and "\n" not in msg
    assert shell.ok("%subchat show") == before  # nothing stored
    out = shell.ok("%%subchat --tools lookup --yes\nhow many?")  # auto: shout passed over
    assert "🔧 lookup(region='') → 12" in out and "echo (5 messages): how many?" in out
