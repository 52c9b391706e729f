"""Text, Markdown and JSON views of the tree: ``%subchat tree``/``show``/``export``."""

from __future__ import annotations

import html
import json
import keyword
import pprint
import re
import shlex
import time
from typing import Any

from . import batch, scores, structured
from .errors import InvalidInput
from .exchange import CONFIG_SYSTEM, system_in_force
from .tools import arguments_key
from .tree import Chat, ChatTree, Message
from .verdict import Verdict
from .vote import MARK as VOTE_MARK
from .words import counted

EXPORT_FORMAT = "subchat-magics/1"
_THINK = re.compile(r"^\s*<think>(.*?)(</think>|$)", re.S)


def split_thinking(text: str) -> tuple[str | None, str]:
    """``("thinking", "answer")`` for a reply that starts with a ``<think>`` block."""
    m = _THINK.match(text or "")
    if not m:
        return None, text
    return m.group(1).strip(), text[m.end():].lstrip()


def reply_markdown(text: str) -> str:
    """A reply as Markdown, its thinking (if any) collapsed."""
    thinking, answer = split_thinking(text)
    if not thinking:
        return answer
    return (f"<details><summary>thinking</summary>\n\n{html.escape(thinking)}\n\n</details>\n\n"
            f"{answer}")


def provenance_line(m: Message) -> str:
    p = m.provenance
    if not p:
        return ""
    bits = [p.get("backend") or "?"]
    if p.get("model") and p.get("model") != p.get("backend"):
        bits.append(str(p["model"]))
    toks = []
    if p.get("prompt_tokens") is not None:
        toks.append(f"{p['prompt_tokens']} in")
    if p.get("completion_tokens") is not None:
        toks.append(f"{p['completion_tokens']} out")
    if p.get("cached_tokens") is not None:
        toks.append(f"{p['cached_tokens']} cached")
    if toks:
        bits.append(" / ".join(toks) + " tokens")
    if p.get("ttft_s") is not None:
        bits.append(f"first token {p['ttft_s'] * 1000:.0f} ms")
    if p.get("duration_s") is not None:
        bits.append(f"{p['duration_s']:.2f} s")
    bits.append(str(p.get("finish_reason", "")))
    line = " · ".join(b for b in bits if b)
    if p.get("system_from"):
        line += f"\n  system prompt: {_source_words(p['system_from'])}"
    c = p.get("constraint")
    if isinstance(c, dict):  # --json/--choice/--regex: what it was, enforced or only checked
        line += (f"\n  constraint: --{c.get('kind')} {c.get('digest')}"
                 + (f" ({c['model']})" if c.get("model") else "")
                 + (", enforced while generating" if c.get("enforced")
                    else ", validated after (not enforced)"))
    if p.get("error"):  # why it failed, as stored
        line += f"\n  error: {p['error']}"
    mark = p.get(batch.MARK)
    if isinstance(mark, dict):
        line += f"\n  batch row {mark.get('item')} of {mark.get('of')}"
        if mark.get("attempt"):
            line += f" (attempt {mark['attempt']})"
        if mark.get("digest"):
            line += f" · request {mark['digest']}"
        if mark.get("cut_value"):
            line += " · a value was cut at max_value_chars"
    for note in p.get("notes", ()):
        line += f"\n  note: {note}"
    return line


def tool_line(signature: str, result: str, status: str = "ok", width: int = 80) -> str:
    """A call and its result on one line: ``🔧 lookup(id=3) → row 3``."""
    short = " ".join((result or "").split())
    if len(short) > width:
        short = short[: width - 1] + "…"
    mark = "" if status in ("ok", "complete") else f" [{status}]"
    return f"🔧 {signature} → {short}{mark}"


def tool_html(signature: str, result: str, status: str = "ok") -> str:
    """A call and its result collapsed: the call and a short result as the summary, the
    whole result inside."""
    return (f"<details><summary><code>{html.escape(tool_line(signature, result, status))}"
            f"</code></summary><pre>{html.escape(result or '')}</pre></details>")


def _call_signature(call: dict[str, Any]) -> str:
    args = call.get("arguments")
    if isinstance(args, dict):
        inner = ", ".join(f"{k}={v!r}" for k, v in args.items())
    else:
        inner = repr(args)
    return f"{call.get('name', '?')}({inner})"


def _tool_timing(m: Message) -> str:
    d = m.provenance.get("duration_s")
    return f" ({d * 1000:.3g} ms)" if isinstance(d, (int, float)) else ""


