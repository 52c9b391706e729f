"""Where a chat becomes tokens: chat-template rendering, token counting, fitting the
context window, and rendering that keeps the prefix cache warm.

**Prefix reuse.** A subchat's prompt must begin with exactly the tokens its parent's
last request ran (its prompt, then the tokens it generated), so that vLLM's prefix
cache serves the inherited context. A naive re-render breaks this: Qwen3's template
renders the generation prompt of the running turn with an empty ``<think>\\n\\n</think>``
block, but renders the same turn without it once it is history. So
:class:`PromptBuilder` renders history *as it ran*: every earlier assistant turn is the
prompt that produced it, then exactly what it generated, then the template's own text
up to the next generation prompt. The text after a turn comes from the template itself
(rendering the history with a sentinel in that turn's place and keeping what follows
the sentinel), so any chat template works; where a template does not echo the content
verbatim, rendering falls back to a plain render. The tokens a request generated are
remembered by :meth:`PromptBuilder.remember` (keyed by the prompt tokens before them and
the reply text), so a later prompt reuses the very ids rather than a re-tokenization
that could differ; without that memory (a new kernel) it encodes the text instead,
which gives the same ids for every later request.

Thinking: each earlier turn is rendered with the thinking mode it ran with (a reply
that contains ``</think>`` or starts with ``<think>`` ran with thinking on), and its
``<think>`` block is kept, because that is what the engine cached.

**Fitting.** When prompt + ``max_tokens`` exceeds ``max_model_len``, the oldest turns
below the system prompt are dropped (a turn: a user message and what answered it); if
the newest message alone leaves no room, :class:`~subchat_magics.errors.InvalidInput`
says what to shorten. When only the newest exchange is left and it fits but leaves
less than ``max_tokens``, ``max_tokens`` is lowered to what is left. The rule itself is
:func:`fit_window`, shared with backends that can only estimate token counts (Ollama).

No vLLM import here: the tokenizer is any Hugging Face-style tokenizer
(``apply_chat_template``, ``encode``, ``convert_ids_to_tokens``).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from array import array
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from .errors import InvalidInput

# Used when the tokenizer has no chat template (base models): Qwen-style ChatML.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

#: how a batch row that cannot fit with its context fails (the batch counts these)
TOO_LONG = "too long to answer with its context"
_SENTINEL = "SubChat-Sentinel-7f3a9c"  # mixed case: a template that changes case is caught
_MARKUP = re.compile(r"[<>{}\[\]%#|/\\]")  # what makes a message's content not opaque


def template_message(m: dict[str, Any]) -> dict[str, Any]:
    """A message as a chat template reads it: role and content, plus a tool call's
    ``tool_calls`` (arguments as a mapping: templates write them with ``tojson`` or as
    given) or a tool result's ``tool_call_id`` and ``name``."""
    out: dict[str, Any] = {"role": m["role"], "content": m["content"]}
    if m.get("tool_calls"):
        calls = []
        for c in m["tool_calls"]:
            fn = dict(c.get("function") or {})
            args = fn.get("arguments")
            if isinstance(args, str):
                try:
                    fn["arguments"] = json.loads(args)
                except ValueError:
                    pass  # written as the model wrote it
            calls.append({"id": c.get("id"), "type": "function", "function": fn})
        out["tool_calls"] = calls
    if m["role"] == "tool":
        out["tool_call_id"] = m.get("tool_call_id")
        out["name"] = m.get("name")
    return out


def has_tool_messages(messages: Sequence[dict[str, Any]]) -> bool:
    return any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def ran_with_thinking(content: str) -> bool:
    """Whether an assistant reply was generated with thinking on (it carries a
    ``<think>`` block)."""
    return content.lstrip().startswith("<think>") or "</think>" in content


@dataclass
class Prompt:
    """A rendered, fitted prompt, ready for the engine."""

    token_ids: list[int]
    max_tokens: int
    messages: list[dict[str, str]]
    dropped_messages: int = 0
    dropped_turns: int = 0
    exact: bool = True  # rendered as-it-ran (False: a plain render was the fallback)
    notes: list[str] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.token_ids)


