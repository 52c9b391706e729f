"""A known key never leaves the kernel, whole or in part: masked in the message as typed,
in the ``-s`` text, and in every filled-in value (a DataFrame cell, a Series, a long
string cut at 4,000 characters, an ``{item}`` of ``--each``) before anything is cut or laid
out. Checked where a key could go: the loopback server's requests (the real Groq client
sends them), the store file, the exports and the cell's output; any run of 8 of the
key's characters counts as a leak."""

from __future__ import annotations

import json
import random
import sqlite3
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from subchat_magics.backends.registry import registry
from subchat_magics.secrets import PART, forget_secret, mask_keys, register_secret
from subchat_magics.settings import forget_secrets
from subchat_magics.testing import store_rows
from subchat_magics.testing.fakeservers import FakeGroq

pd = pytest.importorskip("pandas")

_rng = random.Random(22)
KEY = "gsk_" + "".join(_rng.choice(string.ascii_letters + string.digits) for _ in range(52))


def parts(key: str) -> list[str]:
    return [key[i:i + PART] for i in range(len(key) - PART + 1)]


def leaks(text: str, key: str = KEY) -> list[str]:
    """The runs of ``PART`` characters of ``key`` found in ``text``."""
    return [p for p in parts(key) if p in text]


@pytest.fixture
def groq(workdir, monkeypatch):
    forget_secrets()
    with FakeGroq(key=KEY) as server:
        monkeypatch.setenv("GROQ_BASE_URL", server.url)
        monkeypatch.setenv("GROQ_API_KEY", KEY)
        yield server
    forget_secrets()
    registry().close()


def outputs(cap) -> str:
    return cap.stdout + cap.stderr + "".join(
        str(v) for out in cap.outputs for v in out.data.values())


def store_text(path) -> str:
    """Every text the store holds, read as another process would (WAL included), and
    the raw bytes of the file and its WAL."""
    conn = sqlite3.connect(str(path))
    try:
        rows = conn.execute("SELECT content, coalesce(provenance, '') FROM messages").fetchall()
        rows += conn.execute("SELECT name, coalesce(system_prompt, '') FROM chats").fetchall()
    finally:
        conn.close()
    raw = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
    return json.dumps(rows) + raw.decode("latin-1")


def test_a_key_in_any_filled_value_the_body_or_the_options_line_never_leaves(shell, groq, workdir):
    ns = shell.ns
    ns["df"] = pd.DataFrame({"name": ["a", "b"], "token": [KEY, f"token={KEY}"]})  # 2nd: cut at 60
    ns["ser"] = pd.Series([f"prefix {KEY} suffix"], name="keys")
    ns["long"] = "a" * 3990 + KEY + "b" * 50  # straddles the 4,000-character cut
    ns["items"] = [f"item with {KEY}", KEY[:30], "plain item"]
    seen = []
    cells = {
        "df": "%%subchat root/df --backend groq\nLook at {df}",
        "series": "%%subchat root/series --backend groq\n{ser}",
        "long": "%%subchat root/long --backend groq\n{long}",
        "typed": f"%%subchat root/typed --backend groq\nmy key is {KEY}, and a part: {KEY[5:20]}",
        "system": f'%%subchat root/sys --backend groq -s "you hold {KEY}"\nhello',
        "each": "%%subchat root/batch --backend groq --each items\nItem: {item}",
    }
    for name, src in cells.items():
        result, cap = shell.run(src)
        assert result.success, (name, cap.stdout, result.error_in_exec)
        out = outputs(cap)
        assert "masked" in out, (name, out)  # the cell says so
        seen.append(out)
    shell.ok("%subchat export root --format md --out export.md")
    shell.ok("%subchat export root --format json --out export.json")
    _, cap = shell.run("%subchat show root/df")
    seen.append(outputs(cap))
    _, cap = shell.run("%subchat tree --text")
    seen.append(outputs(cap))

    bodies = [json.dumps(r.body) for r in groq.chat_requests()]
    assert len(bodies) == 8  # every cell really sent (the batch: 3 rows)
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in groq.chat_requests())
    assert any("***" in b for b in bodies)
    for where, text in [("request", b) for b in bodies] + [
            ("output", o) for o in seen] + [
            ("store", store_text(workdir / "subchats.db")),
            ("export.md", (workdir / "export.md").read_text()),
            ("export.json", (workdir / "export.json").read_text())]:
        assert not leaks(text), (where, leaks(text)[:3])
    # what is not a key survives: the table, the items, the text around the key
    assert "| name | token |" in store_text(workdir / "subchats.db")
    assert "plain item" in "".join(bodies) and "suffix" in "".join(bodies)


