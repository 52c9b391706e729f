"""A batch row's prompt is the one its chat would get alone: the batch's shared prefix,
its system prompt found once and the rows' tails encoded together (one Rust tokenizer
call a group) must not change a single token of what vLLM is handed, for odd row texts,
every source of the system prompt, constraints, thinking, reruns and a parent whose last
reply was cut. Each prompt is compared with what a single cell into the same context
sends, and with a fresh builder's render of the row's stored chat."""

from __future__ import annotations

import contextlib
import random

import pytest

from subchat_magics.prompting import PromptBuilder
from subchat_magics.session import default_session
from subchat_magics.testing import store_rows

pytestmark = pytest.mark.vllm

ODD = ["  lead space", "trail space  ", "\nnewline first", "last newline\n", "emoji 🎉🙂",
       "<|im_start|>user\nfake", "x<|im_end|>", "<think>\nhm\n</think>\n\nok", "a", ".",
       "tab\tin", "日本語 ✓", "  ", "Q: a  b\tc"]


@contextlib.contextmanager
def recorded(engine):
    """The prompt ids vLLM's engine is handed (read at vLLM's own add_request)."""
    eng = engine.driver._eng
    got: list[list[int]] = []
    orig = eng.add_request

    def add(rid, prompt, params, *a, **k):
        ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else getattr(
            prompt, "prompt_token_ids", None)
        got.append(list(ids))
        return orig(rid, prompt, params, *a, **k)

    eng.add_request = add
    try:
        yield got
    finally:
        del eng.add_request


def reference(engine, path, max_tokens=4):
    """What a fresh builder (the same memory of generated ids) makes of a chat's stored
    context up to its last user message."""
    tree = default_session().tree
    msgs = tree.context(tree.get(path))
    while msgs and msgs[-1]["role"] != "user":
        msgs.pop()
    fresh = PromptBuilder(engine.builder.tokenizer, engine.max_model_len)
    fresh._generated = engine.builder._generated
    return fresh.build(msgs, max_tokens, think=engine.think).token_ids


def batch_and_singles(sh, engine, parent, items, flags=""):
    """(the batch's prompts, the fresh builder's, those of single cells with each row's
    text into new chats under ``parent``), each sorted."""
    sh.ns["xs"] = list(items)
    with recorded(engine) as batch:
        sh.ok(f"%%subchat {parent} --each xs --as out -n 4 {flags}\n{{item}}")
    tree = default_session().tree
    rows = [c.path for c in tree.children(tree.get(f"{parent}/xs"))]
    texts = [tree.get(p).messages[0].content for p in rows]
    singles = []
    for i, t in enumerate(texts):
        sh.ns["_t"] = t
        with recorded(engine) as one:
            sh.run(f"%%subchat {parent}/single{i} -n 4 {flags}\n{{_t}}")
        singles += one
    return sorted(batch), sorted(reference(engine, p) for p in rows), sorted(singles)


def test_odd_rows_under_earlier_turns_and_a_cut_reply(vshell, engine):
    vshell.ok("%%subchat root/p -n 6\nTell me about rivers.")
    vshell.ok("%%subchat root/p -n 6 --think\nAnd lakes?")
    result, _, _ = vshell.run_cut("%%subchat root/p -n 40 -t 0.9 --seed 1\nAnd seas, at length?", 3)
    assert not result.success
    batch, ref, singles = batch_and_singles(vshell, engine, "root/p", ODD)
    assert len(batch) == len(ODD) - 1  # ("  " is skipped: an empty message)
    assert batch == ref == singles


def test_rows_encoded_ahead_are_the_ids_each_chat_gets(vshell, engine):
    # a single cell first: the rows' shared part is known, so each group's tails are
    # encoded together ahead of the rows
    rnd = random.Random(7)
    chars = "abc xyz  \t\n.,;:!?'\"-_=+*&^$@~`éßøΩЖ中文日本語한국어🎉🙂👍🏽\u200b\u00a0\u3000\u0301"
    items = ["".join(rnd.choice(chars) for _ in range(rnd.randint(1, 12))) for _ in range(50)]
    vshell.ok("%%subchat root/a -n 6\nTell me about rivers.")
    vshell.ok("%%subchat root/a/first -n 4\nwarm up")
    vshell.ns["xs"] = items
    with recorded(engine) as batch:
        vshell.ok("%%subchat root/a --each xs --as out -n 4\n{item}")
    tree = default_session().tree
    rows = tree.children(tree.get("root/a/xs"))
    assert len(batch) == len(rows) >= 45
    assert sorted(batch) == sorted(reference(engine, c.path) for c in rows)


@pytest.mark.parametrize("flags", ["--choice yes,no", "--regex '[a-z]{1,4}'", "--json",
                                   "--think", "--vote 3 --choice yes,no"])
def test_rows_under_a_constraint_or_thinking(vshell, engine, flags):
    vshell.ok("%%subchat root/f -n 6 -s 'Be brief.'\nTell me about rivers.")
    batch, _, singles = batch_and_singles(vshell, engine, "root/f", ODD[:6], flags)
    assert len(batch) >= 6 and sorted(set(map(tuple, batch))) == sorted(set(map(tuple, singles)))


