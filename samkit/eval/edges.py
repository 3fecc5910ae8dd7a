"""``eval edges``: zero-shot edge detection on BSDS500, SAM §7.2 and App. D.2.

SAM's edge map: a 16 x 16 grid of foreground points gives 768 masks (3 per point), kept
without any predicted-IoU or stability filtering; duplicates go through box NMS at 0.7 ranked
by predicted IoU, as segment-everything does. For each remaining mask a Sobel filter runs on
the unthresholded mask probability (the sigmoid of the logits), and the response is zeroed
everywhere except the mask's outer boundary pixels (the pixels just outside the mask, a 3 x 3
dilation minus the mask). The edge map is the pixel-wise maximum over masks, linearly
normalised to [0, 1] and thinned by the standard structured-edge NMS (Dollár & Zitnick's
``edgesNms``, with orientation from the edge map itself), then normalised again (the NMS
smooths first, which halves a 1-px line; a monotone rescaling changes no ranking but lets the
thresholds span the whole map).

Matching follows the BSDS benchmark: at each of 99 thresholds the binary map is thinned
(``bwmorph(..., 'thin', inf)``) and matched to each human boundary map one to one, a pair
being allowed within 0.0075 x the image diagonal. Recall sums over annotators; a predicted
pixel counts as correct if it matches any annotator. ODS is the best F at one threshold for
the dataset (interpolated between thresholds), OIS the F of the per-image best thresholds, AP
the area under the PR curve, R50 the recall at 50 % precision (as in Dollár's
``edgesEvalDir``; 0 when precision never reaches 50 %).

The correspondence is a maximum-cardinality bipartite matching (Hopcroft-Karp, scipy) over
the pixel pairs within the tolerance. The benchmark's own ``correspondPixels`` solves a
min-cost assignment whose outlier cost (100 x the tolerance) makes it maximise the number of
matches first, so the counts agree (``tests/test_eval_edges.py`` checks this against
pyEdgeEval's build of that C++); ours is exact and deterministic, where the benchmark's solver
samples its outlier edges with a clock-seeded RNG and varies by a few pixels between runs,
and it is 20-60x faster. Thinning and NMS come from pyEdgeEval (the structured-edge toolbox's
``edgesNms`` compiled from its C++, and a lookup-table ``bwmorph`` thin).

Baselines: ``sobel`` (Sobel gradient magnitude of the Gaussian-smoothed gray image, then the
same NMS) and ``canny`` (fraction of 25 Canny high thresholds at which a pixel is an edge; low
threshold = high / 2; Canny thins its own edges, so no further NMS).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch

from samkit.errors import SamkitError
from samkit.eval.common import ErrorLog, MethodLoop
from samkit.eval.datasets import Dataset
from samkit.eval.predictors import PromptPredictor, PromptBatch
from samkit.masks import batched_mask_to_box, batched_nms, build_point_grid

MAX_DIST = 0.0075
DEFAULT_THRESHOLDS = 99
DEFAULT_POINTS_PER_SIDE = 16
BOX_NMS_THRESH = 0.7
POINTS_PER_BATCH = 64
CANNY_HIGH_THRESHOLDS = np.linspace(10, 250, 25)

EdgeMethod = Callable[[np.ndarray], np.ndarray]


def _edge_libs() -> Any:
    """pyEdgeEval's ``(binary_thin, fast_nms)``, or a clear error if it is not installed."""
    try:
        from pyEdgeEval.preprocess import binary_thin, fast_nms
    except ImportError:
        raise SamkitError(
            "`eval edges` needs pyEdgeEval (edge NMS and thinning): pip install 'samkit[eval]'"
        ) from None
    return binary_thin, fast_nms


# ---------------------------------------------------------------------------- edge maps
def unit_range(edge: np.ndarray) -> np.ndarray:
    """Linear normalisation to [0, 1] (an all-zero map stays zero)."""
    low, high = float(edge.min()), float(edge.max())
    return (edge - low) / (high - low) if high > low else np.zeros_like(edge)


def edge_nms(edge: np.ndarray) -> np.ndarray:
    """Structured-edge NMS (``edgesNms``, r=1, s=5, m=1.01; orientation from the map), then
    normalised to [0, 1] again: its initial smoothing halves a 1-px line, and the benchmark's
    thresholds span [0, 1]."""
    _, fast_nms = _edge_libs()
    return unit_range(fast_nms(edge.astype(np.float64), r=1, s=5, m=1.01).astype(np.float32))