def batch_summary(tree: ChatTree, chat: Chat, markdown: bool = False) -> list[str] | None:
    """What ``show`` prints for a batch chat: its counts, the request it was run with and
    its first failures (None when ``chat`` is not a batch chat)."""
    if not batch.is_batch_chat(tree, chat):
        return None
    board = scores.board(tree, chat)
    if board is not None and board.compare:
        # a comparison's row holds one subchat per model: a row is done when every model is
        return [f"batch of {counted(board.total, 'row')}, {counted(len(board.sides), 'model')} "
                f"({', '.join(map(str, board.sides))}): {board.done}/{board.total} done",
                *board.lines(),
                f"rows: {chat.path}/<index>/<model> (%subchat show {chat.path}/"
                f"{board.rows[0] if board.rows else 0}/{board.sides[0]} -p)"]
    stored = batch.stored_rows(tree, chat)
    latest = [(name, st.latest) for name, st in stored.items() if st.latest is not None]
    total = max([int((a.provenance.get(batch.MARK) or {}).get("of") or 0) for _, a in latest]
                + [len(stored)])
    status = {n: batch.loop_status(tree, a) for n, a in latest}  # (a tool row: its loop's end)
    done = sum(1 for n, _ in latest if status[n] == "complete")
    failed = [(n, a) for n, a in latest if status[n] == "error"]
    cut = [(n, a) for n, a in latest if status[n] not in ("complete", "error")]
    bits = [f"{done}/{total} done"]
    if failed:
        bits.append(f"{len(failed)} failed")
    if cut:
        bits.append(f"{len(cut)} interrupted")
    attempts = sum(len([a for a in st.attempts if a.messages]) for st in stored.values())
    out = [f"batch of {counted(total, 'row')}: {', '.join(bits)}"
           + (f" ({counted(attempts - len(latest), 'earlier attempt')} kept)" if attempts > len(latest)
              else "")]
    if latest:
        p = latest[-1][1].provenance
        req = [str(p.get("backend") or "?")]
        if p.get("model") and p.get("model") != p.get("backend"):
            req.append(str(p["model"]))
        c = p.get("constraint")
        if isinstance(c, dict):
            req.append(f"--{c.get('kind')} {c.get('digest')}")
        out.append("request: " + " · ".join(req) + f" · first message: "
                   f"{(latest[0][1].user or '')[:120]!r}")
    for name, a in failed[:3]:
        out.append(f"failed: {chat.path}/{name}: {a.provenance.get('error') or a.provenance.get('finish_reason')}")
    if board is not None:
        out.extend(board.lines())
    out.append(f"rows: {chat.path}/<index> (%subchat show {chat.path}/{latest[0][0] if latest else 0} -p)")
    return out


# the one resolver of the prompt in force lives with the exchange (it decides what is sent)
system_source = system_in_force


def _source_words(source: str) -> str:
    if source == "own":
        return "its own"
    if source == CONFIG_SYSTEM:
        return f"from {CONFIG_SYSTEM}"
    return f"inherited from {source}"


def _status_tag(m: Message) -> str:
    if m.status == "complete":
        return ""
    reason = m.provenance.get("finish_reason", m.status)
    return f" [{reason}]"


def reply_source(status: str, provenance: dict[str, Any]) -> str:
    """Who wrote a reply, as the tree shows it: ``backend/model``, with ``[reason]`` if it
    did not complete; ``""`` if no backend is recorded."""
    backend = provenance.get("backend")
    if not backend:
        return ""
    text = str(backend)
    if provenance.get("model") and provenance["model"] != backend:
        text += f"/{provenance['model']}"
    if status != "complete":
        text += f" [{provenance.get('finish_reason', status)}]"
    return text


def chat_label(name: str, count: int, last_reply: Message | None = None,
               streaming: bool = False) -> str:
    """A chat's one-line label in the tree view: ``name · 3 msgs · echo``, and
    ``● streaming`` while a reply streams into it."""
    bits = [name, f"{count} msg{'s' if count != 1 else ''}"]
    if last_reply is not None:
        source = reply_source(last_reply.status, last_reply.provenance)
        if source:
            bits.append(source)
    label = " · ".join(bits)
    return label + "  ● streaming" if streaming else label


