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
        """A short digest of the content (for provenance and cache keys)."""
        blob = json.dumps(self.spec(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]

    def provenance(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "digest": self.digest()}
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
                                    f"{str(exc).splitlines()[0]}") from None
        return value

    def example(self) -> str:
        """A reply that satisfies the constraint (what the offline echo backend answers):
        the first choice, a minimal instance of the schema, a string matching the pattern."""
        if self.kind == "choice":
            return self.choices[0]
        if self.kind == "regex":
            return _regex_example(self.pattern or "")
        return json.dumps(minimal_instance(self.schema or {}, self.schema or {}))


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


def from_options(*, json: str | None = None, choice: str | None = None,  # noqa: A002
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
        if choice.isidentifier():  # a name: a list or tuple variable of the notebook
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


def _validate(schema: dict[str, Any], value: Any) -> None:
    from jsonschema.validators import validator_for

    errors = sorted(validator_for(schema)(schema).iter_errors(value), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.absolute_path)
        raise InvalidOutput(f"{e.message}" + (f" (at {where})" if where else ""))


def minimal_instance(schema: Any, root: dict[str, Any], depth: int = 0) -> Any:
    """A small value valid against ``schema`` (the common keywords; ``$ref`` into the
    root's ``$defs``/``definitions``)."""
    if depth > 20 or not isinstance(schema, dict):
        return None
    if "$ref" in schema:
        ref = schema["$ref"]
        node: Any = root
        for part in ref.lstrip("#/").split("/") if ref.startswith("#") else []:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        return minimal_instance(node, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            return minimal_instance(schema[key][0], root, depth + 1)
    if schema.get("allOf"):
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            merged.update(part if isinstance(part, dict) else {})
        return minimal_instance(merged, root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), kind[0] if kind else None)
    if kind is None:
        kind = "object" if "properties" in schema else None
    if kind == "object":
        props = schema.get("properties", {})
        return {k: minimal_instance(props.get(k, {}), root, depth + 1)
                for k in schema.get("required", [])}
    if kind == "array":
        n = schema.get("minItems", 0)
        item = schema.get("items", {})
        return [minimal_instance(item, root, depth + 1) for _ in range(n)]
    if kind == "string":
        if "pattern" in schema:
            return _regex_example(schema["pattern"])
        return "a" * schema.get("minLength", 0)
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", 0))
        value = low + 1 if "exclusiveMinimum" in schema else low
        return int(value) if kind == "integer" else value
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return {}


def _regex_example(pattern: str) -> str:
    """A string matching ``pattern``, for the echo backend: tried from simple candidates
    built from the pattern's literal parts; the pattern itself as a last resort."""
    candidates = [re.sub(r"\\(.)", r"\1", re.sub(r"[\^\$]", "", pattern)), "", "a", "0", "000",
                  "123", "yes", "no"]
    simple = re.sub(r"\[(.)[^\]]*\]", r"\1", pattern)  # a class by its first member
    simple = re.sub(r"\{(\d+)(,\d*)?\}", lambda m: "{" + m.group(1) + "}", simple)
    candidates.insert(0, _expand(simple))
    for c in candidates:
        if c is not None and re.fullmatch(pattern, c):
            return c
    return pattern


def _expand(pattern: str) -> str | None:
    """Expand a simple pattern (literals, ``x{n}``, ``\\d``, ``\\w``, ``(a|b)``, ``?``,
    ``*``, ``+``) into one string; ``None`` if it uses something else."""
    out: list[str] = []
    i = 0
    classes = {"d": "0", "w": "a", "s": " "}
    try:
        while i < len(pattern):
            ch = pattern[i]
            if ch in "^$":
                i += 1
                continue
            if ch == "\\":
                nxt = pattern[i + 1]
                out.append(classes.get(nxt, nxt))
                i += 2
            elif ch == "(":
                depth, j = 1, i + 1
                while depth:
                    depth += {"(": 1, ")": -1}.get(pattern[j], 0)
                    j += 1
                inner = pattern[i + 1:j - 1].lstrip("?:")
                out.append(_expand(inner.split("|")[0]) or "")
                i = j
            elif ch == ".":
                out.append("a")
                i += 1
            elif ch in "?*":
                out.pop() if out else None
                i += 1
            elif ch == "+":
                i += 1
            elif ch == "{" and not re.match(r"\{\d+(,\d*)?\}", pattern[i:]):
                out.append(ch)  # not a repeat: a literal brace, as Python's re reads it
                i += 1
            elif ch == "{":
                j = pattern.index("}", i)
                n = int(pattern[i + 1:j].split(",")[0] or 0)
                last = out.pop() if out else ""
                out.append(last * n)
                i = j + 1
            elif ch in "|)":
                break
            else:
                out.append(ch)
                i += 1
    except (IndexError, ValueError):
        return None
    return "".join(out)