class SamEdges:
    """SAM's zero-shot edge map for one image (see the module docstring)."""

    def __init__(self, predictor: PromptPredictor, points_per_side: int = DEFAULT_POINTS_PER_SIDE):
        self.predictor = predictor
        self.name = predictor.name
        self.points_per_side = points_per_side

    def __call__(self, image: np.ndarray) -> np.ndarray:
        self.predictor.set_image(image)
        h, w = image.shape[:2]
        points = build_point_grid(self.points_per_side) * np.array([w, h])
        candidates = [self._decode(points[i : i + POINTS_PER_BATCH])
                      for i in range(0, len(points), POINTS_PER_BATCH)]
        boxes = torch.cat([c.boxes for c in candidates])
        scores = torch.cat([c.scores for c in candidates])
        kept = np.zeros(len(boxes), bool)
        kept[batched_nms(boxes, scores, torch.zeros(len(boxes), dtype=torch.long),
                         BOX_NMS_THRESH).numpy()] = True
        edge = np.zeros(h * w, np.float32)
        offset = 0
        for c in candidates:
            chosen = kept[offset + c.mask_index]
            np.maximum.at(edge, c.pixels[chosen], c.values[chosen])
            offset += len(c.boxes)
        return edge_nms(unit_range(edge.reshape(h, w)))

    def _decode(self, points: np.ndarray) -> _Candidates:
        """The 3 masks of each of ``P`` single-point prompts, reduced to what NMS and the edge
        map need, so full-resolution logits exist for one batch at a time."""
        prompts = PromptBatch(points=points[:, None], labels=np.ones((len(points), 1), np.int64))
        pred = self.predictor.predict(prompts, multimask=True)
        logits = pred.logits.reshape(-1, *pred.logits.shape[2:])
        mask_index, pixels, values = outer_boundary_sobel(logits)
        return _Candidates(
            boxes=batched_mask_to_box(torch.from_numpy(logits > 0)).float(),
            scores=torch.from_numpy(pred.scores.reshape(-1)).float(),
            mask_index=mask_index,
            pixels=pixels,
            values=values,
        )


@dataclass(frozen=True)
class _Candidates:
    """A batch of masks: boxes and predicted IoUs for NMS, and the non-zero edge responses
    as (mask, flat pixel index, value) triples; they lie on mask outlines only, so this is
    small next to the logits."""

    boxes: torch.Tensor
    scores: torch.Tensor
    mask_index: np.ndarray
    pixels: np.ndarray
    values: np.ndarray


def outer_boundary_sobel(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sobel magnitude of the mask probabilities (sigmoid of ``K x H x W`` logits, edges
    replicated) at each mask's outer boundary pixels (3 x 3 dilation minus the mask), as
    (mask index, flat pixel index, value) arrays. Only those pixels are ever computed."""
    inside = logits > 0
    dilated = inside.copy()  # separable 3 x 3 dilation: rows, then columns
    dilated[:, 1:] |= inside[:, :-1]
    dilated[:, :-1] |= inside[:, 1:]
    rows = dilated.copy()
    dilated[:, :, 1:] |= rows[:, :, :-1]
    dilated[:, :, :-1] |= rows[:, :, 1:]
    k, y, x = np.nonzero(dilated & ~inside)
    h, w = logits.shape[1:]

    def prob(dy: int, dx: int) -> np.ndarray:
        yy, xx = np.clip(y + dy, 0, h - 1), np.clip(x + dx, 0, w - 1)
        return 1 / (1 + np.exp(-logits[k, yy, xx].astype(np.float64)))

    n, s_, e, w_ = prob(-1, 0), prob(1, 0), prob(0, 1), prob(0, -1)
    ne, nw, se, sw = prob(-1, 1), prob(-1, -1), prob(1, 1), prob(1, -1)
    gx = (ne + 2 * e + se) - (nw + 2 * w_ + sw)
    gy = (sw + 2 * s_ + se) - (nw + 2 * n + ne)
    return k, y * w + x, np.hypot(gx, gy).astype(np.float32)


def sobel_edges(image: np.ndarray) -> np.ndarray:
    """Baseline: Sobel gradient magnitude of the smoothed gray image, normalised, NMS."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    gray = cv2.GaussianBlur(gray, (0, 0), 1.0)
    magnitude = cv2.magnitude(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))
    return edge_nms(unit_range(magnitude))


def canny_edges(image: np.ndarray) -> np.ndarray:
    """Baseline: the fraction of Canny high thresholds at which each pixel is an edge."""
    gray = cv2.GaussianBlur(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), (0, 0), 1.0)
    votes = sum((cv2.Canny(gray, t / 2, t) > 0).astype(np.float32) for t in CANNY_HIGH_THRESHOLDS)
    return votes / len(CANNY_HIGH_THRESHOLDS)