def tree_text(tree: ChatTree, current: str | None = None) -> str:
    """The tree as indented text: name, message count, last reply's backend/model. A batch
    (``%%subchat --each``) is one line, ``NAME  [987/1000 done, 13 failed]``; its rows
    show only when one of them is on the current chat's path."""
    counts = tree.store.message_counts()
    last = tree.store.last_replies()
    batches = batch.summaries(tree, counts)
    lines = []
    stack = [tree.root]  # depth first, parents before children, siblings in order
    while stack:
        chat = stack.pop()
        depth = chat.path.count("/")
        mark = "*" if chat.path == current else " "
        kids = tree.children(chat)
        if chat.id in batches:  # its rows folded, but one on the current path
            lines.append(f"{mark} {'  ' * depth}{chat.name}  {batches[chat.id].label()}")
            kids = [k for k in kids
                    if current == k.path or (current or "").startswith(k.path + "/")]
        else:
            n = counts.get(chat.id, 0)
            info = f"{n} message{'s' if n != 1 else ''}"
            source = reply_source(*last.get(chat.id, ("complete", {})))
            if source:
                info += f", {source}"
            lines.append(f"{mark} {'  ' * depth}{chat.name}  ({info})")
        stack.extend(reversed(kids))
    return "\n".join(lines)


def transcript(tree: ChatTree, chat: Chat, provenance: bool = False, inherited: bool = True,
               markdown: bool = False, default_system: str | None = None) -> str:
    """A chat's conversation: the system prompt sent with it (and where it comes from),
    the inherited context (if asked), then its own messages. ``default_system``: the
    ``%config SubchatMagics.system_prompt`` used when no chat on the path sets one."""
    out: list[str] = [f"## {chat.path}" if markdown else f"== {chat.path} =="]
    system, source = system_source(tree, chat, default_system)
    if system:
        where = "" if source == "own" else f" ({_source_words(source)})"
        out.append(f"*system*{where}: {system}" if markdown else f"[system] {system}{where}")
    summary = batch_summary(tree, chat)
    if summary is not None:  # a batch chat holds no messages: its rows, summed up
        out.extend(summary)
        return "\n\n".join(out) if markdown else "\n".join(out)
    inherited_msgs, own = split_history(tree, chat)
    if inherited:
        if inherited_msgs:
            out.append(f"--- inherited from {chat.parent.path if chat.parent else 'root'} "
                       f"({counted(len(inherited_msgs), 'message')}) ---")
            out.extend(_message_lines(inherited_msgs, provenance, markdown))
            out.append("--- this chat ---")
    if not own:
        out.append("(no messages yet)")
    out.extend(_message_lines(own, provenance, markdown))
    again = batch.latest_attempt(tree, chat)
    if again is not None:  # a batch row sent again: its newest answer is not here
        replies = [m for m in again.messages if m.role == "assistant"]
        line = (f"sent again: the latest attempt is {again.path} "
                f"({replies[-1].status if replies else 'not answered yet'})")
        out.append(f"*{line}*" if markdown else f"--- {line} ---")
    return "\n\n".join(out) if markdown else "\n".join(out)


def _message_lines(msgs: list[Message], provenance: bool, markdown: bool) -> list[str]:
    out = []
    for m in msgs:
        tag = _status_tag(m)
        if markdown:
            out.append(message_markdown(m, provenance))
            continue
        if m.role == "tool":
            name = m.provenance.get("name", "?")
            out.append(f"[tool {name}]{tag} {m.content}"
                       + (_tool_timing(m) if provenance else ""))
            continue
        if m.tool_calls:
            calls = ", ".join(_call_signature(c) for c in m.tool_calls)
            out.append(f"[{m.role}]{tag} {m.content + ' ' if m.content else ''}calls {calls}")
            if provenance:
                line = provenance_line(m)
                if line:
                    out.append(f"    ({line})")
            continue
        out.append(f"[{m.role}]{tag} {m.content}")
        said = verdict_line(m)
        if said:
            out.append(f"    {said}")
        if provenance and m.role == "assistant":
            line = provenance_line(m)
            if line:
                out.append(f"    ({line})")
    return out


def verdict_line(m: Message) -> str | None:
    """The verdict a vote's reply holds (``--vote K``): the chosen answer, how many
    samples gave it (ties said) and where the samples are; None for any other message."""
    v = m.provenance.get(VOTE_MARK) if m.role == "assistant" else None
    if not isinstance(v, dict) or "answers" not in v:
        return None
    line = f"verdict: {Verdict.stored(v).label()}"
    answers = v.get("answers") or []
    if answers:
        line += " · answers " + ", ".join("—" if a is None else _short_answer(a) for a in answers)
    samples = v.get("samples") or []
    if samples:
        line += f" · samples {samples[0]} … {samples[-1]}" if len(samples) > 2 else \
            " · samples " + ", ".join(samples)
    return line


