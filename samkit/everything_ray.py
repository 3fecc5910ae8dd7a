"""``samkit everything --engine ray``: the same job as a Ray Data pipeline.

Needs the optional extra: ``pip install "samkit[ray]"``. The pipeline is::

    from_items(paths)  ->  map(decode)          CPU tasks: read + check each image
                       ->  map_batches(actor)   model replicas (one GPU each when the
                                                cluster has GPUs): generate + write
                       ->  iter_rows()          the driver counts and reports

Done images are skipped before the pipeline starts, and actors write through the same atomic
writer as the local engine, so the two engines produce identical files and can resume each
other's runs. Workers read the images and write the JSONs themselves: on a multi-node cluster
both the input and the output folder must be on storage every node sees, under the same path.

Images are decoded at full size, not pre-resized: the masks are at the original resolution,
exactly as with the local engine, and the generator does its own resizing for the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from samkit.errors import SamkitError, one_line
from samkit.everything import (
    GeneratorFactory,
    ImageItem,
    RunSummary,
    load_checked,
    pending,
    segment_and_write,
)
from samkit.jobs import per_image_errors, report_failure
from samkit.loading import warn_if_untrained


def run_everything_ray(
    items: Sequence[ImageItem],
    outdir: Path,
    factory: GeneratorFactory,
    *,
    overlay: bool = False,
    fail_fast: bool = False,
    address: str | None = None,
    actors: int | None = None,
) -> RunSummary:
    """:func:`samkit.everything.run_everything` on Ray: same arguments and result.

    Joins the cluster at ``address`` (``"auto"``: the running one), starts a local one when
    ``address`` is None, or uses the one this process is already connected to. ``actors``
    model replicas run at once (default: one per cluster GPU, else 1); ``factory`` must be
    picklable, since each actor builds its own generator.
    """
    ray = _import_ray()
    from tqdm import tqdm

    todo, skipped = pending(items, outdir, overlay)
    summary = RunSummary(skipped=skipped)
    if not todo:
        return summary
    if not ray.is_initialized():
        ray.init(address=address)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    # Our bar counts images end to end; Ray's per-operator bars would fight with it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = (
        ray.data.from_items([{"path": str(item.path), "rel": item.rel} for item in todo])
        .map(decode_row)
        .map_batches(
            SegmentActor,
            fn_constructor_kwargs={"factory": factory, "outdir": str(outdir), "overlay": overlay},
            batch_size=1,  # images differ in size, and one image is a full GPU batch of prompts
            compute=ray.data.ActorPoolStrategy(size=actors or max(gpus, 1)),
            num_gpus=1 if gpus else 0,
        )
        .iter_rows()
    )
    warned = False
    for row in tqdm(rows, total=len(todo), desc="everything (ray)", unit="img"):
        if not warned:
            warn_if_untrained(f"model {row['model_name']!r}", bool(row["trained"]))
            warned = True
        if row["error"]:
            if fail_fast:
                raise SamkitError(row["error"])
            report_failure(row["rel"], row["error"])
            summary.failed += 1
        else:
            summary.done += 1
    return summary


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """CPU stage: the decoded image, or an empty one and the reason it could not be read."""
    try:
        image, error = load_checked(Path(row["path"])), ""
    except SamkitError as err:
        image, error = np.zeros((0, 0, 3), dtype=np.uint8), one_line(err)
    return {**row, "image": image, "error": error}


class SegmentActor:
    """One model replica: builds the generator once, then segments and writes each image."""

    def __init__(self, factory: GeneratorFactory, outdir: str, overlay: bool) -> None:
        self.generator = factory()
        self.outdir = Path(outdir)
        self.overlay = overlay

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors = [
            error or self._segment(ImageItem(Path(path), rel), image)
            for path, rel, image, error in zip(
                batch["path"], batch["rel"], batch["image"], batch["error"], strict=True
            )
        ]
        count = len(errors)
        return {
            "rel": batch["rel"],
            "error": np.array(errors, dtype=object),
            "model_name": np.full(count, self.generator.model_name, dtype=object),
            "trained": np.full(count, self.generator.trained),
        }

    def _segment(self, item: ImageItem, image: np.ndarray) -> str:
        """Write one image's outputs; the failure reason, or "" on success."""
        try:
            segment_and_write(item, image, self.outdir, self.generator, self.overlay)
        except per_image_errors() as err:
            return one_line(err)
        return ""


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise SamkitError(
            '--engine ray needs Ray Data: pip install "samkit[ray]" (or "ray[data]>=2.9")'
        ) from None
    return ray