def test_a_key_in_a_label_column_is_masked_in_the_scores_the_cell_prints(shell, groq, workdir):
    """--labels prints the confusion table and the disagreeing rows when the batch ends:
    a key among the labels (whole, or cut at the table's column width) is masked there as
    in the store and in show."""
    shell.ns["df"] = pd.DataFrame({"q": ["a", "b"], "gold": [KEY, f"x {KEY}"]})
    result, cap = shell.run("%%subchat root/l --backend groq --each df --labels gold --as o\nSay {q}")
    assert result.success, (cap.stdout, result.error_in_exec)
    out = outputs(cap)
    assert "accuracy 0/2" in out and "confusion" in out
    _, shown = shell.run("%subchat show root/l/df")
    for where, text in [("cell", out), ("show", outputs(shown)),
                        ("store", store_text(workdir / "subchats.db"))]:
        assert not leaks(text), (where, leaks(text)[:3])


def test_a_key_typed_on_the_key_line_is_never_echoed(shell, workdir):
    """%subchat key asks for the key hidden; a key typed on the line instead (after the
    backend's name, or in its place) is not a known key yet, so no masking would catch
    it: the refusal must not repeat what was typed."""
    forget_secrets()
    fresh = "gsk_" + "Zq9" * 18  # (no key the session knows)
    for line in (f"%subchat key groq {fresh}", f"%subchat key {fresh}",
                 f"%subchat key groq --x {fresh}"):
        msg = shell.fails(line)
        assert not leaks(msg, fresh), (line, msg)
        assert "%subchat key" in msg and "groq" in msg and "\n" not in msg, msg
    assert "paste it at the hidden prompt" in shell.fails(f"%subchat key groq {fresh}")


def test_a_key_as_a_row_label_never_names_a_row_chat(shell, groq, workdir):
    """A batch's rows are named after their labels (a dict's keys, a DataFrame's index):
    a label holding a key would put it into the chats table, the tree and every export,
    so such a batch's rows are named by position, as clashing labels are."""
    shell.ns["d"] = {KEY: "a", "other": "b"}
    shell.ns["df"] = pd.DataFrame({"q": ["a", "b"]}, index=[f"id-{KEY[:20]}", "x"])
    shell.ok("%%subchat root/a --backend groq --each d --as o\nSay {item}")
    shell.ok("%%subchat root/b --backend groq --each df --as p\nSay {q}")
    _, tree = shell.run("%subchat tree --text")
    shell.ok("%subchat export root --format json --out export.json")
    names = [n for (n,) in store_rows(workdir / "subchats.db", "SELECT name FROM chats")]
    assert {"0", "1"} <= set(names) and "other" not in names
    assert list(shell.ns["o"]) == ["Hello from the fake server."] * 2
    for where, text in [("store", store_text(workdir / "subchats.db")), ("tree", outputs(tree)),
                        ("export.json", (workdir / "export.json").read_text())]:
        assert not leaks(text), (where, leaks(text)[:3])


def test_a_key_entered_in_the_session_or_registered_by_a_plugin_is_masked_in_part(shell, workdir):
    plugin_key = "plug-" + "Zq8" * 12
    register_secret(plugin_key)
    try:
        shell.ns["note"] = "x" * 3995 + plugin_key  # the cut falls inside the key
        out = shell.ok("%%subchat root --backend echo\n{note}")
        assert "masked in {note}" in out
        stored = store_text(workdir / "subchats.db")
        assert not leaks(stored, plugin_key) and not leaks(out, plugin_key)
    finally:
        forget_secret(plugin_key)


