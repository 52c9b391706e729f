"""--vote, --answer, --compare and --labels through the real shell on echo, the verdict
rules as properties, and every bad input refused with nothing stored."""

from __future__ import annotations

import pandas as pd
from hypothesis import given
from hypothesis import strategies as st

from subchat_magics import verdict


def test_tally_takes_the_most_common_answer_and_says_ties():
    v = verdict.tally(["4", "5", "4", None])
    assert (v.answer, v.count, v.k, v.tie, v.first) == ("4", 2, 4, False, 0)
    assert v.agree == "2/4 agree" and not v.majority
    t = verdict.tally(["a", "b", "b", "a"])
    assert t.tie and t.tied == ["a", "b"] and t.answer == "a" and "tie" in t.label()
    assert verdict.tally([None, None]).answer is None


def test_json_answers_compare_by_their_canonical_form():
    v = verdict.tally([{"a": 1, "b": 2}, {"b": 2, "a": 1}, {"a": 2}])
    assert v.count == 2 and v.answer == {"a": 1, "b": 2}


def test_answer_pattern_takes_the_last_match_of_the_first_group():
    rx = verdict.compile_answer(r"\\boxed\{(.+?)\}")
    assert verdict.answer_of("so \\boxed{3} no \\boxed{ 4 }", pattern=rx) == "4"
    assert verdict.answer_of("no box", pattern=rx) is None


@given(st.lists(st.one_of(st.none(), st.sampled_from("abc")), min_size=1, max_size=30))
def test_the_verdict_is_a_most_common_answer(answers):
    v = verdict.tally(answers)
    given_ = [a for a in answers if a is not None]
    if not given_:
        assert v.answer is None and v.count == 0
        return
    top = max(given_.count(a) for a in set(given_))
    assert v.count == top == given_.count(v.answer)
    assert v.tie == (sum(1 for a in set(given_) if given_.count(a) == top) > 1)
    assert answers[v.first] == v.answer and answers.index(v.answer) == v.first


@given(st.lists(st.tuples(st.sampled_from("xyz"), st.sampled_from("xyz")), max_size=30))
def test_score_counts_add_up(pairs):
    s = verdict.score([a for a, _ in pairs], [b for _, b in pairs])
    assert s.n == len(pairs) == sum(s.confusion.values())
    assert s.correct == sum(1 for a, b in pairs if a == b) == s.n - len(s.wrong)


def test_a_label_column_made_float_by_a_missing_value_still_matches_whole_answers(shell):
    """An integer label column with a missing value is float in pandas (1.0, NaN, 2.0):
    its labels compare as the whole numbers they are, with a --choice 1,2 answer '1' and
    with a --json answer 1, in the cell and in show."""
    shell.ns["df"] = pd.DataFrame({"t": ["a", "b", "c"], "g": [1, None, 2]})
    assert str(shell.ns["df"]["g"].dtype) == "float64"
    out = shell.ok("%%subchat root -b echo --each df --choice 1,2 --labels g\n{t}")
    assert "accuracy 1/2 (50%)" in out and "1.0" not in out, out
    assert "accuracy 1/2 (50%)" in shell.ok("%subchat show root/df")
    assert verdict.score([1, 2.0, "3"], [1.0, 2, 3.0]).correct == 3


def test_vote_keeps_samples_as_siblings_and_the_verdict_on_the_chat(shell):
    shell.ok("%%subchat root/q -b echo --vote 5 --choice yes,no --var v\nIs it?")
    assert shell.ns["v"] == "yes"
    tree = __import__("subchat_magics.session", fromlist=["x"]).default_session().tree
    chat = tree.get("root/q")
    msgs = chat.messages
    assert [m.role for m in msgs] == ["user", "assistant"]
    vote = msgs[1].provenance["vote"]
    assert vote["answer"] == "yes" and vote["agree"] == "5/5 agree" and len(vote["samples"]) == 5
    kids = tree.children(chat)
    assert [c.name for c in kids] == ["1", "2", "3", "4", "5"]
    for i, c in enumerate(kids):
        m = c.messages
        assert m[1].provenance["vote"]["sample"] == i + 1
        assert m[1].provenance["temperature"] if "temperature" in m[1].provenance else True
    # the samples branch off before the verdict: their context is not the verdict's
    assert tree.context(kids[0])[-2:] == [{"role": "user", "content": "Is it?"},
                                         {"role": "assistant", "content": "yes"}]
    assert len(tree.context(kids[0])) == 2


