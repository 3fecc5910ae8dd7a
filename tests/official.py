"""Test-only access to the official ``segment_anything`` code as a numerical oracle.

The package ``__init__`` imports torchvision (no CPU build here), but its ``modeling`` modules
import only torch. We register an empty package module that points at the installed folder,
so ``segment_anything.modeling`` imports without running the package ``__init__``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest


def official_modeling() -> types.ModuleType:
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("segment-anything==1.0 (test-only oracle) is not installed")
    if "segment_anything" not in sys.modules:
        package = types.ModuleType("segment_anything")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["segment_anything"] = package
    return importlib.import_module("segment_anything.modeling")


def official_sam(encoder_depth: int, embed_dim: int, num_heads: int, global_attn: tuple[int, ...],
                 image_size: int = 1024):
    """An official ``Sam`` built like ``build_sam_vit_*`` (random weights, eval mode)."""
    from functools import partial

    import torch

    m = official_modeling()
    grid = image_size // 16
    sam = m.Sam(
        image_encoder=m.ImageEncoderViT(
            depth=encoder_depth, embed_dim=embed_dim, img_size=image_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=num_heads, patch_size=16,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=list(global_attn),
            window_size=14, out_chans=256,
        ),
        prompt_encoder=m.PromptEncoder(
            embed_dim=256, image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size), mask_in_chans=16,
        ),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
    )
    return sam.eval()


SHARED = Path(__file__).resolve().parents[1].parent / "shared"
