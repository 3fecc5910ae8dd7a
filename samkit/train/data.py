"""Training data: mask sources, augmentation and batching.

A *source* yields ``(image uint8 H x W x 3, masks N x H x W bool)`` for an index:

* :class:`FolderSource`: ``images/<stem>.jpg`` + ``masks/<stem>.png`` where the PNG is binary
  (0/255) or an id map (0 = background, 1..N = segments); every non-zero id is one mask.
* :class:`CocoSource`: a COCO instances JSON + image folder (``annToMask``; crowd skipped).
* :class:`SA1BSource`: SA-1B style per-image JSON with COCO RLE (``samkit.data.sa1b``).

:class:`TrainDataset` turns a source image into a training sample: horizontal flip and
large-scale jitter (paper App. A uses LSJ, scale 0.1-2.0, "when training with limited
data"), expressed relative to the inference resize so scale 1 *is* resize-longest-side to the
model input size; optional copy-paste; then mask filtering and sampling. Each sample's
randomness comes from ``(seed, epoch, index)`` alone, so the data is the same whatever the
number of workers or processes and a resumed run sees exactly what it would have seen.

The padding to the square input is not materialised for masks: a sample is the *valid*
``h x w`` top-left region of the padded ``S x S`` frame (exactly as inference pads), and
:func:`collate` pads only the images.
"""

from __future__ import annotations

import warnings
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from samkit.data.coco import image_objects, open_coco
from samkit.data.masks import object_masks, read_mask_objects
from samkit.errors import SamkitError
from samkit.images import load_image, preprocess_shape
from samkit.io import is_image_file
from samkit.train.features import FeatureCache
from samkit.train.text import TextCache

# Retries of the random jitter when it leaves no usable mask (e.g. scale 0.1 on small objects).
JITTER_ATTEMPTS = 3