def test_answer_pattern_picks_what_is_compared(shell):
    shell.ok("%%subchat root/a -b echo --vote 3 --answer 'messages\\): (\\w+)' --var v\nforty two")
    assert shell.ns["v"] == "forty"


def test_compare_sends_to_each_model_into_subchats_named_after_it(shell):
    shell.ok("%%subchat root/c --compare echo,echo:other --var c\nhello")
    assert set(shell.ns["c"]) == {"echo", "other"}
    tree = __import__("subchat_magics.session", fromlist=["x"]).default_session().tree
    assert [c.name for c in tree.children(tree.get("root/c"))] == ["echo", "other"]
    prov = tree.get("root/c/other").messages[1].provenance
    assert prov["compare"]["name"] == "other" and prov["compare"]["of"] == ["echo", "other"]


def test_compare_names_an_entry_without_a_model_after_the_model_m_gave_it(shell, monkeypatch):
    """-m gives the entries of --compare that name no model their model: the subchat and
    the --var/--as key are named after that model, not the backend's default one it did
    not use."""
    from subchat_magics.backends.registry import registry
    from subchat_magics.testing.fakeservers import FakeGroq

    with FakeGroq(models=["m1", "m2", "llama-3.3-70b-versatile"], key="gsk_test") as server:
        monkeypatch.setenv("GROQ_BASE_URL", server.url)
        monkeypatch.setenv("GROQ_API_KEY", "gsk_test")
        try:
            shell.ok("%%subchat root/c --compare groq,groq:m2 -m m1 --var c\nhello")
            shell.ns["qs"] = ["a"]
            shell.ok("%%subchat root --each qs --compare groq,groq:m2 -m m1 --as t\n{item}")
        finally:
            registry().close()
        sent = [r.body["model"] for r in server.chat_requests()]
        assert sorted(sent[:2]) == sorted(sent[2:]) == ["m1", "m2"]  # (the two run at once)
    assert set(shell.ns["c"]) == {"m1", "m2"}
    t = shell.ns["t"]  # (a DataFrame once pandas is imported, else a list of dicts)
    assert (list(t.columns) if hasattr(t, "columns") else list(t[0])) == ["m1", "m2"]
    tree = __import__("subchat_magics.session", fromlist=["x"]).default_session().tree
    assert [c.name for c in tree.children(tree.get("root/c"))] == ["m1", "m2"]
    assert [c.name for c in tree.children(tree.get("root/qs/0"))] == ["m1", "m2"]


def test_each_with_vote_and_labels_gives_a_table_and_scores(shell):
    shell.ns["df"] = pd.DataFrame({"q": ["a", "b", "c"], "gold": ["yes", "no", "yes"]})
    out = shell.ok("%%subchat root -b echo --each df --vote 3 --choice yes,no --labels gold --as t\n{q}?")
    t = shell.ns["t"]
    assert list(t.columns) == ["verdict", "agreement", "answers"]
    assert list(t["verdict"]) == ["yes"] * 3 and list(t["agreement"]) == ["3/3"] * 3
    assert "accuracy 2/3" in out and "no majority" not in out  # every row agreed: no line
    assert "disagreeing rows" in out and "confusion" in out
    tree = __import__("subchat_magics.session", fromlist=["x"]).default_session().tree
    assert [c.name for c in tree.children(tree.get("root/df/1"))] == ["1", "2", "3"]


