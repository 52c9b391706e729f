"""The chat tree at scale: 10,000 chats and 100,000 messages in one store.

Times (a) opening the tree in a fresh process, (b) assembling the context of a chat 200
levels deep, (c) appending one message; and, to show that context cost grows with depth
and not with tree size, the same context in a store holding only the 200-deep chain.
Figures are medians of repeated runs, measured side by side in one run.

    python bench/bench_tree.py            # writes bench/results/tree.json
"""

from __future__ import annotations

import json
import random
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


def main() -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="subchat-bench-"))
    big, small = tmp / "big.db", tmp / "chain.db"
    t = time.perf_counter()
    deep = build(big, CHATS, MESSAGES, DEPTH)
    build_s = time.perf_counter() - t
    build(small, DEPTH + 1, (DEPTH + 1) * 10, DEPTH)

    opens = sorted(open_in_fresh_process(big)[0] for _ in range(5))
    tree = ChatTree(big)
    chain_tree = ChatTree(small)
    n_ctx = len(tree.context(deep, "new"))
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
    results["targets"] = {"open_fresh_process_ms": "< 1000", "context_depth200_ms": "< 10",
                          "append_ms": "< 5",
                          "context_big_vs_chain_only_ratio": "~1 (cost follows depth, not size)"}
    results["machine"] = "2 cores, shared; medians of 5 opens and 50 context/append runs"
    tree.close()
    chain_tree.close()
    return results


if __name__ == "__main__":
    res = main()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2) + "\n")
    for k, v in res.items():
        print(f"{k:40} {v}")
    print(f"written to {OUT}")
