"""The IPython layer: ``%%subchat`` and ``%subchat``. Parse arguments, call the core,
display. Every :class:`SubchatError` becomes a one-line ``UsageError``."""

from __future__ import annotations

import builtins
import re
import shlex
import sys
from typing import Any, Callable

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import (
    MagicArgumentParser,
    argument,
    magic_arguments,
)
from traitlets import Bool, Enum, Float, Int, TraitError, Unicode, observe, validate

from . import notebook, render, structured
from . import verdict_view as verdicts
from .backends.base import GenerationOptions, check_option
from .batch import check_var
from .batch_view import BatchProgress, BatchTemplate, stored_refs
from .commands import COMMANDS
from .errors import BackendError, ChatNotFound, InvalidInput, SubchatError
from .magic_args import choices_of, in_kernel, parse_line, usage_errors
from .multibatch import run_plain
from .secrets import redact
from .session import Session, check_backend_name, default_session
from .streaming import Coalescer
from .tools import Tool, Toolset, describe
from .tree import normalize_path
from .values import Limits
from .words import counted


def strip_comment(line: str) -> str:
    """A magic's options line without a trailing ``# comment``: a ``#`` that starts a
    word outside quotes begins a comment, as in a shell (``C#`` and ``"a # b"`` stay)."""
    quote = None
    escaped = False
    for i, ch in enumerate(line):
        if escaped:
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line


def _trim(cell: str) -> str:
    """The cell body without leading blank lines and trailing whitespace."""
    return re.sub(r"\A(?:[ \t]*\r?\n)+", "", cell).rstrip()


def _show_final(handle: Any, bundle: dict[str, str]) -> None:
    """Empty the live display and show the final form as a new display_data. The live
    display starts and ends empty, so the saved notebook holds the same outputs as a
    consumer that ignores update_display_data (nbval) computes."""
    from IPython.display import display

    handle.update({"text/plain": ""}, raw=True)
    display(bundle, raw=True)


class ReplyView:
    """Shows one streaming reply: in a kernel, one display updated in place (coalesced,
    Markdown when done, text/plain fallback); in a terminal, deltas written as they come."""

    def __init__(self, shell: Any, fmt: str = "markdown", interval: float = 0.05):
        self.kernel = in_kernel(shell)
        self.fmt = fmt
        self.coalescer = Coalescer(interval)
        self._parts: list[str] = []  # joined only when shown (~20 a second), not per delta
        self.handle = None
        self._written = 0
        self.shown: dict[str, str] | None = None  # the final bundle of a parsed value

    @property
    def text(self) -> str:
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def start(self) -> None:
        if self.kernel:
            from IPython.display import display

            self.handle = display({"text/plain": ""}, raw=True, display_id=True)

    def delta(self, d: str) -> None:
        self._parts.append(d)
        if self.coalescer.tick():
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if self.kernel:
            if final and self.shown is not None:
                _show_final(self.handle, self.shown)
            elif final:
                bundle = {"text/plain": self.text or "(empty reply)"}
                if self.fmt == "markdown":
                    bundle["text/markdown"] = render.reply_markdown(self.text)
                _show_final(self.handle, bundle)
            else:
                self.handle.update({"text/plain": self.text + " ▌"}, raw=True)
        else:
            sys.stdout.write(self.text[self._written:])
            self._written = len(self.text)
            if final:
                sys.stdout.write("\n")
            sys.stdout.flush()

    def finish(self, tag: str | None = None) -> None:
        if tag:
            self._parts.append(f"\n[{tag}]")
        self.coalescer.final()
        self._flush(final=True)


class FanoutView:
    """Several replies side by side in one display (an HTML table), coalesced."""

    def __init__(self, shell: Any, paths: list[str], interval: float = 0.05):
        self.kernel = in_kernel(shell)
        self.paths = paths
        self.texts = ["" for _ in paths]
        self.coalescer = Coalescer(interval)
        self.handle = None

    def start(self) -> None:
        if self.kernel:
            from IPython.display import display

            self.handle = display({"text/plain": ""}, raw=True, display_id=True)

    def delta(self, i: int, d: str) -> None:
        self.texts[i] += d
        if self.kernel and self.coalescer.tick():
            self.handle.update(self._bundle(), raw=True)

    def _plain(self) -> str:
        return "\n".join(f"── {p} ──\n{t}" for p, t in zip(self.paths, self.texts))

    def _bundle(self) -> dict[str, str]:
        import html

        cells = "".join(
            f"<td style='vertical-align:top;padding:4px 8px'><b>{html.escape(p)}</b>"
            f"<div style='white-space:pre-wrap'>{html.escape(t)}</div></td>"
            for p, t in zip(self.paths, self.texts))
        return {"text/plain": self._plain(), "text/html": f"<table><tr>{cells}</tr></table>"}

    def finish(self, tags: list[str | None]) -> None:
        for i, tag in enumerate(tags):
            if tag:
                self.texts[i] += f"\n[{tag}]"
        if self.kernel:
            _show_final(self.handle, self._bundle())
        else:
            print(self._plain())


