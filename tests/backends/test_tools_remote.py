"""Tools over the wire through the real shell: each remote backend sends the tools in its
request field, reads the calls from the stream (OpenAI's fragments, Groq's whole deltas,
Ollama's messages; real SDKs against the loopback servers), runs them and sends the
results back in the server's message form; a call that names an unknown tool or has
invalid arguments (possible off vLLM) is sent back as an error, never run."""

from __future__ import annotations

import json

import pytest

from subchat_magics.testing import store_rows

DEFS = '''
ran = []
def units(region: str, year: int) -> int:
    """Units sold in a region in a year."""
    ran.append((region, year))
    return 12
'''
CALLS = [{"name": "units", "arguments": {"region": "north", "year": 2024}},
         {"name": "units", "arguments": {"region": "north", "year": "last"}},  # invalid
         {"name": "delete_everything", "arguments": {}}]  # not a tool


def _roles(workdir):
    return [r[0] for r in store_rows(workdir / "subchats.db",
                                     "SELECT role FROM messages ORDER BY id")]


@pytest.mark.parametrize("backend, fixture", [("openai", "openai_server"), ("groq", "groq"),
                                              ("ollama", "ollama")])
def test_a_remote_backend_calls_tools_and_gets_every_result_back(
        shell, workdir, request, backend, fixture):
    server = request.getfixturevalue(fixture)
    shell.ok(DEFS)
    server.configure(reply="North sold 12.", tool_calls=CALLS, tool_calls_times=1)
    out = shell.ok(f"%%subchat root --backend {backend} --tools units --yes\nHow many?")
    assert shell.ns["ran"] == [("north", 2024)]  # only the valid call ran
    assert "🔧 units(region='north', year=2024) → 12" in out
    assert "North sold 12." in out
    assert _roles(workdir) == ["user", "assistant", "tool", "tool", "tool", "assistant"]
    first, second = (r.body for r in server.chat_requests())
    assert [t["function"]["name"] for t in first["tools"]] == ["units"]
    assert first["tools"][0]["function"]["parameters"]["properties"]["year"] == {"type": "integer"}
    sent = second["messages"]
    results = [m for m in sent if m["role"] == "tool"]
    assert results[0]["content"] == "12"
    assert "'last' is not of type 'integer'" in results[1]["content"]
    assert "no tool named 'delete_everything'" in results[2]["content"]
    calls = sent[1]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["units", "units", "delete_everything"]
    if backend == "ollama":
        assert calls[0]["function"]["arguments"] == {"region": "north", "year": 2024}
        assert results[0]["tool_name"] == "units"
    else:
        assert json.loads(calls[0]["function"]["arguments"]) == {"region": "north", "year": 2024}
        assert [r["tool_call_id"] for r in results] == [c["id"] for c in calls]
        assert second["tool_choice"] == "auto"
        assert ("name" in results[0]) == (backend == "groq")


def test_a_server_that_refuses_the_tools_is_one_line_and_keeps_the_message(
        shell, workdir, openai_server):
    shell.ok(DEFS)
    openai_server.configure(status=400, message="tools are not supported by this model")
    msg = shell.fails("%%subchat root --backend openai --tools units --yes\nHow many?")
    assert "tools are not supported by this model" in msg and "\n" not in msg
    assert _roles(workdir) == ["user", "assistant"]  # the message kept, the reply marked