def test_each_with_compare_gives_one_column_per_model(shell):
    shell.ns["qs"] = ["x", "y"]
    shell.ns["gold"] = ["yes", "yes"]
    out = shell.ok("%%subchat root --each qs --compare echo,echo:other --choice yes,no "
                   "--labels gold --as t\n{item}?")
    assert list(shell.ns["t"].columns) == ["echo", "other"]
    assert "echo vs other: agreement 2/2" in out and "echo: accuracy 2/2" in out


def _all_messages(tree):
    return {(m.id, m.content, m.status) for c in tree.chats() for m in tree.store.messages(c.id)}


def test_a_changed_each_vote_or_compare_rerun_keeps_every_earlier_row(shell):
    """Rows of a vote or a comparison follow the plain batch's rule: a rerun with another
    message (or K, or models) is refused with the plain batch's message, nothing sent;
    --redo resends each row as attempt-2, the earlier answers kept; an unchanged rerun
    reuses."""
    tree = __import__("subchat_magics.session", fromlist=["x"]).default_session().tree
    shell.ns["qs"] = ["x", "y"]
    shell.ok("%%subchat root --each qs -b echo --vote 3 --choice yes,no --as t\n{item}?")
    shell.ok("%%subchat root/qs/0/1\nfollow-up typed by hand")  # a person continues a sample
    before = _all_messages(tree)
    out = shell.ok("%%subchat root --each qs -b echo --vote 3 --choice yes,no --as t\n{item}?")
    assert "2 reused" in out and _all_messages(tree) == before
    err = shell.fails("%%subchat root --each qs -b echo --vote 3 --choice yes,no --as t\nNow {item}?")
    assert err == ("%%subchat: root/qs was run with another request: the message (the data or "
                   "the template) for 2 of 2 row(s) (root/qs/0 holds another message than item 0 "
                   "gives now). Nothing was sent; a batch is answered under one request. --redo "
                   "resends those rows (their earlier replies are kept), --fresh starts a new "
                   "batch chat"), err
    assert _all_messages(tree) == before
    err = shell.fails("%%subchat root --each qs -b echo --vote 4 --choice yes,no\n{item}?")
    assert "the generation options" in err and "Nothing was sent" in err
    assert _all_messages(tree) == before
    shell.ok("%%subchat root --each qs -b echo --vote 3 --choice yes,no --as t --redo\nNow {item}?")
    after = _all_messages(tree)
    assert before <= after and len(after) > len(before)
    assert "root/qs/0/1" in tree and tree.get("root/qs/0/attempt-2").messages[0].content == "Now x?"
    assert list(shell.ns["t"]["agreement"]) == ["3/3", "3/3"]
    shell.ns["ps"] = ["p"]
    shell.ok("%%subchat root --each ps --compare echo,echo:other --choice yes,no --as c\n{item}?")
    before = _all_messages(tree)
    err = shell.fails("%%subchat root --each ps --compare echo,echo:other --choice yes,no --as c\n{item}!")
    assert "root/ps was run with another request: the message" in err
    assert _all_messages(tree) == before
    err = shell.fails("%%subchat root --each ps --compare echo,echo:third --choice yes,no\n{item}?")
    assert "the model for 1 of 1 row(s) (echo,other -> echo,third)" in err
    shell.ok("%%subchat root --each ps --compare echo,echo:other --choice yes,no --as c --redo\n{item}!")
    assert before <= _all_messages(tree)
    assert [c.name for c in tree.children(tree.get("root/ps/0/attempt-2"))] == ["echo", "other"]


def _count(shell):
    tree = __import__("subchat_magics.session", fromlist=["x"]).default_session().tree
    return len(tree.chats()), sum(tree.store.message_counts().values())


