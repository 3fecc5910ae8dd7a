"""Segment everything: prompt SAM with a grid of points and keep the good, distinct masks
(paper §7.1 and App. B).

:class:`AutomaticMaskGenerator` is a drop-in for the official ``SamAutomaticMaskGenerator``
(same arguments, same records, same masks in the same order). It is faster and much lighter
on memory: the predicted-IoU filter runs before any mask is upscaled, full-resolution logits
exist only for a bounded chunk of masks at a time, and each chunk is reduced to boxes and
run-length encodings straight away.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from samkit.errors import SamkitError
from samkit.images import to_rgb_uint8
from samkit.masks import (
    batched_mask_to_box,
    batched_nms,
    box_area,
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    calculate_stability_score,
    generate_crop_boxes,
    is_box_near_crop_edge,
    remove_small_regions,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)
from samkit.modeling.sam import Sam
from samkit.predictor import EmbeddedImage, SamPredictor
from samkit.rle import Rle, area_from_rle, coco_encode_rle, masks_to_rle, rle_to_mask

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


@dataclass
class _Proposals:
    """Compact data for N candidate masks, on the CPU; the masks themselves only as RLE."""

    rles: list[Rle]
    boxes: torch.Tensor  # N x 4 int64 XYXY (inclusive max corner)
    iou_preds: torch.Tensor  # N float32, the model's predicted IoU
    stability: torch.Tensor  # N float32
    points: torch.Tensor  # N x 2 float64 (x, y), the prompt that produced the mask
    crop_boxes: torch.Tensor  # N x 4 int64 XYXY crop the mask was predicted in

    def __len__(self) -> int:
        return len(self.rles)

    def select(self, index: torch.Tensor) -> _Proposals:
        """Keep (and reorder to) the int64 positions ``index``."""
        return _Proposals(
            rles=[self.rles[i] for i in index.tolist()],
            boxes=self.boxes[index],
            iou_preds=self.iou_preds[index],
            stability=self.stability[index],
            points=self.points[index],
            crop_boxes=self.crop_boxes[index],
        )

    @staticmethod
    def concat(parts: Sequence[_Proposals]) -> _Proposals:
        if not parts:
            return _Proposals.empty()
        return _Proposals(
            rles=[rle for part in parts for rle in part.rles],
            boxes=torch.cat([p.boxes for p in parts]),
            iou_preds=torch.cat([p.iou_preds for p in parts]),
            stability=torch.cat([p.stability for p in parts]),
            points=torch.cat([p.points for p in parts]),
            crop_boxes=torch.cat([p.crop_boxes for p in parts]),
        )

    @staticmethod
    def empty() -> _Proposals:
        return _Proposals(
            rles=[],
            boxes=torch.empty(0, 4, dtype=torch.long),
            iou_preds=torch.empty(0),
            stability=torch.empty(0),
            points=torch.empty(0, 2, dtype=torch.float64),
            crop_boxes=torch.empty(0, 4, dtype=torch.long),
        )


class AutomaticMaskGenerator:
    """Generates masks for a whole image from a grid of point prompts.

    Arguments are the official ones (defaults tuned for ViT-H):

    * ``points_per_side`` / ``point_grids``: exactly one; a regular grid of ``n x n`` points,
      or explicit ``N x 2`` grids in ``[0, 1]`` (one per crop layer).
    * ``points_per_batch``: prompts decoded together.
    * ``pred_iou_thresh`` / ``stability_score_thresh`` in ``[0, 1]``: quality filters (0 = off);
      ``stability_score_offset``: logit shift used for the stability score.
    * ``box_nms_thresh``: box-IoU cut-off for duplicates within a crop.
    * ``crop_n_layers``: extra layers of ``2^i x 2^i`` overlapping crops, with
      ``crop_overlap_ratio`` overlap, ``crop_nms_thresh`` for duplicates across crops, and
      ``crop_n_points_downscale_factor`` fewer points per side per layer.
    * ``min_mask_region_area``: fill holes and drop islands smaller than this (0 = off).
    * ``output_mode``: ``"binary_mask"``, ``"uncompressed_rle"`` or ``"coco_rle"``.

    samkit's addition: ``encoder_dtype=torch.bfloat16`` embeds each crop under bf16 autocast
    (see :class:`~samkit.predictor.SamPredictor`).
    """

    # Bound on the full-resolution logit pixels held at once (64 Mi float32 = 256 MiB).
    pixels_per_chunk: int = 1 << 26

    def __init__(
        self,
        model: Sam,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Sequence[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        encoder_dtype: torch.dtype | None = None,
    ) -> None:
        _check_int("points_per_batch", points_per_batch, 1)
        _check_int("crop_n_layers", crop_n_layers, 0)
        _check_int("crop_n_points_downscale_factor", crop_n_points_downscale_factor, 1)
        _check_int("min_mask_region_area", min_mask_region_area, 0)
        for name, value in (
            ("pred_iou_thresh", pred_iou_thresh),
            ("stability_score_thresh", stability_score_thresh),
            ("box_nms_thresh", box_nms_thresh),
            ("crop_nms_thresh", crop_nms_thresh),
        ):
            _check_range(name, value, 0.0, 1.0)
        _check_range("stability_score_offset", stability_score_offset, 0.0, float("inf"))
        _check_range("crop_overlap_ratio", crop_overlap_ratio, 0.0, 1.0, high_open=True)
        if output_mode not in OUTPUT_MODES:
            raise SamkitError(
                f"output_mode must be one of {', '.join(OUTPUT_MODES)}; got {output_mode!r}"
            )
        self.point_grids = _layer_point_grids(
            points_per_side, point_grids, crop_n_layers, crop_n_points_downscale_factor
        )
        self.predictor = SamPredictor(model, encoder_dtype=encoder_dtype)
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode

    @torch.inference_mode()
    def generate(self, image: np.ndarray,
                 embedding: EmbeddedImage | None = None) -> list[dict[str, Any]]:
        """Masks for an ``H x W x 3`` RGB uint8 image, as official records: ``segmentation``
        (per ``output_mode``), ``area``, ``bbox`` (XYWH), ``predicted_iou``, ``point_coords``
        (``[[x, y]]``), ``stability_score`` and ``crop_box`` (XYWH).

        ``embedding``: the whole image's embedding computed earlier
        (:meth:`SamPredictor.get_embedding`, e.g. from a cache), used for the uncropped layer
        instead of encoding the image again."""
        image = to_rgb_uint8(image)
        if embedding is not None and tuple(embedding.original_size) != image.shape[:2]:
            raise SamkitError(f"the embedding is of a {embedding.original_size} image, not "
                              f"{image.shape[:2]}")
        proposals = self._generate_proposals(image, embedding)
        if self.min_mask_region_area > 0:
            proposals = self._clean_small_regions(proposals)
        return self._records(proposals)

    # ------------------------------------------------------------------ pipeline
    def _generate_proposals(self, image: np.ndarray,
                            embedding: EmbeddedImage | None) -> _Proposals:
        orig_size = (image.shape[0], image.shape[1])
        crop_boxes, layers = generate_crop_boxes(
            orig_size, self.crop_n_layers, self.crop_overlap_ratio
        )
        proposals = _Proposals.concat(
            [self._process_crop(image, box, layer, embedding if layer == 0 else None)
             for box, layer in zip(crop_boxes, layers)]
        )
        if len(crop_boxes) > 1:
            # Across crops, prefer masks from smaller crops: they saw the object in more detail.
            scores = 1 / box_area(proposals.crop_boxes)
            proposals = proposals.select(_nms(proposals.boxes, scores, self.crop_nms_thresh))
        return proposals

    def _process_crop(self, image: np.ndarray, crop_box: list[int], layer: int,
                      embedding: EmbeddedImage | None) -> _Proposals:
        x0, y0, x1, y1 = crop_box
        if embedding is None:
            self.predictor.set_image(image[y0:y1, x0:x1])
        else:  # layer 0 is the whole image
            self.predictor.set_embedding(embedding)
        points = self.point_grids[layer] * np.array([x1 - x0, y1 - y0])
        orig_size = (image.shape[0], image.shape[1])
        batches = [
            self._process_batch(points[start : start + self.points_per_batch], crop_box, orig_size)
            for start in range(0, len(points), self.points_per_batch)
        ]
        self.predictor.reset_image()
        proposals = _Proposals.concat(batches)
        # Duplicates within the crop: keep the mask the model rates best.
        keep = _nms(proposals.boxes, proposals.iou_preds, self.box_nms_thresh)
        proposals = proposals.select(keep)
        return replace(
            proposals,
            boxes=uncrop_boxes_xyxy(proposals.boxes, crop_box),
            points=uncrop_points(proposals.points, crop_box),
        )

    def _process_batch(
        self, points: np.ndarray, crop_box: list[int], orig_size: tuple[int, int]
    ) -> _Proposals:
        """Decode ``P x 2`` points (crop pixels) into 3 masks each, filter, and reduce the
        survivors to compact data."""
        low_res, iou_preds = self._decode(points)  # 3P x h x w, 3P
        # Each point's 3 masks are consecutive rows.
        prompts = torch.as_tensor(points).repeat_interleave(len(iou_preds) // len(points), dim=0)
        if self.pred_iou_thresh > 0:
            candidates = (iou_preds > self.pred_iou_thresh).nonzero()[:, 0]
        else:
            candidates = torch.arange(len(iou_preds), device=iou_preds.device)
        crop_h, crop_w = self.predictor.original_size
        # Upscaling goes through the padded square input, then to the crop size.
        pixels_per_mask = self.predictor.model.image_size**2 + crop_h * crop_w
        chunk = max(1, self.pixels_per_chunk // pixels_per_mask)
        chunks = [candidates[i : i + chunk] for i in range(0, len(candidates), chunk)]
        return _Proposals.concat([
            self._reduce_chunk(low_res, iou_preds, prompts, index, crop_box, orig_size)
            for index in chunks
        ])

    def _decode(self, points: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``P x 2`` crop pixels -> low-res logits ``3P x h x w`` and predicted IoUs ``3P``
        (mask-major per point, like ``predict_torch(...)[k].flatten(0, 1)``)."""
        predictor, model = self.predictor, self.predictor.model
        assert predictor.original_size is not None
        coords = predictor.transform.apply_coords(points, predictor.original_size)
        # float64 like the official pipeline, so point encodings match it bit for bit.
        dtype = torch.float32 if predictor.device.type == "mps" else torch.float64
        coords_t = torch.as_tensor(coords, dtype=dtype, device=predictor.device)[:, None]
        labels = torch.ones(len(points), 1, dtype=torch.int, device=predictor.device)
        sparse, dense = model.prompt_encoder(points=(coords_t, labels), boxes=None, masks=None)
        low_res, iou_preds = predictor.decode(sparse, dense, True, shared_dense=True)
        return low_res.flatten(0, 1), iou_preds.flatten(0, 1)

    def _reduce_chunk(
        self,
        low_res: torch.Tensor,
        iou_preds: torch.Tensor,
        prompts: torch.Tensor,
        index: torch.Tensor,
        crop_box: list[int],
        orig_size: tuple[int, int],
    ) -> _Proposals:
        """Upscale the masks at rows ``index`` (K of them) of ``low_res`` (``3P x h x w``),
        apply the stability and crop-edge filters, and encode what is left. ``iou_preds``
        and ``prompts`` (``3P x 2``, CPU) are row-aligned with ``low_res``."""
        predictor, model = self.predictor, self.predictor.model
        assert predictor.input_size is not None and predictor.original_size is not None
        logits = model.postprocess_masks(
            low_res[index, None], predictor.input_size, predictor.original_size
        )[:, 0]  # K x crop_h x crop_w
        stability = calculate_stability_score(
            logits, model.mask_threshold, self.stability_score_offset
        )
        masks = logits > model.mask_threshold
        del logits
        if self.stability_score_thresh > 0:
            stable = stability >= self.stability_score_thresh
            masks, stability, index = masks[stable], stability[stable], index[stable]
        boxes = batched_mask_to_box(masks)
        orig_h, orig_w = orig_size
        inside = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
        masks, boxes = masks[inside], boxes[inside]
        stability, index = stability[inside], index[inside]
        return _Proposals(
            rles=masks_to_rle(uncrop_masks(masks, crop_box, orig_h, orig_w)),
            boxes=boxes.cpu(),
            iou_preds=iou_preds[index].float().cpu(),
            stability=stability.float().cpu(),
            points=prompts[index.cpu()],
            crop_boxes=torch.tensor([crop_box]).expand(len(index), 4),
        )

    def _clean_small_regions(self, proposals: _Proposals) -> _Proposals:
        """Fill small holes, drop small islands, then NMS again preferring untouched masks
        (the clean-up can make two masks duplicates)."""
        if len(proposals) == 0:
            return proposals
        h, w = proposals.rles[0]["size"]
        chunk = max(1, self.pixels_per_chunk // (h * w))
        rles, boxes, untouched = [], [], []
        for start in range(0, len(proposals), chunk):
            chunk_rles = proposals.rles[start : start + chunk]
            cleaned = [self._clean_mask(rle_to_mask(rle)) for rle in chunk_rles]
            masks = torch.from_numpy(np.stack([mask for mask, _ in cleaned]))  # K x H x W
            changed = torch.tensor([was_changed for _, was_changed in cleaned])
            boxes.append(batched_mask_to_box(masks))
            new_rles = iter(masks_to_rle(masks[changed]))
            rles += [next(new_rles) if c else rle for rle, c in zip(chunk_rles, changed.tolist())]
            untouched.append(~changed)
        new_boxes, untouched_t = torch.cat(boxes), torch.cat(untouched)
        keep = _nms(new_boxes, untouched_t.float(), max(self.box_nms_thresh, self.crop_nms_thresh))
        cleaned_proposals = replace(
            proposals,
            rles=rles,
            boxes=torch.where(untouched_t[:, None], proposals.boxes, new_boxes),
        )
        return cleaned_proposals.select(keep)

    def _clean_mask(self, mask: np.ndarray) -> tuple[np.ndarray, bool]:
        """Holes first, then islands (OpenCV labels one mask at a time)."""
        mask, holes_changed = remove_small_regions(mask, self.min_mask_region_area, "holes")
        mask, islands_changed = remove_small_regions(mask, self.min_mask_region_area, "islands")
        return mask, holes_changed or islands_changed

    def _records(self, proposals: _Proposals) -> list[dict[str, Any]]:
        if self.output_mode == "binary_mask":
            segmentations: list[Any] = [rle_to_mask(rle) for rle in proposals.rles]
        elif self.output_mode == "coco_rle":
            segmentations = [coco_encode_rle(rle) for rle in proposals.rles]
        else:
            segmentations = proposals.rles
        columns = zip(
            segmentations,
            proposals.rles,
            box_xyxy_to_xywh(proposals.boxes).tolist(),
            proposals.iou_preds.tolist(),
            proposals.points.tolist(),
            proposals.stability.tolist(),
            box_xyxy_to_xywh(proposals.crop_boxes).tolist(),
        )
        return [
            {
                "segmentation": segmentation,
                "area": area_from_rle(rle),
                "bbox": bbox,
                "predicted_iou": iou,
                "point_coords": [point],
                "stability_score": stability,
                "crop_box": crop_box,
            }
            for segmentation, rle, bbox, iou, point, stability, crop_box in columns
        ]


# Official name, so that code written for ``segment_anything`` runs unchanged.
SamAutomaticMaskGenerator = AutomaticMaskGenerator


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Single-category NMS over ``N x 4`` boxes -> kept indices by decreasing score."""
    categories = torch.zeros(len(boxes), dtype=torch.long)
    return batched_nms(boxes.float(), scores, categories, iou_threshold)


def _layer_point_grids(
    points_per_side: int | None,
    point_grids: Sequence[np.ndarray] | None,
    crop_n_layers: int,
    downscale: int,
) -> list[np.ndarray]:
    """One ``N x 2`` grid in ``[0, 1]`` per crop layer, built or checked."""
    if (points_per_side is None) == (point_grids is None):
        raise SamkitError("give exactly one of points_per_side and point_grids")
    if points_per_side is not None:
        _check_int("points_per_side", points_per_side, 1)
        if int(points_per_side / downscale**crop_n_layers) < 1:
            raise SamkitError(
                f"points_per_side={points_per_side} with crop_n_points_downscale_factor="
                f"{downscale} leaves no points in crop layer {crop_n_layers}"
            )
        return build_all_layer_point_grids(points_per_side, crop_n_layers, downscale)
    assert point_grids is not None
    if len(point_grids) < crop_n_layers + 1:
        raise SamkitError(
            f"point_grids needs one grid per crop layer ({crop_n_layers + 1}), "
            f"got {len(point_grids)}"
        )
    grids = []
    for i, grid in enumerate(point_grids):
        try:
            grid = np.asarray(grid, dtype=np.float64)
        except (TypeError, ValueError):
            raise SamkitError(f"point_grids[{i}] is not an N x 2 array of numbers") from None
        if grid.ndim != 2 or grid.shape[1] != 2 or len(grid) == 0:
            raise SamkitError(f"point_grids[{i}] must be N x 2 with N >= 1, got {grid.shape}")
        if not (np.isfinite(grid).all() and (grid >= 0).all() and (grid <= 1).all()):
            raise SamkitError(f"point_grids[{i}] must hold (x, y) fractions in [0, 1]")
        grids.append(grid)
    return grids


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SamkitError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_range(name: str, value: Any, low: float, high: float, high_open: bool = False) -> None:
    is_number = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
    x = float(value) if is_number else math.nan  # NaN fails every comparison below
    if not (low <= x and (x < high if high_open else x <= high)):
        bracket = ")" if high_open else "]"
        raise SamkitError(f"{name} must be a number in [{low:g}, {high:g}{bracket}, got {value!r}")
