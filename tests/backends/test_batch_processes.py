"""Rows are claimed in the store (issue 20): two real processes resuming one batch on a
paced loopback server never send a row twice, and a process killed mid-batch leaves claims
that the next run takes over. Real processes, the real OpenAI client, a loopback server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

from subchat_magics.testing import store_rows
from subchat_magics.testing.fakeservers import FakeOpenAI

RUN = (
    "import sys\n"
    "from subchat_magics import open_tree\n"
    "tree = open_tree(sys.argv[1])\n"
    "r = tree.batch('root', [f'q{i}' for i in range(int(sys.argv[2]))], "
    "lambda item, i: f'say {item}', name='qs', backend='openai', concurrency=8)\n"
    "print(r.summary())\n")


def _env(server) -> dict[str, str]:
    env = dict(os.environ, OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY="sk-test-1234567890",
               OPENAI_MODEL="other-model", PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("LLM_BACKEND", None)
    return env


def test_two_processes_resuming_one_batch_never_send_a_row_twice(tmp_path):
    store = tmp_path / "s.db"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with FakeOpenAI() as server:
        server.configure(reply="ok", delay=0.005)
        env = _env(server)
        env["PYTHONPATH"] = root + os.pathsep + env["PYTHONPATH"]
        subprocess.run([sys.executable, "-c", RUN, str(store), "1"], env=env, check=True,
                       capture_output=True)  # the store and the batch chat exist (q0 done)
        first = len(server.chat_requests())
        procs = [subprocess.Popen([sys.executable, "-c", RUN, str(store), "200"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        assert all(" 0 failed" in o for o, _ in outs), outs
        sent = Counter(r.body["messages"][-1]["content"]
                       for r in server.chat_requests()[first:])
    assert max(sent.values()) == 1, [k for k, v in sent.items() if v > 1][:5]
    assert len(sent) == 199 and "say q0" not in sent
    users = store_rows(store, "SELECT content, COUNT(*) FROM messages WHERE role = 'user' "
                              "GROUP BY content")
    assert len(users) == 200 and all(n == 1 for _, n in users)  # every row once in the store


def test_a_killed_process_leaves_claims_the_next_run_takes_over(tmp_path):
    store = tmp_path / "s.db"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with FakeOpenAI() as server:
        server.configure(reply="a b c d e f g h", delay=0.05)  # ~0.4 s a row
        env = _env(server)
        env["PYTHONPATH"] = root + os.pathsep + env["PYTHONPATH"]
        p = subprocess.Popen([sys.executable, "-c", RUN, str(store), "40"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while time.time() < deadline:  # until some rows are claimed and in flight
            if store.exists() and store_rows(
                    store, "SELECT COUNT(*) FROM messages WHERE role = 'assistant' AND "
                           "status = 'interrupted' AND provenance LIKE '%owner%'")[0][0] >= 4:
                break
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        claimed = store_rows(store, "SELECT chat_id FROM messages WHERE role = 'assistant' AND "
                                    "status = 'interrupted' AND provenance LIKE '%owner%'")
        assert claimed
        server.configure(reply="done", delay=0)
        out = subprocess.run([sys.executable, "-c", RUN, str(store), "40"], env=env,
                             capture_output=True, text=True, check=True).stdout
    assert "40 items, 40 done" in out and "another kernel" not in out
    # the dead process's cut attempts are kept; each of those rows has a new attempt-2
    for (cid,) in claimed:
        assert store_rows(store, "SELECT COUNT(*) FROM chats WHERE parent_id = ? AND "
                                 "name = 'attempt-2'", (cid,))[0][0] == 1


VOTE_RUN = (
    "import sys\n"
    "from IPython.core.interactiveshell import InteractiveShell\n"
    "ip = InteractiveShell.instance()\n"
    "ip.run_cell('%load_ext subchat_magics')\n"
    "ip.user_ns['qs'] = [f'q{i}' for i in range(int(sys.argv[1]))]\n"
    "r = ip.run_cell(sys.argv[2])\n"
    "sys.exit(0 if r.success else 1)\n")


def test_two_kernels_running_one_vote_or_compare_batch_never_send_a_row_twice(tmp_path):
    """--each --vote K and --each --compare take the plain batch's claims: two real
    InteractiveShells (two processes) running the same cell on one store send each row's
    samples (each model's message) once between them."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cells = {"vote": ("%%subchat root --each qs -b openai --vote 3 --concurrency 6\nsay {item}", 3),
             "compare": ("%%subchat root/c --each qs --compare openai,openai:Qwen/Qwen3-0.6B "
                         "--concurrency 4\nsay {item}", 2)}
    for kind, (cell, per_row) in cells.items():
        store = tmp_path / f"{kind}.db"
        with FakeOpenAI() as server:
            server.configure(reply="a b c d", delay=0.02)
            env = _env(server)
            env["PYTHONPATH"] = root + os.pathsep + env["PYTHONPATH"]
            env["SUBCHAT_STORE"] = str(store)
            subprocess.run([sys.executable, "-c", VOTE_RUN, "1", cell], env=env, check=True,
                           capture_output=True)  # the store and the batch chat exist (q0 done)
            first = len(server.chat_requests())
            procs = [subprocess.Popen([sys.executable, "-c", VOTE_RUN, "30", cell], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for _ in range(2)]
            outs = [p.communicate(timeout=120) for p in procs]
            assert all(p.returncode == 0 for p in procs), outs
            sent = Counter(r.body["messages"][-1]["content"]
                           for r in server.chat_requests()[first:])
        assert set(sent.values()) == {per_row}, (kind, [k for k, v in sent.items() if v != per_row][:5])
        assert len(sent) == 29 and "say q0" not in sent, kind
        assert all(" 0 failed" in o for o, _ in outs), outs
        users = store_rows(store, "SELECT content, COUNT(*) FROM messages WHERE role = 'user' "
                                  "GROUP BY content")
        # a vote's row: its verdict exchange and K samples; a comparison's: each model's
        assert len(users) == 30 and {n for _, n in users} == {per_row + (kind == "vote")}, users


OTHER_KERNEL = (
    "import sys\n"
    "from IPython.core.interactiveshell import InteractiveShell\n"
    "ip = InteractiveShell.instance()\n"
    "ip.run_cell('%load_ext subchat_magics')\n"
    "ip.user_ns['qs'] = [f'q{i}' for i in range(int(sys.argv[1]))]\n"
    "sys.exit(0 if ip.run_cell(sys.argv[2]).success else 1)\n")


def test_rows_another_kernel_claims_during_the_run_are_named_with_the_way_to_collect_them(
        shell, workdir):
    """Two kernels on one batch: the rows the other kernel claimed between this one's
    planning and its sending are counted 'sent by another kernel' and are None in --as;
    the summary said nothing of how to get them (only rows found claimed at planning had
    the note): the note now names them all and says to run the cell again."""
    from subchat_magics.session import default_session

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, LLM_BACKEND="echo",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cell = "%%subchat root --each qs --as out\nsay {item}"
    shell.ok("qs = [f'q{i}' for i in range(20)]")

    def other_kernel(event, data):  # planned here, nothing sent yet: the other one runs it all
        if event == "batch-start":
            subprocess.run([sys.executable, "-c", OTHER_KERNEL, "20", cell], env=env,
                           cwd=workdir, check=True, capture_output=True, timeout=120)

    unsubscribe = default_session().subscribe(other_kernel)
    try:
        out = shell.ok(cell)
    finally:
        unsubscribe()
    assert "0 done, 0 failed, 20 sent by another kernel" in out, out
    assert shell.ns["out"] == [None] * 20
    assert "note: 20 row(s) are being answered by another kernel now; run the cell again" in out
    assert "--as holds None for them until then" in out
    users = store_rows(workdir / "subchats.db", "SELECT COUNT(*) FROM messages WHERE role = "
                                                 "'user'")
    assert users == [(20,)]  # every row sent once, by the other kernel
    again = shell.ok(cell)  # ... and collected by running the cell again
    assert "20 done (20 reused)" in again and "another kernel" not in again
    assert shell.ns["out"] == [f"echo (1 messages): say q{i}" for i in range(20)]
