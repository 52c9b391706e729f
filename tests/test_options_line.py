"""The options line keeps what was typed (issue 20): backslashes stay (``--regex \\d{3}``
means ``\\d{3}``), quotes group a choice that holds a comma, a choice with a leading or
trailing space is refused as ambiguous (replies are compared stripped), and a quote left
open is one line. Through a real shell on echo; refusals leave the store as it was."""

from __future__ import annotations

import re

from subchat_magics.session import default_session
from subchat_magics.testing import store_rows

MESSAGES = "SELECT id, chat_id, role, content, status FROM messages ORDER BY id"


def test_a_regex_keeps_its_backslashes_as_typed(shell):
    shell.ok("%%subchat root --backend echo --regex \\d{3}-\\w+ --var code\nA code?")
    assert re.fullmatch(r"\d{3}-\w+", shell.ns["code"])
    shell.ok("%%subchat root --backend echo --regex '\\d{2}' --var two\nTwo digits?")
    assert re.fullmatch(r"\d{2}", shell.ns["two"])


def test_quotes_group_a_choice_that_holds_a_comma(shell):
    shell.ns["qs"] = ["a", "b", "c"]
    shell.ok('%%subchat root --backend echo --choice "yes, please",no --var v\nWell?')
    assert shell.ns["v"] in ("yes, please", "no")
    # the whole list quoted is the list, as unquoted
    shell.ok('%%subchat root --backend echo --choice "yes, no" --var w\nWell?')
    assert shell.ns["w"] in ("yes", "no")
    shell.ok("%%subchat root --each qs --backend echo --choice 'a, b',\"c\" --as out\n{item}")
    assert set(shell.ns["out"]) <= {"a, b", "c"} and None not in shell.ns["out"]


def test_a_choice_with_a_leading_space_is_refused_and_nothing_is_stored(shell, workdir):
    shell.ok("%%subchat root --backend echo\nhello")
    before = store_rows(workdir / "subchats.db", MESSAGES)
    msg = shell.fails("%%subchat root --backend echo --choice ' yes',no\nWell?")
    assert msg == ("%%subchat: --choice ' yes' begins or ends with a space, and replies are "
                   "compared without one; write 'yes'")
    msg = shell.fails('%%subchat root --backend echo --choice "yes,no\nWell?')
    assert "no closing \"" in msg and "close your quotes" in msg and "\n" not in msg
    assert store_rows(workdir / "subchats.db", MESSAGES) == before


def test_a_quoted_system_prompt_keeps_its_inner_quotes(shell):
    shell.ok('%%subchat root/q --backend echo -s "Say \\"hi\\" first." \nhello')
    assert default_session().tree.get("root/q").system_prompt == 'Say "hi" first.'
