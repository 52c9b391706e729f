"""The magics reference (docs/magics.md) cannot drift from the code: every flag of
``%%subchat``'s parser and of ``%load_vllm``'s, every ``%subchat`` subcommand and each
subcommand's flags are in the page's tables, and everything the tables name exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "magics.md"
_FLAG = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def section(text: str, heading_start: str) -> str:
    """The text of the ``## `` section whose title starts with heading_start."""
    for part in re.split(r"^## ", text, flags=re.M)[1:]:
        if part.startswith(heading_start):
            return part
    raise AssertionError(f"docs/magics.md has no section starting {heading_start!r}")


def first_cells(part: str) -> list[str]:
    """The first column of each row of the section's table (the header and rule left out)."""
    rows = [line for line in part.splitlines() if line.startswith("| `")]
    return [re.split(r"(?<!\\)\|", row)[1] for row in rows]


def table_flags(part: str) -> set[str]:
    return {flag for cell in first_cells(part) for flag in _FLAG.findall(cell)}


def parser_flags(func) -> set[str]:
    """The option strings of a magic's argparse parser (magic_arguments builds it)."""
    return {s for a in func.parser._actions for s in a.option_strings} - {"-h", "--help"}


def subcommand_flags() -> dict[str, set[str]]:
    """Each subcommand's flags, read from the ``m._parse("name", rest, ((flags...), {...}))``
    calls of subchat_magics/commands/*.py (each subcommand parses its own words)."""
    flags: dict[str, set[str]] = {}
    for path in sorted((ROOT / "subchat_magics" / "commands").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "_parse" and node.args
                    and isinstance(node.args[0], ast.Constant)):
                continue
            names = flags.setdefault(node.args[0].value, set())
            for spec in node.args[2:]:
                if isinstance(spec, ast.Tuple) and isinstance(spec.elts[0], ast.Tuple):
                    names |= {e.value for e in spec.elts[0].elts
                              if isinstance(e, ast.Constant) and e.value.startswith("-")}
    return flags


def page_subcommands(part: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for cell in first_cells(part):
        name = cell.strip().strip("`").split()[0]
        out[name] = set(_FLAG.findall(cell))
    return out


def drift(code: set[str], page: set[str]) -> tuple[set[str], set[str]]:
    """(in the code but not on the page, on the page but not in the code)"""
    return code - page, page - code


def _page() -> str:
    return PAGE.read_text(encoding="utf-8")


def test_every_subchat_cell_flag_is_in_the_reference_and_nothing_else():
    from subchat_magics.magics import SubchatMagics

    code = parser_flags(SubchatMagics.subchat)
    assert {"--vote", "--tools", "--each", "--json"} <= code  # the parser was read
    undocumented, unknown = drift(code, table_flags(section(_page(), "`%%subchat")))
    assert not undocumented, f"%%subchat flags missing from docs/magics.md: {sorted(undocumented)}"
    assert not unknown, f"docs/magics.md names %%subchat flags the parser lacks: {sorted(unknown)}"


def test_every_subcommand_and_its_flags_are_in_the_reference():
    from subchat_magics.commands import COMMANDS
    from subchat_magics.magics import SUBCOMMANDS

    assert set(SUBCOMMANDS) == set(COMMANDS) | {"help"}
    page = page_subcommands(section(_page(), "`%subchat SUBCOMMAND"))
    undocumented, unknown = drift(set(SUBCOMMANDS), set(page))
    assert not undocumented, f"%subchat subcommands missing from docs/magics.md: {sorted(undocumented)}"
    assert not unknown, f"docs/magics.md names subcommands that do not exist: {sorted(unknown)}"
    code = subcommand_flags()
    assert set(code) == set(COMMANDS), set(COMMANDS) ^ set(code)  # every command was read
    assert code["show"] == {"-p", "--provenance", "--own"}
    for name in COMMANDS:
        undocumented, unknown = drift(code[name], page[name])
        assert not (undocumented or unknown), (
            f"%subchat {name}: flags missing from docs/magics.md {sorted(undocumented)}, "
            f"named there but not parsed {sorted(unknown)}")


def test_every_load_vllm_flag_is_in_the_reference_and_nothing_else():
    from subchat_magics.vllm_magics import VLLMMagics

    code = parser_flags(VLLMMagics.load_vllm)
    assert {"--plan", "--engine-arg", "--tp"} <= code
    undocumented, unknown = drift(code, table_flags(section(_page(), "`%load_vllm")))
    assert not undocumented, f"%load_vllm flags missing from docs/magics.md: {sorted(undocumented)}"
    assert not unknown, f"docs/magics.md names %load_vllm flags the parser lacks: {sorted(unknown)}"


def test_the_check_fails_when_a_row_is_missing_or_made_up():
    from subchat_magics.magics import SubchatMagics

    code = parser_flags(SubchatMagics.subchat)
    part = section(_page(), "`%%subchat")
    without_vote = "\n".join(line for line in part.splitlines() if not line.startswith("| `--vote"))
    assert drift(code, table_flags(without_vote))[0] == {"--vote"}
    made_up = part + "\n| `--frobnicate N` | no such flag |\n"
    assert drift(code, table_flags(made_up))[1] == {"--frobnicate"}
    subs = page_subcommands(section(_page(), "`%subchat SUBCOMMAND").replace("| `doctor` |", "| doctor |"))
    assert "doctor" not in subs
