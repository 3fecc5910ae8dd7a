"""The model registry: each model's config as a small frozen dataclass, by name.

Pure data (no torch): commands list the names in their help without importing a model.
:mod:`samkit.build` turns a config into a :class:`~samkit.modeling.sam.Sam`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from samkit.errors import SamkitError


@dataclass(frozen=True)
class ViTConfig:
    """ViTDet-style plain ViT encoder (SAM ViT-B/L/H)."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    patch_size: int = 16
    window_size: int = 14
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class TinyViTConfig:
    """TinyViT encoder (MobileSAM); the defaults are TinyViT-5M as in ``mobile_sam.pt``."""

    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class HedConfig:
    """HED's VGG16 blocks 1-4 (pretrained) + a small trainable neck, the encoder of
    samkit-tiny (``samkit.modeling.hed_encoder``). It takes RGB minus HED's pixel mean. The
    defaults are the plain stem (blocks 1-4 frozen, no branches); the registry's samkit-tiny
    is the shipped variant (:data:`SAMKIT_TINY_ENCODER`)."""

    neck_blocks: int = 0  # global self-attention blocks over the embedding grid, after the conv
    stem_int8: bool = False  # VGG conv weights stored as int8 (per output channel)
    context_block: bool = False  # VGG16's block 5, trained, on block 4 (grid-wide context)
    detail_block: bool = False  # block 2 (stride 2: the low-res mask's pixels) into the grid
    train_block4: bool = False  # VGG block 4 trained with the head (the frozen stem: blocks 1-3)


@dataclass(frozen=True)
class EverythingFilters:
    """Segment-everything's quality filters: a mask is kept when its predicted IoU exceeds
    ``pred_iou_thresh`` and its stability score reaches ``stability_score_thresh``. The
    paper's values (§7.3) were set for SAM's IoU head; a model whose head is calibrated
    otherwise registers its own, measured on training images (docs/everything.md)."""

    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95


PAPER_FILTERS = EverythingFilters()


@dataclass(frozen=True)
class SamConfig:
    """Everything needed to build a SAM; the prompt encoder / decoder are the paper's."""

    encoder: ViTConfig | TinyViTConfig | HedConfig
    image_size: int = 1024
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 2048
    num_multimask_outputs: int = 3
    bundled_weights: str | None = None  # file in samkit/weights/ shipped with the package
    everything_filters: EverythingFilters = field(default=PAPER_FILTERS, compare=False)
    description: str = field(default="", compare=False)

    @property
    def embedding_size(self) -> int:
        return self.image_size // 16


# The shipped samkit-tiny (the encoder record of its bundled file): VGG blocks 1-4 frozen
# (block 4 as fine-tuned by an earlier run), block 5 as a trained context branch, the VGG
# convs stored int8 (docs/samkit-tiny.md, "Architecture").
SAMKIT_TINY_ENCODER = HedConfig(stem_int8=True, context_block=True, train_block4=False)

MODEL_CONFIGS: dict[str, SamConfig] = {
    "vit_h": SamConfig(
        ViTConfig(1280, 32, 16, (7, 15, 23, 31)), description="SAM ViT-H (636M), official"
    ),
    "vit_l": SamConfig(
        ViTConfig(1024, 24, 16, (5, 11, 17, 23)), description="SAM ViT-L (308M), official"
    ),
    "vit_b": SamConfig(
        ViTConfig(768, 12, 12, (2, 5, 8, 11)), description="SAM ViT-B (91M), official"
    ),
    "vit_t": SamConfig(TinyViTConfig(), description="MobileSAM TinyViT-5M (10M)"),
    "samkit-tiny": SamConfig(
        SAMKIT_TINY_ENCODER,
        image_size=512,
        bundled_weights="samkit_tiny.safetensors",
        # Best F1 on 10 training images (scripts/everything_thresholds.py, docs/everything.md).
        everything_filters=EverythingFilters(pred_iou_thresh=0.5, stability_score_thresh=0.0),
        description="samkit's default (20M): HED VGG16 (blocks 4-5 fine-tuned) + SAM decoder "
                    "at 512 px, trained with samkit train",
    ),
}
DEFAULT_MODEL = "samkit-tiny"


def get_config(name: str) -> SamConfig:
    try:
        return MODEL_CONFIGS[name]
    except KeyError:
        valid = ", ".join(MODEL_CONFIGS)
        raise SamkitError(f"unknown model {name!r}; choose one of: {valid}") from None