# -- the rule itself, over random keys and texts ----------------------------------------------
alphabet = string.ascii_letters + string.digits + "_-"
keys = st.text(alphabet, min_size=20, max_size=80)
filler = st.text(string.printable, max_size=60)


@settings(max_examples=200, deadline=None)
@given(key=keys, pieces=st.lists(st.tuples(filler, st.integers(0, 80), st.integers(PART, 80)),
                                 min_size=1, max_size=6), tail=filler)
def test_no_run_of_eight_characters_of_a_known_key_survives_masking(key, pieces, tail):
    register_secret(key)
    try:
        text = "".join(f + key[a:a + n] for f, a, n in pieces) + tail
        masked, count = mask_keys(text)
    finally:
        forget_secret(key)  # a random key must not mask other tests' text
    assert not leaks(masked, key)
    assert (count > 0) == bool(leaks(text, key))


@settings(max_examples=100, deadline=None)
@given(text=st.text(string.ascii_lowercase + " \n", max_size=300))
def test_text_with_no_part_of_a_key_is_left_as_it_was(text):
    register_secret(KEY)
    try:
        assert mask_keys(text) == (text, 0) or leaks(text)
    finally:
        forget_secret(KEY)


def test_a_key_a_model_writes_into_a_tool_call_is_stored_and_shown_masked(shell, groq, workdir):
    """Provenance is masked like content: a tool call whose arguments hold the key (a
    model can write anything there) reaches neither the store nor show -p."""
    from subchat_magics.session import default_session

    shell.ok("%%subchat root/p --backend groq\nhello")  # the key is known from here on
    tree = default_session().tree
    chat = tree.get("root/p")
    _, reply = tree.begin_turn(chat, "call it", "groq")
    calls = [{"id": "c1", "name": "echo_it", "arguments": {"s": KEY, "part": KEY[10:30]}}]
    msg = tree.finish_reply(chat, reply, "", "complete", {"tool_calls": calls})
    assert KEY[10:30] not in json.dumps(msg.provenance)
    assert msg.provenance["tool_calls"][0]["name"] == "echo_it"  # the rest kept as it was
    text = store_text(workdir / "subchats.db")
    assert KEY[:12] not in text and KEY[20:32] not in text
    assert KEY[10:30] not in outputs(shell.run("%subchat show root/p -p")[1])


def _recase(text: str, flips: list[bool]) -> str:
    return "".join(ch.swapcase() if flip else ch for ch, flip in zip(text, flips + [False] * len(text)))


def ci_leaks(text: str, key: str) -> list[str]:
    """The runs of ``PART`` characters of ``key`` found in ``text`` in any casing."""
    low = text.lower()
    return [p for p in parts(key.lower()) if p in low]


@settings(max_examples=200, deadline=None)
@given(key=keys, pieces=st.lists(st.tuples(filler, st.integers(0, 80), st.integers(PART, 80),
                                           st.sampled_from(["upper", "lower", "swap", "mixed"]),
                                           st.lists(st.booleans(), max_size=80)),
                                 min_size=1, max_size=6), tail=filler)
def test_no_run_of_a_key_in_any_casing_at_any_position_survives_masking(key, pieces, tail):
    """A key written in upper case (or any mix of cases) is still the key: the trial found
    ``key.upper()`` left 12 characters in the clear."""
    register_secret(key)
    try:
        cased = []
        for f, a, n, how, flips in pieces:
            part = key[a:a + n]
            part = {"upper": part.upper(), "lower": part.lower(), "swap": part.swapcase(),
                    "mixed": _recase(part, flips)}[how]
            cased.append(f + part)
        text = "".join(cased) + tail
        masked, count = mask_keys(text)
    finally:
        forget_secret(key)
    assert not ci_leaks(masked, key)
    assert (count > 0) == bool(ci_leaks(text, key))


def test_a_key_typed_in_upper_case_is_masked_whole_in_the_cell_and_the_store(shell, groq, workdir):
    shell.ns["up"] = KEY.upper()
    out = outputs(shell.run("%%subchat root --backend echo\nspaced {up} and " + KEY.swapcase())[1])
    assert not ci_leaks(out, KEY), ci_leaks(out, KEY)[:3]
    assert not ci_leaks(store_text(workdir / "subchats.db"), KEY)
