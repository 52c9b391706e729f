"""The OpenAI-compatible backend (``vllm serve``, llama.cpp, LM Studio...), driven through
the magics in a real shell, with the real ``openai`` client talking SSE to a loopback
fake server."""

from __future__ import annotations

from .conftest import last_reply


def test_the_servers_first_model_is_used_and_usage_recorded(shell, openai_server):
    openai_server.cached_tokens = 16
    openai_server.configure(reply="Hi from vLLM.", usage=(30, 4))
    assert shell.ok("%%subchat root --backend openai\nhello").strip() == "Hi from vLLM."
    [req] = openai_server.chat_requests()
    assert req.body["model"] == "Qwen/Qwen3-0.6B"  # first of /v1/models
    assert req.body["stream_options"] == {"include_usage": True}
    assert req.headers["authorization"] == "Bearer EMPTY"  # no key needed locally
    p = last_reply().provenance
    assert (p["backend"], p["model"]) == ("openai", "Qwen/Qwen3-0.6B")
    assert (p["prompt_tokens"], p["completion_tokens"], p["cached_tokens"]) == (30, 4, 16)


def test_model_and_key_come_from_the_settings(shell, openai_server, monkeypatch):
    monkeypatch.setenv("OPENAI_MODEL", "other-model")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-local-0123456789abcdef")
    shell.ok("%%subchat root --backend openai -n 9 --seed 3\nhello")
    req = openai_server.chat_requests()[-1]
    assert req.body["model"] == "other-model" and req.body["max_tokens"] == 9
    assert req.body["seed"] == 3
    assert req.headers["authorization"] == "Bearer sk-local-0123456789abcdef"


def test_subchat_request_carries_the_whole_inherited_context(shell, openai_server):
    shell.ok("%%subchat root --backend openai\nfirst")
    openai_server.configure(reply="second answer")
    shell.ok("%%subchat root/b --backend openai\nsecond")
    shell.ok("%%subchat root/b/c --backend openai\nthird")
    assert openai_server.chat_requests()[-1].body["messages"] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "Hello from the fake server."},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "second answer"},
        {"role": "user", "content": "third"},
    ]


def test_a_server_that_wants_a_key_says_so(shell, workdir, monkeypatch):
    from subchat_magics.testing.fakeservers import FakeOpenAI

    with FakeOpenAI(key="sk-needed-0123456789") as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        msg = shell.fails("%%subchat root --backend openai --model other-model\nhi")
        assert "wants a key (401)" in msg and "OPENAI_API_KEY" in msg
        monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-0123456789")
        msg = shell.fails("%%subchat root --backend openai --model other-model\nhi")
        assert "OPENAI_API_KEY was rejected (401)" in msg and "sk-wrong" not in msg


def test_an_unknown_model_lists_the_served_ones(shell, openai_server):
    msg = shell.fails("%%subchat root --backend openai --model llama-9\nhi")
    assert "model 'llama-9' is not served by the server at" in msg
    assert "available: Qwen/Qwen3-0.6B, other-model" in msg


def test_a_base_url_without_v1_is_pointed_out(shell, openai_server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", openai_server.url)  # forgot the /v1
    msg = shell.fails("%%subchat root --backend openai --model other-model\nhi")
    assert "is OPENAI_BASE_URL right? (it usually ends in /v1)" in msg
    msg = shell.fails("%%subchat root --backend openai\nhi")  # finding the default model
    assert "answered 404 to /models" in msg and "ends in /v1" in msg


def test_nothing_configured_says_what_to_set(shell, workdir):
    msg = shell.fails("%%subchat root --backend openai\nhi")
    assert "set OPENAI_BASE_URL" in msg and "OPENAI_API_KEY" in msg


def test_connection_refused_is_explained(shell, openai_server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    msg = shell.fails("%%subchat root --backend openai --model m\nhi")
    assert "cannot reach the server at http://127.0.0.1:9/v1" in msg and "OPENAI_BASE_URL" in msg


def test_a_server_without_stream_options_still_answers(shell, openai_server):
    openai_server.configure(status=400, fail_times=1,
                            message="Unrecognized request argument supplied: stream_options")
    assert shell.ok("%%subchat root --backend openai\nhi").strip() == "Hello from the fake server."
    first, second = openai_server.chat_requests()
    assert "stream_options" in first.body and "stream_options" not in second.body


def test_a_bad_request_is_reported_with_the_servers_reason(shell, openai_server):
    openai_server.configure(status=400, message="This model's maximum context length is 4096 tokens")
    msg = shell.fails("%%subchat root --backend openai\nhi")
    assert "rejected the request (400): This model's maximum context length is 4096" in msg
    assert last_reply().provenance["finish_reason"] == "error: request"


def test_rate_limit_is_retried_then_reported(shell, openai_server):
    openai_server.configure(status=429, fail_times=1, retry_after="0")
    assert shell.ok("%%subchat root --backend openai\nhi").strip()
    openai_server.configure(status=429, retry_after="12")
    msg = shell.fails("%%subchat root --backend openai\nhi")
    assert "(429)" in msg and "retry in ~12 s" in msg


def test_a_stream_cut_midway_keeps_the_partial_reply(shell, openai_server):
    openai_server.configure(chunks=["a ", "b ", "c ", "d"], cut_after=3)
    msg = shell.fails("%%subchat root --backend openai\nletters")
    assert "cut after 3 chunks" in msg
    assert (last_reply().content, last_reply().status) == ("a b c ", "error")
    assert last_reply().provenance["finish_reason"] == "error: stream"


def test_a_stream_without_a_finish_reason_is_not_taken_as_complete(shell, openai_server):
    openai_server.configure(chunks=["a ", "b ", "c"], end_after=2)
    msg = shell.fails("%%subchat root --backend openai\nletters")
    assert "cut after 2 chunks" in msg and "finish reason" in msg
    assert last_reply().status == "error"


def test_an_error_event_midstream_is_reported(shell, openai_server):
    openai_server.configure(chunks=["a ", "b ", "c"], error_after=2, message="engine died")
    msg = shell.fails("%%subchat root --backend openai\nletters")
    assert "reported an error after 2 chunks: engine died" in msg
    assert (last_reply().content, last_reply().status) == ("a b ", "error")


def test_a_hanging_server_times_out_and_the_next_send_works(shell, openai_server, monkeypatch):
    monkeypatch.setenv("SUBCHAT_TIMEOUT", "0.3")
    openai_server.configure(hang_after=0)
    msg = shell.fails("%%subchat root --backend openai\nhi")
    assert "sent no reply within 0.3 s" in msg
    monkeypatch.setenv("SUBCHAT_TIMEOUT", "1")  # the first chunk must beat it on a busy machine
    openai_server.configure(chunks=["a ", "b"], hang_after=1)
    msg = shell.fails("%%subchat root --backend openai\nhi")
    assert "stopped sending for 1 s after 1 chunk" in msg
    openai_server.configure()
    assert shell.ok("%%subchat root --backend openai\nhi").strip() == "Hello from the fake server."


def test_reasoning_content_is_shown_in_a_think_block(shell, openai_server):
    openai_server.configure(reasoning=["hmm"], chunks=["Yes."])
    assert shell.ok("%%subchat root --backend openai\nok?").strip() == \
        "<think>\nhmm\n</think>\n\nYes."
