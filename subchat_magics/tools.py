"""The notebook's functions as tools: a callable described for a model (name, description
and a JSON Schema of its arguments, from its signature, type hints and docstring through
pydantic), a model's call of one (:class:`ToolCall`), and running a call (validated
against the schema, run in the kernel's thread, its result in prompt form).

A helper module: no IPython, no tree. Backends read :class:`Tool` descriptions; only the
tool loop (:mod:`subchat_magics.toolrun`) runs them, and only through :meth:`Toolset.run`,
so nothing but the named callables can ever run.

pydantic is imported when a tool is described (it comes with every backend's SDK; without
it the message says what to install)."""

from __future__ import annotations

import functools
import inspect
import json
import re
import time
import traceback
import types
import typing
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from .errors import InvalidInput
from .secrets import redact
from .values import Limits, cut, prompt_text

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Params|Returns|Raises|Yields|Examples?|Notes?)\s*:?\s*$")
_ARGS = re.compile(r"^\s*(Args|Arguments|Parameters|Params)\s*:?\s*$")
_ENTRY = re.compile(r"^\s*\**(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
TRACEBACK_FRAMES = 3  # the last frames of a tool's traceback that are sent back


@dataclass(frozen=True)
class Tool:
    """One callable described for a model. ``parameters`` is the JSON Schema of its
    keyword arguments (an object); ``fn`` is never sent anywhere."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any] = field(compare=False, repr=False)
    adapter: Any = field(default=None, compare=False, repr=False)  # pydantic's TypeAdapter

    def spec(self) -> dict[str, Any]:
        """The OpenAI-style description (``{"type": "function", "function": {...}}``), which
        chat templates, Ollama, OpenAI and Groq all read."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description, "parameters": self.parameters}}

    def call_schema(self) -> dict[str, Any]:
        """The JSON Schema of a whole call of this tool: ``{"name": NAME, "arguments": {...}}``
        (what a Hermes-style ``<tool_call>`` holds), for constrained decoding."""
        params = {k: v for k, v in self.parameters.items() if k not in ("$defs", "title")}
        schema: dict[str, Any] = {
            "type": "object",
            "properties": {"name": {"const": self.name}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}
        return schema


@dataclass
class ToolCall:
    """A model's call of a tool. ``arguments`` is the parsed JSON object, or the raw text
    the model wrote when it is not JSON (``error`` then says why)."""

    name: str
    arguments: Any
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:12]}")
    error: str | None = None  # the call as written cannot be run (not JSON, unknown tool...)

    def to_dict(self) -> dict[str, Any]:
        out = {"id": self.id, "name": self.name, "arguments": self.arguments}
        if self.error:
            out["error"] = self.error
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ToolCall":
        return cls(str(d.get("name", "")), d.get("arguments"), str(d.get("id") or ""), d.get("error"))

    @classmethod
    def parse(cls, name: str, arguments: Any, id: str | None = None) -> "ToolCall":  # noqa: A002
        """A call as a server sent it: ``arguments`` a dict, or JSON text (OpenAI's wire
        form) parsed here; text that is not a JSON object is kept, marked."""
        call = cls(name or "", arguments, id or f"call_{uuid.uuid4().hex[:12]}")
        if isinstance(arguments, str):
            try:
                call.arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError as exc:
                call.error = f"the arguments are not JSON ({exc.msg} at character {exc.pos})"
        if call.error is None and not isinstance(call.arguments, dict):
            call.error = f"the arguments are not a JSON object but {type(call.arguments).__name__}"
        return call

    def arguments_json(self) -> str:
        """The arguments as JSON text (OpenAI's wire form)."""
        if isinstance(self.arguments, str) and self.error:
            return self.arguments
        return json.dumps(self.arguments, ensure_ascii=False)

    def signature(self, width: int = 200) -> str:
        """``lookup(id=3, name='x')``: how a call is shown and asked about."""
        if isinstance(self.arguments, dict):
            args = ", ".join(f"{k}={v!r}" for k, v in self.arguments.items())
        else:
            args = repr(self.arguments)
        text = f"{self.name}({args})"
        return text if len(text) <= width else text[: width - 1] + "…"


