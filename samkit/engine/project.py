"""A data-engine project: one folder holding everything, and nothing read or written outside it.

Layout::

    PROJECT/
      project.db                 SQLite (see samkit.engine.db)
      images/                    the images (hard links or copies of the imported files)
      cache/embeddings/v<V>/     one safetensors image embedding per image and model version
      cache/decoders/v<V>/       the page's ONNX decoder graphs per model version
      models/                    checkpoints made by `samkit engine retrain`
      retrain/                   each retrain's exported data and training run

Image names are validated (a safe character set, an image suffix, no path separators), and
every path built from a name is resolved and checked to lie inside its folder, so no request
can reach ``../`` anything.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from samkit.engine.db import Database, ImageRow, ModelVersion
from samkit.errors import SamkitError
from samkit.everything import collect_images
from samkit.images import load_image
from samkit.io import IMAGE_SUFFIXES
from samkit.loading import resolve_model
from samkit.registry import DEFAULT_MODEL

DB_NAME = "project.db"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE = (
    "1-128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit, ending in "
    + " ".join(sorted(IMAGE_SUFFIXES))
)

# Defaults of the settings table (see samkit.engine.server for what may change them).
DEFAULT_SETTINGS = {
    "stage": 1,  # 1: manual (model-assisted clicks); 2: semi-automatic (prefilled candidates)
    "prefill_points_per_side": 16,
    "prefill_iou_thresh": 0.9,  # higher than `samkit everything`: only confident masks
    "prefill_stability_thresh": 0.96,
}


class Project:
    """Paths of a project folder and the operations that create files in it."""

    def __init__(self, root: Path, db: Database) -> None:
        self.root = root
        self.db = db
        self.images_dir = root / "images"
        self.embeddings_dir = root / "cache" / "embeddings"
        self.models_dir = root / "models"
        self.retrain_dir = root / "retrain"

    @classmethod
    def open(cls, root: str | Path, *, create: bool = False) -> Project:
        """Open the project at ``root``; with ``create`` an empty folder becomes one."""
        root = Path(root).expanduser().resolve()
        if not (root / DB_NAME).is_file():
            if not create:
                raise SamkitError(
                    f"{root} is not a samkit project (no {DB_NAME}); create one with "
                    f"`samkit annotate {root} --images DIR`"
                )
            if root.exists() and not root.is_dir():
                raise SamkitError(f"project path {root} exists and is not a folder")
            if root.is_dir() and any(root.iterdir()):
                raise SamkitError(f"{root} is not empty and not a samkit project; pick a new "
                                  "or empty folder")
            try:
                (root / "images").mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise SamkitError(f"cannot create project {root}: {err.strerror or err}") from None
        project = cls(root, Database(root / DB_NAME))
        project.db.set_settings(
            {k: v for k, v in DEFAULT_SETTINGS.items() if project.db.get_setting(k) is None}
        )
        return project

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ paths
    def image_path(self, file_name: str) -> Path:
        """The file of image ``file_name`` (validated, and inside ``images/``)."""
        return _inside(self.images_dir, check_image_name(file_name))

    def embedding_path(self, version_id: int, image_id: int, variant: str = "") -> Path:
        """Where an image's embedding by a model version is cached; ``variant`` (e.g.
        ``"bfloat16"``) keeps embeddings computed another way apart."""
        folder = f"v{int(version_id)}" + (f"-{variant}" if variant else "")
        return self.embeddings_dir / folder / f"{int(image_id)}.safetensors"

    def decoder_dir(self, version_id: int) -> Path:
        """Where a model version's decoder graphs for the page are cached (beside the
        embeddings; see :mod:`samkit.engine.web_decoder`)."""
        return self.root / "cache" / "decoders" / f"v{int(version_id)}"

    def checkpoint_path(self, version: ModelVersion) -> Path | None:
        """The weights of a model version: absolute paths were given on the command line by
        the project's owner; relative ones (written by retrain) must stay inside the project."""
        if version.checkpoint is None:
            return None
        path = Path(version.checkpoint)
        return path if path.is_absolute() else _inside(self.root, version.checkpoint)

    def relative_checkpoint(self, path: Path) -> str:
        """How a checkpoint is recorded: relative when inside the project (so the folder can
        move), absolute otherwise."""
        path = path.resolve()
        return path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) \
            else str(path)

    # ------------------------------------------------------------------ images
    def import_folder(self, source: Path) -> tuple[int, int, int]:
        """Add every image under ``source`` (recursively, hidden files skipped); returns
        (added, already in the project, failed). Names flatten sub-folders (``a/b.jpg`` ->
        ``a__b.jpg``); a name the project already has is left alone, so importing again only
        adds new files; a file that is not a readable image is reported and skipped."""
        added = present = failed = 0
        for item in collect_images(source.expanduser(), None, exclude=self.root):
            name = sanitize_name(item.rel.replace("/", "__"))
            if self.db.image_by_name(name) is not None:
                present += 1
                continue
            try:
                self.add_image_file(item.path, name, move=False)
                added += 1
            except SamkitError as err:
                print(f"samkit: skipped {item.rel}: {err}", file=sys.stderr)
                failed += 1
        return added, present, failed

    def add_image_file(self, source: Path, name: str, *, move: bool) -> ImageRow:
        """Validate ``source`` as an image (decompression-bomb limit included), put it in
        ``images/`` as ``name`` (moved, else hard-linked or copied) and register it."""
        target = self.image_path(name)
        image = load_image(source)
        if target.exists():
            raise SamkitError(f"the project already has an image file named {name!r}")
        try:
            if move:
                os.link(source, target)  # fails instead of replacing a file of the same name
                source.unlink()
            else:
                link_or_copy(source, target)
        except FileExistsError:
            raise SamkitError(f"the project already has an image file named {name!r}") from None
        except OSError as err:
            raise SamkitError(f"cannot store image {name}: {err.strerror or err}") from None
        try:
            image_id = self.db.add_image(name, width=image.shape[1], height=image.shape[0])
        except SamkitError:
            target.unlink(missing_ok=True)
            raise
        return ImageRow(image_id, name, image.shape[1], image.shape[0])


