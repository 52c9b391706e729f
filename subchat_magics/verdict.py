"""Many answers, one verdict: what a reply answers, the most common answer of several
samples (self-consistency voting), and scores of answers against labels.

What is compared is the *answer* of a reply: the parsed value under a constraint
(``--json``/``--choice``/``--regex``), else the first group of ``--answer PATTERN``
(``'\\boxed\\{(.+?)\\}'``), else the whole reply, stripped. Answers are compared by a key
(JSON values by their canonical JSON), so ``{"a": 1, "b": 2}`` and ``{"b": 2, "a": 1}``
are one answer.

A helper module: pure Python, imports only the error hierarchy (pandas and matplotlib
are used only when the caller already has them).
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from .errors import InvalidInput

MAX_VOTE = 64  # samples of one message at most


# -- what a reply answers -------------------------------------------------------------------------
def compile_answer(pattern: str | None) -> "re.Pattern[str] | None":
    """``--answer PATTERN`` compiled; refused unless it compiles and has a group (the
    first group is the answer)."""
    if pattern is None:
        return None
    if not isinstance(pattern, str) or not pattern:
        raise InvalidInput("--answer takes a regular expression whose first group is the "
                           "answer, e.g. --answer '\\\\boxed\\{(.+?)\\}'")
    try:
        rx = re.compile(pattern, re.S)
    except re.error as exc:
        raise InvalidInput(f"--answer {pattern!r} is not a regular expression ({exc}); "
                           "fix it, e.g. --answer 'Answer: (\\w+)'") from None
    if rx.groups < 1:
        raise InvalidInput(f"--answer {pattern!r} has no group: put the answer in "
                           "parentheses, e.g. --answer 'Answer: (\\w+)'")
    return rx


def check_vote(k: Any) -> int | None:
    """``--vote K``: None, or a number of samples from 2 to :data:`MAX_VOTE`."""
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= MAX_VOTE:
        raise InvalidInput(f"--vote takes a number of samples from 2 to {MAX_VOTE}, not {k!r} "
                           "(one sample has nothing to vote on)")
    return k


def answer_of(text: str | None, *, value: Any = None, constrained: bool = False,
              pattern: "re.Pattern[str] | None" = None) -> Any:
    """The answer of a reply: ``value`` under a constraint, else ``pattern``'s first group
    (its last match: a model states its final answer last; None without a match), else
    the stripped text. None for a reply that is missing."""
    if constrained:
        return value
    if text is None:
        return None
    if pattern is not None:
        found = list(pattern.finditer(text))
        if not found:
            return None
        got = found[-1].group(1)
        return got.strip() if got is not None else None
    return text.strip()


def key_of(answer: Any) -> str:
    """A comparable key of an answer (JSON values by their canonical form)."""
    if isinstance(answer, str):
        return answer
    if hasattr(answer, "model_dump"):  # a pydantic instance
        answer = answer.model_dump()
    try:
        return json.dumps(answer, sort_keys=True, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(answer)


# -- the vote -------------------------------------------------------------------------------------
@dataclass
class Verdict:
    """The most common answer of ``k`` samples. ``answer`` is None when no sample gave
    one; ``tie`` when several answers share the top count (``tied`` lists them, the
    first-given first; ``answer`` is the first of them)."""

    answer: Any
    count: int
    k: int
    answers: list[Any] = field(default_factory=list)  # each sample's (None: none)
    tie: bool = False
    tied: list[Any] = field(default_factory=list)
    first: int | None = None  # the first sample that gave the verdict

    @property
    def agree(self) -> str:
        return f"{self.count}/{self.k} agree"

    @property
    def majority(self) -> bool:
        """More than half of the samples gave the verdict."""
        return self.answer is not None and not self.tie and 2 * self.count > self.k

    def label(self) -> str:
        """``42 (7/8 agree)``, ``tie: A, B (3/8 each)``, ``no answer (0/8)``."""
        if self.answer is None:
            return f"no answer (0/{self.k})"
        if self.tie:
            return (f"tie: {', '.join(_short(str(a)) for a in self.tied)} "
                    f"({self.count}/{self.k} each; the first given is taken)")
        return f"{_short(str(self.answer))} ({self.agree})"

    @classmethod
    def stored(cls, vote: dict[str, Any]) -> "Verdict":
        """The verdict a vote's reply keeps in its provenance (``vote``)."""
        answers = list(vote.get("answers") or [])
        k = int(vote.get("k") or len(answers))
        tied = list(vote.get("tie") or [])
        return cls(vote.get("answer"), int(vote.get("count") or 0), k, answers,
                   tie=bool(tied), tied=tied)

    def provenance(self) -> dict[str, Any]:
        out: dict[str, Any] = {"answer": _jsonable(self.answer), "count": self.count,
                               "k": self.k, "agree": self.agree,
                               "answers": [_jsonable(a) for a in self.answers]}
        if self.tie:
            out["tie"] = [_jsonable(a) for a in self.tied]
        return out