@dataclass
class ToolResult:
    """What running a call gave: ``content`` is what is sent back to the model;
    ``status`` is ``ok``, ``error`` (the tool raised, or the call was invalid), ``refused``
    (not approved) or ``interrupted`` (Ctrl-C)."""

    call: ToolCall
    content: str
    status: str = "ok"
    duration_s: float | None = None
    value: Any = field(default=None, repr=False)  # the return value itself (not stored)

    def provenance(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tool_call_id": self.call.id, "name": self.call.name,
                               "tool_status": self.status}
        if self.duration_s is not None:
            out["duration_s"] = round(self.duration_s, 6)
        return out


# -- describing ------------------------------------------------------------------------------
def _pydantic() -> Any:
    try:
        import pydantic
    except ImportError:
        raise InvalidInput("--tools needs pydantic to describe functions: pip install pydantic") from None
    return pydantic


def _doc_parts(doc: str) -> tuple[str, dict[str, str]]:
    """A docstring's description (its text before the first section) and the lines of its
    ``Args:``/``Parameters`` section, by parameter (Google style, NumPy's underline too)."""
    lines = inspect.cleandoc(doc or "").splitlines()
    head: list[str] = []
    params: dict[str, str] = {}
    i = 0
    while i < len(lines) and not _SECTION.match(lines[i]):
        head.append(lines[i])
        i += 1
    while i < len(lines):
        is_args = _ARGS.match(lines[i]) is not None
        i += 1
        if i < len(lines) and lines[i].strip() and set(lines[i].strip()) == {"-"}:
            i += 1  # NumPy's underline
        current, indent = None, None
        while i < len(lines) and not _SECTION.match(lines[i]):
            line = lines[i]
            depth = len(line) - len(line.lstrip())
            m = _ENTRY.match(line)
            if line.strip() and m and (indent is None or depth <= indent):
                current, indent = m.group(1), depth
                if is_args:
                    params[current] = m.group(2).strip()
            elif line.strip() and current and is_args:
                params[current] = f"{params[current]} {line.strip()}".strip()
            i += 1
    return "\n".join(head).strip(), {k: v for k, v in params.items() if v}


