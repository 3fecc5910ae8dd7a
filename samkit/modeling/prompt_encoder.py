"""Prompt encoder (paper §3, "Prompt encoder").

Sparse prompts (points, box corners, optional text tokens) become ``embed_dim`` tokens: a
random-Fourier positional encoding of the location plus a learned embedding for the prompt
kind. A dense mask prompt is downscaled by a small conv net; without one a learned "no mask"
embedding is broadcast over the image grid.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from samkit.modeling.common import LayerNorm2d

# Point labels understood by the prompt encoder.
LABEL_PAD = -1  # "not a point": padding so every prompt set in a batch has the same length
LABEL_BACKGROUND = 0
LABEL_FOREGROUND = 1
LABEL_BOX_TOP_LEFT = 2
LABEL_BOX_BOTTOM_RIGHT = 3


class PromptEncoder(nn.Module):
    """Encodes prompts for the mask decoder.

    Args:
        embed_dim: token width (256 for SAM).
        image_embedding_size: ``(H, W)`` of the image embedding (64x64 for 1024-px models).
        input_image_size: ``(H, W)`` of the padded encoder input (1024x1024).
        mask_in_chans: hidden channels of the mask downscaler (16 for SAM).
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int = 16,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # Index = label: 0 background point, 1 foreground point, 2/3 box corners.
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of every image-embedding cell: ``1 x C x H x W``."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """``B x N x 2`` pixel coords (input frame) + ``B x N`` labels -> ``B x N(+1) x C``.

        ``pad`` appends one "not a point" token; the official model was trained that way
        whenever no box accompanies the points. Labels of any other shape are refused: a
        ``B x 0`` or ``B x 1`` label tensor would broadcast over the tokens below and turn
        every point into padding without an error.
        """
        check_point_shapes(points, labels)
        points = points + 0.5  # centre of the pixel
        if pad:
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), LABEL_PAD)], dim=1)
        pe = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels[..., None]
        kind = (
            (labels == LABEL_BACKGROUND) * self.point_embeddings[0].weight
            + (labels == LABEL_FOREGROUND) * self.point_embeddings[1].weight
            + (labels == LABEL_PAD) * self.not_a_point_embed.weight
        )
        # Padding tokens carry no position, only the "not a point" embedding.
        return torch.where(labels == LABEL_PAD, 0.0, pe) + kind

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """``B x 4`` XYXY boxes (input frame) -> ``B x 2 x C`` corner tokens."""
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        pe = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_kind = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])
        return pe + corner_kind

    def embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """``B x 1 x 4H x 4W`` mask logits -> ``B x C x H x W``."""
        return self.mask_downscaling(masks)

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
        text: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed a batch of prompts.

        Args:
            points: ``(B x N x 2 coords, B x N labels)`` in the padded input frame, or None.
            boxes: ``B x 4`` XYXY in the input frame, or None.
            masks: ``B x 1 x 4H x 4W`` low-res mask logits, or None.
            text: ``B x C`` projected text tokens (``samkit.modeling.text_prompt``), or None.
                The token is *added* to the "not a point" token: the one that follows the
                points when there is no box, else one appended for it. Adding (rather than a
                token of its own) means that with points and no box a zero projection gives
                exactly the masks without text: a slot grown onto a trained model starts from
                the model's own outputs.

        Returns:
            sparse ``B x N_tokens x C`` and dense ``B x C x H x W`` embeddings.
        """
        batch = _batch_size(points, boxes, masks, text)
        device = self.no_mask_embed.weight.device
        sparse = [torch.empty(batch, 0, self.embed_dim, device=device)]
        if points is not None:
            sparse.append(self.embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            sparse.append(self.embed_boxes(boxes))
        if text is not None:
            if points is not None and boxes is None:  # the points' pad token is last
                sparse[-1] = torch.cat([sparse[-1][:, :-1], sparse[-1][:, -1:] + text[:, None]],
                                       dim=1)
            else:
                sparse.append((self.not_a_point_embed.weight + text)[:, None])
        sparse_embeddings = torch.cat(sparse, dim=1)
        if masks is not None:
            dense = self.embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, h, w)
        return sparse_embeddings, dense


def check_point_shapes(points: torch.Tensor, labels: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``points`` is ``B x N x 2`` and ``labels`` ``B x N``."""
    if points.dim() != 3 or points.shape[-1] != 2:
        raise ValueError(f"points must be B x N x 2, got {tuple(points.shape)}")
    if tuple(labels.shape) != tuple(points.shape[:2]):
        raise ValueError(f"labels must be B x N = {tuple(points.shape[:2])} for points "
                         f"{tuple(points.shape)}, got {tuple(labels.shape)}")


def _batch_size(
    points: tuple[torch.Tensor, torch.Tensor] | None,
    boxes: torch.Tensor | None,
    masks: torch.Tensor | None,
    text: torch.Tensor | None,
) -> int:
    for t in (points[0] if points is not None else None, boxes, masks, text):
        if t is not None:
            return t.shape[0]
    return 1


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier-feature positional encoding (Tancik et al. 2020).

    Coordinates in ``[0, 1]`` are mapped to ``[sin(2 pi (2x-1) G), cos(...)]`` with a fixed
    Gaussian ``2 x num_pos_feats`` matrix ``G`` (a buffer, saved in checkpoints).
    """

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        scale = scale if scale is not None and scale > 0 else 1.0
        self.register_buffer(
            "positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats))
        )

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """``... x 2`` in [0,1] -> ``... x 2*num_pos_feats``."""
        coords = 2 * math.pi * ((2 * coords - 1) @ self.positional_encoding_gaussian_matrix)
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of a ``h x w`` grid of cell centres: ``C x h x w``."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(
            [xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1
        )
        return self._pe_encoding(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Encode ``B x N x 2`` pixel coords given the ``(H, W)`` of the frame."""
        frame = coords.new_tensor([image_size[1], image_size[0]])
        return self._pe_encoding((coords / frame).float())
