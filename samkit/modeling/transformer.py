"""Two-way transformer of the mask decoder (paper §3 and Fig. 14).

Each layer: (1) self-attention over the prompt/output tokens, (2) tokens attend to the image,
(3) MLP on the tokens, (4) the image attends to the tokens. Cross-attention works in a
channel-downsampled space (256 -> 128) to stay cheap on the 4096 image tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from samkit.modeling.common import Linear, MLPBlock


class TwoWayTransformer(nn.Module):
    """Stack of :class:`TwoWayAttentionBlock` plus a final token-to-image attention."""

    def __init__(
        self,
        depth: int = 2,
        embedding_dim: int = 256,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim,
                num_heads,
                mlp_dim,
                attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        point_embedding: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The image side may have batch 1 while the tokens have batch B (one image, many
        prompts): attention broadcasts. (For many prompts on one image,
        ``shared_image.two_way_shared_image`` computes the same with the image-sized work
        shared.)

        Args:
            image_embedding: ``B x C x H x W`` or ``1 x C x H x W``.
            image_pe: positional encoding, ``B x C x H x W`` or ``1 x C x H x W``.
            point_embedding: ``B x N x C`` output + prompt tokens (also their PE).

        Returns:
            tokens ``B x N x C`` and image tokens ``B x HW x C``.
        """
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        attn_out = self.final_attn_token_to_image(
            q=queries + point_embedding, k=keys + key_pe, v=keys
        )
        return self.norm_final_attn(queries + attn_out), keys


class TwoWayAttentionBlock(nn.Module):
    """Sparse self-attn, sparse->dense cross-attn, MLP, dense->sparse cross-attn."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        # The first layer's queries *are* the prompt embeddings, so adding the PE again
        # would double-count it.
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k = keys + key_pe
        to_image = self.cross_attn_token_to_image
        image_k, image_v = to_image.k_proj(k), to_image.v_proj(keys)
        queries = self.update_tokens(
            queries, query_pe, lambda q: to_image.attend(q, image_k, image_v)
        )
        to_token = self.cross_attn_image_to_token
        attn_out = to_token.attend(to_token.q_proj(k), *self.token_keys_values(queries, query_pe))
        return queries, self.norm4(keys + attn_out)

    def update_tokens(self, queries: torch.Tensor, query_pe: torch.Tensor,
                      attend_image: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Steps (1)-(3) on the tokens; ``attend_image(q)`` is step (2)'s attention of the
        projected token queries over the image tokens."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)
        to_image = self.cross_attn_token_to_image
        q = to_image.q_proj(queries + query_pe)
        queries = self.norm2(queries + attend_image(q))
        return self.norm3(queries + self.mlp(queries))

    def token_keys_values(self, queries: torch.Tensor,
                          query_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected keys and values of the tokens for step (4)."""
        to_token = self.cross_attn_image_to_token
        return to_token.k_proj(queries + query_pe), to_token.v_proj(queries)


class Attention(nn.Module):
    """Multi-head attention whose q/k/v projections may shrink the channel dimension."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.num_heads = num_heads
        internal_dim = embedding_dim // downsample_rate
        if internal_dim % num_heads:
            raise ValueError("num_heads must divide embedding_dim / downsample_rate")
        self.q_proj = Linear(embedding_dim, internal_dim)
        self.k_proj = Linear(embedding_dim, internal_dim)
        self.v_proj = Linear(embedding_dim, internal_dim)
        self.out_proj = Linear(internal_dim, embedding_dim)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q: B x Nq x C``, ``k, v: B x Nk x C`` -> ``B x Nq x C`` (batch dims broadcast)."""
        return self.attend(self.q_proj(q), self.k_proj(k), self.v_proj(v))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention on already projected ``q, k, v`` (``B x N x internal_dim``), so callers
        can reuse projections that do not change between calls."""
        q, k, v = self.split_heads(q), self.split_heads(k), self.split_heads(v)
        out = F.scaled_dot_product_attention(q, k, v)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))
