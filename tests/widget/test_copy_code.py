"""A reply's code blocks can be copied to the clipboard from the tree view: a button in
the browser holds them (the kernel has no clipboard); the real click is in tests/browser."""

from __future__ import annotations

import html
import re

import ipywidgets as w

from subchat_magics.widget import TreeView


def copy_buttons(view: TreeView) -> list[str]:
    """The code each copy button of the transcript would put on the clipboard."""
    found = []

    def walk(widget):
        if isinstance(widget, w.HTML) and "subchat-copy-code" in widget.value:
            found.append(html.unescape(re.search(r'data-code="([^"]*)"', widget.value).group(1)))
        for child in getattr(widget, "children", ()):
            walk(child)

    walk(view.transcript)
    return found


def test_a_reply_with_code_blocks_gets_a_button_holding_exactly_that_code(shell, echo_session,
                                                                          comms):
    shell.ok("%%subchat root\nNo code here.")
    code = 'print("a < b & \'c\'")\n    x = {1: 2}'
    shell.ok("%%subchat root\nTwo blocks:\n```python\n" + code + "\n```\ntext\n~~~\nls -l\n~~~")
    view = TreeView(echo_session.tree, session=echo_session)
    try:
        view.sync()
        assert copy_buttons(view) == [code + "\n\nls -l"]
    finally:
        view.close()


def test_a_user_message_with_code_gets_no_button(shell, echo_session, comms):
    shell.ok("%%subchat root --max-tokens 2\n```python\nprint(1)\n```")  # the reply is cut short
    view = TreeView(echo_session.tree, session=echo_session)
    try:
        view.sync()
        assert copy_buttons(view) == []
    finally:
        view.close()
