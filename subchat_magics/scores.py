"""What a vote or comparison batch answered, read back from the store: each row's answer
per model (the verdict under ``--vote``, and the first sample's), the label ``--labels``
gave it (kept in the row's batch mark), and the scores ``%subchat show`` of the batch
chat prints: accuracy (with and without the vote), agreement between models, the
confusion table and the rows that disagree.

Nothing here is kept apart from the rows: a row's reply carries its answer (the vote's
provenance, or the reply itself) and its label, so the scores are those of the rows as
stored now (a row sent again as ``attempt-K`` counts as its latest attempt).

Under the render layer, over :mod:`subchat_magics.batch` and :mod:`subchat_magics.vote`;
never IPython."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from . import verdict
from .batch import ATTEMPT, MARK, first_exchanges
from .tree import Chat, ChatTree
from .vote import MARK as VOTE_MARK
from .words import counted

LABEL = "label"  # the key of a row's label inside its batch mark


@dataclass
class Board:
    """The rows of a vote or comparison batch (or one run with ``--labels``), as stored:
    per side (``None``: the one model; else the model's subchat name) each row's answer
    and status; the first sample's answer under a vote; each row's label (``None``
    where the row holds none)."""

    path: str
    sides: list[str | None]
    rows: list[str] = field(default_factory=list)
    answers: dict[str | None, list[Any]] = field(default_factory=dict)
    first: dict[str | None, list[Any]] = field(default_factory=dict)
    status: dict[str | None, list[str | None]] = field(default_factory=dict)
    labels: list[Any] = field(default_factory=list)
    labelled: list[bool] = field(default_factory=list)
    vote: bool = False
    total: int = 0

    @property
    def compare(self) -> bool:
        return self.sides != [None]

    @property
    def done(self) -> int:
        """Rows whose every side completed."""
        return sum(1 for i in range(len(self.rows))
                   if all(self.status[s][i] == "complete" for s in self.sides))

    def scores(self) -> list[verdict.Score]:
        """Accuracy per side over the labelled rows (under a vote, also without it), and
        the agreement of the first two sides over every row."""
        keep = [i for i, ok in enumerate(self.labelled) if ok]
        out: list[verdict.Score] = []
        if keep:
            labels = [self.labels[i] for i in keep]
            for s in self.sides:
                name = s or "answers"
                answers = [self.answers[s][i] for i in keep]
                out.append(verdict.score(answers, labels, name + (" (vote)" if self.vote else "")))
                if self.vote:
                    out.append(verdict.score([self.first[s][i] for i in keep], labels,
                                             f"{name} (first sample, no vote)"))
        return out

    def agreement(self) -> verdict.Score | None:
        if len(self.sides) < 2:
            return None
        a, b = self.sides[0], self.sides[1]
        return verdict.agreement(self.answers[a], self.answers[b], f"{a} vs {b}")

    def lines(self) -> list[str]:
        """The scores as ``show`` prints them (nothing without labels or a comparison)."""
        out: list[str] = []
        scores = self.scores()
        n = sum(self.labelled)
        if scores and n < len(self.rows):
            out.append(f"scores over the {n} of {counted(len(self.rows), 'row')} that hold a label "
                       "(rows sent without --labels hold none)")
        out += [s.line() for s in scores]
        ag = self.agreement()
        if ag is not None:
            out.append(ag.line("agreement"))
        for s in scores:
            if "first sample" in s.name:
                continue
            out.append(f"confusion ({s.name}):")
            out += s.table().splitlines()
            if s.wrong:
                keep = [i for i, ok in enumerate(self.labelled) if ok]
                names = [self.rows[keep[i]] for i in s.wrong[:10]]
                out.append(f"disagreeing rows ({s.name}): {', '.join(names)}"
                           + (" …" if len(s.wrong) > 10 else ""))
        return out


def board(tree: ChatTree, chat: Chat) -> Board | None:
    """The board of the batch chat ``chat``, or None when its rows are plain (no vote,
    no comparison, no labels). Reads each row's latest attempt."""
    sides: list[str | None] | None = None
    rows: list[tuple[str, dict[str | None, tuple[str, str, dict[str, Any]]]]] = []
    vote = labelled = False
    total = 0
    for row in tree.children(chat):
        latest = _latest(tree, row)
        got: dict[str | None, tuple[str, str, dict[str, Any]]] = {}
        msgs = tree.store.messages(latest.id, limit=2)
        if len(msgs) == 2 and isinstance(msgs[1].provenance.get(MARK), dict):
            got[None] = (msgs[1].content, msgs[1].status, msgs[1].provenance)
        else:
            names = {c.id: c.name for c in tree.children(latest)}
            for cid, ex in first_exchanges(tree, latest).items():
                if len(ex) > 1 and isinstance(ex[1][3].get(MARK), dict) and cid in names:
                    got[names[cid]] = (ex[1][1], ex[1][2], ex[1][3])
        if not got:
            continue
        for _, _, prov in got.values():
            mark = prov[MARK]
            vote = vote or isinstance(prov.get(VOTE_MARK), dict)
            labelled = labelled or LABEL in mark
            total = max(total, int(mark.get("of") or 0))
        if sides is None:
            sides = list(got)
        rows.append((row.name, got))
    if sides is None or not (vote or labelled or sides != [None]):
        return None
    b = Board(chat.path, sides, vote=vote, total=max(total, len(rows)))
    for s in sides:
        b.answers[s], b.first[s], b.status[s] = [], [], []
    for name, got in rows:
        b.rows.append(name)
        label, has = None, False
        for s in sides:
            content, status, prov = got.get(s, (None, None, {}))
            answer, first = _answer(content, status, prov)
            b.answers[s].append(answer)
            b.first[s].append(first)
            b.status[s].append(status)
            mark = prov.get(MARK) or {}
            if LABEL in mark and not has:
                label, has = mark[LABEL], True
        b.labels.append(label)
        b.labelled.append(has)
    return b


def _latest(tree: ChatTree, row: Chat) -> Chat:
    attempts = sorted(((int(m.group(1)), k) for k in tree.children(row)
                       if (m := ATTEMPT.fullmatch(k.name)) is not None), key=lambda a: a[0])
    return attempts[-1][1] if attempts else row


def _answer(content: str | None, status: str | None, prov: dict[str, Any]) -> tuple[Any, Any]:
    """A stored side's answer and its first sample's (the same without a vote)."""
    if status != "complete" or content is None:
        return None, None
    v = prov.get(VOTE_MARK)
    if isinstance(v, dict) and "answers" in v:
        answers = v.get("answers") or [None]
        return v.get("answer"), answers[0]
    c = prov.get("constraint")
    if isinstance(c, dict) and c.get("kind") == "json":
        try:
            value = json.loads(content, strict=False)
        except ValueError:
            value = None
        return value, value
    return content.strip(), content.strip()


__all__ = ["Board", "board", "LABEL"]
