"""Symmetric per-output-channel int8 weights, for storage: a shipped file holds ``int8``
values and one fp32 scale per output channel, half the bytes of fp16. Loading turns them
back into float weights (compute stays in float)."""

from __future__ import annotations

import torch

INT8_MAX = 127


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``O x ... -> (int8 O x ..., fp32 scale O)`` with ``weight ~= q * scale`` per channel."""
    flat = weight.detach().float().reshape(len(weight), -1)
    scale = flat.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / INT8_MAX
    q = torch.round(flat / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.reshape(weight.shape), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 weight of :func:`quantize_int8`'s ``(q, scale)``."""
    return (q.float().reshape(len(q), -1) * scale.float()[:, None]).reshape(q.shape)


def round_int8(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` rounded to what its int8 storage holds (quantize, then dequantize)."""
    return dequantize_int8(*quantize_int8(weight)).to(weight.dtype)