def _short_answer(a: Any) -> str:
    text = a if isinstance(a, str) else json.dumps(a, ensure_ascii=False)
    text = text.replace("\n", " ")
    return text if len(text) <= 24 else text[:23] + "…"


def message_markdown(m: Message, provenance: bool = False, *, colon: bool = True) -> str:
    """One message as Markdown: ``**role**`` (with ``[reason]`` if it did not complete;
    ``colon``: followed by ``:``), its text (a reply's thinking collapsed; *(no text)*
    for an empty reply), then, if asked, the reply's provenance as a quote."""
    if m.role == "tool":
        name = m.provenance.get("name", "?")
        timing = _tool_timing(m) if provenance else ""
        return (f"**tool** `{name}`{_status_tag(m)}{timing}{':' if colon else ''}\n\n"
                f"<details><summary>result</summary>\n\n```\n{m.content}\n```\n\n</details>")
    if m.role == "assistant" and m.tool_calls:
        calls = "\n".join(f"- calls `{_call_signature(c)}`" for c in m.tool_calls)
        body = (reply_markdown(m.content) + "\n\n" if m.content else "") + calls
    elif m.role == "assistant":
        body = reply_markdown(m.content) if m.content else "*(no text)*"
    else:
        body = m.content
    text = f"**{m.role}**{_status_tag(m)}{':' if colon else ''}\n\n{body}"
    said = verdict_line(m)
    if said:
        text += f"\n\n*{said}*"
    if provenance and m.role == "assistant":
        line = provenance_line(m)
        if line:
            text += "\n\n> " + line.replace("\n", "\n> ")
    return text


def split_history(tree: ChatTree, chat: Chat) -> tuple[list[Message], list[Message]]:
    """A chat's context in two: the messages it inherits from its ancestors (up to where
    it branched off), and its own."""
    own = chat.messages
    history = tree.history(chat)
    return history[: len(history) - len(own)], own


# -- export / import ---------------------------------------------------------------------------
def _message_data(m: Message) -> dict[str, Any]:
    return {"role": m.role, "content": m.content, "status": m.status,
            "provenance": m.provenance, "created_at": m.created_at}


def export_data(tree: ChatTree, chat: Chat, default_system: str | None = None) -> dict[str, Any]:
    """The subtree of ``chat`` as data ``import`` recreates. A subtree below the root
    carries the context its top chat inherited (``inherited``: the parent's path, the
    system prompt in force there and the messages), so an import can give it the same
    context elsewhere; every chat says which system prompt was in force for it."""
    chats = []
    for c in tree.subtree(chat):
        in_force, source = system_source(tree, c, default_system)
        chats.append({
            "path": c.path,
            "system_prompt": c.system_prompt,
            "system_prompt_in_force": in_force,
            "system_prompt_from": source,
            "fork_seq": c.fork_seq,
            "messages": [_message_data(m) for m in c.messages],
        })
    data: dict[str, Any] = {"format": EXPORT_FORMAT, "exported_at": time.time(),
                            "root": chat.path}
    parent = chat.parent
    if parent is not None:
        hist = tree.history(chat)
        own = len(hist) - len(tree.store.messages(chat.id))
        data["inherited"] = {"from": parent.path, "system_prompt": tree.system_prompt_for(parent),
                             "messages": [_message_data(m) for m in hist[:own]]}
    data["chats"] = chats
    return data


def export_json(tree: ChatTree, chat: Chat, default_system: str | None = None) -> str:
    return json.dumps(export_data(tree, chat, default_system), indent=2, ensure_ascii=False)


def export_markdown(tree: ChatTree, chat: Chat, default_system: str | None = None) -> str:
    """The subtree as Markdown: each chat's system prompt in force and its own messages,
    and where it branched from its parent."""
    parts = [f"# Chat tree export: {chat.path}"]
    for c in tree.subtree(chat):
        text = transcript(tree, c, provenance=True, inherited=False, markdown=True,
                          default_system=default_system)
        head, _, body = text.partition("\n\n")
        head = head.replace("## ", "#" * (2 + c.path.count("/") - chat.path.count("/")) + " ", 1)
        if c.parent is not None:
            n = c.fork_seq
            where = (f"*branched from {c.parent.path} at its start*" if n == 0 else
                     f"*branched from {c.parent.path} after its message {n}*")
            if c.id == chat.id:
                inherited = len(tree.history(c)) - len(tree.store.messages(c.id))
                where += f" (inherits {counted(inherited, 'message')} not in this export)" if inherited else ""
            head += "\n\n" + where
        parts.append(f"{head}\n\n{body}" if body else head)
    return "\n\n".join(parts) + "\n"


