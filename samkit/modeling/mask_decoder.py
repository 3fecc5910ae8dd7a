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
import torch.nn.functional as F
from torch import nn

from samkit.modeling.common import MLP, LayerNorm2d
from samkit.modeling.kernels import eager_on_cpu, linear
from samkit.modeling.shared_image import ImageCache, two_way_shared_image
from samkit.modeling.transformer import TwoWayTransformer


# Image tokens upscaled per step in predict_masks: 512 of SAM's 4096 keeps glibc malloc from
# returning and page-faulting the temporaries per step (timing SamPredictor.decode on 64 boxes
# under malloc defaults: about 1.6 s in one step, 1.0-1.2 s in steps of 512).
_TOKENS_PER_STEP = 512


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
        selected = slice(1, None) if multimask_output else slice(0, 1)
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
            image_cache, selected,
        )
        return masks, iou_pred[:, selected]

    def image_cache(
        self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense_prompt: torch.Tensor
    ) -> ImageCache:
        """Prompt-independent work for one image (``1 x C x H x W``) under a dense prompt
        shared by all its prompts (the "no mask" embedding): create once per image, pass to
        :meth:`forward` with each prompt batch; it fills on first use."""
        src = (image_embeddings + dense_prompt[:1]).flatten(2).transpose(1, 2)
        return ImageCache(src, image_pe.flatten(2).transpose(1, 2))

    def fill_image_cache(self, cache: ImageCache, image_pe: torch.Tensor) -> ImageCache:
        """Compute all of ``cache``'s products now rather than on the first prompt, by decoding
        one dummy token (its output is dropped): the ONNX export's image-side graph."""
        tokens = cache.zeros.new_zeros(1, 1, self.transformer_dim)
        self.predict_masks(None, image_pe, tokens, None, cache, slice(0, 1))
        return cache

    def predict_masks(
        self,
        image_embeddings: torch.Tensor | None,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor | None,
        image_cache: ImageCache | None = None,
        mask_tokens: slice = slice(None),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The masks of the ``mask_tokens`` (default: all ``num_mask_tokens``) and all IoU
        scores (see :meth:`forward`; with ``image_cache``, ``image_embeddings`` and the dense
        prompt are not read and may be None)."""
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat(
            [output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse_prompt_embeddings], dim=1
        )
        conv_weight, conv_bias = _patch_linear(self.output_upscaling[0])
        if image_cache is not None:
            hs, image = two_way_shared_image(self.transformer, image_cache, tokens)
            image.stage = "upscale"
            patches = image.project("conv", conv_weight.T, conv_bias, with_pe=False)
        else:
            assert image_embeddings is not None and dense_prompt_embeddings is not None
            # With no mask prompt the dense embedding is one vector broadcast (stride 0) over
            # the batch, so the image side is the same for every prompt: keep it at batch 1
            # and let attention broadcast it.
            if dense_prompt_embeddings.shape[0] > 1 and dense_prompt_embeddings.stride(0) == 0:
                dense_prompt_embeddings = dense_prompt_embeddings[:1]
            src = image_embeddings + dense_prompt_embeddings
            hs, src = self.transformer(src, image_pe, tokens)
            patches = linear(src, conv_weight, conv_bias)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        mlps = list(enumerate(self.output_hypernetworks_mlps))[mask_tokens]
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in mlps], dim=1)
        h, w = image_pe.shape[-2:]
        masks = patches.new_empty(batch, hyper_in.shape[1], h * w * 16)
        # On the CPU a slice of the image at a time: the upscaled pixels (32 floats each) never
        # exist for the whole image, so the temporaries stay small and cache-resident. Graphs
        # (export, compile) and GPUs take the whole image in one step.
        step = _TOKENS_PER_STEP if eager_on_cpu(patches) else h * w
        for start in range(0, h * w, step):
            pixels = self._upscale_patches(patches[:, start : start + step])
            masks[..., start * 16 : (start + step) * 16] = hyper_in @ pixels.transpose(1, 2)
        return _patches_to_image(masks, h, w), self.iou_prediction_head(iou_token_out)

    def _upscale_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """The rest of ``output_upscaling`` after its first transposed conv, channels last.

        Args:
            patches: ``B x N x (4 * C')``, the first conv's 2 x 2 output patch of each of the
                ``N`` image tokens (sub-pixel major, see :func:`_patch_linear`).

        Returns:
            ``B x (N * 16) x C''``: each token's 4 x 4 output pixels, ordered (token, first
            conv's sub-pixel, second conv's sub-pixel). A 2 x 2 / stride 2 transposed conv
            maps every pixel to its own patch, so in this layout both convs are plain matrix
            products and the LayerNorm runs over a contiguous last axis, with no permutes.
        """
        _, norm, act1, conv, act2 = self.output_upscaling
        b, n, _ = patches.shape
        x = patches.reshape(b, n * 4, -1)
        x = act1(F.layer_norm(x, norm.weight.shape, norm.weight, norm.bias, norm.eps))
        weight, bias = _patch_linear(conv)
        x = act2(linear(x, weight, bias))
        return x.view(b, n * 16, -1)


def _patch_linear(conv: nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2 x 2 / stride 2 transposed conv as ``linear(x, weight, bias)`` on channels-last
    pixels: ``weight`` ``(4 * C_out) x C_in`` and ``bias`` ``4 * C_out``, output index
    ``(2 * dy + dx) * C_out + c`` for the output pixel ``(2y + dy, 2x + dx)``."""
    assert conv.kernel_size == conv.stride == (2, 2) and conv.padding == (0, 0)
    c_in, c_out = conv.weight.shape[:2]
    return conv.weight.permute(2, 3, 1, 0).reshape(4 * c_out, c_in), conv.bias.repeat(4)


def _patches_to_image(masks: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``B x M x (h * w * 16)`` in the order of :meth:`MaskDecoder._upscale_patches` ->
    ``B x M x 4h x 4w``: pixel (y, x) of token (i, j) is (4i + 2 dy1 + dy2, 4j + 2 dx1 + dx2)."""
    b, m, _ = masks.shape
    grid = masks.view(b, m, h, w, 2, 2, 2, 2)  # i, j, dy1, dx1, dy2, dx2
    return grid.permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(b, m, 4 * h, 4 * w)