class _LRU:
    def __init__(self, size: int):
        self.size = size
        self.data: OrderedDict[Any, Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self.lock:
            value = self.data.get(key)
            if value is not None:
                self.data.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> None:
        with self.lock:
            self.data[key] = value
            self.data.move_to_end(key)
            while len(self.data) > self.size:
                self.data.popitem(last=False)


def _opaque(content: Any) -> bool:
    """Whether a message's content is plain words a template writes as they are: no
    markup or switch a template might test for (``<tool_response>``, ``/no_think``), no
    outer whitespace it might trim. (A template that tests a user message for a plain
    word would not be caught: none of the common ones does.)"""
    return (isinstance(content, str) and bool(content) and content == content.strip()
            and _MARKUP.search(content) is None and _SENTINEL not in content)


def _digest(*parts: Any) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        b = p if isinstance(p, bytes) else str(p).encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.digest()


def _prefix_digests(msgs: Sequence[dict[str, str]]) -> list[bytes]:
    """``out[j]`` is the digest of ``msgs[:j]``."""
    h = hashlib.blake2b(digest_size=16)
    out = [h.digest()]
    for m in msgs:
        for part in (m["role"], m["content"]):
            b = part.encode("utf-8", "surrogatepass")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
        out.append(h.digest())
    return out


def _prefix_hasher(msgs: Sequence[dict[str, str]]) -> Any:
    """The hasher of :func:`_prefix_digests` after ``msgs`` (``.copy()`` it to go on)."""
    h = hashlib.blake2b(digest_size=16)
    for m in msgs:
        for part in (m["role"], m["content"]):
            b = part.encode("utf-8", "surrogatepass")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h


def _shared_key(msgs: Sequence[dict[str, str]], think: bool) -> tuple:
    """The key of what chats differing only in their last message share (a batch's rows:
    :meth:`PromptBuilder._keep_share`)."""
    return (think, tuple(x for m in msgs[:-1] for x in (m["role"], m["content"])))


def _ids_digest(ids: Sequence[int]) -> bytes:
    return hashlib.blake2b(array("I", ids).tobytes(), digest_size=16).digest()


class PromptBuilder:
    """Renders plain ``[{"role", "content"}]`` messages to token ids for one tokenizer.

    ``think`` (per call) turns Qwen3-style thinking on (``enable_thinking``). One builder
    lives as long as its engine, shared by every request (it is thread-safe)."""

    def __init__(self, tokenizer: Any, max_model_len: int, *, chat_template: str | None = None,
                 cache_size: int = 2048):
        self.tokenizer = tokenizer
        self.max_model_len = int(max_model_len)
        self.chat_template = chat_template
        if self.chat_template is None and not getattr(tokenizer, "chat_template", None):
            self.chat_template = CHATML_TEMPLATE
        self._renders = _LRU(512)
        self._frames = _LRU(64)  # (a chat but its last message) -> the render around it
        self._fast: Any = None  # the Rust tokenizer to encode with (False: none; None: not looked)
        self._generated = _LRU(cache_size)
        # (digest of the messages up to a turn's end, thinking) -> (ids, text) so far: a
        # chat's next prompt renders only its new turns
        self._states = _LRU(256)
        # (thinking, the roles and contents of a chat but its last message) -> what every
        # chat that differs only in that last (user) message shares: a batch's rows
        # (see _row_ids); False where it cannot be shared
        self._lasts = _LRU(64)
        # rows' tails encoded ahead (rows_encoded): (ids, the base they follow, read as whole)
        self._tails: dict[str, tuple[list[int], Any, bool]] = {}
        self._special: set[int] | None = None
        self._thinking_switch: bool | None = None

    # -- rendering ---------------------------------------------------------------------------
    def render_text(self, messages: Sequence[dict[str, str]], *, think: bool = False,
                    add_generation_prompt: bool = True,
                    tools: Sequence[dict[str, Any]] | None = None) -> str:
        """The chat template's plain render (what ``LLM.chat`` would send); ``tools``: the
        tools' descriptions, and the messages' tool calls and results, as the template
        writes them."""
        if tools or has_tool_messages(messages):
            msgs = [template_message(m) for m in messages]
            key = _digest(add_generation_prompt, think, json.dumps(msgs, sort_keys=True),
                          json.dumps(list(tools or ()), sort_keys=True))
        else:
            msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
            if add_generation_prompt and msgs[-1]["role"] == "user" and _opaque(msgs[-1]["content"]):
                # a batch's rows: the same chat but for its last message, rendered once
                frame = self._frame(msgs, think)
                if frame:
                    return frame[0] + msgs[-1]["content"] + frame[1]
            key = _digest(add_generation_prompt, think,
                          *(x for m in msgs for x in (m["role"], m["content"])))
        hit = self._renders.get(key)
        if hit is not None:
            return hit
        text = self._render(msgs, think, add_generation_prompt, tools)
        self._renders.put(key, text)
        return text

    def _render(self, msgs: list[dict[str, Any]], think: bool, add_generation_prompt: bool = True,
                tools: Sequence[dict[str, Any]] | None = None) -> str:
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt,
                                  "enable_thinking": bool(think)}
        if tools:
            kwargs["tools"] = list(tools)
        if self.chat_template is not None:
            kwargs["chat_template"] = self.chat_template
        try:
            text = self.tokenizer.apply_chat_template(msgs, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a template error is the user's to fix
            raise InvalidInput(f"the model's chat template failed on this chat: {exc}") from None
        if not isinstance(text, str):  # some tokenizers return a list when batched
            text = text[0]
        return text

    def _frame(self, msgs: list[dict[str, str]], think: bool) -> tuple[str, str] | None:
        """The render of ``msgs`` around its last (user) message's content: ``(before,
        after)``, made once for every chat that differs only there (a batch's rows), or
        None where the template does not write that content as it is (it trims, changes
        or tests it): two renders with two markers must differ by the marker alone."""
        key = _digest("frame", think, *(x for m in msgs[:-1] for x in (m["role"], m["content"])))
        hit = self._frames.get(key)
        if hit is not None:
            return hit or None
        marks = (f"{_SENTINEL}-a", f"{_SENTINEL}-Zq9")
        one, two = (self._render(msgs[:-1] + [{"role": "user", "content": m}], think)
                    for m in marks)
        frame: Any = False
        if one.count(marks[0]) == 1 and two == one.replace(marks[0], marks[1]):
            before, _, after = one.partition(marks[0])
            frame = (before, after)
        self._frames.put(key, frame)
        return frame or None

    def encode(self, text: str) -> list[int]:
        fast = self._fast if self._fast is not None else self._find_fast()
        if fast:
            try:
                return fast.encode(text, add_special_tokens=False).ids
            except Exception:  # noqa: BLE001 - (busy elsewhere: transformers' way below)
                pass
        return self._encode(text)

    def _decode_all(self, ids: list[int]) -> str:
        """``ids`` as text, special tokens and spaces as they are."""
        fast = self._fast if self._fast is not None else self._find_fast()
        if fast:
            try:
                return fast.decode(ids, skip_special_tokens=False)
            except Exception:  # noqa: BLE001 - (busy elsewhere: transformers' way below)
                pass
        return self.tokenizer.decode(ids, skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    def _decode_text(self, ids: list[int]) -> str | None:
        """``ids`` as text without special tokens, by the Rust tokenizer (a batch's every
        row is remembered: transformers' call costs several times more); None without it."""
        fast = self._fast if self._fast is not None else self._find_fast()
        if fast:
            try:
                return fast.decode(ids, skip_special_tokens=True)
            except Exception:  # noqa: BLE001 - (busy elsewhere: transformers' way)
                pass
        return None

    def _find_fast(self) -> Any:
        """The Rust tokenizer under a fast transformers tokenizer, to encode with directly
        (transformers' own call costs more than the encoding, and hands the GIL to the
        engine's thread each time), kept only where it gives transformers' very ids on a
        probe; else False."""
        t, fast = self.tokenizer, False
        for _ in range(4):
            if type(t).__module__.partition(".")[0] == "tokenizers" and hasattr(t, "encode_batch"):
                fast = t
                break
            t = getattr(t, "_tokenizer", None) or getattr(t, "tokenizer", None)
            if t is None:
                break
        if fast:
            probes = [" Hello  world\n", "<|im_start|>user\nQ1: 日本語 ✓ 3.14<|im_end|>\n", "a  b\t\tc "]
            try:
                for p in probes:
                    ids = self._encode(p)
                    if fast.encode(p, add_special_tokens=False).ids != ids or fast.decode(
                            ids, skip_special_tokens=False) != self.tokenizer.decode(
                            ids, skip_special_tokens=False, clean_up_tokenization_spaces=False):
                        fast = False
                        break
            except Exception:  # noqa: BLE001 - another tokenizer's ways: transformers' call
                fast = False
        self._fast = fast
        return fast

    def _encode(self, text: str) -> list[int]:
        # verbose=False: a prompt longer than the tokenizer's model_max_length is ours to
        # report (build() says what does not fit), not transformers' warning in the cell
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=False, verbose=False))
        except TypeError:  # a tokenizer without the verbose switch
            return list(self.tokenizer.encode(text, add_special_tokens=False))

    @property
    def has_thinking_switch(self) -> bool:
        """Whether the chat template reads ``enable_thinking`` (Qwen3 does; most do not):
        a short chat renders differently with it on and off."""
        if self._thinking_switch is None:
            probe = [{"role": "user", "content": "Hi"}]
            self._thinking_switch = self.render_text(probe, think=True) != self.render_text(probe, think=False)
        return self._thinking_switch

    def _tail(self, prefix: list[dict[str, str]], index: int, think: bool) -> str | None:
        """The template's text after assistant turn ``index`` of ``prefix`` up to the end
        of the generation prompt, or None where the template does not echo the turn."""
        probe = [dict(m) for m in prefix]
        probe[index]["content"] = _SENTINEL
        text = self.render_text(probe, think=think)
        before, sep, after = text.partition(_SENTINEL)
        if not sep or _SENTINEL in after:
            return None
        return after

    def _special_ids(self) -> set[int]:
        if self._special is None:
            tok = self.tokenizer
            ids = set(getattr(tok, "all_special_ids", None) or [])
            for i, added in (getattr(tok, "added_tokens_decoder", None) or {}).items():
                if getattr(added, "special", False):
                    ids.add(int(i))
            self._special = ids
        return self._special

    def _token_text(self, token_id: int) -> str:
        toks = self.tokenizer.convert_ids_to_tokens([token_id])
        return toks[0] if toks and isinstance(toks[0], str) else ""

    def token_ids(self, messages: Sequence[dict[str, str]], *, think: bool = False) -> tuple[list[int], bool]:
        """Token ids of ``messages`` rendered as-it-ran, with the generation prompt.
        Returns ``(ids, exact)``; ``exact`` is False where the plain render was used."""
        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        if not turns or turns[0] == 0:
            return self.encode(self.render_text(msgs, think=think)), not turns
        last = turns[-1] == len(msgs) - 2 and msgs[-1]["role"] == "user" \
            and _opaque(msgs[-1]["content"])
        lkey: Any = None
        if last:  # a batch's row: only its own message is rendered and encoded
            lkey = _shared_key(msgs, think)
            shared = self._lasts.get(lkey)
            if shared:
                got = self._row_ids(shared, msgs[-1], think)
                if got is not None:
                    return got
            last = shared is None  # (decided once: below, what the rows share is kept)
        prefix = _prefix_digests(msgs)

        def boundary(k: int) -> tuple[int, bool]:
            """Where turn k's tail ends, and the thinking mode of the prompt it ends with."""
            nxt = turns[k + 1] if k + 1 < len(turns) else len(msgs)
            return nxt, ran_with_thinking(msgs[nxt]["content"]) if nxt < len(msgs) else think

        # resume after the last turn already rendered by an earlier prompt of this chat
        start, ids, text = 0, None, ""
        for k in range(len(turns) - 1, -1, -1):
            nxt, nthink = boundary(k)
            hit = self._states.get((prefix[nxt], nthink))
            if hit is not None:
                start, ids, text = k + 1, list(hit[0]), hit[1]
                break
        if ids is None:
            first = turns[0]
            fthink = ran_with_thinking(msgs[first]["content"])
            head = self._states.get((prefix[first], fthink, "head"))
            if head is not None:  # the chat's opening, encoded once for every row that shares it
                ids, text = list(head[0]), head[1]
            else:
                text = self.render_text(msgs[:first], think=fthink)
                ids = self.encode(text)
                self._states.put((prefix[first], fthink, "head"), (array("I", ids), text))
        fresh: list[tuple[bytes, bool, int, int]] = []
        share = None
        for k in range(start, len(turns)):
            i = turns[k]
            nxt, nthink = boundary(k)
            tail = self._tail(msgs[:nxt], i, nthink)
            if tail is None:
                if last:
                    self._lasts.put(lkey, False)
                return self.encode(self.render_text(msgs, think=think)), False
            content = msgs[i]["content"]
            text += content + tail
            whole = tail  # (as the text has it)
            gen = self._generated.get(_digest(_ids_digest(ids), content))
            if gen is not None:
                gen = list(gen)
                # the generated ids end with the stop token (<|im_end|>) that the
                # template writes at the start of the tail: write it once
                if gen[-1] in self._special_ids():
                    stop = self._token_text(gen[-1])
                    if stop and tail.startswith(stop):
                        tail = tail[len(stop):]
            else:
                gen = self.encode(content)
            ids += gen
            if last and k == len(turns) - 1:  # the part every row of this chat shares
                share = (array("I", ids), text[:len(text) - len(whole)], whole, len(whole) - len(tail))
            ids += self.encode(tail)
            fresh.append((prefix[nxt], nthink, len(ids), len(text)))
        # Segments encoded apart must read as the whole (not so for tokenizers that add
        # a prefix space to every piece): otherwise encode the as-it-ran text whole.
        if self._decode_all(ids) != text:
            if last:
                self._lasts.put(lkey, False)
            return self.encode(text), False
        if share is not None:
            self._keep_share(lkey, msgs, turns[-1], think, share)
        for key, nthink, n_ids, n_text in fresh:
            self._states.put((key, nthink), (array("I", ids[:n_ids]), text[:n_text]))
        return ids, True

    def _keep_share(self, lkey: Any, msgs: list[dict[str, str]], i: int, think: bool,
                    share: tuple[Any, str, str, int]) -> None:
        """Keep what the chats that differ from ``msgs`` only in their last (user)
        message share, for :meth:`_row_ids`: the ids and text up to the end of the last
        reply (turn ``i``), and the template's text after that reply around the message
        (from the render with a sentinel in the reply's place and markers in the
        message's, made once). Kept only where that text, with this chat's message,
        is the tail the whole render gave (else False: every such chat goes the long way)."""
        ids, text, whole, cut = share
        probe = [dict(m) for m in msgs]
        probe[i]["content"] = _SENTINEL
        frame = self._frame(probe, think)
        kept: Any = False
        if frame:
            before, after = frame
            _, sep, head = before.partition(_SENTINEL)
            if (sep and _SENTINEL not in head and _SENTINEL not in after
                    and head + msgs[-1]["content"] + after == whole):
                kept = (ids, text, head, cut, after, _prefix_hasher(msgs[:-1]))
        self._lasts.put(lkey, kept)

    def _row_ids(self, shared: tuple, message: dict[str, str], think: bool
                 ) -> tuple[list[int], bool] | None:
        """:meth:`token_ids` of a chat whose all but last message are ``shared``'s (see
        :meth:`_keep_share`): the shared ids, then the template's text after the last
        reply with this message, encoded; None where they do not read as the whole."""
        base, text0, head, cut, foot, hasher = shared
        tail = head + message["content"] + foot
        ids = list(base)
        ahead = self._tails.get(tail[cut:]) if self._tails else None
        ids += ahead[0] if ahead is not None else self.encode(tail[cut:])
        text = text0 + tail
        # (read as the whole already where it was encoded ahead with this base)
        if not (ahead is not None and ahead[1] is base and ahead[2]) and self._decode_all(ids) != text:
            return None
        h = hasher.copy()  # (the state a later prompt of this chat starts from, as ever)
        for part in (message["role"], message["content"]):
            b = part.encode("utf-8", "surrogatepass")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
        self._states.put((h.digest(), think), (array("I", ids), text))
        return ids, True

    @contextmanager
    def rows_encoded(self, chats: Sequence[Sequence[dict[str, str]]], think: bool) -> Iterator[None]:
        """While inside, the prompts of ``chats`` that share all but their last message
        with a chat seen before (a batch's rows: see :meth:`_keep_share`) find their own
        part encoded already: encoded here together, by one call of the Rust tokenizer,
        which lets go of the GIL while it works (the engine's thread runs meanwhile; one
        call a row held it)."""
        fast = self._fast if self._fast is not None else self._find_fast()
        many = getattr(fast, "encode_batch_fast", None) or getattr(fast, "encode_batch", None) \
            if fast else None
        texts, rows = [], []
        if many is not None and len(chats) > 1:
            for msgs in chats:
                if len(msgs) < 2 or msgs[-1]["role"] != "user" or msgs[-2]["role"] != "assistant":
                    continue
                content = msgs[-1]["content"]
                shared = self._lasts.get(_shared_key(msgs, think))
                if shared and _opaque(content):
                    tail = shared[2] + content + shared[4]
                    texts.append(tail[shared[3]:])
                    rows.append((shared, shared[1] + tail))
        mine: list[str] = []
        if texts:
            try:
                encoded = [enc.ids for enc in many(texts, add_special_tokens=False)]
                # each row's ids read as its whole text? (decoded together, the GIL let go)
                whole = [list(shared[0]) + ids for (shared, _), ids in zip(rows, encoded)]
                read = fast.decode_batch(whole, skip_special_tokens=False)
            except Exception:  # noqa: BLE001 - (each row encodes its own, as ever)
                encoded = read = None
            if encoded is not None and read is not None:
                for text, ids, (shared, full), got in zip(texts, encoded, rows, read):
                    if text not in self._tails:
                        self._tails[text] = (ids, shared[0], got == full)
                        mine.append(text)
        try:
            yield
        finally:
            for text in mine:
                self._tails.pop(text, None)

    def remember(self, prompt_ids: Sequence[int], text: str, generated_ids: Sequence[int]) -> None:
        """Record that a request with ``prompt_ids`` generated ``generated_ids``, whose
        text is ``text`` (the reply as stored), so the next prompt reuses those ids.
        Ids that do not read as ``text`` (a stop string cut off) are not kept."""
        gen = list(generated_ids)
        if not gen:
            return
        if self._decode_text(gen) != text and self.tokenizer.decode(
                gen, skip_special_tokens=True) != text:
            return
        self._generated.put(_digest(_ids_digest(prompt_ids), text), array("I", gen))  # 4 bytes a token

    def _too_long(self, system: list[dict[str, str]], newest: list[dict[str, str]], think: bool) -> str:
        """Say which part does not fit: the system prompt alone, or the message."""
        limit = self.max_model_len
        both = self.count(system + newest, think=think)
        fix = "or load the model with a larger --max-model-len"
        if system:
            alone = self.count(system, think=think)
            if alone >= limit:
                return (f"the system prompt is too long for the model: {alone} tokens on its own, and "
                        f"max_model_len is {limit}; shorten the system prompt (--system), {fix}")
            return (f"the message is too long for the model: {both} prompt tokens, of which the system "
                    f"prompt is {alone}, and max_model_len is {limit}; shorten the message, {fix}")
        return (f"the message is too long for the model: {both} prompt tokens, and max_model_len is "
                f"{limit}; shorten the message, {fix}")

    def count(self, messages: Sequence[dict[str, str]], *, think: bool = False) -> int:
        return len(self.token_ids(messages, think=think)[0])

    # -- fitting -----------------------------------------------------------------------------
    def build(self, messages: Sequence[dict[str, str]], max_tokens: int, *,
              think: bool = False, tools: Sequence[dict[str, Any]] | None = None,
              prefill: str = "", need: int | None = None, keep_context: bool = False) -> Prompt:
        """Render ``messages`` and fit them with ``max_tokens`` into ``max_model_len``.
        With ``tools`` or tool messages the chat is rendered plainly (the template's own
        tool format); ``prefill`` is text the reply starts with (after the generation
        prompt). ``need`` and ``keep_context``: see :func:`fit_window`."""
        plain = bool(tools) or bool(prefill) or has_tool_messages(messages)
        msgs = [dict(m) if plain else {"role": m["role"], "content": m["content"]}
                for m in messages]
        if not msgs:
            raise InvalidInput("there is no message to send")

        def measure(kept: list[dict[str, str]]) -> tuple[int, Any]:
            if plain:
                ids = self.encode(self.render_text(kept, think=think, tools=tools) + prefill)
                return len(ids), (ids, False)
            ids, exact = self.token_ids(kept, think=think)
            return len(ids), (ids, exact)

        def too_long(system: list[dict[str, str]], newest: list[dict[str, str]]) -> str:
            return self._too_long(system, newest, think)

        fit = fit_window(msgs, max_tokens, self.max_model_len, measure, too_long,
                         need=need, keep_context=keep_context)
        ids, exact = fit.payload
        p = Prompt(ids, fit.max_tokens, fit.messages, fit.dropped_messages, fit.dropped_turns, exact)
        p.notes.extend(fit.notes)
        return p


