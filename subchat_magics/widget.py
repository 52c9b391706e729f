"""The live chat-tree view that ``%subchat tree`` shows in a notebook.

Built from core ipywidgets only, so it renders wherever ipywidgets does (JupyterLab,
Notebook 7, VS Code, Colab) with no frontend extension to install, and the whole tree is
one ``Select`` model however many chats it holds. The view listens to the tree
(:meth:`ChatTree.subscribe`) and owns no chat logic: Send and Branch go through the
session like a ``%%subchat`` cell, on a worker thread so that Stop is heard while tokens
flow (a running cell blocks widget events).

Where tokens become pixels: the tree calls the view for every event on the thread that
streams; the view only queues it (a token is not even queued) and a render thread of the
view draws, at most ~20 times a second, whatever changed since its last pass. Finished
messages each live in their own ``Output`` widget, sent once. The reply now streaming is
shown in a few "chunk" widgets; a pass resends only the last chunk, so the bytes of an
update stay flat however long the reply or the transcript grows.
"""

from __future__ import annotations

import html
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import ipywidgets as w
from ipywidgets.widgets.widget_string import HTMLStyle

from . import render
from .errors import ChatNotFound, InvalidInput, SubchatError
from .streaming import Coalescer
from .tree import ROOT, Chat, ChatTree, Message, normalize_path

if TYPE_CHECKING:
    from .session import Session
    from .turn import Turn

MAX_SHOWN = 100  # own messages shown in the transcript; older ones are summed up in one line
CHUNK_SOFT = 2000  # a streaming chunk is closed at the next newline past this many characters
CHUNK_HARD = 4000  # ...or at the next space past this many, for replies without newlines
JOIN_TIMEOUT = 10.0  # seconds close() waits for a cancelled reply to reach its next token
DEBT_MAX = 5  # streaming updates skipped at most after a busy pass (one a reply starts in)
IDLE_EXIT = 5.0  # seconds a render thread waits for events before it ends (one starts again)
NBSP = "\u00a0"

_CSS = """<style>
.subchat-view .subchat-tree select { font-family: var(--jp-code-font-family, monospace);
  font-size: var(--jp-code-font-size, 13px); }
.subchat-view .subchat-transcript { border-left: 1px solid var(--jp-border-color2, #ddd);
  padding-left: 8px; overflow-anchor: none; }
.subchat-view .subchat-transcript > * { flex-shrink: 0; }
.subchat-view .subchat-stream .widget-html-content { line-height: 1.45; }
.subchat-view .subchat-chunk { white-space: pre-wrap; }
.subchat-view .subchat-stream > :last-child .subchat-chunk::after { content: "\\258C"; }
.subchat-view .subchat-msg-user { background: var(--jp-layout-color2, #f5f5f5); }
.subchat-view .subchat-error { color: var(--jp-error-color1, #c00); }
.jp-OutputArea-child:has(.subchat-tree-static):has(+ .jp-OutputArea-child .subchat-view) {
  display: none; }
</style>"""
LIVE_TEXT = "(the live view of the chat tree: run the notebook to use it)"


@dataclass
class _ChatInfo:
    """What a tree label shows about one chat."""

    count: int = 0
    last: Message | None = None  # its last reply
    streaming: int = 0
    last_id: int = 0  # its newest message counted (events may come after a fresh read)


@dataclass
class _Stream:
    """A reply now streaming into some chat."""

    turn: "Turn"
    coalescer: Coalescer
    consumed: int = 0  # parts of turn.parts already put into chunks
    chunks: list[str] = field(default_factory=list)


def _chunk_html(text: str) -> str:
    return f'<span class="subchat-chunk">{html.escape(text)}</span>'


