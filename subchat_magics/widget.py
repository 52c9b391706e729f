"""The live chat-tree view that ``%subchat tree`` shows in a notebook.

Built from core ipywidgets only, so it renders wherever ipywidgets does (JupyterLab,
Notebook 7, VS Code, Colab) with no frontend extension to install, and the whole tree is
one ``Select`` model however many chats it holds. The view listens to the tree
(:meth:`ChatTree.subscribe`) and owns no chat logic: Send and Branch go through the
session like a ``%%subchat`` cell, on a worker thread so that Stop is heard while tokens
flow (a running cell blocks widget events).

Where tokens become pixels: finished messages each live in their own ``Output`` widget,
sent once. The reply now streaming is shown in a few "chunk" widgets; each update
(coalesced to ~20 a second) resends only the last chunk, so the bytes of an update stay
flat however long the reply or the transcript grows.
"""

from __future__ import annotations

import html
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import ipywidgets as w

from . import render
from .errors import InvalidInput, SubchatError
from .streaming import Coalescer
from .tree import ROOT, ChatTree, Message, normalize_path

if TYPE_CHECKING:
    from .session import Session
    from .turn import Turn

MAX_SHOWN = 100  # own messages shown in the transcript; older ones are summed up in one line
CHUNK_SOFT = 2000  # a streaming chunk is closed at the next newline past this many characters
CHUNK_HARD = 6000  # ...or at the next space past this many, for replies without newlines
JOIN_TIMEOUT = 10.0  # seconds close() waits for a cancelled reply to reach its next token
NBSP = "\u00a0"
CURSOR = "▌"

_CSS = """<style>
.subchat-view .subchat-tree select { font-family: var(--jp-code-font-family, monospace);
  font-size: var(--jp-code-font-size, 13px); }
.subchat-view .subchat-transcript { border-left: 1px solid var(--jp-border-color2, #ddd);
  padding-left: 8px; overflow-anchor: none; }
.subchat-view .subchat-transcript > * { flex-shrink: 0; }
.subchat-view .subchat-stream .widget-html-content { line-height: 1.45; }
.subchat-view .subchat-msg-user { background: var(--jp-layout-color2, #f5f5f5); }
.subchat-view .subchat-error { color: var(--jp-error-color1, #c00); }
</style>"""


@dataclass
class _ChatInfo:
    """What a tree label shows about one chat."""

    count: int = 0
    last: Message | None = None  # its last reply
    streaming: int = 0


@dataclass
class _Stream:
    """A reply now streaming into some chat."""

    turn: "Turn"
    coalescer: Coalescer
    shown: bool = False
    consumed: int = 0  # parts of turn.parts already put into chunks
    chunks: list[str] = field(default_factory=list)


def _chunk_html(text: str, cursor: bool) -> str:
    return (f'<span style="white-space:pre-wrap">{html.escape(text)}'
            f'{CURSOR if cursor else ""}</span>')


def _split_chunks(chunks: list[str], new: str) -> list[str]:
    """Append ``new`` to the last chunk, closing it at a newline past CHUNK_SOFT characters
    (or a space past CHUNK_HARD) so that no chunk grows without bound."""
    text = chunks[-1] + new
    out = chunks[:-1]
    while len(text) > CHUNK_SOFT:
        cut = text.find("\n", CHUNK_SOFT) + 1
        if cut <= 0 and len(text) > CHUNK_HARD:
            cut = text.find(" ", CHUNK_HARD) + 1
        if cut <= 0:
            break
        out.append(text[:cut])
        text = text[cut:]
    out.append(text)
    return out


def _message_markdown(m: Message, provenance: bool) -> str:
    tag = "" if m.status == "complete" else f" [{m.provenance.get('finish_reason', m.status)}]"
    if m.role == "assistant":
        body = render.reply_markdown(m.content) if m.content else "*(no text)*"
    else:
        body = m.content
    text = f"**{m.role}**{tag}\n\n{body}"
    if provenance and m.role == "assistant":
        line = render.provenance_line(m)
        if line:
            text += "\n\n> " + line.replace("\n", "\n> ")
    return text


