"""Crash and concurrency harness: what the reliability tests and ``bench/reliability.py``
share (``from subchat_magics.testing import reliability as h``).

- A notebook user's workload, run by a child process with a real ``InteractiveShell`` and
  the magics on the echo backend, that writes a journal line before and after each cell
  (so the parent knows what had completed when the child was SIGKILLed).
- The checks a fresh process runs on a store afterwards (:func:`check_store`).
- A reader of the WAL file that tells whether a kill landed inside a write transaction.
- Writers for two processes appending to one store at once.

Children are forked from a ``forkserver`` that has already imported IPython and the
package, so a round costs the workload, not a 1.3 s interpreter start. Each child is a
separate process: SIGKILL reaches it and nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import random
import re
import signal
import sqlite3
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# settings that would make a child pick a backend or a store other than the test's
CLEARED_VARS = ("LLM_BACKEND", "SUBCHAT_STORE", "OLLAMA_HOST", "OLLAMA_MODEL", "GROQ_API_KEY",
                "GROQ_MODEL", "OPENAI_BASE_URL", "OPENAI_API_KEY", "OPENAI_MODEL",
                "SUBCHAT_ECHO_DELAY")
PRELOAD = ["IPython.core.interactiveshell", "subchat_magics.magics", "subchat_magics.backends.echo",
           "subchat_magics.testing.reliability"]
_ctx: Any = None


def context() -> Any:
    """The forkserver context (started once per process, preloading IPython and us)."""
    global _ctx
    if _ctx is None:
        _ctx = mp.get_context("forkserver")
        _ctx.set_forkserver_preload(PRELOAD)
    return _ctx


def child_env(echo_delay: float = 0.0) -> None:
    """In a child: no backend settings from the machine; echo at ``echo_delay`` s/word."""
    for var in CLEARED_VARS:
        os.environ.pop(var, None)
    os.environ["OLLAMA_HOST"] = "http://127.0.0.1:9"  # never a real server under auto
    if echo_delay:
        os.environ["SUBCHAT_ECHO_DELAY"] = str(echo_delay)


def _silence() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)


# -- the workload ------------------------------------------------------------------------------
def make_body(token: str, words: int = 0, size: int = 0) -> str:
    """A cell body the store must give back byte for byte: a unique token, braces that
    are not names, non-ASCII text, then ``words`` words or one ``size``-byte word."""
    head = f"{token} {{zz_not_a_name}} {{\"json\": [1, 2]}} é漢字🙂"
    if size:
        return f"{head} " + "x" * size
    return head + "".join(f" w{i}" for i in range(words))


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class Journal:
    """One JSON line per event, appended with one ``write`` each (survives SIGKILL)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.fd = os.open(str(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, **entry: Any) -> None:
        os.write(self.fd, (json.dumps(entry) + "\n").encode())


def read_journal(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(FileNotFoundError):
        for line in Path(path).read_text().splitlines():
            if line.strip():
                out.append(json.loads(line))
    return out


class CellFailed(RuntimeError):
    pass


def _cell(ip: Any, source: str) -> None:
    result = ip.run_cell(source, store_history=False)
    if not result.success:
        err = result.error_before_exec or result.error_in_exec
        raise CellFailed(f"{source[:120]!r}: {type(err).__name__}: {err}")


MODES = {
    # echo streams a word every 4 ms: most of the time is spent mid-reply
    "stream": dict(delay=0.004, send=0.8, fanout=0.1, system=0.05, scratch=0.05),
    # no delay, big cells: cells that write a lot (IPython still spends time on each cell)
    "write": dict(delay=0.0, send=0.55, fanout=0.15, system=0.15, scratch=0.15),
    # turns written through the tree API, big messages back to back: most of the time is
    # spent inside SQLite write transactions and WAL checkpoints
    "store": dict(delay=0.0, send=0.0, fanout=0.0, system=0.0, scratch=0.0, append=1.0),
}


def run_worker(cfg: dict[str, Any], ready: Any) -> None:
    """Child process: run cells forever (or ``cfg['ops']`` of them), journaling each."""
    mode = MODES[cfg["mode"]]
    if not cfg.get("verbose"):
        _silence()
    child_env(mode["delay"])
    os.chdir(cfg["workdir"])
    from IPython.core.interactiveshell import InteractiveShell

    from subchat_magics.session import default_session

    rng = random.Random(cfg["seed"])
    rnd = cfg["round"]
    journal = Journal(cfg["journal"])
    ip = InteractiveShell.instance()
    _cell(ip, "%load_ext subchat_magics")
    _cell(ip, f"%config SubchatMagics.store_path = {str(cfg['store'])!r}")
    _cell(ip, "%config SubchatMagics.backend = 'echo'")
    tree = default_session().tree
    home = cfg.get("home", "root")  # this worker's subtree (two workers at once: one each)
    tree.ensure(home)
    max_size = cfg.get("max_size", 500_000)
    ready.set()
    i = 0
    try:
        while cfg.get("ops") is None or i < cfg["ops"]:
            i += 1
            token = f"T{rnd}x{i}"
            chats = [c.path for c in tree.chats()
                     if "scratch" not in c.path and (c.path + "/").startswith(home + "/")]
            kinds = ["send", "fanout", "system", "scratch", "append"]
            kind = rng.choices(kinds, [mode.get(k, 0.0) for k in kinds])[0]
            if kind == "append":
                path = rng.choice(chats)
                if rng.random() < 0.1 and path.count("/") < 4:
                    path = f"{path}/k{rnd}_{i}"
                chat = tree.ensure(path)
                size = rng.choice([s for s in SIZES if s <= max_size])
                body = make_body(token, size=size)
                reply = f"echo (1 messages): {body}"
                journal.write(op="append", phase="start", round=rnd, token=token, paths=[path],
                              words=0, size=size)
                tree.append(chat, "user", body)
                tree.append(chat, "assistant", reply, "complete", {"backend": "echo"})
                journal.write(op="append", phase="done", round=rnd, token=token, replies=[sha(reply)])
            elif kind == "send":
                path = rng.choice(chats)
                if rng.random() < 0.3 and path.count("/") < 4:
                    path = f"{path}/k{rnd}_{i}"
                words, size = _body_size(cfg["mode"], rng, max_size)
                body = make_body(token, words, size)
                journal.write(op="send", phase="start", round=rnd, token=token, paths=[path],
                              words=words, size=size)
                _cell(ip, f"%%subchat {path} --var _reply\n{body}")
                journal.write(op="send", phase="done", round=rnd, token=token,
                              replies=[sha(ip.user_ns["_reply"])])
            elif kind == "fanout":
                parent = rng.choice([c for c in chats if c.count("/") < 4])
                names = [f"f{rnd}_{i}{s}" for s in "ab"]
                words = rng.randrange(5, 40)
                body = make_body(token, words)
                journal.write(op="fanout", phase="start", round=rnd, token=token,
                              paths=[f"{parent}/{n}" for n in names], words=words, size=0)
                _cell(ip, f"%%subchat {parent} --children {','.join(names)} --var _replies\n{body}")
                journal.write(op="fanout", phase="done", round=rnd, token=token,
                              replies=[sha(r) for r in ip.user_ns["_replies"]])
            elif kind == "system":
                path = rng.choice(chats)
                value = f"system prompt {rnd} {i}"
                journal.write(op="system", phase="start", round=rnd, token=token, paths=[path],
                              value=value)
                _cell(ip, f'%subchat system {path} "{value}"')
                journal.write(op="system", phase="done", round=rnd, token=token)
            else:
                path = f"{home}/scratch{rnd}_{i}"
                size = min(200_000, max_size)
                journal.write(op="scratch", phase="start", round=rnd, token=token, paths=[path],
                              words=0, size=size)
                _cell(ip, f"%%subchat {path}\n{make_body(token, size=size)}")
                _cell(ip, f"%%subchat {path}/sub\n{make_body(token + 'b', words=3)}")
                _cell(ip, f"%subchat delete {path} --force")
                journal.write(op="scratch", phase="done", round=rnd, token=token)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent through the journal
        journal.write(op="error", round=rnd, error=f"{type(exc).__name__}: {exc}"[:2000])
        os._exit(3)
    os._exit(0)


SIZES = (4_000, 20_000, 100_000, 500_000, 1_000_000, 4_000_000)


def _body_size(mode: str, rng: random.Random, max_size: int) -> tuple[int, int]:
    if mode == "stream":
        return rng.randrange(20, 150), 0
    if rng.random() < 0.7:
        return 0, rng.choice([s for s in SIZES if s <= max_size])
    return rng.randrange(3, 30), 0


# -- a kill round ------------------------------------------------------------------------------
@dataclass
class KillRound:
    round: int
    mode: str
    delay_s: float
    in_flight: str  # the op running when the kill landed ("between cells" if none)
    where: str  # mid-reply / before the user message / inside a write / ...
    wal_uncommitted_frames: int


def kill_round(store: Path, workdir: Path, journal: Path, rnd: int, mode: str,
               rng: random.Random, window: tuple[float, float] = (0.1, 1.0),
               max_size: int = 500_000) -> KillRound:
    """Start a worker on ``store``, let it run a random while, SIGKILL it."""
    ctx = context()
    ready = ctx.Event()
    cfg = dict(store=str(store), workdir=str(workdir), journal=str(journal), round=rnd,
               mode=mode, seed=rng.randrange(1 << 30), max_size=max_size)
    proc = ctx.Process(target=run_worker, args=(cfg, ready), daemon=True)
    proc.start()
    try:
        _wait_ready(proc, ready, journal, rnd)
        delay = rng.uniform(*window)
        time.sleep(delay)
        if not proc.is_alive():
            errors = [e for e in read_journal(journal) if e.get("op") == "error"]
            raise RuntimeError(f"worker for round {rnd} ended early: {errors or proc.exitcode}")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.join(30)
    wal = wal_state(store)
    entries = [e for e in read_journal(journal) if e.get("round") == rnd]
    last = entries[-1] if entries else None
    if last is None or last.get("phase") != "start":
        return KillRound(rnd, mode, delay, "between cells",
                         "inside a write" if wal.uncommitted else "between cells", wal.uncommitted)
    where = "inside a write" if wal.uncommitted else _where(store, last)
    return KillRound(rnd, mode, delay, last["op"], where, wal.uncommitted)


def _wait_ready(proc: Any, ready: Any, journal: Path, rnd: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready.wait(0.05):
        if not proc.is_alive() or time.monotonic() > deadline:
            errors = [e for e in read_journal(journal) if e.get("op") == "error"]
            raise RuntimeError(f"worker for round {rnd} did not start: {errors or proc.exitcode}")


def _where(store: Path, entry: dict[str, Any]) -> str:
    """Where a kill in the middle of ``entry`` landed, judged from the store."""
    if entry["op"] == "scratch":
        return "creating then deleting a subtree"
    if entry["op"] == "system":
        return "setting a system prompt"
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT m.chat_id, m.seq FROM messages m WHERE m.role = 'user' AND "
            "substr(m.content, 1, ?) = ?", (len(entry["token"]) + 1, entry["token"] + " ")).fetchall()
        replies = [conn.execute("SELECT status FROM messages WHERE chat_id = ? AND seq = ? AND "
                                "role = 'assistant'", (cid, seq + 1)).fetchone() for cid, seq in rows]
    finally:
        conn.close()
    if not rows:
        return "before the user message was saved"
    if any(r is None for r in replies):
        return "mid-reply (user message saved, reply not)"
    if any(r[0] == "interrupted" for r in replies):
        return "mid-reply (partial reply kept, marked interrupted)"
    return "after the reply was saved"


# -- reading the WAL ---------------------------------------------------------------------------
@dataclass
class WalState:
    frames: int = 0  # valid frames (matching salts and checksums)
    uncommitted: int = 0  # valid frames after the last commit frame: a transaction cut short


def wal_state(store: Path) -> WalState:
    """Parse ``store-wal`` as SQLite will on the next open (file format, section 4)."""
    try:
        data = Path(f"{store}-wal").read_bytes()
    except FileNotFoundError:
        return WalState()
    if len(data) < 32:
        return WalState()
    magic, _version, page_size, _ckpt, salt1, salt2, c1, c2 = struct.unpack(">8I", data[:32])
    if magic not in (0x377F0682, 0x377F0683):
        return WalState()
    order = ">" if magic & 1 else "<"
    s1, s2 = _checksum(data[:24], 0, 0, order)
    if (s1, s2) != (c1, c2):
        return WalState()
    state, off, last_commit = WalState(), 32, 0
    while off + 24 + page_size <= len(data):
        _pgno, commit, f1, f2, k1, k2 = struct.unpack(">6I", data[off:off + 24])
        if (f1, f2) != (salt1, salt2):
            break
        s1, s2 = _checksum(data[off:off + 8], s1, s2, order)
        s1, s2 = _checksum(data[off + 24:off + 24 + page_size], s1, s2, order)
        if (s1, s2) != (k1, k2):
            break
        state.frames += 1
        if commit:
            last_commit = state.frames
        off += 24 + page_size
    state.uncommitted = state.frames - last_commit
    return state


def _checksum(buf: bytes, s1: int, s2: int, order: str) -> tuple[int, int]:
    words = struct.unpack(f"{order}{len(buf) // 4}I", buf)
    for i in range(0, len(words), 2):
        s1 = (s1 + words[i] + s2) & 0xFFFFFFFF
        s2 = (s2 + words[i + 1] + s1) & 0xFFFFFFFF
    return s1, s2


# -- checking a store in a fresh process -------------------------------------------------------
ECHO = re.compile(r"echo \((\d+) messages\): ", re.S)


@dataclass
class StoreCheck:
    chats: int = 0
    messages: int = 0
    replies: int = 0
    dangling: int = 0  # user messages whose reply was cut by a kill (absent)
    interrupted: int = 0  # replies kept and marked interrupted
    done_ops: int = 0
    lost: int = 0  # completed messages missing or changed (must stay 0)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_store(store: Path, journal: Path | None = None) -> StoreCheck:
    """Open ``store`` as a fresh process would and check everything we can know:
    integrity, every chat's parent, each chat's messages in order, every user message
    exactly as sent, every reply exactly the echo of its message and complete, and every
    cell the journal saw complete present. A reply cut by the kill may be absent, or kept
    and marked ``interrupted`` holding a prefix of the echo (the part saved in time)."""
    from subchat_magics.tree import ChatTree

    res = StoreCheck()
    entries = read_journal(journal) if journal else []
    starts = {e["token"]: e for e in entries if e.get("phase") == "start"}
    done = {e["token"]: e for e in entries if e.get("phase") == "done"}
    in_flight = set(starts) - set(done)
    res.problems += [f"worker failed: {e['error']}" for e in entries if e.get("op") == "error"]
    try:
        tree = ChatTree(store)
    except Exception as exc:  # noqa: BLE001 - the finding itself
        res.problems.append(f"fresh open failed: {type(exc).__name__}: {exc}")
        return res
    try:
        conn = tree.store.conn
        if conn.execute("PRAGMA integrity_check").fetchall() != [("ok",)]:
            res.problems.append("integrity_check failed")
        if conn.execute("PRAGMA foreign_key_check").fetchall():
            res.problems.append("foreign_key_check found orphans")
        rows = conn.execute("SELECT id, parent_id FROM chats").fetchall()
        ids = {r[0] for r in rows}
        res.problems += [f"chat {cid} has no parent {pid}" for cid, pid in rows
                         if pid is not None and pid not in ids]
        chats = tree.chats()
        res.chats = len(chats)
        by_token: dict[str, list[tuple[str, str | None]]] = {}
        for chat in chats:
            msgs = chat.messages
            res.messages += len(msgs)
            if [m.seq for m in msgs] != list(range(len(msgs))):
                res.problems.append(f"{chat.path}: message seq not contiguous")
            for k, m in enumerate(msgs):
                nxt = msgs[k + 1] if k + 1 < len(msgs) else None
                if m.role == "user":
                    _check_user(res, chat.path, m, nxt, starts, in_flight, by_token)
                elif m.role == "assistant":
                    prev = msgs[k - 1] if k else None
                    _check_reply(res, chat.path, m, prev, in_flight if starts else None)
                else:
                    res.problems.append(f"{chat.path}: unexpected role {m.role!r}")
        _check_journal(res, tree, starts, done, by_token)
    finally:
        tree.close()
    res.lost = sum(1 for p in res.problems if p.startswith("LOST"))
    return res


def _check_user(res: StoreCheck, path: str, m: Any, nxt: Any, starts: dict, in_flight: set,
                by_token: dict) -> None:
    token = m.content.split(" ", 1)[0]
    spec = starts.get(token) or starts.get(token[:-1])  # scratch's second cell: token + "b"
    if spec is None:
        if starts:
            res.problems.append(f"{path}: user message with unknown token {token[:40]!r}")
        return
    if spec["token"] == token and m.content != make_body(token, spec.get("words", 0), spec.get("size", 0)):
        res.problems.append(f"{path}: user message {token} changed (garbage)")
    by_token.setdefault(token, []).append(
        (path, nxt.content if nxt is not None and nxt.role == "assistant" else None))
    if nxt is None or nxt.role != "assistant":
        res.dangling += 1
        if spec["token"] not in in_flight:
            res.problems.append(f"LOST: {path}: the reply to completed message {token} is missing")


def _check_reply(res: StoreCheck, path: str, m: Any, prev: Any, in_flight: set | None) -> None:
    res.replies += 1
    if prev is None or prev.role != "user":
        res.problems.append(f"{path}: reply {m.seq} does not follow a user message")
        return
    match = ECHO.match(m.content)
    if m.status == "complete":
        if match is None or m.content != match.group(0) + prev.content:
            res.problems.append(f"{path}: reply {m.seq} is not the echo of its message (garbage)")
    elif m.status == "interrupted":
        res.interrupted += 1
        # the digits may be cut too: "echo (1" of "echo (12 messages): ..."
        shown = re.sub(r"^echo \(\d+", "echo (N", m.content)
        if not f"echo (N messages): {prev.content}".startswith(shown):
            res.problems.append(f"{path}: interrupted reply {m.seq} is not a prefix of the echo")
        token = prev.content.split(" ", 1)[0]
        if in_flight is not None and token not in in_flight and token[:-1] not in in_flight:
            res.problems.append(f"LOST: {path}: the reply to completed message {token} is cut")
    else:
        res.problems.append(f"{path}: reply {m.seq} has status {m.status!r}")


def _check_journal(res: StoreCheck, tree: Any, starts: dict, done: dict, by_token: dict) -> None:
    systems: dict[str, list[tuple[str, bool]]] = {}
    for token, start in starts.items():
        finished = token in done
        if start["op"] in ("send", "fanout", "append") and finished:
            res.done_ops += 1
            found = {p: reply for p, reply in by_token.get(token, [])}
            for path, want in zip(start["paths"], done[token]["replies"]):
                if path not in found:
                    res.problems.append(f"LOST: message {token} sent to {path} is missing")
                elif found[path] is None or sha(found[path]) != want:
                    res.problems.append(f"LOST: the reply to {token} in {path} differs from the one shown")
        elif start["op"] == "scratch" and finished:
            res.done_ops += 1
            if start["paths"][0] in tree:
                res.problems.append(f"deleted chat {start['paths'][0]} is back")
        elif start["op"] == "system":
            res.done_ops += finished
            systems.setdefault(start["paths"][0], []).append((start["value"], finished))
    for path, values in systems.items():
        if path not in tree:
            continue
        last_done = [v for v, ok in values if ok][-1:]
        allowed = set(last_done) | {v for v, ok in values if not ok}
        if last_done and tree.get(path).system_prompt not in allowed:
            res.problems.append(f"LOST: system prompt of {path} is not the last one set")


# -- two processes writing at once -------------------------------------------------------------
def run_writer(store: str, name: str, n: int, go: Any, ready: Any, pace: float = 0.0) -> None:
    """Child: after ``go``, open the tree (maybe creating the store at the same moment as
    the other writer) and append ``n`` messages, alternating between this writer's own chat
    and a chat both write to, ``pace`` seconds apart (a kernel does other work between
    writes; back to back, SQLite's busy handler lets one writer run ahead of the other)."""
    _silence()
    child_env()
    from subchat_magics.tree import ChatTree

    ready.set()
    go.wait(60)
    tree = ChatTree(store)
    own = tree.ensure(f"root/{name}")
    shared = tree.ensure("root/shared")
    for k in range(n):
        tree.append(own if k % 2 == 0 else shared, "user", f"{name}:{k}")
        if pace:
            time.sleep(pace)
    tree.close()
    os._exit(0)


def run_writers(store: Path, names: list[str], n: int, pace: float = 0.0) -> list[int]:
    """Run one writer process per name at once; their exit codes."""
    ctx = context()
    go = ctx.Event()
    procs, readies = [], []
    for name in names:
        ready = ctx.Event()
        p = ctx.Process(target=run_writer, args=(str(store), name, n, go, ready, pace), daemon=True)
        p.start()
        procs.append(p)
        readies.append(ready)
    for r in readies:
        r.wait(60)
    go.set()
    for p in procs:
        p.join(300)
    return [p.exitcode for p in procs]


def check_writers(store: Path, names: list[str], n: int) -> list[str]:
    """Problems with what the writers left: every message there once, each writer's
    messages in the order written, within each chat."""
    conn = sqlite3.connect(str(store))
    try:
        problems = []
        if conn.execute("PRAGMA integrity_check").fetchall() != [("ok",)]:
            problems.append("integrity_check failed")
        rows = conn.execute("SELECT c.name, m.seq, m.content FROM messages m JOIN chats c "
                            "ON c.id = m.chat_id ORDER BY c.name, m.seq").fetchall()
    finally:
        conn.close()
    by_chat: dict[str, list[str]] = {}
    seqs: dict[str, list[int]] = {}
    for chat, seq, content in rows:
        by_chat.setdefault(chat, []).append(content)
        seqs.setdefault(chat, []).append(seq)
    problems += [f"{chat}: seq not contiguous" for chat, s in seqs.items() if s != list(range(len(s)))]
    for name in names:
        for chat, parity in ((name, 0), ("shared", 1)):
            got = [int(c.split(":")[1]) for c in by_chat.get(chat, []) if c.startswith(f"{name}:")]
            want = [k for k in range(n) if k % 2 == parity]
            if got != want:
                missing = len(set(want) - set(got))
                problems.append(f"LOST: {name} in {chat}: {missing} missing, "
                                f"{'in order' if got == sorted(got) else 'out of order'}")
    total = len(rows)
    if total != n * len(names):
        problems.append(f"{total} messages stored, {n * len(names)} written")
    return problems


def interleavings(store: Path) -> int:
    """How often the writer changes along the shared chat (0-1: they took turns wholesale)."""
    conn = sqlite3.connect(str(store))
    try:
        rows = conn.execute("SELECT m.content FROM messages m JOIN chats c ON c.id = m.chat_id "
                            "WHERE c.name = 'shared' ORDER BY m.seq").fetchall()
    finally:
        conn.close()
    who = [r[0].split(":")[0] for r in rows]
    return sum(1 for a, b in zip(who, who[1:]) if a != b)


# -- a real kernel -----------------------------------------------------------------------------
def kernel_kill(store: Path, workdir: Path, *, interrupt_first: bool, kill_after_updates: int,
                timeout: float = 60.0) -> dict[str, Any]:
    """Start a real IPython kernel (jupyter_client), stream a slow echo reply into a chat,
    and after ``kill_after_updates`` display updates either SIGKILL the kernel, or first
    interrupt it (the kernel's Stop button) and then SIGKILL it. Returns what was seen."""
    from jupyter_client.manager import KernelManager

    env = {k: v for k, v in os.environ.items() if k not in CLEARED_VARS}
    env.update(OLLAMA_HOST="http://127.0.0.1:9", SUBCHAT_ECHO_DELAY="0.01",
               SUBCHAT_STORE=str(store))
    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(workdir), env=env)
    kc = km.client()
    kc.start_channels()
    seen: dict[str, Any] = {"updates": 0, "interrupted": False}
    try:
        kc.wait_for_ready(timeout=timeout)
        quiet = dict(timeout=timeout, output_hook=lambda msg: None)
        quiet = dict(timeout=timeout, output_hook=lambda msg: None)
        reply = kc.execute_interactive("%load_ext subchat_magics\n"
                                       "%config SubchatMagics.backend = 'echo'", **quiet)
        assert reply["content"]["status"] == "ok", reply["content"]
        words = " ".join(f"w{i}" for i in range(400))
        kc.execute_interactive("%%subchat root/before\ncompleted first", **quiet)
        msg_id = kc.execute(f"%%subchat root/kernel\n{words}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = kc.get_iopub_msg(timeout=timeout)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "update_display_data":
                seen["updates"] += 1
                if seen["updates"] >= kill_after_updates:
                    break
        if interrupt_first:
            km.interrupt_kernel()
            reply = kc.get_shell_msg(timeout=timeout)
            # the magic ends an interrupted reply with one line (a UsageError saying what
            # was kept); an interrupt landing outside the stream is a KeyboardInterrupt
            content = reply["content"]
            seen["interrupted"] = content.get("ename") == "KeyboardInterrupt" or (
                content.get("ename") == "UsageError" and "interrupted:" in content.get("evalue", ""))
        seen["pid"] = km.provisioner.process.pid
        os.kill(seen["pid"], signal.SIGKILL)
        km.provisioner.process.wait()
    finally:
        kc.stop_channels()
        km.cleanup_resources()
    seen["words"] = words
    return seen


# -- a kill that lands inside one big write transaction ----------------------------------------
def run_big_append(store: str, before: int, size: int, ready: Any) -> None:
    """Child: write ``before`` small turns to ``root/small``, then one ``size``-byte
    message to ``root/big``. Its pages spill to the WAL while the transaction is open."""
    _silence()
    child_env()
    from subchat_magics.tree import ChatTree

    tree = ChatTree(store)
    small = tree.ensure("root/small")
    for k in range(before):
        tree.append(small, "user", f"small {k}")
    big = tree.ensure("root/big")
    ready.set()
    tree.append(big, "user", "B" * size)
    os._exit(0)


def kill_inside_write(store: Path, before: int = 20, size: int = 64 << 20,
                      wal_bytes: int = 8 << 20, timeout: float = 60.0) -> WalState:
    """SIGKILL :func:`run_big_append` once its open transaction has put ``wal_bytes``
    into the WAL; returns the WAL as the next opener finds it."""
    ctx = context()
    ready = ctx.Event()
    proc = ctx.Process(target=run_big_append, args=(str(store), before, size, ready), daemon=True)
    proc.start()
    wal = Path(f"{store}-wal")
    try:
        if not ready.wait(timeout):
            raise RuntimeError("big-append worker did not start")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.is_alive():
            with contextlib.suppress(FileNotFoundError):
                if wal.stat().st_size >= wal_bytes:
                    break
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.join(30)
    return wal_state(store)


# -- hostile store files -----------------------------------------------------------------------
# what a message about the store must offer: another file, a salvage, an upgrade, a retry...
HINTS = ("SUBCHAT_STORE", ".recover", "pip install", "run the cell again", "free space",
         "give a file name", "create it", "%subchat copy-to")


def snapshot(path: Path) -> tuple[str, int, int]:
    """The file's bytes (hashed), size and modification time: equal means untouched."""
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns


def make_store(path: Path, chats: int = 12, per_chat: int = 8, size: int = 3000) -> dict[str, list[str]]:
    """A store with ``chats`` chats of ``per_chat`` messages (~``size`` bytes each), closed
    cleanly (no WAL left). Returns each chat's message texts."""
    from subchat_magics.tree import ChatTree

    tree = ChatTree(path)
    want: dict[str, list[str]] = {}
    for c in range(chats):
        parent = "root" if c < 3 else f"root/c{c % 3}"
        chat = tree.create(f"{parent}/c{c}")
        want[chat.path] = []
        for k in range(per_chat):
            text = f"chat {c} message {k} " + "".join(chr(97 + (c * k + j) % 26) for j in range(size))
            tree.append(chat, "user" if k % 2 == 0 else "assistant", text)
            want[chat.path].append(text)
    tree.close()
    return want


@dataclass
class Probe:
    outcome: str  # refused / reported-on-read / intact / changed-silently / crash
    messages: list[str]
    unexpected: list[str]
    untouched: bool | None  # after a refusal: is the file as it was?


def probe_store(ip: Any, store: Path, want: dict[str, list[str]] | None) -> Probe:
    """Point a real shell's magics at ``store`` and use it: list the tree, read every
    chat (export), send a message. Every failure must be a clear ``UsageError``."""
    from IPython.core.error import UsageError
    from IPython.utils.capture import capture_output

    before = snapshot(store) if store.is_file() else None
    messages, unexpected, outputs = [], [], []
    refused = False
    ops = [f"%config SubchatMagics.store_path = {str(store)!r}", "%subchat tree --text",
           "%subchat export root --format json", "%%subchat root\nafter the damage"]
    for k, src in enumerate(ops):
        with capture_output() as cap:
            result = ip.run_cell(src, store_history=False)
        err = result.error_before_exec or result.error_in_exec
        outputs.append(cap.stdout)
        if err is None:
            continue
        if not isinstance(err, UsageError):
            unexpected.append(f"{src.splitlines()[0]}: {type(err).__name__}: {err}"[:500])
        else:
            messages.append(str(err))
            if not (str(store) in str(err) and any(hint in str(err) for hint in HINTS)):
                unexpected.append(f"{src.splitlines()[0]}: unclear message: {err}"[:500])
        if k == 1:
            refused = True
            break
    untouched = None
    if refused and before is not None:
        untouched = snapshot(store) == before
        if not untouched:
            unexpected.append("the file was changed after it was refused")
    if unexpected and any("Error:" in u for u in unexpected):
        outcome = "crash"
    elif refused:
        outcome = "refused"
    elif messages:
        outcome = "reported-on-read"
    elif want is not None and _exported(outputs[2]) != want:
        outcome = "changed-silently"
    else:
        outcome = "intact"
    return Probe(outcome, messages, unexpected, untouched)


def _exported(text: str) -> dict[str, list[str]]:
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return {c["path"]: [m["content"] for m in c["messages"]] for c in data["chats"] if c["messages"]}


def corrupt(path: Path, rng: random.Random, kind: str) -> str:
    """Damage ``path`` in place; returns what was done."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        if kind == "truncate":
            cut = rng.randrange(0, size)
            f.truncate(cut)
            return f"truncated to {cut} of {size} bytes"
        if kind == "bytes":
            off, n = rng.randrange(0, size - 64), rng.randrange(1, 65)
            f.seek(off)
            f.write(bytes(rng.randrange(256) for _ in range(n)))
            return f"{n} random bytes at {off}"
        if kind == "page":
            page = rng.randrange(1, size // 4096)
            f.seek(page * 4096)
            f.write(b"\0" * 4096)
            return f"page {page + 1} zeroed"
    raise ValueError(kind)


def run_unshared(script: str, timeout: float = 120.0) -> dict[str, Any] | None:
    """Run ``script`` (Python, printing ``RESULT <json>``) in a private mount namespace,
    where it may mount a tmpfs or a read-only bind without touching the machine. ``None``
    where that is not possible (not root, no ``unshare``)."""
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return None
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode == 77:  # the script could not mount: no CAP_SYS_ADMIN here
        return None
    if proc.returncode != 0:
        raise RuntimeError(f"unshared script failed ({proc.returncode}): {proc.stderr[-2000:]}")
    results = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not results:
        raise RuntimeError(f"unshared script printed no RESULT line: {proc.stdout[-1000:]}")
    return json.loads(results[-1])


# Runs inside the namespace: mount, then use the store through a real shell.
UNSHARED_PRELUDE = """
import json, os, subprocess, sys
from pathlib import Path
import subchat_magics.testing.reliability as h
def mount(*args):
    if subprocess.run(["mount", *args], capture_output=True).returncode != 0:
        sys.exit(77)
h.child_env()
from IPython.core.interactiveshell import InteractiveShell
ip = InteractiveShell.instance()
ip.run_cell("%load_ext subchat_magics", store_history=False)
ip.run_cell("%config SubchatMagics.backend = 'echo'", store_history=False)
"""


def unshared_script(body: str, **values: Any) -> str:
    return UNSHARED_PRELUDE + body.format(**values)


def tree_problems(store: Path) -> list[str]:
    """Structural problems of a store whatever its content: integrity, orphans, one root,
    each chat's messages numbered 0..n-1."""
    if not Path(store).exists():
        return []
    conn = sqlite3.connect(str(store))
    try:
        problems = []
        if conn.execute("PRAGMA integrity_check").fetchall() != [("ok",)]:
            problems.append("integrity_check failed")
        if conn.execute("PRAGMA foreign_key_check").fetchall():
            problems.append("foreign_key_check found orphans")
        chats = conn.execute("SELECT id, parent_id, name FROM chats").fetchall()
        ids = {c[0] for c in chats}
        problems += [f"chat {name!r} has no parent" for _id, pid, name in chats
                     if pid is not None and pid not in ids]
        roots = [name for _id, pid, name in chats if pid is None]
        if roots != ["root"]:
            problems.append(f"roots: {roots}")
        for cid, count, top in conn.execute(
                "SELECT chat_id, COUNT(*), MAX(seq) FROM messages GROUP BY chat_id"):
            if top != count - 1:
                problems.append(f"chat {cid}: seq not 0..{count - 1}")
        return problems
    finally:
        conn.close()
