"""Training the text slot (paper App. D.5): CLIP image embeddings of mask crops, cached.

For every source mask with area > ``min_area`` (100² px, the paper's threshold, in the source
image's pixels) the crop App. D.5 describes (:func:`samkit.clip.mask_crop`: the box enlarged
by a random factor in ``enlarge``, squared, with probability ``zero_outside`` the pixels
outside the mask zeroed) goes through the frozen CLIP image encoder *once*; the unit-length
embeddings are stored in one safetensors file and looked up per step by (image, mask). The
random factor and zeroing are drawn once per mask from ``(seed, image, mask)``, so a cache is
reproducible. Not done: the paper's masked attention in CLIP's last layer (restricting the
output token to the mask's positions); zeroing the outside pixels is the part kept.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from samkit.errors import SamkitError
from samkit.io import atomic_output

if TYPE_CHECKING:
    from samkit.clip import Clip
    from samkit.modeling.sam import Sam
    from samkit.train.config import TrainConfig
    from samkit.train.data import TrainDataset

CROPS_PER_BATCH = 32


class TextCache:
    """Cached CLIP crop embeddings: ``K x D`` rows keyed by (dataset image, source mask)."""

    def __init__(self, embeddings: torch.Tensor, image_index: torch.Tensor,
                 mask_index: torch.Tensor, metadata: dict[str, str]) -> None:
        self.embeddings = embeddings.float().numpy()
        self.metadata = metadata
        self.rows = {(int(i), int(m)): r for r, (i, m) in
                     enumerate(zip(image_index.tolist(), mask_index.tolist(), strict=True))}

    @property
    def clip_dim(self) -> int:
        return int(self.metadata["clip_dim"])

    @property
    def clip_name(self) -> str:
        return self.metadata.get("clip_name", "")

    def lookup(self, image: int, masks: Sequence[int] | np.ndarray) -> np.ndarray:
        """``N x D`` float32 embeddings of source masks ``masks`` of dataset image ``image``;
        NaN rows for masks without one (too small)."""
        out = np.full((len(masks), self.clip_dim), np.nan, np.float32)
        for k, mask in enumerate(np.asarray(masks).tolist()):
            row = self.rows.get((image, mask))
            if row is not None:
                out[k] = self.embeddings[row]
        return out

    @classmethod
    def open(cls, path: str | Path, data: Sequence[str], num_images: int) -> TextCache:
        """Read a cache, checked against the run's data (same sources, same image count)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise SamkitError(f"text cache not found: {path} (set text_clip to build it)")
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open API)
        if metadata.get("format") != "samkit-text-cache" or "clip_dim" not in metadata:
            raise SamkitError(f"{path} is not a samkit text cache")
        if json.loads(metadata.get("data", "[]")) != list(data) or int(
                metadata.get("num_images", -1)) != num_images:
            raise SamkitError(f"text cache {path} was built for other data "
                              f"({metadata.get('data')}): delete it to rebuild")
        return cls(tensors["embeddings"], tensors["image_index"], tensors["mask_index"], metadata)


def write_text_cache(path: str | Path, embeddings: torch.Tensor, image_index: Sequence[int],
                     mask_index: Sequence[int], clip_name: str, data: Sequence[str],
                     num_images: int, settings: dict[str, object] | None = None) -> Path:
    """Write a cache file (also how a test, or a user with their own aligned embeddings,
    provides them without a CLIP)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "embeddings": embeddings.float().contiguous().cpu(),
        "image_index": torch.tensor(list(image_index), dtype=torch.long),
        "mask_index": torch.tensor(list(mask_index), dtype=torch.long),
    }
    metadata = {"format": "samkit-text-cache", "clip_name": clip_name,
                "clip_dim": str(embeddings.shape[1]), "data": json.dumps(list(data)),
                "num_images": str(num_images), "settings": json.dumps(settings or {})}
    with atomic_output(path, fsync=True) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def build_text_cache(dataset: TrainDataset, clip: Clip, path: str | Path, data: Sequence[str], min_area: int,
                     enlarge: tuple[float, float], zero_outside: float, seed: int,
                     progress: bool = True) -> Path:
    """Embed the crop of every source mask larger than ``min_area`` px of ``dataset``
    (a :class:`~samkit.train.data.TrainDataset`) with ``clip`` (:class:`samkit.clip.Clip`)."""
    from samkit.clip import mask_crop

    crops: list[np.ndarray] = []
    keys: list[tuple[int, int]] = []
    chunks: list[torch.Tensor] = []
    for index in tqdm(range(len(dataset)), desc="CLIP crops", disable=not progress):
        image, masks = dataset.load(index)
        for m, mask in enumerate(masks):
            if int(mask.sum()) <= min_area:
                continue
            rng = np.random.default_rng([seed, index, m])
            factor = float(rng.uniform(*enlarge))
            crops.append(mask_crop(image, mask, factor, bool(rng.random() < zero_outside)))
            keys.append((index, m))
            if len(crops) == CROPS_PER_BATCH:
                chunks.append(clip.embed_images(crops).cpu())
                crops = []
    if crops:
        chunks.append(clip.embed_images(crops).cpu())
    if not keys:
        raise SamkitError(f"no training mask is larger than text_min_area={min_area} px: "
                          "nothing to train the text slot on")
    settings = {"min_area": min_area, "enlarge": list(enlarge), "zero_outside": zero_outside,
                "seed": seed}
    return write_text_cache(path, torch.cat(chunks), [k[0] for k in keys], [k[1] for k in keys],
                            clip.name, data, len(dataset), settings)


def cache_path(cfg: TrainConfig) -> Path | None:
    """The run's text cache file (``text_cache``, else ``out_dir/text_cache.safetensors``
    when ``text_clip`` is set), or None when the run trains no text slot."""
    if cfg.text_cache:
        return Path(cfg.text_cache)
    if cfg.text_clip:
        return Path(cfg.out_dir) / "text_cache.safetensors"
    return None


def open_text_cache(cfg: TrainConfig, dataset: TrainDataset) -> TextCache | None:
    """The run's :class:`TextCache`, built first with ``text_clip`` if it does not exist."""
    path = cache_path(cfg)
    if path is None:
        return None
    if not path.is_file() and cfg.text_clip:
        from samkit.clip import load_clip

        build_text_cache(dataset, load_clip(cfg.text_clip), path, list(cfg.data),
                         cfg.text_min_area, tuple(cfg.text_crop_enlarge),
                         cfg.text_zero_outside, cfg.seed, cfg.progress)
    return TextCache.open(path, list(cfg.data), len(dataset))


def read_header(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def attach_training_slot(cfg: TrainConfig, sam: Sam) -> None:
    """Give the model to train its text slot, sized for the run's CLIP: from the cache's
    header when it exists, else from ``text_clip`` itself (the cache is built with the data)."""
    path = cache_path(cfg)
    if path is None:
        return
    if path.is_file():
        header = read_header(path)
        if "clip_dim" not in header:
            raise SamkitError(f"{path} is not a samkit text cache")
        dim, name = int(header["clip_dim"]), header.get("clip_name", "")
    else:
        from samkit.clip import load_clip

        clip = load_clip(cfg.text_clip)
        dim, name = clip.dim, clip.name
    sam.attach_text_prompt(dim, name)
