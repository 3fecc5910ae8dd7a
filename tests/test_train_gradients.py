"""Gradients of training: every trainable parameter of samkit's prompt encoder and mask
decoder gets the official modules' gradient (same weights, train mode), at the embedding
sizes samkit trains at and with batches of prompts of one image each, with and without mask
prompts; and the encoders' CPU fast paths give autograd's own gradients."""

from __future__ import annotations

import pytest
import torch

from official import official_modeling
from samkit.modeling.mask_decoder import MaskDecoder
from samkit.modeling.prompt_encoder import PromptEncoder
from samkit.modeling.transformer import TwoWayTransformer

PROMPTS = 3  # a batch of prompts, each on its own image (how TrainStep decodes)


def twins(grid: int) -> tuple[tuple[torch.nn.Module, torch.nn.Module], tuple[torch.nn.Module,
                                                                              torch.nn.Module]]:
    m = official_modeling()
    size = grid * 16
    theirs_pe = m.PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                                input_image_size=(size, size), mask_in_chans=16)
    theirs_dec = m.MaskDecoder(num_multimask_outputs=3, transformer=m.TwoWayTransformer(
        depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256,
        iou_head_depth=3, iou_head_hidden_dim=256)
    ours_pe = PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                            input_image_size=(size, size), mask_in_chans=16)
    ours_dec = MaskDecoder(transformer_dim=256, transformer=TwoWayTransformer(
        depth=2, embedding_dim=256, num_heads=8, mlp_dim=2048), num_multimask_outputs=3)
    ours_pe.load_state_dict(theirs_pe.state_dict(), strict=True)
    ours_dec.load_state_dict(theirs_dec.state_dict(), strict=True)
    for module in (theirs_pe, theirs_dec, ours_pe, ours_dec):
        module.train()
    return (theirs_pe, theirs_dec), (ours_pe, ours_dec)


@pytest.mark.parametrize("grid", [20, 32, 64])
@pytest.mark.parametrize("with_mask_prompt", [False, True])
@pytest.mark.parametrize("multimask", [True, False])
def test_decoder_gradients_match_official(grid: int, with_mask_prompt: bool,
                                          multimask: bool) -> None:
    torch.manual_seed(grid)
    (theirs_pe, theirs_dec), (ours_pe, ours_dec) = twins(grid)
    size = grid * 16
    embeddings = torch.randn(PROMPTS, 256, grid, grid)
    points = torch.rand(PROMPTS, 2, 2) * size
    labels = torch.tensor([[1, 0], [1, -1], [0, 1]])
    boxes = torch.tensor([[10.0, 20.0, size * 0.6, size * 0.7]]).repeat(PROMPTS, 1)
    masks = torch.randn(PROMPTS, 1, 4 * grid, 4 * grid) * 3 if with_mask_prompt else None
    k = 3 if multimask else 1
    weights_mask = torch.randn(PROMPTS, k, 4 * grid, 4 * grid)
    weights_iou = torch.randn(PROMPTS, k)

    # Official: one prompt at a time (its decoder repeats one image per call).
    loss_theirs = 0.0
    for i in range(PROMPTS):
        sparse, dense = theirs_pe(points=(points[i:i + 1], labels[i:i + 1]),
                                  boxes=boxes[i:i + 1],
                                  masks=None if masks is None else masks[i:i + 1])
        low, iou = theirs_dec(embeddings[i:i + 1], theirs_pe.get_dense_pe(), sparse, dense,
                              multimask)
        loss_theirs = loss_theirs + (low * weights_mask[i:i + 1]).sum() + (
            iou * weights_iou[i:i + 1]).sum()
    loss_theirs.backward()

    # samkit: the whole batch in one call, as TrainStep decodes.
    sparse, dense = ours_pe(points=(points, labels), boxes=boxes, masks=masks)
    low, iou = ours_dec(embeddings, ours_pe.get_dense_pe(), sparse, dense, multimask)
    loss_ours = (low * weights_mask).sum() + (iou * weights_iou).sum()
    loss_ours.backward()
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-4, atol=1e-3)

    for (theirs, ours) in ((theirs_pe, ours_pe), (theirs_dec, ours_dec)):
        reference = dict(theirs.named_parameters())
        for name, p in ours.named_parameters():
            g_ref = reference[name].grad
            if g_ref is None:  # unused by this prompt layout in both
                assert p.grad is None or p.grad.abs().max() == 0, name
                continue
            if p.grad is None:  # samkit computes only the asked-for masks' hypernetworks
                assert name.startswith("output_hypernetworks_mlps.") and (
                    g_ref.abs().max() == 0), f"{name}: no gradient"
                continue
            scale = g_ref.abs().max().clamp(min=1e-3)
            # Attention key biases shift every score of a query equally: their true gradient
            # is 0, and both sides hold float noise there.
            if name.endswith("k_proj.bias"):
                assert (p.grad.abs().max() / scale) < 1e-2 or torch.allclose(
                    p.grad, g_ref, rtol=1e-3, atol=1e-3 * scale.item()), name
                continue
            torch.testing.assert_close(p.grad, g_ref, rtol=1e-3, atol=1e-4 * scale.item(),
                                       msg=lambda m, n=name: f"{n}: {m}")


def test_tiny_vit_encoder_gradients_match_plain_autograd() -> None:
    """TinyViT's CPU fast paths (oneDNN linears, fused GELU) only run without gradients; in
    training the same forward goes through plain autograd ops: compare against a float64
    copy."""
    from samkit.build import build_image_encoder
    from samkit.registry import SamConfig, TinyViTConfig

    torch.manual_seed(0)
    cfg = SamConfig(TinyViTConfig(embed_dims=(16, 32, 48, 320), depths=(1, 1, 1, 1),
                                  num_heads=(1, 2, 3, 4), window_sizes=(2, 2, 4, 2)),
                    image_size=128)
    encoder = build_image_encoder(cfg).train()
    double = build_image_encoder(cfg).double().train()
    double.load_state_dict(encoder.state_dict())
    x = torch.randn(2, 3, 128, 128)
    encoder(x).square().mean().backward()
    double(x.double()).square().mean().backward()
    reference = dict(double.named_parameters())
    largest = max(p.grad.abs().max() for p in double.parameters() if p.grad is not None)
    ours, theirs = [], []
    for name, p in encoder.named_parameters():
        if reference[name].grad is None:
            assert p.grad is None, name
            continue
        assert p.grad is not None, f"{name}: no gradient"
        g, g_ref = p.grad.double().flatten(), reference[name].grad.flatten()
        # fp32 vs fp64 through train-mode BatchNorm: each tensor points the same way, except
        # where the true gradient is 0 or negligible (a residual branch that starts as the
        # identity, a scale that a following norm cancels): there both hold float noise ...
        if g_ref.abs().max() < 1e-6 * largest:
            assert g.abs().max() < 1e-5 * largest, name
        else:
            assert torch.nn.functional.cosine_similarity(g, g_ref, dim=0) > 0.99, name
        ours.append(g)
        theirs.append(g_ref)
    # ... and the whole gradient agrees to fp32 accuracy.
    full, full_ref = torch.cat(ours), torch.cat(theirs)
    assert ((full - full_ref).norm() / full_ref.norm()).item() < 1e-3