def _markdown_output(markdown: str, plain: str) -> dict[str, Any]:
    return {"output_type": "display_data", "metadata": {},
            "data": {"text/markdown": markdown, "text/plain": plain}}


def _dispose(widget: w.Widget, seen: set[int]) -> None:
    """Close a widget, its children, layout and style (Widget.close closes only itself)."""
    if id(widget) in seen:
        return
    seen.add(id(widget))
    for child in getattr(widget, "children", ()):
        _dispose(child, seen)
    for part in ("layout", "style"):
        sub = getattr(widget, part, None)
        if isinstance(sub, w.Widget):
            _dispose(sub, seen)
    widget.close()


class TreeView(w.VBox):
    """A live view of a :class:`ChatTree`: the tree, the selected chat's transcript, and
    Send / Branch / Stop / Rename / Delete. ``%subchat tree`` returns one.

    Several views of one tree stay consistent: each one follows the tree's events, from
    whatever thread streams. ``close()`` unsubscribes and stops the view's own replies.
    The Python methods (:meth:`select`, :meth:`send`, :meth:`branch`, :meth:`stop`,
    :meth:`rename`, :meth:`delete`, :meth:`wait`) are what the buttons call."""

    def __init__(self, tree: ChatTree, session: "Session | None" = None, *,
                 interval: float = 0.05, clock: Callable[[], float] | None = None,
                 **kwargs: Any):
        self.tree = tree
        self.session = session
        self.interval = interval
        self._clock = clock
        self._lock = threading.RLock()
        self._closed = False
        self._info: dict[str, _ChatInfo] = {}
        self._streams: dict[str, _Stream] = {}
        self._workers: set[threading.Thread] = set()
        self._own: set[Turn] = set()
        self._msg_widgets: list[w.Widget] = []
        self._extra_widgets: list[w.Widget] = []  # transcript/compare parts rebuilt on select
        self._hidden = 0  # own messages of the selected chat not shown (beyond MAX_SHOWN)
        self._shown: _Stream | None = None
        self._chunk_texts: list[str] = []
        self._confirm_delete = False
        self._syncing = False

        start = session.current if session is not None else ROOT
        if start not in tree:
            start = ROOT

        # shared layouts: a message or chunk widget then opens one comm, not two or three
        self._msg_layout = w.Layout(margin="2px 0", padding="0 4px")
        self._chunk_layout = w.Layout(margin="0")

        self.header = w.HTML(_dom_classes=("subchat-header",))
        self.chats = w.Select(rows=8, layout=w.Layout(width="380px", height="auto"),
                              _dom_classes=("subchat-tree",))
        self.rename_name = w.Text(placeholder="new name", layout=w.Layout(width="200px"),
                                  _dom_classes=("subchat-rename-name",))
        self.rename_button = w.Button(description="Rename", layout=w.Layout(width="80px"),
                                      _dom_classes=("subchat-rename",))
        self.delete_button = w.Button(description="Delete", icon="trash",
                                      layout=w.Layout(width="120px"),
                                      _dom_classes=("subchat-delete",))
        self.refresh_button = w.Button(description="Refresh", icon="refresh",
                                       tooltip="Re-read the store (picks up other kernels' writes)",
                                       layout=w.Layout(width="100px"),
                                       _dom_classes=("subchat-refresh",))
        # column-reverse: the browser keeps a scrolled box anchored at its newest message
        self.transcript = w.VBox(layout=w.Layout(max_height="460px", overflow="auto",
                                                 flex="1 1 auto", width="auto",
                                                 flex_flow="column-reverse"),
                                 _dom_classes=("subchat-transcript",))
        self._pane_head = w.HTML(value="<b>assistant</b> <i>● streaming…</i>")
        self._chunks = [w.HTML(layout=self._chunk_layout)]
        self.stream = w.VBox([self._pane_head, *self._chunks], layout=w.Layout(flex="0 0 auto"),
                             _dom_classes=("subchat-stream",))
        self.input = w.Textarea(placeholder="Message (Send continues the selected chat)",
                                rows=3, layout=w.Layout(width="auto"),
                                _dom_classes=("subchat-input",))
        self.send_button = w.Button(description="Send", button_style="primary", icon="paper-plane",
                                    _dom_classes=("subchat-send",))
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop",
                                    disabled=True, _dom_classes=("subchat-stop",))
        self.branch_name = w.Text(placeholder="branch name", layout=w.Layout(width="140px"),
                                  _dom_classes=("subchat-branch-name",))
        self.branch_button = w.Button(description="Branch", icon="code-fork",
                                      tooltip="New subchat under the selected chat "
                                              "(sends the message into it, if any)",
                                      _dom_classes=("subchat-branch",))
        self.provenance = w.ToggleButton(description="provenance", value=False,
                                         tooltip="Show backend, model, tokens and time of replies",
                                         _dom_classes=("subchat-provenance",))
        self.compare = w.ToggleButton(description="compare", value=False,
                                      tooltip="The selected chat beside its siblings "
                                              "(for root: its subchats), last exchange each",
                                      _dom_classes=("subchat-compare-toggle",))
        self.follow = w.ToggleButton(description="follow", value=True,
                                     tooltip="Select a chat when a reply starts in it",
                                     _dom_classes=("subchat-follow",))
        self.status = w.HTML(_dom_classes=("subchat-status",))
        for b in (self.send_button, self.stop_button, self.branch_button):
            b.layout.width = "100px"
        for t in (self.provenance, self.compare, self.follow):
            t.layout.width = "100px"

        left = w.VBox([self.chats, w.HBox([self.rename_name, self.rename_button]),
                       w.HBox([self.delete_button, self.refresh_button])],
                      layout=w.Layout(flex="0 0 auto"))
        right = w.VBox([self.transcript, self.input,
                        w.HBox([self.send_button, self.stop_button, self.branch_name,
                                self.branch_button, self.provenance, self.compare, self.follow],
                               layout=w.Layout(flex_flow="row wrap"))],
                       layout=w.Layout(flex="1 1 auto", width="auto"))
        super().__init__([self.header, w.HBox([left, right]), self.status],
                         _dom_classes=("subchat-view",), **kwargs)

        self._load_info()
        self._set_labels(select=start)
        self._build_transcript()
        self._update_header()

        self.chats.observe(self._on_select, names="value")
        self.provenance.observe(self._on_mode, names="value")
        self.compare.observe(self._on_mode, names="value")
        self.send_button.on_click(lambda _: self._action(self._click_send))
        self.branch_button.on_click(lambda _: self._action(self._click_branch))
        self.stop_button.on_click(lambda _: self._action(self.stop))
        self.rename_button.on_click(lambda _: self._action(self._click_rename))
        self.delete_button.on_click(lambda _: self._action(self._click_delete))
        self.refresh_button.on_click(lambda _: self._action(self.refresh))
        self._unsubscribe = tree.subscribe(self._on_event)

    # -- the public, scriptable side (the buttons call these) ---------------------------------
    @property
    def selected(self) -> str:
        """The path of the selected chat."""
        return self.chats.value or ROOT

    @property
    def busy(self) -> bool:
        """True while a reply this view started is still streaming."""
        return any(t.is_alive() for t in list(self._workers))

    def select(self, path: str) -> None:
        """Show the chat at ``path`` (it becomes the session's current chat)."""
        chat = self.tree.get(path)
        with self._lock:
            self.chats.value = chat.path  # _on_select rebuilds the transcript

    def send(self, text: str, path: str | None = None) -> "Turn":
        """Send ``text`` into the selected chat (or ``path``) with the session's backend and
        settings; the reply streams on a worker thread. Returns the :class:`Turn`."""
        target = self.tree.get(path or self.selected).path
        if target in self._streams:
            raise InvalidInput(f"{target} is still streaming a reply; Stop it or wait for it")
        turn = self._make_turn(target, text)
        self._start(turn)
        return turn

    def branch(self, name: str | None = None, text: str | None = None) -> str:
        """Create a subchat of the selected chat named ``name`` (default: the next free
        number), select it, and send ``text`` into it if given. Returns its path."""
        parent = self.tree.get(self.selected)
        name = (name or "").strip()
        if not name:
            taken = [int(c.name) for c in parent.children if c.name.isdigit()]
            name = str(max(taken, default=0) + 1)
        path = normalize_path(f"{parent.path}/{name}")
        if path.count("/") != parent.path.count("/") + 1:
            raise InvalidInput(f"a branch name is one path part, not {name!r}")
        chat = self.tree.create(path)
        self.select(chat.path)
        if text and text.strip():
            self.send(text, chat.path)
        return chat.path

    def stop(self) -> int:
        """Stop the reply streaming in the selected chat (whoever started it) and this
        view's own replies. Returns how many replies were asked to stop."""
        with self._lock:
            turns = set(self._own)
            s = self._streams.get(self.selected)
            if s is not None:
                turns.add(s.turn)
        for turn in turns:
            turn.cancel()
        if turns:
            self._set_status("stopping…")
        return len(turns)

    def rename(self, new_name: str) -> str:
        """Rename the selected chat; returns its new path."""
        return self.tree.rename(self.selected, new_name.strip()).path

    def delete(self) -> list[str]:
        """Delete the selected chat and its subchats (the button asks first)."""
        path = self.selected
        if path in self._streams or any(p.startswith(path + "/") for p in self._streams):
            raise InvalidInput(f"{path} has a reply streaming; Stop it first")
        return self.tree.delete(path, force=True)

    def refresh(self) -> None:
        """Re-read the store (another kernel may have written to it) and redraw."""
        self.tree.refresh()
        with self._lock:
            self._load_info()
            self._set_labels(select=self.selected if self.selected in self.tree else ROOT)
            self._build_transcript()
            self._update_header()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for this view's replies to finish; False if some are still running."""
        for t in list(self._workers):
            t.join(timeout)
        return not self.busy

    def close(self) -> None:
        """Unsubscribe from the tree, stop this view's replies and wait for their threads,
        then close every widget of the view."""
        if self._closed:
            return
        self._closed = True
        unsubscribe = getattr(self, "_unsubscribe", None)
        if unsubscribe is not None:
            unsubscribe()
        for turn in list(getattr(self, "_own", ())):
            turn.cancel()
        me = threading.current_thread()
        for t in list(getattr(self, "_workers", ())):
            if t is not me:
                t.join(JOIN_TIMEOUT)
        with self._lock:
            seen: set[int] = {id(self)}
            for widget in [*self.children, *self._msg_widgets, *self._extra_widgets,
                           self.stream, self._msg_layout, self._chunk_layout]:
                _dispose(widget, seen)
            self._msg_widgets, self._extra_widgets = [], []
        super().close()

    # -- the static side: what a notebook keeps when there is no kernel ----------------------
    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        data = super()._repr_mimebundle_(**kwargs) or {}
        text = render.tree_text(self.tree, self.selected)
        data["text/plain"] = text
        data["text/html"] = ("<pre class='subchat-tree-static'>" + html.escape(text) + "</pre>")
        return data

    def __repr__(self) -> str:
        return f"<TreeView of {self.tree.path.name}, {self.selected} selected>"

    # -- sending ------------------------------------------------------------------------------
    def _make_turn(self, path: str, text: str) -> "Turn":
        if self.session is None:
            return self.tree.send(path, text)
        if self.session.tree is not self.tree:
            raise InvalidInput("this view shows another store than the session now uses; "
                               "run %subchat tree again")
        return self.session.send(path, text)

    def _start(self, turn: "Turn") -> None:
        thread = threading.Thread(target=self._run, args=(turn,), daemon=True,
                                  name=f"subchat-view {turn.chat.path}")
        with self._lock:
            self._own.add(turn)
            self._workers.add(thread)
            self._update_buttons()
        thread.start()

    def _run(self, turn: "Turn") -> None:
        """The worker: stream the turn (the tree's events update every view)."""
        try:
            for _ in turn:
                pass
        except KeyboardInterrupt:
            pass  # Stop: the reply is stored, marked interrupted
        except SubchatError as exc:
            self._set_status(f"{turn.chat.path}: {exc}", error=True)
        except Exception as exc:  # noqa: BLE001 - a thread's error would only reach the log
            self._set_status(f"{turn.chat.path}: {type(exc).__name__}: {exc}", error=True)
        finally:
            with self._lock:
                self._own.discard(turn)
                self._workers.discard(threading.current_thread())
                if not self._closed:
                    self._update_buttons()

    # -- button handlers ----------------------------------------------------------------------
    def _action(self, fn: Callable[[], Any]) -> None:
        if not fn.__name__.startswith("_click_delete"):
            self._reset_delete()
        try:
            fn()
        except SubchatError as exc:
            self._set_status(str(exc), error=True)

    def _click_send(self) -> None:
        text = self.input.value
        if not text.strip():
            raise InvalidInput("write a message first")
        self.send(text)
        self.input.value = ""

    def _click_branch(self) -> None:
        text = self.input.value
        path = self.branch(self.branch_name.value, text)
        self.branch_name.value = ""
        if text.strip():
            self.input.value = ""
        self._set_status(f"branched {path}")

    def _click_rename(self) -> None:
        if not self.rename_name.value.strip():
            raise InvalidInput("write the new name first")
        path = self.rename(self.rename_name.value)
        self.rename_name.value = ""
        self._set_status(f"renamed to {path}")

    def _click_delete(self) -> None:
        path = self.selected
        if not self._confirm_delete:
            n = len(self.tree.subtree(path)) - 1
            what = "everything in the tree" if path == ROOT else path
            more = f" and its {n} subchat{'s' if n != 1 else ''}" if n and path != ROOT else ""
            self._confirm_delete = True
            self.delete_button.description = "Confirm delete"
            self.delete_button.button_style = "danger"
            self._set_status(f"click Confirm delete to delete {what}{more}")
            return
        self._reset_delete()
        gone = self.delete()
        self._set_status(f"deleted {', '.join(gone)}")

    def _reset_delete(self) -> None:
        if self._confirm_delete:
            self._confirm_delete = False
            with self.delete_button.hold_sync():
                self.delete_button.description = "Delete"
                self.delete_button.button_style = ""

    # -- tree events (any thread) -------------------------------------------------------------
    def _on_event(self, event: str, data: dict[str, Any]) -> None:
        if event == "reply-delta":
            # the hot path: a dict lookup and a clock read per token, an update when due
            s = self._streams.get(data["path"])
            if s is not None and s.shown and s.coalescer.tick():
                with self._lock:
                    if s is self._shown and not self._closed:
                        self._flush()
            return
        if self._closed:
            return
        with self._lock:
            handler = getattr(self, "_on_" + event.replace("-", "_"), None)
            if handler is not None:
                handler(**data)

    def _on_chat_created(self, path: str, **_: Any) -> None:
        self._info.setdefault(path, _ChatInfo())
        self._set_labels()
        self._update_header()
        if self.compare.value:
            self._build_transcript()

    def _on_chat_deleted(self, paths: list[str], **_: Any) -> None:
        for p in paths:
            self._info.pop(p, None)
        if ROOT in paths:  # deleting root empties the tree; a fresh root exists
            self._info[ROOT] = _ChatInfo()
        sel = self.selected
        if sel in paths and sel != ROOT:
            sel = sel.rpartition("/")[0]
            while sel not in self.tree:
                sel = sel.rpartition("/")[0] or ROOT
        self._set_labels(select=sel)
        self._build_transcript()
        self._update_header()

    def _on_chat_renamed(self, old: str, path: str, **_: Any) -> None:
        def moved(p: str) -> str:
            return path + p[len(old):] if p == old or p.startswith(old + "/") else p

        self._info = {moved(p): i for p, i in self._info.items()}
        self._streams = {moved(p): s for p, s in self._streams.items()}
        self._set_labels(select=moved(self.selected))
        self._build_transcript()

    def _on_message(self, path: str, message: Message, **_: Any) -> None:
        info = self._info.setdefault(path, _ChatInfo())
        info.count += 1
        if message.role == "assistant":
            info.last = message
        self._set_labels()
        if path != self.selected:
            if self.compare.value and path in self._compare_paths():
                self._build_transcript()
            return
        if self.compare.value:
            self._build_transcript()
            return
        s = self._streams.get(path)
        if message.role == "assistant" and s is not None and s is self._shown:
            self._shown = None  # the stored reply replaces the streaming chunks
            self._reset_chunks()
        self._msg_widgets.append(self._message_widget(message))
        if len(self._msg_widgets) > MAX_SHOWN:
            _dispose(self._msg_widgets.pop(0), set())
            self._hidden += 1
            self._refresh_transcript_head()
        self._set_transcript_children()

    def _on_reply_start(self, path: str, turn: "Turn", **_: Any) -> None:
        kw = {"clock": self._clock} if self._clock is not None else {}
        self._streams[path] = s = _Stream(turn, Coalescer(self.interval, **kw))
        self._info.setdefault(path, _ChatInfo()).streaming += 1
        self._set_labels()
        if path != self.selected and self.follow.value and not self._own:
            self.chats.value = path  # _on_select shows it, streaming pane included
        elif path == self.selected:
            if self.compare.value:
                self._build_transcript()
            else:
                self._show_stream(s)
        self._update_buttons()
        self._set_status(f"{path}: streaming a reply…")

    def _on_reply_end(self, path: str, turn: "Turn", message: Message, **_: Any) -> None:
        s = self._streams.get(path)
        if s is not None and s.turn is turn:
            del self._streams[path]
            if s is self._shown:  # no message event reached us (a reply stored elsewhere)
                self._shown = None
                self._reset_chunks()
                self._set_transcript_children()
        info = self._info.setdefault(path, _ChatInfo())
        info.streaming = max(0, info.streaming - 1)
        self._set_labels()
        self._update_buttons()
        if self.compare.value and path in self._compare_paths():
            self._build_transcript()
        if message.status != "complete":
            reason = message.provenance.get("finish_reason", message.status)
            self._set_status(f"{path}: reply {reason} after {len(message.content)} characters",
                             error=message.status == "error")
        else:
            line = render.provenance_line(message)
            self._set_status(f"{path}: {line.splitlines()[0] if line else 'reply complete'}")

    # -- widget-side events (the kernel's main thread) ---------------------------------------
    def _on_select(self, change: dict[str, Any]) -> None:
        if self._syncing or change["new"] is None:
            return
        with self._lock:
            self._reset_delete()
            if self.session is not None and self.session.tree is self.tree:
                self.session.current = change["new"]
            self._build_transcript()
            self._update_buttons()

    def _on_mode(self, change: dict[str, Any]) -> None:
        with self._lock:
            self._build_transcript()

    # -- drawing ------------------------------------------------------------------------------
    def _load_info(self) -> None:
        counts = self.tree.store.message_counts()
        info: dict[str, _ChatInfo] = {}
        for chat in self.tree.chats():
            n = counts.get(chat.id, 0)
            last = None
            if n:
                last = next((m for m in reversed(chat.messages) if m.role == "assistant"), None)
            old = self._info.get(chat.path)
            info[chat.path] = _ChatInfo(n, last, old.streaming if old else 0)
        self._info = info

    def _label(self, path: str, name: str, prefix: str) -> str:
        i = self._info.get(path) or _ChatInfo()
        bits = [f"{prefix}{name}", f"{i.count} msg{'s' if i.count != 1 else ''}"]
        if i.last is not None:
            p = i.last.provenance
            who = p.get("backend") or "?"
            if p.get("model") and p.get("model") != who:
                who += f"/{p['model']}"
            if i.last.status != "complete":
                who += f" [{p.get('finish_reason', i.last.status)}]"
            bits.append(who)
        label = f"{NBSP}·{NBSP}".join(bits)
        if i.streaming:
            label += f"{NBSP}{NBSP}●{NBSP}streaming"
        return label

    def _set_labels(self, select: str | None = None) -> None:
        """Redraw the tree's labels (one message); keep or move the selection."""
        chats = self.tree.chats()
        kids: dict[str, list[str]] = {}
        for c in chats:
            if c.path != ROOT:
                kids.setdefault(c.path.rpartition("/")[0], []).append(c.path)
        last = {p for ps in kids.values() for p in ps[-1:]}
        options = []
        for c in chats:
            parts = c.path.split("/")
            prefix = ""
            for depth in range(2, len(parts)):
                ancestor = "/".join(parts[:depth])
                prefix += (NBSP * 3 if ancestor in last else "│" + NBSP * 2)
            if len(parts) > 1:
                prefix += ("└─" if c.path in last else "├─") + NBSP
            options.append((self._label(c.path, c.name, prefix), c.path))
        want = select or self.selected
        if want not in {p for _, p in options}:
            want = ROOT
        self._syncing = True
        try:
            with self.chats.hold_sync():
                if options != list(zip(self.chats._options_labels, self.chats._options_values)):
                    self.chats.options = options
                    self.chats.rows = max(6, min(16, len(options)))
                self.chats.value = want
        finally:
            self._syncing = False
        if select is not None and self.session is not None and self.session.tree is self.tree:
            self.session.current = want

    def _update_header(self) -> None:
        n = len(self.tree.chats())
        value = (f"{_CSS}<b>subchat tree</b> · {n} chat{'s' if n != 1 else ''} · "
                 f"store <code>{html.escape(self.tree.path.name)}</code>")
        if self.header.value != value:
            self.header.value = value

    def _update_buttons(self) -> None:
        can_stop = bool(self._own) or self.selected in self._streams
        if self.stop_button.disabled == can_stop:
            self.stop_button.disabled = not can_stop

    def _set_status(self, text: str, error: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            cls = "subchat-error" if error else "subchat-note"
            self.status.value = f"<span class='{cls}'>{html.escape(text)}</span>"

    def _message_widget(self, m: Message) -> w.Output:
        plain = f"[{m.role}] {m.content}"
        return w.Output(outputs=(_markdown_output(_message_markdown(m, self.provenance.value),
                                                 plain),),
                        layout=self._msg_layout,
                        _dom_classes=("subchat-msg", f"subchat-msg-{m.role}"))

    def _clear_transcript(self) -> None:
        seen: set[int] = {id(self._msg_layout), id(self._chunk_layout)}
        for widget in [*self._msg_widgets, *self._extra_widgets]:
            _dispose(widget, seen)
        self._msg_widgets, self._extra_widgets = [], []
        self._hidden = 0

    def _build_transcript(self) -> None:
        """Redraw the selected chat (on selection, mode or structure changes only)."""
        self._clear_transcript()
        self._shown = None
        self._reset_chunks()
        if self.compare.value:
            self._build_compare()
            return
        chat = self.tree.get(self.selected)
        own = chat.messages
        history = self.tree.history(chat)
        inherited = history[: len(history) - len(own)]
        self._transcript_head = w.HTML(_dom_classes=("subchat-transcript-head",))
        self._extra_widgets.append(self._transcript_head)
        self._hidden = max(0, len(own) - MAX_SHOWN)
        self._refresh_transcript_head()
        if inherited:
            md = "\n\n".join(_message_markdown(m, self.provenance.value) for m in inherited)
            box = w.Output(outputs=(_markdown_output(md, "inherited"),))
            acc = w.Accordion([box], titles=(f"inherited from {chat.parent.path} "
                                              f"({len(inherited)} messages)",),
                              selected_index=None, _dom_classes=("subchat-inherited",))
            self._extra_widgets.append(acc)
        self._msg_widgets = [self._message_widget(m) for m in own[self._hidden:]]
        s = self._streams.get(chat.path)
        if s is not None:
            self._show_stream(s)
        else:
            self._set_transcript_children()

    def _refresh_transcript_head(self) -> None:
        chat = self.tree.get(self.selected)
        system = self.tree.system_prompt_for(chat)
        value = f"<b>{html.escape(chat.path)}</b>"
        if system:
            value += f" · <i>system: {html.escape(system[:200])}</i>"
        if self._hidden:
            value += (f"<br>… {self._hidden} earlier messages not shown "
                      f"(<code>%subchat show {html.escape(chat.path)}</code>)")
        if self._transcript_head.value != value:
            self._transcript_head.value = value

    def _set_transcript_children(self) -> None:
        children = [*self._extra_widgets, *self._msg_widgets]
        if self._shown is not None:
            children.append(self.stream)
        children.reverse()  # newest first: the box is laid out bottom-up
        if list(self.transcript.children) != children:
            self.transcript.children = children

    def _compare_paths(self) -> list[str]:
        chat = self.tree.get(self.selected)
        group = chat.parent.children if chat.parent is not None else chat.children
        return [c.path for c in group]

    def _build_compare(self) -> None:
        paths = self._compare_paths()
        head = w.HTML(_dom_classes=("subchat-transcript-head",))
        self._extra_widgets.append(head)
        if len(paths) < 2:
            head.value = (f"<b>{html.escape(self.selected)}</b> has no siblings to compare; "
                          "branch it first")
            self._set_transcript_children()
            return
        head.value = f"<b>comparing</b> {' · '.join(html.escape(p) for p in paths)}"
        columns = []
        for p in paths:
            msgs = self.tree.get(p).messages
            last_user = next((m for m in reversed(msgs) if m.role == "user"), None)
            last_reply = next((m for m in reversed(msgs) if m.role == "assistant"), None)
            md = f"**{p}** ({len(msgs)} messages)"
            if p in self._streams:
                md += " ● streaming"
            for m in (last_user, last_reply):
                if m is not None:
                    md += "\n\n" + _message_markdown(m, self.provenance.value)
            columns.append(w.Output(outputs=(_markdown_output(md, p),),
                                    layout=w.Layout(flex="1 1 0", min_width="180px",
                                                    padding="0 6px"),
                                    _dom_classes=("subchat-compare-column",)))
        self._extra_widgets.append(w.HBox(columns, _dom_classes=("subchat-compare",)))
        self._set_transcript_children()

    # -- streaming ----------------------------------------------------------------------------
    def _show_stream(self, s: _Stream) -> None:
        if self._shown is not None:
            self._shown.shown = False
        self._reset_chunks()
        self._shown = s
        s.shown, s.consumed, s.chunks = True, 0, [""]
        self._flush()  # what has arrived so far, then coalesced deltas
        self._set_transcript_children()

    def _flush(self) -> None:
        """Put the text that arrived since the last update into the chunks and send the
        chunks that changed: the last one, plus any new one (rarely)."""
        s = self._shown
        if s is None:
            return
        parts = s.turn.parts
        n = len(parts)
        new = "".join(parts[s.consumed:n])
        s.consumed = n
        before = len(s.chunks)
        s.chunks = _split_chunks(s.chunks, new)
        while len(self._chunks) < len(s.chunks):
            self._chunks.append(w.HTML(layout=self._chunk_layout))
        for i in range(before - 1, len(s.chunks)):
            last = i == len(s.chunks) - 1
            value = _chunk_html(s.chunks[i], cursor=last)
            if self._chunks[i].value != value:
                self._chunks[i].value = value
        if len(s.chunks) != before:
            self.stream.children = [self._pane_head, *self._chunks[:len(s.chunks)]]

    def _reset_chunks(self) -> None:
        """Drop the extra chunk widgets; the first is kept (and overwritten by the next
        reply's first update, so it is not cleared now: one message fewer)."""
        extra = self._chunks[1:]
        if extra:
            self._chunks = self._chunks[:1]
            self.stream.children = [self._pane_head, self._chunks[0]]
            seen = {id(self._chunk_layout)}
            for widget in extra:
                _dispose(widget, seen)
