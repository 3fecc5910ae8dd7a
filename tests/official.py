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
    if "segment_anything.modeling" in sys.modules:
        return sys.modules["segment_anything.modeling"]
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


def reference_nms(boxes, scores, iou_threshold: float):
    """Plain greedy NMS, written for the tests as the oracle's stand-in for torchvision's.

    Keeps boxes in descending score order, dropping any whose IoU with a kept box exceeds the
    threshold; ties in score keep the lower index first (stable sort), like torchvision on CPU.
    """
    import torch

    order = torch.sort(scores, descending=True, stable=True).indices
    x0, y0, x1, y1 = boxes.unbind(1)
    areas = (x1 - x0) * (y1 - y0)
    keep: list[int] = []
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x1[i], x1) - torch.maximum(x0[i], x0)).clamp(min=0)
        h = (torch.minimum(y1[i], y1) - torch.maximum(y0[i], y0)).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas - inter)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long)


def install_torchvision_stub() -> None:
    """Give the official predictor / automatic generator the few torchvision functions they
    import, since torchvision has no CPU build here.

    * ``transforms.functional.resize`` / ``to_pil_image``: for a PIL input torchvision calls
      ``PIL.Image.resize(..., BILINEAR)``, which is exactly what the stub does.
    * ``ops.boxes.batched_nms`` / ``box_area``: :func:`reference_nms` per category (offset
      trick as torchvision does it), a straightforward loop that is easy to check by eye.
    """
    if "torchvision" in sys.modules:
        return
    import numpy as np
    import torch
    from PIL import Image

    def resize(img, size):
        return img.resize((size[1], size[0]), Image.BILINEAR)

    def to_pil_image(arr):
        return Image.fromarray(np.asarray(arr))

    def box_area(boxes):
        return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])

    def batched_nms(boxes, scores, idxs, iou_threshold):
        if boxes.numel() == 0:
            return torch.empty(0, dtype=torch.long)
        offsets = idxs.to(boxes) * (boxes.max() + 1)
        return reference_nms(boxes + offsets[:, None], scores, iou_threshold)

    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.resize, functional.to_pil_image = resize, to_pil_image
    ops = types.ModuleType("torchvision.ops")
    boxes_mod = types.ModuleType("torchvision.ops.boxes")
    boxes_mod.batched_nms, boxes_mod.box_area = batched_nms, box_area
    ops.boxes, tv.ops, tv.transforms, transforms.functional = boxes_mod, ops, transforms, functional
    sys.modules.update({
        "torchvision": tv, "torchvision.transforms": transforms,
        "torchvision.transforms.functional": functional, "torchvision.ops": ops,
        "torchvision.ops.boxes": boxes_mod,
    })


def official_package() -> types.ModuleType:
    """The whole official package (predictor, automatic generator) with the stub installed."""
    install_torchvision_stub()
    sys.modules.pop("segment_anything", None)  # drop the bare stand-in, import the real one
    return importlib.import_module("segment_anything")
