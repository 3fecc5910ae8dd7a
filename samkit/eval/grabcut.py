"""OpenCV GrabCut (Rother et al., SIGGRAPH 2004) as a :class:`PromptPredictor` baseline for
``eval points``: same prompts, same harness, same metrics as the model.

* **Box**: GrabCut's rectangle initialisation (outside is background, inside probably
  foreground), 5 iterations, as in the original paper.
* **Clicks**: the first click starts from everything probable background and a disc of radius
  ``max(8, 5 % of the image diagonal)`` around each positive click probable foreground. Later
  clicks start from the previous result (fed back through ``mask_input``, as the model gets
  its previous logits): its foreground probable foreground, the rest probable background,
  which is how GrabCut is used interactively. Every click adds a small disc (radius 3) of
  hard seed: definite foreground for positive clicks, definite background for negative ones.
  5 iterations.

GrabCut has no notion of several candidate masks: it returns one mask per prompt with score
1, and its full-resolution result as the "low-res logits" to feed back. OpenCV's RNG is
re-seeded before every call (its GMM initialisation uses k-means), so results are
deterministic.
"""

from __future__ import annotations

import cv2
import numpy as np

from samkit.eval.predictors import Prediction, PromptBatch

ITERATIONS = 5
SEED_RADIUS = 3
MIN_DISC_RADIUS = 8
DISC_FRACTION_OF_DIAGONAL = 0.05


class GrabCutPredictor:
    """GrabCut answering box or click prompts, one prompt set at a time."""

    name = "grabcut"

    def __init__(self) -> None:
        self.image: np.ndarray | None = None

    def set_image(self, image: np.ndarray) -> None:
        self.image = np.ascontiguousarray(image[..., ::-1])  # OpenCV wants BGR

    def predict(self, prompts: PromptBatch, multimask: bool) -> Prediction:
        assert self.image is not None, "set_image first"
        masks = []
        for b in range(len(prompts)):
            if prompts.points is None:
                assert prompts.boxes is not None
                masks.append(self._from_box(prompts.boxes[b]))
            else:
                assert prompts.labels is not None
                previous = None if prompts.mask_input is None else prompts.mask_input[b, 0] > 0
                masks.append(self._from_clicks(prompts.points[b], prompts.labels[b], previous))
        logits = np.where(np.stack(masks)[:, None], 1.0, -1.0).astype(np.float32)
        return Prediction(logits, np.ones((len(masks), 1), dtype=np.float32), logits)

    def _from_box(self, box: np.ndarray) -> np.ndarray:
        assert self.image is not None
        h, w = self.image.shape[:2]
        x0, y0 = int(np.floor(box[0])), int(np.floor(box[1]))
        x1, y1 = int(np.ceil(box[2])), int(np.ceil(box[3]))
        x0, y0 = max(0, x0), max(0, y0)
        # What cv2.GC_INIT_WITH_RECT sets up, spelled out so a failure can fall back to it.
        mask = np.full((h, w), cv2.GC_BGD, np.uint8)
        mask[y0 : max(y0 + 1, y1), x0 : max(x0 + 1, x1)] = cv2.GC_PR_FGD
        return self._run(mask)

    def _from_clicks(
        self, points: np.ndarray, labels: np.ndarray, previous: np.ndarray | None
    ) -> np.ndarray:
        assert self.image is not None
        h, w = self.image.shape[:2]
        mask = np.full((h, w), cv2.GC_PR_BGD, np.uint8)
        centres = [(int(x), int(y)) for x, y in np.round(points)]
        if previous is not None:
            mask[previous] = cv2.GC_PR_FGD
        else:
            disc = max(MIN_DISC_RADIUS, round(DISC_FRACTION_OF_DIAGONAL * np.hypot(h, w)))
            for centre, label in zip(centres, labels, strict=True):
                if label == 1:
                    cv2.circle(mask, centre, disc, cv2.GC_PR_FGD, -1)
        # Seeds last, so a negative click's seed wins over a positive click's wide disc.
        for centre, label in zip(centres, labels, strict=True):
            if label in (0, 1):
                seed = cv2.GC_FGD if label == 1 else cv2.GC_BGD
                cv2.circle(mask, centre, SEED_RADIUS, seed, -1)
        return self._run(mask)

    def _run(self, init: np.ndarray) -> np.ndarray:
        """GrabCut from an initial trimap; foreground = definite or probable foreground."""
        cv2.setRNGSeed(0)
        mask = init.copy()
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        try:
            cv2.grabCut(self.image, mask, None, bgd, fgd, ITERATIONS, cv2.GC_INIT_WITH_MASK)
        except cv2.error:
            # No background (or foreground) samples to fit a colour model, e.g. a box
            # covering the whole image: the initial labelling is GrabCut's only answer.
            mask = init
        return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
