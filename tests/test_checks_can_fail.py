"""Every assert in tests/ can fail, and none judges wall-clock time (timing belongs in
bench/, where it is measured side by side). Read from the source, so that an
``assert x or True`` or an ``assert elapsed < 2`` does not come back unnoticed."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
CLOCKS = {"perf_counter", "perf_counter_ns", "monotonic", "monotonic_ns", "time", "time_ns",
          "process_time", "thread_time"}
GROWERS = {"append", "extend", "add", "insert", "update", "setdefault"}


def _clock_call(node: ast.AST) -> bool:
    """``time.perf_counter()``, ``perf_counter()``, ``time.time()``, ..."""
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    if isinstance(f, ast.Attribute):
        return f.attr in CLOCKS and isinstance(f.value, ast.Name) and f.value.id == "time"
    return isinstance(f, ast.Name) and f.id in CLOCKS - {"time"}


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _timed(node: ast.AST, tainted: set[str]) -> bool:
    return any(_clock_call(n) for n in ast.walk(node)) or bool(_names(node) & tainted)


def _target_names(target: ast.AST) -> set[str]:
    """The variable a store lands in: ``x``, ``x[i]``, ``x.y``, ``a, b``."""
    while isinstance(target, (ast.Subscript, ast.Attribute, ast.Starred)):
        target = target.value
    if isinstance(target, ast.Name):
        return {target.id}
    if isinstance(target, (ast.Tuple, ast.List)):
        return set().union(*(_target_names(t) for t in target.elts))
    return set()


def clock_tainted(func: ast.AST) -> set[str]:
    """Names in ``func`` that hold a wall-clock reading or something computed from one
    (assigned, appended, or iterated over), to a fixed point."""
    tainted: set[str] = set()
    while True:
        before = len(tainted)
        for n in ast.walk(func):
            if isinstance(n, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and n.value is not None:
                targets = n.targets if isinstance(n, ast.Assign) else [n.target]
                if _timed(n.value, tainted):
                    for t in targets:
                        tainted |= _target_names(t)
            elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) \
                    and n.func.attr in GROWERS and any(_timed(a, tainted) for a in n.args):
                tainted |= _target_names(n.func.value)
            elif isinstance(n, (ast.For, ast.comprehension)) and _timed(n.iter, tainted):
                tainted |= _target_names(n.target)
        if len(tainted) == before:
            return tainted


def cannot_fail(test: ast.expr) -> str | None:
    """Why an assert's condition is true whatever the code does (None: it can fail)."""
    if isinstance(test, ast.Constant):
        return "a constant" if test.value else None
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.Or):
        for v in test.values:
            if isinstance(v, ast.Constant) and v.value:
                return "`or` a true constant"
    if isinstance(test, (ast.List, ast.Tuple, ast.Set, ast.Dict, ast.JoinedStr)):
        return "a non-empty literal" if getattr(test, "elts", None) or getattr(test, "keys", None) \
            or isinstance(test, ast.JoinedStr) else None
    return None


def findings(source: str, name: str) -> list[str]:
    tree = ast.parse(source)
    out = []
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for func in funcs:
        tainted = clock_tainted(func)
        for node in ast.walk(func):
            if not isinstance(node, ast.Assert):
                continue
            why = cannot_fail(node.test)
            if why:
                out.append(f"{name}:{node.lineno}: assert that cannot fail ({why})")
            elif _timed(node.test, tainted):
                out.append(f"{name}:{node.lineno}: assert on wall-clock time (move it to bench/)")
    return sorted(set(out))


def test_the_scan_finds_what_it_looks_for():
    bad = '''
def test_a():
    assert 1
    assert True
    assert x == 2 or True
    t0 = time.perf_counter()
    run()
    wall = time.perf_counter() - t0
    assert wall < 2
    seen = []
    go(lambda: seen.append((time.monotonic(), 1)))
    gaps = [b[0] - a[0] for a, b in zip(seen, seen[1:])]
    assert all(g > 0.1 for g in gaps)
    times = {}
    times[1] = perf_counter()
    assert times[1] > 0
'''
    found = findings(bad, "x.py")
    assert [f.split(":")[1] for f in found] == ["13", "16", "3", "4", "5", "9"], found
    good = '''
def test_b():
    assert x == 1
    assert result.ok or result.skipped
    p = run()
    assert p.elapsed_s >= 0.1
    assert [] == list(y)
'''
    assert findings(good, "y.py") == []


def test_no_test_has_an_assert_that_cannot_fail_or_that_times_the_wall_clock():
    found = []
    for path in sorted(TESTS.rglob("*.py")):
        if path.name == Path(__file__).name:
            continue
        found += findings(path.read_text(encoding="utf-8"), str(path.relative_to(TESTS.parent)))
    assert found == [], "\n".join(found)