BASELINES: dict[str, EdgeMethod] = {"sobel": sobel_edges, "canny": canny_edges}


# ---------------------------------------------------------------------------- matching
def thresholds(count: int = DEFAULT_THRESHOLDS) -> np.ndarray:
    """The benchmark's thresholds: ``count`` evenly spaced values strictly inside (0, 1)."""
    return np.linspace(1 / (count + 1), 1 - 1 / (count + 1), count)


@dataclass(frozen=True)
class BoundaryCounts:
    """Per threshold: matched / total ground-truth pixels (recall) and matched / total
    predicted pixels (precision)."""

    cnt_r: np.ndarray
    sum_r: np.ndarray
    cnt_p: np.ndarray
    sum_p: np.ndarray


def boundary_counts(
    edge: np.ndarray, gts: list[np.ndarray], thrs: np.ndarray, max_dist: float = MAX_DIST
) -> BoundaryCounts:
    """Match ``edge`` (``H x W`` in [0, 1]) against the human maps at every threshold."""
    binary_thin, _ = _edge_libs()
    n = len(thrs)
    cnt_r, sum_r, cnt_p, sum_p = (np.zeros(n) for _ in range(4))
    radius = max_dist * float(np.hypot(*edge.shape[:2]))
    previous: tuple[np.ndarray, tuple[float, float, float]] | None = None
    for i, t in enumerate(thrs):
        bmap = binary_thin(edge >= t)
        if previous is not None and np.array_equal(bmap, previous[0]):
            cnt_r[i], cnt_p[i], sum_p[i] = previous[1]  # same map, same matching
        else:
            cnt_r[i], cnt_p[i], sum_p[i] = _match_all(bmap, gts, radius)
            previous = (bmap, (cnt_r[i], cnt_p[i], sum_p[i]))
        sum_r[i] = float(sum(int(g.sum()) for g in gts))
    return BoundaryCounts(cnt_r, sum_r, cnt_p, sum_p)


def _match_all(
    bmap: np.ndarray, gts: list[np.ndarray], radius: float
) -> tuple[float, float, float]:
    """(ground-truth pixels matched, summed over annotators; predicted pixels matched to any
    annotator; predicted pixels)."""
    matched_pred = np.zeros(bmap.shape, bool)
    matched_gt = 0
    for gt in gts:
        pred_hits, gt_hits = match_pixels(bmap, gt, radius)
        matched_pred |= pred_hits
        matched_gt += gt_hits
    return float(matched_gt), float(matched_pred.sum()), float(bmap.sum())


