"""ViT image encoder (paper §3, "Image encoder"): a ViTDet-style MAE ViT.

Windowed attention (14x14) in most blocks, global attention in four, decomposed relative
position bias in every block, an absolute position embedding, and a conv neck that maps the
``embed_dim`` tokens to a 256-channel ``image_size/16`` square embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from samkit.modeling.common import DropPath, LayerNorm2d, Linear, MLPBlock
from samkit.modeling.kernels import eager_on_cpu, linear


class ImageEncoderViT(nn.Module):
    """ViT backbone + neck.

    Input ``B x 3 x S x S`` (normalised, padded to ``S = img_size``);
    output ``B x out_chans x S/patch x S/patch``.
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        # Learned absolute position embedding at the pre-training grid size.
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
                drop_path=drop_path_rate * i / max(depth - 1, 1),
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        # Trade compute for memory when training large encoders (set by the trainer).
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed  # B x H x W x C
        for blk in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` conv; ``B x 3 x S x S -> B x S/p x S/p x C``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Block(nn.Module):
    """Pre-norm transformer block; attention is windowed when ``window_size > 0``.

    Works on ``B x H x W x C`` tokens.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        window_size: int,
        input_size: tuple[int, int],
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        attn_size = (window_size, window_size) if window_size > 0 else input_size
        self.attn = Attention(dim, num_heads=num_heads, input_size=attn_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.window_size = window_size
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1], x.shape[2]
        y = self.norm1(x)
        if self.window_size > 0:
            # Under autocast the qkv product takes its input in the low precision anyway:
            # casting first moves half the bytes through the partition copies.
            if torch.is_autocast_enabled(y.device.type):
                y = y.to(torch.get_autocast_dtype(y.device.type))
            y, padded_hw = window_partition(y, self.window_size)
            y = self.attn(y)
            y = window_unpartition(y, self.window_size, padded_hw, (h, w))
        else:
            y = self.attn(y)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Attention(nn.Module):
    """Multi-head self-attention with decomposed relative position bias (MViTv2).

    The bias ``rel_h[q, kh] + rel_w[q, kw]`` is added to the attention logits; here it is
    passed to ``scaled_dot_product_attention`` as an additive mask so the fused kernel does the
    softmax and the value product (no explicit ``N x N`` logits tensor on the Python side).
    """

    def __init__(self, dim: int, num_heads: int, input_size: tuple[int, int]) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = Linear(dim, dim * 3)
        self.proj = Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x H x W x C -> B x H x W x C``."""
        b, h, w, c = x.shape
        # B x N x 3 x heads x d -> 3 x B x heads x N x d
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if h * w >= _BLOCKED_MIN_TOKENS and _blocked_attention_applies(q):
            out = blocked_rel_pos_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, (h, w))
        else:
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2)
        return self.proj(out.reshape(b, h, w, c))


# Global attention (64 x 64 tokens for SAM) takes the blocked path below; windows keep SDPA.
_BLOCKED_MIN_TOKENS = 1024
_QUERY_BLOCK = 512


def _blocked_attention_applies(q: torch.Tensor) -> bool:
    """Eager inference on the CPU in fp32 or bf16: the blocked path has no autograd, and its
    speed comes from oneDNN (see :func:`samkit.modeling.kernels.linear`)."""
    return (eager_on_cpu(q) and q.dtype in (torch.float32, torch.bfloat16)
            and not torch.is_grad_enabled())


def blocked_rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: tuple[int, int],
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + rel-pos bias) v`` one head and ``_QUERY_BLOCK`` queries at
    a time; ``q, k, v``: ``B x heads x N x d`` -> ``B x N x heads x d``.

    Same values as :func:`decomposed_rel_pos_bias` + SDPA, but the ``heads x N x N`` bias
    (805 MB for vit_b) is never built: each block of scores gets its two bias terms added in
    place, and both products go through :func:`samkit.modeling.kernels.linear` (oneDNN: ~2x
    the MKL products inside the fused SDPA kernel on this AMD CPU).
    """
    b, heads, n, d = q.shape
    qh, qw = size
    rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, size, size)
    rel_h, rel_w = rel_h.view(b, heads, n, qh, 1), rel_w.view(b, heads, n, 1, qw)
    out = q.new_empty(b, n, heads, d)
    for i in range(b):
        for j in range(heads):
            # Contiguous once per head (a strided weight would be copied for every block).
            queries, keys = q[i, j].contiguous(), k[i, j] * d**-0.5
            values = v[i, j].T.contiguous()
            for start in range(0, n, _QUERY_BLOCK):
                stop = min(start + _QUERY_BLOCK, n)
                scores = linear(queries[start:stop], keys).view(-1, qh, qw)
                scores.add_(rel_h[i, j, start:stop]).add_(rel_w[i, j, start:stop])
                probs = torch.softmax(scores.view(-1, n), dim=-1)
                out[i, start:stop, j] = linear(probs, values)
    return out


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``B x H x W x C -> (B*nW) x window x window x C``, zero-padding H, W to a multiple."""
    b, h, w, c = x.shape
    pad_h = (window - h % window) % window
    pad_w = (window - w % window) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c)
    return windows, (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`, dropping the padding."""
    hp, wp = padded_hw
    h, w = hw
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.view(b, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    if hp > h or wp > w:
        x = x[:, :h, :w, :].contiguous()
    return x


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative position embeddings for every (query, key) pair along one axis.

    ``rel_pos`` is ``(2*L-1) x d``; it is linearly resized when the grid differs from the one
    it was trained for. Returns ``q_size x k_size x d``.
    """
    max_rel_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_rel_dist:
        rel_pos = F.interpolate(
            rel_pos.T.unsqueeze(0), size=max_rel_dist, mode="linear"
        ).squeeze(0).T
    # When q and k have different lengths the shorter one is stretched to the longer.
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]