@dataclass
class Fit:
    """Messages fitted into a context window: what was kept, its length in tokens, the
    ``max_tokens`` left for the reply, what was dropped and the notes that say so."""

    messages: list[dict[str, str]]
    length: int
    max_tokens: int
    dropped_messages: int = 0
    dropped_turns: int = 0
    payload: Any = None  # what ``measure`` gave with the length (the token ids, say)
    notes: list[str] = field(default_factory=list)


def fit_window(msgs: Sequence[dict[str, str]], max_tokens: int, limit: int,
               measure: Any, too_long: Any, window: str = "max_model_len", *,
               need: int | None = None, keep_context: bool = False) -> Fit:
    """The one fitting rule, for any backend that can count tokens (exactly or not).

    ``measure(kept) -> (length, payload)`` counts a list of messages; ``too_long(system,
    newest) -> str`` says what to shorten when the newest message cannot fit at all.
    When prompt + ``max_tokens`` exceeds ``limit``, the fewest oldest turns below the
    system prompt are dropped (a turn: a user message and what answered it); when only
    the newest exchange is left and it fits but leaves less than ``max_tokens``,
    ``max_tokens`` is lowered to what is left. ``window`` names the limit in the notes.

    ``need``: the most reply tokens the answer can use (a ``--choice``'s longest choice):
    the room reserved is then ``min(max_tokens, need)``, so no turn is dropped for room the
    answer could never fill. ``keep_context`` (a batch row, whose context holds the
    batch's instructions): no turn is ever dropped; the reply room is lowered to what is
    left (not below ``need``), and a row whose prompt cannot fit with it raises
    :class:`InvalidInput` (the row fails, saying so)."""
    msgs = list(msgs)
    if not msgs:
        raise InvalidInput("there is no message to send")
    reserve = min(max_tokens, need) if need else max_tokens
    if keep_context:
        return _fit_whole(msgs, max_tokens, reserve, need, limit, measure, window)
    head = 1 if msgs[0]["role"] == "system" else 0
    # turn boundaries: each user message after the system prompt starts a turn
    starts = [i for i in range(head, len(msgs)) if msgs[i]["role"] == "user" or i == head]
    last = starts[-1]

    def attempt(k: int) -> Fit:
        cut = starts[k] if k < len(starts) else last
        kept = msgs[:head] + msgs[cut:]
        length, payload = measure(kept)
        return Fit(kept, length, max_tokens, cut - head, k, payload)

    p = attempt(0)
    if p.length + reserve > limit and len(starts) > 1:
        # the fewest dropped turns that fit (binary search: fewer turns, fewer tokens)
        lo, hi = 1, len(starts) - 1
        best = attempt(hi)
        if best.length + reserve <= limit:
            while lo < hi:
                mid = (lo + hi) // 2
                cand = attempt(mid)
                if cand.length + reserve <= limit:
                    best, hi = cand, mid
                else:
                    lo = mid + 1
        p = best
        n = p.dropped_turns
        p.notes.append(
            f"dropped the {n} oldest turn{'s' if n != 1 else ''} ({p.dropped_messages} messages) "
            f"to fit {window} {limit}"
        )
    if p.length >= limit:
        raise InvalidInput(too_long(msgs[:head], msgs[last:]))
    if p.length + max_tokens > limit:
        p.max_tokens = limit - p.length
        if p.max_tokens < reserve:  # (room the answer could not use is no loss)
            p.notes.append(
                f"max_tokens lowered from {max_tokens} to {p.max_tokens} to fit {window} {limit}"
            )
    return p


def _fit_whole(msgs: list[dict[str, str]], max_tokens: int, reserve: int, need: int | None,
               limit: int, measure: Any, window: str) -> Fit:
    """:func:`fit_window` for a batch row: every message kept, the reply room lowered to
    what is left, or :class:`InvalidInput` naming what does not fit."""
    length, payload = measure(msgs)
    p = Fit(msgs, length, max_tokens, payload=payload)
    least = reserve if need else 1
    if length + least > limit:
        inherited = len(msgs) - 1
        what = f"its message and {inherited} inherited" if inherited else "its message alone"
        room = f"the {least} reply tokens the answer needs" if need else "a reply"
        raise InvalidInput(
            f"{TOO_LONG}: {length} prompt tokens ({what}) leave no room for {room} in "
            f"{window} {limit}; no context was dropped: shorten the value (max_value_chars) "
            "or the parent chat, or use a larger window")
    if length + max_tokens > limit:
        p.max_tokens = limit - length
        if p.max_tokens < reserve:
            p.notes.append(
                f"max_tokens lowered from {max_tokens} to {p.max_tokens} to fit {window} {limit}"
            )
    return p
