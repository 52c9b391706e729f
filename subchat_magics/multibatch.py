"""Batches whose rows take several answers: ``--each`` with ``--vote K`` (K samples a row
and the row's verdict) and/or ``--compare A,B`` (each model's answer a row), and
identical prompts sent once when sampling is deterministic.

A row of a vote is the row chat ``PATH/NAME/<index>`` holding the verdict exchange, its
samples in ``PATH/NAME/<index>/1..K`` (as :mod:`subchat_magics.vote` stores one). A row of
a comparison is the row chat holding nothing, with one subchat per model
(``PATH/NAME/<index>/<model>``), each holding that model's exchange (or vote). Every
sample of every row goes through the backend's pool (on vLLM one engine request with
``n=K`` a row and model); each model has its own runner.

The rows are planned by :meth:`subchat_magics.session.Session.batch` (the same checks,
row chats, resume rule); this module only runs them. Core: never IPython, never pandas
unless already imported.
"""

from __future__ import annotations

import re
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from .backends.base import Finish, GenerationOptions
from .backends.registry import Selection
from .batch import MARK as BATCH_MARK
from .batch import Batch, BatchResult, Progress, Row, claim, first_exchanges
from .exchange import Exchange, Runner
from .scores import LABEL
from .tree import Chat
from .verdict import Verdict, _jsonable, answer_of, tally
from .vote import MARK as VOTE_MARK
from .vote import sample_answer, store_verdict

DUPLICATE = "duplicate_of"  # provenance of a row filled from an identical prompt's reply
START_CHUNK = 64  # rows made and submitted together (measured: 16, 64, 256 within noise; 64 a hair faster)


@dataclass
class Side:
    """One model of a row (the only one without ``--compare``): its name (None: the row
    chat itself), its backends and the options of each sample (one: no vote)."""

    name: str | None
    selection: Selection
    options: list[GenerationOptions]

    @property
    def k(self) -> int:
        return len(self.options)


@dataclass
class _Job:
    """One side of one row in flight."""

    row: Row
    side: int
    target: Chat
    parent: Exchange | None  # the verdict exchange (a vote), else None
    samples: list[Exchange]
    ended: int = 0


@dataclass
class RowAnswers:
    """Each side's answer of a row (and its verdict, under a vote)."""

    answers: dict[str | None, Any] = field(default_factory=dict)
    verdicts: dict[str | None, Verdict] = field(default_factory=dict)