def check_export(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The export's chats, each checked for the shape ``import`` needs (before any write)."""
    chats = data.get("chats") or []

    def bad(where: str) -> InvalidInput:
        return InvalidInput(f"the export is damaged: {where}; export it again")

    if not isinstance(chats, list):
        raise bad("'chats' is not a list")
    if data.get("root") is not None and not isinstance(data["root"], str):
        raise bad("'root' is not a chat path")
    for i, c in enumerate(chats):
        if not isinstance(c, dict) or not isinstance(c.get("path"), str):
            raise bad(f"chat {i} has no path")
        if c.get("system_prompt") is not None and not isinstance(c["system_prompt"], str):
            raise bad(f"chat {c['path']!r} has a system prompt that is not text")
        _check_messages(c.get("messages", []), f"chat {c['path']!r}", bad)
        if "fork_seq" in c and (not isinstance(c["fork_seq"], int) or isinstance(c["fork_seq"], bool)
                                or c["fork_seq"] < 0):
            raise bad(f"chat {c['path']!r} has a fork point that is not a count")
    inherited = data.get("inherited")
    if inherited is not None:
        if (not isinstance(inherited, dict)
                or (inherited.get("system_prompt") is not None
                    and not isinstance(inherited["system_prompt"], str))):
            raise bad("'inherited' is not a context")
        _check_messages(inherited.get("messages", []), "the inherited context", bad)
    return chats


def _check_messages(msgs: Any, where: str, bad: Any) -> None:
    if not isinstance(msgs, list):
        raise bad(f"{where} has messages that are not a list")
    for m in msgs:
        if (not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system", "tool")
                or not isinstance(m.get("content"), str)
                or not isinstance(m.get("status", "complete"), str)
                or not isinstance(m.get("provenance") or {}, dict)):
            raise bad(f"a message of {where} has no role/content")


# -- code in replies ---------------------------------------------------------------------------
_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})[^\n]*\n(.*?)^[ \t]*\1[ \t]*$", re.S | re.M)


def code_blocks(text: str) -> list[str]:
    """The non-empty fenced code blocks of a reply's answer (thinking left out), in order."""
    _, answer = split_thinking(text or "")
    return [b for b in (m.group(2).rstrip("\n") for m in _FENCE.finditer(answer)) if b.strip()]


def reply_code(text: str) -> str:
    """The code of a reply: its fenced blocks in order (``` or ~~~), or the whole answer
    when it has none (or only empty ones); thinking is left out. ``""`` for a reply with
    no text."""
    _, answer = split_thinking(text or "")
    blocks = [m.group(2).rstrip("\n") for m in _FENCE.finditer(answer)]
    code = "\n\n".join(b for b in blocks if b.strip()) or answer  # empty blocks: no code
    return code.strip("\n") if code.strip() else ""


# -- a chat as a notebook ----------------------------------------------------------------------
def escape_braces(text: str) -> str:
    """``text`` written so that ``%%subchat``'s brace filling gives it back unchanged: each
    ``{`` doubled, and each ``}`` doubled where a doubled ``{`` is open (a ``}}`` with none
    open stays as written, so an unmatched ``}`` stays single)."""
    out, open_ = [], 0
    for ch in text:
        if ch == "{":
            out.append("{{")
            open_ += 1
        elif ch == "}":
            out.append("}}" if open_ else "}")
            open_ = max(0, open_ - 1)
        else:
            out.append(ch)
    return "".join(out)


def _nb_cell(kind: str, source: str, index: int, **extra: Any) -> dict[str, Any]:
    cell: dict[str, Any] = {"cell_type": kind, "id": f"subchat-{index:04d}", "metadata": {},
                            "source": source}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    cell.update(extra)  # after: a code cell's number and outputs
    return cell


def line_word(value: str) -> str:
    """``value`` as one word of a magic's options line (quoted where it must be)."""
    if value and not any(ch.isspace() or ch in "'\"#" for ch in value):
        return value
    if "'" not in value:
        return f"'{value}'"
    return '"' + value.replace('"', '\\"') + '"'


