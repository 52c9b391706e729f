"""The transcript pane: the selected chat's messages, each in its own ``Output`` widget
(sent once), its inherited context folded in an accordion, the streaming pane at the
bottom; or, in compare mode, the last exchange of each sibling side by side.

Imports ipywidgets, render (one Markdown of a message for this pane and ``%subchat
show``), the tree's types and the streaming pane; nothing of the core's changes.
"""

from __future__ import annotations

import html
from typing import Any, Callable

import ipywidgets as w

from .. import render
from ..exchange import CONFIG_SYSTEM, system_in_force
from ..tree import Chat, ChatTree, Message
from ..words import counted
from .state import Stream
from .stream_pane import StreamPane

MAX_SHOWN = 100  # own messages shown; older ones are summed up in the head
COMPARE_PAGE = 8  # siblings side by side at most (a batch row has thousands)


def dispose(widget: w.Widget, seen: set[int]) -> None:
    """Close a widget, its children, layout and style (Widget.close closes only itself);
    ``seen``: ids of widgets not to close (shared ones) or closed already."""
    if id(widget) in seen:
        return
    seen.add(id(widget))
    for child in getattr(widget, "children", ()):
        dispose(child, seen)
    for part in ("layout", "style"):
        sub = getattr(widget, part, None)
        if isinstance(sub, w.Widget):
            dispose(sub, seen)
    widget.close()


def copy_button(code: str, blocks: int) -> str:
    """A button that puts ``code`` on the clipboard, in the browser itself (the kernel has
    no clipboard): the code travels in a data attribute, escaped."""
    label = "copy code" if blocks == 1 else f"copy code ({blocks} blocks)"
    return ("<button class='subchat-copy-code' title='Copy the code blocks of this reply' "
            "onclick='navigator.clipboard.writeText(this.dataset.code)' "
            f"data-code=\"{html.escape(code, quote=True)}\">{label}</button>")


def _markdown_output(markdown: str, plain: str) -> dict[str, Any]:
    return {"output_type": "display_data", "metadata": {},
            "data": {"text/markdown": markdown, "text/plain": plain}}