def test_bad_input_is_one_line_and_stores_nothing(shell):
    shell.ns["df"] = pd.DataFrame({"q": ["a", "b"], "gold": ["yes", "no"]})
    shell.ns["short"] = ["yes"]
    before = _count(shell)
    for line, words in [
        ("root/q -b echo --vote 1", "--vote takes a number"),
        ("root/q -b echo --vote 3 --fanout 2", "does not go"),
        ("root/q -b echo --vote 3 --children a,b", "does not go"),
        ("root/q -b echo --vote 3 --answer '('", "not a regular expression"),
        ("root/q -b echo --vote 3 --answer 'x'", "has no group"),
        ("root/q --compare echo", "two or more"),
        ("root/q --compare echo,nope", "unknown backend"),
        ("root/q --compare echo,groq", "GROQ_API_KEY"),
        ("root/q --compare echo,echo:echo", "are the same model (echo)"),  # echo's default model
        ("root --each df --compare echo:m,echo -m m", "are the same model (m)"),
        ("root/q -b echo --vote 3 -t 0", "temperature"),
        ("root -b echo --each df --labels nope", "--labels nope"),
        ("root -b echo --each df --labels short", "labels for"),
        ("root/q -b echo --labels gold", "go with --each"),
    ]:
        err = shell.fails(f"%%subchat {line}\n{{q}}")
        assert words in err and "\n" not in err.strip(), (line, err)
        assert _count(shell) == before, line


def test_a_vote_or_comparison_row_is_not_taken_for_a_batch_chat(shell):
    """A row of a comparison holds nothing and its model subchats carry the batch mark;
    a vote's samples 1..K and attempt-K subchats hang below rows too: none of them makes
    its parent a batch chat. The batch chat itself is one (show sums it up)."""
    from subchat_magics import batch
    from subchat_magics.session import default_session

    shell.ns["qs"] = ["x", "y"]
    shell.ok("%%subchat root/v -b echo --vote 3 --choice yes,no\nIs it?")
    shell.ok("%%subchat root --each qs -b echo --vote 3 --choice yes,no\n{item}?")
    assert "another request" in shell.fails("%%subchat root --each qs --compare echo,echo:other\n{item}?")
    shell.ok("%%subchat root --each qs --compare echo,echo:other --redo\n{item}?")  # attempt-2 rows
    shell.ns["ps"] = ["p"]
    shell.ok("%%subchat root --each ps --compare echo,echo:other --vote 2\n{item}?")
    tree = default_session().tree
    flagged = {c.path for c in tree.chats() if batch.is_batch_chat(tree, c)}
    assert flagged == {"root/qs", "root/ps"}
    assert set(batch.summaries(tree)) == {tree.get("root/qs").id, tree.get("root/ps").id}
    assert "batch of" not in shell.ok("%subchat show root/ps/0")
    assert "batch of" not in shell.ok("%subchat show root/qs/0/attempt-2")
    out = shell.ok("%subchat show root/ps")
    assert "batch of 1 row, 2 models (echo, other): 1/1 done" in out


def test_the_tree_folds_a_comparison_batch_into_one_line(shell):
    """A comparison's rows hold nothing (their models' subchats carry the batch mark): the
    tree shows its batch chat as one line with its counts, as any batch's, text and view."""
    from subchat_magics.session import default_session
    from subchat_magics.widget.state import ViewState

    shell.ns["qs"] = ["x", "y"]
    shell.ok("%%subchat root/c --each qs --compare echo,echo:other\n{item}?")
    shell.ok("%%subchat root/cv --each qs --compare echo,echo:other --vote 2\n{item}?")
    out = shell.ok("%subchat tree --text")
    assert "qs  [2/2 done]" in out and out.count("[2/2 done]") == 2, out
    assert "other" not in out and "echo  (" not in out, out
    tree = default_session().tree
    view = ViewState(tree, tree.root, interval=0.1, clock=lambda: 0.0)
    view.load()
    labels = {tree.find(cid).path: b.label() for cid, b in view.batches.items()}
    assert labels == {"root/c/qs": "[2/2 done]", "root/cv/qs": "[2/2 done]"}


