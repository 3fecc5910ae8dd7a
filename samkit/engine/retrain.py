"""``samkit engine retrain``: close the data-engine loop (paper §4: the model was retrained
six times in stage 1 and five in stage 2 on the newly annotated masks).

Exports the accepted masks SA-1B style, fine-tunes the current model version on them with
``samkit train``, and registers the result as a new model version whose checkpoint lives in
``PROJECT/models/``. The running annotation server offers it in its model selector.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

from samkit.build import BUNDLED_WEIGHTS_DIR
from samkit.engine.db import ModelVersion
from samkit.engine.export import export
from samkit.engine.project import Project
from samkit.errors import SamkitError
from samkit.registry import get_config


def retrain(project: Project, steps: int, *, config: str | None = None,
            overrides: Sequence[str] = (), stages: Sequence[int] = (1, 2, 3),
            device: str = "auto", activate: bool = True) -> ModelVersion:
    """Fine-tune the current version for ``steps`` steps on the accepted masks of ``stages``
    (``config`` / ``overrides`` are ``samkit train``'s ``--config`` / ``--set``); returns the
    new version, made current unless ``activate`` is False."""
    from samkit.train.config import load_config
    from samkit.train.loop import EXPORT_NAME, train

    if steps < 1:
        raise SamkitError(f"--steps must be >= 1, got {steps}")
    parent = project.db.current_model_version()
    run = time.strftime("%Y%m%d-%H%M%S")
    work = project.retrain_dir / run
    n_images, n_masks = export(project, "sa1b", work / "data", stages)
    if n_masks == 0:
        raise SamkitError("no accepted masks to train on yet: annotate some images first")
    init = init_weights(project, parent)
    base = load_config(config, list(overrides))
    cfg = dataclasses.replace(
        base,
        model=parent.model,
        init_checkpoint=None if init is None else str(init),
        data=[f"sa1b:{work / 'data'}"],
        iterations=steps,
        max_steps=steps,
        # The config's batch size is an upper bound: a first retrain may have one image.
        batch_size=min(base.batch_size, n_images),
        ckpt_interval=steps,
        out_dir=str(work / "train"),
        device=device,
        resume=False,
    )
    print(f"samkit engine retrain: {n_masks} masks on {n_images} images, {steps} steps from "
          f"model version {parent.id} ({parent.model})", flush=True)
    rows = train(cfg)
    checkpoint = project.models_dir / f"{run}.safetensors"
    project.models_dir.mkdir(parents=True, exist_ok=True)
    (work / "train" / EXPORT_NAME).replace(checkpoint)
    last = rows[-1] if rows else {}
    version = project.db.add_model_version(
        parent.model, project.relative_checkpoint(checkpoint), parent.id,
        note={"retrain": run, "steps": steps, "images": n_images, "masks": n_masks,
              "stages": list(stages), "loss": last.get("loss"), "miou": last.get("miou")},
    )
    if activate:
        project.db.set_settings({"model_version": version.id})
    return version


def init_weights(project: Project, version: ModelVersion) -> Path | None:
    """The weights ``version`` runs with: its checkpoint, else the model's bundled weights,
    else none (a randomly initialised model is fine-tuned from its random start)."""
    checkpoint = project.checkpoint_path(version)
    if checkpoint is not None:
        return checkpoint
    bundled = get_config(version.model).bundled_weights
    if bundled and (BUNDLED_WEIGHTS_DIR / bundled).is_file():
        return BUNDLED_WEIGHTS_DIR / bundled
    return None
