"""A property of vote and comparison batches (issue 24), through the real shell: over
random reruns (another K, another template, a comparison, --redo) and random Ctrl-Cs, no
message that existed is ever gone or changed once complete, a refusal writes nothing,
every row's stored request matches its digest, and a batch that ran to its end is reused
whole by the same cell (nothing sent again)."""

from __future__ import annotations

import hashlib
import itertools
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from IPython.core.error import UsageError

from subchat_magics.batch import MARK, request_digest
from subchat_magics.session import default_session
from subchat_magics.testing import store_rows

CELLS = {"vote2": "-b echo --vote 2 --choice yes,no", "vote3": "-b echo --vote 3 --choice yes,no",
         "compare": "--compare echo,echo:other --choice yes,no"}
steps = st.lists(st.fixed_dictionaries({
    "kind": st.sampled_from(sorted(CELLS)),
    "template": st.sampled_from(["{item}?", "Now {item}?"]),
    "redo": st.booleans(),
    "cut": st.one_of(st.none(), st.integers(1, 8)),
}), min_size=1, max_size=4)
_ids = itertools.count()


def _messages(db) -> dict[int, tuple]:
    return {r[0]: r[1:] for r in store_rows(db, "SELECT id, chat_id, role, content, status "
                                                "FROM messages")}


def _check_digests(db) -> None:
    for text, prov in store_rows(
            db, "SELECT u.content, a.provenance FROM messages a JOIN messages u ON "
                "u.chat_id = a.chat_id AND u.seq = a.seq - 1 WHERE a.role = 'assistant'"):
        mark = json.loads(prov or "{}").get(MARK)
        if isinstance(mark, dict) and "request" in mark:
            assert mark["digest"] == request_digest(mark["request"])
            assert mark["request"]["message"] == hashlib.sha256(text.encode()).hexdigest()[:16]
        assert "owner" not in json.loads(prov or "{}")  # every claim ended with its run


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(plan=steps)
def test_vote_and_compare_batches_never_lose_a_message(shell, workdir, plan):
    db = workdir / "subchats.db"
    shell.ns["qs"] = ["a", "b", "c"]
    parent = f"root/p{next(_ids)}"
    shell.ok(f"%%subchat {parent} -b echo\nhello")  # the batch's parent, its own per example
    tree = default_session().tree
    for step in plan:
        cell = (f"%%subchat {parent} --each qs {CELLS[step['kind']]}"
                + (" --redo" if step["redo"] else "") + f"\n{step['template']}")
        before = _messages(db)
        ended = [0]

        def listener(event, data, cut=step["cut"], ended=ended):
            if event == "reply-end" and cut is not None:
                ended[0] += 1
                if ended[0] == cut:
                    raise KeyboardInterrupt  # what Ctrl-C raises, mid-batch

        unsubscribe = tree.subscribe(listener)
        try:
            result, cap = shell.run(cell)
        finally:
            unsubscribe()
        err = result.error_in_exec
        after = _messages(db)
        for mid, (chat, role, content, status) in before.items():
            assert mid in after, "a message was deleted"
            if status == "complete":
                assert after[mid] == (chat, role, content, status)
            else:
                assert after[mid][:2] == (chat, role) and after[mid][2].startswith(content)
        _check_digests(db)
        if err is not None:
            assert isinstance(err, UsageError), err  # one line, never a traceback
            if "another request" in str(err):
                assert after == before and not step["redo"]  # a refusal writes nothing
            else:
                # the plain batch's summary, then one line
                assert "interrupted:" in str(err) and "3 items" in cap.stdout, (err, cap.stdout)
            continue
        assert "3 items, 3 done" in cap.stdout, cap.stdout
        again = shell.ok(cell.replace(" --redo", ""))  # the same cell: every row reused
        assert "3 done (3 reused)" in again and _messages(db) == after
