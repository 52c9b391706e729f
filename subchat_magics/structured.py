"""Structured output: a constraint on a reply (a JSON Schema, a choice among strings, a
regular expression), checked when it is made, validated and parsed when the reply is in.

A :class:`Constraint` travels in :class:`~subchat_magics.backends.base.GenerationOptions`;
each backend turns it into its server's own field (vLLM structured outputs, Ollama
``format``, ``response_format``) or says it cannot. Validation uses ``jsonschema`` (and
pydantic for a pydantic model class, imported only when one is given).

A helper module: imports only the error hierarchy; backends and the core may import it.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInput, SubchatError

KINDS = ("json", "choice", "regex")
_THINK = re.compile(r"^\s*<think>.*?</think>\s*", re.S)


class InvalidOutput(SubchatError):
    """A reply that does not satisfy its constraint; the message says why."""


@dataclass(frozen=True)
class Constraint:
    """What a reply must be. Build one with :func:`json_schema`, :func:`choice` or
    :func:`regex`; ``best_effort``: a backend that cannot enforce it may still be used,
    and the reply is validated afterwards."""

    kind: str
    schema: dict[str, Any] | None = None
    choices: tuple[str, ...] = ()
    pattern: str | None = None
    model: Any = field(default=None, compare=False)  # a pydantic model class, if given
    best_effort: bool = False

    # -- description ---------------------------------------------------------------------------
    def spec(self) -> Any:
        """The constraint's content: the schema, the list of choices or the pattern."""
        return {"json": self.schema, "choice": list(self.choices), "regex": self.pattern}[self.kind]

    def digest(self) -> str:
        """A short digest of the content (for provenance and cache keys); a choice's or a
        pattern's made once (a batch asks for each row), a schema's each time (a dict
        can change)."""
        held = self.__dict__.get("_digest")
        if held is not None:
            return held
        blob = json.dumps(self.spec(), sort_keys=True, ensure_ascii=False)
        out = hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]
        if self.kind != "json":
            self.__dict__["_digest"] = out  # (frozen: its choices and pattern never change)
        return out

    def longest_regex_match(self) -> int | None:
        """The most characters a ``--regex`` answer can have (None: no bound, or not a
        regex): what a batch row needs of reply room, at most 4 tokens a character."""
        if self.kind != "regex" or not self.pattern:
            return None
        try:
            from re import _parser  # the stdlib's own parser (sre_parse before 3.11)
        except ImportError:  # pragma: no cover - a Python without it
            return None
        try:
            most = _parser.parse(self.pattern).getwidth()[1]
        except Exception:  # noqa: BLE001 - a pattern re compiles but this cannot measure
            return None
        return most if most < 100_000 else None

    def provenance(self) -> dict[str, Any]:
        """What a reply records of its constraint: kind, digest and content (the choices,
        the pattern, the schema as JSON text: an export writes the constraint from it)."""
        out: dict[str, Any] = {"kind": self.kind, "digest": self.digest()}
        if self.kind == "json":  # as text: the store sorts keys, a schema's order matters
            if self.schema is not None:
                out["schema"] = json.dumps(self.schema, ensure_ascii=False)
        else:
            out["choices" if self.kind == "choice" else "pattern"] = self.spec()
        if self.model is not None:
            out["model"] = getattr(self.model, "__name__", str(self.model))
        if self.best_effort:
            out["best_effort"] = True
        return out

    def __str__(self) -> str:
        return {"json": "--json", "choice": "--choice", "regex": "--regex"}[self.kind]

    # -- the reply -----------------------------------------------------------------------------
    def answer(self, text: str) -> str:
        """The part of a reply the constraint applies to: after a thinking block."""
        return _THINK.sub("", text or "", count=1).strip() if self.kind != "regex" \
            else _THINK.sub("", text or "", count=1)

    def parse(self, text: str) -> Any:
        """The reply's value: the parsed JSON (a pydantic instance for a model), the
        choice, or the matched string. :class:`InvalidOutput` says why not."""
        answer = self.answer(text)
        if self.kind == "choice":
            if answer in self.choices:
                return answer
            raise InvalidOutput(f"{_short(answer)} is not one of {', '.join(self.choices)}")
        if self.kind == "regex":
            if re.fullmatch(self.pattern or "", answer):
                return answer
            raise InvalidOutput(f"{_short(answer)} does not match {self.pattern!r}")
        try:
            # (strict=False: the engines' JSON grammars allow raw control characters in strings)
            value = json.loads(answer, strict=False)
        except ValueError as exc:
            raise InvalidOutput(f"not JSON ({exc.msg} at character {exc.pos})") from None
        _validate(self.schema or {}, value)
        if self.model is not None:
            try:
                return self.model.model_validate(value)
            except Exception as exc:  # noqa: BLE001 - pydantic's ValidationError, told in one line
                raise InvalidOutput(f"not a valid {self.model.__name__}: "
                                    f"{_model_errors(exc)}") from None
        return value

    def example(self) -> str:
        """A reply that satisfies the constraint (what the offline echo backend answers):
        the first choice; for a schema or a pattern, a small value that :meth:`parse`
        accepts, drawn by Hypothesis (``hypothesis-jsonschema``'s ``from_schema``,
        ``from_regex``) with a fixed seed and shrunk: the same constraint always gives
        the same example. :class:`InvalidInput` when none can be found."""
        if self.kind == "choice":
            return self.choices[0]
        key = (self.kind, self.digest(), self.model)
        with _EXAMPLES_LOCK:  # Hypothesis runs one search at a time; a fan-out shares it
            text = _EXAMPLES.get(key)
            if text is None:
                text = _EXAMPLES[key] = self._draw_example()
        return text

    def _draw_example(self) -> str:
        from hypothesis import strategies as st

        if self.kind == "regex":
            pattern = self.pattern or ""
            return _find(st.from_regex(pattern, fullmatch=True),
                         lambda s: re.fullmatch(pattern, s) is not None, f"--regex {pattern!r}",
                         prefer=str.isprintable)
        from hypothesis_jsonschema import from_schema
        from jsonschema import FormatChecker
        from jsonschema.validators import validator_for

        schema = self.schema or {}
        validator = validator_for(schema)(schema, format_checker=FormatChecker())
        model = self.model

        def valid(value: Any) -> bool:
            if not validator.is_valid(value):
                return False
            if model is not None:
                try:
                    model.model_validate(value)
                except Exception:  # noqa: BLE001 - pydantic's ValidationError: not this one
                    return False
            return True

        try:
            strategy = from_schema(schema, custom_formats=_custom_formats())
        except Exception as exc:  # noqa: BLE001 - hypothesis-jsonschema's refusal, told in one line
            raise InvalidInput(f"no example can be made for this --json schema "
                               f"({str(exc).splitlines()[0][:120]})") from None
        value = _find(strategy, valid, "this --json schema")
        return json.dumps(_in_schema_order(value, schema, schema), ensure_ascii=False)


