"""TinyViT-5M image encoder as used by MobileSAM (model type ``vit_t``).

A hierarchical conv/attention backbone distilled from SAM's ViT-H: a stride-4 conv stem, one
stage of MBConv blocks, then three stages of windowed-attention blocks with learned attention
biases, joined by conv patch-merging layers, and SAM's conv neck. Parameter and buffer names
follow MobileSAM's ``mobile_sam.pt`` so its weights load with ``image_encoder.`` stripped.

The stage resolutions for ``img_size = S`` are S/4, S/8, S/16, S/16: MobileSAM keeps the last
merge at stride 1 so the output matches SAM's ``256 x S/16 x S/16`` image embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from samkit.modeling.common import DropPath, LayerNorm2d, Linear
from samkit.modeling.kernels import linear_gelu

# The unused ImageNet classifier is kept only so the checkpoint's keys load strictly.
_IMAGENET_CLASSES = 1000


class Conv2dBN(nn.Sequential):
    """Bias-free ``Conv2d`` (child ``c``) followed by ``BatchNorm2d`` (child ``bn``).

    ``B x in x H x W -> B x out x H' x W'``. ``bn_weight_init=0`` makes a residual branch start
    as the identity.
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.c = nn.Conv2d(
            in_chans, out_chans, kernel_size, stride, padding, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)


