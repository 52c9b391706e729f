"""The magics' side of ``--vote``, ``--compare`` and ``--labels``: check the flags, call
the core, show the samples side by side, the verdict, and the scores against labels.

A face helper (below the magics): reads the shell's namespace, prints; the work is the
core's (:mod:`subchat_magics.vote`, :mod:`subchat_magics.compare`,
:mod:`subchat_magics.multibatch`, :mod:`subchat_magics.verdict`)."""

from __future__ import annotations

import sys
from collections import ChainMap, Counter
from typing import Any

from IPython.core.error import UsageError

from . import batch as batch_mod
from . import estimate, notebook, verdict
from .batch import fields_of
from .batch_view import BatchProgress
from .errors import BackendError, InvalidInput
from .magic_args import in_kernel
from .multibatch import MultiBatch, Side
from .secrets import redact
from .words import counted


def check_cell(args: Any, fanout: bool) -> None:
    """Refuse flags that do not go with ``--vote``/``--compare`` on one message."""
    if fanout and (args.vote is not None or args.answer is not None):
        raise UsageError("%%subchat: --vote K makes its own K samples; it does not go with "
                         "--fanout/--children")
    if fanout and args.compare is not None:
        raise UsageError("%%subchat: --compare makes one subchat per model; it does not go "
                         "with --fanout/--children")
    if args.format == "code":
        raise UsageError("%%subchat: --format code takes the code of one reply; it does not go "
                         "with --vote/--compare")


def run_cell(m: Any, args: Any, text: str, opts: dict[str, Any], view_class: Any) -> None:
    """``--vote K`` or ``--compare A,B`` on one message: samples (or models) side by side,
    then the verdict; ``--var`` gets the verdict (or ``{model: answer}``)."""
    session = m.session
    if args.compare is not None:
        job = session.compare(args.path, text, args.compare, backend=args.backend,
                              system=args.system, vote=args.vote, answer=args.answer, **opts)
        exchanges = job.exchanges
    else:
        job = session.vote(args.path, text, args.vote, answer=args.answer, backend=args.backend,
                           system=args.system, **opts)
        exchanges = job.samples
    view = view_class(m.shell, [ex.chat.path for ex in exchanges], m.update_interval)
    view.start()
    error: BaseException | None = None
    stream = iter(job)
    try:
        for i, delta in stream:
            view.delta(i, delta)
    except KeyboardInterrupt:
        # as a fan-out: one line naming where the partial replies are kept, not the
        # stream's traceback; --var holds what arrived (a vote has no verdict yet)
        stream.close()
        view.finish(["interrupted" if ex.text else "interrupted: nothing arrived"
                     for ex in exchanges])
        if args.var:
            m.shell.user_ns[args.var] = ({n: ex.text for n, ex in zip(job.names, exchanges)}
                                         if args.compare is not None else None)
        kept = sum(1 for ex in exchanges if ex.text)
        raise UsageError(f"%%subchat: interrupted: {counted(kept, 'partial reply', 'partial replies')} "
                         f"kept in {', '.join(ex.chat.path for ex in exchanges)}") from None
    except BackendError as exc:
        error = exc
    finally:
        stream.close()
    view.finish([None if (ex.reply and ex.reply.status == "complete") else
                 (ex.reply.provenance.get("finish_reason") if ex.reply else "error")
                 for ex in exchanges])
    if args.compare is not None:
        result: Any = job.values
        errors = job.errors
    else:
        print(f"verdict in {job.chat.path}: {job.verdict.label()}")
        result = job.value
        errors = [job.error] if job.error is not None else []
    if args.var:
        m.shell.user_ns[args.var] = result
    error = error or (errors[0] if errors else None)
    if error is not None:
        raise UsageError(f"%%subchat: {redact(str(error))}")


def wanted(args: Any) -> bool:
    """Whether an ``--each`` cell needs this module (a vote, a comparison, labels)."""
    return any(v is not None for v in (args.vote, args.answer, args.compare, args.labels))


def labels_of(ns: dict[str, Any], name: str, items: Any, count: int) -> list[Any]:
    """The labels ``--labels NAME`` names: a column of the ``--each`` DataFrame, else a
    list variable with one label per item; refused otherwise (before anything is sent)."""
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(items, pd.DataFrame) and name in items.columns:
        return list(items[name])[:count]
    if name in ns and not isinstance(ns[name], (str, bytes)) and hasattr(ns[name], "__len__"):
        values = list(ns[name])
        if len(values) < count:
            raise UsageError(f"%%subchat: --labels {name} holds {len(values)} labels for "
                             f"{count} items; give one label per item")
        if len(values) != count and len(values) != len(items):
            raise UsageError(f"%%subchat: --labels {name} holds {len(values)} labels for "
                             f"{len(items)} items; give one label per item")
        return values[:count]
    where = "no column or variable" if not (pd is not None and isinstance(items, pd.DataFrame)) \
        else "no column of the --each DataFrame and no list variable"
    raise UsageError(f"%%subchat: --labels {name}: {where} named {name!r}; name the column "
                     "holding the right answers")


