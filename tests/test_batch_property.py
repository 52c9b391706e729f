"""A property of batches (issue 20), over random items (missing values, odd labels, empty
rows), random reruns with random changes (template, options, constraint, system prompt,
--redo, --fresh) and random interrupts: after every step no message that existed before is
gone or changed once complete, and every row's stored request matches its digest."""

from __future__ import annotations

import hashlib
import math
import sqlite3

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from subchat_magics import open_tree
from subchat_magics.batch import MARK, request_digest
from subchat_magics.errors import InvalidInput
from subchat_magics.session import default_session

values = st.one_of(st.text(max_size=8), st.none(), st.just(math.nan), st.just(""),
                   st.integers(-5, 5))
steps = st.lists(st.fixed_dictionaries({
    "template": st.sampled_from(["say {item}", "shout {item}", "{item}?"]),
    "temperature": st.sampled_from([None, 0.5]),
    "choice": st.sampled_from([None, "yes,no"]),
    "system": st.sampled_from([None, "Be brief.", "Be long."]),
    "redo": st.booleans(),
    "fresh": st.booleans(),
    "cut_after": st.one_of(st.none(), st.integers(0, 6)),
}), min_size=1, max_size=5)


def _messages(db) -> dict[int, tuple]:
    conn = sqlite3.connect(db)
    try:
        return {r[0]: r[1:] for r in conn.execute(
            "SELECT id, chat_id, role, content, status FROM messages")}
    finally:
        conn.close()


def _check_digests(tree) -> None:
    conn = sqlite3.connect(tree.path)
    try:
        rows = conn.execute(
            "SELECT u.content, a.provenance FROM messages a JOIN messages u ON "
            "u.chat_id = a.chat_id AND u.seq = a.seq - 1 WHERE a.role = 'assistant'").fetchall()
    finally:
        conn.close()
    import json

    for text, prov in rows:
        mark = json.loads(prov or "{}").get(MARK)
        if isinstance(mark, dict) and "request" in mark:
            assert mark["digest"] == request_digest(mark["request"])
            assert mark["request"]["message"] == hashlib.sha256(
                text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(items=st.lists(values, min_size=1, max_size=8), plan=steps)
def test_no_message_is_ever_lost_and_every_row_matches_its_digest(tmp_path_factory, items, plan):
    tree = open_tree(tmp_path_factory.mktemp("p") / "s.db")
    session = default_session().on_tree(tree)
    try:
        for step in plan:
            before = _messages(tree.path)
            template = step["template"]
            opts = {k: v for k, v in (("temperature", step["temperature"]),) if v is not None}
            if step["choice"]:
                from subchat_magics import structured

                opts["constraint"] = structured.from_options(choice=step["choice"], namespace={})
            try:
                batch = session.batch("root", items, lambda x, i, t=template: t.replace("{item}", str(x)),
                                      name="b", backend="echo", concurrency=2,
                                      redo=step["redo"] and not step["fresh"],
                                      fresh=step["fresh"], system=step["system"], **opts)
            except InvalidInput:
                assert _messages(tree.path) == before  # a refusal writes nothing
                continue

            def progress(p, cut=step["cut_after"]):
                if cut is not None and p.ended - p.reused - p.skipped >= cut and not p.finished:
                    raise KeyboardInterrupt

            try:
                batch.run(progress, every=0)
            except KeyboardInterrupt:
                pass
            after = _messages(tree.path)
            for mid, (chat, role, content, status) in before.items():
                assert mid in after, "a message was deleted"
                if status == "complete":
                    assert after[mid] == (chat, role, content, status)
                else:
                    assert after[mid][:2] == (chat, role)  # a cut reply is never rewritten
                    assert after[mid][2].startswith(content)
            _check_digests(tree)
    finally:
        tree.close()
