"""The chat tree at scale: 10,000 chats and 100,000 messages in one store.

Times (a) opening the tree in a fresh process, (b) assembling the context of a chat 200
levels deep, (c) appending one message; and, to show that context cost grows with depth
and not with tree size, the same context in a store holding only the 200-deep chain.
Figures are medians of repeated runs, measured side by side in one run.

The context is checked, not only timed: the messages of the 200-deep chat, read straight
from SQLite along the chain (each ancestor's messages before the fork, then the chat's
own, then the new one), must be exactly what ``tree.context`` returns, in the big store and
in the chain-only one.

**Pass**: the context is right, opening < 1000 ms, the depth-200 context < 10 ms, an
append < 5 ms, and the context in the big store at most 2x the chain-only store's (its
cost follows depth, not size). Exits 1 otherwise.

    python bench/bench_tree.py                    # writes bench/results/tree.json
    python bench/bench_tree.py --broken no-index  # the messages table without its
                                                  # (chat_id, seq) index: must FAIL
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from subchat_magics.store import Store
from subchat_magics.tree import ChatTree

CHATS, MESSAGES, DEPTH = 10_000, 100_000, 200
OUT = Path(__file__).parent / "results" / "tree.json"


def build(path: Path, chats: int, messages: int, depth: int, seed: int = 7) -> str:
    """Fill a new store in one transaction; returns the path of the deepest chat."""
    rng = random.Random(seed)
    store = Store(path)
    now = time.time()
    with store.transaction() as c:
        root_id = c.execute("INSERT INTO chats (parent_id, name, fork_seq, created_at) "
                            "VALUES (NULL, 'root', 0, ?)", (now,)).lastrowid
        ids = [root_id]
        parent, chain = root_id, ["root"]
        for d in range(1, depth + 1):  # one chain DEPTH levels deep
            parent = c.execute("INSERT INTO chats (parent_id, name, fork_seq, created_at) "
                               "VALUES (?, ?, 2, ?)", (parent, f"d{d}", now)).lastrowid
            ids.append(parent)
            chain.append(f"d{d}")
        while len(ids) < chats:  # the rest: a bushy random tree
            p = rng.choice(ids[: max(1, len(ids))])
            ids.append(c.execute("INSERT INTO chats (parent_id, name, fork_seq, created_at) "
                                 "VALUES (?, ?, 0, ?)", (p, f"c{len(ids)}", now)).lastrowid)
        per_chat: dict[int, int] = {}
        rows = []
        for i in range(messages):
            cid = ids[i % len(ids)] if i < len(ids) * 2 else rng.choice(ids)
            seq = per_chat.get(cid, 0)
            per_chat[cid] = seq + 1
            role = "user" if seq % 2 == 0 else "assistant"
            rows.append((cid, seq, role, f"message {i} " + "lorem ipsum " * 8, "complete",
                         '{"backend": "echo"}' if role == "assistant" else None, now))
        c.executemany("INSERT INTO messages (chat_id, seq, role, content, status, provenance, "
                      "created_at) VALUES (?,?,?,?,?,?,?)", rows)
    store.close()
    return "/".join(chain)


def expected_context(path: Path, deep: str) -> list[str]:
    """The contents the deepest chat's context must hold, read with plain SQL along the
    chain of names (no project code): each ancestor's messages before its child's
    ``fork_seq``, the chat's own messages, then the new message."""
    conn = sqlite3.connect(path)
    try:
        chain, parent = [], None
        for name in deep.split("/"):
            row = conn.execute("SELECT id, fork_seq FROM chats WHERE name = ? AND parent_id IS ?",
                               (name, parent)).fetchone()
            chain.append(row)
            parent = row[0]
        contents = []
        for i, (cid, _) in enumerate(chain):
            limit = chain[i + 1][1] if i + 1 < len(chain) else None
            rows = conn.execute("SELECT content FROM messages WHERE chat_id = ? AND seq < ? "
                                "ORDER BY seq", (cid, 10**9 if limit is None else limit))
            contents += [r[0] for r in rows]
    finally:
        conn.close()
    return contents + ["new"]


