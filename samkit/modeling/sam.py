"""The Segment Anything model: image encoder + prompt encoder + mask decoder (paper Fig. 4)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from samkit.modeling.mask_decoder import MaskDecoder
from samkit.modeling.prompt_encoder import PromptEncoder
from samkit.modeling.resample import apply_separable, postprocess_operators
from samkit.modeling.text_prompt import TextPrompt

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class Sam(nn.Module):
    """SAM. The state dict layout is the official one, so official checkpoints load unchanged.

    For interactive use prefer :class:`samkit.SamPredictor`, which embeds an image once and
    answers many prompts. ``forward`` keeps the official batched-input API.
    """

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: Sequence[float] = PIXEL_MEAN,
        pixel_std: Sequence[float] = PIXEL_STD,
        text_prompt: TextPrompt | None = None,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        # The optional text slot (paper §7.5); None keeps the official state dict and outputs.
        self.text_prompt = text_prompt
        # Not persistent: official checkpoints do not contain them.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def image_size(self) -> int:
        """Side of the square, padded encoder input (1024 for the official models)."""
        return int(self.image_encoder.img_size)

    def attach_text_prompt(self, clip_dim: int, clip_name: str = "") -> TextPrompt:
        """Give the model a (freshly initialised) text slot for ``clip_dim``-d CLIP embeddings."""
        self.text_prompt = TextPrompt(clip_dim, self.prompt_encoder.embed_dim, clip_name).to(
            self.device)
        return self.text_prompt

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``... x 3 x h x w`` pixels (0..255) minus the pixel mean, over the pixel std."""
        return (x - self.pixel_mean) / self.pixel_std

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``... x 3 x h x w`` pixels (0..255) and zero-pad to ``image_size``."""
        x = self.normalize(x)
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.image_size - w, 0, self.image_size - h))

    def postprocess_masks(
        self,
        masks: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
        threshold: float | None = None,
    ) -> torch.Tensor:
        """Low-res logits ``B x M x h x w`` -> logits at the original image size, or with
        ``threshold`` the boolean masks ``logits > threshold`` (no float full-size tensor).

        The official model upscales to the padded input, drops the padding, then resizes to
        the original size: two bilinear steps, both linear and separable. Here they are folded
        into one row operator and one column operator (``rows @ masks @ cols``), which gives
        the same values without the ``image_size``-square intermediate.
        """
        rows, cols = postprocess_operators(
            masks.shape[-2:], self.image_size, input_size, original_size, masks.device
        )
        return apply_separable(masks, rows, cols, threshold)

    def forward(
        self, batched_input: list[dict[str, Any]], multimask_output: bool
    ) -> list[dict[str, torch.Tensor]]:
        """Official end-to-end API: images and their prompts in, masks out.

        Each dict has ``image`` (3xHxW, already resized so the long side is ``image_size``),
        ``original_size`` (H, W) and optionally ``point_coords`` (BxNx2), ``point_labels``
        (BxN), ``boxes`` (Bx4), ``mask_inputs`` (Bx1x256x256) in the resized frame.
        Returns per image ``masks`` (bool, BxMxHxW), ``iou_predictions`` and
        ``low_res_logits``. Gradients flow (wrap in ``torch.inference_mode`` to serve).
        """
        images = torch.stack([self.preprocess(rec["image"]) for rec in batched_input])
        embeddings = self.image_encoder(images)
        image_pe = self.prompt_encoder.get_dense_pe()
        outputs = []
        for rec, embedding in zip(batched_input, embeddings):
            points = (rec["point_coords"], rec["point_labels"]) if "point_coords" in rec else None
            sparse, dense = self.prompt_encoder(
                points=points, boxes=rec.get("boxes"), masks=rec.get("mask_inputs")
            )
            low_res, iou = self.mask_decoder(
                embedding.unsqueeze(0), image_pe, sparse, dense, multimask_output
            )
            masks = self.postprocess_masks(
                low_res, tuple(rec["image"].shape[-2:]), tuple(rec["original_size"]),
                self.mask_threshold,
            )
            outputs.append(
                {
                    "masks": masks,
                    "iou_predictions": iou,
                    "low_res_logits": low_res,
                }
            )
        return outputs
