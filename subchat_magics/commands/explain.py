"""%subchat subcommands: sending the notebook's last error to a chat.

Each takes the magics object (its session, shell and settings) and the words after
the subcommand."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import notebook

if TYPE_CHECKING:
    from ..magics import SubchatMagics


def explain(m: "SubchatMagics", rest: list[str]) -> None:
    a = m._parse("explain", rest, (("n",), dict(nargs="?", type=int, default=None)),
                 (("--into",), dict(default=None)))
    ctx = notebook.context(m.shell)
    if a.n is None:
        error = ctx.last_error()
        if error is None:
            print("%subchat explain: no error recorded yet (errors are recorded from the "
                  "cells run after %load_ext subchat_magics)")
            return
    else:
        error = ctx.error(a.n, label="%subchat explain")
    filled = notebook.explain_prompt(error, m.limits)
    turn = m.session.send(a.into, filled.text)
    which = f"the {error.ename} of {error.where}" if a.n is not None else \
        f"the last error ({error.ename})"
    print(f"explaining {which} in {turn.chat.path}")
    m._say_masked(filled)
    m._stream(turn, m.format, None, magic="%subchat explain")
