"""Where a chat becomes tokens: as-it-ran rendering (prefix reuse), thinking, the ChatML
fallback and fitting the window, with the tiny model's Qwen3 tokenizer and template
(transformers only; no engine)."""

from __future__ import annotations

import pytest

from subchat_magics.errors import InvalidInput
from subchat_magics.prompting import CHATML_TEMPLATE, PromptBuilder, ran_with_thinking


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


SYSTEM = {"role": "system", "content": "Be brief."}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def generated(tok, text, stop=True):
    """The ids a model would have generated for ``text``, ending with <|im_end|>."""
    return tok.encode(text, add_special_tokens=False) + ([tok.convert_tokens_to_ids("<|im_end|>")] if stop else [])


def test_a_child_prompt_begins_with_the_exact_tokens_its_parent_ran(tok):
    b = PromptBuilder(tok, 4096)
    chat = [SYSTEM, user("Tell me about rivers.")]
    for turn in range(3):
        ids, exact = b.token_ids(chat)
        assert exact
        reply = f"Rivers flow north {turn} times"
        gen = generated(tok, reply)
        b.remember(ids, reply, gen)
        chat = chat + [assistant(reply), user(f"And then {turn}?")]
        child, exact = b.token_ids(chat)
        assert exact and child[:len(ids) + len(gen)] == ids + gen


def test_the_plain_template_render_would_lose_the_parents_last_answer(tok):
    # why rendering as-it-ran is needed: Qwen3's template drops the empty think block
    # of an earlier turn, so a plain re-render diverges where the parent's answer began
    b = PromptBuilder(tok, 4096)
    parent = b.render_text([user("Tell me about rivers.")])
    assert parent.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    plain = b.render_text([user("Tell me about rivers."), assistant("They flow."), user("More?")])
    assert not plain.startswith(parent + "They flow.")
    ids, _ = b.token_ids([user("Tell me about rivers."), assistant("They flow."), user("More?")])
    assert tok.decode(ids).startswith(parent + "They flow.<|im_end|>")


def test_without_remembered_ids_the_text_is_encoded_to_the_same_prompt(tok):
    with_memory, fresh = PromptBuilder(tok, 4096), PromptBuilder(tok, 4096)
    chat = [SYSTEM, user("Tell me about rivers.")]
    ids, _ = with_memory.token_ids(chat)
    with_memory.remember(ids, "They flow north", generated(tok, "They flow north"))
    chat += [assistant("They flow north"), user("Why?")]
    assert with_memory.token_ids(chat) == fresh.token_ids(chat)


def test_remembered_ids_that_do_not_read_as_the_reply_are_not_used(tok):
    b = PromptBuilder(tok, 4096)
    ids, _ = b.token_ids([user("Hi")])
    b.remember(ids, "They flow", generated(tok, "They flow north"))  # e.g. a stop string cut it
    child, _ = b.token_ids([user("Hi"), assistant("They flow"), user("Why?")])
    assert tok.decode(child).startswith(tok.decode(ids) + "They flow<|im_end|>\n<|im_start|>user\nWhy?")


def test_an_interrupted_reply_is_continued_as_it_ran(tok):
    b = PromptBuilder(tok, 4096)
    ids, _ = b.token_ids([user("Hi")])
    gen = generated(tok, "They fl", stop=False)
    b.remember(ids, "They fl", gen)
    child, exact = b.token_ids([user("Hi"), assistant("They fl"), user("Go on")])
    assert exact and child[:len(ids) + len(gen)] == ids + gen
    assert tok.decode(child[len(ids) + len(gen):]).startswith("<|im_end|>\n<|im_start|>user\nGo on")


