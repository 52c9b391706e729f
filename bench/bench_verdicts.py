"""Votes on the real vLLM engine (the tiny Qwen3 on this CPU), side by side in one run.

1. ``%%subchat --vote 8`` (one engine request with n=8: the prompt computed once, eight
   samples batched) against the same message sent as 8 single-sample cells one after
   the other: wall time, >= 3x.
2. ``%%subchat --each --vote 4`` over 128 rows against one raw ``llm.generate`` of the
   same 128 prompts (the rows' chat-template text) with ``SamplingParams(n=4)``: output
   tokens per second, >= 0.85x. Prefix cache reset before each side, order alternated.

3. ``--estimate --sample S`` of that ``--each --vote 4`` batch (new rows), then the cell it
   gives: the projected time for the rows left against the real run's time, within ±30%.

``--broken separate`` runs side 1's vote as 8 separate cells too (what a vote without
the engine's n would be): that run must FAIL (``verdicts-broken-separate.json``).

    python bench/bench_verdicts.py [--rows 128] [--tokens 32] [--reps 3] [--sample 16]
                                   [--broken separate]

Writes ``bench/results/verdicts.json`` and prints it; exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

from subchat_magics.testing import tiny_model  # noqa: E402 - the tests' tiny model recipe

CACHE = tiny_model.use_cpu_engine_settings()
TARGETS = {"vote_min_vs_separate": 3.0, "each_vote_min_vs_generate": 0.85,
           "estimate_within": 0.30}


class Cells:
    def __init__(self):
        from IPython.core.interactiveshell import InteractiveShell

        self.ip = InteractiveShell.instance()
        self.run("%load_ext subchat_magics")

    def run(self, source: str) -> tuple[float, str]:
        from IPython.utils.capture import capture_output

        with capture_output() as cap:
            t0 = time.perf_counter()
            result = self.ip.run_cell(source, store_history=False)
            dt = time.perf_counter() - t0
        if not result.success:
            raise RuntimeError(f"cell failed: {source[:80]!r}: "
                               f"{result.error_in_exec or result.error_before_exec!r}\n{cap.stdout}")
        return dt, cap.stdout


def bench_vote(cells: Cells, tokens: int, reps: int, broken: bool) -> dict:
    from subchat_magics.backends.vllm import active_engine

    engine = active_engine()
    msg = "Think of a number and explain your choice."
    vote, separate = [], []
    for r in range(reps):
        for side in ((0, 1) if r % 2 == 0 else (1, 0)):
            engine.call(lambda eng: eng.reset_prefix_cache())
            if side == 0 and not broken:
                before = engine.requests_added
                dt, _ = cells.run(f"%%subchat v{r} --vote 8 -n {tokens} --ignore-me\n{msg}"
                                  .replace(" --ignore-me", ""))
                assert engine.requests_added - before == 1
                vote.append(dt)
            else:
                t = 0.0
                for i in range(8):
                    dt, _ = cells.run(f"%%subchat s{r}_{side}_{i} -n {tokens} -t 0.7 --seed {i + 1}\n{msg}")
                    t += dt
                (vote if side == 0 else separate).append(t)
    ratio = min(separate) / min(vote)
    return {"what": f"--vote 8 vs 8 single-sample cells of the same message, {tokens} tokens max",
            "vote_s": [round(x, 3) for x in vote], "separate_s": [round(x, 3) for x in separate],
            "vote_vs_separate": round(ratio, 2), "target": TARGETS["vote_min_vs_separate"],
            "pass": ratio >= TARGETS["vote_min_vs_separate"]}


def bench_each_vote(cells: Cells, rows: int, tokens: int, reps: int) -> dict:
    from vllm import SamplingParams

    from subchat_magics.backends.vllm import active_engine
    from subchat_magics.session import default_session

    engine = active_engine()
    cells.ip.user_ns["qs"] = [f"What is the number {i} made of?" for i in range(rows)]
    tree = default_session().tree
    texts = [engine.builder.render_text(tree.context("root", f"Q{i}: {q}"))
             for i, q in enumerate(cells.ip.user_ns["qs"])]
    ours, raw = [], []
    for r in range(reps):
        for side in ((0, 1) if r % 2 == 0 else (1, 0)):
            engine.call(lambda eng: eng.reset_prefix_cache())
            if side == 0:
                dt, out = cells.run(f"%%subchat root --each qs --fresh --vote 4 -n {tokens} "
                                    f"--ignore-eos-free\nQ{{index}}: {{item}}".replace(" --ignore-eos-free", ""))
                path = out.split(":")[0].split()[-1]
                toks = sum(tree.get(s.id).messages[1].provenance.get("completion_tokens", 0)
                           for c in tree.children(tree.get(path)) for s in tree.children(c))
                ours.append((dt, toks))
            else:
                params = SamplingParams(n=4, max_tokens=tokens, temperature=0.7, top_p=0.9)
                t0 = time.perf_counter()
                outs = engine.llm.generate(texts, params, use_tqdm=False)
                raw.append((time.perf_counter() - t0,
                            sum(len(c.token_ids) for o in outs for c in o.outputs)))
    rate_ours = max(t / d for d, t in ours)
    rate_raw = max(t / d for d, t in raw)
    ratio = rate_ours / rate_raw
    return {"what": f"--each --vote 4 over {rows} rows vs llm.generate(n=4) on the same prompts, "
                    f"{tokens} tokens max, temperature 0.7",
            "each_s": [round(d, 3) for d, _ in ours], "each_tokens": [t for _, t in ours],
            "generate_s": [round(d, 3) for d, _ in raw], "generate_tokens": [t for _, t in raw],
            "each_vs_generate": round(ratio, 3), "target": TARGETS["each_vote_min_vs_generate"],
            "pass": ratio >= TARGETS["each_vote_min_vs_generate"]}


def bench_estimate(cells: Cells, rows: int, tokens: int, sample: int, reps: int) -> dict:
    """--estimate of a fresh --each --vote 4 batch, then the cell it says: projected time
    of the rows left vs the real run's time (each rep a new batch of new prompts)."""
    from subchat_magics.backends.vllm import active_engine

    engine = active_engine()
    runs = []
    for r in range(reps):
        var = f"est{r}"
        cells.ip.user_ns[var] = [f"Estimate {r}: what is the number {i} made of?" for i in range(rows)]
        engine.call(lambda eng: eng.reset_prefix_cache())
        line = f"root --each {var} --vote 4 -n {tokens}"
        _, out = cells.run(f"%%subchat {line} --estimate --sample {sample} --as e\nQ{{index}}: {{item}}")
        est = cells.ip.user_ns["e"]
        said = [x for x in out.splitlines() if x.startswith("to run it:")]
        assert said and f"%%subchat {line} --as e" in said[0], out
        dt, out = cells.run(f"%%subchat {line}\nQ{{index}}: {{item}}")
        assert f"({est.sample_rows} reused)" in out, out
        runs.append({"projected_s": round(est.projected_s, 3), "real_s": round(dt, 3),
                     "sample_s": round(est.sample_s, 3), "sample_rows": est.sample_rows,
                     "rows_left": est.left, "projected_out_tokens": est.projected_out_tokens,
                     "ratio": round(est.projected_s / dt, 3)})
    worst = max(abs(x["ratio"] - 1) for x in runs)
    return {"what": f"--estimate --sample {sample} of --each --vote 4 over {rows} new rows, "
                    f"{tokens} tokens max, then the cell it gives: projected vs real time of "
                    "the rows left",
            "runs": runs, "worst_error": round(worst, 3), "target": TARGETS["estimate_within"],
            "pass": worst <= TARGETS["estimate_within"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sample", type=int, default=16)
    ap.add_argument("--skip", action="append", default=[], choices=("vote", "each_vote", "estimate"))
    ap.add_argument("--broken", choices=("separate",), default=None)
    args = ap.parse_args(argv)
    out_file = RESULTS / (f"verdicts-broken-{args.broken}.json" if args.broken else "verdicts.json")
    os.chdir(tempfile.mkdtemp(prefix="bench-verdicts-"))
    for var in ("LLM_BACKEND", "SUBCHAT_STORE"):
        os.environ.pop(var, None)
    os.environ["OLLAMA_HOST"] = "http://127.0.0.1:9"
    cells = Cells()
    cells.run(f"%load_vllm {tiny_model.build()}")
    cells.run("%subchat backend vllm")
    import vllm

    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                 "vllm": vllm.__version__},
                     "command": " ".join(["python bench/bench_verdicts.py",
                                          *(argv if argv is not None else sys.argv[1:])]),
                     "broken": args.broken}
    for name, fn in (("vote", lambda: bench_vote(cells, args.tokens, args.reps, bool(args.broken))),
                     ("each_vote", lambda: bench_each_vote(cells, args.rows, args.tokens, args.reps)),
                     ("estimate", lambda: bench_estimate(cells, args.rows, args.tokens, args.sample,
                                                         args.reps))):
        if name in args.skip:
            results[name] = {"pass": False, "error": "skipped (--skip): not judged"}
            continue
        try:
            results[name] = fn()
        except Exception as exc:  # noqa: BLE001 - a part that did not run is a failed part
            results[name] = {"pass": False, "error": f"{type(exc).__name__}: {exc}"}
        print(name, json.dumps(results[name]), flush=True)
    results["pass"] = all(results[k]["pass"] for k in ("vote", "each_vote", "estimate"))
    RESULTS.mkdir(exist_ok=True)
    out_file.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print("PASS" if results["pass"] else "FAIL")
    return 0 if results["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
