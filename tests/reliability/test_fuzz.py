"""Whatever is typed into a cell, the only errors that reach the user are our one-line
``UsageError``s, and the tree stays valid.

Hypothesis writes ``%%subchat`` lines (flags, values, chat paths), cell bodies (braces,
huge, empty, control characters, binary-ish and unpaired-surrogate text) and ``%subchat``
subcommands, and runs them through one real ``InteractiveShell`` (like a notebook where
every cell is run in turn). ``SUBCHAT_FUZZ_EXAMPLES`` raises the number of cases
(``bench/reliability.py`` runs 2,000); CI runs ~200.

Cases it found once (getpass without input, unencodable export names, malformed exports)
are kept below as plain tests.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from IPython.core.error import UsageError

from subchat_magics.backends.registry import registry
from subchat_magics.magics import SUBCOMMANDS
from subchat_magics.testing import reliability as h
from subchat_magics.testing.fakeservers import FakeGroq, FakeOllama, FakeOpenAI

EXAMPLES = int(os.environ.get("SUBCHAT_FUZZ_EXAMPLES", "100"))  # per test; two tests
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize="SUBCHAT_FUZZ_SEED" not in os.environ,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.large_base_example])
# characters that end a line for IPython (str.splitlines): a magic's line cannot hold them
LINE_BREAKS = "".join(c for c in map(chr, range(0x3000)) if len(f"a{c}b".splitlines()) > 1)
COUNTS = {"cases": 0, "usage_errors": 0}

# -- text -------------------------------------------------------------------------------------
any_char = st.characters(codec=None, exclude_characters=LINE_BREAKS)
surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
control = st.characters(max_codepoint=0x1F, exclude_characters=LINE_BREAKS)
words = st.sampled_from(["root", "a", "b", "physics", "-x", "..", ".", "{x}", "{{", "}}", "$x",
                         "--", "-", "1", "0", "nan", "inf", "-1", "é", "漢字", "x" * 101, "a b", "'"])
line_text = st.one_of(
    st.text(any_char, max_size=30),
    st.text(st.one_of(any_char, surrogates, control), max_size=12),
    words,
)
path = st.one_of(
    st.lists(st.one_of(words, st.text(st.sampled_from("abc_-.é/ "), max_size=6)), min_size=1,
             max_size=5).map("/".join),
    line_text,
)
number = st.one_of(st.integers(-10, 10**20).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr), words)
body = st.one_of(
    st.text(max_size=200),  # any unicode, newlines included
    st.text(st.sampled_from("{}[]()$\\'\"%`#\n\t x"), max_size=80),  # braces and escapes
    st.sampled_from(["", " ", "\n\n  \n", "\t", "{x}", "{{x}}", "{In}", "{x} {{ {y} }}", "}}{{",
                     '{"a": {"b": [1, {2}]}}', "def f():\n    return {k: v for k, v in x}"]),
    st.binary(max_size=200).map(lambda b: b.decode("utf-8", "surrogateescape")),  # binary-ish
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.text(st.one_of(control, surrogates, any_char), max_size=50),
    st.sampled_from([100_000, 1_000_000]).map(lambda n: ("huge " * n)[:n]),  # huge
)

def _parser_flags() -> dict[str, object]:
    """Every flag of ``%%subchat``, read from its parser (a new flag is fuzzed without
    editing this file), with how its value is drawn: a type, choices, or none."""
    from subchat_magics.magics import SubchatMagics

    flags: dict[str, object] = {}
    for action in SubchatMagics.subchat.parser._actions:
        for flag in action.option_strings:
            if action.nargs == 0:
                flags[flag] = None  # a switch
            elif action.choices:
                flags[flag] = list(action.choices)
            else:
                flags[flag] = action.type or str
    return flags


PARSER_FLAGS = _parser_flags()
# the backends' own options (their declarations), e.g. Ollama's --num-ctx
OWN_FLAGS = sorted({o.flag for n in registry().names()
                    for o in registry().backend_class(n).own_options.values()})
FLAGS = sorted(set(PARSER_FLAGS) | set(OWN_FLAGS)) + ["-h", "--help", "--", "-"]
# every backend: echo, and the loopback Ollama, Groq and OpenAI servers (remote_servers)
BACKENDS = st.sampled_from(["echo", "echo", "ECHO", " echo ", "ollama", "groq", "openai",
                            "vllm", "nope", "", "auto"])
# every setting the README and the guide (docs/) document that names no host, key or file
# (those would send traffic elsewhere or move the store): drawn good and bad
_DOCUMENTED = "".join(p.read_text(encoding="utf-8") for p in [
    Path(__file__).parents[2] / "README.md", *sorted((Path(__file__).parents[2] / "docs").glob("*.md"))])
SETTINGS = sorted({m for m in re.findall(r"\b(?:SUBCHAT|OLLAMA|GROQ|OPENAI|LLM)_[A-Z_]+", _DOCUMENTED)
                   if not re.search(r"HOST|URL|KEY|STORE|VLLM_MODEL", m)})
SETTING_VALUES = st.sampled_from(["", "0", "-1", "abc", "nan", "inf", "1e400", "0.0001", "5",
                                  "300", "8192", "echo", "auto", "nope", "model-x"])


def _value_for(draw, flag: str) -> list[str]:
    kind = PARSER_FLAGS.get(flag, int)  # own options are typed: ints so far
    if flag in ("--backend", "-b"):
        return [draw(BACKENDS)]
    if kind is None:
        return []
    if isinstance(kind, list):
        return [draw(st.one_of(st.sampled_from(kind), line_text))]
    if kind in (int, float):
        return [draw(number)]
    if flag in ("--children", "--temperatures"):
        return [",".join(draw(st.lists(st.one_of(words, number), max_size=4)))]
    if flag in ("--each", "--choice", "--json"):  # a variable of the notebook, or not
        return [draw(st.one_of(st.sampled_from(["qs", "labels", "schema"]), line_text))]
    return [draw(line_text)]


@st.composite
def subchat_line(draw):
    """A %%subchat line: maybe a path, then flags with values drawn to fit them or not."""
    out = []
    if draw(st.booleans()):
        out.append(draw(path))
    for _ in range(draw(st.integers(0, 5))):
        flag = draw(st.sampled_from(FLAGS))
        out.append(flag)
        out += _value_for(draw, flag)
    if "--backend" not in out and "-b" not in out:
        out += ["--backend", draw(BACKENDS)]
    return _join(draw, out)


@st.composite
def settings_env(draw):
    """Some documented settings, each set to a value drawn good or bad."""
    chosen = draw(st.lists(st.sampled_from(SETTINGS), max_size=3, unique=True)) if SETTINGS else []
    env = {name: draw(SETTING_VALUES) for name in chosen}
    if env.get("SUBCHAT_ECHO_DELAY") in ("5", "300", "8192", "inf", "1e400"):
        env["SUBCHAT_ECHO_DELAY"] = "0.0001"  # seconds a word: a valid slow value only waits
    return env


def _join(draw, tokens):
    from shlex import quote

    return " ".join(quote(t) if draw(st.booleans()) else t for t in tokens)


SUB_FLAGS = ["--text", "-p", "--provenance", "--own", "--format", "md", "json", "--out", "--into",
             "--force", "--help"]


@st.composite
def subchat_command(draw):
    """A %subchat line: a known subcommand (or not) and arguments."""
    names = [n for n in SUBCOMMANDS if n != "key"]  # key asks for input: tested on its own below
    cmd = draw(st.one_of(st.sampled_from(names), line_text))
    args = draw(st.lists(st.one_of(path, st.sampled_from(SUB_FLAGS), line_text), max_size=4))
    return _join(draw, [cmd, *_safe_files(args)])


def _safe_files(args):
    """Keep files that export writes and import reads inside the test's folder."""
    out = []
    for i, a in enumerate(args):
        after_out = i and re.fullmatch(r"--o(u(t)?)?", args[i - 1] or "")
        if after_out or re.match(r"--o(u(t)?)?=", a) or a.startswith(("/", "~")):
            a = "f_" + re.sub(r"[/~.]", "_", a)
        out.append(a)
    return out