class Transcript:
    """``box`` shows one chat (:meth:`build`) or its siblings (:meth:`build_compare`).
    New messages are added one widget each (:meth:`draw_message`); the box's list of
    children is resent only when :attr:`dirty` and :meth:`set_children` is called.
    ``count(n)`` is told of every widget message it sends."""

    def __init__(self, tree: ChatTree, pane: StreamPane, count: Callable[[int], None],
                 default_system: Callable[[], str | None] = lambda: None):
        self.default_system = default_system  # %config SubchatMagics.system_prompt, read live
        self.tree = tree
        self.pane = pane
        self._count = count
        self.provenance = False
        self.chat: Chat | None = None  # the chat shown (compare: the selected one)
        self.msg_layout = w.Layout(margin="2px 0", padding="0 4px")  # shared: one comm
        # column-reverse: the browser keeps a scrolled box anchored at its newest message
        self.box = w.VBox(layout=w.Layout(max_height="460px", overflow="auto",
                                          flex="1 1 auto", width="auto",
                                          flex_flow="column-reverse"),
                          _dom_classes=("subchat-transcript",))
        self.msg_widgets: list[w.Widget] = []
        self.msg_keys: list[tuple] = []  # (id, status, content) of each message widget
        self.extra_widgets: list[w.Widget] = []  # head, inherited, compare: rebuilt each time
        self.hidden = 0  # own messages not shown (beyond MAX_SHOWN)
        self.head: w.HTML | None = None  # the chat's path, system prompt, messages not shown
        self.dirty = False

    # -- one chat ----------------------------------------------------------------------------
    def build(self, chat: Chat, stream: Stream | None) -> None:
        """Redraw ``chat``, and ``stream`` (a reply streaming into it) in the pane below."""
        self.clear()
        self.chat = chat
        inherited, own = render.split_history(self.tree, chat)
        turn = stream.turn if stream is not None else None
        if turn is not None and not turn.done and turn.user_message is not None:
            # the reply streaming here is stored as an empty placeholder: the pane shows it
            own = [m for m in own if m.seq <= turn.user_message.seq]
        self.head = w.HTML(_dom_classes=("subchat-transcript-head",))
        self.extra_widgets.append(self.head)
        self.hidden = max(0, len(own) - MAX_SHOWN)
        self.refresh_head()
        if inherited:
            md = "\n\n".join(render.message_markdown(m, self.provenance, colon=False)
                             for m in inherited)
            box = w.Output(outputs=(_markdown_output(md, "inherited"),))
            acc = w.Accordion([box], titles=(f"inherited from {chat.parent.path} "
                                              f"({counted(len(inherited), 'message')})",),
                              selected_index=None, _dom_classes=("subchat-inherited",))
            self.extra_widgets.append(acc)
        for m in own[self.hidden:]:
            self.draw_message(m)
        if stream is not None:
            self.pane.show(stream)
        self.set_children()

    def draw_message(self, m: Message) -> None:
        """Add a message, or redraw it if it is there already (a reply whose placeholder
        was read from the store while it streamed)."""
        key = (m.id, m.status, m.content)
        ids = [k[0] for k in self.msg_keys]
        if m.id is not None and m.id in ids:
            i = ids.index(m.id)
            if self.msg_keys[i] == key:
                return
            dispose(self.msg_widgets[i], {id(self.msg_layout)})
            self.msg_widgets[i] = self._message_widget(m)
            self.msg_keys[i] = key
        else:
            self.msg_widgets.append(self._message_widget(m))
            self.msg_keys.append(key)
            if len(self.msg_widgets) > MAX_SHOWN:
                dispose(self.msg_widgets.pop(0), {id(self.msg_layout)})
                self.msg_keys.pop(0)
                self.hidden += 1
                self.refresh_head()
        self.dirty = True

    def refresh_head(self) -> None:
        chat, head = self.chat, self.head
        if chat is None or head is None:
            return
        system, source = system_in_force(self.tree, chat, self.default_system())
        value = f"<b>{html.escape(chat.path)}</b>"
        if system:
            where = f" ({html.escape(source)})" if source == CONFIG_SYSTEM else ""
            value += f" · <i>system{where}: {html.escape(system[:200])}</i>"
        if self.hidden:
            value += (f"<br>… {self.hidden} earlier messages not shown "
                      f"(<code>%subchat show {html.escape(chat.path)}</code>)")
        if head.value != value:
            head.value = value

    def _message_widget(self, m: Message) -> w.Widget:
        self._count(1)
        # the view always renders the Markdown: the plain text is a short label, not a copy
        plain = f"[{m.role}] {m.content[:200]}{'…' if len(m.content) > 200 else ''}"
        md = render.message_markdown(m, self.provenance, colon=False)
        shown = w.Output(outputs=(_markdown_output(md, plain),), layout=self.msg_layout,
                         _dom_classes=("subchat-msg", f"subchat-msg-{m.role}"))
        blocks = render.code_blocks(m.content) if m.role == "assistant" else []
        if not blocks:
            return shown
        self._count(4)  # the box, its layout, the button and its style
        return w.VBox([shown, w.HTML(copy_button("\n\n".join(blocks), len(blocks)))])

    # -- compare -----------------------------------------------------------------------------
    def build_compare(self, chat: Chat, streaming: set[int]) -> None:
        """``chat`` beside its siblings (root: its subchats), the last exchange of each;
        ``streaming``: ids of chats with a reply streaming."""
        self.clear()
        self.chat, self.head = chat, None
        group = self.compare_group(chat)
        head = w.HTML(_dom_classes=("subchat-transcript-head",))
        self.extra_widgets.append(head)
        if len(group) < 2:
            head.value = (f"<b>{html.escape(chat.path)}</b> has no siblings to compare; "
                          "branch it first")
            self.set_children()
            return
        total = len(group)
        group = self.compare_page(group, chat)
        head.value = f"<b>comparing</b> {' · '.join(html.escape(c.path) for c in group)}"
        if len(group) < total:  # (a batch's rows: thousands of siblings)
            head.value += (f"<br><i>{len(group)} of {total:,} siblings: the selected chat and "
                           "its neighbours; select another to page on</i>")
        columns = []
        for c in group:
            msgs = c.messages
            last_user = next((m for m in reversed(msgs) if m.role == "user"), None)
            last_reply = next((m for m in reversed(msgs) if m.role == "assistant"), None)
            md = f"**{c.path}** ({counted(len(msgs), 'message')})"
            if c.id in streaming:
                md += " ● streaming"
            for m in (last_user, last_reply):
                if m is not None:
                    md += "\n\n" + render.message_markdown(m, self.provenance, colon=False)
            columns.append(w.Output(outputs=(_markdown_output(md, c.path),),
                                    layout=w.Layout(flex="1 1 0", min_width="180px",
                                                    padding="0 6px"),
                                    _dom_classes=("subchat-compare-column",)))
        self.extra_widgets.append(w.HBox(columns, _dom_classes=("subchat-compare",)))
        self.set_children()

    @staticmethod
    def compare_group(chat: Chat) -> list[Chat]:
        return list(chat.parent.children if chat.parent is not None else chat.children)

    @staticmethod
    def compare_page(group: list[Chat], chat: Chat, size: int = COMPARE_PAGE) -> list[Chat]:
        """At most ``size`` of ``group``: ``chat`` and the siblings around it."""
        if len(group) <= size:
            return group
        at = next((i for i, c in enumerate(group) if c.id == chat.id), 0)
        start = min(max(0, at - size // 2), len(group) - size)
        return group[start:start + size]

    # -- the box -----------------------------------------------------------------------------
    def set_children(self) -> None:
        self.dirty = False
        children = [*self.extra_widgets, *self.msg_widgets]
        if self.pane.shown is not None:
            children.append(self.pane.box)
        children.reverse()  # newest first: the box is laid out bottom-up
        if list(self.box.children) != children:
            self.box.children = children
            self._count(1)

    def clear(self, keep: set[int] | None = None) -> None:
        """Close the shown messages and parts (the shared layout and the pane kept)."""
        seen = {id(self.msg_layout), *(id(x) for x in self.pane.widgets()), *(keep or ())}
        for widget in [*self.msg_widgets, *self.extra_widgets]:
            dispose(widget, seen)
        self.msg_widgets, self.msg_keys, self.extra_widgets = [], [], []
        self.hidden = 0
        self.pane.hide()

    def widgets(self) -> list[w.Widget]:
        """Every widget of the pane (to close them)."""
        return [self.box, *self.msg_widgets, *self.extra_widgets, self.msg_layout]
