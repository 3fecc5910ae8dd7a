"""The CPU fast routes of the model's building blocks equal the plain PyTorch computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from samkit.modeling import image_encoder
from samkit.modeling.common import Linear, MLPBlock
from samkit.modeling.kernels import linear, linear_gelu
from samkit.modeling.image_encoder import (
    Attention,
    blocked_rel_pos_attention,
    decomposed_rel_pos_bias,
    rel_pos_terms,
)
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


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_linear_gelu_equals_gelu_of_linear(autocast: bool) -> None:
    """The fused oneDNN route (inference) against ``F.gelu(F.linear(...))`` in float64."""
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 300, 96), torch.randn(384, 96) * 0.1, torch.randn(384) * 0.1
    expected = F.gelu(F.linear(x.double(), w.double(), b.double()))
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = linear_gelu(x, w, b)
    assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
    tol = 2e-2 if autocast else 1e-5  # bf16: a few units in the last place of 8 bits
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def test_mlp_block_fuses_gelu_only_without_gradients() -> None:
    torch.manual_seed(0)
    block = MLPBlock(48, 192)
    x = torch.randn(1, 20, 20, 48, requires_grad=True)
    expected = block.lin2(F.gelu(F.linear(x, block.lin1.weight, block.lin1.bias)))
    out = block(x)  # gradients on: the unfused route, which autograd differentiates
    out.sum().backward()
    assert x.grad is not None
    with torch.inference_mode():
        torch.testing.assert_close(block(x), expected.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_size, k_size", [((14, 14), (14, 14)), ((5, 7), (5, 7)),
                                            ((6, 4), (8, 8))])
def test_bf16_rel_pos_bias_by_one_hot_product_is_exact(q_size: tuple[int, int],
                                                      k_size: tuple[int, int]) -> None:
    """bf16 on the CPU builds the bias as ``[rel_h, rel_w] @ one-hot``: bit for bit the sums
    of the broadcast add (each sum of two bf16 terms, rounded once)."""
    torch.manual_seed(0)
    q = torch.randn(3, 2, q_size[0] * q_size[1], 16).bfloat16()
    rel_pos_h = torch.randn(2 * max(q_size[0], k_size[0]) - 1, 16)
    rel_pos_w = torch.randn(2 * max(q_size[1], k_size[1]) - 1, 16)
    bias = decomposed_rel_pos_bias(q, rel_pos_h, rel_pos_w, q_size, k_size)
    rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, q_size, k_size)
    assert torch.equal(bias, (rel_h[..., :, None] + rel_w[..., None, :]).view(bias.shape))


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


@pytest.mark.parametrize("size", [(16, 16), (12, 20)])
def test_blocked_global_attention_equals_sdpa_with_bias(
    size: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several query blocks and a short last one, on square and non-square grids."""
    monkeypatch.setattr(image_encoder, "_QUERY_BLOCK", 96)
    torch.manual_seed(0)
    b, heads, d = 2, 3, 8
    n = size[0] * size[1]
    q, k, v = (torch.randn(b, heads, n, d) for _ in range(3))
    rel_h = torch.randn(2 * size[0] - 1, d) * 0.3
    rel_w = torch.randn(2 * size[1] - 1, d) * 0.3
    bias = decomposed_rel_pos_bias(q, rel_h, rel_w, size, size)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2)
    with torch.inference_mode():
        out = blocked_rel_pos_attention(q, k, v, rel_h, rel_w, size)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_encoder_attention_takes_the_blocked_path_only_for_inference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Same output on both paths; with gradients on, the SDPA path (autograd) is used."""
    monkeypatch.setattr(image_encoder, "_BLOCKED_MIN_TOKENS", 64)
    torch.manual_seed(0)
    attn = Attention(48, num_heads=4, input_size=(8, 12))
    torch.nn.init.normal_(attn.rel_pos_h, std=0.3)
    torch.nn.init.normal_(attn.rel_pos_w, std=0.3)
    x = torch.randn(2, 8, 12, 48, requires_grad=True)
    calls: list[int] = []
    blocked = image_encoder.blocked_rel_pos_attention
    monkeypatch.setattr(image_encoder, "blocked_rel_pos_attention",
                        lambda *a: calls.append(1) or blocked(*a))
    trained = attn(x)
    trained.sum().backward()  # the SDPA path: gradients flow
    assert calls == [] and x.grad is not None
    with torch.inference_mode():
        served = attn(x.detach())
    assert calls == [1]
    torch.testing.assert_close(served, trained.detach(), rtol=1e-5, atol=1e-5)


def test_decoder_upscales_in_slices_with_the_same_masks_and_gradients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Slices of 7 tokens (a short last one) give the whole-image result, gradients too."""
    from samkit.modeling import mask_decoder

    torch.manual_seed(0)
    decoder = MaskDecoder(64, TwoWayTransformer(depth=1, embedding_dim=64, num_heads=2, mlp_dim=32))
    image = torch.randn(1, 64, 5, 6, requires_grad=True)
    pe = torch.randn(1, 64, 5, 6)
    sparse, dense = torch.randn(3, 2, 64), torch.randn(3, 64, 5, 6)

    def run(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setattr(mask_decoder, "_TOKENS_PER_STEP", step)
        masks, _ = decoder(image, pe, sparse, dense, multimask_output=True)
        (grad,) = torch.autograd.grad(masks.square().sum(), image)
        return masks, grad

    whole, sliced = run(10_000), run(7)
    for a, b in zip(sliced, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_exported_or_compiled_graphs_keep_plain_products(monkeypatch: pytest.MonkeyPatch) -> None:
    """While exporting/compiling, linear stays F.linear (ONNX int8 quantizes MatMul/Gemm
    nodes) and global attention stays SDPA (no Python loops unrolled into the graph)."""
    q = torch.randn(1, 2, 1024, 8)
    with torch.inference_mode():
        assert image_encoder._blocked_attention_applies(q)  # eager: it would
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    convs: list[int] = []
    conv2d = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *a, **k: convs.append(1) or conv2d(*a, **k))
    x = torch.randn(600, 32)
    linear(x, torch.randn(8, 32))
    assert convs == []
    with torch.inference_mode():
        assert not image_encoder._blocked_attention_applies(q)


def test_torch_compile_of_the_encoder_equals_eager() -> None:
    """The encoder compiles (inductor) with samkit's eager-only kernels switched off, and
    gives the eager outputs; ``benchmarks/compile.py`` times it."""
    from samkit import build_sam
    from samkit.registry import SamConfig, ViTConfig

    torch.manual_seed(1)
    config = SamConfig(ViTConfig(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,)),
                       image_size=256)
    encoder = build_sam(config).eval().image_encoder
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        compiled = torch.compile(encoder)(x)
        torch.testing.assert_close(compiled, encoder(x), rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
