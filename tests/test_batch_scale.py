"""Batches at scale, the parts that need no engine: the progress line's estimate of time
left (a paced loopback server), and a resume cut at random moments leaving every command
working (the chat index is replaced whole, never left half-built)."""

from __future__ import annotations

import random
import sys

from subchat_magics.session import default_session
from subchat_magics.testing import store_rows


def test_the_estimate_of_time_left_is_within_half_of_the_truth_after_a_tenth(shell, workdir,
                                                                             monkeypatch):
    """Rows answered by a server that takes the same time for each, a few at once: every
    estimate made once a tenth of the rows have ended is within +-50% of the time that
    was in fact left (read from the progress the run recorded, not from a clock here)."""
    from subchat_magics.testing.fakeservers import FakeOpenAI

    seen = []  # (elapsed, eta) as the progress line had them
    with FakeOpenAI() as server:
        server.configure(reply="ok", delay=0.05)
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-000000000000")
        monkeypatch.setenv("OPENAI_MODEL", "other-model")
        batch = default_session().batch("root", list(range(60)), lambda x, i: f"n {x}",
                                        name="n", backend="openai", concurrency=4)
        before = []

        def progress(p):
            if not p.finished:
                (seen if p.ended >= p.total // 10 else before).append(
                    (p.elapsed_s, p.eta_s, p.ended))

        result = batch.run(progress, every=0)
    assert result.stats.done == 60
    total = result.stats.elapsed_s
    assert before and before[0][1] is None  # 'estimating' before any row has ended
    late = [(t, eta) for t, eta, ended in seen if ended < 60 and total - t > 0.25]
    assert len(late) >= 10
    # every one (a shared machine may stall a moment: one in ten may miss, no more)
    off = [(t, eta, total - t) for t, eta in late
           if eta is None or not 0.5 * (total - t) <= eta <= 1.5 * (total - t)]
    assert len(off) <= len(late) // 10, (off, total)


def _tracer(lines: int, files: set[str]):
    """Raise KeyboardInterrupt (what a Ctrl-C does) at the ``lines``-th line run in
    ``files``; returns the tracer and the count so far."""
    seen = [0]

    def local(frame, event, arg):
        if event == "line":
            seen[0] += 1
            if seen[0] == lines:
                raise KeyboardInterrupt
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename in files else None

    return tracer, seen


def test_a_resume_cut_at_random_moments_leaves_every_command_working(shell, workdir):
    """A batch whose rows were cut is resumed, and the resume is cut (a KeyboardInterrupt
    at a random line of the tree's or the batch's code, seeded), again and again: after
    each, the tree view, status and the batch cell itself work, and the last run ends
    with every row done."""
    files = {sys.modules[m].__file__ for m in ("subchat_magics.tree", "subchat_magics.batch",
                                               "subchat_magics.store")}
    shell.ns["qs"] = [f"q{i}" for i in range(30)]
    cell = "%%subchat root --each qs --backend echo --concurrency 3\nsay {item}"
    rng = random.Random(2126)
    redo = cell.replace("--each", "--redo --each")  # every row resent: work to cut
    size = {}
    for src in (cell, redo):  # how many lines a whole run of each takes
        tracer, seen = _tracer(10 ** 9, files)
        sys.settrace(tracer)
        try:
            shell.ok(src)
        finally:
            sys.settrace(None)
        size[src] = seen[0]
    cut_runs = 0
    for trial in range(24):
        # a --redo cut somewhere, then the resume of its cut rows cut somewhere
        src = redo if trial % 2 == 0 else cell
        tracer, seen = _tracer(rng.randrange(1, size[src] + 1), files)
        sys.settrace(tracer)
        try:
            result, _ = shell.run(src)
        finally:
            sys.settrace(None)
        if not result.success:
            cut_runs += 1
        elif src is cell:
            size[cell] = max(seen[0], 50)  # (a resume with little left is short)
        tree = default_session().tree
        index = tree._index  # whole: every chat under its own path, every child known
        assert all(index.paths[c.path] is c for c in index.chats.values())
        assert all(cid in index.chats for kids in index.children.values() for cid in kids)
        out = shell.ok("%subchat tree --text")
        assert "qs" in out
        assert "root" in shell.ok("%subchat status")
    assert cut_runs >= 10  # the interrupts really landed
    out = shell.ok(cell)
    assert "30 items, 30 done" in out
    # nothing cut was lost: every reply row kept, none half-written
    rows = store_rows(workdir / "subchats.db", "SELECT COUNT(*) FROM messages WHERE "
                      "role = 'assistant' AND status = 'complete'")[0][0]
    assert rows >= 30


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.integers(0, 30), st.integers(1, 4)), min_size=1, max_size=12))
def test_chats_added_to_the_index_read_as_a_whole_reload_reads_them(workdir, steps):
    """Rows a batch inserted put into the index as they are (no reload) give the index a
    whole reload of the store gives: the same chats, paths and children in order."""
    import uuid

    from subchat_magics import open_tree

    path = workdir / f"{uuid.uuid4().hex}.db"
    tree = open_tree(path)
    for pick, n in steps:
        parents = sorted(tree._index.chats)
        parent = parents[pick % len(parents)]
        with tree.store.transaction():
            rows = [tree.store.insert_chat(parent, f"c{uuid.uuid4().hex[:6]}", None, 0)
                    for _ in range(n)]
        tree.added(rows)
        index = tree._index
        other = open_tree(path)
        fresh = other._index
        other.close()
        assert {i: c.path for i, c in index.chats.items()} == {i: c.path for i, c in fresh.chats.items()}
        assert {k: v for k, v in index.children.items() if v} == \
            {k: v for k, v in fresh.children.items() if v}
        assert all(index.paths[c.path] is c for c in index.chats.values())
    tree.close()