def test_show_of_a_labelled_batch_prints_its_scores(shell):
    """--labels keeps each row's label in its batch mark: show of the batch chat scores
    the rows as stored (accuracy with and without the vote, confusion, disagreeing rows;
    agreement between models), a later session included."""
    from subchat_magics.session import reset_default_session

    shell.ns["df"] = pd.DataFrame({"q": ["a", "b", "c"], "gold": ["yes", "no", "yes"]})
    shell.ok("%%subchat root -b echo --each df --vote 3 --choice yes,no --labels gold\n{q}?")
    shell.ns["gold"] = ["yes", "no"]
    shell.ns["ps"] = ["p", "q"]
    shell.ok("%%subchat root --each ps --compare echo,echo:other --choice yes,no "
             "--labels gold\n{item}?")
    reset_default_session()  # what show reads is in the store, not in this session
    out = shell.ok("%subchat show root/df")
    assert "batch of 3 rows: 3/3 done" in out
    assert "answers (vote): accuracy 2/3 (67%)" in out
    assert "answers (first sample, no vote): accuracy 2/3" in out
    assert "disagreeing rows (answers (vote)): 1" in out
    assert "label \\ answer" in out
    out = shell.ok("%subchat show root/ps")
    assert "echo: accuracy 1/2" in out and "other: accuracy 1/2" in out
    assert "echo vs other: agreement 2/2" in out
    shell.ns["plain"] = ["p", "q"]
    shell.ok("%%subchat root -b echo --each plain\n{item}")
    shown = shell.ok("%subchat show root/plain")
    assert "2/2 done" in shown and "accuracy" not in shown  # no labels: no scores


def test_identical_prompts_at_temperature_0_are_sent_once(shell):
    """A plain batch at temperature 0: a repeated message is sent once, each copy
    filled from the first (marked duplicate_of in its provenance) and counted in the
    summary's notes; a rerun reuses every row."""
    from subchat_magics.session import default_session

    shell.ns["qs"] = ["same", "other", "same", "same"]
    out = shell.ok("%%subchat root -b echo --each qs -t 0 --as r\n{item}")
    assert "4 done" in out and "2 row(s) repeat an earlier row's message" in out
    tree = default_session().tree
    provs = [tree.get(f"root/qs/{i}").messages[1].provenance for i in range(4)]
    assert [p.get("duplicate_of") for p in provs] == [None, None, "root/qs/0", "root/qs/0"]
    assert provs[2]["batch"]["item"] == "2" and provs[3]["prompt_tokens"] == 0
    assert shell.ns["r"] == [tree.get("root/qs/0").messages[1].content, shell.ns["r"][1],
                             shell.ns["r"][0], shell.ns["r"][0]]
    again = shell.ok("%%subchat root -b echo --each qs -t 0 --as r\n{item}")
    assert "4 done (4 reused)" in again
    sampled = shell.ok("%%subchat root -b echo --each qs -t 0.5 --fresh\n{item}")
    assert "repeat" not in sampled  # sampled: every row is its own draw


