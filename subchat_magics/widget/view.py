"""The tree view itself (:class:`TreeView`): lays out the tree, the transcript and the
buttons, binds every button to the core (:class:`~subchat_magics.session.Session`) and
feeds the core's events to the view state, whose changes it draws.

Imports ipywidgets, the core (session), render, the tree's types and this package's
rooms; never the magics or anything of IPython's magics.
"""

from __future__ import annotations

import html
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import ipywidgets as w

from .. import render
from ..errors import ChatNotFound, InvalidInput, SubchatError
from ..session import Session
from ..tree import Chat, ChatTree
from ..words import counted
from .render_loop import RenderLoop
from .state import Stream, ViewState
from .stream_pane import StreamPane
from .transcript import Transcript, dispose

if TYPE_CHECKING:
    from ..turn import Turn

JOIN_TIMEOUT = 10.0  # seconds close() waits for a cancelled reply to reach its next token
LIVE_TEXT = "(the live view of the chat tree: run the notebook to use it)"

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


class TreeView(w.VBox):
    """A live view of a chat tree: the tree, the selected chat's transcript, and Send /
    Branch / Stop / Rename / Delete. ``%subchat tree`` returns one.

    Every change goes through ``session`` (made around ``tree`` if not given), and the
    view learns every change, its own or a cell's or another view's, from the session's
    events, on whatever thread they happen. What it remembers (the selection, each chat's
    label, the replies streaming) is held by chat id, so a rename anywhere keeps it, and
    a delete moves the selection to the nearest surviving ancestor. ``close()``
    unsubscribes and stops the view's own replies. The Python methods (:meth:`select`,
    :meth:`send`, :meth:`branch`, :meth:`stop`, :meth:`rename`, :meth:`delete`,
    :meth:`wait`) are what the buttons call."""

    def __init__(self, tree: ChatTree, session: Session | None = None, *,
                 interval: float = 0.05, clock: Callable[[], float] | None = None,
                 autodraw: bool = True, **kwargs: Any):
        """``interval``: seconds between draws (and streaming updates); ``clock``: the
        clock the streaming updates are coalesced by; ``autodraw=False``: no render
        thread, changes are drawn when :meth:`sync` is called (for scripts and tests)."""
        self._own_session = session is None
        if session is None:
            session = Session.on_tree(tree)
        elif session.tree is not tree:
            raise InvalidInput("the session has another tree open than the one to view; "
                               "make the view of session.tree")
        self.tree = tree
        self.session = session
        self.interval = interval
        self._lock = threading.RLock()  # held while drawing: by the render thread or a user action
        self._workers: set[threading.Thread] = set()
        self._own: set[Turn] = set()
        self._labels_dirty = False
        self._header_dirty = False
        self._confirm_delete = False
        self._syncing = False
        try:
            start = session.current_chat()
        except ChatNotFound:  # deleted elsewhere: the session has moved to the survivor
            start = session.current_chat()
        self.state = ViewState(tree, start, interval=interval, clock=clock or time.monotonic)
        self.loop = RenderLoop(self._draw, interval=interval, autodraw=autodraw,
                               active=lambda: self.stream_pane.shown is not None,
                               on_error=self._draw_failed)
        self.stream_pane = StreamPane(self.loop.count)
        self.transcript_pane = Transcript(tree, self.stream_pane, self.loop.count,
                                          lambda: session.defaults.system_prompt)
        self.stream = self.stream_pane.box
        self.transcript = self.transcript_pane.box

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

        self._set_labels()
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
        self._handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "chat-created": self._on_chat_created, "chat-renamed": self._on_chat_renamed,
            "chat-deleted": self._on_chat_deleted, "message": self._on_message,
            "reply-start": self._on_reply_start, "reply-end": self._on_reply_end,
            "batch-start": self._on_batch_start}
        self._unsubscribe = session.subscribe(self._listener)

    # -- the public, scriptable side (the buttons call these) ---------------------------------
    @property
    def selected(self) -> str:
        """The path of the selected chat (it follows the chat through renames)."""
        return self._selected().path

    @property
    def selected_id(self) -> int:
        """The id of the selected chat."""
        return self._selected().id

    @property
    def busy(self) -> bool:
        """True while a reply this view started is still streaming."""
        return any(t.is_alive() for t in list(self._workers))

    def select(self, chat: "str | int | Chat") -> None:
        """Show a chat (a path, an id or a :class:`Chat`); it becomes the session's
        current chat."""
        target = self.tree.get(chat)
        with self._lock:
            self._frame()  # events not drawn yet (a chat just created) come first
            self._choose(target)

    def send(self, text: str, path: "str | int | None" = None) -> "Turn":
        """Send ``text`` into the selected chat (or ``path``, a path or an id) with the
        session's backend and settings; the reply streams on a worker thread. Returns
        the :class:`Turn`."""
        chat = self._selected() if path is None else self.tree.get(path)
        self._check_session()
        if self.session.streaming(chat.id) or any(t.chat.id == chat.id for t in list(self._own)):
            raise InvalidInput(f"{chat.path} is still streaming a reply; Stop it or wait for it")
        turn = self.session.send(chat.id, text)
        self._start(turn)
        return turn

    def branch(self, name: str | None = None, text: str | None = None) -> str:
        """Create a subchat of the selected chat named ``name`` (default: the next free
        number), select it, and send ``text`` into it if given. Returns its path."""
        self._check_session()
        chat = self.session.branch(self._selected().id, name)
        self.select(chat.id)
        if text and text.strip():
            self.send(text, chat.id)
        return chat.path

    def stop(self) -> int:
        """Stop the reply streaming in the selected chat (whoever started it) and this
        view's own replies. Returns how many replies were asked to stop."""
        with self._lock:
            turns = set(self._own)
            selected = self._selected().id
            s = self.state.streams.get(selected)
            if s is not None:
                turns.add(s.turn)
            if self.session.tree is self.tree:
                turns.update(self.session.streaming(selected))  # (a cell's, too)
        for turn in turns:
            turn.cancel()
        if turns:
            self._set_status("stopping…")
        return len(turns)

    def rename(self, new_name: str) -> str:
        """Rename the selected chat; returns its new path. The selection, the session's
        current chat and the replies streaming into it follow it (they hold its id)."""
        self._check_session()
        path = self.session.rename(self._selected().id, new_name).path
        self.sync()
        return path

    def delete(self) -> list[str]:
        """Delete the selected chat and its subchats (the button asks first); the
        selection moves to its parent."""
        self._check_session()
        gone = self.session.delete(self._selected().id, force=True).paths
        self.sync()
        return gone

    def refresh(self) -> None:
        """Re-read the store (another kernel may have written to it) and redraw."""
        self.tree.refresh()
        with self._lock:
            self._frame()
            self.state.load()
            self._set_labels()
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
        """Draw now, on this thread, every change the core reported so far (the render
        thread would within ~1/20 s): for scripts and tests that look at the widgets."""
        with self._lock:
            self._frame()

    def close(self) -> None:
        """Unsubscribe from the session, stop this view's replies and wait for their
        threads, then close every widget of the view."""
        if getattr(self, "_closed", True):
            return  # closed already, or __init__ never got far (GC calls close)
        self._closed = True
        unsubscribe = getattr(self, "_unsubscribe", None)
        if unsubscribe is not None:
            unsubscribe()
        for turn in list(self._own):
            turn.cancel()
        me = threading.current_thread()
        for t in list(self._workers):
            if t is not me:
                t.join(JOIN_TIMEOUT)
        self.loop.stop(JOIN_TIMEOUT)
        parts = [*self.children, *self.transcript_pane.widgets(), *self.stream_pane.widgets()]
        with self._lock:
            seen: set[int] = {id(self)}
            for widget in parts:
                dispose(widget, seen)
            self.transcript_pane.msg_widgets, self.transcript_pane.extra_widgets = [], []
        super().close()
        if self._own_session:
            self.session.close()  # (the tree it was made around stays open)

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

    # -- what tests and scripts look at -------------------------------------------------------
    @property
    def _streams(self) -> dict[str, Stream]:
        """The replies streaming now, by their chat's path today."""
        out = {}
        for cid, s in list(self.state.streams.items()):
            chat = self.tree.find(cid)
            if chat is not None:
                out[chat.path] = s
        return out

    @property
    def _msg_widgets(self) -> list[w.Widget]:
        return self.transcript_pane.msg_widgets

    @property
    def _chunks(self) -> list[w.HTML]:
        return self.stream_pane.chunks

    # -- sending ------------------------------------------------------------------------------
    def _check_session(self) -> None:
        if self.session.tree is not self.tree:
            raise InvalidInput("this view shows another store than the session now uses; "
                               "run %subchat tree again")

    def _start(self, turn: "Turn") -> None:
        thread = threading.Thread(target=self._run, args=(turn,), daemon=True,
                                  name=f"subchat-view {turn.chat.path}")
        with self._lock:
            self._own.add(turn)
            self._workers.add(thread)
            self._update_buttons()
        thread.start()

    def _run(self, turn: "Turn") -> None:
        """The worker: stream the turn (the core's events update every view)."""
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
        self.sync()  # draw what the action changed now, not at the next frame

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
        chat = self._selected()
        if not self._confirm_delete:
            n = len(self.tree.subtree(chat)) - 1
            root = chat.parent is None
            what = "everything in the tree" if root else chat.path
            more = f" and its {n} subchat{'s' if n != 1 else ''}" if n and not root else ""
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

    # -- widget-side events (the kernel's main thread) ---------------------------------------
    def _on_select(self, change: dict[str, Any]) -> None:
        if self._syncing or change["new"] is None:
            return
        with self._lock:
            try:
                chat = self.tree.get(change["new"])
            except ChatNotFound:  # a path renamed or deleted since the list was drawn
                self._set_labels()
                return
            self._choose(chat)

    def _on_mode(self, change: dict[str, Any]) -> None:
        with self._lock:
            self.transcript_pane.provenance = self.provenance.value
            self._build_transcript()

    def _choose(self, chat: Chat) -> None:
        """The user's choice: select ``chat``, make it the session's current chat."""
        self._reset_delete()
        same = chat.id == self.state.selected_id
        self.state.select(chat)
        if self.session.tree is self.tree:
            self.session.use(chat.id)
        self._set_labels()
        if not same:
            self._build_transcript()
            self._update_buttons()

    # -- the core's events: queued on whatever thread, handled by whoever draws -------------
    def _listener(self, event: str, data: dict[str, Any]) -> None:
        """Called by the core for every event, on the thread of the change. A token is
        not even queued (a frame reads the turn's text); the rest is."""
        if event in self._handlers:
            self.loop.post((event, data))

    def _draw(self) -> None:
        """A frame of the render thread."""
        with self._lock:
            if not self._closed:
                self._frame()

    def _draw_failed(self, exc: Exception) -> None:
        self._set_status(f"the view failed to draw ({type(exc).__name__}: {exc}); "
                         "Refresh redraws it", error=True)

    def _frame(self) -> None:
        """Handle the queued events, redraw what they made stale (the tree's labels and
        the transcript's list once each), and update the streaming reply if it is due."""
        for event, data in self.loop.drain():
            self._handlers[event](data)
        if self._header_dirty:
            self._header_dirty = False
            self._update_header()
        if self._labels_dirty:
            self._set_labels()
        s = self.stream_pane.shown
        if s is not None and not s.turn.done and s.coalescer.tick() and self.loop.update_due():
            # (a done turn's end is queued or drawn: nothing more to stream)
            self.stream_pane.flush()
        if self.transcript_pane.dirty:
            self.transcript_pane.set_children()
        self._update_buttons()
        self.loop.end_frame(streaming=self.stream_pane.shown is not None)

    def _path_of(self, chat_id: int, fallback: str) -> str:
        chat = self.tree.find(chat_id)
        return chat.path if chat is not None else fallback

    def _in_compare(self, chat_id: int) -> bool:
        if not self.compare.value:
            return False
        chat = self.state.selected()
        return chat_id in {c.id for c in Transcript.compare_page(
            Transcript.compare_group(chat), chat)}

    def _on_chat_created(self, data: dict[str, Any]) -> None:
        self.state.chat_created(data["id"])
        self._labels_dirty = True
        self._header_dirty = True  # drawn once a frame (a batch makes thousands of chats)
        if self.compare.value:
            self._build_transcript()

    def _on_batch_start(self, data: dict[str, Any]) -> None:
        self.state.batch_started(data["id"], data["total"])
        self._labels_dirty = True
        self._set_status(f"{self._path_of(data['id'], data['path'])}: a batch of "
                         f"{counted(data['total'], 'item')} is running…")

    def _on_chat_deleted(self, data: dict[str, Any]) -> None:
        moved = self.state.chat_deleted(data["ids"])
        self._set_labels()
        if moved or self.compare.value:
            self._build_transcript()
        self._update_header()

    def _on_chat_renamed(self, data: dict[str, Any]) -> None:
        self._set_labels()  # the list's values are paths
        if self.compare.value:
            self._build_transcript()
        elif data["id"] == self.state.selected_id:
            self.transcript_pane.refresh_head()  # (a reply streaming here goes on)
        elif self.state.on_line(data["id"]):
            self._build_transcript()  # an ancestor: "inherited from" names its path

    def _on_message(self, data: dict[str, Any]) -> None:
        cid, message = data["id"], data["message"]
        self.state.message(cid, message)
        self._labels_dirty = True
        if self.compare.value:
            if self._in_compare(cid) or cid == self.state.selected_id:
                self._build_transcript()
            return
        if cid != self.state.selected_id:
            return
        s = self.state.streams.get(cid)
        if message.role == "assistant" and s is not None and s is self.stream_pane.shown:
            self.stream_pane.hide()  # the stored reply replaces the streaming chunks
            self.transcript_pane.dirty = True
        self.transcript_pane.draw_message(message)

    def _on_reply_start(self, data: dict[str, Any]) -> None:
        cid, turn = data["id"], data["turn"]
        s = self.state.reply_started(cid, turn)
        self._labels_dirty = True
        if cid != self.state.selected_id and self.state.is_row(cid):
            return  # a batch's row: its batch line counts it; the view does not follow it
        if cid != self.state.selected_id and self.follow.value and not self._own:
            chat = self.tree.find(cid)
            if chat is not None:
                # (follow moves the view only: the session's current chat follows the
                # user's own choices, never a redraw, which could redirect the next cell)
                self.state.select(chat)
                self._set_labels()
                self._build_transcript()  # the streaming pane included
        elif cid == self.state.selected_id:
            if self.compare.value:
                self._build_transcript()
            else:
                self._show_stream(s)
        if not turn.done:
            self._set_status(f"{self._path_of(cid, data['path'])}: streaming a reply…")

    def _on_reply_end(self, data: dict[str, Any]) -> None:
        cid, turn, message = data["id"], data["turn"], data["message"]
        s = self.state.reply_ended(cid, turn)
        if cid != self.state.selected_id and self.state.is_row(cid):
            self._labels_dirty = True
            return  # counted on its batch's line; no status line per row
        if s is not None and s is self.stream_pane.shown:
            # no message event reached us (a reply stored elsewhere)
            self.stream_pane.hide()
            self.transcript_pane.dirty = True
        self._labels_dirty = True
        if self._in_compare(cid):
            self._build_transcript()
        path = self._path_of(cid, data["path"])
        if message.status != "complete":
            reason = message.provenance.get("finish_reason", message.status)
            self._set_status(f"{path}: reply {reason} after {len(message.content)} characters",
                             error=message.status == "error")
        else:
            line = render.provenance_line(message)
            self._set_status(f"{path}: {line.splitlines()[0] if line else 'reply complete'}")

    # -- drawing ------------------------------------------------------------------------------
    def _selected(self) -> Chat:
        with self._lock:
            return self.state.selected()

    def _set_labels(self) -> None:
        """Redraw the tree's labels (one message) and put the selection on the selected
        chat's path today."""
        self._labels_dirty = False
        options = self.state.outline()
        want = self.state.selected().path
        self._syncing = True
        try:
            with self.chats.hold_sync():
                if options != list(zip(self.chats._options_labels, self.chats._options_values)):
                    self.chats.options = options
                    self.chats.rows = max(6, min(16, len(options)))
                    self.loop.count()
                self.chats.value = want
        finally:
            self._syncing = False

    def _build_transcript(self) -> None:
        """Redraw the selected chat (on selection, mode or structure changes only)."""
        before = self.state.selected_id
        chat = self.state.selected()  # (if it is gone, its nearest surviving ancestor)
        if chat.id != before:
            self._set_labels()
        if self.compare.value:
            self.transcript_pane.build_compare(chat, set(self.state.streams))
        else:
            self.transcript_pane.build(chat, self.state.streams.get(chat.id))
        if self.stream_pane.shown is not None:
            self.loop.post()  # the render thread now has a stream to update

    def _show_stream(self, s: Stream) -> None:
        if self.stream_pane.show(s):
            self.transcript_pane.dirty = True
            self.loop.post()

    def _update_header(self) -> None:
        n = len(self.tree.chats())
        value = (f"{_CSS}<b>subchat tree</b> · {n} chat{'s' if n != 1 else ''} · "
                 f"store <code>{html.escape(self.tree.path.name)}</code>")
        if self.header.value != value:
            self.header.value = value

    def _update_buttons(self) -> None:
        can_stop = bool(self._own) or self.state.selected_id in self.state.streams
        if self.stop_button.disabled == can_stop:
            self.stop_button.disabled = not can_stop
            self.loop.count()

    def _set_status(self, text: str, error: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            cls = "subchat-error" if error else "subchat-note"
            self.status.value = f"<span class='{cls}'>{html.escape(text)}</span>"
            self.loop.count()
