"""``--estimate``: a batch sized before it runs. The rows to send (after ``--limit``), their
prompt tokens (counted with the model's tokenizer and chat template on vLLM; estimated
from UTF-8 bytes elsewhere, and said so), the KV budget (how many rows the engine holds
in flight at ``max_model_len``), and a projected time and output-token count from a timed
sample: the first ``--sample K`` rows to send, run for real as rows of the batch (the
run that follows reuses them). Then it stops, saying the cell to run.

The projection: output tokens are the sample's a row times the rows left; time comes
from the sample run as two groups (a quarter of it, then the rest), whose two timings
give a wave's fixed time and each row's share, and the rows left run in waves of as many
rows as the run keeps in flight (``--concurrency``, capped by an engine's ``max_num_seqs``
and KV cache). ``bench/bench_verdicts.py`` checks it against the real run.

A caller of the batch (as :mod:`subchat_magics.multibatch`); never IPython.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .backends.base import Backend, GenerationOptions
from .batch import Batch, Row
from .errors import InvalidInput, SubchatError
from .words import counted

DEFAULT_SAMPLE = 4  # rows timed when --sample is not given
MAX_SAMPLE = 256
BYTES_PER_TOKEN = 3.0  # without a tokenizer: UTF-8 bytes / 3 (high for English text)
TOKENS_PER_MESSAGE = 8  # the template's markers around each message


@dataclass
class Side:
    """What one model of a row is asked: its backend, options and samples a row."""

    backend: Backend
    options: GenerationOptions
    k: int = 1
    name: str | None = None


@dataclass
class Estimate:
    """A batch sized: counts before anything is sent, then the timed sample."""

    path: str
    rows: int  # after --limit, not skipped
    done_before: int  # reused from an earlier run (not sent again)
    skipped: int
    to_send: int
    prompt_tokens: int  # of the rows to send, every model (a vote's prompt once a row on vLLM)
    exact: bool  # counted with the model's tokenizer
    how: str
    longest: int
    too_long: int  # rows whose prompt does not fit the window
    max_tokens: int
    sequences: int  # sequences a row (samples x models)
    in_flight: int
    kv: dict[str, Any] | None = None
    sides: int = 1  # models a row
    sample_rows: int = 0
    sample_s: float = 0.0
    sample_out_tokens: int = 0
    sample_failed: int = 0
    left: int = 0  # rows still to send after the sample
    projected_s: float | None = None
    projected_out_tokens: int | None = None
    cell: str | None = None
    model: str = ""  # how the projection was made
    notes: list[str] = field(default_factory=list)

    def seq_tokens(self) -> float:
        """KV tokens one sequence takes at most: its prompt (an engine's samples of one
        row share the prompt's blocks) and ``max_tokens``."""
        prompts = self.prompt_tokens / max(1, self.to_send) / max(1, self.sides)
        return prompts + self.max_tokens

    def lines(self) -> list[str]:
        out = [f"estimate for {self.path}: {counted(self.rows, 'row')}"
               + (f" ({self.done_before} done before, {self.to_send} to send)"
                  if self.done_before else f", {self.to_send} to send")
               + (f", {self.skipped} skipped" if self.skipped else "")]
        per = self.prompt_tokens / max(1, self.to_send)
        if not self.to_send:  # nothing counted: no figures, and no claim of how
            out.append("prompt tokens: none to send")
        else:
            out.append(f"prompt tokens: {self.prompt_tokens:,} ({per:,.0f} a row, longest "
                       f"{self.longest:,}) {self.how}"
                       + (f"; {counted(self.too_long, 'row')} {'does' if self.too_long == 1 else 'do'} not fit the window" if self.too_long else ""))
        kv = self.kv
        if kv and kv.get("kv_tokens"):
            need = self.seq_tokens()
            fit = int(kv["kv_tokens"] // max(1.0, need))
            if kv.get("max_num_seqs"):
                fit = min(fit, int(kv["max_num_seqs"]))
            out.append(f"KV budget: {kv['kv_tokens']:,} tokens: {counted(int(kv.get('rows_in_flight') or 0), 'row')} "
                       f"in flight at max_model_len {kv.get('max_model_len')}"
                       + (f" (max_num_seqs {kv['max_num_seqs']})" if kv.get("max_num_seqs") else "")
                       + f"; at this batch's ~{need:,.0f} tokens a sequence, {counted(fit, 'sequence', group=True)} "
                       f"({counted(fit // max(1, self.sequences), 'row', group=True)} of {self.sequences})")
        else:
            out.append(f"KV budget: the server's (not known here); {counted(self.in_flight, 'row')} in "
                       "flight (--concurrency)")
        if self.sample_rows:
            out.append(f"sample: {counted(self.sample_rows, 'row')} in {self.sample_s:.2f} s, "
                       f"{self.sample_out_tokens:,} output tokens"
                       + (f", {self.sample_failed} failed" if self.sample_failed else "")
                       + " (kept: they are rows of the batch)")
        if self.projected_s is not None:
            out.append(f"projected for the {counted(self.left, 'row')} left: ~{_duration(self.projected_s)}, "
                       f"~{self.projected_out_tokens:,} output tokens (from the sample: "
                       f"{self.model})")
        elif self.to_send and not self.sample_rows:
            out.append("projected: no row was timed (--sample 0)")
        out += [f"note: {n}" for n in self.notes]
        if self.cell:
            out.append(f"to run it: {self.cell}")
        return out


def check_sample(k: Any) -> int:
    """``--sample K``: rows timed, 0 to :data:`MAX_SAMPLE` (0: count only)."""
    if k is None:
        return DEFAULT_SAMPLE
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_SAMPLE:
        raise InvalidInput(f"--sample takes a number of rows to time from 0 to {MAX_SAMPLE}, "
                           f"not {k!r}")
    return k


def estimate_tokens(messages: Sequence[dict[str, Any]]) -> int:
    """Prompt tokens without a tokenizer (UTF-8 bytes / 3 and a few a message)."""
    return sum(TOKENS_PER_MESSAGE + math.ceil(len(str(m.get("content") or "").encode("utf-8"))
                                              / BYTES_PER_TOKEN) for m in messages) + 4


def count(batch: Batch, sides: Sequence[Side]) -> Estimate:
    """Everything known before a row is sent: rows, prompt tokens, the KV budget."""
    rows = [r for r in batch.rows if r.status != "skipped"]
    todo = pending_rows(batch)
    exact, total, longest, too_long = True, 0, 0, 0
    kv = None
    for side in sides:
        try:
            kv = kv or side.backend.kv_budget()
        except SubchatError:
            kv = None
    for r in todo:
        messages = batch.make_exchange(batch.chat, r.text).messages
        for side in sides:
            n = None
            try:
                n = side.backend.prompt_tokens(messages, side.options)
            except SubchatError:
                too_long += 1
            if n is None:
                exact = False
                n = estimate_tokens(messages)
            per_row = n if kv is not None else n * side.k  # an engine computes a vote's prompt once
            total += per_row
            longest = max(longest, n)
    names = sorted({s.backend.id for s in sides})
    how = ("counted with the model's tokenizer and chat template" if exact
           else f"estimated (UTF-8 bytes / {BYTES_PER_TOKEN:g}: {', '.join(names)} has no "
                "tokenizer here)")
    return Estimate(batch.path, len(rows), len(rows) - len(todo), len(batch.rows) - len(rows),
                    len(todo), total, exact, how, longest, too_long,
                    int(sides[0].options.max_tokens), sum(s.k for s in sides),
                    batch.in_flight, kv, len(sides))


def pending_rows(batch: Batch) -> list[Row]:
    return [r for r in batch.rows if r.status == "pending" and not r.reused]


def wave(est: Estimate) -> int:
    """Rows the run keeps in flight at once: the batch's concurrency (in sequences, a row
    being ``sequences`` of them), capped by an engine's ``max_num_seqs`` and by the KV
    cache at this batch's length."""
    seqs = max(1, est.sequences)
    rows = max(1, est.in_flight // seqs) if est.in_flight >= seqs else 1
    kv = est.kv or {}
    if kv.get("max_num_seqs"):
        rows = min(rows, max(1, int(kv["max_num_seqs"]) // seqs))
    if kv.get("kv_tokens"):
        need = est.seq_tokens()
        rows = min(rows, max(1, int(kv["kv_tokens"] // max(1.0, need)) // seqs))
    return rows


def sample(est: Estimate, batch: Batch, k: int, run: Callable[[], Any]) -> Estimate:
    """Run the first ``k`` rows to send (the others held back), timed, and project the
    rest. ``run`` runs the batch (plain or with several answers). With 4 rows or more the
    sample runs as two groups, a quarter then the rest: two timings give a wave's fixed
    time and each row's share of it, so the projection follows how the backend batches
    (a remote server at ``--concurrency`` takes about as long for 1 row as for 4; an
    engine's step grows with its batch); the rest runs in waves of :func:`wave` rows."""
    todo = pending_rows(batch)
    chosen, held = todo[:k], todo[k:]
    est.left = len(held)
    if not chosen:
        return est
    split = max(1, len(chosen) // 4)
    groups = [chosen[:split], chosen[split:]] if len(chosen) >= 4 else [chosen]
    times: list[float] = []
    for g, group in enumerate(groups):
        later = [r for gg in groups[g + 1:] for r in gg]
        waiting = held + later
        for r in waiting:  # the run sends only pending rows that are not reused
            r.status, r.reused = "held", True
        batch._started = False  # (each group is one run of the planned batch)
        t0 = time.perf_counter()
        try:
            run()
        finally:
            times.append(time.perf_counter() - t0)
            for r in waiting:
                r.status, r.reused = "pending", False
            for r in group:
                r.reused = r.reused or r.status == "done"  # not sent again by the next group
    est.sample_s = sum(times)
    est.sample_rows = len(chosen)
    est.sample_out_tokens = sum(r.completion_tokens for r in chosen)
    est.sample_failed = sum(1 for r in chosen if r.status != "done")
    timed = max(1, len(chosen) - est.sample_failed)
    est.projected_out_tokens = int(round(est.sample_out_tokens / timed * est.left))
    w = min(wave(est), max(1, est.left))
    if len(groups) == 2:
        (n1, n2), (t1, t2) = (len(groups[0]), len(groups[1])), times
        per_row = max(0.0, (t2 - t1) / (n2 - n1)) if n2 != n1 else 0.0
        fixed = max(0.0, t1 - per_row * n1)
        est.model = f"a wave of {counted(w, 'row')}: {fixed:.2f} s + {per_row:.3f} s a row"
        est.projected_s = math.ceil(est.left / w) * (fixed + per_row * w) if est.left else 0.0
    else:
        est.model = f"{counted(len(chosen), 'row')} at once"
        est.projected_s = est.sample_s * math.ceil(est.left / max(1, len(chosen)))
    if est.sample_failed:
        est.notes.append(f"{counted(est.sample_failed, 'sampled row')} did not complete: "
                         "the projection counts them as they ran")
    return est


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


__all__ = ["Estimate", "Side", "count", "sample", "check_sample", "DEFAULT_SAMPLE"]
