"""Structured output on the offline echo backend and through a real shell: --json, --choice,
--regex, --best-effort; the line as typed; bad input refused before the tree is touched."""

from __future__ import annotations

import json

import pytest

from subchat_magics import structured
from subchat_magics.errors import InvalidInput
from subchat_magics.structured import InvalidOutput
from subchat_magics.testing import store_rows

SCHEMA = {"type": "object",
          "properties": {"label": {"enum": ["pos", "neg"]}, "score": {"type": "integer",
                                                                       "minimum": 1}},
          "required": ["label", "score"], "additionalProperties": False}
# what echo answers to SCHEMA (its validity is checked below, with the hard cases)
ECHOED = json.loads(structured.json_schema(SCHEMA).example())


def rows(workdir):
    db = workdir / "subchats.db"
    if not db.exists():
        return None
    return (store_rows(db, "SELECT id, parent_id, name, system_prompt FROM chats ORDER BY id"),
            store_rows(db, "SELECT id, chat_id, seq, role, content, status FROM messages ORDER BY id"))


# -- the constraint itself ------------------------------------------------------------------
def test_each_kind_parses_what_satisfies_it_and_says_why_not_otherwise():
    c = structured.choice("yes, no")
    assert c.parse("yes") == "yes"
    with pytest.raises(InvalidOutput, match="not one of yes, no"):
        c.parse("maybe")
    r = structured.regex(r"[0-9]{3}")
    assert r.parse("123") == "123"
    with pytest.raises(InvalidOutput, match="does not match"):
        r.parse("1234")
    j = structured.json_schema(SCHEMA)
    assert j.parse('{"label": "pos", "score": 2}') == {"label": "pos", "score": 2}
    with pytest.raises(InvalidOutput, match="not JSON"):
        j.parse('{"label": ')
    with pytest.raises(InvalidOutput, match="'maybe' is not one of"):
        j.parse('{"label": "maybe", "score": 2}')


def test_the_answer_after_a_thinking_block_is_what_is_parsed():
    assert structured.choice("a,b").parse("<think>\nhmm, a or b\n</think>\n\nb") == "b"
    assert structured.json_schema().parse('<think>x</think>{"k": 1}') == {"k": 1}


def test_every_example_satisfies_its_constraint():
    cases = [structured.choice(["x y", "z"]), structured.regex(r"[A-Z]{2}-\d{4}"),
             structured.regex(r"(yes|no)"), structured.json_schema(SCHEMA),
             structured.json_schema({"type": "array", "items": {"type": "string"}, "minItems": 2}),
             structured.json_schema()]
    for c in cases:
        c.parse(c.example())


# the hard cases: formats, negative bounds, uniqueness, multiples, a pattern with a length,
# negation; every one a schema the validator accepts
HARD_SCHEMAS = [
    {"type": "number", "maximum": -5},
    {"type": "integer", "exclusiveMaximum": -3, "minimum": -1000},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 3},
     "uniqueItems": True, "minItems": 3},
    {"type": "integer", "multipleOf": 7, "minimum": 10},
    {"type": "number", "multipleOf": 0.25, "exclusiveMaximum": -0.5},
    {"type": "string", "pattern": "^[A-Z]{2}-[0-9]+$", "minLength": 6},
    {"not": {"type": "string"}},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                               "uniqueItems": True, "minItems": 2}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "string", "format": "date-time"},
    {"type": "object", "properties": {"n": {"type": "integer", "not": {"multipleOf": 2}},
                                      "s": {"type": "string", "minLength": 3, "maxLength": 3}},
     "required": ["n", "s"]},
]
HARD_PATTERNS = [r"(?i)hello", r"[^abc]x", r"[A-Z]{2}-\d{4}", r"(yes|no)", r"\d{3,5}",
                 r"[a-z]+@[a-z]+\.com", r"(?:ab)+c?", r"x{2}\s\w+"]


