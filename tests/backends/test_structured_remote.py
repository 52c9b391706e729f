"""Structured output over the wire: the exact request fields each remote backend sends for
--json, --choice and --regex (real SDKs against loopback fake servers), what a backend that
cannot enforce a constraint says before sending, and a server that ignores the constraint."""

from __future__ import annotations

import pytest

from subchat_magics.testing import store_rows

from .conftest import last_reply

SCHEMA = {"type": "object", "properties": {"label": {"enum": ["pos", "neg"]}},
          "required": ["label"]}


def _rows(workdir):
    db = workdir / "subchats.db"
    return store_rows(db, "SELECT id, chat_id, content, status FROM messages ORDER BY id")


# -- OpenAI-compatible ----------------------------------------------------------------------
def test_openai_json_sends_response_format_with_the_schema(shell, openai_server):
    shell.ns["schema"] = SCHEMA
    openai_server.configure(reply='{"label": "neg"}')
    shell.ok("%%subchat root --backend openai --json schema --var v\nLabel it.")
    body = openai_server.chat_requests()[-1].body
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "reply", "schema": SCHEMA, "strict": True}}
    assert "structured_outputs" not in body
    assert shell.ns["v"] == {"label": "neg"}
    assert last_reply().provenance["constraint"]["enforced"] is True


def test_openai_choice_and_regex_go_in_vllms_structured_outputs_on_a_vllm_server(
        shell, openai_server):
    openai_server.owned_by = "vllm"
    openai_server.configure(reply="pos")
    shell.ok("%%subchat root --backend openai --choice pos,neg --var v\nLabel it.")
    body = openai_server.chat_requests()[-1].body
    assert body["structured_outputs"] == {"choice": ["pos", "neg"]}
    assert "response_format" not in body and shell.ns["v"] == "pos"
    openai_server.configure(reply="AB-123")
    shell.ok("%%subchat root --backend openai --regex '[A-Z]{2}-[0-9]{3}' --var code\nA code.")
    assert openai_server.chat_requests()[-1].body["structured_outputs"] == {
        "regex": "[A-Z]{2}-[0-9]{3}"}
    assert shell.ns["code"] == "AB-123"


def test_openai_choice_on_a_server_that_is_not_vllm_is_refused_before_sending(
        shell, openai_server, workdir):
    shell.ok("%%subchat root --backend openai\nfirst")
    before, sent = _rows(workdir), len(openai_server.chat_requests())
    error = shell.fails("%%subchat root --backend openai --choice pos,neg\nLabel it.")
    assert "is not a vLLM server" in error and "--best-effort" in error and "\n" not in error
    assert _rows(workdir) == before and len(openai_server.chat_requests()) == sent


def test_best_effort_sends_no_constraint_and_marks_a_reply_that_does_not_satisfy_it(
        shell, openai_server):
    openai_server.configure(reply="Well, it is rather positive I think.")
    out = shell.ok("%%subchat root --backend openai --best-effort --choice pos,neg --var v\n"
                   "Label it.")
    body = openai_server.chat_requests()[-1].body
    assert "structured_outputs" not in body and "response_format" not in body
    msg = last_reply()
    assert shell.ns["v"] is None
    assert msg.content == "Well, it is rather positive I think." and msg.status == "error"
    assert msg.provenance["finish_reason"] == (
        "error: invalid output ('Well, it is rather positive I think.' is not one of pos, neg)")
    assert msg.provenance["constraint"] == {"kind": "choice", "digest": msg.provenance[
        "constraint"]["digest"], "choices": ["pos", "neg"], "best_effort": True,
        "enforced": False}
    assert "[error: invalid output (" in out


def test_a_server_that_ignores_response_format_gets_its_reply_marked_invalid(
        shell, openai_server):
    shell.ns["schema"] = SCHEMA
    openai_server.configure(reply='{"label": "maybe"}')  # the server paid no attention
    shell.ok("%%subchat root --backend openai --json schema --var v\nLabel it.")
    msg = last_reply()
    assert shell.ns["v"] is None and msg.status == "error"
    assert msg.provenance["finish_reason"].startswith(
        "error: invalid output ('maybe' is not one of ['pos', 'neg'] (at label))")
    # the next message carries the reply as context, as any reply
    openai_server.configure(reply='{"label": "pos"}')
    shell.ok("%%subchat root --backend openai --json schema --var v\nAgain.")
    assert openai_server.chat_requests()[-1].body["messages"][1] == {
        "role": "assistant", "content": '{"label": "maybe"}'}
    assert shell.ns["v"] == {"label": "pos"}


