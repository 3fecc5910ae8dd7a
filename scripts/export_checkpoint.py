"""Write a training ``checkpoint.pt``'s model as the fp16 safetensors samkit ships.

    python scripts/export_checkpoint.py runs/samkit-tiny-cpu/checkpoint.pt \
        samkit/weights/samkit_tiny.safetensors [--model samkit-tiny]

(The trainer writes ``model.safetensors`` itself at the end of a run; this is for shipping
an intermediate checkpoint.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from samkit.build import build_sam_from_config, load_into, save_checkpoint
from samkit.errors import SamkitError
from samkit.registry import get_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="samkit-tiny")
    args = parser.parse_args()
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "model" not in state:
        raise SamkitError(f"{args.checkpoint} is not a samkit training checkpoint")
    sam = build_sam_from_config(get_config(args.model))
    load_into(sam, state["model"], args.model, str(args.checkpoint))
    save_checkpoint(sam, args.out, half=True,
                    metadata={"model": args.model, "step": str(state.get("step", ""))})
    print(f"wrote {args.out} (step {state.get('step')}, "
          f"{args.out.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    try:
        main()
    except SamkitError as err:
        raise SystemExit(f"export_checkpoint: error: {err}") from None
