"""Choosing and building the model a command runs: one model lookup, one device rule, one
warning for untrained weights (the options that choose them: ``samkit.commands.arguments``).

Light at import (no torch until a model is built or a device checked), so commands can
declare their options without paying for torch in ``--help``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from samkit.errors import SamkitError
from samkit.registry import get_config
from samkit.weights import REGISTRY, cached_path

if TYPE_CHECKING:
    from samkit.modeling.sam import Sam


@dataclass(frozen=True)
class ModelChoice:
    """Which model to build and from which weights (``None``: bundled weights or random)."""

    name: str
    checkpoint: Path | None


def resolve_model(name: str, checkpoint: Path | None) -> ModelChoice:
    """Check the model name and find its weights, without loading anything."""
    get_config(name)  # raises on an unknown name, listing the valid ones
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise SamkitError(f"checkpoint not found: {checkpoint}")
        return ModelChoice(name, checkpoint)
    if name in REGISTRY:
        cached = cached_path(name)
        # `samkit weights fetch` only ever moves a fully verified download to this name.
        if not cached.is_file():
            raise SamkitError(
                f"no weights for official model {name!r} in {cached.parent}; "
                f"run: samkit weights fetch {name}, or pass --checkpoint"
            )
        return ModelChoice(name, cached)
    return ModelChoice(name, None)


def resolve_device(name: str | None, env: Mapping[str, str] | None = None) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``. ``None`` picks CUDA when it is available: under
    torchrun (``LOCAL_RANK`` in ``env``) each process its own GPU."""
    import torch

    if name is None:
        if not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{env['LOCAL_RANK']}" if env and "LOCAL_RANK" in env else "cuda"
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", name)
    if match is None:
        raise SamkitError(f"unknown --device {name!r}; use cpu, cuda or cuda:N")
    if name == "cpu":
        return name
    if not torch.cuda.is_available():
        raise SamkitError(f"--device {name} requested but CUDA is not available here")
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise SamkitError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return name


def build_model(choice: ModelChoice, device: str) -> tuple[Sam, bool]:
    """Build the model on ``device``; returns it and whether its weights are trained."""
    from samkit.build import build_sam, is_trained

    model = build_sam(choice.name, choice.checkpoint, device=device)
    return model, is_trained(model)


def warn_if_untrained(model: str, trained: bool, *, what: str = "masks",
                      fix: str = "pass --checkpoint") -> None:
    """The one warning for untrained weights, on stderr (through tqdm, so it does not tear a
    progress bar): ``model`` names it ("model 'vit_b'"), ``what`` its output."""
    from tqdm import tqdm

    if not trained:
        tqdm.write(f"WARNING: {model} has no trained weights in this install: {what} are from "
                   f"RANDOM weights and mean nothing ({fix})", file=sys.stderr)