def constraint_flags(c: dict[str, Any], n: int) -> tuple[str, str | None]:
    """The options that ask again for the constraint a reply recorded (``--choice A,B``,
    ``--regex P``, ``--json=schema_N`` and the cell defining ``schema_N``), or nothing for
    a reply stored before constraints kept their content."""
    kind, tail = c.get("kind"), " --best-effort" if c.get("best_effort") else ""
    if kind == "choice" and c.get("choices"):
        items = [str(x) for x in c["choices"]]
        if any(ch in x for x in items for ch in ",'\"") or any(not x.strip() for x in items):
            return " --choice " + ",".join('"' + x.replace('"', '\\"') + '"' for x in items) \
                + tail, None
        return " --choice " + line_word(",".join(items)) + tail, None
    if kind == "regex" and c.get("pattern"):
        return " --regex " + line_word(str(c["pattern"])) + tail, None
    if kind == "json":
        if "schema" not in c:  # bare --json (any JSON object), or stored before schemas were
            bare = structured.Constraint("json").digest()
            return (" --json" + tail, None) if c.get("digest") == bare else ("", None)
        name = f"schema_{n}"
        try:
            schema = json.loads(c["schema"]) if isinstance(c["schema"], str) else c["schema"]
        except ValueError:
            return "", None
        return f" --json={name}" + tail, f"{name} = {pprint.pformat(schema, sort_dicts=False)}"
    return "", None


def _reply_outputs(m: Message, constraint: Any = None) -> list[dict[str, Any]]:
    """What ``%%subchat`` showed for a stored reply: its live display (ended empty), then
    the final Markdown with a text/plain copy (a parsed JSON value as the cell shows it)."""
    if (isinstance(constraint, dict) and constraint.get("kind") == "json"
            and m.status == "complete"):
        try:
            shown = structured.bundle(json.loads(m.content, strict=False), m.content)
        except ValueError:
            shown = None
        if shown is not None:
            return [{"output_type": "display_data", "data": {"text/plain": ""}, "metadata": {}},
                    {"output_type": "display_data", "metadata": {}, "data": shown}]
    text = m.content
    tag = {"interrupted": "interrupted: partial reply kept"}.get(m.status)
    if m.status.startswith("error"):
        tag = "error: partial reply kept" if text else None
    elif m.status == "complete" and m.finish_reason == "length":
        tag = "stopped at max tokens"
    if tag:
        text += f"\n[{tag}]"
    return [{"output_type": "display_data", "data": {"text/plain": ""}, "metadata": {}},
            {"output_type": "display_data", "metadata": {},
             "data": {"text/plain": text or "(empty reply)", "text/markdown": reply_markdown(text)}}]


def _tool_specs(steps: list[Message]) -> list[dict[str, Any]]:
    """The tools a stored tool run offered, as the model saw them (``Tool.spec`` form):
    from the replies' provenance; for a run stored before it was kept there, each tool
    called, with the argument names its calls used and no types."""
    for m in steps:
        offered = m.provenance.get("tools") if m.role == "assistant" else None
        if isinstance(offered, list) and offered:
            return [t for t in offered if isinstance(t, dict) and "function" in t]
    props: dict[str, dict[str, Any]] = {}
    for m in steps:
        for call in m.tool_calls:
            args = call.get("arguments")
            props.setdefault(str(call.get("name", "?")), {}).update(
                {k: {} for k in args} if isinstance(args, dict) else {})
    return [{"type": "function", "function": {
        "name": name, "description": name.replace("_", " "),
        "parameters": {"type": "object", "properties": p}}} for name, p in props.items()]


def _schema_type(schema: Any) -> str:
    if not isinstance(schema, dict):
        return "any"
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(map(str, kind))
    if kind:
        return str(kind)
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            return " | ".join(_schema_type(x) for x in schema[key])
    if "$ref" in schema:
        return str(schema["$ref"]).rpartition("/")[2]
    return "any"


def _tools_markdown(specs: list[dict[str, Any]]) -> str:
    """The tools of a tool cell for a reader: each as a signature with its description."""
    lines = []
    for t in specs:
        f = t["function"]
        schema = f.get("parameters") or {}
        props = schema.get("properties") or {}
        need = [k for k in schema.get("required") or [] if k in props]
        props = {k: props[k] for k in need + [k for k in props if k not in need]}
        params = ", ".join(
            f"{k}: {_schema_type(v)}"
            + (f" = {json.dumps(v['default'])}" if isinstance(v, dict) and "default" in v else "")
            for k, v in props.items())
        desc = str(f.get("description") or "").strip().splitlines()
        lines.append(f"- `{f['name']}({params})`" + (f": {desc[0]}" if desc else ""))
    return ("*This message was answered with tools; as the model saw them:*\n\n"
            + "\n".join(lines) + "\n\n*The next cell defines each as a recorded tool: it returns "
            "what the original call returned (the functions themselves are not stored), and its "
            "JSON Schema is there and in the tool cell's metadata (`subchat.tools`). Define your "
            "own functions with these names instead to run them for real, and drop `--yes` to be "
            "asked before each call.*")


