"""Mask decoder (paper §3, "Mask decoder" and App. A).

Learned output tokens (one IoU token + ``num_multimask_outputs + 1`` mask tokens) are
concatenated with the prompt tokens and run through the two-way transformer. The image side
is upscaled 4x by two transposed convs; each mask token goes through its own hypernetwork MLP
to give dynamic weights that are dotted with the upscaled embedding. The IoU head predicts
each mask's quality. Token 0 is the single-mask output used for unambiguous (multi-)prompts;
tokens 1..3 are the three "ambiguity" masks for a single point or box.
"""

from __future__ import annotations

import torch
from torch import nn

from samkit.modeling.common import MLP, LayerNorm2d
from samkit.modeling.shared_image import ImageCache, two_way_shared_image, upscale_shared_image
from samkit.modeling.transformer import TwoWayTransformer


class MaskDecoder(nn.Module):
    """Predicts mask logits at ``4 x`` the embedding size and their IoU scores."""

    def __init__(
        self,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        image_cache: ImageCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            image_embeddings: ``1 x C x H x W`` (shared by every prompt) or ``B x C x H x W``
                (one per prompt, e.g. in training).
            image_pe: ``1 x C x H x W``.
            sparse_prompt_embeddings: ``B x N x C``.
            dense_prompt_embeddings: ``B x C x H x W``.
            multimask_output: return the 3 ambiguity masks (tokens 1..3) instead of token 0.
            image_cache: from :meth:`image_cache` for this image and the shared "no mask"
                dense prompt: the prompts then share all image-sized work (same outputs up to
                float rounding; ``image_embeddings`` and the dense prompt are not read again).

        Returns:
            mask logits ``B x M x 4H x 4W`` and IoU predictions ``B x M``, M = 3 or 1.
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
            image_cache,
        )
        selected = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, selected], iou_pred[:, selected]

    def image_cache(
        self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense_prompt: torch.Tensor
    ) -> ImageCache:
        """Prompt-independent work for one image (``1 x C x H x W``) under a dense prompt
        shared by all its prompts (the "no mask" embedding): create once per image, pass to
        :meth:`forward` with each prompt batch; it fills on first use."""
        src = (image_embeddings + dense_prompt[:1]).flatten(2).transpose(1, 2)
        return ImageCache(src, image_pe.flatten(2).transpose(1, 2))

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        image_cache: ImageCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``num_mask_tokens`` masks and IoU scores (see :meth:`forward`)."""
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat(
            [output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse_prompt_embeddings], dim=1
        )
        if image_cache is not None:
            hs, image = two_way_shared_image(self.transformer, image_cache, tokens)
            upscaled = upscale_shared_image(self.output_upscaling, image, image_pe.shape[-2:])
        else:
            # With no mask prompt the dense embedding is one vector broadcast (stride 0) over
            # the batch, so the image side is the same for every prompt: keep it at batch 1
            # and let attention broadcast it.
            if dense_prompt_embeddings.shape[0] > 1 and dense_prompt_embeddings.stride(0) == 0:
                dense_prompt_embeddings = dense_prompt_embeddings[:1]
            src = image_embeddings + dense_prompt_embeddings
            _, c, h, w = src.shape
            hs, src = self.transformer(src, image_pe, tokens)
            upscaled = self.output_upscaling(src.transpose(1, 2).reshape(-1, c, h, w))
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
            dim=1,
        )
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        return masks, self.iou_prediction_head(iou_token_out)