def check_image_name(name: str) -> str:
    """``name`` if it is a safe image file name, else a :class:`SamkitError` saying why."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise SamkitError(f"invalid image name {name!r}: use {NAME_RULE}")
    if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
        raise SamkitError(f"invalid image name {name!r}: it must end in one of "
                          f"{', '.join(sorted(IMAGE_SUFFIXES))}")
    return name


def sanitize_name(name: str) -> str:
    """A file name from outside (an imported path) made safe: other characters become ``_``."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name).replace("..", "_")
    cleaned = re.sub(r"^[^A-Za-z0-9]+", "", cleaned)
    stem, suffix = os.path.splitext(cleaned)
    return stem[: 128 - len(suffix)] + suffix


def _inside(folder: Path, relative: str) -> Path:
    """``folder / relative``, refusing anything that resolves outside ``folder``."""
    path = (folder / relative).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise SamkitError(f"path {relative!r} leaves the project folder")
    return path


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link costs no space; across file systems it is a copy. Never a symlink: the
    project must not depend on (or lead to) files outside it."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError:
        shutil.copy2(source, target)


def open_project(root: Path, images: Path | None, model: str | None,
                 checkpoint: Path | None) -> Project:
    """Open or create the project, import ``images`` and pick the model version."""
    # Everything cheap is checked before the project folder is created.
    if images is not None and not images.is_dir():
        raise SamkitError(f"--images {images} is not a folder")
    choice = None
    if model is not None or checkpoint is not None:
        choice = resolve_model(model or DEFAULT_MODEL, checkpoint)
    project = Project.open(root, create=True)
    if images is not None:
        added, present, failed = project.import_folder(images)
        notes = [f"{present} already in the project"] if present else []
        notes += [f"{failed} not readable, skipped"] if failed else []
        print(f"imported {added} image(s) from {images}"
              + (f" ({', '.join(notes)})" if notes else ""))
    db = project.db
    if choice is None and db.get_setting("model_version") is not None:
        return project
    if choice is None:
        choice = resolve_model(DEFAULT_MODEL, None)
    recorded = None if choice.checkpoint is None else project.relative_checkpoint(
        choice.checkpoint)
    version = db.find_model_version(choice.name, recorded) or db.add_model_version(
        choice.name, recorded, parent_id=None, note={"source": "command line"})
    db.set_settings({"model_version": version.id})
    return project