def _recorded_tools_code(specs: list[dict[str, Any]], steps: list[Message],
                         listed: str | None) -> str:
    """A code cell that defines the tools of a tool cell as recorded tools (each call's
    stored result, by its arguments); ``listed``: one list variable of them (names that
    are not Python identifiers)."""
    calls: dict[str, dict[str, Any]] = {}
    results: dict[str, dict[str, str]] = {}
    for m in steps:
        if m.role == "assistant":
            calls.update({str(c.get("id")): c for c in m.tool_calls})
        elif m.role == "tool":
            call = calls.get(str(m.provenance.get("tool_call_id")))
            if call is not None and isinstance(call.get("arguments"), dict):
                results.setdefault(str(call.get("name")), {})[
                    arguments_key(call["arguments"])] = m.content
    made = [f"recorded_tool(\n    {pprint.pformat(t, width=92, sort_dicts=False)},\n    "
            f"{pprint.pformat(results.get(t['function']['name'], {}), width=92)})"
            for t in specs]
    head = ("# the tools this message was answered with, recorded: each returns what its\n"
            "# original call returned; a call with other arguments is told there is none\n"
            "from subchat_magics.tools import recorded_tool\n")
    if listed:
        return head + f"{listed} = [\n" + ",\n".join(made) + ",\n]"
    return head + "\n".join(f"{t['function']['name']} = {code}" for t, code in zip(specs, made))


def _tool_outputs(steps: list[Message]) -> list[dict[str, Any]]:
    """What ``%%subchat --tools`` showed for a stored tool run: each call with its result
    collapsed, then the reply."""
    out: list[dict[str, Any]] = []
    calls: dict[str, str] = {}
    for m in steps:
        if m.role == "assistant" and m.tool_calls:
            calls.update({str(c.get("id")): _call_signature(c) for c in m.tool_calls})
        elif m.role == "tool":
            sig = calls.get(str(m.provenance.get("tool_call_id")), m.provenance.get("name", "?"))
            status = m.provenance.get("tool_status", "ok")
            out.append({"output_type": "display_data", "metadata": {}, "data": {
                "text/plain": tool_line(sig, m.content, status),
                "text/html": tool_html(sig, m.content, status)}})
        elif m.role == "assistant":
            out += _reply_outputs(m)
    return out