def _split_chunks(chunks: list[str], new: str) -> list[str]:
    """Append ``new`` to the streaming text's chunks, changing at most the last two: the
    last chunk is closed at a line break past CHUNK_SOFT characters (or a space past
    CHUNK_HARD, for text without line breaks) and the rest starts a new one. A chunk left
    big by a burst (a pane shown mid-reply) is not resent: the next text starts a new one."""
    last = chunks[-1]
    if len(last) >= CHUNK_HARD:
        return [*chunks, new]
    text = last + new
    cut = text.find("\n", CHUNK_SOFT) + 1 if len(text) > CHUNK_SOFT else 0
    if cut <= 0 and len(text) > CHUNK_HARD:
        cut = text.find(" ", CHUNK_HARD) + 1
    if cut <= 0:
        return [*chunks[:-1], text]
    return [*chunks[:-1], text[:cut], text[cut:]]


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
                 autodraw: bool = True, **kwargs: Any):
        """``interval``: seconds between draws (and streaming updates); ``clock``: the
        clock the streaming updates are coalesced by; ``autodraw=False``: no render
        thread, changes are drawn when :meth:`sync` is called (for scripts and tests)."""
        self.tree = tree
        self.session = session
        self.interval = interval
        self.autodraw = autodraw
        self._clock = clock or time.monotonic
        self._lock = threading.RLock()  # held while drawing: by the render thread or a user action
        self._events: deque[tuple[str, dict[str, Any]]] = deque()
        self._wake = threading.Condition()  # guards _events and the render thread's life
        self._renderer: threading.Thread | None = None
        self._stopping = False
        self._last_pass = float("-inf")
        self._labels_dirty = False
        self._children_dirty = False
        self._sent = 0  # widget messages since the last pass (roughly: one per change drawn)
        self._debt = 0  # streaming updates to skip, to pay for passes that sent more than one
        self._info: dict[str, _ChatInfo] = {}
        self._streams: dict[str, _Stream] = {}
        self._workers: set[threading.Thread] = set()
        self._own: set[Turn] = set()
        self._msg_widgets: list[w.Widget] = []
        self._msg_keys: list[tuple] = []  # (id, status, content) of each message widget
        self._extra_widgets: list[w.Widget] = []  # transcript/compare parts rebuilt on select
        self._hidden = 0  # own messages of the selected chat not shown (beyond MAX_SHOWN)
        self._shown: _Stream | None = None
        self._confirm_delete = False
        self._syncing = False

        start = session.current if session is not None else ROOT
        if start not in tree:
            start = ROOT

        # shared layouts (and style): a message or chunk widget opens one comm, not two or three
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
        self._chunk_style = HTMLStyle()
        self._chunks = [w.HTML(layout=self._chunk_layout, style=self._chunk_style)]
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
        self._closed = False  # from here on, close() has a view to close
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
        self._unsubscribe = tree.subscribe(self._listener)

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
            self._pass()  # events not drawn yet (a chat just created) come first
            self.chats.value = chat.path  # _on_select rebuilds the transcript

    def send(self, text: str, path: str | None = None) -> "Turn":
        """Send ``text`` into the selected chat (or ``path``) with the session's backend and
        settings; the reply streams on a worker thread. Returns the :class:`Turn`."""
        target = self.tree.get(path or self.selected).path
        if target in self._streams or any(t.chat.path == target for t in list(self._own)):
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
        path = self.tree.rename(self.selected, new_name.strip()).path
        self.sync()
        return path

    def delete(self) -> list[str]:
        """Delete the selected chat and its subchats (the button asks first)."""
        path = self.selected
        if path in self._streams or any(p.startswith(path + "/") for p in self._streams):
            raise InvalidInput(f"{path} has a reply streaming; Stop it first")
        gone = self.tree.delete(path, force=True)
        self.sync()
        return gone

    def refresh(self) -> None:
        """Re-read the store (another kernel may have written to it) and redraw."""
        self.tree.refresh()
        with self._lock:
            self._pass()
            self._load_info()
            self._set_labels(select=self.selected if self.selected in self.tree else ROOT)
            self._build_transcript()
            self._update_header()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for this view's replies to finish, then draw what they changed; False if
        some are still running."""
        for t in list(self._workers):
            t.join(timeout)
        self.sync()
        return not self.busy

    def sync(self) -> None:
        """Draw now, on this thread, every change the tree reported so far (the render
        thread would within ~1/20 s): for scripts and tests that look at the widgets."""
        with self._lock:
            self._pass()

    def close(self) -> None:
        """Unsubscribe from the tree, stop this view's replies and wait for their threads,
        then close every widget of the view."""
        if getattr(self, "_closed", True):
            return  # closed already, or __init__ never got far (GC calls close)
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
        with self._wake:
            self._stopping = True
            renderer = self._renderer
            self._wake.notify_all()
        if renderer is not None and renderer is not me:
            renderer.join(JOIN_TIMEOUT)
        parts = [*self.children]
        for name in ("_msg_widgets", "_extra_widgets", "_chunks"):
            parts += getattr(self, name, [])
        for name in ("stream", "_msg_layout", "_chunk_layout", "_chunk_style"):
            if hasattr(self, name):
                parts.append(getattr(self, name))
        with self._lock:
            seen: set[int] = {id(self)}
            for widget in parts:
                _dispose(widget, seen)
            self._msg_widgets, self._msg_keys, self._extra_widgets = [], [], []
        super().close()

    # -- the static side: what a notebook keeps when there is no kernel ----------------------
    def _ipython_display_(self) -> None:
        """Two outputs: the tree as text/HTML, then the live view. A notebook saved without
        widget state keeps a readable tree (JupyterLab then cannot find the view's model);
        while the view is live, its stylesheet hides the static copy just above it."""
        from IPython.display import display

        display(self._static_bundle(), raw=True)
        display(self._repr_mimebundle_(static=False), raw=True)

    def _static_bundle(self) -> dict[str, str]:
        text = render.tree_text(self.tree, self.selected)
        return {"text/plain": text,
                "text/html": f"<pre class='subchat-tree-static'>{html.escape(text)}</pre>"}

    def _repr_mimebundle_(self, static: bool = True, **kwargs: Any) -> dict[str, Any]:
        data = super()._repr_mimebundle_(**kwargs) or {}
        if static:  # one bundle (for whoever asks for one): the tree as its fallback
            data.update(self._static_bundle())
        else:
            data["text/plain"] = LIVE_TEXT
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
        self.sync()  # draw what the action changed now, not at the next pass

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

    # -- tree events: queued on the streaming thread, drawn by the render thread ----------
    def _listener(self, event: str, data: dict[str, Any]) -> None:
        """Called by the tree on the thread that streams, for every event. A token is
        not even queued (a pass reads the turn's text); anything else is queued."""
        if event == "reply-delta":
            return
        self._kick((event, data))

    def _kick(self, event: tuple[str, dict[str, Any]] | None = None) -> None:
        """Queue ``event`` (if any) and wake the render thread, starting one if none runs."""
        with self._wake:
            if self._stopping:
                return
            if event is not None:
                self._events.append(event)
            if not self.autodraw:
                return
            if self._renderer is None:
                self._renderer = threading.Thread(target=self._render_loop, daemon=True,
                                                  name="subchat-view render")
                self._renderer.start()
            else:
                self._wake.notify()

    def _render_loop(self) -> None:
        """Draw at most every ``interval`` seconds while there is something to draw; end
        after IDLE_EXIT seconds with nothing (the next event starts a new thread)."""
        while True:
            with self._wake:
                idle_since = time.monotonic()
                while not self._stopping and not self._events and self._shown is None:
                    left = IDLE_EXIT - (time.monotonic() - idle_since)
                    if left <= 0:
                        self._renderer = None
                        return
                    self._wake.wait(left)
                if self._stopping:
                    self._renderer = None
                    return
            # coalesce: a pass at most every interval, and an interval after the first event
            # (what a whole fast reply changes is then drawn once, after it)
            now = time.monotonic()
            time.sleep(max(self._last_pass, now) + self.interval - now)
            with self._lock:
                if self._closed:
                    continue
                self._last_pass = time.monotonic()
                try:
                    self._pass()
                except Exception as exc:  # noqa: BLE001 - a dead render thread is a frozen view
                    self._set_status(f"the view failed to draw ({type(exc).__name__}: {exc}); "
                                     "Refresh redraws it", error=True)

    def _pass(self) -> None:
        """Handle the queued events, redraw what they made stale (the tree's labels and
        the transcript's list once each), and update the streaming reply if it is due."""
        while True:
            with self._wake:
                if not self._events:
                    break
                event, data = self._events.popleft()
            handler = getattr(self, "_on_" + event.replace("-", "_"), None)
            if handler is not None:
                handler(**data)
        if self._labels_dirty:
            self._set_labels()
        s = self._shown
        if s is not None and not s.turn.done and s.coalescer.tick():
            # (a done turn's end is queued or drawn: nothing more to stream)
            if self._debt:  # an earlier pass sent several messages: this update waits
                self._debt -= 1
            else:
                self._flush()
        if self._children_dirty:
            self._set_transcript_children()
        self._update_buttons()
        # while a reply streams, ~one message per interval on average, whatever is drawn
        self._debt = min(self._debt + max(0, self._sent - 1), DEBT_MAX) if self._shown else 0
        self._sent = 0

    def _on_chat_created(self, path: str, **_: Any) -> None:
        self._info.setdefault(path, _ChatInfo())
        self._labels_dirty = True
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
        streams = {moved(p): s for p, s in self._streams.items()}
        self._streams.clear()
        self._streams.update(streams)
        self._set_labels(select=moved(self.selected))
        self._build_transcript()

    def _on_message(self, path: str, message: Message, **_: Any) -> None:
        info = self._info.setdefault(path, _ChatInfo())
        mid = message.id or 0
        if mid > info.last_id:  # not counted by a read of the store since
            info.count += 1
            info.last_id = mid
        if message.role == "assistant" and (info.last is None or mid >= (info.last.id or 0)):
            info.last = message  # (a finished reply replaces its stored placeholder)
        self._labels_dirty = True
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
            self._children_dirty = True
        self._draw_message(message)

    def _draw_message(self, m: Message) -> None:
        """Add a message to the transcript, or redraw it if it is there already (a reply
        whose placeholder was read from the store while it streamed)."""
        key = (m.id, m.status, m.content)
        ids = [k[0] for k in self._msg_keys]
        if m.id is not None and m.id in ids:
            i = ids.index(m.id)
            if self._msg_keys[i] == key:
                return
            _dispose(self._msg_widgets[i], {id(self._msg_layout)})
            self._msg_widgets[i] = self._message_widget(m)
            self._msg_keys[i] = key
        else:
            self._msg_widgets.append(self._message_widget(m))
            self._msg_keys.append(key)
            if len(self._msg_widgets) > MAX_SHOWN:
                _dispose(self._msg_widgets.pop(0), {id(self._msg_layout)})
                self._msg_keys.pop(0)
                self._hidden += 1
                self._refresh_transcript_head()
        self._children_dirty = True

    def _on_reply_start(self, path: str, turn: "Turn", **_: Any) -> None:
        self._streams[path] = s = _Stream(turn, Coalescer(self.interval, clock=self._clock))
        self._info.setdefault(path, _ChatInfo()).streaming += 1
        self._labels_dirty = True
        if path != self.selected and self.follow.value and not self._own:
            self._set_labels(select=path)
            self._build_transcript()  # the streaming pane included
        elif path == self.selected:
            if self.compare.value:
                self._build_transcript()
            else:
                self._show_stream(s)
        if not turn.done:
            self._set_status(f"{path}: streaming a reply…")

    def _on_reply_end(self, path: str, turn: "Turn", message: Message, **_: Any) -> None:
        s = self._streams.get(path)
        if s is not None and s.turn is turn:
            del self._streams[path]
            if s is self._shown:  # no message event reached us (a reply stored elsewhere)
                self._shown = None
                self._children_dirty = True
        info = self._info.setdefault(path, _ChatInfo())
        info.streaming = max(0, info.streaming - 1)
        self._labels_dirty = True
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
            last, last_id = None, 0
            if n:
                msgs = chat.messages
                last = next((m for m in reversed(msgs) if m.role == "assistant"), None)
                last_id = msgs[-1].id or 0
            old = self._info.get(chat.path)
            info[chat.path] = _ChatInfo(n, last, old.streaming if old else 0, last_id)
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
        self._labels_dirty = False
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
                    self._sent += 1
                self.chats.value = want
        finally:
            self._syncing = False
        # (the session's current chat follows only the user's own choices, never a redraw:
        # a late one could redirect the next cell)

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
            self._sent += 1

    def _set_status(self, text: str, error: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            cls = "subchat-error" if error else "subchat-note"
            self.status.value = f"<span class='{cls}'>{html.escape(text)}</span>"
            self._sent += 1

    def _message_widget(self, m: Message) -> w.Output:
        self._sent += 1
        # the view always renders the Markdown: the plain text is a short label, not a copy
        plain = f"[{m.role}] {m.content[:200]}{'…' if len(m.content) > 200 else ''}"
        return w.Output(outputs=(_markdown_output(_message_markdown(m, self.provenance.value),
                                                 plain),),
                        layout=self._msg_layout,
                        _dom_classes=("subchat-msg", f"subchat-msg-{m.role}"))

    def _clear_transcript(self) -> None:
        seen: set[int] = {id(self._msg_layout), id(self._chunk_layout), id(self._chunk_style)}
        for widget in [*self._msg_widgets, *self._extra_widgets]:
            _dispose(widget, seen)
        self._msg_widgets, self._msg_keys, self._extra_widgets = [], [], []
        self._hidden = 0

    def _build_transcript(self) -> None:
        """Redraw the selected chat (on selection, mode or structure changes only)."""
        self._clear_transcript()
        self._shown = None
        if self.compare.value:
            self._build_compare()
            return
        chat = self._existing(self.selected)
        if chat.path != self.selected:  # deleted since; its event is still queued
            self._set_labels(select=chat.path)
        own = chat.messages
        history = self.tree.history(chat)
        inherited = history[: len(history) - len(own)]
        s = self._streams.get(chat.path)
        if s is not None and not s.turn.done and s.turn.user_message is not None:
            # the reply streaming here is stored as an empty placeholder: the pane shows it
            own = [m for m in own if m.seq <= s.turn.user_message.seq]
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
        for m in own[self._hidden:]:
            self._draw_message(m)
        if s is not None:
            self._show_stream(s)
        self._set_transcript_children()

    def _existing(self, path: str) -> "Chat":
        """The chat at ``path`` or, if it is gone, its nearest ancestor still there."""
        while True:
            try:
                return self.tree.get(path)
            except ChatNotFound:
                path = path.rpartition("/")[0] or ROOT

    def _refresh_transcript_head(self) -> None:
        chat = self._existing(self.selected)
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
        self._children_dirty = False
        children = [*self._extra_widgets, *self._msg_widgets]
        if self._shown is not None:
            children.append(self.stream)
        children.reverse()  # newest first: the box is laid out bottom-up
        if list(self.transcript.children) != children:
            self.transcript.children = children
            self._sent += 1

    def _compare_paths(self) -> list[str]:
        chat = self._existing(self.selected)
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
        if s.turn.done:
            return  # it ended before this pass: its stored reply is queued, shown instead
        self._shown = s
        s.consumed, s.chunks = 0, [""]
        self._flush()  # what has arrived so far, then coalesced updates
        self._children_dirty = True
        self._kick()  # the render thread now has a stream to update

    def _flush(self) -> None:
        """Put the text that arrived since the last update into the chunks and send the
        chunks that changed: the last one, and rarely a closed one and a new one."""
        s = self._shown
        if s is None:
            return
        parts = s.turn.parts
        n = len(parts)
        new = "".join(parts[s.consumed:n])
        s.consumed = n
        first = len(s.chunks) - 1
        s.chunks = _split_chunks(s.chunks, new)
        sent = 0
        for i in range(first, len(s.chunks)):
            value = _chunk_html(s.chunks[i])
            if i == len(self._chunks):  # a pool, kept for the next replies
                self._chunks.append(w.HTML(value, layout=self._chunk_layout,
                                           style=self._chunk_style))
                sent += 1
            elif self._chunks[i].value != value:
                self._chunks[i].value = value
                sent += 1
        shown = [self._pane_head, *self._chunks[:len(s.chunks)]]
        if list(self.stream.children) != shown:
            self.stream.children = shown
            sent += 1
        self._sent += sent