def tally(answers: Sequence[Any]) -> Verdict:
    """The verdict of the samples' answers (None: a sample that gave none)."""
    given = [(i, a) for i, a in enumerate(answers) if a is not None]
    counts: Counter[str] = Counter(key_of(a) for _, a in given)
    if not counts:
        return Verdict(None, 0, len(answers), list(answers))
    top = max(counts.values())
    order: list[str] = []
    first: dict[str, int] = {}
    for i, a in given:
        k = key_of(a)
        if k not in first:
            first[k] = i
            order.append(k)
    winners = [k for k in order if counts[k] == top]
    win = first[winners[0]]
    tied = [answers[first[k]] for k in winners] if len(winners) > 1 else []
    return Verdict(answers[win], top, len(answers), list(answers), tie=len(winners) > 1,
                   tied=tied, first=win)


# -- scores against labels -------------------------------------------------------------------------
@dataclass
class Score:
    """How answers compare with labels: accuracy, the confusion counts
    ``{(label, answer): n}`` and the positions of the rows that disagree."""

    name: str
    n: int
    correct: int
    confusion: dict[tuple[str, str], int]
    wrong: list[int]
    unscored: int = 0  # rows without a label (None, NaN, NA): not scored, not counted in n

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def line(self, what: str = "accuracy") -> str:
        out = f"{self.name}: {what} {self.correct}/{self.n} ({100 * self.accuracy:.0f}%)"
        if self.unscored:
            out += f"; {self.unscored} row(s) without a label not scored"
        return out

    def table(self) -> str:
        """The confusion counts as a text table (rows: labels, columns: answers)."""
        labels = sorted({k[0] for k in self.confusion})
        answers = sorted({k[1] for k in self.confusion})
        w = max([len(_short(x, 20)) for x in labels + answers + ["label \\ answer"]])
        head = "label \\ answer".ljust(w) + " " + " ".join(_short(a, 20).rjust(w) for a in answers)
        rows = [_short(lab, 20).ljust(w) + " " + " ".join(
            str(self.confusion.get((lab, a), 0)).rjust(w) for a in answers) for lab in labels]
        return "\n".join([head, *rows])

    def frame(self) -> Any:
        """The confusion counts as a pandas DataFrame (pandas must be imported)."""
        pd = sys.modules["pandas"]
        labels = sorted({k[0] for k in self.confusion})
        answers = sorted({k[1] for k in self.confusion})
        return pd.DataFrame([[self.confusion.get((lab, a), 0) for a in answers] for lab in labels],
                            index=pd.Index(labels, name="label"),
                            columns=pd.Index(answers, name="answer"))


def unlabelled(value: Any) -> bool:
    """Whether a label is missing: None, a float NaN, pandas' NA/NaT (a row without one
    is not scored)."""
    if value is None:
        return True
    if isinstance(value, float):
        return value != value
    pd = sys.modules.get("pandas")
    if pd is not None and type(value).__module__.partition(".")[0] in ("pandas", "numpy"):
        try:
            out = pd.isna(value)
        except (TypeError, ValueError):
            return False
        return out is True or (type(out).__name__ == "bool_" and bool(out))
    return False


def score(answers: Sequence[Any], labels: Sequence[Any], name: str = "answers", *,
          skip_missing: bool = True) -> Score:
    """Compare each answer with its label (as text, stripped, case kept; a missing
    answer is wrong and counted as ``(none)``). A row without a label (None, NaN, pandas'
    NA) is not scored: it is left out of ``n`` and counted in ``unscored``; ``wrong``
    holds positions in ``answers``."""
    if len(answers) != len(labels):
        raise InvalidInput(f"{len(labels)} labels for {len(answers)} answers")
    confusion: Counter[tuple[str, str]] = Counter()
    wrong = []
    correct = unscored = 0
    for i, (a, lab) in enumerate(zip(answers, labels)):
        if skip_missing and unlabelled(lab):
            unscored += 1
            continue
        la = _label_text(lab)
        aa = "(none)" if a is None else _label_text(a)
        confusion[(la, aa)] += 1
        if a is not None and aa == la:
            correct += 1
        else:
            wrong.append(i)
    return Score(name, len(answers) - unscored, correct, dict(confusion), wrong, unscored)


def agreement(a: Sequence[Any], b: Sequence[Any], name: str) -> Score:
    """How often two models' answers agree (the same figures as :func:`score`; a row
    where the second gave no answer counts as a disagreement)."""
    return score(a, b, name, skip_missing=False)


def _label_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # (an int column with a missing value is float in pandas: 1.0 is 1)
    return value.strip() if isinstance(value, str) else key_of(value)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool, list, dict)):
        return value
    if hasattr(value, "model_dump"):
        return value.model_dump()
    return str(value)


def _short(text: str, n: int = 40) -> str:
    text = str(text).replace("\n", " ")
    return text if len(text) <= n else text[: n - 1] + "…"


__all__ = ["Verdict", "Score", "compile_answer", "check_vote", "answer_of", "key_of", "tally",
           "score", "agreement", "MAX_VOTE"]
