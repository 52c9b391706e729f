"""The layering is declared (the import-linter contracts in ``pyproject.toml``) and checked
here with the fast tests: a layer that imports one above it, a backend or the core that
imports IPython, a helper that reaches up, or an import cycle among the package's modules
fails the suite. Imports under ``if TYPE_CHECKING:`` are not counted: they never run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
from importlinter.cli import lint_imports

import subchat_magics

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("transformers", "tokenizers", "torch", "vllm", "httpx", "ollama", "groq", "openai")


def test_the_checked_package_is_this_checkout():
    assert Path(subchat_magics.__file__).resolve().parent == ROOT / "subchat_magics"


def test_import_contracts_are_kept(capsys):
    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    report = capsys.readouterr().out
    assert code == 0, report


def _cycles(graph) -> list[list[str]]:
    """Each strongly connected component of more than one module, sorted."""
    seen: set[str] = set()
    cycles = []
    for module in sorted(graph.modules):
        if module in seen:
            continue
        # the modules this one reaches and that reach it back
        component = graph.find_upstream_modules(module) & graph.find_downstream_modules(module)
        if component:
            component |= {module}
            seen |= component
            cycles.append(sorted(component))
    return cycles


def _describe(graph, component: list[str]) -> str:
    lines = []
    for importer in component:
        for imported in component:
            if graph.direct_import_exists(importer=importer, imported=imported):
                where = graph.get_import_details(importer=importer, imported=imported)
                at = ", ".join(f"l.{d['line_number']}" for d in where)
                lines.append(f"  {importer} -> {imported} ({at})")
    return "\n".join(lines)


def test_no_import_cycle_among_the_package_modules():
    graph = grimp.build_graph("subchat_magics", exclude_type_checking_imports=True,
                              cache_dir=None)
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n\n".join(_describe(graph, c) for c in cycles)


def test_importing_the_testing_kit_imports_no_heavy_sdk():
    code = ("import sys, subchat_magics.testing as t\n"
            "import subchat_magics.testing.fakeservers, subchat_magics.testing.tiny_model\n"
            "import subchat_magics.testing.reliability, subchat_magics.testing.shell\n"
            "assert t.Shell and t.FakeOllama and t.store_rows\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT / "tests").stdout
    assert out.strip() == "[]"


def test_the_faces_contract_fails_when_the_widget_imports_the_magics(tmp_path):
    """The faces are independent ("|"): a copy of the package whose widget imports the
    magics breaks the layers contract (the check can fail)."""
    import shutil

    shutil.copytree(ROOT / "subchat_magics", tmp_path / "subchat_magics",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    init = tmp_path / "subchat_magics" / "widget" / "__init__.py"
    init.write_text(init.read_text() + "\nfrom ..magics import SubchatMagics  # noqa\n")
    run = subprocess.run([sys.executable, "-c",
                          "import sys; from importlinter.cli import lint_imports; "
                          "sys.exit(lint_imports(config_filename='pyproject.toml', "
                          "no_cache=True, no_logo=True))"],
                         capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert run.returncode != 0, run.stdout
    assert "subchat_magics.widget is not allowed to import subchat_magics.magics" in run.stdout
