"""The small interface every evaluated method implements, and its SAM implementation.

Protocols talk to a :class:`PromptPredictor` only, so tests can inject an oracle (returns the
ground truth) or an empty predictor, and baselines (OpenCV GrabCut) run through exactly the
same harness and metrics as the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from samkit.modeling.sam import Sam
from samkit.predictor import SamPredictor, TextEncoder


@dataclass(frozen=True)
class PromptBatch:
    """A batch of B prompt sets for one image, in original-image pixels.

    ``points B x N x 2`` XY with ``labels B x N`` (1 foreground, 0 background), ``boxes B x 4``
    XYXY, ``mask_input B x 1 x h x w`` low-res logits from an earlier prediction, ``texts``
    B phrases (for a model with a text slot). Any may be ``None``, not all.
    """

    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    boxes: np.ndarray | None = None
    mask_input: np.ndarray | None = None
    texts: tuple[str, ...] | None = None

    def __len__(self) -> int:
        for part in (self.points, self.boxes, self.mask_input, self.texts):
            if part is not None:
                return len(part)
        return 0


@dataclass(frozen=True)
class Prediction:
    """``logits B x M x H x W`` float (foreground where > 0), ``scores B x M`` (the model's
    predicted IoU) and ``low_res B x M x h x w`` logits to feed back (``None`` for methods
    that take no mask input)."""

    logits: np.ndarray
    scores: np.ndarray
    low_res: np.ndarray | None

    @property
    def masks(self) -> np.ndarray:
        return self.logits > 0


class PromptPredictor(Protocol):
    """What a protocol needs from a method: embed an image once, then answer prompt batches."""

    name: str

    def set_image(self, image: np.ndarray) -> None:
        """Make ``image`` (``H x W x 3`` RGB uint8) the current image."""

    def predict(self, prompts: PromptBatch, multimask: bool) -> Prediction:
        """Masks for each prompt set of the batch; M = 3 with ``multimask`` (when the method
        supports it), else 1."""


class SamPromptPredictor:
    """:class:`~samkit.predictor.SamPredictor` behind the :class:`PromptPredictor` interface
    (``encoder_dtype`` and ``clip``, which embeds text prompts: see
    :class:`~samkit.predictor.SamPredictor`)."""

    def __init__(self, model: Sam, name: str, encoder_dtype: torch.dtype | None = None,
                 clip: TextEncoder | None = None) -> None:
        self.name = name
        self.predictor = SamPredictor(model, encoder_dtype=encoder_dtype, clip=clip)

    def set_image(self, image: np.ndarray) -> None:
        self.predictor.set_image(image)

    def predict(self, prompts: PromptBatch, multimask: bool) -> Prediction:
        logits, scores, low_res = self.predictor.predict_batch(
            prompts.points,
            prompts.labels,
            prompts.boxes,
            prompts.mask_input,
            multimask_output=multimask,
            return_logits=True,
            texts=None if prompts.texts is None else list(prompts.texts),
        )
        return Prediction(_numpy(logits), _numpy(scores), _numpy(low_res))


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.float().cpu().numpy()


class OnnxPromptPredictor:
    """An export's graphs (:meth:`~samkit.onnx.predictor.OnnxSamPredictor.from_folder`)
    behind the :class:`PromptPredictor` interface; the decoder graphs take one prompt set per
    run, so a batch is decoded prompt by prompt."""

    def __init__(self, folder: Path, int8: bool, name: str) -> None:
        from samkit.onnx.predictor import OnnxSamPredictor

        self.name = name
        self.predictor = OnnxSamPredictor.from_folder(folder, int8=int8)

    def set_image(self, image: np.ndarray) -> None:
        self.predictor.set_image(image)

    def predict(self, prompts: PromptBatch, multimask: bool) -> Prediction:
        outputs = [
            self.predictor.predict(
                None if prompts.points is None else prompts.points[i],
                None if prompts.labels is None else prompts.labels[i],
                None if prompts.boxes is None else prompts.boxes[i],
                None if prompts.mask_input is None else prompts.mask_input[i],
                multimask_output=multimask,
                return_logits=True,
            )
            for i in range(len(prompts))
        ]
        logits, scores, low_res = (np.stack(parts) for parts in zip(*outputs, strict=True))
        return Prediction(logits, scores, low_res)


def onnx_predictors(folder: Path) -> list[OnnxPromptPredictor]:
    """The fp32 and (when exported) int8 graph pairs of a ``samkit export-onnx`` folder."""
    from samkit.errors import SamkitError

    pairs = [("encoder.onnx", "decoder.onnx", False, "onnx fp32"),
             ("encoder.int8.onnx", "decoder.int8.onnx", True, "onnx int8")]
    found = [OnnxPromptPredictor(folder, int8, name) for enc, dec, int8, name in pairs
             if (folder / enc).is_file() and (folder / dec).is_file()]
    if not found:
        raise SamkitError(f"no encoder.onnx + decoder.onnx in {folder} (samkit export-onnx)")
    return found
