"""``samkit engine stats``: the paper's data-engine numbers (§4) for a project.

Per stage and model version, over accepted masks: images, masks, masks per image, seconds per
mask and masks per hour. Seconds are annotation time for stages 1 and 2 (measured by the web
page from the previous accept to this one, and for a kept candidate the time spent reviewing
it) and compute time for stage 3.
"""

from __future__ import annotations

from typing import Any

from samkit.engine.project import Project

COLUMNS = ("stage", "model_version", "images", "masks", "masks_per_image", "seconds_per_mask",
           "masks_per_hour")
STAGE_NAMES = {1: "1 manual", 2: "2 semi-auto", 3: "3 auto"}


def stats_rows(project: Project) -> list[dict[str, Any]]:
    """One row per (stage, model version) with accepted masks, then a total row."""
    groups = project.db.query(
        "SELECT stage, model_version, COUNT(DISTINCT image_id), COUNT(*), SUM(seconds)"
        " FROM annotations WHERE status = 'accepted'"
        " GROUP BY stage, model_version ORDER BY stage, model_version"
    )
    rows = [_row(stage, version, images, masks, seconds)
            for stage, version, images, masks, seconds in groups]
    total = project.db.query(
        "SELECT COUNT(DISTINCT image_id), COUNT(*), COALESCE(SUM(seconds), 0)"
        " FROM annotations WHERE status = 'accepted'"
    )[0]
    return [*rows, _row("all", "all", *total)]


def _row(stage: Any, version: Any, images: int, masks: int, seconds: float) -> dict[str, Any]:
    return {
        "stage": stage,
        "model_version": version,
        "images": images,
        "masks": masks,
        "masks_per_image": masks / images if images else 0.0,
        "seconds_per_mask": seconds / masks if masks else None,
        "masks_per_hour": 3600.0 * masks / seconds if seconds else None,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table (numbers right-aligned, "-" where undefined)."""
    header = ["stage", "model", "images", "masks", "masks/image", "s/mask", "masks/hour"]
    body = [
        [STAGE_NAMES.get(r["stage"], str(r["stage"])),
         f"v{r['model_version']}" if isinstance(r["model_version"], int) else "all",
         str(r["images"]), str(r["masks"]), f"{r['masks_per_image']:.1f}",
         _fmt(r["seconds_per_mask"], ".2f"), _fmt(r["masks_per_hour"], ".0f")]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                  for i, (cell, w) in enumerate(zip(line, widths)))
        for line in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
