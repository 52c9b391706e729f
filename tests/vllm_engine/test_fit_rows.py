"""Fitting a batch row (issue 20) with the tiny model's tokenizer: the row keeps its
context, its reply room is lowered or it fails; a choice reserves only what its answer can
use (transformers only; no engine)."""

from __future__ import annotations

import pytest

from subchat_magics.errors import InvalidInput
from subchat_magics.prompting import PromptBuilder

from .test_prompting import long_chat, user

pytestmark = pytest.mark.vllm  # (the full environment: transformers and the tiny model)


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


def test_a_batch_row_keeps_its_context_its_reply_room_lowered_or_it_fails(tok):
    # issue 20: the parent's turns hold the batch's instructions; a row never loses them
    b = PromptBuilder(tok, 1024)
    chat = long_chat(3, words=40)[:-1] + [user("the river " * 150)]
    n = b.count(chat)
    assert n + 1000 > 1024 > n + 10
    dropping = b.build(chat, 1000)  # a chat: the oldest turns go to make room for 1000
    assert dropping.dropped_turns > 0
    # a --choice needs a few tokens: nothing is dropped, no note (no loss), all kept
    p = b.build(chat, 1000, need=4, keep_context=True)
    assert p.messages == chat and p.dropped_turns == 0 and p.notes == []
    assert p.max_tokens == 1024 - n
    # free text: the reply room is lowered, said in a note; the context stays whole
    p = b.build(chat, 1000, keep_context=True)
    assert p.messages == chat and p.notes == [
        f"max_tokens lowered from 1000 to {1024 - n} to fit max_model_len 1024"]
    # no room for the answer the choice needs: a clear error, nothing dropped
    with pytest.raises(InvalidInput) as err:
        b.build(chat, 1000, need=1024 - n + 1, keep_context=True)
    assert str(err.value).startswith(f"too long to answer with its context: {n} prompt tokens")
    assert "no context was dropped" in str(err.value)


def test_a_choice_reserves_only_what_its_answer_can_use_before_dropping_turns(tok):
    b = PromptBuilder(tok, 1024)
    chat = long_chat(3, words=40)[:-1] + [user("the river " * 150)]
    p = b.build(chat, 1000, need=4)  # a single --choice cell: every turn still fits
    assert p.dropped_turns == 0 and p.notes == [] and p.max_tokens == 1024 - b.count(chat)
