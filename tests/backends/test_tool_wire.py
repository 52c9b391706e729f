"""Tool calls on the HTTP backends' wires, read by the real ``openai``, ``groq`` and
``ollama`` clients from the loopback servers: OpenAI's streamed deltas (the name, then
the arguments in fragments), Groq's (one delta a call), Ollama's (one message with every
call, arguments as objects) are each assembled into the same calls."""

from __future__ import annotations

import pytest

from subchat_magics.backends._tool_wire import (
    DeltaCalls,
    ollama_calls,
    ollama_messages,
    openai_messages,
)
from subchat_magics.testing import FakeGroq, FakeOllama, FakeOpenAI

CALLS = [{"name": "units", "arguments": {"region": "north", "year": 2024}},
         {"name": "flag", "arguments": {"on": True}},
         {"name": "broken", "arguments": '{"x": 1'}]  # as a model may write it off vLLM
HISTORY = [
    {"role": "user", "content": "How many?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "units",
                                                      "arguments": '{"region": "north"}'}}]},
    {"role": "tool", "content": "12", "tool_call_id": "c1", "name": "units"},
]


def _check(calls):
    assert [(c.name, c.arguments, c.error) for c in calls[:2]] == [
        ("units", {"region": "north", "year": 2024}, None), ("flag", {"on": True}, None)]
    assert calls[2].name == "broken" and "not JSON" in calls[2].error
    assert [c.id for c in calls] == ["call_fake0000", "call_fake0001", "call_fake0002"]


def test_openai_deltas_in_fragments_become_whole_calls():
    pytest.importorskip("openai")
    import openai

    with FakeOpenAI() as srv:
        srv.configure(reply="Let me look.", tool_calls=CALLS)
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        acc, finish = DeltaCalls(), None
        for chunk in client.chat.completions.create(
                model="Qwen/Qwen3-0.6B", messages=openai_messages(HISTORY), stream=True,
                tools=[{"type": "function", "function": {"name": "units", "parameters": {}}}]):
            for choice in chunk.choices:
                acc.add(choice.delta.tool_calls)
                finish = choice.finish_reason or finish
        sent = srv.chat_requests()[0].body
    _check(acc.calls())
    assert finish == "tool_calls"
    assert sent["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"region": "north"}'
    assert sent["messages"][2] == {"role": "tool", "content": "12", "tool_call_id": "c1"}


def test_groq_whole_call_deltas_become_the_same_calls():
    pytest.importorskip("groq")
    import groq

    with FakeGroq() as srv:
        srv.configure(tool_calls=CALLS)
        client = groq.Groq(base_url=srv.url, api_key=srv.key, max_retries=0)
        acc = DeltaCalls()
        for chunk in client.chat.completions.create(
                model="llama-3.3-70b-versatile", messages=openai_messages(HISTORY, keep_name=True),
                stream=True):
            for choice in chunk.choices:
                acc.add(choice.delta.tool_calls)
        sent = srv.chat_requests()[0].body
    _check(acc.calls())
    assert sent["messages"][2]["name"] == "units"


def test_ollama_messages_carry_whole_calls_with_object_arguments():
    pytest.importorskip("ollama")
    import ollama

    with FakeOllama() as srv:  # Ollama parses the model's calls itself: never broken JSON
        srv.configure(reply="ok", tool_calls=CALLS[:2] + [{"name": "nope", "arguments": {"a": 1}}])
        client = ollama.Client(host=srv.url)
        calls = []
        for part in client.chat(model="llama3.2", messages=ollama_messages(HISTORY), stream=True):
            calls += ollama_calls(part.message)
        sent = srv.chat_requests()[0].body
    assert [(c.name, c.arguments) for c in calls[:2]] == [
        ("units", {"region": "north", "year": 2024}), ("flag", {"on": True})]
    assert (calls[2].name, calls[2].arguments, calls[2].error) == ("nope", {"a": 1}, None)
    assert sent["messages"][1]["tool_calls"] == [
        {"function": {"name": "units", "arguments": {"region": "north"}}}]
    assert sent["messages"][2] == {"role": "tool", "content": "12", "tool_name": "units"}
