"""Optimiser and learning-rate schedule (paper App. A).

* AdamW, beta = (0.9, 0.999), weight decay 0.1, except on norms, biases, learned embeddings
  (prompt / output tokens, "no mask" embedding) and positional parameters (ViT ``pos_embed``
  and relative-position tables, TinyViT attention biases): decaying those towards 0 only
  removes information they encode.
* Linear warm-up over ``warmup`` iterations, then the lr is divided by 10 at each of the
  ``decay_fractions`` of the schedule (paper: at 60k and 86,666 of 90k).
* Layer-wise lr decay (BEiT/MAE style) for the image encoder: with ``L`` encoder blocks,
  block ``i`` (0-based, input side first) gets ``lr * decay^(L - i)``, the patch embedding
  (and ``pos_embed``) ``lr * decay^(L + 1)``; the neck, the prompt encoder and the mask
  decoder get the full lr. TinyViT has no single stack of blocks: its MBConv and attention
  blocks are numbered in forward order across all stages (``L = sum(depths)``, 12 for
  TinyViT-5M), each stage's patch-merging layer shares the id of the block before it, and
  the conv stem is id 0 like the ViT patch embedding.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from samkit.modeling.image_encoder import ImageEncoderViT
from samkit.modeling.tiny_vit import TinyViT

# Parameters that are positions or offsets, not weights (never weight-decayed).
_POSITIONAL = ("pos_embed", "rel_pos_h", "rel_pos_w", "attention_biases")


def no_weight_decay(model: nn.Module) -> set[str]:
    """Names of parameters exempt from weight decay: 1-d (norms, biases), embeddings and
    positional parameters."""
    embedding_params = {
        f"{module_name}.{param_name}" if module_name else param_name
        for module_name, module in model.named_modules()
        if isinstance(module, nn.Embedding)
        for param_name, _ in module.named_parameters(recurse=False)
    }
    return {
        name
        for name, p in model.named_parameters()
        if p.ndim <= 1 or name in embedding_params or name.split(".")[-1] in _POSITIONAL
    }


def encoder_layer_id(name: str, encoder: nn.Module) -> tuple[int, int]:
    """``(layer id, number of blocks L)`` of an image-encoder parameter name (without the
    ``image_encoder.`` prefix); id ``L + 1`` means "full learning rate"."""
    if isinstance(encoder, ImageEncoderViT):
        depth = len(encoder.blocks)
        if name.startswith(("patch_embed.", "pos_embed")):
            return 0, depth
        block = re.match(r"blocks\.(\d+)\.", name)
        return (int(block.group(1)) + 1 if block else depth + 1), depth
    if isinstance(encoder, TinyViT):
        depths = [len(layer.blocks) for layer in encoder.layers]
        total = sum(depths)
        if name.startswith("patch_embed."):
            return 0, total
        block = re.match(r"layers\.(\d+)\.(blocks\.(\d+)|downsample)\.", name)
        if block is None:  # neck (and TinyViT's unused ImageNet head)
            return total + 1, total
        stage = int(block.group(1))
        before = sum(depths[:stage])
        if block.group(3) is not None:
            return before + int(block.group(3)) + 1, total
        return before + depths[stage], total  # downsample: same id as the stage's last block
    return 0, -1  # unknown encoder: no layer decay (scale decay^0)


def lr_scale(name: str, model: nn.Module, layer_decay: float) -> float:
    """Multiplier on the base lr for parameter ``name`` of a ``Sam``."""
    prefix = "image_encoder."
    if not name.startswith(prefix):
        return 1.0
    layer, depth = encoder_layer_id(name[len(prefix):], model.image_encoder)
    if depth < 0:
        return 1.0
    return layer_decay ** (depth + 1 - layer)


def param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float,
                 new_modules: Sequence[str] = (), new_module_scale: float = 1.0) -> list[dict]:
    """AdamW param groups of the trainable parameters, one per (lr scale, decay?) pair;
    parameters under a ``new_modules`` prefix get ``new_module_scale`` times their scale.

    Each group also carries ``lr_scale`` and the parameter ``names`` (for inspection).
    """
    exempt = no_weight_decay(model)
    groups: dict[tuple[float, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = lr_scale(name, model, layer_decay)
        if name.startswith(tuple(new_modules)):
            scale *= new_module_scale
        decay = name not in exempt
        group = groups.setdefault((scale, decay), {
            "params": [], "names": [], "lr": lr * scale, "lr_scale": scale,
            "weight_decay": weight_decay if decay else 0.0,
        })
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, layer_decay: float,
                    betas: tuple[float, float], new_modules: Sequence[str] = (),
                    new_module_scale: float = 1.0) -> torch.optim.AdamW:
    groups = param_groups(model, lr, weight_decay, layer_decay, new_modules, new_module_scale)
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def lr_factor(step: int, warmup: int, iterations: int, decay_fractions: Sequence[float],
              gamma: float = 0.1) -> float:
    """Multiplier on each group's lr at (0-based) ``step``: linear warm-up from
    ``1 / warmup``, then ``gamma`` once per decay point passed."""
    if step < warmup:
        return (step + 1) / warmup
    return gamma ** sum(step >= round(f * iterations) for f in decay_fractions)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int, iterations: int,
                    decay_fractions: Sequence[float]) -> torch.optim.lr_scheduler.LambdaLR:
    fractions = tuple(decay_fractions)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, iterations, fractions)
    )
