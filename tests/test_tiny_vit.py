"""TinyViT (MobileSAM ``vit_t``) encoder: checkpoint layout, shapes, attention maths, grads."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from samkit.modeling.tiny_vit import Attention, TinyViT, TinyViTBlock, attention_bias_index

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
KEYS_JSON = SHARED / "reference" / "mobile_sam_keys.json"


def first_encounter_index(height: int, width: int) -> torch.Tensor:
    """TinyViT's original enumeration: offsets numbered in the order they are first met."""
    points = list(itertools.product(range(height), range(width)))
    slots: dict[tuple[int, int], int] = {}
    idxs: list[int] = []
    for p1 in points:
        for p2 in points:
            off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            slots.setdefault(off, len(slots))
            idxs.append(slots[off])
    return torch.tensor(idxs).view(len(points), len(points))


def naive_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v with explicit matmuls and a pure-Python bias table."""
    b, n, c = x.shape
    h = attn.num_heads
    ws = int(round(n**0.5))
    qkv = attn.qkv(attn.norm(x)).view(b, n, h, -1)
    q, k, v = (t.permute(0, 2, 1, 3) for t in qkv.split(c // h, dim=3))
    bias = attn.attention_biases[:, first_encounter_index(ws, ws)]
    scores = (q @ k.transpose(-2, -1)) * (c // h) ** -0.5 + bias
    out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
    return attn.proj(out)


def test_state_dict_matches_mobile_sam_checkpoint() -> None:
    if not KEYS_JSON.is_file():
        pytest.skip(f"reference key list {KEYS_JSON} not present")
    ref = [
        (name, list(shape))
        for name, shape in json.loads(KEYS_JSON.read_text())["keys"]
        if name.startswith("image_encoder.")
    ]
    assert len(ref) == 302
    ours = [("image_encoder." + k, list(v.shape)) for k, v in TinyViT().state_dict().items()]
    assert dict(ours) == dict(ref)
    assert [k for k, _ in ours] == [k for k, _ in ref]  # same order, too
    assert not any("attention_bias_idxs" in k for k, _ in ours)


@pytest.mark.parametrize("size", [7, 14])
def test_bias_index_matches_first_encounter_order(size: int) -> None:
    assert torch.equal(attention_bias_index(size, size), first_encounter_index(size, size))


def test_bias_index_rectangular() -> None:
    assert torch.equal(attention_bias_index(3, 5), first_encounter_index(3, 5))


def test_forward_shape_1024() -> None:
    torch.manual_seed(0)
    model = TinyViT().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 1024, 1024))
    assert out.shape == (1, 256, 64, 64)
    assert torch.isfinite(out).all()


def test_forward_shape_256_batch2() -> None:
    model = TinyViT(img_size=256).eval()
    assert model.img_size == 256
    with torch.no_grad():
        out = model(torch.randn(2, 3, 256, 256))
    assert out.shape == (2, 256, 16, 16)


def test_img_size_must_be_multiple_of_64() -> None:
    with pytest.raises(ValueError):
        TinyViT(img_size=1000)
    with pytest.raises(ValueError):
        TinyViT(img_size=128)(torch.randn(1, 3, 64, 64))


def test_attention_matches_naive_softmax() -> None:
    torch.manual_seed(0)
    attn = Attention(dim=40, num_heads=5, window_size=7)
    with torch.no_grad():
        attn.attention_biases.normal_(std=2.0)  # zero at init; make the bias matter
    x = torch.randn(3, 49, 40)
    torch.testing.assert_close(attn(x), naive_attention(attn, x), rtol=1e-5, atol=1e-5)


def test_block_matches_naive_window_loop() -> None:
    """Whole block on a map that needs padding (10x12, window 7) vs. an explicit window loop."""
    torch.manual_seed(0)
    blk = TinyViTBlock(dim=32, num_heads=4, window_size=7, mlp_ratio=4.0, drop_path=0.0).eval()
    with torch.no_grad():
        blk.attn.attention_biases.normal_()
        blk.local_conv.bn.running_mean.normal_()
        blk.local_conv.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 10, 12, 32)

    padded = F.pad(x, (0, 0, 0, 2, 0, 4))  # to 14 x 14; zero tokens are attended to
    attended = torch.empty_like(padded)
    for i in range(0, 14, 7):
        for j in range(0, 14, 7):
            win = padded[:, i : i + 7, j : j + 7].reshape(2, 49, 32)
            attended[:, i : i + 7, j : j + 7] = naive_attention(blk.attn, win).view(2, 7, 7, 32)
    y = x + attended[:, :10, :12]
    y = blk.local_conv(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    expected = y + blk.mlp(y)

    with torch.no_grad():
        torch.testing.assert_close(blk(x), expected, rtol=1e-5, atol=1e-5)


def test_drop_path_rates_increase_linearly() -> None:
    model = TinyViT(img_size=128, drop_path_rate=0.1)
    rates = [blk.drop_path.drop_prob for layer in model.layers for blk in layer.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.1, 12))


def test_gradients_reach_every_trained_parameter() -> None:
    torch.manual_seed(0)
    model = TinyViT(img_size=128, drop_path_rate=0.1).train()
    model(torch.randn(2, 3, 128, 128)).square().mean().backward()
    for name, p in model.named_parameters():
        if name.startswith(("norm_head.", "head.")):
            assert p.grad is None, name
        else:
            assert p.grad is not None, name
    assert model.layers[1].blocks[0].attn.attention_biases.grad.abs().sum() > 0