class MultiBatch:
    """Run a planned :class:`~subchat_magics.batch.Batch` with several answers a row."""

    def __init__(self, batch: Batch, sides: list[Side], *, pattern: "re.Pattern[str] | None" = None,
                 default_system: str | None = None, labels: list[Any] | None = None):
        self.batch = batch
        # --labels: each row's label, kept in its batch mark (show of the batch chat scores
        # the rows as stored: :mod:`subchat_magics.scores`)
        self.labels = ({r.pos: _jsonable(lab) for r, lab in zip(batch.rows, labels)}
                       if labels is not None else None)
        self.sides = sides
        self.pattern = pattern
        self.default_system = default_system
        self.tree = batch.tree
        self.chat = batch.chat
        self.rows = batch.rows
        self.progress: Progress = batch.progress
        self.per_row: dict[int, RowAnswers] = {}  # row position -> its answers
        self._jobs: dict[int, _Job] = {}  # id(exchange) -> its job
        self._left: dict[int, int] = {}  # row pos -> sides not ended
        self._failed: set[int] = set()  # row pos with a side that did not complete
        self._unsent: list[Exchange] = []  # begun, not yet handed to a backend
        self._resume()

    @property
    def vote(self) -> bool:
        return any(s.k > 1 for s in self.sides)

    @property
    def compare(self) -> bool:
        return self.sides[0].name is not None

    @property
    def path(self) -> str:
        return self.chat.path

    # -- resuming: decided by the batch's own rule (batch.match_rows, under its Shape) -----------
    def _resume(self) -> None:
        """Read the answers of the rows a rerun reuses. Which rows are reused, resent (a
        new attempt ``attempt-K``), kept as a person left them, being answered by another
        kernel (``claimed``) or refused as sent under another request was decided when the
        batch was planned, by :func:`subchat_magics.batch.match_rows` given the rows'
        :class:`~subchat_magics.batch.Shape`: the plain batch's rule."""
        for r in self.rows:
            if r.reused and r.status == "done" and r.chat_id is not None:
                chat = self.tree.find(r.chat_id)
                got = self._stored(chat, r) if chat is not None else None
                if got is not None:
                    self.per_row[r.pos] = got
                    r.result = self._result(got)

    def _stored(self, chat: Chat, row: Row) -> RowAnswers | None:
        """A row's answers as stored, if every side completed with this row's message."""
        out = RowAnswers()
        if self.compare:
            firsts = first_exchanges(self.tree, chat)
            by_name = {c.name: c for c in self.tree.children(chat)}
            for s in self.sides:
                c = by_name.get(s.name or "")
                ex = firsts.get(c.id) if c is not None else None
                if not ex or len(ex) < 2 or ex[0][1] != row.text or ex[1][2] != "complete":
                    return None
                self._read_side(out, s, ex[1][1], ex[1][3])
            return out
        msgs = self.tree.store.messages(chat.id)[:2]
        if len(msgs) < 2 or msgs[0].content != row.text or msgs[1].status != "complete":
            return None
        self._read_side(out, self.sides[0], msgs[1].content, msgs[1].provenance)
        return out

    def _read_side(self, out: RowAnswers, side: Side, text: str, prov: dict[str, Any]) -> None:
        v = prov.get(VOTE_MARK)
        if side.k > 1 and isinstance(v, dict) and "answers" in v:
            verdict = tally(v["answers"])
            out.verdicts[side.name] = verdict
            out.answers[side.name] = verdict.answer
            return
        c = side.options[0].constraint
        value = None
        if c is not None:
            try:
                value = c.parse(text)
            except Exception:  # noqa: BLE001 - stored complete, so it parsed once
                value = None
        out.answers[side.name] = answer_of(text, value=value, constrained=c is not None,
                                           pattern=self.pattern if side.k > 1 else None)

    def _result(self, got: RowAnswers) -> Any:
        if not self.compare:
            return got.answers.get(None)
        return {s.name: got.answers.get(s.name) for s in self.sides}

    # -- the run -------------------------------------------------------------------------------
    def run(self, progress: Callable[[Progress], None] | None = None, every: float = 0.1
            ) -> BatchResult:
        """Send every row not done yet and wait (Ctrl-C: every request in flight stops,
        the completed rows are kept, the cut ones are sent again by the next run)."""
        batch = self.batch
        if batch._started:
            from .errors import InvalidInput

            raise InvalidInput("a batch runs once; plan it again to resume it")
        batch._started = True
        t0 = time.perf_counter()
        p = self.progress
        last = [0.0]

        def tick(force: bool = False) -> None:
            now = time.perf_counter()
            p.elapsed_s = now - t0
            if progress is not None and (force or now - last[0] >= every):
                last[0] = now
                progress(p)

        tick(force=True)
        self.tree.emit("batch-start", id=self.chat.id, path=self.path, total=len(self.rows))
        batch._kids = None
        pending = deque(r for r in self.rows if not r.reused and r.status == "pending")
        if not pending:
            p.finished = True
            tick(force=True)
            return batch.result()
        limit = batch.in_flight
        runners = [Runner(s.selection, size=limit, stream_deltas=False, on_end=self._record)
                   for s in self.sides]
        try:
            while pending or any(r.flying for r in runners):
                per_row = max(s.k for s in self.sides)
                while pending and max(r.in_flight for r in runners) + per_row <= max(limit, per_row):
                    room = (max(limit, per_row) - max(r.in_flight for r in runners)) // per_row
                    self._start([pending.popleft() for _ in range(min(len(pending), room, START_CHUNK))],
                                runners)
                for r in runners:
                    if r.flying:
                        with batch._writes(r):  # one commit; rewritten if Ctrl-C cuts it
                            r.step(0.02 if len(runners) > 1 else 0.05)
                            while r.handled and r.flying:
                                r.step(0)
                p.in_flight = sum(r.in_flight for r in runners)
                tick()
        except BaseException as exc:
            for r in runners:
                r.close(exc)
            flying = {id(ex) for r in runners for ex in r.flying.values()}
            for ex in self._unsent:  # stored, never handed to a backend
                if ex.begun and ex.reply is None and id(ex) not in flying:
                    ex.fail(exc)
                    self._record(ex)
            self._unsent = []
            p.in_flight = 0
            p.finished = True
            tick(force=True)
            raise
        finally:
            for r in runners:
                r.close()
        p.in_flight = 0
        p.finished = True
        tick(force=True)
        return batch.result()

    def _start(self, rows: list[Row], runners: list[Runner]) -> None:
        """Make the rows' chats (the row chats, each side's, each sample's: one store
        round), then begin and submit every sample, a row and side a group."""
        tree = self.tree
        row_chats = self.batch._row_chats(rows)
        made: list[tuple[int, str]] = []  # (parent id, name) to insert
        with tree.store.transaction():
            for rc in row_chats:
                if self.compare:
                    for s in self.sides:
                        made.append((rc.id, s.name))  # type: ignore[arg-type]
            ids = [tree.store.insert_chat(pid, name, None, 0).id for pid, name in made]
        if ids:
            tree.refresh(force=True)
        targets: list[list[Chat]] = []
        it = iter(ids)
        for rc in row_chats:
            targets.append([tree.find(next(it)) for _ in self.sides] if self.compare  # type: ignore[misc]
                           else [rc])
        sample_ids: list[int] = []
        with tree.store.transaction():
            for tlist in targets:
                for side, t in zip(self.sides, tlist):
                    if side.k > 1:
                        sample_ids += [tree.store.insert_chat(t.id, str(i + 1), None, 0).id
                                       for i in range(side.k)]
        if sample_ids:
            tree.refresh(force=True)
        sit = iter(sample_ids)
        rows_jobs: list[list[_Job]] = []
        for row, rc, tlist in zip(rows, row_chats, targets):
            row.status, row.chat_id = "pending", rc.id
            mark = self.batch.row_mark(row)
            if self.labels is not None and row.pos in self.labels:
                mark[LABEL] = self.labels[row.pos]
            jobs = []
            for si, (side, t) in enumerate(zip(self.sides, tlist)):
                if side.k > 1:
                    chats = [tree.find(next(sit)) for _ in range(side.k)]
                    parent = Exchange(tree, t, row.text, side.options[0].replace(),
                                      default_system=self.default_system)
                    parent.options.seed = None
                    parent.provenance[BATCH_MARK] = dict(mark)
                    samples = [Exchange(tree, c, row.text, o, default_system=self.default_system)
                               for c, o in zip(chats, side.options)]  # type: ignore[arg-type]
                    for i, ex in enumerate(samples):
                        ex.provenance[VOTE_MARK] = {"sample": i + 1, "of": side.k, "chat": t.path}
                else:
                    parent = None
                    ex = Exchange(tree, t, row.text, side.options[0],
                                  default_system=self.default_system)
                    ex.provenance[BATCH_MARK] = dict(mark)
                    samples = [ex]
                jobs.append(_Job(row, si, t, parent, samples))
            rows_jobs.append(jobs)

        def begin(kept: list[int]) -> list[Exchange]:
            """Store the kept rows' messages (each side's on its runner's backend); the
            heads of every side name this process until they end."""
            for si, runner in enumerate(runners):
                runner.begin([ex for i in kept for j in rows_jobs[i][si:si + 1]
                              for ex in ([j.parent] if j.parent is not None else []) + j.samples])
            return [j.parent or j.samples[0] for i in kept for j in rows_jobs[i]]

        # a row's first message (its first side's verdict exchange, or its exchange) claims
        # it: a row another kernel claimed since it was planned is skipped (batch.claim)
        heads = [jobs[0].parent or jobs[0].samples[0] for jobs in rows_jobs]
        self._unsent = [ex for jobs in rows_jobs for j in jobs for ex in j.samples]
        kept = set(claim(tree, heads, begin))
        per_side: list[list[_Job]] = [[] for _ in self.sides]
        p = self.progress
        for i, (row, jobs) in enumerate(zip(rows, rows_jobs)):
            if i not in kept:
                row.status, row.reason = "claimed", "answered by another kernel"
                p.claimed += 1
                continue
            self._left[row.pos] = len(self.sides)
            self.per_row[row.pos] = RowAnswers()
            for j in jobs:
                for ex in j.samples:
                    self._jobs[id(ex)] = j
                per_side[j.side].append(j)
        p.sent += len(kept)
        for runner, jobs in zip(runners, per_side):
            for j in jobs:
                if j.parent is not None:
                    runner.submit_samples(j.samples)
                else:
                    runner.submit(j.samples)
        self._unsent = []

    def _record(self, ex: Exchange) -> None:
        job = self._jobs.pop(id(ex), None)
        if job is None:
            return
        if self.batch._group is not None:  # (the open write block: rewritten if Ctrl-C cuts it)
            self.batch._group.append(ex)
        p = self.progress
        f = ex.finish
        if f is not None:
            job.row.prompt_tokens += f.prompt_tokens or 0
            job.row.completion_tokens += f.completion_tokens or 0
            p.prompt_tokens += f.prompt_tokens or 0
            p.completion_tokens += f.completion_tokens or 0
        job.ended += 1
        if job.ended < len(job.samples):
            return
        side = self.sides[job.side]
        got = self.per_row[job.row.pos]
        if job.parent is not None:
            if self.batch._group is not None:  # (its reply rewritten if Ctrl-C cuts the block)
                self.batch._group.append(job.parent)
            verdict = tally([sample_answer(s, self.pattern) for s in job.samples])
            cut = any(s.reply is None or s.reply.status == "interrupted" for s in job.samples)
            store_verdict(job.parent, job.samples, verdict, job.samples[0].backend,  # type: ignore[arg-type]
                          interrupted=cut)
            got.verdicts[side.name] = verdict
            got.answers[side.name] = verdict.answer
            ok = job.parent.reply is not None and job.parent.reply.status == "complete"
        else:
            got.answers[side.name] = sample_answer(ex, None)
            ok = ex.reply is not None and ex.reply.status == "complete"
        if not ok:
            reply = (job.parent or ex).reply
            job.row.reason = (reply.provenance.get("error") or reply.provenance.get("finish_reason")
                              if reply is not None else "interrupted")
            self._failed.add(job.row.pos)
        self._left[job.row.pos] -= 1
        if self._left[job.row.pos] == 0:
            self._row_ended(job.row, job.row.pos not in self._failed, ex)

    def _row_ended(self, row: Row, ok: bool, last: Exchange) -> None:
        p = self.progress
        got = self.per_row[row.pos]
        interrupted = last.reply is not None and last.reply.status == "interrupted"
        if ok:
            row.status, row.reason = "done", None
            row.result = self._result(got)
            p.done += 1
        elif interrupted or row.reason == "interrupted":
            row.status, row.reason = "interrupted", "interrupted"
            p.interrupted += 1
        else:
            row.status = "failed"
            row.result = None
            p.failed += 1

    # -- results -------------------------------------------------------------------------------
    def no_majority(self) -> int:
        """Rows (done) whose vote had no majority on some side (a tie or half or fewer)."""
        return sum(1 for r in self.rows if r.status == "done"
                   and any(not v.majority for v in self.per_row.get(r.pos, RowAnswers()).verdicts.values()))

    def table(self, index: Any = None) -> Any:
        """A table of the rows: under a vote ``verdict``, ``agreement`` and ``answers``
        (each side's, prefixed by the model under --compare); under --compare one column
        per model. A pandas DataFrame when pandas is imported (the input's index), else a
        list of dicts."""
        records = []
        for r in self.rows:
            got = self.per_row.get(r.pos, RowAnswers())
            rec: dict[str, Any] = {}
            for s in self.sides:
                prefix = f"{s.name} " if self.compare else ""
                v = got.verdicts.get(s.name)
                if s.k > 1:
                    rec[f"{prefix}verdict".strip() if not self.compare else s.name] = \
                        v.answer if v else None
                    rec[f"{prefix}agreement"] = f"{v.count}/{v.k}" if v else None
                    rec[f"{prefix}answers"] = list(v.answers) if v else None
                else:
                    rec[s.name] = got.answers.get(s.name)
            records.append(rec)
        pd = sys.modules.get("pandas")
        if pd is None:
            return records
        return pd.DataFrame.from_records(records, index=index if index is not None else None)

    def answers_of(self, side: str | None) -> list[Any]:
        """Each row's answer of ``side`` (None where it has none)."""
        return [self.per_row.get(r.pos, RowAnswers()).answers.get(side)
                if r.status == "done" else None for r in self.rows]

    def first_samples_of(self, side: str | None) -> list[Any]:
        """Each row's first sample's answer (the accuracy without the vote)."""
        return [(v.answers[0] if v is not None and v.answers else None)
                for v in (self.per_row.get(r.pos, RowAnswers()).verdicts.get(side)
                          for r in self.rows)]