def match_pixels(pred: np.ndarray, gt: np.ndarray, radius: float) -> tuple[np.ndarray, int]:
    """One-to-one correspondence of the pixels of two ``H x W`` bool maps, pairs at most
    ``radius`` apart: the predicted pixels that are matched (``H x W`` bool) and how many
    ground-truth pixels are."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching
    from scipy.spatial import cKDTree

    p, g = np.argwhere(pred), np.argwhere(gt)
    hits = np.zeros(pred.shape, bool)
    if len(p) == 0 or len(g) == 0:
        return hits, 0
    pairs = cKDTree(p).sparse_distance_matrix(cKDTree(g), radius, output_type="ndarray")
    graph = csr_matrix((np.ones(len(pairs)), (pairs["i"], pairs["j"])), shape=(len(p), len(g)))
    partner = maximum_bipartite_matching(graph, perm_type="column")  # per predicted pixel
    matched = partner >= 0
    hits[p[matched, 0], p[matched, 1]] = True
    return hits, int(matched.sum())


# ---------------------------------------------------------------------------- scores
def _rpf(cnt_r: Any, sum_r: Any, cnt_p: Any, sum_p: Any) -> tuple[Any, Any, Any]:
    r = cnt_r / np.maximum(sum_r, 1e-12)
    p = cnt_p / np.maximum(sum_p, 1e-12)
    return r, p, _f(r, p)


def _f(r: Any, p: Any) -> Any:
    return 2 * p * r / np.maximum(p + r, 1e-12)


def _best_interpolated(thrs: np.ndarray, r: np.ndarray, p: np.ndarray) -> tuple[float, ...]:
    """Best (threshold, R, P, F) along the PR curve, interpolating linearly between
    consecutive thresholds in 100 steps (``findBestRPF``)."""
    if len(thrs) == 1:
        return float(thrs[0]), float(r[0]), float(p[0]), float(_f(r[0], p[0]))
    a = np.linspace(0, 1, 100)[None, :]
    ri = r[1:, None] * a + r[:-1, None] * (1 - a)
    pi = p[1:, None] * a + p[:-1, None] * (1 - a)
    ti = thrs[1:, None] * a + thrs[:-1, None] * (1 - a)
    fi = _f(ri, pi)
    k = np.unravel_index(int(np.argmax(fi)), fi.shape)
    return float(ti[k]), float(ri[k]), float(pi[k]), float(fi[k])


def edge_scores(per_image: list[BoundaryCounts], thrs: np.ndarray) -> dict[str, Any]:
    """ODS / OIS / AP / R50 and the dataset PR curve from per-image counts."""
    if not per_image:
        return {"images": 0}
    fields = ("cnt_r", "sum_r", "cnt_p", "sum_p")
    r, p, _ = _rpf(*(np.sum([getattr(c, k) for c in per_image], axis=0) for k in fields))
    ods_t, ods_r, ods_p, ods_f = _best_interpolated(thrs, r, p)
    best = [_best_threshold(c) for c in per_image]
    ois_r, ois_p, ois_f = _rpf(*(
        sum(getattr(c, k)[i] for c, i in zip(per_image, best, strict=True)) for k in fields
    ))
    return {
        "images": len(per_image),
        "ods": ods_f,
        "ois": float(ois_f),
        "ap": average_precision(r, p),
        "r50": recall_at_half_precision(r, p),
        "ods_threshold": ods_t,
        "ods_recall": ods_r,
        "ods_precision": ods_p,
        "ois_recall": float(ois_r),
        "ois_precision": float(ois_p),
        "pr_curve": {"thresholds": thrs.tolist(), "recall": r.tolist(), "precision": p.tolist()},
    }


def _best_threshold(counts: BoundaryCounts) -> int:
    """Index of an image's best-F threshold (the last one on ties, as the benchmark)."""
    f = _rpf(counts.cnt_r, counts.sum_r, counts.cnt_p, counts.sum_p)[2]
    return len(f) - 1 - int(np.argmax(f[::-1]))


def average_precision(r: np.ndarray, p: np.ndarray) -> float:
    """Area under the PR curve: precision interpolated at recall 0, 0.01, ..., 1 within the
    curve's recall range, summed, / 100 (BSDS ``collect_eval_bdry`` / ``edgesEvalDir``)."""
    r_unique, first = np.unique(r, return_index=True)
    if len(r_unique) < 2:
        return 0.0
    grid = np.linspace(0, 1, 101)
    inside = (grid >= r_unique[0]) & (grid <= r_unique[-1])
    return float(np.interp(grid[inside], r_unique, p[first]).sum() / 100)


def recall_at_half_precision(r: np.ndarray, p: np.ndarray) -> float:
    """Recall where the PR curve crosses precision 0.5 (at the lowest precision if the
    whole curve is above 0.5; 0 if it never reaches 0.5)."""
    p_unique, first = np.unique(p, return_index=True)
    if p_unique[-1] < 0.5:
        return 0.0
    return float(np.interp(max(p_unique[0], 0.5), p_unique, r[first]))


# ---------------------------------------------------------------------------- runner
def run_edges(
    datasets: list[Dataset], methods: list[tuple[str, EdgeMethod]], log: ErrorLog,
    thrs: np.ndarray, max_dist: float = MAX_DIST,
) -> list[dict[str, Any]]:
    """Every edge method on every BSDS-style dataset."""
    _edge_libs()  # fail before any slow work if pyEdgeEval is missing
    return [_run_dataset(ds, methods, log, thrs, max_dist) for ds in datasets]


def _run_dataset(
    dataset: Dataset, methods: list[tuple[str, EdgeMethod]], log: ErrorLog,
    thrs: np.ndarray, max_dist: float,
) -> dict[str, Any]:
    counts: dict[str, list[BoundaryCounts]] = {name: [] for name, _ in methods}
    loop = MethodLoop([(name, lambda sample, method=method: method(sample.image))
                       for name, method in methods])
    for sample, name, edge in loop.run(dataset, log, desc=f"edges {dataset.name}"):
        counts[name].append(boundary_counts(edge, sample.boundaries, thrs, max_dist))
    results = {}
    for name, per_image in counts.items():
        results[name] = edge_scores(per_image, thrs)
        results[name]["edge_seconds"] = round(loop.seconds[name], 3)
    return {"images_evaluated": loop.images, "methods": results}