# ----------------------------------------------------------------------------------- sources
class MaskSource(Protocol):
    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(image H x W x 3 uint8, masks N x H x W bool)``."""
        ...


class FolderSource:
    """``root/images/<stem>.{jpg,jpeg,png}`` paired with ``root/masks/<stem>.png``."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        images, masks = root / "images", root / "masks"
        if not images.is_dir() or not masks.is_dir():
            raise SamkitError(f"{root} needs images/ and masks/ folders")
        self.pairs = [
            (p, masks / f"{p.stem}.png")
            for p in sorted(images.iterdir())
            if is_image_file(p) and (masks / f"{p.stem}.png").is_file()
        ]
        if not self.pairs:
            raise SamkitError(f"no image with a matching masks/<stem>.png in {root}")

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The image and its masks by the one mask-PNG rule (:mod:`samkit.data.masks`)."""
        image_path, mask_path = self.pairs[index]
        image = load_image(image_path)
        size = image.shape[:2]
        return image, object_masks(read_mask_objects(mask_path, size), size)


class CocoSource:
    """COCO instances (read as evaluation reads them, :mod:`samkit.data.coco`): one sample per
    image with at least one non-crowd annotation."""

    def __init__(self, annotation_file: str | Path, image_dir: str | Path) -> None:
        if not Path(annotation_file).is_file():
            raise SamkitError(f"COCO annotation file not found: {annotation_file}")
        self.coco, dropped = open_coco(Path(annotation_file))
        if dropped:
            warnings.warn(f"{annotation_file}: {len(dropped)} annotations with a bad "
                          f"segmentation left out (first: {dropped[0]})", stacklevel=2)
        self.image_dir = Path(image_dir)
        self.image_ids = sorted(
            i for i in self.coco.imgs
            if any(not a.get("iscrowd", 0) for a in self.coco.imgToAnns.get(i, []))
        )

    def __len__(self) -> int:
        return len(self.image_ids)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_id = self.image_ids[index]
        image = load_image(self.image_dir / self.coco.imgs[image_id]["file_name"])
        objects, _ = image_objects(self.coco, image_id)  # empty masks add nothing to the loss
        if objects and objects[0].mask.shape != image.shape[:2]:
            raise SamkitError(f"COCO image {image_id}: masks {objects[0].mask.shape} vs image "
                              f"{image.shape[:2]}")
        return image, object_masks(objects, image.shape[:2])


class SA1BSource:
    """SA-1B layout: ``sa_X.jpg`` next to ``sa_X.json``, or JSONs and images in two folders."""

    def __init__(self, json_dir: str | Path, image_dir: str | Path | None = None) -> None:
        from samkit.data.sa1b import SA1BDataset

        self.records = SA1BDataset(json_dir, image_dir)
        if len(self.records) == 0:
            raise SamkitError(f"no *.json annotation files in {json_dir}")

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        from samkit.data.sa1b import decode_masks

        record = self.records[index]
        image = load_image(record.image_path)
        masks = decode_masks(record)
        if masks.shape[1:] != image.shape[:2]:
            raise SamkitError(f"{record.json_path}: masks {masks.shape[1:]} vs image "
                              f"{image.shape[:2]}")
        return image, masks


def open_source(spec: str) -> MaskSource:
    """A source from a spec string.

    ``PATH`` (a folder with ``images/`` + ``masks/``, or a folder of SA-1B ``*.json``),
    ``folder:PATH``, ``coco:ANNOTATIONS.json:IMAGE_DIR`` or ``sa1b:JSON_DIR[:IMAGE_DIR]``.
    """
    kind, _, rest = spec.partition(":")
    if kind == "folder":
        return FolderSource(rest)
    if kind == "coco":
        annotations, _, image_dir = rest.partition(":")
        if not image_dir:
            raise SamkitError(f"coco source needs coco:ANNOTATIONS.json:IMAGE_DIR, got {spec!r}")
        return CocoSource(annotations, image_dir)
    if kind == "sa1b":
        json_dir, _, image_dir = rest.partition(":")
        return SA1BSource(json_dir, image_dir or None)
    path = Path(spec)
    if not path.exists():
        raise SamkitError(f"data source not found: {spec} (relative paths start at the "
                          f"working directory, {Path.cwd()})")
    if (path / "images").is_dir():
        return FolderSource(path)
    if path.is_dir() and any(path.glob("*.json")):
        return SA1BSource(path)
    raise SamkitError(
        f"cannot tell what data {spec!r} is: expected a folder with images/ + masks/, a "
        "folder of SA-1B JSONs, or coco:ANNOTATIONS.json:IMAGE_DIR"
    )


# ------------------------------------------------------------------------------ augmentation
@dataclass(frozen=True)
class AugmentConfig:
    image_size: int  # S, the square model input
    scale_range: tuple[float, float] = (0.1, 2.0)
    hflip: bool = True
    copy_paste: bool = False
    max_masks: int = 64
    min_mask_area: int = 16
    max_mask_fraction: float = 0.9


def large_scale_jitter(
    image: np.ndarray,
    masks: np.ndarray,
    size: int,
    scale: float,
    offset: tuple[float, float],
    flip: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Resize so the long side is ``scale * size``, crop a ``size`` square window if larger,
    and optionally flip horizontally.

    ``image`` H x W x 3, ``masks`` N x H x W; returns the valid top-left region of the
    padded ``size x size`` input: ``h x w x 3`` and ``N x h x w`` with ``h, w <= size``.
    ``offset`` in [0, 1)^2 picks the crop window (row, column) when the image overflows.
    """
    h, w = image.shape[:2]
    new_h, new_w = preprocess_shape(h, w, max(1, round(size * scale)))
    new_h, new_w = max(new_h, 1), max(new_w, 1)
    y0 = int(offset[0] * (max(new_h - size, 0) + 1))
    x0 = int(offset[1] * (max(new_w - size, 0) + 1))
    out_h, out_w = min(new_h, size), min(new_w, size)
    # INTER_AREA when shrinking: at scale 0.1 bilinear would alias badly.
    interp = cv2.INTER_AREA if new_h < h else cv2.INTER_LINEAR
    image = cv2.resize(image, (new_w, new_h), interpolation=interp)[y0:y0 + out_h, x0:x0 + out_w]
    # Nearest-neighbour source pixel of every output pixel (cv2's half-pixel convention, so
    # masks stay aligned with the image); only the kept window is computed.
    rows = np.minimum(((np.arange(out_h) + y0 + 0.5) * h / new_h).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(out_w) + x0 + 0.5) * w / new_w).astype(np.int64), w - 1)
    masks = masks[:, rows][:, :, cols]
    if flip:
        image, masks = image[:, ::-1], masks[:, :, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(masks)


def copy_paste(
    image: np.ndarray,
    masks: np.ndarray,
    other_image: np.ndarray,
    other_masks: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Paste a random non-empty subset of ``other``'s instances onto ``image`` (both already
    jittered, both anchored top-left); occluded parts are removed from ``masks``."""
    if len(other_masks) == 0:
        return image, masks
    h, w = image.shape[:2]
    ch, cw = min(h, other_image.shape[0]), min(w, other_image.shape[1])
    count = int(rng.integers(1, len(other_masks) + 1))
    chosen = np.sort(rng.choice(len(other_masks), count, replace=False))
    pasted = np.zeros((count, h, w), dtype=bool)
    pasted[:, :ch, :cw] = other_masks[chosen, :ch, :cw]
    union = pasted.any(0)
    image = image.copy()
    image[:ch, :cw][union[:ch, :cw]] = other_image[:ch, :cw][union[:ch, :cw]]
    return image, np.concatenate([masks & ~union, pasted])


def select_masks(
    masks: np.ndarray, rng: np.random.Generator, max_masks: int, min_area: int, max_fraction: float
) -> np.ndarray:
    """Drop tiny masks and masks covering more than ``max_fraction`` of the image, then sample
    at most ``max_masks`` (without replacement, keeping the original order)."""
    return masks[select_mask_indices(masks, rng, max_masks, min_area, max_fraction)]


def select_mask_indices(
    masks: np.ndarray, rng: np.random.Generator, max_masks: int, min_area: int, max_fraction: float
) -> np.ndarray:
    """The indices of the masks :func:`select_masks` keeps, in order."""
    h, w = masks.shape[1:]
    area = masks.reshape(len(masks), h * w).sum(1)
    indices = np.flatnonzero((area >= min_area) & (area <= max_fraction * h * w))
    if len(indices) > max_masks:
        indices = indices[np.sort(rng.choice(len(indices), max_masks, replace=False))]
    return indices


# ----------------------------------------------------------------------------------- dataset
@dataclass
class Sample:
    image: np.ndarray  # h x w x 3 uint8, the valid region of the S x S input
    masks: np.ndarray  # N x h x w bool (N = 0 when the image has no usable mask)
    prompt_seed: int  # seeds this image's prompt simulation
    features: tuple[torch.Tensor, ...] | None = None  # cached stem outputs (FeatureCache)
    # N x D cached CLIP crop embeddings of the masks (TextCache); NaN rows: none for that mask
    text_embeddings: np.ndarray | None = None


SampleKey = tuple[int, int]  # (epoch, index)


class TrainDataset(Dataset):
    """Concatenated sources with augmentation; indexed by ``(epoch, index)`` keys."""

    def __init__(self, sources: Sequence[MaskSource], aug: AugmentConfig, seed: int,
                 feature_cache: FeatureCache | None = None,
                 text_cache: TextCache | None = None) -> None:
        self.sources = list(sources)
        self.aug = aug
        self.seed = seed
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources]).tolist()
        if self.offsets[-1] == 0:
            raise SamkitError("the training data is empty")
        self.feature_cache = feature_cache
        if feature_cache is not None and (aug.scale_range != (1.0, 1.0) or aug.hflip
                                          or aug.copy_paste):
            raise SamkitError("cached stem features hold each image's inference view: "
                              "set scale_range: [1, 1], hflip: false, copy_paste: false")
        self.text_cache = text_cache
        if text_cache is not None and aug.copy_paste:
            raise SamkitError("text prompts embed each source mask once: set copy_paste: false")

    def __len__(self) -> int:
        return self.offsets[-1]

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        which = bisect_right(self.offsets, index) - 1
        return self.sources[which].load(index - self.offsets[which])

    def __getitem__(self, key: SampleKey) -> Sample:
        epoch, index = key
        rng = np.random.default_rng([self.seed, epoch, index])
        image, masks = self.jittered(index, rng)
        if self.aug.copy_paste:
            other_image, other_masks = self.jittered(int(rng.integers(len(self))), rng)
            image, masks = copy_paste(image, masks, other_image, other_masks, rng)
        kept = select_mask_indices(masks, rng, self.aug.max_masks, self.aug.min_mask_area,
                                   self.aug.max_mask_fraction)
        masks = masks[kept]
        # Jitter keeps the source's masks in order, so `kept` indexes the source masks.
        text = None if self.text_cache is None else self.text_cache.lookup(index, kept)
        features = None
        if self.feature_cache is not None:
            features, size = self.feature_cache.load(index)
            if tuple(size) != image.shape[:2]:
                raise SamkitError(f"feature cache image #{index} is {tuple(size)}, the data "
                                  f"gives {image.shape[:2]}: the cache is stale")
        return Sample(image, masks, int(rng.integers(2**62)), features, text)

    def inference_view(self, index: int) -> np.ndarray:
        """Image ``index`` as inference sees it (resized to the input size, no flip): what
        a feature cache stores."""
        image, masks = self.load(index)
        return large_scale_jitter(image, masks[:0], self.aug.image_size, 1.0, (0.0, 0.0),
                                  False)[0]

    def jittered(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Load and augment one image; re-draw the jitter if no usable mask survives (an
        image without any gives its last draw with no masks, which a step skips). An
        unreadable image is such an image (a black one without masks): the run goes on, with
        one warning naming the file, and the log counts it with the ``empty_images``."""
        try:
            source_image, source_masks = self.load(index)
        except SamkitError as err:
            warnings.warn(f"skipping unreadable training image #{index}: {err}", stacklevel=2)
            side = self.aug.image_size
            source_image = np.zeros((side, side, 3), np.uint8)
            source_masks = np.zeros((0, side, side), dtype=bool)
        if len(source_masks) == 0:
            source_masks = np.zeros((0, *source_image.shape[:2]), dtype=bool)
        for _ in range(JITTER_ATTEMPTS):
            flip = self.aug.hflip and bool(rng.random() < 0.5)
            scale = float(rng.uniform(*self.aug.scale_range))
            offset = (float(rng.random()), float(rng.random()))
            image, masks = large_scale_jitter(
                source_image, source_masks, self.aug.image_size, scale, offset, flip
            )
            area = masks.reshape(len(masks), image.shape[0] * image.shape[1]).sum(1)
            if (area >= self.aug.min_mask_area).any() or len(masks) == 0:
                break
        return image, masks


class ResumableSampler(DistributedSampler):
    """:class:`DistributedSampler` that yields ``(epoch, index)`` keys and can start part-way
    through an epoch (for exact resume). Works without an initialised process group."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int,
                 batch_size: int) -> None:
        super().__init__(dataset, num_replicas, rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.start = 0

    def set_position(self, epoch: int, batches_done: int) -> None:
        self.set_epoch(epoch)
        self.start = batches_done * self.batch_size

    def __iter__(self):  # type: ignore[override]
        indices = list(super().__iter__())[self.start:]
        return iter([(self.epoch, i) for i in indices])

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


# ---------------------------------------------------------------------------------- batching
@dataclass
class Batch:
    images: torch.Tensor  # B x 3 x S x S uint8, zero beyond each image's valid region
    sizes: torch.Tensor  # B x 2 (h, w) of each valid region
    masks: list[torch.Tensor]  # per image N_b x h_b x w_b bool
    prompt_seeds: list[int]
    features: tuple[torch.Tensor, ...] | None = None  # cached stem outputs, each B x ...
    text_embeddings: list[torch.Tensor] | None = None  # per image N_b x D (NaN: none)

    def pin_memory(self) -> Batch:
        """Called by the DataLoader (``pin_memory=True``) for faster host-to-GPU copies."""
        features = None if self.features is None else tuple(f.pin_memory()
                                                             for f in self.features)
        return Batch(self.images.pin_memory(), self.sizes,
                     [m.pin_memory() for m in self.masks], self.prompt_seeds, features,
                     self.text_embeddings)

    def to(self, device: torch.device) -> Batch:
        features = None if self.features is None else tuple(
            f.to(device, non_blocking=True) for f in self.features)
        return Batch(
            self.images.to(device, non_blocking=True),
            self.sizes,
            [m.to(device, non_blocking=True) for m in self.masks],
            self.prompt_seeds,
            features,
            None if self.text_embeddings is None else [
                t.to(device, non_blocking=True) for t in self.text_embeddings],
        )


def collate(samples: list[Sample], image_size: int) -> Batch:
    """Pad images bottom/right into ``B x 3 x S x S`` (the model normalises, then re-pads with
    zeros exactly like inference, see ``Sam.preprocess``)."""
    images = torch.zeros(len(samples), 3, image_size, image_size, dtype=torch.uint8)
    sizes = torch.zeros(len(samples), 2, dtype=torch.long)
    for i, s in enumerate(samples):
        h, w = s.image.shape[:2]
        images[i, :, :h, :w] = torch.from_numpy(s.image).permute(2, 0, 1)
        sizes[i] = torch.tensor([h, w])
    masks = [torch.from_numpy(s.masks) for s in samples]
    features = None
    if samples and samples[0].features is not None:
        features = tuple(torch.stack(f) for f in zip(*(s.features for s in samples),
                                                     strict=True))
    text = None
    if samples and samples[0].text_embeddings is not None:
        text = [torch.from_numpy(s.text_embeddings) for s in samples]
    return Batch(images, sizes, masks, [s.prompt_seed for s in samples], features, text)


def worker_init(_: int) -> None:
    """Keep each loader worker to one OpenCV thread; the workers already run in parallel."""
    cv2.setNumThreads(1)