# -- building constraints (every check here, before any request) ------------------------------
def json_schema(value: Any = None, *, best_effort: bool = False) -> Constraint:
    """``value``: a JSON Schema (dict), a pydantic model class, or ``None`` (any JSON
    object). The schema is checked against its meta-schema."""
    model = None
    if value is None:
        schema: dict[str, Any] = {"type": "object"}
    elif isinstance(value, type) and hasattr(value, "model_json_schema"):
        model, schema = value, value.model_json_schema()
    elif isinstance(value, dict):
        schema = value
    else:
        raise InvalidInput(f"--json takes a JSON Schema (a dict) or a pydantic model class, "
                           f"not {type(value).__name__}")
    try:
        from jsonschema.exceptions import SchemaError
        from jsonschema.validators import validator_for
    except ImportError:
        raise InvalidInput("--json needs jsonschema: pip install jsonschema") from None
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "the top level"
        raise InvalidInput(f"not a valid JSON Schema: {exc.message} (at {where})") from None
    try:
        json.dumps(schema)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"the JSON Schema is not JSON ({exc})") from None
    return Constraint("json", schema=schema, model=model, best_effort=best_effort)


def choice(values: Any, *, best_effort: bool = False) -> Constraint:
    """The reply is exactly one of ``values`` (strings; at least one, no duplicates)."""
    if isinstance(values, str):
        values = [v.strip() for v in values.split(",")]
    try:
        items = [v if isinstance(v, str) else str(v) for v in values]
    except TypeError:
        raise InvalidInput("--choice takes A,B,C or the name of a list of strings") from None
    items = [v for v in items if v != ""]
    if not items:
        raise InvalidInput("--choice needs at least one choice, e.g. --choice yes,no")
    spaced = [v for v in items if v != v.strip()]
    if spaced:  # a reply is compared stripped: ' yes' could never be told from 'yes'
        raise InvalidInput(f"--choice {spaced[0]!r} begins or ends with a space, and replies "
                           f"are compared without one; write {spaced[0].strip()!r}")
    if len(set(items)) != len(items):
        raise InvalidInput(f"--choice lists a choice twice: {', '.join(items)}")
    return Constraint("choice", choices=tuple(items), best_effort=best_effort)


