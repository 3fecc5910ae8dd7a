"""Numerical parity with the official ``segment_anything`` code on identical random weights.

The official model (test-only oracle) is built with random weights, every parameter and buffer
is re-drawn so that zero-initialised ones (relative / absolute position embeddings) matter too,
and its state dict is loaded *strictly* into samkit's model. Outputs must agree to 1e-4.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from official import SHARED, official_package, official_sam
from samkit import SamPredictor
from samkit.build import build_sam_from_config, load_into
from samkit.registry import MODEL_CONFIGS, SamConfig, ViTConfig

TOL = 1e-4

# A reduced ViT at 256 px: 16x16 tokens, so the 14x14 windows need padding (the tricky path).
SMALL = dict(encoder_depth=3, embed_dim=96, num_heads=4, global_attn=(1,), image_size=256)


def randomise_(module: torch.nn.Module, seed: int) -> None:
    """Perturb every tensor so zero/one-initialised ones (position embeddings, norms) count."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=gen) * 0.02)


def twin_models(seed: int = 0, **arch) -> tuple[torch.nn.Module, torch.nn.Module]:
    official = official_sam(**arch)
    randomise_(official, seed)
    cfg = SamConfig(
        ViTConfig(arch["embed_dim"], arch["encoder_depth"], arch["num_heads"], arch["global_attn"]),
        image_size=arch["image_size"],
    )
    ours = build_sam_from_config(cfg)
    load_into(ours, official.state_dict(), "test config", source="official state dict")
    return official, ours


def test_official_key_layout_for_every_size() -> None:
    """vit_b / vit_l / vit_h: same keys and shapes as the official builders (meta device)."""
    sa = official_package()
    builders = {"vit_b": sa.build_sam_vit_b, "vit_l": sa.build_sam_vit_l, "vit_h": sa.build_sam_vit_h}
    for name, builder in builders.items():
        with torch.device("meta"):
            theirs = {k: tuple(v.shape) for k, v in builder().state_dict().items()}
            ours = {k: tuple(v.shape) for k, v in build_sam_from_config(MODEL_CONFIGS[name]).state_dict().items()}
        assert ours == theirs, name


def test_vit_t_matches_mobile_sam_layout() -> None:
    ref_path = SHARED / "reference" / "mobile_sam_keys.json"
    if not ref_path.is_file():
        pytest.skip(f"{ref_path} not found (../shared is absent)")
    reference = {k: tuple(s) for k, s in json.loads(ref_path.read_text())["keys"]}
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in build_sam_from_config(MODEL_CONFIGS["vit_t"]).state_dict().items()}
    assert ours == reference
    by_part = {p: sum(k.startswith(p) for k in ours) for p in ("image_encoder", "prompt_encoder", "mask_decoder")}
    assert by_part == {"image_encoder": 302, "prompt_encoder": 17, "mask_decoder": 120}