def describe(fn: Any, name: str | None = None, label: str | None = None) -> Tool:
    """``fn`` described as a :class:`Tool`; :class:`InvalidInput` (one line naming it)
    when it cannot be: not callable, a builtin, no signature, a parameter without a type
    hint, ``*args``/``**kwargs``, a type pydantic cannot put in a schema.

    ``fn`` may be a function, a ``functools.partial`` (its bound arguments are not asked
    of the model) or an instance with a typed ``__call__``. Its name is ``name``, else its
    ``__name__``, else ``label`` (the variable that holds it), else for a partial its
    function's name, for an instance its class's: the first that is a valid tool name."""
    label = label or name or getattr(fn, "__name__", None) or type(fn).__name__
    if not callable(fn):
        shown = _short_repr(fn)
        raise InvalidInput(f"--tools {label}: not a function but {type(fn).__name__}"
                           f"{' ' + shown if shown else ''}; name functions defined in the notebook")
    if isinstance(fn, (types.BuiltinFunctionType, types.BuiltinMethodType)):
        raise InvalidInput(f"--tools {label}: a builtin ({getattr(fn, '__name__', label)}) "
                           "cannot be a tool: it has no typed, named parameters; wrap it in a "
                           f"def with typed parameters, e.g. def my_{getattr(fn, '__name__', 'tool')}(x: str) -> ...")
    partial = fn if isinstance(fn, functools.partial) else None
    inner = partial.func if partial is not None else fn
    while isinstance(inner, functools.partial):
        inner = inner.func
    instance = not (inspect.isroutine(fn) or partial is not None or isinstance(fn, type))
    target = fn.__call__ if instance else fn  # an instance's __call__, bound: no self
    candidates = [name, getattr(fn, "__name__", None), label,
                  getattr(inner, "__name__", None) if partial is not None else None,
                  type(fn).__name__ if instance else None]
    tool_name = next((c for c in candidates if _valid(c)), None)
    if tool_name is None:
        raise InvalidInput(f"--tools: {label!r} cannot be a tool name (letters, digits, '_' "
                           "and '-', at most 64); define it with def NAME(...)")
    if inspect.iscoroutinefunction(inner) or inspect.isasyncgenfunction(inner) or (
            instance and inspect.iscoroutinefunction(target)):
        raise InvalidInput(f"--tools {tool_name}: an async function; tools run in the "
                           f"kernel's thread: define a plain def {tool_name}(...)")
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        raise InvalidInput(f"--tools {tool_name}: its signature cannot be read (a builtin?); "
                           f"wrap it: def {tool_name}(x: int) -> ...") from None
    params = [p for p in sig.parameters.values()]
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            star = "*" if p.kind == p.VAR_POSITIONAL else "**"
            raise InvalidInput(f"--tools {tool_name}: {star}{p.name} cannot be described as "
                               "named arguments; give it named, typed parameters")
        if p.kind == p.POSITIONAL_ONLY:
            raise InvalidInput(f"--tools {tool_name}: parameter {p.name} is positional-only; "
                               "a model passes arguments by name")
        if p.annotation is inspect.Parameter.empty:
            raise InvalidInput(f"--tools {tool_name}: parameter {p.name} has no type hint; "
                               f"add one, e.g. {p.name}: str")
    pydantic = _pydantic()
    try:
        adapter = pydantic.TypeAdapter(_resolved(target))
        schema = adapter.json_schema()
    except Exception as exc:  # noqa: BLE001 - pydantic's schema errors, told in one line
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidInput(f"--tools {tool_name}: its arguments cannot be described as JSON "
                           f"Schema ({first[:160]}); use plain types (str, int, float, bool, "
                           "lists, dicts, pydantic models)") from None
    description, per_param = _doc_parts(_doc(fn, inner, target, instance))
    props = schema.get("properties", {})
    for pname, text in per_param.items():
        if pname in props and "description" not in props[pname]:
            props[pname]["description"] = text
    for prop in props.values():
        if isinstance(prop, dict):
            prop.pop("title", None)
    schema.pop("title", None)
    schema.setdefault("type", "object")
    schema.setdefault("properties", {})
    return Tool(tool_name, description or tool_name.replace("_", " "), schema, fn, adapter)


def _valid(name: Any) -> bool:
    return isinstance(name, str) and _NAME.match(name) is not None


def _doc(fn: Any, inner: Any, target: Any, instance: bool) -> str:
    """The docstring that describes ``fn``: its own; a partial's function's (a partial's
    own is ``functools.partial``'s); an instance's ``__call__``'s, else its class's."""
    if instance:
        return getattr(target, "__doc__", None) or type(fn).__doc__ or ""
    if isinstance(fn, functools.partial):
        return getattr(inner, "__doc__", None) or ""
    return getattr(fn, "__doc__", None) or ""


def _resolved(fn: Any) -> Any:
    """``fn``, or where its hints are strings (``from __future__ import annotations``) a
    copy of it whose hints are resolved in its own module's globals: pydantic would look
    them up in ``sys.modules[fn.__module__]``, which IPython replaces for ``__main__``."""
    if not inspect.isfunction(fn) or not any(
            isinstance(a, str) for a in getattr(fn, "__annotations__", {}).values()):
        return fn
    hints = typing.get_type_hints(fn, include_extras=True)
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__,
                              fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__annotations__ = hints
    copy.__doc__ = fn.__doc__
    copy.__qualname__ = fn.__qualname__
    copy.__module__ = fn.__module__
    return copy


def recorded_tool(spec: dict[str, Any], results: dict[str, str]) -> Tool:
    """A tool as an export recorded it: its name, description and schema as the model saw
    them (``spec``, :meth:`Tool.spec`'s form), run by returning the recorded result of a
    call with the same arguments (``results``: canonical JSON of the arguments, as
    :func:`arguments_key` writes it, to the result text). A call with other arguments
    raises ``LookupError`` (sent back to the model as any tool's error): the function
    itself was never stored, so nothing else can be answered."""
    fn_spec = spec.get("function", spec)
    name = str(fn_spec["name"])
    table = dict(results)

    def replay(**arguments: Any) -> str:
        key = arguments_key(arguments)
        if key not in table:
            shown = ToolCall(name, arguments).signature()
            raise LookupError(f"no recorded result of {shown}: the export holds only the "
                              f"calls made; define {name} to run it")
        return table[key]

    replay.__name__ = name
    parameters = fn_spec.get("parameters") or {"type": "object", "properties": {}}
    return Tool(name, str(fn_spec.get("description") or name), parameters, replay)


