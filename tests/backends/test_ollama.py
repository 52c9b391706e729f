"""The Ollama backend, driven through the magics in a real shell, with the real ``ollama``
client talking NDJSON to a loopback fake server."""

from __future__ import annotations

from subchat_magics.testing.fakeservers import FakeOllama

from .conftest import last_reply


def test_reply_streams_from_ollama_and_records_provenance(shell, ollama):
    ollama.configure(reply="Newtons measure force.", usage=(11, 4))
    out = shell.ok("%%subchat root --backend ollama --model llama3.2\nWhat is a newton?")
    assert out.strip() == "Newtons measure force."
    reply = last_reply()
    assert (reply.role, reply.content, reply.status) == ("assistant", "Newtons measure force.",
                                                         "complete")
    p = reply.provenance
    assert p["backend"] == "ollama" and p["model"] == "llama3.2"
    assert (p["prompt_tokens"], p["completion_tokens"]) == (11, 4)
    assert p["finish_reason"] == "stop" and p["ttft_s"] >= 0 and p["duration_s"] >= p["ttft_s"]
    shown = shell.ok("%subchat show root -p")
    assert "ollama" in shown and "llama3.2" in shown


def test_subchat_request_carries_the_whole_inherited_context(shell, ollama):
    ollama.configure(reply="A newton is kg m/s².")
    shell.ok('%%subchat root --backend ollama --system "You are a physics tutor."\nWhat is a newton?')
    ollama.configure(reply="A joule is a newton metre.")
    shell.ok("%%subchat root/energy --backend ollama\nAnd a joule?")
    [req] = ollama.chat_requests()
    assert req.body["messages"] == [
        {"role": "system", "content": "You are a physics tutor."},
        {"role": "user", "content": "What is a newton?"},
        {"role": "assistant", "content": "A newton is kg m/s²."},
        {"role": "user", "content": "And a joule?"},
    ]
    assert req.body["stream"] is True


def test_generation_options_reach_the_server(shell, ollama):
    shell.ok("%%subchat root --backend ollama --model qwen3:0.6b -n 42 -t 0.3 --top-p 0.5 "
             "--seed 7\nhello")
    [req] = ollama.chat_requests()
    assert req.body["model"] == "qwen3:0.6b"
    opts = req.body["options"]
    assert opts["num_predict"] == 42 and opts["temperature"] == 0.3
    assert opts["top_p"] == 0.5 and opts["seed"] == 7
    assert req.body["think"] is False  # thinking is off unless asked for (--think), as on vLLM


def test_model_comes_from_ollama_model_else_the_newest_pulled(shell, ollama, monkeypatch):
    shell.ok("%%subchat root --backend ollama\nhello")
    assert ollama.chat_requests()[-1].body["model"] == "llama3.2:latest"  # first of /api/tags
    monkeypatch.setenv("OLLAMA_MODEL", "qwen3:0.6b")
    shell.ok("%%subchat root --backend ollama\nagain")
    assert ollama.chat_requests()[-1].body["model"] == "qwen3:0.6b"
    assert last_reply().provenance["model"] == "qwen3:0.6b"


def test_a_length_stop_is_reported(shell, ollama):
    ollama.configure(reply="one two three", finish_reason="length")
    out = shell.ok("%%subchat root --backend ollama -n 3\ncount")
    assert "stopped at max tokens" in out
    assert last_reply().provenance["finish_reason"] == "length"


