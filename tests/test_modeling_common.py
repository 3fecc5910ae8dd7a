"""The CPU fast routes of the model's building blocks equal the plain PyTorch computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from samkit.modeling.common import Linear, linear
from samkit.modeling.mask_decoder import MaskDecoder, _patch_linear, _patches_to_image
from samkit.modeling.transformer import TwoWayTransformer


@pytest.mark.parametrize("shape", [(3, 700, 96), (2, 5, 96), (1, 16, 16, 96)])
def test_linear_equals_f_linear_with_gradients(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    layer = Linear(96, 40)
    out = layer(x)
    expected = F.linear(x, layer.weight, layer.bias)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [x, layer.weight, layer.bias])
    grads_ref = torch.autograd.grad(expected.square().sum(), [x, layer.weight, layer.bias])
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


def test_linear_on_strided_input_and_no_bias() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 600, 32).transpose(0, 1)  # not contiguous
    w = torch.randn(8, 32)
    torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_channels_last_upscaler_equals_the_conv_stack() -> None:
    """``output_upscaling`` as matrix products on 2 x 2 patches == the modules on NCHW."""
    torch.manual_seed(0)
    decoder = MaskDecoder(64, TwoWayTransformer(depth=1, embedding_dim=64, num_heads=2, mlp_dim=32))
    for p in decoder.output_upscaling.parameters():  # non-trivial LayerNorm / biases
        torch.nn.init.normal_(p, std=0.5)
    b, h, w = 2, 5, 7
    src = torch.randn(b, h * w, 64)
    hyper = torch.randn(b, 3, 8)
    reference = decoder.output_upscaling(src.transpose(1, 2).reshape(b, 64, h, w))
    expected = (hyper @ reference.flatten(2)).view(b, 3, 4 * h, 4 * w)
    weight, bias = _patch_linear(decoder.output_upscaling[0])
    pixels = decoder._upscale_patches(linear(src, weight, bias))
    masks = _patches_to_image(hyper @ pixels.transpose(1, 2), h, w)
    torch.testing.assert_close(masks, expected, rtol=1e-5, atol=1e-5)
