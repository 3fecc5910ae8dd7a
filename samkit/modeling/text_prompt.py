"""The text slot (paper §7.5, App. D.5): a CLIP embedding becomes one sparse prompt token.

At training time the embedding is CLIP's *image* embedding of a crop around the mask; at
inference it is CLIP's *text* embedding of a phrase. CLIP aligns the two, so a slot trained on
crops answers phrases. The projection is small (CLIP dim -> 256) and the only new weights; the
prompt encoder adds its output onto the "not a point" token (see ``PromptEncoder.forward``),
so a zero projection leaves every mask exactly as without text.
"""

from __future__ import annotations

import torch
from torch import nn


class TextPrompt(nn.Module):
    """``B x clip_dim`` (L2-normalised) CLIP embeddings -> ``B x embed_dim`` prompt tokens.

    ``clip_name`` (the CLIP the slot was trained with, e.g. ``openai/clip-vit-large-patch14-336``)
    is recorded in samkit checkpoints next to ``clip_dim``, so a mismatched CLIP is caught at
    load rather than giving silent nonsense.
    """

    def __init__(self, clip_dim: int, embed_dim: int, clip_name: str = "") -> None:
        super().__init__()
        self.clip_dim = clip_dim
        self.clip_name = clip_name
        # Two layers: CLIP's space is not SAM's token space; a GELU MLP maps between them
        # cheaply (clip_dim x 256 + 256 x 256 weights).
        self.proj = nn.Sequential(
            nn.Linear(clip_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim)
        )

    def forward(self, clip_embeddings: torch.Tensor) -> torch.Tensor:
        return self.proj(clip_embeddings)