def test_estimate_counts_times_a_sample_kept_as_rows_and_stops(shell):
    """--estimate: the rows after --limit, their prompt tokens (estimated on echo, and
    said so), the KV budget, a projection from --sample K rows that are real rows of the
    batch; nothing else is sent, and the cell to run is said. That run reuses the sample."""
    from subchat_magics.session import default_session

    shell.ns["qs"] = [f"question number {i}" for i in range(10)]
    out = shell.ok("%%subchat root -b echo --each qs --limit 8 --estimate --sample 3 --as e\n"
                   "{item}?")
    e = shell.ns["e"]
    assert "estimate for root/qs: 8 rows, 8 to send" in out
    assert "estimated (UTF-8 bytes / 3" in out and "KV budget: the server's" in out
    assert e.sample_rows == 3 and e.left == 5 and e.projected_out_tokens > 0
    assert "to run it: %%subchat root -b echo --each qs --limit 8 --as e " in out
    tree = default_session().tree
    sent = [c.name for c in tree.children(tree.get("root/qs")) if c.messages]
    assert sent == ["0", "1", "2"]
    again = shell.ok("%%subchat root -b echo --each qs --limit 8 --as e\n{item}?")
    assert "8 done (3 reused)" in again
    again = shell.ok("%%subchat root -b echo --each qs --estimate --sample 0\n{item}?")
    assert "10 rows (8 done before, 2 to send)" in again and "--sample 0" in again
    assert len([c for c in tree.children(tree.get("root/qs")) if c.messages]) == 8
    shell.ok("%%subchat root -b echo --each qs\n{item}?")
    done = shell.ok("%%subchat root -b echo --each qs --estimate\n{item}?")
    # nothing left to count: no claim that a tokenizer counted it (echo has none)
    assert "10 rows (10 done before, 0 to send)" in done and "tokenizer and chat template" not in done
    assert "prompt tokens: none to send" in done


def test_estimate_of_a_vote_batch_runs_its_sample_as_vote_rows(shell):
    shell.ns["df"] = pd.DataFrame({"q": list("abcdef"), "gold": ["yes"] * 6})
    out = shell.ok("%%subchat root -b echo --each df --vote 3 --choice yes,no --labels gold "
                   "--estimate --sample 2\n{q}?")
    assert "sample: 2 rows" in out and "projected for the 4 rows left" in out
    out = shell.ok("%%subchat root -b echo --each df --vote 3 --choice yes,no --labels gold\n{q}?")
    assert "6 done (2 reused)" in out and "accuracy 6/6" in out


def test_estimate_through_the_python_api(workdir):
    from subchat_magics.session import open_tree

    tree = open_tree(workdir / "t.db")
    est = tree.batch("root", ["a", "b", "c", "d"], lambda q, i: f"Say {q}", name="qs",
                     backend="echo", estimate=True, sample=1)
    assert (est.rows, est.sample_rows, est.left) == (4, 1, 3) and not est.exact
    assert any(line.startswith("projected") for line in est.lines())
    done = tree.batch("root", ["a", "b", "c", "d"], lambda q, i: f"Say {q}", name="qs",
                      backend="echo")
    assert done.stats.reused == 1 and done.stats.done == 4


def test_estimate_bad_input_is_one_line_and_stores_nothing(shell):
    shell.ns["qs"] = ["a", "b"]
    shell.ns["f"] = len
    before = _count(shell)
    for line, words in [
        ("root/q -b echo --estimate", "--estimate sizes a batch before it runs: it goes with --each"),
        ("root -b echo --each qs --sample 2", "--sample K goes with --estimate"),
        ("root -b echo --each qs --estimate --sample -1", "--sample takes a number"),
        ("root -b echo --each qs --estimate --tools f", "without --tools"),
        ("root -b echo --each qs --estimate --fresh", "does not go with --fresh"),
    ]:
        err = shell.fails(f"%%subchat {line}\n{{item}}")
        assert words in err and "\n" not in err.strip(), (line, err)
        assert _count(shell) == before, line