def regex(pattern: str, *, best_effort: bool = False) -> Constraint:
    """The whole reply matches ``pattern`` (Python ``re`` syntax, the common subset that
    servers' regex engines share)."""
    if not isinstance(pattern, str) or not pattern:
        raise InvalidInput("--regex needs a pattern, e.g. --regex '[0-9]{3}'")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise InvalidInput(f"--regex {pattern!r} does not compile: {exc}") from None
    return Constraint("regex", pattern=pattern, best_effort=best_effort)


_choice, _regex = choice, regex  # from_options' keywords shadow the builders' names


def from_options(*, json: str | None = None, choice: "str | list[str] | None" = None,  # noqa: A002
                 regex: str | None = None, best_effort: bool | None = None,
                 namespace: dict[str, Any] | None = None) -> Constraint | None:
    """The constraint the options of ``%%subchat`` ask for (``--json [SCHEMA]``,
    ``--choice A,B|NAME``, ``--regex PATTERN``, ``--best-effort``), names looked up in
    ``namespace``; None when none is given. Two at once, an unknown name or a bad value is
    an :class:`InvalidInput`."""
    given = [flag for flag, v in (("--json", json), ("--choice", choice), ("--regex", regex))
             if v is not None]
    if len(given) > 1:
        raise InvalidInput(f"{' and '.join(given)} are two constraints on one reply; give one")
    if not given:
        if best_effort:
            raise InvalidInput("--best-effort goes with --json, --choice or --regex")
        return None
    ns = namespace or {}
    be = bool(best_effort)
    if json is not None:
        if not json:
            return json_schema(None, best_effort=be)
        if not json.isidentifier() or json not in ns:
            raise InvalidInput(f"--json {json}: no variable {json!r} in the notebook (it takes "
                               "the name of a JSON Schema dict or a pydantic model class; bare "
                               "--json asks for any JSON object; put PATH before --json)")
        return json_schema(ns[json], best_effort=be)
    if choice is not None:
        value: Any = choice
        if isinstance(choice, list):  # the choices as typed, some quoted
            choice = ",".join(choice)
        elif choice.isidentifier():  # a name: a list or tuple variable of the notebook
            if choice not in ns:
                raise InvalidInput(
                    f"--choice {choice}: no variable {choice!r} in the notebook, and one value "
                    "is no choice; give the choices (--choice A,B) or the name of a list")
            held = ns[choice]
            if isinstance(held, (set, frozenset)):
                held = sorted(held, key=str)
            if not isinstance(held, (list, tuple)):
                raise InvalidInput(
                    f"--choice {choice}: {choice!r} is a {type(held).__name__}, not a list or "
                    f"tuple of choices; give --choice A,B or a list (e.g. list({choice}))")
            value = list(held)
        c = _choice(value, best_effort=be)
        if len(set(getattr(c, "choices", []) or [])) < 2:
            raise InvalidInput(f"--choice {choice}: one value is no choice; give two or more "
                               "(--choice A,B)")
        return c
    return _regex(regex, best_effort=be)


def pretty(value: Any) -> str:
    """A parsed JSON value (or pydantic instance) as indented JSON."""
    if hasattr(value, "model_dump_json"):
        return value.model_dump_json(indent=2)
    return json.dumps(value, indent=2, ensure_ascii=False)