@pytest.mark.parametrize("schema", HARD_SCHEMAS, ids=lambda s: json.dumps(s)[:40])
def test_the_echo_example_of_every_hard_schema_is_valid(schema):
    from jsonschema import Draft202012Validator, FormatChecker

    c = structured.json_schema(schema)
    value = c.parse(c.example())  # the validator the reply meets, as any backend's
    assert Draft202012Validator(schema, format_checker=FormatChecker()).is_valid(value)
    assert c.example() == c.example()


@pytest.mark.parametrize("pattern", HARD_PATTERNS)
def test_the_echo_example_of_every_hard_pattern_matches(pattern):
    import re

    c = structured.regex(pattern)
    text = c.example()
    assert re.fullmatch(pattern, text) and c.parse(text) == text
    assert text.isprintable()


def test_a_pydantic_model_with_datetime_and_uuid_fields_gets_a_valid_instance():
    pydantic = pytest.importorskip("pydantic")
    import datetime
    import uuid

    class Event(pydantic.BaseModel):
        id: uuid.UUID
        at: datetime.datetime
        day: datetime.date
        delay: float = pydantic.Field(le=-1.5)
        tags: list[str] = pydantic.Field(min_length=2)

    c = structured.json_schema(Event)
    event = c.parse(c.example())
    assert isinstance(event, Event) and isinstance(event.id, uuid.UUID) and event.delay <= -1.5


def test_echo_examples_are_the_same_in_another_process():
    import subprocess
    import sys

    code = ("import json, sys; from subchat_magics import structured; "
            "print(json.dumps([structured.json_schema(s).example() for s in json.loads(sys.argv[1])]"
            " + [structured.regex(p).example() for p in json.loads(sys.argv[2])]))")
    args = [json.dumps(HARD_SCHEMAS[:4]), json.dumps(HARD_PATTERNS[:3])]
    runs = [subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                           check=True).stdout for _ in range(2)]
    here = [structured.json_schema(s).example() for s in HARD_SCHEMAS[:4]] + \
        [structured.regex(p).example() for p in HARD_PATTERNS[:3]]
    assert json.loads(runs[0]) == json.loads(runs[1]) == here


def test_an_invalid_reply_names_every_failing_field():
    c = structured.json_schema(SCHEMA)
    with pytest.raises(InvalidOutput) as err:
        c.parse('{"label": "maybe", "score": 0, "extra": 1}')
    msg = str(err.value)
    assert "(at label)" in msg and "(at score)" in msg and "'extra' was unexpected" in msg, msg


def test_an_invalid_pydantic_reply_names_every_failing_field():
    pydantic = pytest.importorskip("pydantic")

    class Row(pydantic.BaseModel):
        name: str
        age: int

    # the schema lets the types through only as far as jsonschema checks them: pydantic's
    # own errors are told field by field too
    c = structured.json_schema(Row)
    with pytest.raises(InvalidOutput) as err:
        c.parse('{"name": 3, "age": "old"}')
    msg = str(err.value)
    assert "(at name)" in msg and "(at age)" in msg, msg


def test_a_pydantic_model_gives_an_instance():
    pydantic = pytest.importorskip("pydantic")

    class Row(pydantic.BaseModel):
        name: str
        age: int

    c = structured.json_schema(Row)
    value = c.parse('{"name": "Ada", "age": 36}')
    assert isinstance(value, Row) and value.age == 36
    assert c.provenance()["model"] == "Row"
    assert isinstance(c.parse(c.example()), Row)


@pytest.mark.parametrize("build, message", [
    (lambda: structured.json_schema({"type": "objekt"}), "not a valid JSON Schema"),
    (lambda: structured.json_schema([1, 2]), "takes a JSON Schema"),
    (lambda: structured.choice(""), "at least one choice"),
    (lambda: structured.choice("a,a"), "twice"),
    (lambda: structured.regex("[0-9"), "does not compile"),
    (lambda: structured.from_options(choice="a,b", regex="x"), "two constraints"),
    (lambda: structured.from_options(best_effort=True), "goes with --json"),
    (lambda: structured.from_options(json="nowhere", namespace={}), "no variable 'nowhere'"),
])
def test_bad_constraints_are_refused_when_built(build, message):
    with pytest.raises(InvalidInput, match=message):
        build()