def test_a_vote_or_labels_batch_skips_missing_values_and_scores_only_labelled_rows(shell):
    """A row with a missing value is not sent under --vote/--compare/--labels either (as
    in a plain batch), and a rerun adds nothing to it."""
    tree = __import__("subchat_magics.session", fromlist=["x"]).default_session().tree
    shell.ns["df"] = pd.DataFrame({"text": ["good", None], "gold": ["yes", "yes"]})
    out = shell.ok("%%subchat root/v -b echo --each df --vote 2 --choice yes,no --as t\n{text}")
    assert "1 skipped" in out
    assert "root/v/df/1" not in tree or not tree.get("root/v/df/1").messages
    shell.ok("%%subchat root/v -b echo --each df --vote 2 --choice yes,no --as t\n{text}")
    assert "root/v/df/1" not in tree or not tree.get("root/v/df/1").messages
    out = shell.ok("%%subchat root/l -b echo --each df --choice yes,no --labels gold --as u\n{text}")
    assert "root/l/df/1" not in tree or not tree.get("root/l/df/1").messages


def test_a_skipped_row_is_left_out_of_the_scores_the_cell_prints_as_show_does(shell):
    """A row not sent (a missing value) has no answer to score: the cell's accuracy leaves
    it out and says so, as show of the batch (read from the store) does, instead of
    counting it wrong as '(none)'."""
    shell.ns["df"] = pd.DataFrame({"text": ["a", None, "c"], "gold": ["x", "x", "x"]})
    for flags in ("", "--vote 2"):
        out = shell.ok(f"%%subchat root/s{len(flags)} -b echo --each df --choice x,y --labels gold "
                       f"{flags} --as t\nsay {{text}}")
        assert "accuracy 2/2 (100%)" in out and "(none)" not in out, out
        assert "1 row not scored: not sent (skipped)" in out, out
        assert "disagreeing rows" not in out
        assert "accuracy 2/2 (100%)" in shell.ok(f"%subchat show root/s{len(flags)}/df")


def test_show_of_a_vote_chat_prints_its_verdict(shell):
    """show of the chat a vote answered says the verdict (the answer, how many samples
    gave it, each sample's answer), not only the representative reply; so does -p and a
    later session (it is read from the store)."""
    from subchat_magics.session import reset_default_session

    shell.ok("%%subchat root/q -b echo --vote 3 --choice yes,no\nIs it?")
    shell.ok("%%subchat root/t -b echo --vote 2 --answer '(\\w+)$'\nred")
    reset_default_session()
    out = shell.ok("%subchat show root/q")
    assert "verdict: yes (3/3 agree) · answers yes, yes, yes" in out
    assert "samples root/q/1 … root/q/3" in out
    assert "verdict: yes (3/3 agree)" in shell.ok("%subchat show root/q -p")
    assert "verdict:" not in shell.ok("%subchat show root/q/1")  # a sample holds none
    tie = shell.ok("%subchat show root/t")
    assert "verdict: " in tie and "(2/2 agree)" in tie


def test_rows_without_a_label_are_not_scored(shell):
    """--labels with a None/NaN label: that row is left out of the accuracy (not counted
    as wrong), and the line says how many were not scored; show of the batch chat too."""
    shell.ns["df"] = pd.DataFrame({"q": ["a", "b", "c", "d"],
                                   "gold": ["yes", None, float("nan"), "no"]})
    out = shell.ok("%%subchat root -b echo --each df --vote 3 --choice yes,no --labels gold\n{q}?")
    assert "answers (vote): accuracy 1/2 (50%); 2 row(s) without a label not scored" in out
    assert "accuracy 1/4" not in out
    shown = shell.ok("%subchat show root/df")
    assert "answers (vote): accuracy 1/2 (50%); 2 row(s) without a label not scored" in shown
    shell.ns["gold"] = ["yes", None]
    shell.ns["ps"] = ["p", "q"]
    out = shell.ok("%%subchat root --each ps --compare echo,echo:other --choice yes,no "
                   "--labels gold\n{item}?")
    assert "echo: accuracy 1/1 (100%); 1 row(s) without a label not scored" in out