# -- running ----------------------------------------------------------------------------------
def _rows(store):
    """Every chat and message row of the store (empty if there is none yet): equal before
    and after means the cell changed nothing."""
    import sqlite3

    if not store.exists():
        return [], []
    conn = sqlite3.connect(store)
    try:
        return (conn.execute("SELECT * FROM chats ORDER BY id").fetchall(),
                conn.execute("SELECT * FROM messages ORDER BY id").fetchall())
    finally:
        conn.close()


def _run(shell, source):
    """Run one cell: it succeeds, or fails with a one-line UsageError. A refusal changes
    nothing; a backend that failed while answering (after the send) may only have added
    its attempt, marked: no row that existed is changed or gone."""
    store = Path.cwd() / "subchats.db"  # the fixtures' working folder
    before = _rows(store)
    result, cap = shell.run(source)
    err = result.error_before_exec or result.error_in_exec
    COUNTS["cases"] += 1
    if err is not None:
        assert isinstance(err, UsageError), f"{source[:300]!a} raised {type(err).__name__}: {err!a}"
        msg = str(err)
        assert msg.startswith(("%%subchat", "%subchat")) and "Traceback" not in msg, msg[:300]
        after = _rows(store)
        if after != before:
            chats, messages = after
            assert set(before[0]) <= set(chats) and set(before[1]) <= set(messages), \
                f"{source[:300]!a} failed ({msg[:200]!a}) and changed rows that existed"
            new = [m for m in messages if m not in set(before[1])]
            assert any(m[3] == "assistant" and m[5] != "complete" for m in new), \
                f"{source[:300]!a} failed ({msg[:200]!a}) but stored more than a marked attempt"
        COUNTS["usage_errors"] += 1
    return err