def arguments_key(arguments: Any) -> str:
    """A call's arguments as canonical JSON (keys sorted): how a recorded tool finds it."""
    return json.dumps(arguments, sort_keys=True, ensure_ascii=False)


def _short_repr(value: Any) -> str:
    """A scalar's repr on one line (``3``, ``'text'``); nothing for anything bigger."""
    if not isinstance(value, (int, float, str, bool, type(None))):
        return ""
    text = " ".join(repr(value).split())
    return text if len(text) <= 40 else text[:39] + "…"


class Toolset:
    """The tools of one request, by name. Only these can run."""

    def __init__(self, tools: Sequence[Tool]):
        self.tools = tuple(tools)
        self.by_name = {t.name: t for t in self.tools}

    @classmethod
    def of(cls, items: "Toolset | Iterable[Any]") -> "Toolset":
        """Callables (or :class:`Tool`) described; a duplicate name is refused, naming it."""
        if isinstance(items, Toolset):
            return items
        if callable(items) or isinstance(items, (str, bytes)):
            items = [items]
        try:
            seq = list(items)
        except TypeError:
            raise InvalidInput(f"tools must be a list of functions, not {type(items).__name__}") from None
        if not seq:
            raise InvalidInput("--tools needs at least one function")
        tools: list[Tool] = []
        seen: set[str] = set()
        for item in seq:
            tool = item if isinstance(item, Tool) else describe(item)
            if tool.name in seen:
                raise InvalidInput(f"--tools: two tools are named {tool.name}; each needs its own name")
            seen.add(tool.name)
            tools.append(tool)
        return cls(tools)

    def __iter__(self) -> Any:
        return iter(self.tools)

    def __len__(self) -> int:
        return len(self.tools)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tools]

    def specs(self) -> list[dict[str, Any]]:
        return [t.spec() for t in self.tools]

    def check(self, call: ToolCall) -> str | None:
        """Why ``call`` cannot run as written (unknown tool, arguments not valid against its
        schema), or None."""
        if call.error:
            return call.error
        tool = self.by_name.get(call.name)
        if tool is None:
            return f"there is no tool named {call.name!r}; the tools are {', '.join(self.names)}"
        return schema_error(tool.parameters, call.arguments)

    def run(self, call: ToolCall, limits: Limits = Limits()) -> ToolResult:
        """Run ``call`` in this thread: checked first (an invalid call is an error result,
        never run), its return value in prompt form (cut, keys masked), an exception as its
        type, message and the last frames of its traceback. ``KeyboardInterrupt`` is not
        caught: Ctrl-C stops at once."""
        problem = self.check(call)
        if problem is not None:
            return ToolResult(call, f"error: invalid call: {problem}", "error", 0.0)
        tool = self.by_name[call.name]
        t0 = time.perf_counter()
        try:
            value = tool.adapter.validate_python(call.arguments) if tool.adapter is not None \
                else tool.fn(**call.arguments)
        except Exception as exc:  # noqa: BLE001 - the tool's failure goes back to the model
            took = time.perf_counter() - t0
            return ToolResult(call, redact(error_text(exc, limits.chars)), "error", took)
        took = time.perf_counter() - t0
        return ToolResult(call, result_text(call.name, value, limits), "ok", took, value)


def schema_error(schema: dict[str, Any], value: Any) -> str | None:
    """Why ``value`` is not valid against ``schema`` (one line), or None."""
    from jsonschema.validators import validator_for

    errors = sorted(validator_for(schema)(schema).iter_errors(value), key=lambda e: list(e.path))
    if not errors:
        return None
    e = errors[0]
    where = "/".join(str(p) for p in e.absolute_path)
    return f"invalid arguments: {e.message}" + (f" (at {where})" if where else "")


