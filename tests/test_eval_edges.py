"""samkit.eval.edges: the BSDS matching and scores on hand-checked cases, the pixel matcher
against the benchmark's own C++ (via pyEdgeEval), and SAM's edge map from a fake model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samkit.eval.datasets import read_bsds_boundaries
from samkit.eval.edges import (
    SamEdges,
    average_precision,
    boundary_counts,
    edge_scores,
    match_pixels,
    outer_boundary_sobel,
    recall_at_half_precision,
    thresholds,
)
from samkit.eval.predictors import Prediction, PromptBatch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
THRS = thresholds(99)


def _lines(shape=(200, 200)) -> np.ndarray:
    """Two horizontal lines and a vertical one: thinning leaves them unchanged."""
    gt = np.zeros(shape, bool)
    gt[50, 20:181] = True
    gt[120, 20:181] = True
    gt[60:110, 100] = True
    return gt


def _scores(edge: np.ndarray, gts: list[np.ndarray]) -> dict:
    return edge_scores([boundary_counts(edge.astype(np.float32), gts, THRS)], THRS)


def test_match_pixels_hand_checked():
    pred = np.zeros((30, 30), bool)
    gt = np.zeros((30, 30), bool)
    pred[5, 5] = pred[5, 6] = pred[20, 20] = True
    gt[5, 5] = gt[6, 6] = True
    # Pairs within 1.5 px: (5,5)-(5,5), (5,5)-(6,6), (5,6)-(5,5), (5,6)-(6,6): both ground
    # truth pixels can be matched, one to one; (20,20) is too far from everything.
    hits, matched = match_pixels(pred, gt, radius=1.5)
    assert matched == 2
    assert np.argwhere(hits).tolist() == [[5, 5], [5, 6]]
    # Two predictions next to one ground-truth pixel: only one may take it.
    hits, matched = match_pixels(pred, gt & (np.arange(30)[:, None] == 5), radius=1.5)
    assert matched == 1 and hits.sum() == 1
    # The tolerance is inclusive and Euclidean: (5,5)-(6,6) is sqrt(2) apart.
    only_diag = np.zeros_like(gt)
    only_diag[6, 6] = True
    assert match_pixels(pred & (np.arange(30)[None, :] == 5), only_diag, np.sqrt(2))[1] == 1
    assert match_pixels(pred & (np.arange(30)[None, :] == 5), only_diag, 1.41)[1] == 0


def test_perfect_shifted_and_empty_maps():
    gt = _lines()  # tolerance: 0.0075 * 283 = 2.1 px
    perfect = _scores(gt, [gt])
    assert (perfect["ods"], perfect["ois"], perfect["r50"]) == (1.0, 1.0, 1.0)
    for shift in (1, 2):  # within tolerance: still every pixel matched
        assert _scores(np.roll(gt, shift, axis=0), [gt])["ods"] == 1.0
    far = _scores(np.roll(gt, 5, axis=0), [gt])
    assert far["ods"] < 0.2  # only part of the vertical line still lines up
    empty = _scores(np.zeros_like(gt), [gt])
    assert (empty["ods"], empty["ois"], empty["ap"], empty["r50"]) == (0.0, 0.0, 0.0, 0.0)


def test_graded_map_traces_the_whole_pr_curve():
    gt = _lines()
    graded = np.where(gt, np.random.default_rng(0).uniform(0.001, 1.0, gt.shape), 0.0)
    s = _scores(graded, [gt])
    assert s["ap"] > 0.97  # precision 1 at every recall the thresholds reach
    assert s["ods"] > 0.99 and s["ois"] > 0.99


def test_several_annotators_and_ois():
    gt = _lines()
    other = np.roll(gt, 8, axis=1)  # a second annotator, 8 px to the right
    a = boundary_counts(gt.astype(np.float32), [gt, other], THRS)
    # Recall sums over annotators (the horizontal lines still overlap the shifted ones, the
    # vertical line does not); precision counts a match with anyone.
    assert a.sum_r[0] == 2 * gt.sum() and a.cnt_p[0] == a.sum_p[0] == gt.sum()
    assert gt.sum() < a.cnt_r[0] < 2 * gt.sum()
    rng = np.random.default_rng(1)
    noise = np.where(rng.random(gt.shape) < 0.02, rng.random(gt.shape), 0).astype(np.float32)
    b = boundary_counts(noise, [gt], THRS)
    s = edge_scores([a, b], THRS)
    # OIS: the counts of each image at its own best threshold (the last one on ties), summed.
    best = []
    for c in (a, b):
        f = 2 * (c.cnt_r / c.sum_r) * (c.cnt_p / np.maximum(c.sum_p, 1)) / np.maximum(
            c.cnt_r / c.sum_r + c.cnt_p / np.maximum(c.sum_p, 1), 1e-12)
        best.append(len(f) - 1 - int(np.argmax(f[::-1])))
    r = (a.cnt_r[best[0]] + b.cnt_r[best[1]]) / (a.sum_r[best[0]] + b.sum_r[best[1]])
    p = (a.cnt_p[best[0]] + b.cnt_p[best[1]]) / (a.sum_p[best[0]] + b.sum_p[best[1]])
    assert s["ois"] == pytest.approx(2 * p * r / (p + r))
    # ODS: one threshold for both; here the noisy image drags its own best threshold down.
    assert s["ods"] > s["ois"] and s["images"] == 2


def test_ap_and_r50_definitions():
    r = np.array([0.2, 0.5, 0.8])
    p = np.array([0.9, 0.7, 0.4])
    # Precision interpolated at recall 0.20, 0.21, ..., 0.80, summed / 100.
    grid = np.linspace(0.2, 0.8, 61)
    assert average_precision(r, p) == pytest.approx(np.interp(grid, r, p).sum() / 100)
    # Precision 0.5 lies between (0.5, 0.7) and (0.8, 0.4): recall 0.7.
    assert recall_at_half_precision(r, p) == pytest.approx(0.7)
    assert recall_at_half_precision(r, p * 0.5) == 0.0


def test_matcher_agrees_with_the_benchmark_correspondence():
    """pyEdgeEval's build of the BSDS ``correspondPixels`` C++ approximates the same optimum
    (it samples outlier edges at random), so it never beats the exact matching, and falls
    short by at most a few pixels."""
    edge_eval = pytest.importorskip("pyEdgeEval._lib")
    rng = np.random.default_rng(0)
    gt = _lines((150, 180))
    pred = np.roll(gt, 1, axis=1) | (rng.random(gt.shape) < 0.03)
    radius = 0.0075 * np.hypot(*gt.shape)
    _, ours = match_pixels(pred, gt, radius)
    _, ref_gt, _, _ = edge_eval.correspond_pixels(pred.astype(float), gt.astype(float),
                                                  max_dist=0.0075)
    theirs = int((ref_gt > 0).sum())
    assert theirs <= ours <= theirs + 0.01 * gt.sum()


def test_outer_boundary_sobel_matches_a_direct_convolution():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(3, 20, 25)) * 3).astype(np.float32)
    logits[1] = -5.0  # empty mask: no boundary, no response
    logits[2, 5:15, 3:20] = 4.0
    k, pixels, values = outer_boundary_sobel(logits)
    prob = torch.sigmoid(torch.from_numpy(logits).double())[:, None]
    padded = F.pad(prob, (1, 1, 1, 1), mode="replicate")
    sobel = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=torch.double)
    magnitude = torch.hypot(F.conv2d(padded, sobel[None, None]),
                            F.conv2d(padded, sobel.T[None, None]))[:, 0].numpy()
    inside = logits > 0
    dilated = F.max_pool2d(torch.from_numpy(inside)[:, None].float(), 3, 1, 1)[:, 0].numpy() > 0
    expected = magnitude * (dilated & ~inside)
    ours = np.zeros(logits.size)
    ours[k * 500 + pixels] = values
    np.testing.assert_allclose(ours.reshape(logits.shape), expected, atol=1e-6)
    assert 1 not in k


class _SquareModel:
    """Every prompt gets the same soft square mask (3 copies), with falling predicted IoU."""

    name = "square"

    def __init__(self, logits: np.ndarray) -> None:
        self.logits = logits

    def set_image(self, image: np.ndarray) -> None:
        pass

    def predict(self, prompts: PromptBatch, multimask: bool) -> Prediction:
        b = len(prompts)
        logits = np.broadcast_to(self.logits, (b, 3, *self.logits.shape)).copy()
        scores = np.tile([0.9, 0.8, 0.7], (b, 1))
        return Prediction(logits, scores, None)


def test_sam_edge_map_outlines_the_masks():
    h, w = 96, 128
    square = np.zeros((h, w), bool)
    square[20:70, 30:100] = True
    logits = np.where(square, 6.0, -6.0).astype(np.float32)
    edge = SamEdges(_SquareModel(logits), points_per_side=4)(np.zeros((h, w, 3), np.uint8))
    assert edge.max() == pytest.approx(1.0, abs=0.05)
    outline = square ^ (F.max_pool2d(torch.from_numpy(square)[None, None].float(), 3, 1, 1)[0, 0]
                        .numpy() > 0)
    s = _scores(edge, [outline])
    assert s["ods"] > 0.95


def test_bsds_ground_truth_reader(tmp_path):
    import scipy.io

    cells = np.empty((1, 2), dtype=object)
    for k in range(2):
        seg = np.ones((6, 8), np.uint16)
        bd = np.zeros((6, 8), np.uint8)
        bd[3, :] = 1
        cells[0, k] = {"Segmentation": seg, "Boundaries": bd}
    scipy.io.savemat(tmp_path / "x.mat", {"groundTruth": cells})
    maps = read_bsds_boundaries(tmp_path / "x.mat")
    assert len(maps) == 2 and maps[0].dtype == bool and maps[0].sum() == 8
    (tmp_path / "bad.mat").write_bytes(b"garbage")
    from samkit.errors import SamkitError

    with pytest.raises(SamkitError, match="cannot read BSDS ground truth"):
        read_bsds_boundaries(tmp_path / "bad.mat")


@pytest.mark.skipif(not (DATA / "bsds500").is_dir(),
                    reason="shared BSDS500 data absent (../shared/data/bsds500)")
def test_real_bsds_annotators_score_each_other_well():
    """Human boundaries against the other annotators of the same image: a high-F sanity
    check of the data reading and the matching (BSDS's human consistency is about 0.8)."""
    path = sorted((DATA / "bsds500" / "groundTruth").glob("*.mat"))[0]
    maps = read_bsds_boundaries(path)
    s = _scores(maps[0], maps[1:])
    assert 0.6 < s["ods"] <= 1.0