class PatchEmbed(nn.Module):
    """Conv stem: two stride-2 3x3 convs, ``B x in x S x S -> B x C x S/4 x S/4``."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        # Indices 0/2 (GELU at 1) are what the checkpoint names them.
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, embed_dim // 2, 3, stride=2, padding=1),
            nn.GELU(),
            Conv2dBN(embed_dim // 2, embed_dim, 3, stride=2, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual (1x1 expand, 3x3 depthwise, 1x1 project); ``B x C x H x W`` in and out."""

    def __init__(self, dim: int, expand_ratio: float, drop_path: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden)
        self.act1 = nn.GELU()
        self.conv2 = Conv2dBN(hidden, hidden, 3, padding=1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = Conv2dBN(hidden, dim, bn_weight_init=0.0)
        self.act3 = nn.GELU()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act2(self.conv2(self.act1(self.conv1(x))))
        y = self.drop_path(self.conv3(y))
        # Unlike most inverted residuals, TinyViT activates after the skip connection.
        return self.act3(x + y)


class PatchMerging(nn.Module):
    """Conv downsample ``B x C x H x W -> B x C' x ceil(H/s) x ceil(W/s)`` (``s`` = 1 or 2)."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.act = nn.GELU()
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride=stride, padding=1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        return self.conv3(x)


class ConvLayer(nn.Module):
    """Stage 0: ``depth`` MBConv blocks, then an optional merge; ``B x C x H x W`` in and out."""

    def __init__(
        self,
        dim: int,
        depth: int,
        drop_path: Sequence[float],
        out_dim: int | None,
        merge_stride: int = 2,
        expand_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio, drop_path[i]) for i in range(depth))
        self.downsample = PatchMerging(dim, out_dim, merge_stride) if out_dim is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class Mlp(nn.Module):
    """Pre-norm feed-forward ``norm -> fc1 -> GELU -> fc2``; ``... x C`` in and out."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = Linear(dim, hidden_dim)
        self.fc2 = Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the GELU runs inside the fc1 product at inference (see linear_gelu)
        return self.fc2(linear_gelu(self.norm(x), self.fc1.weight, self.fc1.bias))


def attention_bias_index(height: int, width: int) -> torch.Tensor:
    """``(h*w) x (h*w)`` table mapping a query/key pair to its ``(|dy|, |dx|)`` bias slot.

    TinyViT numbers the offsets in the order first met while scanning query points, then key
    points, row-major. The first query, (0, 0), already meets every offset in row-major order,
    so offset ``(dy, dx)`` gets slot ``dy * width + dx`` and the table has ``h*w`` slots.
    """
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = (ys[:, None] - ys[None, :]).abs()
    dx = (xs[:, None] - xs[None, :]).abs()
    return dy * width + dx


class Attention(nn.Module):
    """Pre-norm multi-head self-attention over one window with a learned per-head offset bias.

    ``B x N x C -> B x N x C`` with ``N = window_size**2``.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        # Derived from window_size, so it is rebuilt rather than stored in checkpoints.
        self.register_buffer(
            "attention_bias_idxs", attention_bias_index(window_size, window_size), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # The checkpoint lays qkv out head-major: each head's [q | k | v] is contiguous.
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.transpose(1, 2).chunk(3, dim=-1)  # each B x heads x N x head_dim
        bias = self.attention_biases[:, self.attention_bias_idxs]  # heads x N x N
        # A float mask is added to the scaled scores: softmax(q k^T * scale + bias) v.
        # As 1 x heads x N x N: a 3-D mask sends SDPA to its slow "math" path (4x slower).
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias[None].to(q.dtype), scale=self.scale
        )
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class TinyViTBlock(nn.Module):
    """Window attention, a 3x3 depthwise conv, then an MLP; ``B x H x W x C`` in and out.

    The feature map is zero-padded to a multiple of the window; the padded tokens are normed and
    attended to like real ones (as in MobileSAM), and cropped off afterwards.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        drop_path: float,
        local_conv_size: int = 3,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.drop_path = DropPath(drop_path)
        self.attn = Attention(dim, num_heads, window_size)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # Mixes information across window borders, which attention alone never does.
        self.local_conv = Conv2dBN(
            dim, dim, local_conv_size, padding=local_conv_size // 2, groups=dim
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws = self.window_size
        pad_b, pad_r = -h % ws, -w % ws
        y = F.pad(x, (0, 0, 0, pad_r, 0, pad_b)) if pad_b or pad_r else x
        hp, wp = h + pad_b, w + pad_r
        nh, nw = hp // ws, wp // ws
        windows = y.reshape(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        windows = self.attn(windows)
        y = windows.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, hp, wp, c)
        x = x + self.drop_path(y[:, :h, :w])

        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.drop_path(self.mlp(x))


class BasicLayer(nn.Module):
    """Stages 1-3: ``depth`` TinyViT blocks, then an optional merge; ``B x C x H x W`` in/out."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        drop_path: Sequence[float],
        out_dim: int | None,
        merge_stride: int = 2,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, num_heads, window_size, mlp_ratio, drop_path[i]) for i in range(depth)
        )
        self.downsample = PatchMerging(dim, out_dim, merge_stride) if out_dim is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # attention and MLP want channels last
        for blk in self.blocks:
            x = blk(x)
        x = x.permute(0, 3, 1, 2)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """MobileSAM image encoder: ``B x in_chans x S x S -> B x out_chans x S/16 x S/16``.

    ``S = img_size`` must be a multiple of 64. ``norm_head``/``head`` are TinyViT's ImageNet
    classifier: never used in ``forward`` but kept so ``mobile_sam.pt`` loads strictly.
    """

    def __init__(
        self,
        img_size: int = 1024,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        if img_size <= 0 or img_size % 64:
            raise ValueError(f"img_size must be a positive multiple of 64, got {img_size}")
        num_stages = len(depths)
        if not (len(embed_dims) == len(num_heads) == len(window_sizes) == num_stages):
            raise ValueError("embed_dims, depths, num_heads and window_sizes differ in length")
        self.img_size = img_size

        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        # Stochastic depth grows linearly over all blocks, MBConv blocks included.
        n_blocks = sum(depths)
        dpr = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        self.layers = nn.ModuleList()
        for i in range(num_stages):
            rates = dpr[sum(depths[:i]) : sum(depths[: i + 1])]
            out_dim = embed_dims[i + 1] if i + 1 < num_stages else None
            # The merge into the last stage keeps the resolution, so the embedding is S/16
            # (MobileSAM keys this on the widths of the released variants; same result).
            merge_stride = 1 if i + 2 == num_stages else 2
            if i == 0:
                layer: nn.Module = ConvLayer(embed_dims[0], depths[0], rates, out_dim, merge_stride)
            else:
                layer = BasicLayer(
                    embed_dims[i],
                    depths[i],
                    num_heads[i],
                    window_sizes[i],
                    mlp_ratio,
                    rates,
                    out_dim,
                    merge_stride,
                )
            self.layers.append(layer)

        self.norm_head = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], _IMAGENET_CLASSES)
        self.apply(_init_weights)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"expected a {self.img_size}x{self.img_size} input, got {tuple(x.shape[-2:])}"
            )
        # Channels-last from the start: oneDNN's convs (the stem, MBConv, merges) run about
        # twice as fast on it, and the attention stages want channels last anyway.
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        for layer in self.layers:
            x = layer(x)
        return self.neck(x).contiguous()  # the usual layout for the decoder and users


def _init_weights(m: nn.Module) -> None:
    """TinyViT's init: truncated-normal linears, unit LayerNorms (convs keep PyTorch defaults)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
