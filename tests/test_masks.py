"""Tests for :mod:`samkit.masks` and :mod:`samkit.rle`: each utility against the official
``segment_anything.utils.amg`` (or pycocotools / a plain greedy NMS), including the corner
cases (empty and full masks, ties, degenerate boxes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from official import official_package, reference_nms
from samkit import masks as M
from samkit import rle as R
from samkit.errors import SamkitError

# pycocotools' decode trips a NumPy 2 deprecation warning on every call.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def amg():
    official_package()
    from segment_anything.utils import amg

    return amg


def random_masks(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Blobby random masks plus the edge cases: empty, full, first pixel set, one pixel."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 1, max(h // 6, 1), max(w // 6, 1), generator=g)
    masks = torch.nn.functional.interpolate(coarse, (h, w), mode="bilinear")[:, 0] > 0.6
    masks[0] = False
    masks[1] = True
    masks[2, 0, 0] = True
    masks[3] = False
    masks[3, h - 1, w - 1] = True
    return masks


# ---------------------------------------------------------------------------- grids, crops, boxes
@pytest.mark.parametrize("n", [1, 2, 7, 32])
def test_point_grid_matches_official(amg, n):
    assert np.array_equal(M.build_point_grid(n), amg.build_point_grid(n))


def test_all_layer_point_grids_match_official(amg):
    ours = M.build_all_layer_point_grids(32, 3, 2)
    theirs = amg.build_all_layer_point_grids(32, 3, 2)
    assert [g.shape for g in ours] == [(1024, 2), (256, 2), (64, 2), (16, 2)]
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("size", [(160, 240), (1024, 683), (333, 500), (37, 37)])
@pytest.mark.parametrize("layers", [0, 1, 2])
@pytest.mark.parametrize("ratio", [512 / 1500, 0.0, 0.5])
def test_crop_boxes_match_official(amg, size, layers, ratio):
    ours = M.generate_crop_boxes(size, layers, ratio)
    assert ours == amg.generate_crop_boxes(size, layers, ratio)


def test_mask_to_box_matches_official(amg):
    masks = random_masks(12, 23, 31).reshape(3, 4, 23, 31)
    ours = M.batched_mask_to_box(masks)
    assert ours.shape == (3, 4, 4)
    assert torch.equal(ours, amg.batched_mask_to_box(masks))
    assert M.batched_mask_to_box(masks[0, 0]).tolist() == [0, 0, 0, 0]  # empty
    assert M.batched_mask_to_box(masks[0, 1]).tolist() == [0, 0, 30, 22]  # full


def test_box_helpers(amg):
    boxes = torch.tensor([[0, 0, 10, 20], [5, 6, 5, 9]])
    assert M.box_xyxy_to_xywh(boxes).tolist() == [[0, 0, 10, 20], [5, 6, 0, 3]]
    assert M.box_area(boxes).tolist() == [200, 0]
    crop = [30, 40, 130, 90]
    assert torch.equal(M.uncrop_boxes_xyxy(boxes, crop), amg.uncrop_boxes_xyxy(boxes, crop))
    points = torch.rand(5, 2, dtype=torch.float64)
    assert torch.equal(M.uncrop_points(points, crop), amg.uncrop_points(points, crop))
    masks = random_masks(4, 50, 100)
    padded = M.uncrop_masks(masks, crop, 120, 200)
    assert torch.equal(padded, amg.uncrop_masks(masks, crop, 120, 200))
    assert M.uncrop_masks(masks, [0, 0, 100, 50], 50, 100) is masks


def test_near_crop_edge_matches_official(amg):
    g = torch.Generator().manual_seed(1)
    x0y0 = torch.randint(0, 90, (400, 2), generator=g)
    boxes = torch.cat([x0y0, x0y0 + torch.randint(0, 60, (400, 2), generator=g)], dim=1)
    for crop, orig in (([0, 0, 100, 80], [0, 0, 100, 80]), ([50, 30, 150, 110], [0, 0, 150, 200])):
        ours = M.is_box_near_crop_edge(boxes, crop, orig)
        assert torch.equal(ours, amg.is_box_near_crop_edge(boxes, crop, orig))
    assert ours.any() and not ours.all()


# ---------------------------------------------------------------------------- stability score
@pytest.mark.parametrize("offset", [1.0, 0.25])
def test_stability_score_matches_official(amg, offset):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 40, 50, generator=g) * 4
    logits[0, 0] = -10  # both masks empty: NaN, as in the official code
    ours = M.calculate_stability_score(logits, 0.0, offset)
    theirs = amg.calculate_stability_score(logits, 0.0, offset)
    assert ours.shape == (2, 3) and ours.dtype == theirs.dtype
    assert torch.equal(ours.nan_to_num(-1), theirs.nan_to_num(-1))
    assert ours[0, 0].isnan()


# ---------------------------------------------------------------------------- NMS
def nms_cases() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    cases = []
    for n in (1, 2, 50, 300):
        xy = torch.randint(0, 60, (n, 2), generator=g)
        wh = torch.randint(0, 40, (n, 2), generator=g)  # 0: degenerate (zero-area) boxes
        boxes = torch.cat([xy, xy + wh], dim=1).float()
        # Few distinct scores, so many ties; some exact duplicate boxes too.
        scores = torch.randint(0, 4, (n,), generator=g).float() / 4
        if n > 2:
            boxes[n // 2] = boxes[0]
        cases.append((boxes, scores))
    inverted = torch.tensor([[10.0, 10, 0, 0], [0, 0, 10, 10], [2, 2, 8, 8], [3, 3, 3, 3]])
    cases.append((inverted, torch.tensor([0.5, 0.5, 0.5, 0.9])))
    return cases


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.7, 1.0])
def test_greedy_nms_equals_reference(threshold):
    for boxes, scores in nms_cases():
        zeros = torch.zeros(len(boxes), dtype=torch.long)
        ours = M.greedy_batched_nms(boxes, scores, zeros, threshold)
        assert ours.dtype == torch.long
        assert ours.tolist() == reference_nms(boxes, scores, threshold).tolist()
        assert M.batched_nms(boxes, scores, zeros, threshold).tolist() == ours.tolist()


def test_greedy_nms_categories_are_independent():
    boxes, scores = nms_cases()[3]
    categories = torch.arange(len(boxes)) % 3
    ours = M.greedy_batched_nms(boxes, scores, categories, 0.5)
    per_category = []
    for c in range(3):
        members = torch.nonzero(categories == c)[:, 0]
        per_category += members[reference_nms(boxes[members], scores[members], 0.5)].tolist()
    # Same keep set; overall order by score, ties to the lower index.
    assert sorted(ours.tolist()) == sorted(per_category)
    expected_order = sorted(per_category, key=lambda i: (-scores[i].item(), i))
    assert ours.tolist() == expected_order


def test_nms_prefers_torchvision_when_it_works(monkeypatch):
    calls = []

    def fake_torchvision(boxes, scores, idxs, iou_threshold):
        calls.append(len(boxes))
        return torch.arange(len(boxes))

    monkeypatch.setattr(M, "_torchvision_batched_nms", lambda: fake_torchvision)
    boxes, scores = nms_cases()[2]
    kept = M.batched_nms(boxes, scores, torch.zeros(len(boxes), dtype=torch.long), 0.5)
    assert kept.numel() == 50 and calls == [50]


def test_nms_empty():
    args = (torch.empty(0, 4), torch.empty(0), torch.empty(0, dtype=torch.long), 0.5)
    assert M.greedy_batched_nms(*args).numel() == 0
    assert M.batched_nms(*args).numel() == 0


# ---------------------------------------------------------------------------- RLE
def test_rle_matches_official_and_pycocotools(amg):
    masks = random_masks(9, 37, 53)
    rles = R.masks_to_rle(masks)
    assert rles == amg.mask_to_rle_pytorch(masks)
    assert rles[0]["counts"] == [37 * 53] and rles[1]["counts"] == [0, 37 * 53]
    decoded = mask_utils.decode(mask_utils.frPyObjects(rles, 37, 53))  # H x W x B
    assert np.array_equal(decoded.transpose(2, 0, 1).astype(bool), masks.numpy())
    for rle, mask in zip(rles, masks.numpy()):
        assert np.array_equal(R.rle_to_mask(rle), mask)
        assert R.area_from_rle(rle) == mask.sum()


def test_rle_empty_batch():
    assert R.masks_to_rle(torch.zeros(0, 5, 4, dtype=torch.bool)) == []


def test_coco_rle_matches_official(amg):
    masks = random_masks(6, 20, 30, seed=4)
    rles = R.masks_to_rle(masks)
    ours = [R.coco_encode_rle(rle) for rle in rles]
    assert ours == [amg.coco_encode_rle(rle) for rle in rles]
    assert ours == R.masks_to_coco_rle(masks.numpy())
    assert all(isinstance(r["counts"], str) for r in ours)
    assert np.array_equal(mask_utils.decode(ours).transpose(2, 0, 1).astype(bool), masks.numpy())


# ---------------------------------------------------------------------------- small regions
@pytest.mark.parametrize("mode", ["holes", "islands"])
@pytest.mark.parametrize("area", [1, 10, 60, 10_000])
def test_remove_small_regions_matches_official(amg, mode, area):
    for seed in range(4):
        mask = random_masks(4, 40, 60, seed=seed)[seed].numpy()
        noisy = mask ^ (np.random.default_rng(seed).random(mask.shape) > 0.97)
        ours, changed = M.remove_small_regions(noisy, area, mode)
        theirs, theirs_changed = amg.remove_small_regions(noisy, area, mode)
        assert changed == theirs_changed
        assert np.array_equal(ours, theirs)


def test_remove_small_regions_keeps_largest_island():
    mask = np.zeros((20, 20), dtype=bool)
    mask[1:4, 1:4] = True  # 9 px
    mask[10:14, 10:14] = True  # 16 px: the largest, kept although below the threshold
    cleaned, changed = M.remove_small_regions(mask, 100, "islands")
    assert changed and cleaned.sum() == 16 and cleaned[10:14, 10:14].all()


def test_remove_small_regions_bad_mode():
    with pytest.raises(SamkitError, match="holes"):
        M.remove_small_regions(np.zeros((4, 4), bool), 5, "gaps")