def run_each(m: Any, args: Any, template: str, opts: dict[str, Any]) -> None:
    """``--each`` with ``--vote``/``--compare``/``--labels``."""
    from .compare import column_names

    session = m.session
    ns = m.shell.user_ns
    if args.each not in ns:
        raise UsageError(f"%%subchat: --each {args.each}: no variable {args.each!r} in the "
                         "notebook; assign the list or DataFrame first")
    clash = [f for f, v in (("--fanout", args.fanout), ("--children", args.children),
                            ("--var", args.var)) if v is not None]
    if clash:
        raise UsageError(f"%%subchat: --each does not go with {', '.join(clash)} "
                         "(each item is its own chat; --as VAR takes the replies)")
    items = ns[args.each]
    pattern = verdict.compile_answer(args.answer)
    k = args.vote
    if args.answer is not None and k is None:
        raise UsageError("%%subchat: --answer goes with --vote K (the samples' answers are compared)")
    if k is not None:
        verdict.check_vote(k)
    sides: list[Side] = []
    if args.compare is not None:
        if args.backend is not None:
            raise UsageError("%%subchat: --compare names the backends itself; leave out --backend")
        entries, plans = session.compare_plan(args.compare, opts)
        names = column_names(entries, [p.backend for p in plans], [p.options[0].model for p in plans])
        for n, p in zip(names, plans):
            o = p.options[0]
            per = session.vote_options(k, {**opts, "model": o.model}) if k else [o]
            sides.append(Side(n, p.selection, per))
    hidden = getattr(m.shell, "user_ns_hidden", None) or {}
    cells = notebook.context(m.shell)

    def prompt(item: Any, index: Any) -> str:
        own = {"item": item, "index": index, **(fields_of(item) or {})}
        return notebook.interpolate(template, ChainMap(own, ns), hidden, cells=cells,
                                    limits=m.limits).text

    count = min(len(items), args.limit) if args.limit else len(items)
    labels = labels_of(ns, args.labels, items, count) if args.labels is not None else None
    if not sides:
        per = session.vote_options(k, opts) if k else None
    # what identifies a row's request beyond the plain batch's: the vote (K, --answer) and
    # the models compared; a rerun reads the rows by the plain batch's rule (batch.match_rows)
    shape = batch_mod.Shape(samples=k or 1, options=f"vote {k} answer {args.answer!r}" if k else "")
    if sides:
        shape.sides = [s.name for s in sides]  # type: ignore[misc]
        shape.backend = ",".join(p.backend.id for p in plans)
        shape.model = ",".join(s.options[0].model or p.backend.default_model() or ""
                               for s, p in zip(sides, plans))
    batch = session.batch(args.path, items, prompt, name=args.each, fresh=bool(args.fresh),
                          redo=bool(args.redo), limit=args.limit, concurrency=args.concurrency,
                          backend=None if args.compare is not None else args.backend,
                          system=args.system, template=template,
                          known=lambda n: n in ns, shape=shape, **opts)
    if not sides:
        sides = [Side(None, batch.selection, per or [batch.make_exchange(batch.chat, "x").options])]
    run = MultiBatch(batch, sides, pattern=pattern, default_system=session.defaults.system_prompt,
                     labels=labels)
    view = BatchProgress(m.shell, batch.path)
    if args.estimate:
        return estimate_each(m, args, batch, [
            estimate.Side(s.selection.candidates[0], s.options[0], s.k, s.name) for s in sides],
            lambda: run.run(view), view)
    try:
        run.run(view)
    except KeyboardInterrupt:
        # as a plain batch: the summary (rows interrupted), the notes, then one line; every
        # sample that finished is kept, the cut rows are sent again by the next run
        view.close()
        if args.as_var:
            m.shell.user_ns[args.as_var] = (run.table(batch.index) if (k or args.compare)
                                            else batch.result().output(args.as_var))
        m._each_done(batch.result(), None, interrupted=True)
        return
    view.close()
    result = batch.result()
    print(result.summary())
    if k and run.no_majority():
        print(f"no majority: {counted(run.no_majority(), 'row')} (a tie, or half of the samples or fewer)")
    line = result.failed_line()
    if line:
        print(line)
    for note in result.notes:
        print(f"note: {note}")
    if labels is not None:
        show_scores(m, run, labels)
    if args.as_var:
        m.shell.user_ns[args.as_var] = (run.table(result.index) if (k or args.compare)
                                        else result.output(args.as_var))


def check_estimate(args: Any) -> None:
    """``--estimate``/``--sample`` go with ``--each`` (before anything is touched)."""
    if args.sample is not None and not args.estimate:
        raise UsageError("%%subchat: --sample K goes with --estimate (the rows it times)")
    if args.estimate and args.each is None:
        raise UsageError("%%subchat: --estimate sizes a batch before it runs: it goes with "
                         "--each NAME (add --each, or leave --estimate out)")
    if args.estimate and args.fresh:
        raise UsageError("%%subchat: --estimate does not go with --fresh: its sample would "
                         "start a new batch chat that the cell it gives (without --fresh) "
                         "does not resume; estimate under a new --each name instead")
    if args.estimate and getattr(args, "tools", None) is not None:
        raise UsageError("%%subchat: --estimate goes with a batch without --tools (a tool "
                         "loop's rounds cannot be projected from a sample)")
    if args.estimate:
        try:
            estimate.check_sample(args.sample)
        except InvalidInput as exc:
            raise UsageError(f"%%subchat: {exc}") from None


