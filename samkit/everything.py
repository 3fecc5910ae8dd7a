"""``samkit everything``: every mask in every image of a folder, written SA-1B style.

One JSON per image, in the SA-1B schema (see :mod:`samkit.data.sa1b`), named after the image's
path relative to the input folder. Runs are built to be stopped and restarted at any time and
split across processes or machines:

* **resumable** -- an image whose JSON exists and parses is skipped; each JSON is written to a
  temporary file, fsynced and renamed into place, so a killed run never leaves a half file
  under a final name;
* **sharded** -- ``--shard i/n`` takes every n-th image of the sorted list, starting at i, so
  n runs cover each image exactly once; under ``torchrun`` the rank and world size are used
  automatically (the ranks never talk to each other, so no process group is created);
* **forgiving** -- a bad file in a folder is reported on one line and skipped; the run goes
  on and exits 1 at the end (0 under torchrun, where a failed rank stops all the others).

The mask generator is injected (:data:`GeneratorFactory`), so the loop, the writer and the
resume logic are tested without a model; :class:`GeneratorSpec` is the real factory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from samkit.errors import SamkitError
from samkit.io import is_image_file, write_text_atomic
from samkit.jobs import Job, run_jobs
from samkit.loading import warn_if_untrained
from samkit.rle import to_coco_rle

# torch, the model, tqdm and pycocotools are imported where needed: `samkit --help` imports
# this module and should stay fast.

# Below this, upscaling to the model's input turns each pixel into a flat block of dozens of
# pixels: there is nothing to segment, and such files are almost always thumbnails or junk.
MIN_IMAGE_SIDE = 8
DEFAULT_OUT = Path("samkit_everything")
EXIT_SOME_FAILED = 1
ANNOTATION_FIELDS = (
    "area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box",
)

GenerateFn = Callable[[np.ndarray], list[dict[str, Any]]]


@dataclass(frozen=True)
class LoadedGenerator:
    """A ready mask generator: ``generate(image) -> records`` in the official
    ``SamAutomaticMaskGenerator.generate`` format, plus what the JSON records about the model."""

    generate: GenerateFn
    model_name: str
    trained: bool


# Called once per process (or Ray actor), and only once an image needs it.
GeneratorFactory = Callable[[], LoadedGenerator]


@dataclass(frozen=True)
class GeneratorSpec:
    """The real :data:`GeneratorFactory`: builds a SAM and an automatic mask generator.

    A plain picklable recipe, so Ray can ship it to actors that build the model themselves.
    ``device=None`` picks CUDA when available (GPU ``LOCAL_RANK`` under torchrun).
    """

    model: str
    checkpoint: Path | None = None
    device: str | None = None
    points_per_side: int = 32
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    crop_n_layers: int = 0
    min_mask_region_area: int = 0
    bf16: bool = False  # image encoder under bf16 autocast

    def __call__(self) -> LoadedGenerator:
        import torch

        from samkit.automatic import AutomaticMaskGenerator
        from samkit.loading import ModelChoice, build_model, resolve_device

        device = resolve_device(self.device, os.environ)
        model, trained = build_model(ModelChoice(self.model, self.checkpoint), device)
        generator = AutomaticMaskGenerator(
            model,
            points_per_side=self.points_per_side,
            pred_iou_thresh=self.pred_iou_thresh,
            stability_score_thresh=self.stability_score_thresh,
            crop_n_layers=self.crop_n_layers,
            min_mask_region_area=self.min_mask_region_area,
            output_mode="coco_rle",
            encoder_dtype=torch.bfloat16 if self.bf16 else None,
        )
        return LoadedGenerator(generator.generate, self.model, trained)


@dataclass(frozen=True)
class ImageItem:
    """An input image and its path relative to the input root (POSIX separators)."""

    path: Path
    rel: str

    @property
    def json_name(self) -> str:
        """Flat output name: ``/`` becomes ``%2F`` (and ``%`` becomes ``%25`` first, so two
        different paths can never share a name)."""
        return self.rel.replace("%", "%25").replace("/", "%2F") + ".json"

    @property
    def overlay_name(self) -> str:
        return self.json_name.removesuffix(".json") + ".overlay.png"


@dataclass
class RunSummary:
    done: int = 0
    skipped: int = 0
    failed: int = 0

    def __str__(self) -> str:
        return f"{self.done} done, {self.skipped} skipped (already done), {self.failed} failed"

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_FAILED if self.failed else 0


# --- finding and splitting the work -------------------------------------------------------


def collect_images(source: Path, pattern: str | None, exclude: Path) -> list[ImageItem]:
    """The images under ``source`` (a file or a folder), sorted by relative path.

    Without ``pattern`` a folder is searched recursively for image suffixes, skipping hidden
    files and folders (``.DS_Store``, macOS ``._x.jpg``). Files under ``exclude`` (the output
    folder, which may sit inside the input) are never inputs.
    """
    if source.is_file():
        if pattern is not None:
            raise SamkitError("--glob needs a folder, not a single image")
        return [ImageItem(source, source.name)]
    if not source.is_dir():
        raise SamkitError(f"no such image or folder: {source}")
    candidates = source.glob(pattern) if pattern else _default_images(source)
    excluded = exclude.resolve()
    items = [
        ImageItem(path, path.relative_to(source).as_posix())
        for path in candidates
        if path.is_file() and not path.resolve().is_relative_to(excluded)
    ]
    if not items:
        matching = f" matching {pattern!r}" if pattern else ""
        raise SamkitError(f"no images found in {source}{matching}")
    return sorted(items, key=lambda item: item.rel)


def _default_images(root: Path) -> Iterable[Path]:
    """Every image file under ``root`` (:func:`samkit.io.is_image_file`), in no hidden
    folder."""
    for path in root.rglob("*"):
        if is_image_file(path) and not any(
            part.startswith(".") for part in path.relative_to(root).parent.parts
        ):
            yield path


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (0-based ``i``) -> ``(i, n)``."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise SamkitError(f"bad shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    index, count = int(match[1]), int(match[2])
    if not 0 <= index < count:
        raise SamkitError(f"bad shard {text!r}: need 0 <= i < n (i is 0-based)")
    return index, count


def under_torchrun(env: Mapping[str, str]) -> bool:
    return "RANK" in env and "WORLD_SIZE" in env


def resolve_shard(text: str | None, env: Mapping[str, str]) -> tuple[int, int]:
    """An explicit ``--shard`` wins; else torchrun's ``RANK``/``WORLD_SIZE``; else everything."""
    if text is not None:
        return parse_shard(text)
    if under_torchrun(env):
        return parse_shard(f"{env['RANK']}/{env['WORLD_SIZE']}")
    return 0, 1


