"""A cache of frozen-stem features: each training image's stem output computed once.

With a frozen, pretrained stem (samkit-tiny's HED VGG16, ``HedEncoder.stem``) the stem is
the same function of the image at every step, so recomputing it each epoch is waste: on the
2-core CPU it is ~0.2 s of a 512 px image, more than the whole trainable rest of a cheap
step. :func:`build_feature_cache` runs it once per image of a :class:`TrainDataset` and
stores the outputs as fp16 safetensors, one file per image; training then reads them
(``TrainConfig.feature_cache``) and runs only ``HedEncoder.head`` and the decoder.

The cache holds the *inference* view of each image (resize longest side to the model input,
no flip, no jitter), so a cached run trains with ``scale_range: [1, 1]`` and ``hflip:
false``. Its ``manifest.json`` records the data sources, image count, input size and a hash
of the stem's weights; a cache that does not match the run is refused with one line.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from samkit.errors import SamkitError
from samkit.io import atomic_output
from samkit.modeling.sam import Sam

if TYPE_CHECKING:  # data.py imports this module
    from samkit.train.data import TrainDataset

MANIFEST = "manifest.json"


def stem_hash(sam: Sam) -> str:
    """A short hash of the stem's weights (what the cached features are a function of)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(sam.image_encoder.stem_state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def manifest_for(sam: Sam, sources: list[str], num_images: int) -> dict:
    return {"sources": list(sources), "num_images": num_images,
            "image_size": sam.image_size, "stem": stem_hash(sam),
            "features": list(sam.image_encoder.stem_outputs)}


def feature_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.safetensors"


def build_feature_cache(dataset: TrainDataset, sam: Sam, sources: list[str], folder: str | Path,
                        dtype: torch.dtype = torch.float16, progress: bool = True) -> Path:
    """Compute the stem features of every image of ``dataset`` (a ``TrainDataset``) into
    ``folder``. Images already cached are kept, so an interrupted build resumes."""
    if not hasattr(sam.image_encoder, "stem"):
        raise SamkitError("feature caching needs an encoder with a frozen stem "
                          "(samkit-tiny's HedEncoder)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = manifest_for(sam, sources, len(dataset))
    manifest_file = folder / MANIFEST
    if manifest_file.is_file() and json.loads(manifest_file.read_text()) != manifest:
        raise SamkitError(f"{folder} holds features of other data or another stem; "
                          "use a new folder")
    manifest_file.write_text(json.dumps(manifest, indent=1))
    start = time.perf_counter()
    encoder = sam.image_encoder
    for index in range(len(dataset)):
        path = feature_path(folder, index)
        if path.is_file():
            continue
        image = dataset.inference_view(index)
        h, w = image.shape[:2]
        x = torch.from_numpy(image).permute(2, 0, 1).float().to(sam.device)
        with torch.no_grad():
            outputs = encoder.stem(sam.preprocess(x)[None])
        tensors = {name: out[0].to(dtype).contiguous()
                   for name, out in zip(encoder.stem_outputs, outputs, strict=True)}
        tensors["size"] = torch.tensor([h, w])
        with atomic_output(path) as tmp:
            save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp))
        if progress and (index + 1) % 100 == 0:
            rate = (index + 1) / (time.perf_counter() - start)
            print(f"feature cache: {index + 1}/{len(dataset)} ({rate:.1f} images/s)", flush=True)
    return folder


class FeatureCache:
    """Read side: ``load(index) -> (stem outputs, size)``: the fp16 tensors of one image in
    the encoder's ``stem_outputs`` order, and its ``(h, w)``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        manifest_file = self.folder / MANIFEST
        if not manifest_file.is_file():
            raise SamkitError(f"{self.folder} is not a feature cache (no {MANIFEST}); build it "
                              "with `python -m samkit.train --config C --build-feature-cache`")
        self.manifest = json.loads(manifest_file.read_text())

    def check(self, sam: Sam, sources: list[str], num_images: int) -> None:
        """Refuse a cache made from other data, another input size or another stem."""
        expected = manifest_for(sam, sources, num_images)
        if self.manifest != expected:
            diff = [k for k in expected if self.manifest.get(k) != expected[k]]
            raise SamkitError(f"feature cache {self.folder} does not match this run "
                              f"(differs in: {', '.join(diff)})")
        missing = [i for i in range(num_images) if not feature_path(self.folder, i).is_file()]
        if missing:
            raise SamkitError(f"feature cache {self.folder} is incomplete: {len(missing)} of "
                              f"{num_images} images missing (e.g. #{missing[0]}); build it again")

    def load(self, index: int) -> tuple[tuple[torch.Tensor, ...], np.ndarray]:
        tensors = load_file(str(feature_path(self.folder, index)))
        names = self.manifest["features"]
        return tuple(tensors[name] for name in names), tensors["size"].numpy()
