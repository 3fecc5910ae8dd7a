"""Every ``samkit`` command shown in a fenced block of README.md or docs/*.md is one the CLI
accepts as written: its sub-command and every option exist, required options are there and
the values parse (``python -m samkit.train`` lines through that entry point's own parser).
Synopsis lines (``[optional]`` parts, ``a|b`` choices) are not commands and are left out;
repository files a command names (configs, scripts) must exist. README's quick start itself
is run for real by ``test_readme_quick_start_on_a_fresh_clone``."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from samkit.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?:bash|sh|shell|console)\n(.*?)^```", re.S | re.M)
# A command starts the line (or follows && or ;), maybe after VAR=value and a venv prefix.
START = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:\.venv/bin/)?(samkit|python -m samkit\.train)\s")


def documented_commands() -> list[tuple[str, str]]:
    commands = []
    for doc in DOCS:
        for block in FENCE.findall(doc.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                for part in re.split(r"&&|;", line.split(" # ")[0]):
                    part = part.strip()
                    if START.match(part) and not re.search(r"\[|\||\.\.\.", part):
                        commands.append((doc.name, part))
    return commands


COMMANDS = documented_commands()


def test_the_docs_show_commands() -> None:
    assert len(COMMANDS) >= 20  # the extraction itself works (README + docs/*.md)
    assert any(doc == "README.md" for doc, _ in COMMANDS)


def train_parser() -> argparse.ArgumentParser:
    from samkit.commands.train import add_arguments

    parser = argparse.ArgumentParser(prog="python -m samkit.train")
    add_arguments(parser)
    return parser


@pytest.mark.parametrize("doc, command", COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in COMMANDS])
def test_documented_command_parses(doc: str, command: str) -> None:
    words = shlex.split(START.sub(lambda m: m.group(1) + " ", command, count=1))
    if words[:3] == ["python", "-m", "samkit.train"]:
        parser, argv = train_parser(), words[3:]
    else:
        parser, argv = build_parser(), words[1:]
    try:
        parser.parse_args(argv)
    except SystemExit as err:  # argparse's way of saying no
        pytest.fail(f"{doc}: `{command}` is refused by the CLI (exit {err.code})")
    for word in argv:
        if re.match(r"^(configs|scripts|benchmarks)/", word):
            assert (REPO / word).exists(), f"{doc}: `{command}` names {word}, which is absent"


def test_readme_quick_start_on_a_fresh_clone(tmp_path: Path, monkeypatch) -> None:
    """README's first command segments the sample image shipped in the repo (no ../shared
    needed) with the bundled weights, and the mask is the ball it boxes."""
    import numpy as np
    from PIL import Image

    from samkit.cli import main

    first_block = FENCE.search((REPO / "README.md").read_text()).group(1)
    [segment] = [c for c in re.split(r"&&|\n", first_block) if " segment " in c]
    words = shlex.split(segment)[1:]  # after `.venv/bin/samkit`
    assert "../shared" not in segment and words[0] == "segment"
    out = words.index("-o")
    words[out + 1] = str(tmp_path / "out")
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(words) == 0
    mask = np.asarray(Image.open(tmp_path / "out" / "mask.png")) > 0
    assert (tmp_path / "out" / "overlay.png").is_file()
    truth = np.asarray(Image.open(REPO / "examples" / "sample_ball.png")) > 0
    assert (mask & truth).sum() / (mask | truth).sum() >= 0.7


def test_sample_image_is_the_generated_one() -> None:
    """examples/sample.png is what scripts/make_sample_image.py draws (no third-party pixels)."""
    import importlib.util

    import numpy as np
    from PIL import Image

    spec = importlib.util.spec_from_file_location("make_sample_image",
                                                  REPO / "scripts" / "make_sample_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pixels, ball = module.draw()
    shipped = np.asarray(Image.open(REPO / "examples" / "sample.png").convert("RGB"))
    assert np.array_equal(shipped, pixels)
    assert np.array_equal(np.asarray(Image.open(REPO / "examples" / "sample_ball.png")) > 0, ball)
