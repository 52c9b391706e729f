"""Batches (``%%subchat --each``) on the real vLLM engine with the tiny model: every row in
the engine at once, the shared prefix from the cache, a row that cannot fit among good
ones, structured output per row, and Ctrl-C aborting every request in the engine."""

from __future__ import annotations

import _thread
import threading

import pytest

from subchat_magics.session import default_session
from subchat_magics.testing import store_rows

pytestmark = pytest.mark.vllm


def _replies(path: str):
    tree = default_session().tree
    return {c.name: tree.get(c.id).messages for c in tree.children(tree.get(path))}


def test_forty_rows_run_in_one_engine_batch_and_share_the_cached_prefix(vshell, engine):
    context = " ".join(f"fact{i}" for i in range(300))  # > 2 CPU blocks of 128 tokens
    vshell.ok(f"%%subchat root -n 4\nRemember: {context}")
    vshell.ns["qs"] = [f"question {i}" for i in range(40)]
    peak = []
    stop = threading.Event()

    def watch():  # how many requests the engine holds at once while the batch runs
        while not stop.is_set():
            peak.append(engine.unfinished_requests())
            stop.wait(0.02)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        out = vshell.ok("%%subchat root --each qs --as out -n 16 -t 0.8 --seed 3\n{item}?")
    finally:
        stop.set()
        t.join()
    assert "40 items, 40 done, 0 failed" in out and "tokens/s" in out
    assert max(peak) >= 20  # many rows in the engine together, not one after another
    assert len(vshell.ns["out"]) == 40 and all(isinstance(x, str) for x in vshell.ns["out"])
    texts = [m[1].content for m in _replies("root/qs").values()]  # the whole reply kept
    assert sorted(vshell.ns["out"]) == sorted(texts) and all(texts)
    rows = _replies("root/qs")
    assert len(rows) == 40
    provs = [msgs[1].provenance for msgs in rows.values()]
    assert all(p["backend"] == "vllm" and p["completion_tokens"] >= 1 for p in provs)
    # the rows inherit root's exchange: whole blocks of it come from the prefix cache
    assert sum(1 for p in provs if (p.get("cached_tokens") or 0) >= 256) >= 35
    assert engine.unfinished_requests() == 0


def test_a_row_that_cannot_fit_fails_alone_and_the_batch_goes_on(vshell, engine):
    huge = " ".join(f"w{i}" for i in range(9000))  # beyond max_model_len 5120
    vshell.ns["docs"] = ["short one", huge, "short two"]
    vshell.ok("%config SubchatMagics.max_value_chars = 0")  # the item whole, not cut at 4000
    try:
        out = vshell.ok("%%subchat root --each docs --as out -n 4\nSummarise: {item}")
    finally:
        vshell.ok("%config SubchatMagics.max_value_chars = 4000")
    assert "3 items, 2 done, 1 failed" in out and "root/docs/1" in out
    assert vshell.ns["out"][1] is None and all(isinstance(x, str) for x in vshell.ns["out"][::2])
    rows = _replies("root/docs")
    assert rows["1"][1].status == "error" and rows["0"][1].status == "complete"
    # show -p of the failed row says why it failed, not only the error's kind
    shown = vshell.ok("%subchat show root/docs/1 -p")
    assert "too long" in shown and "window" in shown and "prompt tokens" in shown
    # rows come back whole (one output at their end): no first-token time is made up
    assert "ttft_s" not in rows["0"][1].provenance and "first token" not in vshell.ok(
        "%subchat show root/docs/0 -p")


def test_a_choice_constraint_applies_to_every_row_and_as_gets_the_values(vshell):
    vshell.ns["reviews"] = ["good film", "bad film", "so-so film", "great", "awful"]
    vshell.ok("%%subchat root --each reviews --as labels -t 1.0 -n 10 --choice pos,neg,neutral\n"
              "Label: {item}")
    assert len(vshell.ns["labels"]) == 5 and set(vshell.ns["labels"]) <= {"pos", "neg", "neutral"}


def test_ctrl_c_aborts_every_row_in_the_engine_and_a_rerun_completes_the_rest(vshell, engine,
                                                                              workdir):
    vshell.ns["qs"] = [f"q{i}" for i in range(60)]
    done = []
    never = threading.Event()

    def listener(event, data):
        if event == "reply-end" and data["message"].status == "complete":
            done.append(1)
            if len(done) == 3:
                _thread.interrupt_main()
                never.wait(30)

    unsubscribe = default_session().tree.subscribe(listener)
    try:  # rows of different lengths, so they end at different steps
        result, cap = vshell.run("%%subchat root --each qs --as out -n 200 -t 1.0 --seed 1 "
                                 "--concurrency 16\n{item}")
    finally:
        unsubscribe()
    from IPython.core.error import UsageError

    assert isinstance(result.error_in_exec, UsageError)  # the summary and one line
    assert engine.unfinished_requests() == 0  # aborted in the engine at once
    first = vshell.ns["out"]
    kept = [i for i, v in enumerate(first) if v is not None]
    assert 3 <= len(kept) < 60
    db = workdir / "subchats.db"
    cut = store_rows(db, "SELECT COUNT(*) FROM messages WHERE role='assistant' AND "
                         "status='interrupted'")[0][0]
    assert cut >= 1
    # a cut row keeps the count of the tokens the engine generated for it before the cut
    # (its reply was to come whole at its end, so none had arrived): the engine's count
    counts = [r[0] for r in store_rows(
        db, "SELECT json_extract(provenance, '$.completion_tokens') FROM messages "
            "WHERE role='assistant' AND status='interrupted'")]
    assert sum(1 for n in counts if (n or 0) >= 1) >= len(counts) // 2, counts
    out = vshell.ok("%%subchat root --each qs --as out -n 200 -t 1.0 --seed 1 --concurrency 16"
                    "\n{item}")
    assert f"60 items, 60 done ({len(kept)} reused), 0 failed" in out
    assert [vshell.ns["out"][i] for i in kept] == [first[i] for i in kept]
    # the cut attempts are kept as they were; each of those rows has a complete attempt-2
    assert store_rows(db, "SELECT COUNT(*) FROM messages WHERE status != 'complete'")[0][0] == cut
    assert store_rows(db, "SELECT COUNT(*) FROM chats WHERE name = 'attempt-2'")[0][0] >= cut