def test_thinking_changes_the_generation_prompt_and_earlier_turns_keep_theirs(tok):
    b = PromptBuilder(tok, 4096)
    on, _ = b.token_ids([user("Why?")], think=True)
    off, _ = b.token_ids([user("Why?")], think=False)
    assert tok.decode(on).endswith("<|im_start|>assistant\n")
    assert tok.decode(off).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    thought = "<think>\nThe sky.\n</think>\n\nBecause."
    assert ran_with_thinking(thought) and not ran_with_thinking("Because.")
    # a turn that ran with thinking is continued with its own prompt and think block,
    # even when the next request has thinking off
    child, _ = b.token_ids([user("Why?"), assistant(thought), user("Sure?")], think=False)
    assert tok.decode(child).startswith(tok.decode(on) + thought + "<|im_end|>")
    assert tok.decode(child).endswith("<think>\n\n</think>\n\n")


def test_a_tokenizer_without_a_chat_template_gets_chatml(tok):
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(tok.name_or_path)
    bare.chat_template = None
    b = PromptBuilder(bare, 4096)
    assert b.chat_template == CHATML_TEMPLATE
    ids, exact = b.token_ids([SYSTEM, user("Hi"), assistant("Hello"), user("Bye")])
    assert exact
    assert tok.decode(ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                               "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                               "<|im_start|>assistant\n")


def test_a_template_that_rewrites_replies_falls_back_to_its_plain_render(tok):
    upper = ("{%- for m in messages %}{{ m.role + ': ' + (m.content | upper) + '\\n' }}{%- endfor %}"
             "{%- if add_generation_prompt %}assistant:{%- endif %}")
    b = PromptBuilder(tok, 4096, chat_template=upper)
    ids, exact = b.token_ids([user("hi"), assistant("hello"), user("bye")])
    assert not exact
    assert tok.decode(ids) == "user: HI\nassistant: HELLO\nuser: BYE\nassistant:"


def long_chat(turns, words=60):
    chat = [SYSTEM]
    for i in range(turns):
        chat += [user(f"Question {i}: " + "the river " * words), assistant("answer " * 20)]
    return chat + [user("The last question?")]


def test_the_oldest_turns_are_dropped_below_the_system_prompt_to_fit(tok):
    b = PromptBuilder(tok, 1024)
    chat = long_chat(10)
    full = b.count(chat)
    assert full + 100 > 1024
    p = b.build(chat, 100)
    assert p.length + 100 <= 1024 and p.max_tokens == 100
    assert p.messages[0] == SYSTEM and p.messages[1]["content"].startswith(f"Question {p.dropped_turns}:")
    assert p.messages[-1] == user("The last question?")
    assert p.dropped_messages == 2 * p.dropped_turns
    assert p.notes == [f"dropped the {p.dropped_turns} oldest turns ({p.dropped_messages} messages) "
                       "to fit max_model_len 1024"]
    # the fewest: one turn fewer would not fit
    fewer = [SYSTEM] + chat[1 + 2 * (p.dropped_turns - 1):]
    assert b.count(fewer) + 100 > 1024


def test_a_chat_that_fits_is_sent_whole(tok):
    p = PromptBuilder(tok, 4096).build(long_chat(2), 100)
    assert p.dropped_turns == 0 and p.notes == [] and p.max_tokens == 100


def test_when_only_the_newest_message_is_left_max_tokens_is_lowered(tok):
    b = PromptBuilder(tok, 256)
    msg = [SYSTEM, user("the river " * 80)]
    n = b.count(msg)
    assert n < 256 < n + 200
    p = b.build(msg, 200)
    assert p.max_tokens == 256 - n
    assert p.notes == [f"max_tokens lowered from 200 to {256 - n} to fit max_model_len 256"]


def test_a_message_that_cannot_fit_is_a_clear_error(tok):
    b = PromptBuilder(tok, 256)
    with pytest.raises(InvalidInput) as err:
        b.build([SYSTEM, assistant("a"), user("the river " * 300)], 10)
    msg = str(err.value)
    assert "too long" in msg and "max_model_len is 256" in msg and "--max-model-len" in msg


# -- a batch's rows: the chat rendered once around its last message ------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

words = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


@settings(max_examples=200, deadline=None)
@given(before=st.lists(st.tuples(st.sampled_from(["user", "assistant"]), words), max_size=4),
       last=words, system=st.one_of(st.none(), words), think=st.booleans())
def test_a_row_rendered_around_its_message_is_the_templates_own_render(tok, before, last,
                                                                       system, think):
    """Rows differ only in their last message: its render is made once around it, and
    must be, for any text, exactly what the template renders for the whole chat (text it
    might trim or test is rendered whole)."""
    b = PromptBuilder(tok, 4096)
    chat = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": r, "content": c} for r, c in before] + [user(last)]
    want = b._render(chat, think)
    assert b.render_text(chat, think=think) == want
    assert b.render_text(chat, think=think) == want  # (the second time from the frame)
    other = chat[:-1] + [user(last + " again")]
    assert b.render_text(other, think=think) == b._render(other, think)


def test_a_template_that_trims_or_tests_the_message_is_rendered_whole(tok):
    upper = "{% for m in messages %}<{{ m.role }}>{{ m.content | upper }}{% endfor %}"
    b = PromptBuilder(tok, 4096, chat_template=upper)
    assert b.render_text([user("say x")]) == "<user>SAY X"
    assert b.render_text([user("say y")]) == "<user>SAY Y"
    tests = ("{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}"
             "{% if m.content.startswith('<tool_response>') %}!{% endif %}"
             "{% if '/no_think' in m.content %}?{% endif %}{% endfor %}")
    b = PromptBuilder(tok, 4096, chat_template=tests)
    assert b.render_text([user("say y")]) == "<user>say y"
    assert b.render_text([user("  say y ")]) == "<user>say y"  # trimmed: rendered whole
    assert b.render_text([user("<tool_response>x</tool_response>")]) == \
        "<user><tool_response>x</tool_response>!"
    assert b.render_text([user("hi /no_think")]) == "<user>hi /no_think?"


@settings(max_examples=200, deadline=None)
@given(text=words)
def test_the_builder_encodes_as_transformers_does(tok, text):
    """The builder encodes with the Rust tokenizer under transformers' (cheaper, and no
    GIL hand-off a row): the very ids transformers gives, for any text."""
    b = PromptBuilder(tok, 4096)
    ids = tok.encode(text, add_special_tokens=False)
    assert b.encode(text) == ids
    assert b._decode_all(ids) == tok.decode(ids, skip_special_tokens=False,
                                            clean_up_tokenization_spaces=False)
    assert b._fast  # (the fast way is the one in use for this tokenizer)


def test_a_batchs_rows_get_the_ids_each_chat_gets_alone(tok):
    # the rows share all but their last message: what they share is found once, each
    # row's own part encoded (one by one, or a group together ahead); every prompt is the
    # one a fresh builder gives that chat on its own
    base = [SYSTEM, user("Answer each question with one word."), assistant("Sure.")]
    messages = ["Q0: Is 0 even?", "Q1: 日本語 ✓ 3.14", "Q2: a  b\tc", "Q3: Is 3 odd? Why.", "Q2: a  b\tc"]
    for think in (False, True):
        b = PromptBuilder(tok, 4096)
        ids, _ = b.token_ids(base[:2], think=think)
        b.remember(ids, "Sure.", generated(tok, "Sure."))
        alone = []
        for m in messages:
            fresh = PromptBuilder(tok, 4096)
            fresh._generated = b._generated  # (the same memory of what ran)
            alone.append(fresh.token_ids(base + [user(m)], think=think))
        assert [b.token_ids(base + [user(m)], think=think) for m in messages] == alone
        with b.rows_encoded([base + [user(m)] for m in messages], think):
            assert [b.token_ids(base + [user(m)], think=think) for m in messages] == alone
        assert all(exact for _, exact in alone)
