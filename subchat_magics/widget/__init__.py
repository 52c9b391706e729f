"""The live chat-tree view that ``%subchat tree`` shows in a notebook.

Built from core ipywidgets only, so it renders wherever ipywidgets does (JupyterLab,
Notebook 7, VS Code, Colab) with no frontend extension to install, and the whole tree is
one ``Select`` model however many chats it holds. The view owns no chat logic: every
button goes through the core (:class:`~subchat_magics.session.Session`), and the view
learns every change from the core's events.

Where tokens become pixels: the core calls the view for every event on the thread that
streams; the view only queues it (a token is not even queued) and its render thread
draws, at most ~20 times a second, whatever changed since its last frame. Finished
messages each live in their own ``Output`` widget, sent once; the reply now streaming is
shown in a few "chunk" widgets, of which a frame resends only the last.

The rooms: ``render_loop`` (the frame scheduler thread), ``state`` (what the view knows,
by chat id, fed by the core's events), ``transcript`` (the transcript pane),
``stream_pane`` (the streaming pane), ``view`` (the :class:`TreeView` that lays them out
and binds the buttons to the core). The package may import the core, render, the tree's
types and ipywidgets; never the magics.
"""

from .stream_pane import CHUNK_HARD, CHUNK_SOFT, _chunk_html
from .view import LIVE_TEXT, TreeView

__all__ = ["TreeView", "LIVE_TEXT", "CHUNK_HARD", "CHUNK_SOFT", "_chunk_html"]
