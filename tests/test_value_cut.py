"""A value cut at ``max_value_chars`` never splits what reads as one character (issue 20):
an accent written as a combining mark stays with its letter, an emoji with its skin tone
or ZWJ sequence, a flag's two regional indicators together; the note counts exactly what
was left out. A property over random text, and a batch through the real shell."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from subchat_magics.session import default_session
from subchat_magics.values import boundary, cut

PIECES = ["a", "é", "e\u0301", "n\u0303\u0323", "👍", "👍🏽", "🇫🇷", "🇩🇪",
          "👨\u200d👩\u200d👧", "❤\ufe0f", "\r\n", " ", "中", "ß"]


def clusters(text_pieces: list[str]) -> set[int]:
    """The places between pieces: where a cut may fall."""
    out, pos = {0}, 0
    for p in text_pieces:
        pos += len(p)
        out.add(pos)
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), min_size=1, max_size=60), st.integers(1, 200))
def test_a_cut_falls_between_characters_and_counts_what_it_left_out(pieces, chars):
    text = "".join(pieces)
    out = cut(text, chars)
    if len(text) <= chars:
        assert out == text
        return
    kept, _, note = out.partition("\n… (")
    assert text.startswith(kept)
    assert len(kept) in clusters(pieces)  # never inside one piece
    assert chars - len(kept) < 12  # (the longest piece is 8 characters)
    assert note == f"{len(text) - len(kept)} more characters left out)"
    # a cut both ends keep, too
    both = cut(text, chars, keep="ends")
    head, _, rest = both.partition("\n… (")
    left, _, tail = rest.partition(" characters left out) …\n")
    assert len(head) in clusters(pieces) and len(text) - len(tail) in clusters(pieces)
    assert text.startswith(head) and text.endswith(tail)
    assert int(left) == len(text) - len(head) - len(tail)


def test_boundary_steps_back_over_a_combining_accent_and_a_flag():
    text = "cafe\u0301 🇫🇷"
    assert boundary(text, 4) == 3  # (before "e", not between "e" and its accent)
    assert boundary(text, 7) == 6  # (before the flag, not between its two halves)
    assert boundary(text, 5) == 5


def test_a_batch_row_cut_on_an_accent_keeps_the_accent_with_its_letter(shell):
    shell.ok("%config SubchatMagics.max_value_chars = 9")
    shell.ns["docs"] = ["cafe\u0301" * 5, "short"]  # the cut at 9 falls before an accent
    out = shell.ok("%%subchat root --each docs --backend echo\n[{item}]")
    assert "note: 1 row(s) had a value cut at max_value_chars" in out
    sent = default_session().tree.get("root/docs/0").messages[0].content
    kept = sent[1:sent.index("\n")]
    assert kept == "cafe\u0301caf"  # 8 characters: no "e" cut from its accent
    assert "(17 more characters left out)" in sent


def test_a_reply_stopped_inside_a_character_keeps_no_replacement_character(shell, workdir,
                                                                             monkeypatch):
    # a byte-level model stopped at max tokens after the first byte of "é": the server
    # (vLLM's OpenAI server does this) sends U+FFFD for the bytes that never completed
    from subchat_magics.testing.fakeservers import FakeOpenAI

    with FakeOpenAI() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        server.configure(chunks=["Il ", "était ", "une ", "fois, ", "\ufffd"],
                         finish_reason="length")
        shell.ns["qs"] = ["a", "b"]
        out = shell.ok("%%subchat root --each qs --as out --backend openai -n 5\n{item}")
    assert shell.ns["out"] == ["Il était une fois, "] * 2
    assert "\ufffd" not in out
    reply = default_session().tree.get("root/qs/0").messages[1]
    assert reply.content == "Il était une fois, "
    assert any("U+FFFD" in n for n in reply.provenance["notes"])
