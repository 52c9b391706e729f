"""The long reliability run: kills, concurrent writers, fuzzing, hostile store files,
and what opening a big store costs with its damage check. Writes ``docs/reliability.md``
(the table) and ``bench/results/reliability.json`` (the raw figures).

    python bench/reliability.py                # 50 kills, 2x1,000 writes, 2,000 fuzz cases, ...
    python bench/reliability.py --quick        # a smoke run of every part (~2 min)
    python bench/reliability.py --seed 1234    # the same random moments again

Everything runs on the offline echo backend through the real shell or a real kernel;
the pytest suite in ``tests/reliability`` runs a short version of each part in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from subchat_magics.testing import reliability as h

ROOT = Path(__file__).resolve().parent.parent

DOC = ROOT / "docs" / "reliability.md"
RAW = ROOT / "bench" / "results" / "reliability.json"


def kills(n: int, per_store: int, seed: int, tmp: Path, sabotage: str | None = None) -> dict:
    """``n`` SIGKILLs of a shell at random moments, ``per_store`` on each store.
    ``sabotage`` damages the first store after its last kill, before its check (to see the
    run fail): see :func:`damage`."""
    rng = random.Random(seed)
    rounds, lost, problems, done, messages = [], 0, [], 0, 0
    for start in range(0, n, per_store):
        folder = tmp / f"kills{start}"
        folder.mkdir()
        store, journal = folder / "subchats.db", folder / "journal.jsonl"
        for rnd in range(start + 1, min(n, start + per_store) + 1):
            mode = ("stream", "write", "store")[rnd % 3]
            rounds.append(h.kill_round(store, folder, journal, rnd, mode, rng, max_size=1_000_000))
            if sabotage in SQL_SABOTAGE and start == 0 and rnd == min(n, per_store):
                damage(store, sabotage)
            check = h.check_store(store, journal)
            problems += [f"kill {rnd}: {p}" for p in check.problems]
            lost += check.lost
        done += check.done_ops
        messages += check.messages
    return dict(kills=len(rounds), done_before_kills=done, messages_checked=messages, lost=lost,
                failed=len(problems), problems=problems[:20], where=dict(Counter(r.where for r in rounds)),
                in_flight=dict(Counter(r.in_flight for r in rounds)),
                modes=dict(Counter(r.mode for r in rounds)),
                uncommitted_frames=sum(r.wal_uncommitted_frames for r in rounds))


def big_write_kills(n: int, tmp: Path) -> dict:
    """``n`` kills inside one 64 MB write transaction."""
    inside, problems = 0, []
    for k in range(n):
        store = tmp / f"bigwrite{k}.db"
        wal = h.kill_inside_write(store, before=20)
        inside += wal.uncommitted > 0
        check = h.check_store(store)
        conn = sqlite3.connect(store)
        big = conn.execute("SELECT COUNT(*) FROM messages m JOIN chats c ON c.id = m.chat_id "
                           "WHERE c.name = 'big'").fetchone()[0]
        small = conn.execute("SELECT COUNT(*) FROM messages m JOIN chats c ON c.id = m.chat_id "
                             "WHERE c.name = 'small'").fetchone()[0]
        conn.close()
        problems += check.problems
        if big or small != 20:
            problems.append(f"kill {k}: big={big} small={small}")
    return dict(kills=n, inside_transaction=inside, problems=problems, lost=len(problems),
                failed=len(problems))


def kernel_kills(n: int, tmp: Path) -> dict:
    """``n`` real kernels SIGKILLed mid-reply, ``n`` interrupted mid-reply then killed."""
    out = {"sigkill": dict(kills=0, problems=[]), "interrupt": dict(kills=0, problems=[])}
    for k in range(2 * n):
        interrupt = k % 2 == 1
        folder = tmp / f"kernel{k}"
        folder.mkdir()
        store = folder / "subchats.db"
        seen = h.kernel_kill(store, folder, interrupt_first=interrupt, kill_after_updates=2 + k % 5)
        part = out["interrupt" if interrupt else "sigkill"]
        part["kills"] += 1
        check = h.check_store(store)
        part["problems"] += check.problems
        conn = sqlite3.connect(store)
        rows = conn.execute("SELECT c.name, m.role, m.status FROM messages m JOIN chats c "
                            "ON c.id = m.chat_id ORDER BY c.name, m.seq").fetchall()
        conn.close()
        want = [("before", "user", "complete"), ("before", "assistant", "complete"),
                ("kernel", "user", "complete")]
        cut = [("kernel", "assistant", "interrupted")]  # kept, marked; after SIGKILL it may be absent
        if rows not in (want + cut,) + (() if interrupt else (want,)) or seen["updates"] < 2:
            part["problems"].append(f"kernel {k}: {rows}")
    for part in out.values():
        part["lost"] = part["failed"] = len(part["problems"])
    return out


def copies(n: int, tmp: Path, sabotage: str | None = None) -> dict:
    """What leaves the kernel with the file. ``alone``: ``n`` real kernels run cells and
    are shut down normally; the ``.db`` copied alone must hold every message a second
    after the last cell (kernel still running) and after the shutdown. ``read_only``: ``n``
    real kernels SIGKILLed right after a commit (that commit only in the WAL); their
    ``.db`` + ``-wal`` mounted read-only for real (a private mount namespace) must show and
    export every message, refuse a write in one line, and ``copy-to`` must carry every
    message into a copy that continues. ``sabotage="wal-lost"`` drops the first kill's
    ``-wal`` before the read-only run (the run must fail)."""
    from subchat_magics.testing import durability as d

    alone: dict = dict(kernels=0, messages=0, problems=[])
    ro: dict = dict(kernels=0, messages=0, wal_only=0, problems=[], skipped=0)
    for k in range(n):
        folder = tmp / f"alone{k}"
        folder.mkdir()
        got = d.shut_down_normally(folder, cells=3 + k)
        alone["kernels"] += 1
        alone["messages"] += len(got["truth"])
        if len(got["truth"]) != 2 * (3 + k):
            alone["problems"].append(f"alone {k}: {len(got['truth'])} messages written, "
                                     f"{2 * (3 + k)} expected")
        if got["running_alone"] != got["truth"]:
            alone["problems"].append(f"alone {k}: a second after the last cell the file alone "
                                     f"held {len(got['running_alone'])} of {len(got['truth'])}")
        if got["after_alone"] != got["truth"] or not got["stopped"]:
            alone["problems"].append(f"alone {k}: after shutdown the file alone held "
                                     f"{len(got['after_alone'])} of {len(got['truth'])}")
    for k in range(n):
        folder = tmp / f"ro{k}" / "input"
        folder.mkdir(parents=True)
        d.kill_leaving_wal(folder, cells=2 + k)
        store = folder / "subchats.db"
        truth = d.with_wal(store)
        ro["wal_only"] += (("a", "user", d.LAST_WORDS) in truth
                           and ("a", "user", d.LAST_WORDS) not in d.file_alone(store))
        if sabotage == "wal-lost" and k == 0:
            Path(f"{store}-wal").unlink()
        out = folder.parent / "out"
        out.mkdir()
        result = h.run_unshared(h.unshared_script(d.READ_ONLY_INSIDE, store=str(store), out=str(out)))
        if result is None:
            ro["skipped"] += 1
            ro["problems"].append(f"read-only {k}: no private mount namespace here (needs root)")
            continue
        ro["kernels"] += 1
        ro["messages"] += len(truth)
        steps = result["steps"]
        bad = [name for name in ("tree", "status", "show", "export", "copy", "continue")
               if not steps[name]["ok"]]
        if bad:
            ro["problems"].append(f"read-only {k}: failed {bad}: {steps[bad[0]]['error']}"[:300])
            continue
        exported = json.loads((out / "export.json").read_text())
        got_rows = sorted((c["path"].rpartition("/")[2], m["role"], m["content"])
                          for c in exported["chats"] for m in c["messages"])
        if got_rows != sorted(truth):
            ro["problems"].append(f"read-only {k}: export held {len(got_rows)} of {len(truth)} "
                                  "messages")
        copied = d.with_wal(out / "copy.db")
        if copied[:len(truth)] != truth or copied[-2][2] != "more please":
            ro["problems"].append(f"read-only {k}: copy-to carried {len(copied) - 2} of "
                                  f"{len(truth)} messages")
        err = steps["write"]["error"] or ""
        if not (err.startswith("UsageError") and "\n" not in err) or not result["untouched"]:
            ro["problems"].append(f"read-only {k}: a write was not refused in one line, or the "
                                  "file or its WAL changed")
    for part in (alone, ro):
        part["failed"] = len(part["problems"])
        part["lost"] = sum(1 for p in part["problems"] if " of " in p)
    return dict(alone=alone, read_only=ro)


def writers(n: int, tmp: Path) -> dict:
    out = {}
    for label, pace in (("paced", 0.0005), ("back_to_back", 0.0)):
        store = tmp / f"writers_{label}.db"
        t0 = time.perf_counter()
        codes = h.run_writers(store, ["a", "b"], n, pace=pace)
        out[label] = dict(messages=2 * n, exit_codes=codes, problems=h.check_writers(store, ["a", "b"], n),
                          interleavings=h.interleavings(store), seconds=round(time.perf_counter() - t0, 2))
        out[label]["problems"] += [f"writer exited with {c}" for c in codes if c != 0]
        out[label]["lost"] = sum(1 for p in out[label]["problems"] if p.startswith("LOST"))
        out[label]["failed"] = len(out[label]["problems"])
    # two shells running cells at once, each in its own subtree
    store, journal = tmp / "shells.db", tmp / "shells.jsonl"
    from subchat_magics.tree import ChatTree

    ChatTree(store).close()
    ctx = h.context()
    procs, events = [], []
    for rnd, home in ((1, "root/a"), (2, "root/b")):
        ready = ctx.Event()
        cfg = dict(store=str(store), workdir=str(tmp), journal=str(journal), round=rnd,
                   mode="stream", seed=rnd, ops=50, home=home, max_size=20_000)
        p = ctx.Process(target=h.run_worker, args=(cfg, ready), daemon=True)
        p.start()
        procs.append(p)
        events.append(ready)
    for p in procs:
        p.join(600)
    check = h.check_store(store, journal)
    problems = check.problems + [f"shell exited with {p.exitcode}" for p in procs if p.exitcode != 0]
    out["shells"] = dict(cells=check.done_ops, exit_codes=[p.exitcode for p in procs],
                         problems=problems[:10], lost=check.lost, failed=len(problems))
    return out


def fuzz(examples: int, seed: int, tmp: Path) -> dict:
    report = tmp / "fuzz.jsonl"
    env = dict(os.environ, SUBCHAT_FUZZ_EXAMPLES=str(examples), SUBCHAT_FUZZ_SEED=str(seed),
               SUBCHAT_FUZZ_REPORT=str(report))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/reliability/test_fuzz.py", "-k", "any_", "-q",
         "-p", "no:cacheprovider", f"--hypothesis-seed={seed}"],
        cwd=ROOT, env=env, capture_output=True, text=True)
    counts = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    return dict(examples=2 * examples, cells=sum(c["cases"] for c in counts),
                usage_errors=sum(c["usage_errors"] for c in counts), passed=proc.returncode == 0,
                failed=int(proc.returncode != 0),
                failures=[] if proc.returncode == 0 else [proc.stdout[-3000:]],
                seconds=round(time.perf_counter() - t0, 1))


def hostile(per_kind: int, seed: int, tmp: Path) -> dict:
    """Random damage of each kind, probed through a real shell, and the hostile-file tests."""
    from IPython.core.interactiveshell import InteractiveShell

    rng = random.Random(seed)
    ip = InteractiveShell.instance()
    ip.run_cell("%load_ext subchat_magics", store_history=False)
    ip.run_cell("%config SubchatMagics.backend = 'echo'", store_history=False)
    base = tmp / "base.db"
    want = h.make_store(base)
    damage: dict[str, dict] = {}
    for kind in ("truncate", "bytes", "page"):
        outcomes: Counter = Counter()
        problems = []
        for k in range(per_kind):
            path = tmp / f"{kind}{k}.db"
            shutil.copyfile(base, path)
            what = h.corrupt(path, rng, kind)
            probe = h.probe_store(ip, path, want)
            outcomes[probe.outcome] += 1
            problems += [f"{what}: {u}" for u in probe.unexpected]
        damage[kind] = dict(cases=per_kind, outcomes=dict(outcomes), problems=problems[:10],
                            failed=len(problems))
    ip.run_cell("%unload_ext subchat_magics", store_history=False)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/reliability/test_hostile_store.py", "-q", "-rA",
         "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True)
    tests = {}
    for line in proc.stdout.splitlines():
        parts = line.split(" ", 1)
        if len(parts) == 2 and parts[0] in ("PASSED", "FAILED", "SKIPPED", "XFAIL", "XPASS", "ERROR"):
            tests[parts[1].split("::")[-1].split(" - ")[0]] = parts[0]
    # a hostile-file test that did not pass (or was skipped: nothing was checked) fails the run
    failed_tests = [f"{name}: {status}" for name, status in tests.items()
                    if status in ("FAILED", "ERROR", "SKIPPED", "XPASS")]
    if proc.returncode != 0 and not failed_tests:
        failed_tests.append(f"pytest exited with {proc.returncode}: {proc.stdout[-500:]}")
    return dict(damage=damage, tests=tests, failed_tests=failed_tests, failed=len(failed_tests))


def open_cost(tmp: Path) -> dict:
    """Median time to open (with the damage check) stores of 100,000 messages."""
    from subchat_magics.store import FULL_CHECK_MAX_BYTES, Store

    out = {}
    for label, size in (("100k_small", 100), ("100k_1kB", 1000)):
        path = tmp / f"open_{label}.db"
        store = Store(path)
        with store.transaction() as c:
            for i in range(500):
                c.execute("INSERT INTO chats (parent_id, name, fork_seq, created_at) VALUES (?, ?, 0, 0)",
                          (None if i == 0 else 1, "root" if i == 0 else f"c{i}"))
            c.executemany("INSERT INTO messages (chat_id, seq, role, content, created_at) "
                          "VALUES (?, ?, 'user', ?, 0)",
                          ((1 + k % 500, k // 500, "m" * size) for k in range(100_000)))
        store.close()
        code = ("import sys, time; t = time.perf_counter(); from subchat_magics.tree import ChatTree; "
                "ChatTree(sys.argv[1]).close(); print(time.perf_counter() - t)")
        times = sorted(float(subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                                            text=True, check=True).stdout) for _ in range(5))
        mb = path.stat().st_size / 1e6
        out[label] = dict(messages=100_000, file_mb=round(mb, 1), open_ms=round(statistics.median(times) * 1000),
                          check="full quick_check" if path.stat().st_size <= FULL_CHECK_MAX_BYTES
                          else "quick_check of the chats table")
    return out


# -- failing on purpose ------------------------------------------------------------------------
SABOTAGE = {
    "garbage": "UPDATE messages SET content = 'not an echo' WHERE id = (SELECT MIN(id) FROM "
               "messages WHERE role = 'assistant' AND status = 'complete')",
    "orphan": "PRAGMA foreign_keys = OFF; INSERT INTO chats (parent_id, name, fork_seq, created_at) "
              "VALUES (999999, 'orphan', 0, 0)",
    "unreadable": None,  # the file's header overwritten: a fresh open fails
    "wal-lost": None,  # a killed kernel's -wal dropped before its read-only open (copies)
}
SQL_SABOTAGE = ("garbage", "orphan", "unreadable")  # applied to a kill store


def damage(store: Path, how: str) -> None:
    """Damage a store after its run, the way ``--sabotage`` asks (none of these is a
    message *lost*, and each must still fail the run)."""
    if how == "unreadable":
        with open(store, "r+b") as f:
            f.write(b"not a database, not at all")
        return
    conn = sqlite3.connect(store)
    conn.executescript(SABOTAGE[how])
    conn.close()


# -- the report -------------------------------------------------------------------------------
def ok(part: dict) -> str:
    """Every problem found counts, not only messages lost: integrity-check failures, failed
    fresh opens, garbage replies, orphan chats, crashes, processes that died."""
    failed, lost = part["failed"], part.get("lost", 0)
    if failed == 0:
        return "**0**"
    return f"**{failed}** ✗" + (f" ({lost} lost)" if lost else "")


def failures(r: dict) -> int:
    """Problems of every kind in every part of the run: the exit code is 1 unless 0."""
    k, bw, kk, w, f, hs = (r["kills"], r["big_write_kills"], r["kernel_kills"], r["writers"],
                           r["fuzz"], r["hostile"])
    cp = r["copies"]
    return (k["failed"] + bw["failed"] + kk["sigkill"]["failed"] + kk["interrupt"]["failed"]
            + cp["alone"]["failed"] + cp["read_only"]["failed"]
            + w["paced"]["failed"] + w["back_to_back"]["failed"] + w["shells"]["failed"]
            + f["failed"] + sum(d["failed"] for d in hs["damage"].values()) + hs["failed"])


def render(r: dict, argv: list[str]) -> str:
    k, bw, kk, w, f, hs, oc = (r["kills"], r["big_write_kills"], r["kernel_kills"], r["writers"],
                               r["fuzz"], r["hostile"], r["open_cost"])
    ca, cr = r["copies"]["alone"], r["copies"]["read_only"]
    where = ", ".join(f"{v} {name}" for name, v in sorted(k["where"].items(), key=lambda x: -x[1]))
    cmd = "python bench/reliability.py" + (" " + " ".join(argv) if argv else "")
    lines = [
        "# Reliability",
        "",
        "After this page you can tell what the chat store and the magics were put through (kills, "
        "concurrent writers, fuzzing, damaged files), what went wrong, and how to rerun it.",
        "",
        "What was done to the chat store and the magics, how many times, and what went wrong.",
        f"Produced by `{cmd}` (seed {r['seed']}) on {r['machine']}, {r['date']}, {r['source']}.",
        "Rerun it with that command (add `--seed N` for other random moments); the CI suite",
        "(`python -m pytest tests/reliability`, about a minute) runs a short version of every row.",
        "",
        "## Summary",
        "",
        "| what was tried | how many | problems found |",
        "|---|---:|---:|",
        f"| SIGKILL of a shell running cells, at random moments ({where}) | {k['kills']} kills "
        f"| {ok(k)} in {k['done_before_kills']} completed cells |",
        f"| SIGKILL inside one 64 MB write transaction (uncommitted pages in the WAL) | {bw['kills']} "
        f"({bw['inside_transaction']} inside) | {ok(bw)} |",
        f"| SIGKILL of a real kernel (jupyter_client) mid-reply | {kk['sigkill']['kills']} "
        f"| {ok(kk['sigkill'])} |",
        f"| Interrupt of a real kernel mid-reply, then SIGKILL | {kk['interrupt']['kills']} "
        f"| {ok(kk['interrupt'])} (partial reply kept, marked `interrupted`) |",
        f"| A real kernel runs cells and is shut down normally; `subchats.db` copied *alone* "
        f"(no `-wal`), a second after the last cell and after the shutdown | {ca['kernels']} kernels, "
        f"{ca['messages']} messages | {ok(ca)} missing from the file alone |",
        f"| A real kernel SIGKILLed right after a commit ({cr['wal_only']} of {cr['kernels']} left "
        f"a message only in the `-wal`); `.db` + `-wal` on a real read-only mount: tree, status, "
        f"show, export, a write, `copy-to` and a cell in the copy | {cr['kernels']} kernels, "
        f"{cr['messages']} messages | {ok(cr)} (every message shown, exported and carried by "
        f"`copy-to`; the write refused in one line; neither file touched) |",
        f"| Two processes appending to one store at once (paced) | {w['paced']['messages']} messages "
        f"| {ok(w['paced'])} ({w['paced']['interleavings']} writer switches in the shared chat) |",
        f"| Two processes appending back to back | {w['back_to_back']['messages']} messages "
        f"| {ok(w['back_to_back'])} |",
        f"| Two shells running `%%subchat` cells at once | {w['shells']['cells']} cells | {ok(w['shells'])} |",
        f"| Fuzzed `%%subchat` / `%subchat` cells (hypothesis) | {f['examples']} cases, {f['cells']} cells "
        f"| {'**0** crashes' if f['passed'] else '**crash** ✗'} ({f['usage_errors']} clear UsageErrors) |",
    ]
    for kind, label in (("truncate", "Truncated store file"), ("bytes", "Random bytes written mid-file"),
                        ("page", "A whole page zeroed")):
        d = hs["damage"][kind]
        o = d["outcomes"]
        lines.append(
            f"| {label} | {d['cases']} files | {ok(d)} crashes or unclear messages; "
            f"{o.get('refused', 0)} refused at open, {o.get('reported-on-read', 0)} reported on read, "
            f"{o.get('intact', 0)} unharmed, {o.get('changed-silently', 0)} changed silently |")
    lines.append(f"| Hostile-file cases below that did not pass | {len(hs['tests'])} cases | {ok(hs)} |")
    lines += kept_rows()
    lines += [
        "",
        "*Problems found* counts everything a fresh process finds wrong after every kill",
        "(`check_store` in `subchat_magics/testing/reliability.py`): completed messages missing",
        "or changed (*lost*, in brackets), replies that are not exactly the echo of their",
        "message, chats without a parent, `PRAGMA integrity_check` failures, a store that a",
        "fresh process cannot open, a writer or shell that died; for damaged files, crashes and",
        "unclear messages; a hostile-file case that failed or was skipped. Any of them fails",
        "the run (exit code 1). The reply being written when a kill lands",
        "must be absent, or kept and marked `interrupted` holding a prefix of the echo (what was",
        "saved in time); the user message before it stays.",
        "",
        "## Hostile store files",
        "",
        "Each case goes through the magics; the message must name the file and say what to do,",
        "and a refused file must keep its bytes and modification time.",
        "",
        "| case | result |",
        "|---|---|",
    ]
    for name, status in sorted(hs["tests"].items()):
        lines.append(f"| `{name}` | {status.lower()} |")
    lines += [
        "",
        "## Where the kills landed",
        "",
        "| moment | kills |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {v} |" for name, v in sorted(k["where"].items(), key=lambda x: -x[1])]
    lines += [
        "",
        f"Workloads: {', '.join(f'{v} {m}' for m, v in sorted(k['modes'].items()))} rounds "
        "(*stream*: echo at 4 ms a word, so most kills land mid-reply; *write*: cells of up to",
        "1 MB, fan-outs, system prompts, deleted subtrees; *store*: turns of up to 1 MB written",
        f"back to back through the tree API). {k['uncommitted_frames']} uncommitted WAL frames",
        "were found after kills and discarded by SQLite on the next open.",
        "",
        "## Opening a big store",
        "",
        "Opening checks the file (`PRAGMA quick_check`) before anything is written to it; above",
        "16 MB only the chats table is checked so that opening stays well under a second, and",
        "damage in a message page is reported when that chat is read.",
        "",
        "| store | file | check at open | open, fresh process (median of 5) |",
        "|---|---:|---|---:|",
    ]
    for label, o in oc.items():
        lines.append(f"| {o['messages']:,} messages ({label.split('_')[1]}) | {o['file_mb']} MB "
                     f"| {o['check']} | {o['open_ms']} ms |")
    lines += [
        "",
        "## What this does not cover",
        "",
        "- **Power loss.** The store runs WAL with `synchronous=NORMAL`: a killed process loses",
        "  nothing committed, but a power cut may roll back the last commits (never corrupt).",
        "- **Silent damage inside a message's text.** SQLite keeps no checksums of row data: bytes",
        "  flipped inside a message that still decode as UTF-8 are not detected (the *changed",
        "  silently* column above). Structure damage and undecodable text are reported.",
        "- **Crashes of the machine's disk or file system** beyond a full disk (I/O errors, a",
        "  store on a network share without working locks) are not simulated.",
        "- A 0-byte file is taken as a new, empty store.",
        "- Figures in *Opening a big store* come from a shared 2-core machine: compare them",
        "  only with a rerun on the same machine.",
        "",
    ]
    problems = (k["problems"] + bw["problems"] + kk["sigkill"]["problems"] + kk["interrupt"]["problems"]
                + ca["problems"] + cr["problems"]
                + w["paced"]["problems"] + w["back_to_back"]["problems"] + w["shells"]["problems"]
                + f["failures"] + [p for d in hs["damage"].values() for p in d["problems"]]
                + hs["failed_tests"])
    if problems:
        lines += ["## Problems found in this run", "", *[f"- `{p[:300]}`" for p in problems[:40]], ""]
    return "\n".join(lines)


def kept_rows() -> list[str]:
    """Rows of the summary table that other suites wrote into the doc (they name their
    test file, e.g. ``tests/test_hardening.py``): a rerun keeps them."""
    try:
        text = DOC.read_text()
    except OSError:
        return []
    return [line for line in text.split("## Summary", 1)[-1].split("\n\n")[1].splitlines()
            if line.startswith("| ") and "(`tests/" in line.split(" | ")[0]]


def source() -> str:
    """The commit measured, and whether the package had uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "subchat_magics"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # a copy made with git archive
        return os.environ.get("SUBCHAT_SOURCE", "unknown source")
    return f"commit {commit}" + (" with uncommitted changes to subchat_magics" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--kills-per-store", type=int, default=10)
    parser.add_argument("--big-write-kills", type=int, default=5)
    parser.add_argument("--kernel-kills", type=int, default=5, help="of each kind")
    parser.add_argument("--copies", type=int, default=3,
                        help="kernels shut down normally, and kernels killed then read read-only")
    parser.add_argument("--messages", type=int, default=1000, help="per writer")
    parser.add_argument("--fuzz", type=int, default=1000, help="examples per fuzz test (two tests)")
    parser.add_argument("--corrupt", type=int, default=40, help="files per kind of damage")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="a smoke run of every part")
    parser.add_argument("--no-write", action="store_true", help="print, do not write the doc")
    parser.add_argument("--sabotage", choices=sorted(SABOTAGE),
                        help="damage the first kill store before its check (wal-lost: the first "
                             "killed kernel's -wal in copies), to see the run fail "
                             "(implies --no-write)")
    raw = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw)
    args.no_write = args.no_write or bool(args.sabotage)
    if args.quick:
        args.kills, args.big_write_kills, args.kernel_kills, args.copies = 6, 1, 1, 1
        args.messages, args.fuzz, args.corrupt = 200, 50, 5
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    results: dict = dict(seed=seed, args=vars(args))
    with tempfile.TemporaryDirectory(prefix="subchat-reliability-") as d:
        tmp = Path(d)
        steps = [("kills", lambda: kills(args.kills, args.kills_per_store, seed, tmp, args.sabotage)),
                 ("big_write_kills", lambda: big_write_kills(args.big_write_kills, tmp)),
                 ("kernel_kills", lambda: kernel_kills(args.kernel_kills, tmp)),
                 ("copies", lambda: copies(args.copies, tmp, args.sabotage)),
                 ("writers", lambda: writers(args.messages, tmp)),
                 ("fuzz", lambda: fuzz(args.fuzz, seed, tmp)),
                 ("hostile", lambda: hostile(args.corrupt, seed, tmp)),
                 ("open_cost", lambda: open_cost(tmp))]
        for name, step in steps:
            t0 = time.perf_counter()
            results[name] = step()
            print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    results["machine"] = (f"{os.cpu_count()} cores, Python {platform.python_version()}, "
                          f"SQLite {sqlite3.sqlite_version}, {platform.system()}")
    results["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    results["source"] = source()
    doc = render(results, [a for a in raw if a != "--no-write"])
    if args.no_write:
        print(doc)
    else:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(doc)
        RAW.parent.mkdir(parents=True, exist_ok=True)
        RAW.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {DOC.relative_to(ROOT)} and {RAW.relative_to(ROOT)}", file=sys.stderr)
    failed = failures(results)
    print(f"{failed} problems found: run {'FAILED' if failed else 'passed'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