def test_a_thinking_server_is_validated_on_the_answer_after_its_reasoning(
        shell, openai_server):
    openai_server.owned_by = "vllm"
    openai_server.configure(reasoning=["Hmm, ", "positive."], reply="pos")
    shell.ok("%%subchat root --backend openai --choice pos,neg --var v\nLabel it.")
    assert shell.ns["v"] == "pos" and last_reply().status == "complete"


# -- Groq -----------------------------------------------------------------------------------
def test_groq_json_schema_on_a_model_that_takes_one(shell, groq):
    groq.models.append("openai/gpt-oss-20b")
    shell.ns["schema"] = SCHEMA
    groq.configure(reply='{"label": "pos"}')
    shell.ok("%%subchat root --backend groq -m openai/gpt-oss-20b --json schema --var v\nGo.")
    assert groq.chat_requests()[-1].body["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA}}
    assert shell.ns["v"] == {"label": "pos"}


def test_groq_bare_json_is_json_mode_on_any_model(shell, groq):
    groq.configure(reply='{"anything": [1, 2]}')
    shell.ok("%%subchat root --backend groq --json --var v\nGo.")
    assert groq.chat_requests()[-1].body["response_format"] == {"type": "json_object"}
    assert shell.ns["v"] == {"anything": [1, 2]}


def test_groq_schema_on_a_model_without_it_is_refused_or_json_mode_with_best_effort(
        shell, groq, workdir):
    shell.ns["schema"] = SCHEMA
    shell.ok("%%subchat root --backend groq\nfirst")
    before = _rows(workdir)
    error = shell.fails("%%subchat root --backend groq --json schema\nGo.")
    assert "llama-3.3-70b-versatile takes no JSON schema" in error
    assert _rows(workdir) == before
    error = shell.fails("%%subchat root --backend groq --regex 'a+'\nGo.")
    assert "Groq cannot enforce --regex" in error
    groq.configure(reply='{"label": "pos"}')
    shell.ok("%%subchat root --backend groq --json schema --best-effort --var v\nGo.")
    assert groq.chat_requests()[-1].body["response_format"] == {"type": "json_object"}
    assert shell.ns["v"] == {"label": "pos"}


# -- Ollama ---------------------------------------------------------------------------------
def test_ollama_json_sends_the_schema_as_format(shell, ollama):
    shell.ns["schema"] = SCHEMA
    ollama.configure(reply='{"label": "pos"}')
    shell.ok("%%subchat root --backend ollama --json schema --var v\nGo.")
    assert ollama.chat_requests()[-1].body["format"] == SCHEMA
    assert shell.ns["v"] == {"label": "pos"}
    shell.ok("%%subchat root --backend ollama --json --var w\nGo.")
    assert ollama.chat_requests()[-1].body["format"] == {"type": "object"}


@pytest.mark.parametrize("flag", ["--choice yes,no", "--regex '[0-9]+'"])
def test_ollama_cannot_enforce_choice_or_regex_and_says_so_before_sending(
        shell, ollama, workdir, flag):
    shell.ok("%%subchat root --backend ollama\nfirst")
    before, sent = _rows(workdir), len(ollama.chat_requests())
    error = shell.fails(f"%%subchat root --backend ollama {flag}\nGo.")
    assert "the ollama backend cannot enforce" in error and "--best-effort" in error
    assert _rows(workdir) == before and len(ollama.chat_requests()) == sent
    ollama.configure(reply="yes" if "choice" in flag else "42")
    shell.ok(f"%%subchat root --backend ollama {flag} --best-effort --var v\nGo.")
    assert "format" not in ollama.chat_requests()[-1].body
    assert shell.ns["v"] == ("yes" if "choice" in flag else "42")


def test_ollama_with_thinking_validates_the_answer_not_the_thinking(shell, ollama):
    shell.ns["schema"] = SCHEMA
    ollama.configure(reasoning=["Let me see. ", "{not json}"], reply='{"label": "neg"}')
    shell.ok("%%subchat root --backend ollama --think --json schema --var v\nGo.")
    body = ollama.chat_requests()[-1].body
    assert body["think"] is True and body["format"] == SCHEMA
    assert shell.ns["v"] == {"label": "neg"}


def test_each_rows_a_server_answers_off_constraint_get_none(shell, openai_server):
    shell.ns["reviews"] = ["good film", "bad film"]
    openai_server.configure(reply="I would say positive.")
    shell.ok("%%subchat root --backend openai --each reviews --as labels --best-effort "
             "--choice pos,neg\nLabel: {item}")
    assert shell.ns["labels"] == [None, None]
    assert all("structured_outputs" not in r.body for r in openai_server.chat_requests())
