"""The fitting rule (issue 20), as a property over random chats: a batch row
(``keep_context``) is sent whole or not at all, its reply room lowered only to what the
window leaves and never below what its answer needs; a chat drops the fewest oldest turns,
and never for room its answer (``need``) could not use. ``measure`` counts characters,
standing in for a tokenizer (``fit_window`` takes any counter: the engine's or Ollama's
estimate)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from subchat_magics.errors import InvalidInput
from subchat_magics.prompting import TOO_LONG, fit_window


def measure(kept):
    return sum(len(m["content"]) + 4 for m in kept), None


def too_long(system, newest):
    return "the message is too long"


chats = st.builds(
    lambda system, turns, last: ([{"role": "system", "content": system}] if system else [])
    + [m for u, a in turns for m in ({"role": "user", "content": u},
                                     {"role": "assistant", "content": a})]
    + [{"role": "user", "content": last}],
    st.text(max_size=40), st.lists(st.tuples(st.text(max_size=60), st.text(max_size=60)),
                                    max_size=6),
    st.text(min_size=1, max_size=300))


@settings(max_examples=400, deadline=None)
@given(chats, st.integers(1, 400), st.integers(20, 600), st.none() | st.integers(1, 20))
def test_a_batch_row_is_sent_whole_or_fails_saying_so(msgs, max_tokens, limit, need):
    whole = measure(msgs)[0]
    least = min(need, max_tokens) if need else 1
    try:
        fit = fit_window(msgs, max_tokens, limit, measure, too_long, need=need,
                         keep_context=True)
    except InvalidInput as exc:
        assert str(exc).startswith(TOO_LONG) and whole + least > limit
        return
    assert fit.messages == msgs and fit.dropped_turns == 0  # never a turn dropped
    assert fit.length + fit.max_tokens <= limit and fit.max_tokens <= max_tokens
    assert fit.max_tokens >= least
    lowered = [n for n in fit.notes if n.startswith("max_tokens lowered")]
    reserve = min(max_tokens, need) if need else max_tokens
    assert bool(lowered) == (fit.max_tokens < reserve)


@settings(max_examples=400, deadline=None)
@given(chats, st.integers(1, 400), st.integers(20, 600), st.none() | st.integers(1, 20))
def test_a_chat_drops_the_fewest_turns_and_never_for_room_its_answer_cannot_use(
        msgs, max_tokens, limit, need):
    reserve = min(max_tokens, need) if need else max_tokens
    try:
        fit = fit_window(msgs, max_tokens, limit, measure, too_long, need=need)
    except InvalidInput:
        return
    assert fit.messages[-1] == msgs[-1] and fit.length + fit.max_tokens <= limit
    if fit.dropped_turns:
        # one turn fewer dropped would not have left the reserve
        head = 1 if msgs[0]["role"] == "system" else 0
        starts = [i for i in range(head, len(msgs)) if msgs[i]["role"] == "user"]
        kept_one_more = msgs[:head] + msgs[starts[fit.dropped_turns - 1]:]
        assert measure(kept_one_more)[0] + reserve > limit


def test_no_message_is_an_error():
    with pytest.raises(InvalidInput):
        fit_window([], 10, 100, measure, too_long, keep_context=True)
