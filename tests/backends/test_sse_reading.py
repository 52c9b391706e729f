"""How the OpenAI-style backends (``groq``, ``openai``) read the event stream: the SDK
sends the request and maps its errors; the body is read as plain JSON objects by our own
SSE reader (one pydantic model per chunk was most of a streamed token's cost). Driven
through ``%%subchat`` cells in a real shell against the loopback fake servers."""

from __future__ import annotations

import pytest

from .conftest import last_reply


@pytest.fixture(params=["groq", "openai"])
def server(request):
    return request.param, request.getfixturevalue("groq" if request.param == "groq"
                                                  else "openai_server")


def test_events_split_over_data_lines_with_comments_and_ids_are_read_whole(shell, server):
    name, fake = server
    words = [f"w{i} " for i in range(40)]
    fake.configure(chunks=words, usage=(9, 40), sse_split=True)
    out = shell.ok(f"%%subchat root --backend {name}\nCount.")
    assert out.strip() == "".join(words).strip()
    reply = last_reply()
    assert reply.content == "".join(words) and reply.status == "complete"
    p = reply.provenance
    assert (p["prompt_tokens"], p["completion_tokens"], p["finish_reason"]) == (9, 40, "stop")