def rel_pos_terms(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: tuple[int, int],
    k_size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of the decomposed bias, from unscaled queries ``B x heads x (qh*qw) x d``:
    ``rel_h`` ``B x heads x qh x qw x kh`` and ``rel_w`` ``... x kw``, contiguous."""
    qh, qw = q_size
    kh, kw = k_size
    rh = get_rel_pos(qh, kh, rel_pos_h).to(q.dtype)
    rw = get_rel_pos(qw, kw, rel_pos_w).to(q.dtype)
    b, n_heads, _, d = q.shape
    r_q = q.reshape(b, n_heads, qh, qw, d)
    # Contiguous, also for strided queries (a view of the qkv output): a sum of permuted terms
    # would inherit their layout, and reshaping the full bias would copy all of it.
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh).contiguous()
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw).contiguous()
    return rel_h, rel_w


def decomposed_rel_pos_bias(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: tuple[int, int],
    k_size: tuple[int, int],
) -> torch.Tensor:
    """Additive attention bias ``B x heads x (qh*qw) x (kh*kw)`` from unscaled queries.

    ``q`` is ``B x heads x (qh*qw) x d``.
    """
    rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, q_size, k_size)
    b, n_heads = q.shape[:2]
    kh, kw = k_size
    if q.dtype == torch.bfloat16 and eager_on_cpu(q):
        # bf16 broadcast adds with a last dimension of kw (14) run ~10x slower on the CPU
        # than this product with one-hot key positions: the same sums, each rounded once.
        terms = torch.cat([rel_h, rel_w], dim=-1).view(b, n_heads, -1, kh + kw)
        return terms @ _key_positions(kh, kw, q.dtype, q.device)
    bias = rel_h[..., :, None] + rel_w[..., None, :]
    return bias.view(b, n_heads, q_size[0] * q_size[1], kh * kw)


def _key_positions(kh: int, kw: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(kh + kw) x (kh * kw)`` one-hot rows: key ``(i, j)`` has a 1 in row ``i`` and in row
    ``kh + j``, so ``[rel_h, rel_w] @ this`` is ``rel_h[..., i] + rel_w[..., j]``."""
    rows = torch.eye(kh, dtype=dtype, device=device)[:, :, None].expand(kh, kh, kw)
    cols = torch.eye(kw, dtype=dtype, device=device)[:, None, :].expand(kw, kh, kw)
    return torch.cat([rows.reshape(kh, kh * kw), cols.reshape(kw, kh * kw)])
