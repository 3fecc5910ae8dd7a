"""The package's layers: commands are leaves (nothing in the library or the apps imports them),
and declaring them does not import torch (``samkit --help`` stays fast)."""

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
