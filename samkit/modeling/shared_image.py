"""Many prompts on one image: the mask decoder's exact computation, re-associated so that
every image-sized matrix product is shared by all the prompts of that image.

In the two-way transformer the image tokens ``X`` (``N x C``, N = 64 * 64) start as the image
embedding ``E`` and change per prompt only by image-to-token attention outputs, which are low
rank: a layer adds ``A V W_o + b_o`` with ``A`` the ``N x (heads * T)`` attention probabilities
over the ``T`` prompt tokens. A LayerNorm scales each token by ``1/sigma`` and applies a fixed
linear map (centring, then ``gamma``). So after any number of layers

    X = a * (E H) + L R + c                                                       (1)

with ``a`` (``N x 1``) and ``L`` (``N x K``) per prompt, ``R`` (``K x C``) small per prompt, and
``H`` (``C x C``) and ``c`` (``C``) fixed by the weights. Any linear map ``M`` of ``X`` (attention
projections, the upscaler's first transposed conv) is then ``a * E (H M) + L (R M) + c M``:
the ``N x C x k`` product ``E (H M)`` depends on the image alone and is computed once per image
(:class:`ImageCache`); per prompt only ``N x K x k`` remains, with ``K = heads * T`` per layer
(56 for one point) instead of ``C = 256``. Token-to-image attention needs no image-sized
keys or values at all: its scores and weighted sums go through (1) term by term. The
LayerNorm statistics of (1) follow from the same shared products. Outputs equal the direct
computation up to float rounding (``tests/test_shared_image.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from samkit.modeling.transformer import Attention, TwoWayTransformer


class ImageCache:
    """Products of one image's tokens with weight-derived matrices, computed on first use and
    kept for every later prompt of the image (``src``, ``pe``: ``1 x N x C``).

    :meth:`from_products` rebuilds a full cache from :attr:`products` alone (how the ONNX
    prompt graph receives the image side, see :mod:`samkit.onnx.export`)."""

    def __init__(self, src: torch.Tensor, pe: torch.Tensor) -> None:
        self.src: torch.Tensor | None = src
        self.pe = pe
        self.zeros = src.new_zeros(src.shape[-1])  # a C-vector of the image's dtype and device
        self.products: dict[str, torch.Tensor] = {}

    @classmethod
    def from_products(cls, products: dict[str, torch.Tensor], channels: int) -> ImageCache:
        """A cache holding ``products`` only: every product a prompt needs must be there."""
        any_product = next(iter(products.values()))
        cache = cls(any_product.new_zeros(1, 1, channels), any_product.new_zeros(1, 1, channels))
        cache.src = None
        cache.products = dict(products)
        return cache

    def get(self, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``compute()``, run on the first call for ``key`` only."""
        if key not in self.products:
            if self.src is None:
                raise KeyError(f"image cache has no product {key!r} (and no image to compute it)")
            self.products[key] = compute()
        return self.products[key]


@dataclass
class CrossTerm:
    """A part ``Z W`` of ``L R`` in (1) with ``W`` weight-only: an attention output before its
    output projection, ``Z = s * sum_t P_t V_t`` per head. Its products with the shared
    ``E H`` (needed by the LayerNorm statistics) then come from the cache, and ``Z`` itself
    (``N x h*d`` per prompt) is never formed."""

    probs: torch.Tensor  # P: B x h x T x N
    values: torch.Tensor  # V: B x h x T x d
    weight: torch.Tensor  # W: (h * d) x C
    scale: torch.Tensor | None = None  # s: B x N x 1 (None: all ones)

    @classmethod
    def rank_one(cls, coeff: torch.Tensor, row: torch.Tensor) -> CrossTerm:
        """``coeff row`` for ``coeff`` ``B x N x 1`` and ``row`` ``1 x C``."""
        return cls(coeff.transpose(1, 2)[:, None], coeff.new_ones(1, 1, 1, 1), row)

    def cross_layout(self, cross: torch.Tensor) -> torch.Tensor:
        """``1 x N x (h*d)`` -> ``h x N x d``, the layout :meth:`image_dot` reads."""
        return _layout(cross, self.probs.shape[1])

    def image_dot(self, cross: torch.Tensor) -> torch.Tensor:
        """Per token ``<Z_n, cross_n>`` (``cross`` from :meth:`cross_layout`): ``B x N x 1``."""
        per_value = _per_head(self.values, cross.transpose(1, 2))
        dot = (self.probs * per_value).sum(dim=(1, 2)).unsqueeze(-1)
        return dot if self.scale is None else dot * self.scale

    def rescale(self, factor: torch.Tensor) -> None:
        """``Z *= factor`` (``B x N x 1``)."""
        self.scale = factor if self.scale is None else self.scale * factor