def test_connection_refused_says_to_start_ollama_and_the_tree_goes_on(shell, ollama, monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", "http://127.0.0.1:9")
    msg = shell.fails("%%subchat root --backend ollama\nhello?")
    assert "cannot reach Ollama at http://127.0.0.1:9" in msg
    assert "ollama serve" in msg and "OLLAMA_HOST" in msg
    failed = last_reply()
    assert failed.status == "error" and failed.content == ""
    assert failed.provenance["finish_reason"] == "error: connection"
    monkeypatch.setenv("OLLAMA_HOST", ollama.url)
    shell.ok("%%subchat root --backend ollama\nhello again")
    # the unanswered prompt is not sent as context
    assert ollama.chat_requests()[-1].body["messages"] == [{"role": "user", "content": "hello again"}]


def test_host_forms_of_ollama_host_are_understood(shell, ollama, monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{ollama.port}")  # no scheme, like `ollama serve`
    assert shell.ok("%%subchat root --backend ollama\nhi").strip() == "Hello from the fake server."


def test_missing_model_lists_the_pulled_ones(shell, ollama):
    msg = shell.fails("%%subchat root --backend ollama --model mistral\nhi")
    assert "model 'mistral' is not pulled on Ollama" in msg
    assert "available: llama3.2:latest, qwen3:0.6b" in msg and "ollama pull mistral" in msg
    assert last_reply().provenance["finish_reason"] == "error: model"


def test_no_model_pulled_says_to_pull_one(shell, workdir, monkeypatch):
    with FakeOllama(models=[]) as empty:
        monkeypatch.setenv("OLLAMA_HOST", empty.url)
        msg = shell.fails("%%subchat root --backend ollama\nhi")
    assert "has no model pulled" in msg and "ollama pull" in msg


def test_a_server_behind_a_key_gets_it_and_a_refusal_is_explained(shell, workdir, monkeypatch):
    with FakeOllama(key="ollama-secret-key-123456") as server:
        monkeypatch.setenv("OLLAMA_HOST", server.url)
        msg = shell.fails("%%subchat root --backend ollama --model llama3.2\nhi")
        assert "refused the request (401)" in msg and "OLLAMA_API_KEY" in msg
        assert last_reply().provenance["finish_reason"] == "error: auth"
        (workdir / ".env").write_text("OLLAMA_API_KEY=ollama-secret-key-123456\n")
        assert shell.ok("%%subchat root --backend ollama --model llama3.2\nhi").strip()
        assert server.chat_requests()[-1].headers["authorization"] == \
            "Bearer ollama-secret-key-123456"


def test_rate_limit_is_retried_after_the_wait_the_server_asks(shell, ollama):
    ollama.configure(status=429, fail_times=1, retry_after="0")
    assert shell.ok("%%subchat root --backend ollama\nhi").strip() == "Hello from the fake server."
    assert len(ollama.chat_requests()) == 2
    assert last_reply().status == "complete"


def test_a_long_rate_limit_is_not_waited_for_but_reported(shell, ollama):
    ollama.configure(status=429, retry_after="30")
    msg = shell.fails("%%subchat root --backend ollama\nhi")
    assert "rate-limited by Ollama" in msg and "(429)" in msg and "retry in ~30 s" in msg
    assert len(ollama.chat_requests()) == 1
    assert last_reply().provenance["finish_reason"] == "error: rate-limit"


def test_a_stream_cut_midway_keeps_the_partial_reply_and_the_next_send_sees_it(shell, ollama):
    ollama.configure(chunks=["one ", "two ", "three ", "four ", "five"], cut_after=3)
    result, cap = shell.run("%%subchat root --backend ollama\ncount to five")
    msg = str(result.error_in_exec)
    assert "the stream from Ollama at" in msg and "cut after 3 chunks" in msg
    assert "error: partial reply kept in root" in cap.stdout
    cut = last_reply()
    assert (cut.content, cut.status) == ("one two three ", "error")
    assert cut.provenance["finish_reason"] == "error: stream"
    ollama.configure(reply="four five")
    shell.ok("%%subchat root --backend ollama\ngo on")
    assert ollama.chat_requests()[-1].body["messages"] == [
        {"role": "user", "content": "count to five"},
        {"role": "assistant", "content": "one two three "},
        {"role": "user", "content": "go on"},
    ]


def test_a_stream_that_ends_without_its_done_line_is_not_taken_as_complete(shell, ollama):
    ollama.configure(chunks=["one ", "two ", "three"], end_after=2)
    msg = shell.fails("%%subchat root --backend ollama\ncount")
    assert "cut after 2 chunks" in msg and "done" in msg
    assert (last_reply().content, last_reply().status) == ("one two ", "error")


def test_an_error_line_midstream_is_reported_and_the_partial_reply_kept(shell, ollama):
    ollama.configure(chunks=["alpha ", "beta ", "gamma"], error_after=2,
                     message="CUDA error: out of memory")
    msg = shell.fails("%%subchat root --backend ollama\nletters")
    assert "reported an error after 2 chunks: CUDA error: out of memory" in msg
    reply = last_reply()
    assert (reply.content, reply.status) == ("alpha beta ", "error")
    assert reply.provenance["finish_reason"] == "error: server"


def test_a_server_that_hangs_before_answering_times_out(shell, ollama, monkeypatch):
    monkeypatch.setenv("SUBCHAT_TIMEOUT", "0.3")
    ollama.configure(hang_after=0)
    msg = shell.fails("%%subchat root --backend ollama\nhello")
    assert "sent no reply within 0.3 s" in msg and "SUBCHAT_TIMEOUT" in msg
    assert last_reply().provenance["finish_reason"] == "error: timeout"


def test_a_server_that_hangs_midstream_times_out_and_keeps_the_partial_reply(shell, ollama,
                                                                            monkeypatch):
    monkeypatch.setenv("SUBCHAT_TIMEOUT", "1")  # the first chunks must beat it on a busy machine
    ollama.configure(chunks=["slow ", "and ", "then ", "nothing"], hang_after=2)
    msg = shell.fails("%%subchat root --backend ollama\nhello")
    assert "stopped sending for 1 s after 2 chunks" in msg
    assert (last_reply().content, last_reply().status) == ("slow and ", "error")
    ollama.configure()
    assert shell.ok("%%subchat root --backend ollama\nagain").strip() == "Hello from the fake server."


def test_a_server_error_status_is_reported(shell, ollama):
    ollama.configure(status=500)
    msg = shell.fails("%%subchat root --backend ollama\nhello")
    assert "failed (500): llama runner process has terminated" in msg


def test_a_bad_timeout_setting_is_named(shell, ollama, monkeypatch):
    monkeypatch.setenv("SUBCHAT_TIMEOUT", "soon")
    msg = shell.fails("%%subchat root --backend ollama\nhello")
    assert "SUBCHAT_TIMEOUT must be a number of seconds" in msg


def test_fanout_sends_concurrent_requests_with_their_own_seeds(shell, ollama):
    shell.ok("%%subchat root --backend ollama\nstart")
    shell.ok("%%subchat root --backend ollama --fanout 3 --var answers\nName a colour.")
    reqs = ollama.chat_requests()[1:]
    assert sorted(r.body["options"]["seed"] for r in reqs) == [1, 2, 3]
    assert all(r.body["messages"][-1] == {"role": "user", "content": "Name a colour."} for r in reqs)
    assert shell.ns["answers"] == ["Hello from the fake server."] * 3


def test_think_asks_for_thinking_and_shows_it_in_a_think_block(shell, ollama):
    ollama.configure(reasoning=["Two and ", "two."], chunks=["Four."])
    out = shell.ok("%%subchat root --backend ollama --think\n2+2?")
    assert out.strip() == "<think>\nTwo and two.\n</think>\n\nFour."
    assert ollama.chat_requests()[-1].body["think"] is True
    assert last_reply().content == "<think>\nTwo and two.\n</think>\n\nFour."


def test_lines_and_characters_cut_between_reads_stream_whole(shell, ollama):
    """Our NDJSON reader splits the body's bytes itself: a line cut between reads, a
    character's bytes cut apart, CRLF ends and blank lines all give the server's text."""
    words = ["héllo ", "wörld ", "✓ ", "😀 ", "naïve ", "end"]
    ollama.configure(chunks=words, usage=(5, 6), split_bytes=3)
    out = shell.ok("%%subchat root --backend ollama --model llama3.2\nSay it.")
    assert out.strip() == "".join(words)
    reply = last_reply()
    assert reply.content == "".join(words) and reply.status == "complete"
    assert (reply.provenance["prompt_tokens"], reply.provenance["completion_tokens"]) == (5, 6)