def test_compare_with_a_model_the_server_does_not_serve_stores_nothing(shell, monkeypatch):
    """--compare naming a model its server does not list is refused before anything is
    stored or sent (the other entry's sibling included), on one message and with --each;
    a model it lists goes through."""
    from subchat_magics.backends.registry import registry
    from subchat_magics.testing.fakeservers import FakeOpenAI

    with FakeOpenAI() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        shell.ns["qs"] = ["x", "y"]
        before = _count(shell)
        for line in ("root/q --compare echo,openai:nope",
                     "root --each qs --compare echo,openai:nope"):
            err = shell.fails(f"%%subchat {line}\n{{item}}")
            assert "openai does not serve the model 'nope'" in err and "other-model" in err, err
            assert "\n" not in err.strip()
            assert _count(shell) == before, line
            assert server.chat_requests() == []
        shell.ok("%%subchat root/q --compare echo,openai:other-model --var c\nhi")
        assert shell.ns["c"]["other-model"] == "Hello from the fake server."
    registry().close()


def test_ctrl_c_in_a_vote_batch_prints_the_summary_and_keeps_every_finished_sample(
        shell, workdir, monkeypatch):
    """Ctrl-C (the SIGINT Jupyter sends) in --each --vote: the plain batch's summary line
    (rows interrupted) and one line, no traceback; every sample that finished is stored
    complete, the cut rows end interrupted, and a rerun sends only the rows not done."""
    import _thread
    import re
    import threading

    from IPython.core.error import UsageError

    from subchat_magics.session import default_session
    from subchat_magics.testing import store_rows

    monkeypatch.setenv("SUBCHAT_ECHO_DELAY", "0.01")
    shell.ns["qs"] = [f"q{i}" for i in range(10)]
    samples = []
    never = threading.Event()

    def listener(event, data):
        if event == "reply-end" and re.fullmatch(r"root/qs/\d+/\d", data["path"]) \
                and data["message"].status == "complete":
            samples.append(data["path"])
            if len(samples) == 7:  # two rows voted, the third one's first sample in
                _thread.interrupt_main()
                never.wait(30)  # ends when the KeyboardInterrupt is raised here

    unsubscribe = default_session().tree.subscribe(listener)
    try:
        result, cap = shell.run("%%subchat root -b echo --each qs --vote 3 --choice yes,no "
                                "--as t\n{item}?")
    finally:
        unsubscribe()
    assert isinstance(result.error_in_exec, UsageError), result.error_in_exec
    assert "interrupted: 8 row(s) not done; run the cell again" in str(result.error_in_exec)
    assert "batch root/qs: 10 items, 2 done, 0 failed, 1 interrupted" in cap.stdout
    assert "Traceback" not in cap.stdout + cap.stderr
    assert list(shell.ns["t"]["verdict"][:2]) == ["yes", "yes"]
    db = workdir / "subchats.db"
    tree = default_session().tree
    complete = {c.path for c in tree.chats() if re.fullmatch(r"root/qs/\d+/\d", c.path)
                and c.messages and c.messages[-1].status == "complete"}
    assert set(samples) <= complete and len(complete) >= 7  # every finished sample kept
    cut = tree.get("root/qs/2").messages
    assert cut[1].status == "interrupted" and "owner" not in cut[1].provenance
    monkeypatch.setenv("SUBCHAT_ECHO_DELAY", "0")
    out = shell.ok("%%subchat root -b echo --each qs --vote 3 --choice yes,no --as t\n{item}?")
    assert "10 items, 10 done (2 reused), 0 failed" in out
    assert list(shell.ns["t"]["agreement"]) == ["3/3"] * 10
    assert tree.get("root/qs/2/attempt-2").messages[1].status == "complete"
    # the cut row's finished sample (stored in the write block Ctrl-C cut) is kept as it was
    last = samples[-1]
    assert last.startswith("root/qs/2/") and tree.get(last).messages[1].status == "complete"
    kept = store_rows(db, "SELECT content, status FROM messages WHERE chat_id = ?",
                      (tree.get(last).id,))
    assert kept == [("q2?", "complete"), ("yes", "complete")]