class ImageTokens:
    """The image tokens of a batch of prompts in the form (1); see the module docstring."""

    def __init__(self, cache: ImageCache) -> None:
        self.cache = cache
        self.scale: torch.Tensor | None = None  # a: B x N x 1 (None: all ones)
        self.lhs: torch.Tensor | None = None  # L: B x N x K
        self.rows: torch.Tensor | None = None  # R: B x K x C
        self.cross_terms: list[CrossTerm] = []  # L R = sum of Z W over these
        self.gammas: list[torch.Tensor] = []  # H = prod_i centre @ diag(gamma_i)
        self.bias = cache.zeros  # c: C
        self.stage = ""  # names the cached products of the current layer

    def _apply_h(self, matrix: torch.Tensor) -> torch.Tensor:
        """``H @ matrix`` without forming ``H``: centre and scale right to left."""
        for gamma in reversed(self.gammas):
            matrix = gamma[:, None] * matrix
            matrix = matrix - matrix.mean(dim=0, keepdim=True)
        return matrix

    def _parts(self, key: str, weight: torch.Tensor, bias: torch.Tensor, with_pe: bool,
               heads: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``E (H W)`` and the prompt-independent rest ``(pe) W + c W + bias`` for ``X @ W``
        (cached: ``c`` is weight-only too): ``1 x N x k`` each, or with ``heads`` split per
        head as contiguous ``heads x N x (k / heads)``, the layout the attention reads."""
        cache, name = self.cache, f"{self.stage}.{key}"

        def image() -> torch.Tensor:
            return _layout(cache.src @ self._apply_h(weight), heads)

        def constant() -> torch.Tensor:
            rest = (self.bias @ weight + bias).expand(cache.pe.shape[1], -1)[None]
            return _layout(rest + cache.pe @ weight if with_pe else rest, heads)

        return cache.get(name, image), cache.get(f"{name}.const", constant)

    def _unscaled(self, key: str, image: torch.Tensor, const: torch.Tensor) -> torch.Tensor:
        """``image + const``, cached: all of ``X @ W`` while no prompt has touched ``X``."""
        return self.cache.get(f"{self.stage}.{key}.sum", lambda: image + const)

    def project(self, key: str, weight: torch.Tensor, bias: torch.Tensor,
                with_pe: bool) -> torch.Tensor:
        """``(X + pe) @ weight + bias`` or ``X @ weight + bias`` (``weight``: ``C x k``):
        ``B x N x k``."""
        image, const = self._parts(key, weight, bias, with_pe)
        if self.scale is None:
            out = self._unscaled(key, image, const)
        else:
            out = torch.addcmul(const, self.scale, image)
        if self.lhs is not None:
            out = torch.baddbmm(out, self.lhs, self.rows @ weight)
        return out

    def attend_tokens(self, attn: Attention, q: torch.Tensor) -> torch.Tensor:
        """``attn.attend(q, k, v)`` for projected token queries ``q`` (``B x T x D``) with
        ``k = attn.k_proj(X + pe)``, ``v = attn.v_proj(X)`` (``B x T x C``), without
        materialising ``k`` or ``v``: the scores and weighted sums go through (1) instead."""
        heads = attn.num_heads
        k_image, k_const = self._parts(
            "k", attn.k_proj.weight.T, attn.k_proj.bias, with_pe=True, heads=heads)
        v_image, v_const = self._parts(
            "v", attn.v_proj.weight.T, attn.v_proj.bias, with_pe=False, heads=heads)
        q = attn.split_heads(q)
        q = q * q.shape[-1] ** -0.5  # B x h x T x d
        if self.scale is None:
            scores = _per_head(q, self._unscaled("k", k_image, k_const).transpose(1, 2))
        else:
            scale = self.scale.transpose(1, 2)[:, None]  # B x 1 x 1 x N
            scores = torch.addcmul(_per_head(q, k_const.transpose(1, 2)),
                                   _per_head(q, k_image.transpose(1, 2)), scale)
        if self.lhs is not None:
            rows_k = attn.split_heads(self.rows @ attn.k_proj.weight.T)  # B x h x K x d
            scores = scores + _with_lhs(q @ rows_k.transpose(-1, -2), self.lhs.transpose(1, 2))
        probs = torch.softmax(scores, dim=-1)
        if self.scale is None:
            out = _per_head(probs, self._unscaled("v", v_image, v_const))
        else:
            out = _per_head(probs * scale, v_image) + _per_head(probs, v_const)
        if self.lhs is not None:
            rows_v = attn.split_heads(self.rows @ attn.v_proj.weight.T)
            out = out + _with_lhs(probs, self.lhs) @ rows_v
        b, _, t, _ = out.shape
        return attn.out_proj(out.transpose(1, 2).reshape(b, t, -1))

    def add_attention(self, attn: Attention, token_k: torch.Tensor,
                      token_v: torch.Tensor) -> None:
        """``X += attn.attend(attn.q_proj(X + pe), token_k, token_v)`` for projected token
        keys and values (``B x T x D``)."""
        heads = attn.num_heads
        k, v = attn.split_heads(token_k), attn.split_heads(token_v)  # B x h x T x d
        k = k * k.shape[-1] ** -0.5
        q_image, q_const = self._parts(
            "q", attn.q_proj.weight.T, attn.q_proj.bias, with_pe=True, heads=heads)
        # Scores as B x h x T x N: softmax over T on this layout is ~20x faster on CPU than
        # over a last dimension of T (= 7 for one point).
        if self.scale is None:
            scores = _per_head(k, self._unscaled("q", q_image, q_const).transpose(1, 2))
        else:
            scores = torch.addcmul(_per_head(k, q_const.transpose(1, 2)),
                                   _per_head(k, q_image.transpose(1, 2)),
                                   self.scale.transpose(1, 2)[:, None])
        if self.lhs is not None:
            rows_q = attn.split_heads(self.rows @ attn.q_proj.weight.T)  # B x h x K x d
            scores = scores + _with_lhs(k @ rows_q.transpose(-1, -2), self.lhs.transpose(1, 2))
        probs = torch.softmax(scores, dim=2)
        b, _, t, n = probs.shape
        out_weight = attn.out_proj.weight.T  # D x C
        per_head = out_weight.reshape(heads, -1, out_weight.shape[-1])  # h x d x C
        lhs = probs.permute(0, 3, 1, 2).reshape(b, n, heads * t)
        rows = torch.einsum("bhtd,hdc->bhtc", v, per_head).reshape(b, heads * t, -1)
        self._append(lhs, rows, CrossTerm(probs, v, out_weight))
        self.bias = self.bias + attn.out_proj.bias

    def _append(self, lhs: torch.Tensor, rows: torch.Tensor, term: CrossTerm) -> None:
        self.lhs = lhs if self.lhs is None else torch.cat([self.lhs, lhs], dim=2)
        self.rows = rows if self.rows is None else torch.cat([self.rows, rows], dim=1)
        self.cross_terms.append(term)

    def layer_norm(self, norm: nn.LayerNorm) -> None:
        """``X = norm(X)``: per-token statistics of (1), then the fixed map folded in."""
        assert self.lhs is not None and self.rows is not None  # after an attention
        c = self.bias.shape[0]
        bias_c = self.bias - self.bias.mean()
        cache = self.cache

        def centred_image() -> torch.Tensor:
            centring = torch.eye(c, dtype=bias_c.dtype, device=bias_c.device) - 1.0 / c
            return cache.src @ self._apply_h(centring)

        centred = cache.get(f"{self.stage}.centred", centred_image)
        centred_sq = self.cache.get(f"{self.stage}.centred_sq",
                                    lambda: (centred * centred).sum(-1, keepdim=True))
        scale = 1.0 if self.scale is None else self.scale
        # |X - mean(X)|^2 per token, expanded over the parts of (1).
        lhs, rows_c = self.lhs, self.rows - self.rows.mean(dim=-1, keepdim=True)
        sq = ((lhs @ (rows_c @ rows_c.transpose(1, 2))) * lhs).sum(-1, keepdim=True)
        sq = sq + 2 * lhs @ (rows_c @ bias_c)[..., None]
        # c is weight-only, so its product with the image side is shared too.
        centred_bias = self.cache.get(f"{self.stage}.centred_bias", lambda: centred @ bias_c)
        image_part = centred_sq * scale + 2 * centred_bias[..., None]
        for i, term in enumerate(self.cross_terms):
            weight_c = term.weight - term.weight.mean(dim=-1, keepdim=True)
            cross = self.cache.get(f"{self.stage}.cross{i}",  # E H C W^T
                                   lambda t=term, w=weight_c: t.cross_layout(centred @ w.T))
            image_part = image_part + 2 * term.image_dot(cross)
        sq = sq + scale * image_part + bias_c @ bias_c
        inv_std = torch.rsqrt(sq / c + norm.eps)

        gamma = norm.weight
        self.lhs = inv_std * lhs
        self.rows = rows_c * gamma
        for term in self.cross_terms:
            term.rescale(inv_std)
            term.weight = (term.weight - term.weight.mean(dim=-1, keepdim=True)) * gamma
        # The centred bias, now scaled per token, becomes a rank-1 term.
        bias_row = (bias_c * gamma)[None]
        self._append(inv_std, bias_row.expand(inv_std.shape[0], 1, c),
                     CrossTerm.rank_one(inv_std, bias_row))
        self.scale = inv_std if self.scale is None else inv_std * self.scale
        self.gammas.append(gamma)
        self.bias = norm.bias


def _layout(image: torch.Tensor, heads: int) -> torch.Tensor:
    """``1 x N x (h * d)`` -> contiguous ``h x N x d`` (unchanged for ``heads == 0``)."""
    if not heads:
        return image
    return image[0].view(image.shape[1], heads, -1).transpose(0, 1).contiguous()


def _per_head(small: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """``small[b, h] @ image[h]`` for ``small`` ``B x h x T x k`` and an image-side
    ``image`` ``h x k x m``: ``B x h x T x m``. One product per head over all ``B * T`` rows;
    the image side is only read (a broadcasting matmul would copy it for every prompt), and
    graphs get a plain MatMul (ONNX Einsum runs several times slower in onnxruntime)."""
    b, h, t, k = small.shape
    out = torch.matmul(small.transpose(0, 1).reshape(h, b * t, k), image)
    return out.view(h, b, t, -1).transpose(0, 1)


def _with_lhs(small: torch.Tensor, lhs: torch.Tensor) -> torch.Tensor:
    """``small[b] @ lhs[b]`` per head, for ``small`` ``B x h x T x k`` and a per-prompt
    ``lhs`` ``B x k x m``: ``B x h x T x m``."""
    b, h, t, k = small.shape
    return torch.matmul(small.reshape(b, h * t, k), lhs).view(b, h, t, -1)


def two_way_shared_image(
    transformer: TwoWayTransformer, cache: ImageCache, point_embedding: torch.Tensor
) -> tuple[torch.Tensor, ImageTokens]:
    """:meth:`TwoWayTransformer.forward` for ``B`` prompts of the cached image: tokens
    ``B x T x C`` and the image tokens in the form (1)."""
    image = ImageTokens(cache)
    queries, query_pe = point_embedding, point_embedding
    for i, layer in enumerate(transformer.layers):
        image.stage = f"layer{i}"
        queries = layer.update_tokens(
            queries, query_pe, partial(image.attend_tokens, layer.cross_attn_token_to_image)
        )
        image.add_attention(layer.cross_attn_image_to_token,
                            *layer.token_keys_values(queries, query_pe))
        image.layer_norm(layer.norm4)
    image.stage = "final"
    final = transformer.final_attn_token_to_image
    attn_out = image.attend_tokens(final, final.q_proj(queries + query_pe))
    return transformer.norm_final_attn(queries + attn_out), image