NOT_LOADED = "%%subchat: no vLLM model is loaded"


def _bad_input(shell, workdir, source):
    """A cell that must fail with one clear UsageError and leave every row as it was."""
    before = _rows(workdir / "subchats.db")
    err = _run(shell, source)
    assert isinstance(err, UsageError), f"{source[:300]!a} succeeded; bad input must be refused"
    assert _rows(workdir / "subchats.db") == before
    return str(err)


def _tree_valid(workdir):
    problems = h.tree_problems(workdir / "subchats.db")
    assert problems == [], problems


@pytest.fixture
def fuzz_shell(shell, workdir, monkeypatch):
    monkeypatch.setenv("HOME", str(workdir))  # '~' in a fuzzed file name stays in here
    with FakeOllama() as ollama, FakeGroq() as groq, FakeOpenAI() as openai:
        monkeypatch.setenv("OLLAMA_HOST", ollama.url)
        monkeypatch.setenv("GROQ_BASE_URL", groq.url)
        monkeypatch.setenv("GROQ_API_KEY", groq.key)
        monkeypatch.setenv("OPENAI_BASE_URL", openai.base_url)
        shell.ns.update(qs=["a", "b"], labels=["yes", "no"],
                        schema={"type": "object", "properties": {"a": {"type": "integer"}}})
        from subchat_magics.session import default_session

        _ = default_session().tree  # the store (and its root) exist before the first case: a
        yield shell  # refusal is then judged on the rows it wrote, not on opening the store
    registry().close()
    _report()