def drop_message_index(path: Path) -> None:
    """--broken no-index: the messages table copied without its constraints (so without
    the (chat_id, seq) index every path read relies on)."""
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE m2 AS SELECT * FROM messages")
        conn.execute("DROP TABLE messages")
        conn.execute("ALTER TABLE m2 RENAME TO messages")
    conn.close()


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


OPEN_SNIPPET = """
import sys, time
t = time.perf_counter()
from subchat_magics.tree import ChatTree
tree = ChatTree(sys.argv[1])
n = len(tree.chats())
print((time.perf_counter() - t) * 1000, n)
"""


def open_in_fresh_process(path: Path) -> tuple[float, int]:
    out = subprocess.run([sys.executable, "-c", OPEN_SNIPPET, str(path)], capture_output=True,
                         text=True, check=True).stdout.split()
    return float(out[0]), int(out[1])


TARGETS = {"open_fresh_process_ms": 1000.0, "context_depth200_ms": 10.0, "append_ms": 5.0,
           "context_big_vs_chain_only_ratio": 2.0}


def main(broken: str | None = None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="subchat-bench-"))
    big, small = tmp / "big.db", tmp / "chain.db"
    t = time.perf_counter()
    deep = build(big, CHATS, MESSAGES, DEPTH)
    build_s = time.perf_counter() - t
    build(small, DEPTH + 1, (DEPTH + 1) * 10, DEPTH)
    if broken == "no-index":
        drop_message_index(big)
    want_big, want_small = expected_context(big, deep), expected_context(small, deep)

    opens = sorted(open_in_fresh_process(big)[0] for _ in range(5))
    tree = ChatTree(big)
    chain_tree = ChatTree(small)
    got_big = [m["content"] for m in tree.context(deep, "new")]
    got_small = [m["content"] for m in chain_tree.context(deep, "new")]
    n_ctx = len(got_big)
    mid = "/".join(deep.split("/")[:51])
    results = {
        "chats": len(tree.chats()),
        "messages": sum(tree.store.message_counts().values()),
        "build_s": round(build_s, 2),
        "open_fresh_process_ms": round(statistics.median(opens), 1),
        "context_depth200_ms": round(median_ms(lambda: tree.context(deep, "new"), 50), 3),
        "context_depth200_messages": n_ctx,
        "context_depth50_ms": round(median_ms(lambda: tree.context(mid, "new"), 50), 3),
        "context_depth200_chain_only_store_ms": round(
            median_ms(lambda: chain_tree.context(deep, "new"), 50), 3),
    }
    counter = iter(range(10**9))
    results["append_ms"] = round(
        median_ms(lambda: tree.append(deep, "user", f"appended {next(counter)}"), 50), 3)
    results["context_big_vs_chain_only_ratio"] = round(
        results["context_depth200_ms"] / results["context_depth200_chain_only_store_ms"], 2)
    results["context_expected_messages"] = len(want_big)
    checks = {
        "context right in the big store (plain SQL along the chain)": got_big == want_big,
        "context right in the chain-only store": got_small == want_small,
        "the context is 200 levels of messages, not a few": len(want_big) > 2 * DEPTH,
        "every chat and message counted": results["chats"] == CHATS
        and results["messages"] == MESSAGES,
    }
    for key, limit in TARGETS.items():
        checks[f"{key} <= {limit:g}" if key.endswith("ratio") else f"{key} < {limit:g}"] = (
            results[key] <= limit if key.endswith("ratio") else results[key] < limit)
    results["checks"] = checks
    results["fails"] = [k for k, ok in checks.items() if not ok]
    results["passed"] = not results["fails"]
    results["broken"] = broken
    results["command"] = "python bench/bench_tree.py" + (f" --broken {broken}" if broken else "")
    results["machine"] = "2 cores, shared; medians of 5 opens and 50 context/append runs"
    tree.close()
    chain_tree.close()
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--broken", choices=("no-index",),
                    help="a deliberately degraded store whose run must fail")
    args = ap.parse_args()
    res = main(args.broken)
    out = OUT.with_name(f"tree-broken-{args.broken}.json") if args.broken else OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    for k, v in res.items():
        print(f"{k:40} {v}")
    print(f"written to {out}")
    print("PASS" if res["passed"] else f"FAIL: {res['fails']}")
    sys.exit(0 if res["passed"] else 1)