def test_the_digest_follows_the_content_only():
    a = structured.json_schema({"type": "object", "required": ["a"]})
    b = structured.json_schema({"required": ["a"], "type": "object"})
    assert a.digest() == b.digest() != structured.json_schema().digest()
    assert len(a.digest()) == 12


# -- through the shell, on echo --------------------------------------------------------------
def test_choice_sets_var_to_the_choice_and_records_the_constraint(shell):
    shell.ok("%%subchat root --backend echo --choice positive,negative --var label\n"
             "Is 'great film' positive or negative?")
    assert shell.ns["label"] == "positive"
    from subchat_magics.session import default_session

    msg = default_session().tree.get("root").messages[-1]
    assert msg.content == "positive" and msg.status == "complete"
    prov = msg.provenance["constraint"]
    assert prov["kind"] == "choice" and prov["enforced"] is True and len(prov["digest"]) == 12
    shown = shell.ok("%subchat show root -p")
    assert f"constraint: --choice {prov['digest']}, enforced while generating" in shown


def test_json_with_a_schema_variable_sets_var_to_the_parsed_value(shell):
    shell.ns["schema"] = SCHEMA
    out = shell.ok("%%subchat root --backend echo --json schema --var row\nLabel it.")
    row = shell.ns["row"]
    assert row["label"] in ("pos", "neg") and row["score"] == 1  # small: the search shrinks it
    assert json.loads(out) == row  # a terminal shows the text


def test_a_notebook_shows_a_json_reply_as_pretty_json_with_the_values_repr(tmp_path):
    from subchat_magics.testing.kernel import clean_env, execute, final_display, running_kernel

    with running_kernel(tmp_path, clean_env(LLM_BACKEND="echo")) as kc:
        execute(kc, f"schema = {SCHEMA!r}")
        final = final_display(execute(kc, "%%subchat root --json schema --var row\nLabel it.")[0])
        assert final["text/markdown"] == "```json\n" + json.dumps(
            ECHOED, indent=2) + "\n```"
        assert final["text/plain"] == repr(ECHOED)
        final = final_display(execute(kc, "%%subchat root --choice yes,no\nOk?")[0])
        assert final["text/plain"] == "yes"


def test_bare_json_gives_an_object_and_json_equals_name_works_before_the_path(shell):
    shell.ok("%%subchat root --backend echo --json --var v\nAnything.")
    assert shell.ns["v"] == {}
    shell.ns["schema"] = SCHEMA
    shell.ok("%%subchat --json=schema root --backend echo --var w\nAgain.")
    assert shell.ns["w"] == ECHOED


def test_choice_from_a_namespace_list(shell):
    shell.ns["labels"] = ["spam", "ham"]
    shell.ok("%%subchat root --backend echo --choice labels --var v\nSpam?")
    assert shell.ns["v"] == "spam"


def test_regex_braces_arrive_as_typed_and_names_on_the_line_are_filled(shell):
    shell.ok("%%subchat root --backend echo --regex '[0-9]{3}-[A-Z]{2}' --var code\nA code.")
    assert shell.ns["code"] == "000-AA"
    from subchat_magics.session import default_session

    assert default_session().tree.get("root").messages[-1].provenance["constraint"]["digest"] \
        == structured.regex("[0-9]{3}-[A-Z]{2}").digest()
    shell.ns["n"] = 4  # {n} is a notebook name: filled, as in the cell; {{ }} are braces
    shell.ok("%%subchat root --backend echo --regex '[a-z]{{{n}}}' --var word\nA word.")
    assert shell.ns["word"] == "aaaa"
    shell.ok("%%subchat root --backend echo --regex '[a-z]{m}' --var word\nA word.")
    assert shell.ns["word"] == "a{m}"  # no variable m: the braces stay as typed