@pytest.mark.parametrize("setup", ["config", "parent", "grandparent", "batch -s", "config and parent"])
def test_each_source_of_the_system_prompt(vshell, engine, setup):
    config = setup.startswith("config")
    if config:
        vshell.ok('%config SubchatMagics.system_prompt = "Config says hi."')
    try:
        parent = "root/g/p" if setup == "grandparent" else "root/p"
        if setup == "grandparent":
            vshell.ok("%%subchat root/g -n 3 -s 'Grand says.'\nhello")
        own = " -s 'Parent says.'" if setup in ("parent", "config and parent") else ""
        vshell.ok(f"%%subchat {parent} -n 3{own}\nhello")
        flag = " -s 'Batch says.'" if setup == "batch -s" else ""
        vshell.ns["xs"] = ["one", "two"]
        with recorded(engine) as batch:
            vshell.ok(f"%%subchat {parent} --each xs --as out -n 3{flag}\n{{item}}")
        with recorded(engine) as one:
            vshell.ok(f"%%subchat {parent}/alone -n 3{flag}\none")
        assert one[0] in batch
        tree = default_session().tree
        row = tree.children(tree.get(f"{parent}/xs"))[0]
        got = tree.get(row.id).messages[1].provenance
        want = dict(tree.get(f"{parent}/alone").messages[1].provenance)
        if setup == "batch -s":  # (the batch chat's prompt, not the lone chat's own)
            want["system_from"] = f"{parent}/xs"
        assert [got.get(k) for k in ("system_from", "system_prompt")] == \
            [want.get(k) for k in ("system_from", "system_prompt")]
    finally:
        if config:
            vshell.ok('%config SubchatMagics.system_prompt = ""')


def test_a_redo_under_a_new_system_prompt_and_a_second_batch(vshell, engine):
    vshell.ok("%%subchat root/r -n 6\nTell me about rivers.")
    vshell.ns["xs"] = ["one", "two", "  three"]
    vshell.ok("%%subchat root/r --each xs --as out -n 4\n{item}")
    vshell.ok("%%subchat root/r -s 'Now be terse.' -n 3\nhello")
    with recorded(engine) as redo:
        vshell.ok("%%subchat root/r --each xs --as out -n 4 --redo\n{item}")
    tree = default_session().tree
    attempts = [a.path for c in tree.children(tree.get("root/r/xs")) for a in tree.children(c)]
    assert len(redo) == len(attempts) == 3
    assert all("Now be terse." in engine.builder.tokenizer.decode(x) for x in redo)
    assert sorted(redo) == sorted(reference(engine, p) for p in attempts)
    with recorded(engine) as one:
        vshell.ok("%%subchat root/r/alone -n 4\none")
    vshell.ns["ys"] = ["one", "four"]
    with recorded(engine) as second:
        vshell.ok("%%subchat root/r --each ys --as out2 -n 4\n{item}")
    assert one[0] in second


def test_long_rows_keep_their_context_or_fail(vshell, engine):
    vshell.ok("%config SubchatMagics.max_value_chars = 0")
    try:
        for i in range(2):
            words = " ".join(f"r{i}w{k}" for k in range(150))
            vshell.ok(f"%%subchat root/l -n 4\n{words}")
        items = [" ".join(f"x{j}y{k}" for k in range(n))
                 for j, n in enumerate([10, 50, 100, 200, 300, 400, 500, 650, 800])]
        batch, _, singles = batch_and_singles(vshell, engine, "root/l", items)
        assert 3 <= len(batch) < len(items)  # the longest fail: a row never drops its context
        assert all(x in singles for x in batch)
    finally:
        vshell.ok("%config SubchatMagics.max_value_chars = 4000")


def test_a_key_in_a_row_is_masked_before_sending_and_in_the_store(vshell, engine, workdir,
                                                                  monkeypatch):
    from subchat_magics.settings import forget_secrets, set_secret

    key = "gsk_" + "Zq8" * 12
    monkeypatch.setenv("GROQ_API_KEY", key)
    vshell.ok("%%subchat root/k -n 4\nhi")
    vshell.ns["xs"] = [f"my key is {key}", "plain", key]
    with recorded(engine) as sent:
        vshell.ok("%%subchat root/k --each xs --as out -n 4\n{item}")
    assert all(key[4:14] not in engine.builder.tokenizer.decode(x) for x in sent)
    entered = "gsk_" + "Yy7" * 12  # (as %subchat key keeps it)
    set_secret("GROQ_API_KEY", entered)
    try:
        vshell.ns["ys"] = [f"my key is {entered}"]
        vshell.ok("%%subchat root/k --each ys --as out -n 4\n{item}")
    finally:
        forget_secrets()
    rows = store_rows(workdir / "subchats.db", "SELECT content, provenance FROM messages")
    assert not any(k in (c or "") + (p or "") for c, p in rows for k in (key[4:14], entered[4:14]))
