"""The Groq backend, driven through the magics in a real shell, with the real ``groq``
client talking SSE to a loopback fake of Groq's API."""

from __future__ import annotations

from subchat_magics.backends.base import collect
from subchat_magics.backends.registry import registry

from .conftest import last_reply


def test_reply_streams_from_groq_with_the_key_and_usage(shell, groq):
    groq.configure(reply="Bonjour à tous.", usage=(21, 5))
    out = shell.ok("%%subchat root --backend groq\nSay hello in French.")
    assert out.strip() == "Bonjour à tous."
    [req] = groq.chat_requests()
    assert req.headers["authorization"] == f"Bearer {groq.key}"
    assert req.body["model"] == "llama-3.3-70b-versatile" and req.body["stream"] is True
    p = last_reply().provenance
    assert (p["backend"], p["model"]) == ("groq", "llama-3.3-70b-versatile")
    assert (p["prompt_tokens"], p["completion_tokens"]) == (21, 5)  # from x_groq.usage
    assert p["finish_reason"] == "stop"


def test_subchat_request_carries_the_whole_inherited_context(shell, groq):
    groq.configure(reply="Paris.")
    shell.ok('%%subchat root --backend groq --system "Answer in one word."\nCapital of France?')
    shell.ok("%%subchat root --backend groq\nAnd of Italy?")
    groq.configure(reply="Berlin.")
    shell.ok("%%subchat root/de --backend groq\nAnd of Germany?")
    [req] = groq.chat_requests()
    assert req.body["messages"] == [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Germany?"},
    ]


def test_generation_options_and_model_reach_groq(shell, groq, monkeypatch):
    shell.ok("%%subchat root --backend groq --model llama-3.1-8b-instant -n 64 -t 1.2 "
             "--top-p 0.8 --seed 5\nhi")
    body = groq.chat_requests()[-1].body
    assert (body["model"], body["max_tokens"], body["temperature"], body["top_p"], body["seed"]) \
        == ("llama-3.1-8b-instant", 64, 1.2, 0.8, 5)
    monkeypatch.setenv("GROQ_MODEL", "llama-3.1-8b-instant")
    shell.ok("%%subchat root --backend groq\nagain")
    assert groq.chat_requests()[-1].body["model"] == "llama-3.1-8b-instant"


def test_stop_sequences_are_passed(groq):
    backend = registry().get("groq")
    from subchat_magics.backends.base import GenerationOptions

    text, finish = collect(backend.stream([{"role": "user", "content": "hi"}],
                                          GenerationOptions(stop=["\n\n", "END"])))
    assert groq.chat_requests()[-1].body["stop"] == ["\n\n", "END"]
    assert text == "Hello from the fake server." and finish.reason == "stop"


def test_a_rejected_key_is_named_and_never_shown(shell, groq):
    groq.configure(status=401, message=f"Invalid API Key: {groq.key}")  # a server echoing it
    msg = shell.fails("%%subchat root --backend groq\nhi")
    assert "GROQ_API_KEY was rejected (401)" in msg and "%subchat key groq" in msg
    assert groq.key not in msg
    reply = last_reply()
    assert reply.provenance["finish_reason"] == "error: auth"
    assert groq.key not in str(reply.provenance)


def test_no_key_is_an_error_when_groq_is_asked_for(shell, groq, monkeypatch):
    monkeypatch.delenv("GROQ_API_KEY")
    msg = shell.fails("%%subchat root --backend groq\nhi")
    assert "GROQ_API_KEY is not set" in msg and "%subchat key groq" in msg
    assert groq.chat_requests() == []


def test_an_unknown_model_lists_the_served_ones(shell, groq):
    msg = shell.fails("%%subchat root --backend groq --model gpt-5\nhi")
    assert "model 'gpt-5' is not served by Groq" in msg
    assert "available: llama-3.3-70b-versatile, llama-3.1-8b-instant" in msg
    assert last_reply().provenance["finish_reason"] == "error: model"


def test_rate_limit_is_retried_after_the_wait_the_server_asks(shell, groq):
    groq.configure(status=429, fail_times=2, retry_after="0")
    assert shell.ok("%%subchat root --backend groq\nhi").strip() == "Hello from the fake server."
    assert len(groq.chat_requests()) == 3


def test_rate_limit_gives_up_after_two_retries_and_says_when_to_retry(shell, groq):
    groq.configure(status=429, retry_after="0")
    msg = shell.fails("%%subchat root --backend groq\nhi")
    assert "rate-limited by Groq" in msg and "(429)" in msg and "retry in ~1 s" in msg
    assert len(groq.chat_requests()) == 3


def test_a_long_rate_limit_in_the_message_is_reported_without_waiting(shell, groq):
    groq.configure(status=429, message="Rate limit reached. Please try again in 44.2s.")
    msg = shell.fails("%%subchat root --backend groq\nhi")
    assert "retry in ~45 s" in msg
    assert len(groq.chat_requests()) == 1
    assert last_reply().provenance["finish_reason"] == "error: rate-limit"


def test_connection_refused_is_explained(shell, groq, monkeypatch):
    monkeypatch.setenv("GROQ_BASE_URL", "http://127.0.0.1:9")
    msg = shell.fails("%%subchat root --backend groq\nhi")
    assert "cannot reach Groq at http://127.0.0.1:9" in msg and "GROQ_BASE_URL" in msg


def test_a_stream_cut_midway_keeps_the_partial_reply(shell, groq):
    groq.configure(chunks=["one ", "two ", "three ", "four"], cut_after=2)
    msg = shell.fails("%%subchat root --backend groq\ncount")
    assert "the stream from Groq" in msg and "cut after 2 chunks" in msg
    reply = last_reply()
    assert (reply.content, reply.status) == ("one two ", "error")
    assert reply.provenance["finish_reason"] == "error: stream"
    groq.configure()
    shell.ok("%%subchat root --backend groq\ngo on")
    assert groq.chat_requests()[-1].body["messages"][-2:] == [
        {"role": "assistant", "content": "one two "}, {"role": "user", "content": "go on"}]


def test_an_error_event_midstream_is_reported(shell, groq):
    groq.configure(chunks=["one ", "two ", "three"], error_after=1, message="model overloaded")
    msg = shell.fails("%%subchat root --backend groq\ncount")
    assert "Groq" in msg and "reported an error after 1 chunk: model overloaded" in msg
    assert (last_reply().content, last_reply().provenance["finish_reason"]) == ("one ",
                                                                                "error: server")


def test_a_hanging_server_times_out(shell, groq, monkeypatch):
    # 1 s: the first chunk must beat it even on a busy machine
    monkeypatch.setenv("SUBCHAT_TIMEOUT", "1")
    groq.configure(chunks=["one ", "two"], hang_after=1)
    msg = shell.fails("%%subchat root --backend groq\ncount")
    assert "stopped sending for 1 s after 1 chunk" in msg
    assert (last_reply().content, last_reply().status) == ("one ", "error")
    monkeypatch.setenv("SUBCHAT_TIMEOUT", "0.3")
    groq.configure(hang_after=0)
    msg = shell.fails("%%subchat root --backend groq\ncount")
    assert "sent no reply within 0.3 s" in msg


def test_reasoning_is_shown_in_a_think_block(shell, groq):
    groq.configure(reasoning=["Let me ", "think."], chunks=["Four."])
    out = shell.ok("%%subchat root --backend groq\n2+2?")
    assert out.strip() == "<think>\nLet me think.\n</think>\n\nFour."