def estimate_each(m: Any, args: Any, batch: Any, sides: list[Any], run: Any, view: Any) -> None:
    """``--estimate``: count, time ``--sample K`` rows (kept), project, print the cell to run."""
    est = estimate.count(batch, sides)
    try:
        estimate.sample(est, batch, estimate.check_sample(args.sample), run)
    except KeyboardInterrupt:  # one line, as a batch's: the sample's finished rows are kept
        view.close()
        done = sum(1 for r in batch.result().rows if r.status == "done")
        raise UsageError(f"%%subchat: interrupted while timing the sample: {counted(done, 'row')} "
                         "done, kept as rows of the batch; run the cell again to estimate, or "
                         "without --estimate to run the batch") from None
    view.close()
    est.cell = "%%subchat " + cell_line(getattr(args, "line", "") or "") + "  (the same cell without --estimate)"
    for line in est.lines():
        print(line)
    if args.as_var:
        m.shell.user_ns[args.as_var] = est


def cell_line(line: str) -> str:
    """The options line without ``--estimate`` and ``--sample K``."""
    import re

    line = re.sub(r"(^|\s)--estimate(?=\s|$)", " ", line)
    line = re.sub(r"(^|\s)--sample(\s+|=)\S+", " ", line)
    return " ".join(line.split())


def plot_scores(scores: list[verdict.Score]) -> bool:
    """A small bar plot of the accuracies, where matplotlib is installed (imported only
    here); False (nothing drawn: the printed table stands) without it or without scores.
    Called where a notebook can draw (a kernel)."""
    import importlib.util

    if not scores or importlib.util.find_spec("matplotlib") is None:
        return False
    import matplotlib.pyplot as plt  # an optional heavy package: only when drawing
    from IPython.display import display

    fig, ax = plt.subplots(figsize=(5, 0.45 * len(scores) + 0.8))
    ax.barh([s.name for s in scores][::-1], [s.accuracy for s in scores][::-1])
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    for i, s in enumerate(scores[::-1]):
        ax.text(min(s.accuracy, 0.98), i, f" {s.correct}/{s.n}", va="center",
                ha="right" if s.accuracy > 0.85 else "left")
    fig.tight_layout()
    display(fig)
    plt.close(fig)
    return True


def _say(text: str) -> None:
    """Print a line of scores with every known key masked (the labels, the answers and
    the row names are the user's values: a key among them is shown as in the store)."""
    print(redact(text))


#: rows with no answer of this run to score: not sent (a missing value), or answered by
#: another kernel (show of the batch scores them once they are stored)
NOT_SCORED = {"skipped": "not sent (skipped)", "claimed": "answered by another kernel"}


def show_scores(m: Any, run: MultiBatch, labels: list[Any]) -> list[verdict.Score]:
    """Accuracy per model (with and without the vote), the confusion table and the rows
    that disagree; a bar plot where matplotlib is installed (in a notebook). Rows this
    run has no answer for (:data:`NOT_SCORED`) are left out, as show leaves them, and
    counted."""
    keep = [i for i, r in enumerate(run.rows) if r.status not in NOT_SCORED]

    def kept(values: list[Any]) -> list[Any]:
        return [values[i] for i in keep]

    def score(answers: list[Any], name: str) -> verdict.Score:
        sc = verdict.score(kept(answers), kept(labels), name)
        sc.wrong = [keep[i] for i in sc.wrong]
        return sc

    scores = []
    for s in run.sides:
        name = s.name or "answers"
        sc = score(run.answers_of(s.name), name + (" (vote)" if s.k > 1 else ""))
        scores.append(sc)
        _say(sc.line())
        if s.k > 1:
            _say(score(run.first_samples_of(s.name), f"{name} (first sample, no vote)").line())
    if len(run.sides) > 1:
        a, b = run.sides[0], run.sides[1]
        _say(verdict.agreement(kept(run.answers_of(a.name)), kept(run.answers_of(b.name)),
                               f"{a.name} vs {b.name}").line("agreement"))
    left = Counter(NOT_SCORED[r.status] for r in run.rows if r.status in NOT_SCORED)
    if left:
        _say(f"{counted(sum(left.values()), 'row')} not scored: "
             + ", ".join(f"{why} ({n})" if len(left) > 1 else why for why, n in left.items()))
    for sc in scores:
        if not sc.confusion:  # no row scored: no table
            continue
        _say(f"confusion ({sc.name}):\n{sc.table()}")
        if sc.wrong:
            rows = [run.rows[i].name for i in sc.wrong[:10]]
            _say(f"disagreeing rows ({sc.name}): {', '.join(map(str, rows))}"
                 + (" …" if len(sc.wrong) > 10 else ""))
    if in_kernel(m.shell):
        plot_scores(scores)
    return scores


__all__ = ["check_cell", "run_cell", "wanted", "run_each", "labels_of", "show_scores"]