def select_shard(items: Sequence[ImageItem], shard: tuple[int, int]) -> list[ImageItem]:
    """Every n-th item from i: disjoint, covering, and balanced even when neighbouring
    images (one folder) are much bigger than others."""
    index, count = shard
    return list(items[index::count])


# --- resume -------------------------------------------------------------------------------


def pending(
    items: Sequence[ImageItem], outdir: Path, overlay: bool
) -> tuple[list[ImageItem], int]:
    """Remove debris of killed runs, then split ``items`` into (still to do, number done)."""
    from tqdm import tqdm

    names = {item.json_name for item in items} | {item.overlay_name for item in items}
    remove_stale_tmp(outdir, names)
    todo = [
        item
        # Transient, so only worth drawing on a terminal (disable=None), never in a log.
        for item in tqdm(items, desc="checking outputs", unit="img", leave=False, disable=None)
        if not is_done(item, outdir, overlay)
    ]
    return todo, len(items) - len(todo)


def is_done(item: ImageItem, outdir: Path, overlay: bool) -> bool:
    """The JSON exists and parses (and the overlay exists, when one is wanted)."""
    if overlay and not (outdir / item.overlay_name).is_file():
        return False
    try:
        record = json.loads((outdir / item.json_name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and isinstance(record.get("annotations"), list)


def remove_stale_tmp(outdir: Path, names: set[str]) -> None:
    """Delete temporary files (``.<name>.<pid>.<hex>.tmp``) left by killed runs for ``names``.

    Only this shard's names: each image belongs to one shard, run by one process at a time,
    so these files cannot belong to a live writer, while other shards' files might.
    """
    for entry in os.scandir(outdir):
        parts = entry.name.rsplit(".", 3)
        if len(parts) == 4 and parts[3] == "tmp" and parts[0][:1] == "." and parts[0][1:] in names:
            with contextlib.suppress(OSError):  # another cleaner got there first
                os.unlink(entry.path)


# --- one image ----------------------------------------------------------------------------


def load_checked(path: Path) -> np.ndarray:
    """:func:`~samkit.images.load_image` plus a minimum size."""
    from samkit.images import load_image

    image = load_image(path)
    height, width = image.shape[:2]
    if min(height, width) < MIN_IMAGE_SIDE:
        raise SamkitError(
            f"image {path} is {width}x{height}, below the {MIN_IMAGE_SIDE} px minimum side"
        )
    return image


def segment_and_write(
    item: ImageItem, image: np.ndarray, outdir: Path, generator: LoadedGenerator, overlay: bool
) -> None:
    """Generate masks for one image and write its JSON (and overlay). The JSON comes last:
    it is what marks the image done."""
    document = build_document(item, image.shape[:2], generator.generate(image), generator)
    if overlay:
        from samkit.data.sa1b import decode_masks
        from samkit.overlay import UNTRAINED_BANNER, draw_overlay, save_png

        banner = None if generator.trained else UNTRAINED_BANNER
        save_png(outdir / item.overlay_name,
                 draw_overlay(image, decode_masks(document), banner=banner))
    text = json.dumps(document, separators=(",", ":"), default=_json_default)
    write_text_atomic(outdir / item.json_name, text)


def build_document(
    item: ImageItem,
    size: tuple[int, int],
    records: Sequence[Mapping[str, Any]],
    generator: LoadedGenerator,
) -> dict[str, Any]:
    """The SA-1B-schema JSON for one image, from the generator's records.

    ``image_id`` comes from a hash of ``file_name``, so it does not depend on which shard,
    engine or resumed run wrote the file; annotation ``id`` is the index within the image.
    """
    height, width = size
    return {
        "image": {
            "image_id": stable_image_id(item.rel),
            "file_name": item.rel,
            "width": int(width),
            "height": int(height),
        },
        "annotations": [
            {"id": index, "segmentation": to_coco_rle(record["segmentation"]),
             **{key: record[key] for key in ANNOTATION_FIELDS}}
            for index, record in enumerate(records)
        ],
        "model": {"name": generator.model_name, "trained": generator.trained},
    }


def stable_image_id(file_name: str) -> int:
    """The first 53 bits of SHA-1: unique in practice, and exact in any JSON reader
    (JavaScript numbers hold integers up to 2**53)."""
    return int.from_bytes(hashlib.sha1(file_name.encode("utf-8")).digest()[:8], "big") >> 11


def _json_default(value: Any) -> Any:
    """Generators hand back numpy scalars and arrays; JSON wants plain numbers and lists."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# --- the loop -----------------------------------------------------------------------------


def run_everything(
    items: Sequence[ImageItem],
    outdir: Path,
    factory: GeneratorFactory,
    *,
    overlay: bool = False,
    fail_fast: bool = False,
    desc: str = "everything",
) -> RunSummary:
    """Segment every image of ``items`` not done yet, writing into ``outdir`` (which must
    exist). A bad image is reported and counted, or raised when ``fail_fast``."""
    todo, skipped = pending(items, outdir, overlay)

    def loaded() -> LoadedGenerator:
        generator = factory()
        warn_if_untrained(f"model {generator.model_name!r}", generator.trained)
        return generator

    def work(item: ImageItem, image: np.ndarray, generator: LoadedGenerator) -> int:
        segment_and_write(item, image, outdir, generator, overlay)
        return 0

    job = Job(read=lambda item: load_checked(item.path), worker=loaded, work=work,
              name=lambda item: item.rel)
    counts = run_jobs(todo, job, desc=desc, fail_fast=fail_fast)
    return RunSummary(done=counts.done, skipped=skipped, failed=counts.failed)


