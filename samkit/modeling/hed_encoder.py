"""samkit-tiny's image encoder: HED's pretrained VGG16 blocks 1-4, frozen, under a small
trainable neck to SAM's ``256 x S/16 x S/16`` image embedding.

Why this shape (docs/samkit-tiny.md has the measurements):

* The stem runs at half the model's input size (``S/2``): VGG16's block 4 is at stride 8, so
  at ``S/2`` it lands exactly on the ``S/16`` embedding grid, and a 512 px model input costs
  the stem ~0.19 s on 2 CPU cores (at the full 512 px it would be 1.3 s).
* Block 3 (stride 4, twice the grid's resolution) is folded into the grid by a space-to-depth
  step, so every embedding cell also carries its 2 x 2 sub-cells: SAM's decoder upsamples the
  embedding 4x and has no other source of detail.
* Optionally block 2 (stride 2: the resolution of SAM's low-res mask, 4x the grid's) is
  folded in the same way, 4 x 4 sub-cells a cell (*detail*): the decoder's two 2x transposed
  convs map a cell's channels to exactly those 4 x 4 output pixels, so boundaries can sit
  where the image's edges are rather than where an upsampled 8 px cell puts them.
* The stem is frozen: its features are the expensive part and can be computed once per
  training image (:meth:`stem`), so a training step pays only for :meth:`head` and the
  decoder. With ``train_block4`` the stem ends at block 3 and block 4 (still HED's weights
  at the start) is trained as part of the head: the features adapt where they meet the
  neck, at the cost of block 4's forward and backward in every step (docs/samkit-tiny.md
  has the step times). With ``stem_int8`` a trained block 4 is rounded to int8 only when
  saved, like the context block.
* SAM's decoder has no pixel-to-pixel attention: which cells belong together must already be
  in the embedding, and a 3 x 3 conv over block 4 sees a few cells. Two optional ways to
  give the neck that reach: VGG16's block 5 as a trainable *context* branch (pretrained;
  at half the grid's resolution its three 3 x 3 convs see about 15 x 15 cells of the
  grid; it runs on block 4, so cached stem features still serve), and :class:`NeckBlock` s
  (global self-attention over the grid's cells).

Input: ``B x 3 x S x S``, RGB minus HED's pixel mean (``Sam(pixel_mean=HED_PIXEL_MEAN,
pixel_std=HED_PIXEL_STD)`` does that), zero-padded like every SAM input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from samkit.modeling.common import LayerNorm2d, Linear, MLPBlock
from samkit.modeling.hed import VGG16_BLOCKS, VGG16Features, VGGBlock
from samkit.modeling.quant import round_int8

STEM_BLOCKS = 4
BLOCK2_CHANS, BLOCK3_CHANS, BLOCK4_CHANS, BLOCK5_CHANS = 128, 256, 512, 512


class NeckBlock(nn.Module):
    """``B x C x g x g -> B x C x g x g``: a pre-norm transformer block with global
    self-attention over the ``g * g`` cells, after a depthwise 3 x 3 conv that gives the
    cells their position (CPVT's positional-encoding generator: no fixed grid size).

    The three residual branches' output layers start at zero, so a new block is the
    identity: added to a trained model it changes nothing until training gives it a use.
    """

    def __init__(self, dim: int = 256, num_heads: int = 8, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.pos = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, mlp_ratio * dim)
        for layer in (self.pos, self.proj, self.mlp.lin2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = (x + self.pos(x)).flatten(2).transpose(1, 2)  # B x N x C
        # B x N x 3 x heads x d -> 3 x B x heads x N x d
        q, k, v = self.qkv(self.norm1(x)).reshape(b, h * w, 3, self.num_heads, -1).permute(
            2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        x = x + self.proj(attended)
        x = x + self.mlp(self.norm2(x))
        return x.transpose(1, 2).reshape(b, c, h, w)


class HedNeck(nn.Module):
    """``(block3 B x 256 x 2g x 2g, block4 B x 512 x g x g[, block5 B x 512 x g/2 x g/2]
    [, block2 B x 128 x 4g x 4g]) -> B x out x g x g``.

    Block 4 is projected to ``out`` channels; block 3 is projected to ``out / 4`` and its
    2 x 2 cells stacked into channels (pixel unshuffle), then added; with ``detail``, block 2
    is projected to ``out / 16`` and its 4 x 4 cells stacked the same way; with ``context``,
    block 5 is projected to ``out`` and upsampled 2x (bilinear) onto the grid, and added too.
    The optional branches' projections start at zero, so adding one to a trained neck
    changes nothing at first. A 3 x 3 conv mixes neighbours; LayerNorms as in SAM's own
    neck; then ``num_blocks`` :class:`NeckBlock` s.
    """

    def __init__(self, out_chans: int = 256, num_blocks: int = 0, context: bool = False,
                 detail: bool = False) -> None:
        super().__init__()
        self.proj4 = nn.Conv2d(BLOCK4_CHANS, out_chans, 1)
        self.proj3 = nn.Conv2d(BLOCK3_CHANS, out_chans // 4, 1)
        self.proj5 = nn.Conv2d(BLOCK5_CHANS, out_chans, 1) if context else None
        self.proj2 = nn.Conv2d(BLOCK2_CHANS, out_chans // 16, 1) if detail else None
        for branch in (self.proj5, self.proj2):
            if branch is not None:
                nn.init.zeros_(branch.weight)
                nn.init.zeros_(branch.bias)
        self.norm1 = LayerNorm2d(out_chans)
        self.conv = nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False)
        self.norm2 = LayerNorm2d(out_chans)
        self.blocks = nn.Sequential(*(NeckBlock(out_chans) for _ in range(num_blocks)))

    def forward(self, block3: torch.Tensor, block4: torch.Tensor,
                block5: torch.Tensor | None = None,
                block2: torch.Tensor | None = None) -> torch.Tensor:
        x = self.proj4(block4) + F.pixel_unshuffle(self.proj3(block3), 2)
        if self.proj2 is not None:
            x = x + F.pixel_unshuffle(self.proj2(block2), 4)
        if self.proj5 is not None:
            # Project first (256 channels to upsample, not 512); g/2 -> g exactly.
            x = x + F.interpolate(self.proj5(block5), size=x.shape[-2:], mode="bilinear",
                                  align_corners=False)
        return self.blocks(self.norm2(self.conv(F.gelu(self.norm1(x)))))


class HedEncoder(nn.Module):
    """``B x 3 x S x S -> B x out_chans x S/16 x S/16``; ``forward = head(*stem(x))``."""

    def __init__(self, img_size: int = 512, out_chans: int = 256, neck_blocks: int = 0,
                 stem_int8: bool = False, context_block: bool = False,
                 detail_block: bool = False, train_block4: bool = False) -> None:
        super().__init__()
        self.img_size = img_size
        self.features = VGG16Features(STEM_BLOCKS)
        # VGG16's block 5 (max-pool + three 3 x 3 convs on block 4), trained: see the module
        # docstring. It is part of the head, so a cache of the stem still serves.
        self.context = VGGBlock(VGG16_BLOCKS[STEM_BLOCKS], pool=True) if context_block else None
        self.neck = HedNeck(out_chans, neck_blocks, context=context_block, detail=detail_block)
        self.train_block4 = train_block4
        # What stem() returns, in order (a feature cache stores them under these names).
        self.stem_outputs = (("block3",) + (() if train_block4 else ("block4",))
                             + (("block2",) if detail_block else ()))
        # The VGG conv weights (stem, and the context block) are stored as int8 values times a
        # per-channel scale (half the bytes of fp16): see int8_weight_names; the frozen stem
        # is kept int8-valued in memory too (round_stem_to_int8), so training sees what ships.
        self.stem_int8 = stem_int8

    def stem_blocks(self) -> nn.ModuleList:
        """The VGG blocks :meth:`stem` runs (all four, or 1-3 with ``train_block4``)."""
        return self.features.blocks[:3] if self.train_block4 else self.features.blocks

    def freeze_stem(self) -> None:
        """How samkit trains the encoder: no gradient for the stem's blocks (block 4 stays
        trainable with ``train_block4``)."""
        self.features.requires_grad_(False)
        if self.train_block4:
            self.features.blocks[3].requires_grad_(True)

    def stem_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights :meth:`stem`'s outputs are a function of (what a cache is keyed on),
        named as in ``features``."""
        count = len(self.stem_blocks())
        return {k: v for k, v in self.features.state_dict().items()
                if int(k.split(".")[1]) < count}

    @property
    def stem_frozen(self) -> bool:
        """No stem parameter takes gradients (how samkit trains it): the stem can then run
        without autograd, or from cached outputs."""
        return not any(p.requires_grad for p in self.stem_blocks().parameters())

    def stem(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The frozen part, in :attr:`stem_outputs` order: ``block3 B x 256 x S/8 x S/8``,
        ``block4 B x 512 x S/16 x S/16`` (unless ``train_block4``), and ``block2 B x 128 x
        S/4 x S/4`` with ``detail_block``."""
        x = F.avg_pool2d(x, 2)  # the stem sees the image at S/2 (see the module docstring)
        if x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)  # oneDNN's fast conv layout
        outputs = {}
        for i, block in enumerate(self.stem_blocks(), start=1):
            x = block(x)
            outputs[f"block{i}"] = x
        return tuple(outputs[name] for name in self.stem_outputs)

    def head(self, *features: torch.Tensor) -> torch.Tensor:
        """The trainable part, on :meth:`stem`'s outputs (live or cached)."""
        named = {k: v.float() for k, v in zip(self.stem_outputs, features, strict=True)}
        block3 = named["block3"]
        block4 = named["block4"] if "block4" in named else self.features.blocks[3](block3)
        block5 = self.context(block4) if self.context is not None else None
        return self.neck(block3, block4, block5, named.get("block2")).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(*self.stem(x))

    def int8_weight_names(self) -> list[str]:
        """The VGG conv weights (names within this module) a half-precision file stores as
        int8: the stem's and the context block's, when ``stem_int8``."""
        if not self.stem_int8:
            return []
        vgg = [("features", self.features)] + ([("context", self.context)]
                                              if self.context is not None else [])
        return [f"{prefix}.{name}" for prefix, module in vgg
                for name, p in module.named_parameters()
                if name.endswith("weight") and p.dim() == 4]

    @torch.no_grad()
    def round_stem_to_int8(self) -> None:
        """Make the stem's conv weights int8-valued (:func:`samkit.modeling.quant.round_int8`)
        so a file storing them as int8 loses nothing; a no-op unless ``stem_int8``."""
        params = dict(self.named_parameters())
        for name in self.int8_weight_names():
            if name.startswith("features."):
                params[name].copy_(round_int8(params[name]))


def load_hed_stem(encoder: HedEncoder, hed_state: dict[str, torch.Tensor]) -> None:
    """Copy blocks 1-4 of a converted HED state dict (``samkit.modeling.hed``) into the
    encoder's stem, strictly, and block 5 into its context block if it has one; HED's side
    outputs are not part of the encoder."""
    stem = {f"blocks.{k}": v for k, v in _hed_blocks(hed_state, range(STEM_BLOCKS)).items()}
    encoder.features.load_state_dict(stem, strict=True)
    if encoder.context is not None:
        load_hed_context(encoder, hed_state)


def load_hed_context(encoder: HedEncoder, hed_state: dict[str, torch.Tensor]) -> None:
    """Copy HED's block 5 into the encoder's context block, strictly (how a trained model
    grown by the branch starts it: pretrained, its projection at zero)."""
    if encoder.context is None:
        raise ValueError("the encoder has no context block")
    block5 = _hed_blocks(hed_state, [STEM_BLOCKS])
    encoder.context.load_state_dict({k.split(".", 1)[1]: v for k, v in block5.items()},
                                    strict=True)


def _hed_blocks(hed_state: dict[str, torch.Tensor], blocks: range | list[int]
                ) -> dict[str, torch.Tensor]:
    """HED's ``features.blocks.{i}.*`` tensors for ``i`` in ``blocks``, as ``{i}.*``."""
    prefix = "features.blocks."
    return {k[len(prefix):]: v for k, v in hed_state.items()
            if k.startswith(prefix) and int(k.split(".")[2]) in blocks}