@pytest.fixture(scope="module")
def small_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    return twin_models(**SMALL)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    rng = np.random.default_rng(0)
    h, w = 180, 300  # non-square: exercises padding and the coordinate transforms
    yy, xx = np.mgrid[:h, :w]
    img = np.stack([xx * 255 // w, yy * 255 // h, ((xx // 30 + yy // 30) % 2) * 200], -1)
    return (img + rng.integers(0, 40, img.shape)).clip(0, 255).astype(np.uint8)


def test_image_embeddings_match(small_pair, photo) -> None:
    official, ours = small_pair
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        diff = (official.image_encoder(x) - ours.image_encoder(x)).abs().max().item()
    assert diff <= TOL


PROMPTS = {
    "fg point": dict(point_coords=np.array([[120.0, 90.0]]), point_labels=np.array([1])),
    "fg+bg points": dict(point_coords=np.array([[120.0, 90.0], [10.0, 170.0]]), point_labels=np.array([1, 0])),
    "box": dict(box=np.array([30.0, 20.0, 250.0, 160.0])),
    "points+box": dict(point_coords=np.array([[120.0, 90.0]]), point_labels=np.array([0]), box=np.array([30.0, 20.0, 250.0, 160.0])),
}


@pytest.mark.parametrize("prompt", list(PROMPTS))
@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("with_mask_input", [False, True])
def test_predictor_matches_official(small_pair, photo, prompt, multimask, with_mask_input) -> None:
    """Our predictor vs the official SamPredictor: same image transform, prompt transforms,
    decoder and postprocessing."""
    official_model, ours = small_pair
    sa = official_package()
    theirs_pred = sa.SamPredictor(official_model)
    our_pred = SamPredictor(ours)
    theirs_pred.set_image(photo)
    our_pred.set_image(photo)
    assert (theirs_pred.features - our_pred.features).abs().max().item() <= TOL

    kwargs = dict(PROMPTS[prompt], multimask_output=multimask, return_logits=True)
    if with_mask_input:
        rng = np.random.default_rng(1)
        kwargs["mask_input"] = rng.normal(size=(1, 64, 64)).astype(np.float32) * 4
    m1, s1, l1 = theirs_pred.predict(**kwargs)
    m2, s2, l2 = our_pred.predict(**kwargs)
    assert m1.shape == m2.shape == ((3 if multimask else 1), *photo.shape[:2])
    assert np.abs(l1 - l2).max() <= TOL
    assert np.abs(s1 - s2).max() <= TOL
    assert np.abs(m1 - m2).max() <= TOL


def test_batched_prompts_equal_one_at_a_time(small_pair, photo) -> None:
    """predict_batch on 8 boxes == 8 separate official predict calls."""
    official_model, ours = small_pair
    theirs_pred = official_package().SamPredictor(official_model)
    theirs_pred.set_image(photo)
    our_pred = SamPredictor(ours)
    our_pred.set_image(photo)
    rng = np.random.default_rng(2)
    xy0 = rng.uniform(0, [200, 120], size=(8, 2))
    boxes = np.concatenate([xy0, xy0 + rng.uniform(10, 90, size=(8, 2))], axis=1)
    masks, scores, low_res = our_pred.predict_batch(boxes=boxes, multimask_output=True, return_logits=True)
    for i, box in enumerate(boxes):
        m, s, lr = theirs_pred.predict(box=box, multimask_output=True, return_logits=True)
        assert np.abs(lr - low_res[i].numpy()).max() <= TOL
        assert np.abs(s - scores[i].numpy()).max() <= TOL


def test_end_to_end_forward_matches(small_pair) -> None:
    """The official batched ``Sam.forward`` API gives the same outputs."""
    official_model, ours = small_pair
    batch = [
        {
            "image": torch.rand(3, 256, 160) * 255,
            "original_size": (400, 250),
            "point_coords": torch.tensor([[[40.0, 60.0], [100.0, 20.0]]]),
            "point_labels": torch.tensor([[1, 0]]),
            "boxes": torch.tensor([[10.0, 10.0, 150.0, 200.0]]),
        }
    ]
    with torch.no_grad():
        theirs = official_model(batch, multimask_output=False)[0]
        mine = ours(batch, multimask_output=False)[0]
    assert (theirs["low_res_logits"] - mine["low_res_logits"]).abs().max().item() <= TOL
    assert (theirs["iou_predictions"] - mine["iou_predictions"]).abs().max().item() <= TOL
    # Binary masks may differ only where a logit sits within float noise of the threshold.
    assert (theirs["masks"] != mine["masks"]).float().mean().item() < 1e-4


@pytest.mark.slow
def test_full_size_vit_b(photo) -> None:
    """One full-size vit_b check: 1024 px, 12 blocks, dim 768 (about 25 s on 2 cores)."""
    official_model, ours = twin_models(seed=3, encoder_depth=12, embed_dim=768, num_heads=12,
                                       global_attn=(2, 5, 8, 11), image_size=1024)
    sa = official_package()
    theirs_pred, our_pred = sa.SamPredictor(official_model), SamPredictor(ours)
    theirs_pred.set_image(photo)
    our_pred.set_image(photo)
    assert (theirs_pred.features - our_pred.features).abs().max().item() <= TOL
    for prompt in ("fg+bg points", "box"):
        _, s1, l1 = theirs_pred.predict(**PROMPTS[prompt], multimask_output=True)
        _, s2, l2 = our_pred.predict(**PROMPTS[prompt], multimask_output=True)
        assert np.abs(l1 - l2).max() <= TOL
        assert np.abs(s1 - s2).max() <= TOL