def export_notebook(tree: ChatTree, chat: Chat, default_system: str | None = None) -> str:
    """The subtree of ``chat`` as a Jupyter notebook (nbformat 4.5 JSON) that reruns it: a
    cell that loads the extension on a fresh store, then one ``%%subchat PATH`` cell per
    user message with the stored reply as its output, each chat under a Markdown heading
    with its path. A subchat's cells come where its parent had reached when it branched, so
    a rerun gives every chat the context it had; a subtree below the root is preceded by
    the messages it inherited (its ancestors' cells up to where it branched)."""
    cells: list[dict[str, Any]] = []

    def add(kind: str, source: str, **extra: Any) -> None:
        if kind == "code":  # numbered as if run in order: a checker (nbval) compares them
            extra["execution_count"] = sum(c["cell_type"] == "code" for c in cells) + 1
        cells.append(_nb_cell(kind, source, len(cells), **extra))

    add("markdown", f"# Chat tree export: {chat.path}\n\nEach `%%subchat` cell below is one "
        "message of the chat; its output is the reply that was stored. Run the notebook to "
        "ask again, on whichever backend this kernel chooses (`LLM_BACKEND`, `%subchat "
        "backend`).")
    load = ("import os, tempfile\n"
            "# a fresh store, so the rerun adds to no existing tree (name a file to keep it)\n"
            "os.environ[\"SUBCHAT_STORE\"] = os.path.join(tempfile.mkdtemp(), \"rerun.db\")\n"
            "del os, tempfile\n"
            "%load_ext subchat_magics")
    if default_system:
        load += f"\n%config SubchatMagics.system_prompt = {default_system!r}"
    add("code", load)
    made: set[int] = {tree.root.id}

    def create(c: Chat, system: str | None) -> None:
        """Cells that make ``c`` exist (a child branches off it before its first message,
        or it has none) and set a system prompt a magic line cannot carry."""
        # assignments, not expressions: a checker running cells without history (nbval)
        # would show a result even after a trailing semicolon
        lines = []
        if c.id not in made:
            lines.append(f"chat = default_session().branch({c.parent.path!r}, {c.name!r})")
            made.add(c.id)
        if system:
            lines.append(f"chat = default_session().set_system({c.path!r}, {system!r})")
        if lines:
            add("code", "from subchat_magics import default_session\n" + "\n".join(lines))

    def section(c: Chat, msgs: list[Message], children: list[Chat], note: str = "") -> None:
        head = f"## {c.path}{note}"
        if c.parent is not None:
            n = c.fork_seq
            head += (f"\n\n*branched from {c.parent.path} at its start*" if n == 0 else
                     f"\n\n*branched from {c.parent.path} after its message {n}*")
        if c.system_prompt:
            head += f"\n\n*system prompt:* {c.system_prompt}"
        add("markdown", head)
        system = c.system_prompt or None
        if system and "\n" in system:  # several lines cannot go on a magic line
            create(c, system)
            system = None
        pending = sorted(children, key=lambda k: k.fork_seq)
        i = 0
        while True:
            while pending and (pending[0].fork_seq <= i or i >= len(msgs)):
                create(c, system)
                system = None
                walk(pending.pop(0))
                if i < len(msgs) and not (pending and pending[0].fork_seq <= i):
                    add("markdown", f"## {c.path} (continued)")
            if i >= len(msgs):
                break
            m = msgs[i]
            if m.role != "user":
                i += 1
                continue
            reply = msgs[i + 1] if i + 1 < len(msgs) and msgs[i + 1].role == "assistant" else None
            steps: list[Message] = []  # a tool run: its calls and results, then the reply
            j = i + 1
            while reply is not None and reply.tool_calls and j < len(msgs) \
                    and msgs[j].role != "user":
                steps.append(msgs[j])
                j += 1
            if steps:
                reply = steps[-1] if steps[-1].role == "assistant" and not steps[-1].tool_calls \
                    else None
            line = f"%%subchat {c.path}"
            cons = (reply.provenance.get("constraint") if reply is not None else None)
            if isinstance(cons, dict):
                flags, defs = constraint_flags(cons, len(cells))
                if defs:
                    add("code", defs)
                line += flags
            if steps:
                specs = _tool_specs(steps)
                names = [t["function"]["name"] for t in specs]
                plain = all(n.isidentifier() and not keyword.iskeyword(n) for n in names)
                var = ",".join(names) if plain else f"recorded_tools_{len(cells)}"
                # --yes: the recorded tools only return recorded text (and nbval has no stdin)
                line += f" --tools {var} --yes"
            if system:
                line += f" --system {shlex.quote(system)}"
                system = None
            made.add(c.id)
            extra: dict[str, Any] = {}
            if steps:
                extra["outputs"] = _tool_outputs(steps)
                # a rerun runs the tools again (recorded here, or the reader's own): its
                # answer may differ; the tools as the model saw them ride in the metadata
                extra["metadata"] = {"tags": ["nbval-ignore-output"], "subchat": {"tools": specs}}
                add("markdown", _tools_markdown(specs))
                add("code", _recorded_tools_code(specs, steps, None if plain else var))
                add("code", f"{line}\n{escape_braces(m.content)}", **extra)
                i = j
                continue
            if reply is not None:
                extra["outputs"] = _reply_outputs(reply, cons)
                if reply.status != "complete":  # a rerun completes it: nbval may not compare
                    extra["metadata"] = {"tags": ["nbval-ignore-output"]}
            add("code", f"{line}\n{escape_braces(m.content)}", **extra)
            i += 2 if reply is not None else 1
        create(c, system)  # a chat with no message still exists in the rerun

    def walk(c: Chat) -> None:
        section(c, c.messages, c.children)

    lineage = tree.lineage(chat)
    for a, nxt in zip(lineage, lineage[1:]):  # the context a subtree inherits
        section(a, a.messages[: nxt.fork_seq], [], note=" (the context it inherits)")
    walk(chat)
    nb = {"nbformat": 4, "nbformat_minor": 5, "cells": cells,
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                      "language": "python"},
                       "language_info": {"name": "python"}}}
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