def _with_settings(env: dict[str, str]):
    """Set ``env`` in os.environ for one case; returns the undo."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)

    def undo() -> None:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return undo


def _report():
    out = os.environ.get("SUBCHAT_FUZZ_REPORT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(COUNTS) + "\n")
    COUNTS.update(cases=0, usage_errors=0)


@FUZZ
@given(line=subchat_line(), text=body, env=settings_env())
def test_any_subchat_cell_is_a_reply_or_a_usage_error(fuzz_shell, workdir, line, text, env):
    undo = _with_settings(env)
    try:
        _run(fuzz_shell, f"%%subchat {line}\n{text}")
    finally:
        undo()
    _tree_valid(workdir)


@FUZZ
@given(commands=st.lists(subchat_command(), min_size=1, max_size=4), line=subchat_line())
def test_any_subchat_command_is_output_or_a_usage_error(fuzz_shell, workdir, commands, line):
    _run(fuzz_shell, f"%%subchat {line}\nsomething to branch from")  # a tree to work on
    for command in commands:
        _run(fuzz_shell, f"%subchat {command}")
    _tree_valid(workdir)


# -- found by the fuzzer, in code this suite does not own (fixes proposed in the report) ------
KEY_WITHOUT_INPUT = """
from IPython.core.interactiveshell import InteractiveShell
ip = InteractiveShell.instance()
ip.run_cell("%load_ext subchat_magics", store_history=False)
result = ip.run_cell("%subchat key groq", store_history=False)
print("RESULT", type(result.error_before_exec or result.error_in_exec).__name__)
"""


def test_key_without_an_input_is_a_usage_error(workdir):
    import subprocess
    import sys

    # no controlling terminal and no stdin, as in a kernel: getpass cannot ask (and a test
    # run from a terminal cannot hang on it)
    proc = subprocess.run([sys.executable, "-c", KEY_WITHOUT_INPUT], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60, start_new_session=True)
    assert "RESULT UsageError" in proc.stdout, proc.stdout[-500:] + proc.stderr[-500:]


def test_export_to_an_unencodable_file_name_is_a_usage_error(shell, workdir):
    shell.ok("%%subchat\nhello")
    _bad_input(shell, workdir, "%subchat export --out \ud800.md")
    assert not list(workdir.glob("*.md"))


@pytest.mark.parametrize("data", [
    pytest.param({"chats": [1]}, id="chat-not-a-dict"),
    pytest.param({"root": 5, "chats": []}, id="root-not-a-str"),
    pytest.param({"root": "root/z", "chats": [{"path": "root/z", "fork_seq": "x"}]}, id="fork-seq-not-a-number"),
    pytest.param({"root": "root/z", "chats": [{"path": "root/z", "messages": [{"content": "x"}]}]},
                 id="no-role"),
    pytest.param({"root": "root/z", "chats": [{"path": "root/z", "messages": "abc"}]}, id="messages-not-a-list"),
    # the store refuses these itself
    pytest.param({"root": "root/z", "chats": [{"path": "root/z", "messages": [
        {"role": "bot", "content": "x"}]}]}, id="unknown-role"),
    pytest.param({"root": "root/z", "chats": [{"path": "root/z", "messages": [
        {"role": "user", "content": "\ud800"}]}]}, id="unpaired-surrogate"),
])
def test_importing_a_malformed_export_is_a_usage_error(shell, workdir, data):
    from subchat_magics.render import EXPORT_FORMAT

    shell.ok("%%subchat\nalready here")  # a tree that must stay as it is
    (workdir / "bad.json").write_text(json.dumps({"format": EXPORT_FORMAT, **data}))
    _bad_input(shell, workdir, "%subchat import bad.json")
    _tree_valid(workdir)


def test_a_backend_that_is_not_loaded_is_refused_before_the_tree_is_touched(shell, workdir):
    shell.ok("%%subchat\nalready here")
    msg = _bad_input(shell, workdir, "%%subchat --backend vllm\nhello")
    assert msg.startswith(NOT_LOADED)