# -- identical prompts sent once ------------------------------------------------------------------
def deterministic(options: GenerationOptions) -> bool:
    return float(options.temperature) == 0.0


class Dedup:
    """Around a plain batch at temperature 0: rows whose message repeats an earlier row's
    are not sent; once the first is in, each copy's row chat gets the same reply through
    its own exchange, marked ``duplicate_of`` (the first's path) in its provenance, and
    the summary's notes count them. A copy whose first did not complete stays pending
    (the next run sends it)."""

    HELD = "duplicate"  # a copy's status while its first is in flight (the batch skips it)

    def __init__(self, batch: Batch):
        self.batch = batch
        first: dict[str, Row] = {}
        self.copies: list[tuple[Row, Row]] = []
        for r in batch.rows:
            if r.status == "skipped" or r.status == "claimed":
                continue
            if r.text in first:
                if r.status == "pending":
                    self.copies.append((r, first[r.text]))
            else:
                first[r.text] = r
        for r, _ in self.copies:  # the batch sends only pending rows
            r.status = self.HELD

    @property
    def count(self) -> int:
        return len(self.copies)

    def run(self, progress: Callable[[Progress], None] | None = None) -> BatchResult:
        batch = self.batch
        try:
            batch.run(progress)
        finally:
            self.fill()
        return batch.result()

    def fill(self) -> None:
        """Store each copy's exchange from its first (done ones only)."""
        batch = self.batch
        tree = batch.tree
        todo = [(r, f) for r, f in self.copies if f.status == "done" and f.chat_id is not None]
        for r, _ in self.copies:
            r.status = "pending"
        if not todo:
            return
        chats = batch._row_chats([r for r, _ in todo])
        filled = 0
        with tree.store.transaction():
            for (r, f), chat in zip(todo, chats):
                src = tree.store.messages(f.chat_id, limit=2)  # type: ignore[arg-type]
                if len(src) < 2 or tree.store.message_count(chat.id):
                    continue
                sprov = src[1].provenance
                ex = batch.make_exchange(chat, r.text)
                mark = {k: v for k, v in (sprov.get(BATCH_MARK) or {}).items() if k != "attempt"}
                mark["item"] = r.name
                if r.attempt > 1:
                    mark["attempt"] = r.attempt
                ex.provenance[BATCH_MARK] = mark
                ex.provenance[DUPLICATE] = tree.find(f.chat_id).path  # type: ignore[union-attr]
                ex.begin(batch.backend)
                ex.parts = [src[1].content]
                ex.finish = Finish(reason=sprov.get("finish_reason") or "stop",
                                   model=sprov.get("model"), prompt_tokens=0, completion_tokens=0)
                ex.end("complete")
                ok = ex.reply is not None and ex.reply.status == "complete"
                r.status, r.chat_id, r.reason = ("done" if ok else "failed"), chat.id, None
                r.result = f.result if ok else None
                batch.progress.done += ok
                batch.progress.failed += not ok
                filled += 1
        if filled:
            batch.notes.append(f"{filled} row(s) repeat an earlier row's message at temperature "
                               f"0: sent once, each copy filled from the first (its provenance "
                               f"says {DUPLICATE})")


def run_plain(batch: Batch, progress: Callable[[Progress], None] | None = None) -> BatchResult:
    """Run a plain batch: identical prompts sent once when sampling is deterministic
    (temperature 0, no tools), else every row."""
    if batch.run_tools is None and not batch._started:
        options = batch.make_exchange(batch.chat, "x").options
        if deterministic(options):
            dedup = Dedup(batch)
            if dedup.count:
                return dedup.run(progress)
    return batch.run(progress)


__all__ = ["MultiBatch", "Side", "Dedup", "DUPLICATE", "deterministic", "run_plain"]
