"""The command line's interface is what users script against: every command, and each
option's flags, default, type, choices and arity, must stay as recorded in
``tests/data/cli_interface.json``. A refactor that changes any of it fails here; a deliberate
change updates the record (``python tests/test_cli_interface.py --update``) in the same
commit, so the diff shows it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

RECORD = Path(__file__).parent / "data" / "cli_interface.json"


def interface() -> dict[str, list[dict[str, Any]]]:
    """``{"samkit eval points": [option, ...], ...}`` from the real parser."""
    from samkit.cli import build_parser

    commands: dict[str, list[dict[str, Any]]] = {}

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        options = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, child in action.choices.items():
                    walk(child, f"{name} {sub}")
                continue
            if isinstance(action, argparse._HelpAction):
                continue
            default = action.default
            options.append({
                "flags": list(action.option_strings) or [action.dest],
                "dest": action.dest,
                "action": type(action).__name__,
                "default": default if isinstance(default, (str, int, float, bool, type(None)))
                else repr(default),
                "type": getattr(action.type, "__name__", repr(action.type)),
                "nargs": action.nargs,
                "choices": sorted(map(str, action.choices)) if action.choices else None,
                "required": action.required,
            })
        commands[name] = options

    walk(build_parser(), "samkit")
    return commands


def test_the_command_line_interface_is_as_recorded() -> None:
    recorded = json.loads(RECORD.read_text())
    current = interface()
    assert sorted(current) == sorted(recorded), "commands added or removed"
    for name, options in recorded.items():
        assert current[name] == options, f"options of `{name}` changed"


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/test_cli_interface.py --update")
    RECORD.write_text(json.dumps(interface(), indent=1) + "\n")
    print(f"wrote {RECORD}")