def bundle(value: Any, text: str) -> dict[str, str] | None:
    """How a parsed reply is shown: a JSON value as pretty JSON (Markdown) with its repr
    as text/plain; a choice or a matched string as itself (None: show the reply)."""
    if isinstance(value, str) or value is None and text.strip() != "null":
        return None
    import pprint

    return {"text/plain": pprint.pformat(value, width=88, sort_dicts=False),
            "text/markdown": f"```json\n{pretty(value)}\n```"}


def mark(reply: Any) -> str | None:
    """The ``error: invalid output (…)`` mark of a stored reply, or None."""
    reason = (getattr(reply, "provenance", None) or {}).get("finish_reason") or ""
    return reason if reason.startswith("error: invalid output") else None


# -- helpers ------------------------------------------------------------------------------------
def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "…")


MAX_ERRORS_TOLD = 3  # an invalid reply's message names this many failing fields, then a count


def _model_errors(exc: Exception) -> str:
    """A pydantic ``ValidationError`` in one line, naming each failing field."""
    try:
        errors = exc.errors()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - not pydantic's: its first line
        return str(exc).splitlines()[0]
    said = [f"{e.get('msg')} (at {'/'.join(str(p) for p in e.get('loc', ())) or 'the top level'})"
            for e in errors[:MAX_ERRORS_TOLD]]
    more = len(errors) - MAX_ERRORS_TOLD
    return "; ".join(said) + (f"; and {more} more" if more > 0 else "")


def _validate(schema: dict[str, Any], value: Any) -> None:
    from jsonschema.validators import validator_for

    errors = sorted(validator_for(schema)(schema).iter_errors(value),
                    key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        said = []
        for e in errors[:MAX_ERRORS_TOLD]:
            where = "/".join(str(p) for p in e.absolute_path)
            said.append(f"{e.message}" + (f" (at {where})" if where else ""))
        more = len(errors) - MAX_ERRORS_TOLD
        raise InvalidOutput("; ".join(said) + (f"; and {more} more" if more > 0 else ""))


_EXAMPLES: dict[tuple, str] = {}
_EXAMPLES_LOCK = threading.Lock()


def _custom_formats() -> dict[str, Any]:
    """Formats pydantic's schemas use that ``hypothesis-jsonschema`` does not draw itself
    (a ``UUID`` field's ``"format": "uuid"``)."""
    from hypothesis import strategies as st

    return {"uuid": st.uuids().map(str)}


def _in_schema_order(value: Any, schema: Any, root: dict[str, Any], depth: int = 0) -> Any:
    """``value`` with each object's keys in the order its schema lists its properties (as
    a reader, or a DataFrame made of the values, expects them); the value is the same."""
    if depth > 32 or not isinstance(schema, dict):
        return value
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        node: Any = root
        for part in ref[2:].split("/"):
            node = node.get(part) if isinstance(node, dict) else None
        return _in_schema_order(value, node, root, depth + 1)
    if isinstance(value, dict):
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        keys = [k for k in props if k in value] + [k for k in value if k not in props]
        return {k: _in_schema_order(value[k], props.get(k), root, depth + 1) for k in keys}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_in_schema_order(v, schema["items"], root, depth + 1) for v in value]
    return value


def _find(strategy: Any, valid: Any, what: str, prefer: Any = None) -> Any:
    """The smallest value of ``strategy`` that is ``valid`` (and ``prefer``-red, where one
    is), searched with a fixed seed: deterministic."""
    from hypothesis import HealthCheck, Phase, find, settings
    from hypothesis.errors import HypothesisException

    how = settings(database=None, derandomize=True, deadline=None, max_examples=500,
                   phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
    tries = [lambda v: valid(v) and prefer(v), valid] if prefer is not None else [valid]
    for condition in tries:
        try:
            return find(strategy, condition, settings=how)
        except HypothesisException:  # NoSuchExample, Unsatisfiable, an unsupported keyword
            continue
    raise InvalidInput(f"no example can be made for {what}: the echo backend cannot answer it "
                       "(another backend can)")
