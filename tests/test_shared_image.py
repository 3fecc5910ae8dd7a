"""The shared-image decoder path (``MaskDecoder.image_cache``) equals the direct computation."""

from __future__ import annotations

import pytest
import torch

from samkit.build import build_sam


@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(0)
    model = build_sam("vit_b")
    # Random LayerNorm scales/shifts and biases too, so every folded term is exercised.
    with torch.no_grad():
        for p in model.mask_decoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("batch, num_points, use_box", [(1, 1, False), (5, 1, False),
                                                         (3, 4, False), (4, 0, True),
                                                         (2, 2, True)])
@pytest.mark.parametrize("multimask", [True, False])
def test_cached_path_equals_direct(sam, batch, num_points, use_box, multimask):
    gen = torch.Generator().manual_seed(batch * 10 + num_points)
    embedding = torch.randn(1, 256, 64, 64, generator=gen)
    points = None
    if num_points:
        coords = torch.rand(batch, num_points, 2, generator=gen) * 1024
        labels = torch.randint(0, 2, (batch, num_points), generator=gen)
        points = (coords, labels)
    boxes = None
    if use_box:
        corner = torch.rand(batch, 2, generator=gen) * 512
        boxes = torch.cat([corner, corner + 300], dim=1)
    decoder, prompt_encoder = sam.mask_decoder, sam.prompt_encoder
    pe = prompt_encoder.get_dense_pe()
    with torch.inference_mode():
        sparse, dense = prompt_encoder(points=points, boxes=boxes, masks=None)
        direct = decoder(embedding, pe, sparse, dense, multimask)
        cache = decoder.image_cache(embedding, pe, dense)
        cached = decoder(embedding, pe, sparse, dense, multimask, cache)
        again = decoder(embedding, pe, sparse, dense, multimask, cache)  # filled cache
    scale = direct[0].abs().max()
    assert scale > 1  # the random weights give logits worth comparing
    for fast in (cached, again):
        assert torch.allclose(fast[0], direct[0], atol=1e-5 * scale, rtol=0)
        assert torch.allclose(fast[1], direct[1], atol=1e-5, rtol=1e-4)


def test_cached_path_has_gradients(sam):
    """Exact re-association, so it trains too (gradients equal the direct path's)."""
    embedding = torch.randn(1, 256, 64, 64, requires_grad=True)
    decoder, prompt_encoder = sam.mask_decoder, sam.prompt_encoder
    pe = prompt_encoder.get_dense_pe().detach()
    sparse, dense = prompt_encoder(points=(torch.tensor([[[500.0, 400.0]]]),
                                           torch.tensor([[1]])), boxes=None, masks=None)
    grads = []
    for cache in (None, decoder.image_cache(embedding, pe, dense)):
        masks, iou = decoder(embedding, pe, sparse, dense, True, cache)
        (grad,) = torch.autograd.grad(masks.square().mean() + iou.sum(), embedding,
                                      retain_graph=True)
        grads.append(grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-5 * grads[0].abs().max(), rtol=0)
