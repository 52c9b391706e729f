"""The streaming pane: the reply now streaming into the selected chat, shown in a few
"chunk" HTML widgets. An update resends only the last chunk, so its bytes stay flat
however long the reply grows; the chunk widgets are kept for the next replies.

Imports ipywidgets and the view state's :class:`Stream`; nothing of the core.
"""

from __future__ import annotations

import html
from typing import Callable

import ipywidgets as w
from ipywidgets.widgets.widget_string import HTMLStyle

from .state import Stream

CHUNK_SOFT = 2000  # a streaming chunk is closed at the next newline past this many characters
CHUNK_HARD = 4000  # ...or at the next space past this many, for replies without newlines


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


class StreamPane:
    """``box`` (a VBox: a head, then the chunks) shows one :class:`Stream` at a time:
    :meth:`show` starts it from the text so far, :meth:`flush` adds what arrived since.
    ``count(n)`` is told of every widget message it sends."""

    def __init__(self, count: Callable[[int], None]):
        self._count = count
        self.shown: Stream | None = None
        self._consumed = 0  # parts of the turn's text already put into chunks
        self._texts: list[str] = [""]
        # one shared layout and style: a chunk widget opens one comm, not three
        self.layout = w.Layout(margin="0")
        self.style = HTMLStyle()
        self.head = w.HTML(value="<b>assistant</b> <i>● streaming…</i>")
        self.chunks = [w.HTML(layout=self.layout, style=self.style)]
        self.box = w.VBox([self.head, *self.chunks], layout=w.Layout(flex="0 0 auto"),
                          _dom_classes=("subchat-stream",))

    def show(self, s: Stream) -> bool:
        """Show ``s`` from its start; False if it has ended already (its stored reply is
        on its way, shown instead)."""
        if s.turn.done:
            return False
        self.shown = s
        self._consumed, self._texts = 0, [""]
        self.flush()
        return True

    def hide(self) -> None:
        self.shown = None

    def flush(self) -> None:
        """Put the text that arrived since the last update into the chunks and send the
        chunks that changed: the last one, and rarely a closed one and a new one."""
        s = self.shown
        if s is None:
            return
        parts = s.turn.parts
        n = len(parts)
        new = "".join(parts[self._consumed:n])
        self._consumed = n
        first = len(self._texts) - 1
        self._texts = _split_chunks(self._texts, new)
        sent = 0
        for i in range(first, len(self._texts)):
            value = _chunk_html(self._texts[i])
            if i == len(self.chunks):  # a pool, kept for the next replies
                self.chunks.append(w.HTML(value, layout=self.layout, style=self.style))
                sent += 1
            elif self.chunks[i].value != value:
                self.chunks[i].value = value
                sent += 1
        shown = [self.head, *self.chunks[:len(self._texts)]]
        if list(self.box.children) != shown:
            self.box.children = shown
            sent += 1
        self._count(sent)

    def widgets(self) -> list[w.Widget]:
        """Every widget of the pane (to close them)."""
        return [self.box, self.head, *self.chunks, self.layout, self.style]
