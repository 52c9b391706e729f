"""Summaries count one thing in the singular: ``1 row``, ``1 chat``, ``1 message``, never
``1 rows`` (the trial read ``1 items``) nor ``1 chat(s)``."""

from __future__ import annotations

import re

import pandas as pd
from hypothesis import given
from hypothesis import strategies as st

from subchat_magics.words import counted

WRONG = re.compile(r"(?<![\d,.])1 (rows|items|chats|messages|columns|models|sequences|attempts)\b"
                   r"|\(s\)")


def test_a_batch_of_one_row_its_estimate_show_status_and_export_say_one(shell, workdir):
    shell.ns["xs"] = ["only"]
    shell.ns["df"] = pd.DataFrame({"a": [1]})
    said = [shell.ok("%%subchat root -b echo --each xs --estimate --sample 1\n{item}?")]
    said.append(shell.ok("%subchat show root/xs"))
    said.append(shell.ok("%%subchat root/solo -b echo\n{df}"))
    said.append(shell.ok("%subchat show root/solo"))
    said.append(shell.ok("%subchat export root/solo --format md --out solo.md"))
    said.append(shell.ok("%subchat delete root/solo --force"))
    assert "estimate for root/xs: 1 row, 1 to send" in said[0]
    assert "sample: 1 row in " in said[0]
    assert "batch of 1 row: 1/1 done" in said[1]
    assert "DataFrame: 1 row × 1 column" in said[3]
    assert "exported 1 chat from root/solo" in said[4] and "deleted 1 chat: root/solo" in said[5]
    for text in said:  # (echo's own reply, "echo (1 messages): ...", is the model's text)
        text = re.sub(r"echo \(\d+ messages\)", "", text)
        assert not WRONG.search(text), WRONG.search(text)


@given(st.integers(0, 10**7), st.sampled_from(["row", "chat", "reply", "box", "batch"]))
def test_counted_agrees_number_and_noun(n, noun):
    text = counted(n, noun, group=True)
    number, _, word = text.partition(" ")
    assert int(number.replace(",", "")) == n
    assert (word == noun) == (n == 1) and word.startswith(noun[:-1])