def test_a_batch_masks_keys_read_once_and_keys_given_meanwhile(shell, workdir, monkeypatch):
    """A batch reads the environment's and .env's keys once (not per stored message); a
    key in .env when it starts, and one given with register_secret while it runs, are
    masked in every row it stores."""
    from subchat_magics.secrets import forget_secret, register_secret

    (workdir / ".env").write_text("GROQ_API_KEY=gsk_envkey_0123456789abcdef\n")
    late = "late-secret-9876543210zyx"
    seen = []

    def progress(p):
        if p.ended and not seen:
            seen.append(1)
            register_secret(late)  # given while the batch runs

    try:
        batch = default_session().batch(
            "root", [f"row {i} gsk_envkey_0123456789abcdef {late}" for i in range(12)],
            lambda x, i: x, name="k", backend="echo", concurrency=2)
        batch.run(progress, every=0)
    finally:
        forget_secret(late)
    stored = " ".join(r[0] for r in store_rows(workdir / "subchats.db",
                                               "SELECT content FROM messages"))
    assert "row 11" in stored and "0123456789abcdef" not in stored
    tree = default_session().tree
    later = [m.content for i in range(4, 12) for m in tree.get(f"root/k/{i}").messages]
    assert len(later) == 16 and all("9876543210" not in t and "***" in t for t in later)


def test_the_collector_runs_rarely_while_a_batch_plans_and_runs_and_as_before_after(shell,
                                                                                      workdir):
    """While a batch plans and runs, the garbage collector's youngest generation is
    collected every GC_YOUNG_DURING_RUN allocations (not 700: it rescanned the tree's index
    every ~1,200 rows); the thresholds in force before are back after a run, after a run
    cut by Ctrl-C, and a threshold of one's own (higher already, or the collector off) is
    left as it is."""
    import gc

    from subchat_magics.batch import GC_YOUNG_DURING_RUN

    before = gc.get_threshold()
    assert before[0] < GC_YOUNG_DURING_RUN
    seen = []
    plan = default_session().batch(
        "root", list(range(30)), lambda x, i: seen.append(gc.get_threshold()) or f"n {x}",
        name="gcrun", backend="echo")
    assert seen and all(t[0] == GC_YOUNG_DURING_RUN for t in seen)  # (planning)
    assert gc.get_threshold() == before
    during = []
    plan.run(lambda p: during.append(gc.get_threshold()), every=0)
    assert during and all(t == (GC_YOUNG_DURING_RUN, *before[1:]) for t in during)
    assert gc.get_threshold() == before

    def cut(p):
        if p.ended >= 3:
            raise KeyboardInterrupt
    cut_plan = default_session().batch("root", list(range(30)), lambda x, i: f"m {x}",
                                       name="gccut", backend="echo", concurrency=1)
    try:
        cut_plan.run(cut, every=0)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the run was not cut")
    assert gc.get_threshold() == before

    try:
        gc.set_threshold(GC_YOUNG_DURING_RUN * 2, 5, 5)  # one's own, higher
        during.clear()
        default_session().batch("root", list(range(5)), lambda x, i: f"o {x}", name="gcown",
                                backend="echo").run(lambda p: during.append(gc.get_threshold()),
                                                    every=0)
        assert during and all(t == (GC_YOUNG_DURING_RUN * 2, 5, 5) for t in during)
        assert gc.get_threshold() == (GC_YOUNG_DURING_RUN * 2, 5, 5)
        gc.set_threshold(*before)
        gc.disable()
        during.clear()
        default_session().batch("root", list(range(5)), lambda x, i: f"p {x}", name="gcoff",
                                backend="echo").run(lambda p: during.append(gc.get_threshold()),
                                                    every=0)
        assert during and all(t == before for t in during) and not gc.isenabled()
    finally:
        gc.enable()
        gc.set_threshold(*before)


def test_a_collector_turned_off_by_a_threshold_of_0_stays_off_through_a_batch(shell, workdir):
    """``gc.set_threshold(0)`` is Python's other way to turn the automatic collector off
    (gc.isenabled() stays True): a batch raised it to GC_YOUNG_DURING_RUN while it planned
    and ran, turning collections on for a notebook that had turned them off."""
    import gc

    before = gc.get_threshold()
    try:
        gc.set_threshold(0, 10, 10)
        shell.ok("xs = [f'x{i}' for i in range(40)]\nimport gc\nseen = []")
        shell.ok("def watch(event, data):\n    seen.append(gc.get_threshold())\n"
                 "from subchat_magics.session import default_session\n"
                 "unsub = default_session().subscribe(watch)")
        out = shell.ok("%%subchat root --each xs --as out --backend echo\nsay {item}")
        shell.ok("unsub()")
        assert "40 done" in out
        assert shell.ns["seen"] and set(shell.ns["seen"]) == {(0, 10, 10)}
        assert gc.get_threshold() == (0, 10, 10)
    finally:
        gc.set_threshold(*before)