def result_text(name: str, value: Any, limits: Limits = Limits()) -> str:
    """A tool's return value as prompt text: cut and masked like any value; one whose
    ``str()`` fails is named by its type."""
    if value is None:
        return "None"
    try:
        text = prompt_text(f"{name}()", value, limits)
    except InvalidInput:
        text = f"<a {type(value).__name__} that cannot be written as text>"
    return redact(text)


def error_text(exc: BaseException, chars: int = 4000) -> str:
    """An exception as its type, message and the last frames of its traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if "pydantic" not in f.filename and f.filename != __file__]
    tb = "".join(traceback.format_list(own[-TRACEBACK_FRAMES:]))
    text = f"error: {type(exc).__name__}: {exc}\n" + (f"Traceback (last frames):\n{tb}" if tb else "")
    return cut(text.rstrip(), chars, keep="ends")


def pseudo_answer_name(names: Iterable[str]) -> str:
    """The name of the "answer instead of calling" choice in a constrained step: one that
    no tool has."""
    taken = set(names)
    for candidate in ("answer", "final_answer", "answer_user", "reply_to_user"):
        if candidate not in taken:
            return candidate
    n = 2
    while f"answer_{n}" in taken:
        n += 1
    return f"answer_{n}"


def step_schema(tools: Sequence[Tool], answer: str | None) -> dict[str, Any]:
    """The JSON Schema of one constrained step: a call of one of ``tools`` or
    ``{"name": answer}`` (answer in text instead; None: a call is required)."""
    options = [t.call_schema() for t in tools]
    if answer is not None:
        options.append({"type": "object", "properties": {"name": {"const": answer}},
                        "required": ["name"], "additionalProperties": False})
    defs: dict[str, Any] = {}
    for t in tools:
        defs.update(t.parameters.get("$defs", {}))
    schema: dict[str, Any] = {"anyOf": options}
    if defs:
        schema["$defs"] = defs
    return schema


def example_arguments(schema: dict[str, Any]) -> dict[str, Any]:
    """Small, valid arguments for a tool's schema (what the offline echo backend calls it
    with): the required properties only, each its smallest value (the first of an enum,
    0, "", False, the lower bound); where that is not valid against the schema, the
    example echo answers for ``--json`` with it."""
    value = _smallest(schema, schema, 0)
    if isinstance(value, dict) and schema_error(schema, value) is None:
        return value
    from .structured import Constraint

    return json.loads(Constraint("json", schema=schema).example())


#: a small valid value of each string format pydantic writes into a schema
_FORMATTED = {"date": "2000-01-01", "date-time": "2000-01-01T00:00:00Z", "time": "00:00:00",
              "duration": "PT0S", "uuid": "00000000-0000-0000-0000-000000000000",
              "email": "a@example.com", "uri": "https://example.com/",
              "ipv4": "127.0.0.1", "ipv6": "::1"}


def _smallest(schema: Any, root: dict[str, Any], depth: int) -> Any:
    if depth > 20 or not isinstance(schema, dict):
        return None
    if "$ref" in schema:
        node: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        return _smallest(node, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            return _smallest(schema[key][0], root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties", {})
        return {k: _smallest(props.get(k, {}), root, depth + 1) for k in schema.get("required", [])}
    if kind == "array":
        return [_smallest(schema.get("items", {}), root, depth + 1)
                for _ in range(schema.get("minItems", 0))]
    if kind == "string":
        if schema.get("format") in _FORMATTED:  # ("" is no date: the tool would not run)
            return _FORMATTED[schema["format"]]
        n = int(schema.get("minLength", 0))
        pattern = schema.get("pattern")
        for text in ("a" * n, "0" * n, "A" * n, "a" * max(n, 1), "0" * max(n, 1)):
            if pattern is None or re.search(pattern, text):
                return text
        return "a" * n
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", 0))
        value = low + 1 if "exclusiveMinimum" in schema and "minimum" not in schema else low
        return int(value) if kind == "integer" else value
    if kind == "boolean":
        return False
    return None
