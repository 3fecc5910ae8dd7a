"""The package's layers: no import cycles, commands are leaves (nothing in the library or the
apps imports them), and declaring them does not import torch (``samkit --help`` stays fast)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "samkit"
# What may import the commands: the `samkit` entry point, `python -m samkit.train`, themselves.
COMMAND_USERS = {"cli.py", "train/__main__.py"}


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` / ``from ... import`` in ``path`` names (at any depth)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path, modules: set[str]) -> set[str]:
    """The samkit modules ``path`` imports when it runs (at the top or inside functions;
    ``if TYPE_CHECKING:`` blocks, which never run, left out)."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING",
                                                                    "typing.TYPE_CHECKING"):
            node.body = []
    found = set()
    for name in imported_modules_of(tree):
        while name and name not in modules:  # `from samkit.x import f` -> samkit.x
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    return found - {module_name(path)}


def imported_modules_of(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.startswith("samkit")}
        elif (isinstance(node, ast.ImportFrom) and node.module and node.level == 0
              and node.module.startswith("samkit")):
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_no_import_cycles() -> None:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: runtime_imports(path, set(paths)) for name, path in paths.items()}
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycles.append([*trail[trail.index(target):], target])
            elif target not in state:
                visit(target, [*trail, target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_only_the_entry_points_import_the_commands() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("commands/") or rel in COMMAND_USERS:
            continue
        if any(name == "samkit.commands" or name.startswith("samkit.commands.")
               for name in imported_modules(path)):
            offenders.append(rel)
    assert offenders == []


def test_declaring_every_command_does_not_import_torch() -> None:
    probe = ("import sys\nfrom samkit import cli\nparser = cli.build_parser()\n"
             "print(sorted(m for m in ('torch', 'cv2', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_the_onnx_runtime_side_needs_no_torch() -> None:
    probe = "import sys\nimport samkit.onnx.predictor\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