def test_the_line_magic_fills_names_and_keeps_other_braces(shell, workdir):
    shell.ok("%%subchat root --backend echo\nhi")
    shell.ns["out"] = str(workdir / "tree.json")
    shell.ok("%subchat export root --out {out}")
    assert json.loads((workdir / "tree.json").read_text())
    shell.ok("%subchat system root 'Answer as {\"a\": 1}'")
    from subchat_magics.session import default_session

    assert default_session().tree.get("root").system_prompt == 'Answer as {"a": 1}'


def test_fanout_var_gets_one_parsed_value_per_subchat(shell):
    shell.ok("%%subchat root --backend echo\nstart")
    shell.ok("%%subchat root --backend echo --fanout 3 --choice red,green --var picks\nA colour.")
    assert shell.ns["picks"] == ["red", "red", "red"]


@pytest.mark.parametrize("line, message", [
    ("--json missing", "no variable 'missing'"),
    ("--json bad", "not a valid JSON Schema"),
    ("--choice ','", "at least one choice"),
    ("--regex '[0-9'", "does not compile"),
    ("--choice a,b --regex x", "two constraints"),
    ("--json --choice a,b", "two constraints"),
    ("--choice 'very good,bad' -n 1", "--max-tokens 1 is too few"),
    ("--best-effort", "goes with --json"),
])
def test_bad_constraint_options_are_one_line_errors_and_leave_the_tree_unchanged(
        shell, workdir, line, message):
    shell.ok("%%subchat root --backend echo\nfirst")
    shell.ns["bad"] = {"type": 12}
    before = rows(workdir)
    error = shell.fails(f"%%subchat root/new --backend echo {line}\nLabel it.")
    assert message in error and "\n" not in error and error.startswith("%%subchat")
    assert rows(workdir) == before


def test_an_echo_reply_cut_by_max_tokens_is_kept_marked_invalid_and_var_is_none(shell):
    shell.ns["schema"] = {"type": "object", "properties": {"a": {"type": "string"},
                                                           "b": {"type": "string"}},
                          "required": ["a", "b"]}
    out = shell.ok("%%subchat root --backend echo --json schema -n 2 --var v\nGo.")
    assert shell.ns["v"] is None
    from subchat_magics.session import default_session

    msg = default_session().tree.get("root").messages[-1]
    assert msg.status == "error" and msg.content == '{"a": "", '
    assert msg.provenance["finish_reason"].startswith("error: invalid output (not JSON")
    assert "stopped at max tokens" in msg.provenance["finish_reason"]
    assert "[error: invalid output (not JSON" in out


def test_each_gives_one_parsed_value_per_row(shell):
    pd = pytest.importorskip("pandas")
    shell.ns["reviews"] = ["good film", "bad film", "odd film"]
    shell.ok("%%subchat root --backend echo --each reviews --as labels --choice pos,neg\n"
             "Label: {item}")
    assert shell.ns["labels"] == ["pos", "pos", "pos"]
    shell.ns["df"] = pd.DataFrame({"text": ["a", "b"]}, index=["r1", "r2"])
    shell.ns["schema"] = SCHEMA
    shell.ok("%%subchat root --backend echo --each df --as rows --json schema\nLabel: {text}")
    assert list(shell.ns["rows"].index) == ["r1", "r2"]
    assert list(shell.ns["rows"]) == [ECHOED] * 2


def test_each_with_a_constraint_the_backend_cannot_enforce_is_refused_before_any_row(
        shell, workdir):
    shell.ok("%%subchat root --backend echo\nfirst")
    shell.ns["reviews"] = ["good film", "bad film"]
    before = rows(workdir)
    error = shell.fails("%%subchat root --backend echo --each reviews --as labels "
                        "--choice 'very good,bad' -n 1\nLabel: {item}")
    assert "--max-tokens 1 is too few" in error
    assert rows(workdir) == before