def _can_ask(shell: Any) -> bool:
    """Whether ``input()`` can be answered in this cell: not in a kernel whose front end
    sent the cell without stdin (``allow_stdin`` false: nbval, papermill, some Run Alls).
    ipykernel keeps that per request on its kernel; elsewhere (a terminal, a plain shell)
    asking is tried, and a failure is said in the tool's result."""
    kernel = getattr(shell, "kernel", None)
    return getattr(kernel, "_allow_stdin", True) is not False


def interrupted(what: str, magic: str = "%%subchat") -> UsageError:
    """Ctrl-C (the kernel's interrupt) in a reply: one line saying what was kept, as a
    batch's does, not a traceback of the stream's frames. A UsageError, so the cell still
    ends in error and a queue of cells (Run All) stops there."""
    return UsageError(f"{magic}: interrupted: {what}")


@magics_class
class SubchatMagics(Magics):
    """Chat with LLMs as a tree of conversations. Defaults: ``%config SubchatMagics``."""

    backend = Unicode("", help="Backend when none is asked for: auto, vllm, ollama, groq, openai, "
                      "echo ('' = LLM_BACKEND from the environment or .env, else auto).").tag(config=True)
    # the generation defaults are GenerationOptions' own, checked by its one validator
    max_tokens = Int(GenerationOptions.max_tokens,
                     help="Default maximum reply length in tokens.").tag(config=True)
    temperature = Float(GenerationOptions.temperature,
                        help="Default sampling temperature (0-2).").tag(config=True)
    top_p = Float(GenerationOptions.top_p, help="Default nucleus sampling top_p (0-1].").tag(config=True)
    model = Unicode("", help="Default model name for the backend ('' = backend default).").tag(config=True)
    think = Bool(None, allow_none=True,
                 help="Let thinking models (Qwen3) think (shown collapsed); None: as the model "
                      "was loaded (%load_vllm --think) or the backend's default.").tag(config=True)
    system_prompt = Unicode("", help="System prompt used when no chat on the path sets one.").tag(config=True)
    store_path = Unicode("", help="Chat store file ('' = $SUBCHAT_STORE, else ./subchats.db).").tag(config=True)
    format = Enum(["markdown", "text"], "markdown", help="How finished replies are shown.").tag(config=True)
    update_interval = Float(0.05, help="Seconds between display updates while streaming.").tag(config=True)
    max_value_chars = Int(4000, help="Most characters a value filled into a message ({name}, "
                          "{Out[3]}, {Err[3]}…) takes; the rest is cut with a note (0: no cut)."
                          ).tag(config=True)
    max_value_rows = Int(20, help="Most rows of a DataFrame, Series or array filled into a "
                         "message.").tag(config=True)
    max_value_columns = Int(20, help="Most columns of a DataFrame or array filled into a "
                            "message.").tag(config=True)
    max_value_digits = Int(6, help="Significant digits of the floats in a DataFrame, Series or "
                           "array filled into a message (0.30000000000000004 reads 0.3; a "
                           "float's whole part is always kept).").tag(config=True)

    def __init__(self, shell: Any = None, session: Session | None = None,
                 open_view: Callable[[Session], Any] | None = None, **kwargs: Any):
        # set before the traits load the shell's config (their observers use it)
        self.session = session or default_session()
        #: makes the live tree view of a session (``%subchat tree``), or None: text only
        self.open_view = open_view
        super().__init__(shell=shell, **kwargs)
        self._sync_defaults()

    # -- configuration -----------------------------------------------------------------------
    @validate("max_tokens", "temperature", "top_p")
    def _check_option(self, proposal: Any) -> Any:
        name = proposal["trait"].name
        try:
            check_option(name, proposal["value"])
        except SubchatError as exc:
            raise TraitError(f"SubchatMagics.{name}: {exc}") from None
        return proposal["value"]

    @validate("update_interval")
    def _check_interval(self, proposal: Any) -> float:
        if not 0.0 <= proposal["value"] <= 10.0:
            raise TraitError("SubchatMagics.update_interval must be between 0 and 10 seconds, "
                             f"not {proposal['value']!r}")
        return proposal["value"]

    @validate("max_value_chars", "max_value_rows", "max_value_columns", "max_value_digits")
    def _check_limit(self, proposal: Any) -> int:
        name, value = proposal["trait"].name, proposal["value"]
        if value < (0 if name == "max_value_chars" else 1):
            raise TraitError(f"SubchatMagics.{name} must be "
                             f"{'0 or more' if name == 'max_value_chars' else '1 or more'}, "
                             f"not {value!r}")
        return value

    @property
    def limits(self) -> Limits:
        """How much of a value goes into a message (the max_value_* settings)."""
        return Limits(self.max_value_chars, self.max_value_rows, self.max_value_columns,
                      self.max_value_digits)

    @validate("backend")
    def _check_backend(self, proposal: Any) -> str:
        value = proposal["value"].strip().lower()
        if value:
            try:
                check_backend_name(value, "SubchatMagics.backend")
            except SubchatError as exc:
                raise TraitError(str(exc)) from None
        return value

    @observe("backend", "max_tokens", "temperature", "top_p", "model", "think", "system_prompt",
             "store_path", "format", "update_interval")
    def _on_config(self, change: Any) -> None:
        self._sync_defaults()

    def _sync_defaults(self) -> None:
        d = self.session.defaults
        d.backend = self.backend or None
        d.options = GenerationOptions(max_tokens=self.max_tokens, temperature=self.temperature,
                                      top_p=self.top_p, model=self.model or None,
                                      think=self.think).validate()
        d.system_prompt = self.system_prompt or None
        d.store_path = self.store_path or None
        d.format = self.format
        d.update_interval = self.update_interval

    # -- %%subchat ---------------------------------------------------------------------------
    @no_var_expand  # the line gets the cell's own {name} rule (_line), not IPython's
    @magic_arguments()
    @argument("path", nargs="?", default=None,
              help="Chat path, e.g. root/physics (a path without 'root/' is under root). "
                   "A new path is created under its parent. Default: the current chat.")
    @argument("-b", "--backend", default=None,
              help="Backend for this cell: auto, or a name that %%subchat backends lists.")
    @argument("-m", "--model", default=None, help="Model name for the backend.")
    @argument("-s", "--system", default=None, help="Set this chat's system prompt (inherited by its subchats).")
    @argument("-n", "--max-tokens", type=int, default=None, help="Maximum reply length in tokens.")
    @argument("-t", "--temperature", type=float, default=None, help="Sampling temperature, 0 to 2.")
    @argument("--top-p", type=float, default=None, help="Nucleus sampling top_p, in (0, 1].")
    @argument("--seed", type=int, default=None, help="Sampling seed (where the backend supports it).")
    @argument("--think", action="store_true", default=None, help="Let thinking models think.")
    @argument("--no-think", dest="think", action="store_false", help="Turn thinking off.")
    @argument("--num-ctx", type=int, default=None,
              help="Ollama's context window in tokens. Default: OLLAMA_NUM_CTX, else what the "
                   "chat needs (powers of two from 4096) up to the model's limit.")
    @argument("-f", "--format", choices=["markdown", "text", "code"], default=None,
              help="Show the finished reply as Markdown or plain text; code: show it and put "
                   "its code (the fenced blocks, else the whole reply) in a new cell below, "
                   "not run.")
    @argument("-o", "--var", default=None,
              help="Store the reply text in this variable of the notebook namespace.")
    @argument("--fanout", type=int, default=None,
              help="Send the message into N new sibling subchats of PATH at once (batched).")
    @argument("--children", default=None,
              help="Comma-separated names of the subchats of PATH to fan out to, e.g. a,b,c.")
    @argument("--temperatures", default=None,
              help="With --fanout/--children: comma-separated temperatures, one per subchat.")
    @argument("--json", nargs="?", const="", default=None, metavar="SCHEMA",
              help="The reply is JSON: valid against SCHEMA (a variable holding a JSON Schema "
                   "dict or a pydantic model class), else any JSON object. --var gets the "
                   "parsed value. Put PATH before it (or write --json=SCHEMA).")
    @argument("--choice", default=None, metavar="A,B,C",
              help="The reply is exactly one of A,B,C (or of the list in variable NAME).")
    @argument("--regex", default=None, metavar="PATTERN",
              help="The whole reply matches PATTERN (braces stay as typed: '[0-9]{3}').")
    @argument("--best-effort", action="store_true", default=None,
              help="With --json/--choice/--regex: use a backend that cannot enforce it and "
                   "validate the reply when it is in.")
    @argument("--tools", default=None, metavar="F,G",
              help="Let the model call these notebook functions (or the functions in the "
                   "list variable NAME): described from their signatures, type hints and "
                   "docstrings; each call is asked before it runs (see --yes), its result "
                   "sent back; the calls and results are messages of the chat.")
    @argument("--yes", action="store_true", default=None,
              help="With --tools: run the calls without asking.")
    @argument("--max-rounds", type=int, default=None, metavar="N",
              help="With --tools: at most N rounds of calls (default 5), then stop.")
    @argument("--each", default=None, metavar="NAME",
              help="Send the cell once per item of the variable NAME (a list, tuple, dict, "
                   "pandas Series or DataFrame), each into its own chat PATH/NAME/<index>: "
                   "{item} is the item, {index} its index, {field} a field of a dict, "
                   "DataFrame row or named tuple. A rerun sends only the rows not done.")
    @argument("--as", dest="as_var", default=None, metavar="VAR",
              help="With --each: the replies in VAR, in input order (a list, or a pandas "
                   "Series with the input's index); None for a row that failed.")
    @argument("--limit", type=int, default=None, metavar="K",
              help="With --each: only the first K items (to try a prompt first).")
    @argument("--concurrency", type=int, default=None, metavar="N",
              help="With --each: requests in flight (remote backends, default 4; vLLM: all, "
                   "up to 1024, in the engine at once).")
    @argument("--fresh", action="store_true", default=None,
              help="With --each: start a new batch chat (NAME-2, ...) instead of resuming.")
    @argument("--redo", action="store_true", default=None,
              help="With --each: resend the rows whose request changed (message, system "
                   "prompt, options, constraint, backend, model); their earlier replies are "
                   "kept (attempt-N subchats of each row).")
    @argument("--vote", type=int, default=None, metavar="K",
              help="K samples of the message (2-64; on vLLM one request with n=K) kept as K "
                   "numbered subchats, and the verdict, the most common answer, on the chat "
                   "('7/8 agree'); --var/--as get the verdict. Sampled at 0.7 unless -t.")
    @argument("--answer", default=None, metavar="PATTERN",
              help="With --vote: compare the first group of PATTERN in each sample, e.g. "
                   "'\\boxed\\{(.+?)\\}' (default: the parsed value under "
                   "--json/--choice/--regex, else the stripped reply).")
    @argument("--compare", default=None, metavar="A,B",
              help="Send the message to each backend or backend:model at once, into "
                   "subchats named after the model, side by side (e.g. vllm,groq:MODEL).")
    @argument("--labels", default=None, metavar="NAME",
              help="With --each: a column of the DataFrame (or a list variable of the same "
                   "length) holding the right answers: accuracy (per model), a confusion "
                   "table and the rows that disagree.")
    @argument("--estimate", action="store_true", default=None,
              help="With --each: before the batch, the rows, their prompt tokens (the model's "
                   "tokenizer on vLLM), the KV budget, and a projected time and output tokens "
                   "from a timed sample (kept as rows of the batch); then it stops.")
    @argument("--sample", type=int, default=None, metavar="K",
              help="With --estimate: the rows timed (default 4; 0: count only).")
    @cell_magic
    @usage_errors("%%subchat")
    def subchat(self, line: str, cell: str) -> None:
        """Send the cell as a message into a chat of the tree and stream the reply.

        ``{name}`` in the cell is replaced by ``name`` from the notebook namespace,
        ``{In[3]}`` by the source of execution 3, ``{Out[3]}`` by its result, ``{Err[3]}``
        by the error it raised, ``{_}`` by the last result (``{In[-1]}``: the cell before
        this one); values are cut to ``%config SubchatMagics.max_value_chars`` (DataFrames
        and arrays to max_value_rows/columns) and known keys are masked. Other braces stay
        as written; ``{{``/``}}`` are literal braces. The chat used becomes the current
        one. ``--var NAME`` stores the reply in ``NAME``.

        Examples::

            %%subchat root --system "You are a physics tutor."
            What is a newton?

            %%subchat root/units
            And a joule?

            %%subchat root --fanout 3 --var answers
            Name a colour.

            %%subchat root --each questions --as answers
            Answer briefly ({index}): {item}

            %%subchat root --format code
            Fix this cell: {In[-1]} It raised: {Err[-1]}
        """
        args = parse_line(self.subchat, self._line(line, path_first=True))
        args.line = line
        verdicts.check_estimate(args)
        check_var(args.var, "--var")
        fanout = args.fanout is not None or args.children is not None
        if args.temperatures is not None and not fanout:  # (a vote, a batch: it was ignored)
            raise UsageError("%%subchat: --temperatures goes with --fanout N or --children a,b")
        if args.format == "code" and fanout:
            raise UsageError("%%subchat: --format code takes the code of one reply; it does "
                             "not go with --fanout/--children")
        opts = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                    seed=args.seed, model=args.model, think=args.think,
                    extra={"num_ctx": args.num_ctx} if args.num_ctx is not None else None,
                    constraint=structured.from_options(
                        json=args.json, choice=choices_of(args), regex=args.regex,
                        best_effort=args.best_effort, namespace=self.shell.user_ns))
        tools = self._tools(args)
        if args.each is not None or any(v is not None for v in (
                args.as_var, args.limit, args.concurrency, args.fresh, args.redo,
                args.labels)):
            if tools is not None:
                opts.update(tools=tools, approve=True if args.yes else None,
                            max_rounds=args.max_rounds, limits=self.limits)
            return self._each(args, _trim(cell or ""), opts)  # one message per item
        many = args.vote is not None or args.answer is not None or args.compare is not None
        if many:
            if tools is not None:
                raise UsageError("%%subchat: --tools goes with one reply, --fanout or --each, "
                                 "not with --vote, --answer or --compare")
            verdicts.check_cell(args, fanout)
        filled = notebook.context(self.shell).fill(_trim(cell or ""), self.limits)
        text = filled.text
        if many:
            self._say_masked(filled)
            return verdicts.run_cell(self, args, text, opts, FanoutView)
        if fanout:
            self._say_masked(filled)
            if tools is not None:
                return self._fanout_tools(args, text, opts, tools)
            return self._fanout(args, text, opts)
        if tools is not None:
            run = self.session.send(args.path, text, backend=args.backend, system=args.system,
                                    tools=tools, approve=True if args.yes else None,
                                    max_rounds=args.max_rounds, limits=self.limits, **opts)
            self._say_masked(filled)
            return self._stream_tools(run, args.format or self.format, args.var)
        turn = self.session.send(args.path, text, backend=args.backend, system=args.system, **opts)
        self._say_masked(filled)
        self._stream(turn, args.format or self.format, args.var)

    def _fanout_tools(self, args: Any, text: str, opts: dict[str, Any], tools: Any) -> None:
        """``--fanout``/``--children`` with ``--tools``: each subchat's tool loop in turn,
        under its path; --var gets the answers in order."""
        names = args.children.split(",") if args.children is not None else None
        temps = None
        if args.temperatures is not None:
            try:
                temps = [float(x) for x in args.temperatures.split(",")]
            except ValueError:
                raise UsageError("%%subchat: --temperatures takes numbers, one per subchat, "
                                 f"e.g. 0,0.7,1.0, not {args.temperatures!r}") from None
        runs = self.session.fanout(args.path, text, n=args.fanout, names=names,
                                   backend=args.backend, system=args.system, temperatures=temps,
                                   tools=tools, approve=True if args.yes else None,
                                   max_rounds=args.max_rounds, limits=self.limits, **opts)
        values: list[Any] = []
        try:
            for run in runs:
                print(f"── {run.chat.path} ──")
                box: dict[str, Any] = {}
                try:
                    self._stream_tools(run, args.format or self.format, "_", into=box)
                except UsageError as exc:  # Ctrl-C: the line says what every subchat holds
                    i = len(values)
                    done = [r.chat.path for r in runs[:i]]
                    rest = [r.chat.path for r in runs[i + 1:]]
                    if not str(exc).startswith("%%subchat: interrupted: ") or not (done or rest):
                        raise
                    raise UsageError("; ".join(
                        [str(exc)] + ([f"{', '.join(done)} finished"] if done else [])
                        + ([f"{', '.join(rest)} not sent"] if rest else []))) from None
                values.append(box.get("_"))
        finally:
            if args.var:
                self.shell.user_ns[args.var] = values + [None] * (len(runs) - len(values))

    def _tools(self, args: Any) -> Any:
        """``--tools f,g`` (or the name of a list of functions) as a Toolset; --yes and
        --max-rounds without it are refused."""
        if args.tools is None:
            if args.yes is not None or args.max_rounds is not None:
                raise UsageError("%%subchat: --yes and --max-rounds go with --tools f,g")
            return None
        ns = self.shell.user_ns
        found: list[Any] = []
        for name in (n.strip() for n in args.tools.split(",")):
            if not name:
                continue
            if name not in ns:
                if callable(getattr(builtins, name, None)):
                    raise UsageError(f"%%subchat: --tools {name}: {name} is a Python builtin, "
                                     "which cannot be a tool (no typed, named parameters); "
                                     f"wrap it in a def with typed parameters, e.g. def "
                                     f"my_{name}(x: str) -> ...")
                raise UsageError(f"%%subchat: --tools {name}: no variable {name!r} in the "
                                 "notebook; define the function first")
            value = ns[name]
            if isinstance(value, (list, tuple)):
                # (NAME[i] is no tool name: each is named by its own __name__)
                found += [(f"{name}[{i}]", v) for i, v in enumerate(value)]
            else:
                found.append((name, value))  # a partial or an instance: the variable's name
        if not found:
            raise UsageError("%%subchat: --tools needs function names, e.g. --tools lookup,plot")
        toolset = Toolset.of([v if isinstance(v, Tool) else describe(v, label=label)
                              for label, v in found])  # (a Tool: e.g. an export's recorded one)
        if not args.yes and not _can_ask(self.shell):
            raise UsageError("%%subchat: --tools asks before each call, but this cell was sent "
                             "without stdin (as nbval and papermill do), so no call could be "
                             "approved; add --yes to run the calls without asking")
        return toolset

    def _stream_tools(self, run: Any, fmt: str, var: str | None,
                      into: dict[str, Any] | None = None) -> None:
        """Stream a tool run: each round's text, each call and result shown collapsed (the
        call asked about first unless --yes), then the answer as a reply. ``var`` is set
        in ``into`` (default: the notebook's namespace)."""
        ns = self.shell.user_ns if into is None else into
        view: ReplyView | None = None
        events = run.events()
        try:
            for ev in events:
                if isinstance(ev, str):
                    if view is None:
                        view = ReplyView(self.shell, "markdown" if fmt == "code" else fmt,
                                         self.update_interval)
                        view.start()
                    view.delta(ev)
                elif ev.kind == "call" and view is not None:
                    view.finish()  # a round's text before its calls
                    view = None
                elif ev.kind == "result":
                    self._show_tool_result(ev.result)
        except KeyboardInterrupt:
            events.close()
            if view is not None:
                view.finish("interrupted: partial reply kept" if run.text else
                            "interrupted: nothing arrived")
            done = sum(1 for _, r in run.calls if r.status != "interrupted")
            if var:
                ns[var] = run.text
            partial = "; the partial reply too" if run.text else ""
            raise interrupted(f"{counted(done, 'finished tool call')} kept in "
                              f"{run.chat.path}{partial}") from None
        except BackendError as exc:
            if view is not None:
                view.finish(f"error: partial reply kept in {run.chat.path}" if run.text else None)
            raise UsageError(f"%%subchat: {redact(str(exc))}") from None
        finally:
            events.close()
        if run.stopped:
            print(f"note: {run.stopped}")
            if var:
                ns[var] = None
            return
        if view is None:
            view = ReplyView(self.shell, "markdown" if fmt == "code" else fmt, self.update_interval)
            view.start()
        turn = run.turn
        constrained = turn.options.constraint is not None
        if constrained and turn.value is not None:
            view.shown = structured.bundle(turn.value, turn.text)
        view.finish(structured.mark(turn.reply) if constrained and structured.mark(turn.reply)
                    else "stopped at max tokens" if turn.finish and turn.finish.reason == "length"
                    else None)
        for note in run.notes:
            print(f"note: {note}")
        if var:
            ns[var] = turn.value if constrained else turn.text
        if fmt == "code":
            self._next_cell(turn.text)

    def _show_tool_result(self, result: Any) -> None:
        """One call and its result, collapsed: a ``<details>`` in a notebook, one line in a
        terminal."""
        line = render.tool_line(result.call.signature(), result.content, result.status)
        if not in_kernel(self.shell):
            print(line)
            return
        from IPython.display import display

        display({"text/plain": line,
                 "text/html": render.tool_html(result.call.signature(), result.content,
                                               result.status)}, raw=True)

    def _line(self, line: str, path_first: bool = False) -> str:
        """A magic's options line as typed, without its ``# comment``, with ``{name}`` of
        a notebook variable filled in by the cell's own rule (other braces stay) and known
        keys masked (said in a note). ``path_first``: the first word is a chat path, and
        one that filling makes invalid (a value with a space) is said as such."""
        raw = strip_comment(line)
        ns, hidden = self.shell.user_ns, getattr(self.shell, "user_ns_hidden", None)
        filled = notebook.interpolate(raw, ns, hidden, limits=Limits(chars=0),
                                      typed="the options line")
        words = raw.split(None, 1)
        if path_first and words and not words[0].startswith("-") and "{" in words[0]:
            path = notebook.interpolate(words[0], ns, hidden, limits=Limits(chars=0)).text
            if path != words[0]:
                why = ("it holds a space, which splits the line into several arguments"
                       if any(ch.isspace() for ch in path) else None)
                try:
                    normalize_path(path)
                except InvalidInput as exc:
                    why = why or str(exc).partition(": ")[2] or str(exc)
                if why:
                    raise UsageError(
                        f"%%subchat: the chat path {words[0]} is {path[:80]!r} once filled in, "
                        f"which is not a valid chat name: {why}; chat names are 1-100 letters, "
                        "digits, '_', '-' or '.': give the variable such a value, or write the "
                        "path out")
        self._say_masked(filled)
        return filled.text

    def _say_masked(self, filled: notebook.Filled) -> None:
        if filled.masked:
            print(f"note: a key was masked in {', '.join(dict.fromkeys(filled.masked))} "
                  "before sending")

    def _say_recovered(self, turns: list[Any]) -> None:
        """A reply whose chat was deleted while it streamed (another kernel, a view) was
        stored in a recovery chat: say where, and move the current chat as for a delete."""
        moved = False
        for turn in turns:
            reply = getattr(turn, "reply", None)
            if reply is None or reply.chat_id in (None, turn.chat.id):
                continue
            try:
                where = self.session.tree.find(reply.chat_id)
            except SubchatError:  # the store itself is gone: the next command says so
                where = None
            print(f"note: {reply.provenance.get('recovered_from', turn.chat.path)} was deleted "
                  "while the reply streamed (by another kernel or view); the exchange is kept "
                  f"in {where.path if where else f'chat #{reply.chat_id}'}")
            moved = True
        if moved:
            try:
                self.session.current_chat()
            except ChatNotFound:
                print(f"note: the current chat is now {self.session.current}")

    def _stream(self, turn: Any, fmt: str, var: str | None, magic: str = "%%subchat") -> None:
        """Stream a turn into a reply display; ``fmt`` ``code`` also puts the reply's code
        in a new cell below (never run). ``var`` gets the reply text."""
        view = ReplyView(self.shell, "markdown" if fmt == "code" else fmt, self.update_interval)
        view.start()
        stream = iter(turn)
        # the per-delta work of view.delta, inlined: it runs for every streamed chunk
        keep, due, flush = view._parts.append, view.coalescer.tick, view._flush
        try:
            for delta in stream:
                keep(delta)
                if due():
                    flush(final=False)
        except KeyboardInterrupt:
            stream.close()  # Ctrl-C may land in the display code: end the turn now
            view.finish("interrupted: partial reply kept" if turn.text else
                        "interrupted: nothing arrived")
            if var:  # what arrived, maybe "" (under a constraint: no value, as a batch row)
                self.shell.user_ns[var] = None if turn.options.constraint is not None else turn.text
            where = turn.reply.chat_id if turn.reply is not None else None
            path = turn.chat.path if where in (None, turn.chat.id) else f"chat #{where}"
            raise interrupted(f"the partial reply is kept in {path}" if turn.text else
                              f"nothing arrived; the message is kept in {path}",
                              magic) from None
        except BackendError as exc:
            view.finish(f"error: partial reply kept in {turn.chat.path}" if turn.text else None)
            raise UsageError(f"{magic}: {redact(str(exc))}") from None
        finally:
            stream.close()
            self._say_recovered([turn])
        constrained = turn.options.constraint is not None
        if constrained and turn.value is not None:
            view.shown = structured.bundle(turn.value, turn.text)
        view.finish(structured.mark(turn.reply) if constrained and structured.mark(turn.reply)
                    else "stopped at max tokens" if turn.finish and turn.finish.reason == "length"
                    else None)
        for note in turn.notes:
            print(f"note: {note}")
        if var:
            self.shell.user_ns[var] = turn.value if constrained else turn.text
        if fmt == "code":
            self._next_cell(turn.text)

    def _next_cell(self, reply: str) -> None:
        """Put a reply's code in a new cell below this one (a terminal: the next input)."""
        code = render.reply_code(reply)
        if not code:
            print("note: the reply has no text, so no cell was added (it is stored)")
            return
        self.shell.set_next_input(code, replace=False)
        print("note: its code is in a new cell below (not run)" if in_kernel(self.shell) else
              f"note: its code is the next input:\n{code}")

    def _each(self, args: Any, template: str, opts: dict[str, Any]) -> None:
        """``--each NAME``: the cell is a template sent once per item (batch.py does it)."""
        if args.each is None:
            raise UsageError("%%subchat: --as, --limit, --concurrency, --fresh, --redo and "
                             "--labels go with --each NAME")
        if verdicts.wanted(args):
            if args.tools is not None:
                raise UsageError("%%subchat: --tools goes with a plain --each, not with --vote, "
                                 "--answer, --compare or --labels")
            return verdicts.run_each(self, args, template, opts)
        clash = [flag for flag, v in (("--fanout", args.fanout), ("--children", args.children),
                                      ("--temperatures", args.temperatures), ("--var", args.var))
                 if v is not None] + (["--format code"] if args.format == "code" else [])
        if clash:
            raise UsageError(f"%%subchat: --each does not go with {', '.join(clash)} "
                             "(each item is its own chat; --as VAR takes the replies)")
        check_var(args.as_var)
        if args.as_var is not None and args.as_var == args.each:
            raise UsageError(f"%%subchat: --as {args.as_var} would overwrite the items of "
                             f"--each {args.each}; name the results otherwise (e.g. --as "
                             f"{args.each}_out)")
        ns = self.shell.user_ns
        if args.each not in ns:
            raise UsageError(f"%%subchat: --each {args.each}: no variable {args.each!r} in the "
                             "notebook; assign the list or DataFrame first")
        session = self.session
        refs = {} if args.fresh else stored_refs(session, args.path, args.each)
        fill = BatchTemplate(self.shell, template, self.limits, refs)
        view = BatchProgress(self.shell, f"--each {args.each}")  # (its path once planned)
        try:
            batch = session.batch(args.path, ns[args.each], fill.row, name=args.each,
                                  fresh=bool(args.fresh), redo=bool(args.redo),
                                  limit=args.limit, concurrency=args.concurrency,
                                  backend=args.backend, system=args.system, known=fill.known,
                                  template=template, planning=view.planning,
                                  mark={"refs": fill.refs} if fill.refs else None, **opts)
        except KeyboardInterrupt:  # (planning a big batch takes seconds): one line
            view.close()
            raise UsageError("%%subchat: interrupted while planning the batch; no row was "
                             "sent: run the cell again to start it") from None
        except BaseException:
            view.close()
            raise
        if fill.masked:
            print(f"note: a key was masked in {', '.join(dict.fromkeys(fill.masked))} before "
                  "sending")
        view.path = batch.path
        if args.estimate:
            return verdicts.estimate_each(self, args, batch, [verdicts.estimate.Side(
                batch.backend, batch.make_exchange(batch.chat, "x").options)],
                lambda: batch.run(view), view)
        try:
            run_plain(batch, view)  # identical prompts at temperature 0 sent once
        except KeyboardInterrupt:
            view.close()
            self._each_done(batch.result(), args.as_var, interrupted=True)
            return
        view.close()
        self._each_done(batch.result(), args.as_var)

    def _each_done(self, result: Any, var: str | None, interrupted: bool = False) -> None:
        """The summary line, the first failure, the notes; ``var`` gets the results. After
        Ctrl-C: the same, then one line (a UsageError, so a queue of cells stops there)."""
        print(result.summary())
        line = result.failed_line()
        if line:
            print(line)
        for note in result.notes:
            print(f"note: {note}")
        if var:
            self.shell.user_ns[var] = result.output(var)
        if interrupted:
            cut = sum(1 for r in result.rows if r.status in ("interrupted", "pending"))
            raise UsageError(f"%%subchat: interrupted: {cut} row(s) not done; run the cell "
                             "again to send only those")

    def _fanout(self, args: Any, text: str, opts: dict[str, Any]) -> None:
        names = args.children.split(",") if args.children is not None else None
        temps = None
        if args.temperatures is not None:
            try:
                temps = [float(x) for x in args.temperatures.split(",")]
            except ValueError:
                raise UsageError("%%subchat: --temperatures takes numbers, one per subchat, "
                                 f"e.g. 0,0.7,1.0, not {args.temperatures!r}") from None
        fan = self.session.fanout(args.path, text, n=args.fanout, names=names, backend=args.backend,
                                  system=args.system, temperatures=temps, **opts)
        view = FanoutView(self.shell, [t.chat.path for t in fan.turns], self.update_interval)
        view.start()
        error: BaseException | None = None
        stream = iter(fan)
        try:
            for i, delta in stream:
                view.delta(i, delta)
        except KeyboardInterrupt:
            stream.close()
            view.finish(["interrupted" if t.text else "interrupted: nothing arrived"
                         for t in fan.turns])
            if args.var:
                self.shell.user_ns[args.var] = [t.text for t in fan.turns]
            kept = sum(1 for t in fan.turns if t.text)
            raise interrupted(f"{counted(kept, 'partial reply', 'partial replies')} kept in "
                              f"{', '.join(t.chat.path for t in fan.turns)}") from None
        except BackendError as exc:
            error = exc
        finally:
            stream.close()
            self._say_recovered(fan.turns)
        view.finish([None if (t.reply and t.reply.status == "complete") else
                     (t.reply.provenance.get("finish_reason") if t.reply else "error")
                     for t in fan.turns])
        if args.var:
            self.shell.user_ns[args.var] = [t.value if t.options.constraint is not None
                                            else t.text for t in fan.turns]
        if error is not None:
            raise UsageError(f"%%subchat: {redact(str(error))}")

    # -- %subchat ----------------------------------------------------------------------------
    @no_var_expand  # the line gets the cell's own {name} rule (_line), not IPython's
    @line_magic("subchat")
    @usage_errors("%subchat")
    def subchat_line(self, line: str = "") -> Any:
        """Manage the chat tree. Subcommands:

        tree [--text]                  the tree (a live view in a notebook)
        show [PATH] [-p] [--own]       a chat's transcript (-p: provenance of replies)
        use PATH                       make PATH the current chat
        status                         store, current chat, active backend and why
        reopen [--restore]             open the store file again after it was removed or
                                       replaced (--restore: write back the tree still held)
        copy-to FILE                   copy the store to FILE and continue there (a store
                                       that opened read-only, e.g. from /kaggle/input)
        backend [NAME]                 show or set this session's backend
        backends                       every backend: available or not, and why
        doctor                         what this kernel can do (GPUs, driver, torch/vLLM,
                                       backends, store, models, internet) and what to fix
        key NAME                       enter an API key for groq/openai with getpass
        explain [N] [--into PATH]      send the last error (or execution N's) and its cell's
                                       code to the current chat (or PATH): cause and fix
        export PATH [--format md|json|ipynb] [--out FILE]
        import FILE [--into PATH]      add chats from a JSON export
        rename PATH NEW_NAME           rename a chat
        system PATH [TEXT]             show or set a chat's system prompt ('' to clear)
        delete PATH [--force]          delete a chat (--force when it has subchats)
        help                           this help
        """
        try:
            words = shlex.split(self._line(line))
        except ValueError as exc:
            raise UsageError(f"%subchat: cannot parse {line!r}: {exc}") from None
        if not words or words[0] in ("help", "-h", "--help"):
            print(self.subchat_line.__doc__.replace("        ", "  "))
            return None
        cmd, rest = words[0], words[1:]
        handler = COMMANDS.get(cmd)
        if handler is None:
            raise UsageError(
                f"%subchat: unknown subcommand {cmd!r}; one of: {', '.join(SUBCOMMANDS)} "
                "(%subchat help explains them)")
        result = handler(self, rest)
        note = self.session.store_note()
        if note:
            print(f"note: {note}")
        return result

    def _parser(self, cmd: str, *specs: tuple[tuple[str, ...], dict[str, Any]]) -> MagicArgumentParser:
        p = MagicArgumentParser(prog=f"%subchat {cmd}", add_help=False)
        for names, kw in specs:
            p.add_argument(*names, **kw)
        return p

    def _parse(self, cmd: str, rest: list[str], *specs: tuple[tuple[str, ...], dict[str, Any]]) -> Any:
        try:
            return self._parser(cmd, *specs).parse_args(rest)
        except UsageError as exc:
            raise UsageError(f"%subchat {cmd}: {exc}; see %subchat help") from None

    def _show(self, text: str, markdown: str | None = None) -> None:
        if in_kernel(self.shell) and markdown is not None:
            from IPython.display import display

            display({"text/plain": text, "text/markdown": markdown}, raw=True)
        else:
            print(text)

SUBCOMMANDS = sorted(COMMANDS) + ["help"]


def _align_usage(doc: str) -> str:
    """IPython's help puts ``%`` before the usage line but indents its continuation
    lines as for ``usage:``; line them up under the first option, and name the cell
    magic ``%%subchat``."""
    head, sep, rest = doc.partition("::\n\n")
    lines = rest.split("\n")
    if not lines or not lines[0].startswith("  %"):
        return doc
    lines[0] = lines[0].replace("  %subchat ", "  %%subchat ", 1)
    col = len("  %%subchat ")
    for i in range(1, len(lines)):
        if not lines[i].strip():
            break
        lines[i] = " " * col + lines[i].lstrip()
    return head + sep + "\n".join(lines)


SubchatMagics.subchat.__doc__ = _align_usage(SubchatMagics.subchat.__doc__ or "")
