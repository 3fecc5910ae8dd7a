"""The one model of a running annotation server, shared safely between request threads.

* **One user at a time.** Every use of the model holds one lock. A request that cannot get it
  within its patience (short for hover previews, longer for clicks) gets :class:`Busy`, which
  the server answers with 503 and a message saying what the model is doing.
* **Embed once.** An image's embedding is computed once per model version and kept on disk
  (``cache/embeddings/v<V>/<image>.safetensors``) and in a small in-memory LRU, so every prompt
  after the first only runs the prompt encoder and mask decoder (milliseconds).
* **Background work yields.** The precompute thread (see :mod:`samkit.engine.stages`) only
  takes the model when no interactive request is waiting for it.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samkit.build import build_sam, is_trained, weights_source
from samkit.engine.db import ImageRow, ModelVersion
from samkit.engine.project import Project
from samkit.errors import SamkitError
from samkit.images import load_image
from samkit.io import atomic_output
from samkit.modeling.sam import Sam
from samkit.predictor import EmbeddedImage, SamPredictor, TextEncoder
from samkit.prompts import Prompts
from samkit.runtime import torch_threads

# How long a request waits for the model before it is told the server is busy.
CLICK_PATIENCE_S = 15.0  # a click or an image switch: worth waiting for an embedding
PREVIEW_PATIENCE_S = 0.25  # a hover preview: stale a moment later anyway
BACKGROUND_POLL_S = 0.05
MEMORY_CACHE_SIZE = 8  # embeddings kept in RAM (1 MiB each for samkit-tiny, 4 for ViT)
TEXT_CACHE_SIZE = 64  # CLIP text embeddings kept: hover previews repeat the same phrase
# CPU threads for one decode. Its matrices are small (about a thousand rows), so a second
# thread gains little, and on shared cores it costs a lot: OpenMP waits for a descheduled
# thread. On the 2-core dev machine under load, samkit-tiny decoded a click in 48 ms (median)
# with 1 thread and 179 ms with 2. Embeddings keep torch's default.
DECODE_THREADS = 1

ModelLoader = Callable[[Project, ModelVersion, str], Sam]


class Busy(Exception):
    """The model stayed in use for longer than the request was willing to wait."""


@dataclass(frozen=True)
class Decoded:
    masks: np.ndarray  # M x H x W bool
    scores: np.ndarray  # M
    decode_ms: float  # model time only (prompt encoder, decoder, upscaling)
    version_id: int  # the model version that made them (read under the lock)


def load_version_model(project: Project, version: ModelVersion, device: str) -> Sam:
    """The default :data:`ModelLoader`: the registry model with the version's weights."""
    return build_sam(version.model, project.checkpoint_path(version), device=device)


class ModelService:
    """Owns the model of the current version, its embeddings, and the lock around them."""

    def __init__(self, project: Project, device: str = "cpu",
                 loader: ModelLoader = load_version_model,
                 decode_threads: int | None = DECODE_THREADS,
                 encoder_dtype: torch.dtype | None = None,
                 clip: TextEncoder | None = None) -> None:
        self.project = project
        # Text prompts, for model versions with a text slot (checked against it at each load).
        self.clip = clip
        self.device = device
        # bf16 embeddings are cached apart from fp32 ones (see Project.embedding_path).
        self.encoder_dtype = encoder_dtype
        self._variant = "" if encoder_dtype is None else str(encoder_dtype).removeprefix("torch.")
        # None: torch's default; on CUDA the CPU thread count does not matter.
        self.decode_threads = decode_threads if device == "cpu" else None
        self._loader = loader
        self._lock = threading.Lock()
        self._activity = "idle"
        self._activity_since = time.monotonic()
        self._waiting = 0  # interactive requests queued for the lock
        self._waiting_lock = threading.Lock()
        self._memory: OrderedDict[tuple[int, int], EmbeddedImage] = OrderedDict()
        self._phrases: OrderedDict[str, torch.Tensor] = OrderedDict()  # CLIP's, by phrase
        self._load(project.db.current_model_version())

    def _load(self, version: ModelVersion) -> None:
        model = self._loader(self.project, version, self.device)
        self.version = version
        self.model = model
        self.trained = is_trained(model)
        self.weights = weights_source(model)
        has_slot = model.text_prompt is not None
        self._predictor = SamPredictor(model, encoder_dtype=self.encoder_dtype,
                                       clip=self.clip if has_slot else None)
        self._current: tuple[int, int] | None = None  # (version, image) in the predictor
        self._memory.clear()

    # ------------------------------------------------------------------ the lock
    @contextmanager
    def using_model(self, activity: str, patience: float, *,
                    background: bool = False) -> Iterator[None]:
        """Hold the model for ``activity``. Interactive callers wait up to ``patience``
        seconds, then get :class:`Busy`; background callers wait until nobody interactive is
        waiting, however long that takes."""
        if background:
            while self._waiting or not self._lock.acquire(blocking=False):
                time.sleep(BACKGROUND_POLL_S)
        else:
            with self._waiting_lock:
                self._waiting += 1
            try:
                acquired = self._lock.acquire(timeout=patience)
            finally:
                with self._waiting_lock:
                    self._waiting -= 1
            if not acquired:
                elapsed = time.monotonic() - self._activity_since
                raise Busy(f"the model is busy ({self._activity}, {elapsed:.1f} s so far); "
                           "try again in a moment")
        self._activity, self._activity_since = activity, time.monotonic()
        try:
            yield
        finally:
            self._activity, self._activity_since = "idle", time.monotonic()
            self._lock.release()

    def status(self) -> dict[str, Any]:
        return {"activity": self._activity,
                "for_s": round(time.monotonic() - self._activity_since, 3),
                "version": self.version.id, "trained": self.trained, "weights": self.weights,
                "device": self.device}

    def text_status(self) -> dict[str, Any]:
        """Whether the loaded version takes text prompts: ``ready``, else ``reason`` says
        what is missing (the page shows its text box only when ready)."""
        if self.model.text_prompt is None:
            return {"slot": False, "ready": False, "reason": f"model version "
                    f"{self.version.id} has no text slot (train one with text_clip: "
                    "docs/text.md)"}
        if self.clip is None:
            return {"slot": True, "ready": False, "reason": "the model has a text slot: "
                    "start samkit annotate with --clip DIR to prompt it with text"}
        return {"slot": True, "ready": True, "clip": self.clip.name}

    # ------------------------------------------------------------------ embeddings
    def has_embedding(self, image_id: int) -> bool:
        return ((self.version.id, image_id) in self._memory
                or self._embedding_path(image_id).is_file())

    def _embedding_path(self, image_id: int) -> Path:
        return self.project.embedding_path(self.version.id, image_id, self._variant)

    def ensure_embedding(self, image: ImageRow, patience: float = CLICK_PATIENCE_S, *,
                         background: bool = False) -> None:
        """Compute and store ``image``'s embedding unless it already exists."""
        if self.has_embedding(image.id):
            return
        with self.using_model(f"embedding image {image.id}", patience, background=background):
            self._embedding(image)

    def _embedding(self, image: ImageRow) -> EmbeddedImage:
        """Memory, else disk, else the encoder (which the caller holds the lock for)."""
        key = (self.version.id, image.id)
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        path = self._embedding_path(image.id)
        embedded = _read_embedding(path, self.model.device) if path.is_file() else None
        if embedded is None:
            pixels = load_image(self.project.image_path(image.file_name))
            self._predictor.set_image(pixels)
            self._current = None
            embedded = self._predictor.get_embedding()
            _write_embedding(path, embedded)
        self._memory[key] = embedded
        while len(self._memory) > MEMORY_CACHE_SIZE:
            self._memory.popitem(last=False)
        return embedded

    def _select(self, image: ImageRow) -> None:
        """Make ``image`` the predictor's current image (holding the lock)."""
        key = (self.version.id, image.id)
        if self._current != key:
            self._predictor.set_embedding(self._embedding(image))
            self._current = key

    def embedding_f16(self, image: ImageRow, patience: float = CLICK_PATIENCE_S
                      ) -> tuple[bytes, tuple[int, ...], int]:
        """``image``'s embedding for the page's decoder: float16 bytes (little-endian, C
        order) of the ``1 x C x g x g`` features, their shape, and the version that made
        them. Computed first if needed; float16 halves the bytes on the wire."""
        with self.using_model(f"embedding image {image.id}", patience):
            features = self._embedding(image).features
            version_id = self.version.id
        half = features.detach().to("cpu", torch.float16).contiguous().numpy()
        return half.astype("<f2", copy=False).tobytes(), tuple(half.shape), version_id

    def model_copy(self, version_id: int) -> tuple[ModelVersion, Sam] | None:
        """A float32 CPU copy of the model if ``version_id`` is still the loaded version
        (else None), e.g. to export it while the original keeps serving. Waits like background
        work: interactive requests go first."""
        with self.using_model(f"copying model version {version_id}", 0, background=True):
            if self.version.id != version_id:
                return None
            version, model = self.version, copy.deepcopy(self.model)
        return version, model.to("cpu", torch.float32)

    # ------------------------------------------------------------------ prompting
    def decode(self, image: ImageRow, prompts: Prompts, multimask: bool,
               patience: float) -> Decoded:
        """Masks for ``prompts`` (already checked to fit the image), embedding first if
        needed."""
        has_points = len(prompts.points) > 0
        with self.using_model(f"decoding image {image.id}", patience), \
                torch_threads(self.decode_threads):
            if prompts.text is not None and not (status := self.text_status())["ready"]:
                raise SamkitError(f"text prompt refused: {status['reason']}")
            self._select(image)
            start = time.perf_counter()
            masks, scores, _ = self._predictor.predict(
                point_coords=prompts.points if has_points else None,
                point_labels=prompts.labels if has_points else None,
                box=prompts.box,
                multimask_output=multimask,
                text_embedding=None if prompts.text is None else
                self._phrase_embedding(prompts.text),
            )
            elapsed = (time.perf_counter() - start) * 1e3
            version_id = self.version.id
        return Decoded(masks, scores, elapsed, version_id)

    def _phrase_embedding(self, text: str) -> torch.Tensor:
        """CLIP's embedding of ``text`` (``D``), computed once per phrase (holding the lock)."""
        if text not in self._phrases:
            assert self.clip is not None  # text_status() was ready
            self._phrases[text] = self.clip.embed_text([text])[0]
            while len(self._phrases) > TEXT_CACHE_SIZE:
                self._phrases.popitem(last=False)
        self._phrases.move_to_end(text)
        return self._phrases[text]

    def generate(self, image: ImageRow, options: dict[str, Any], patience: float, *,
                 background: bool = False) -> list[dict[str, Any]]:
        """Segment everything in ``image`` with :class:`~samkit.automatic.AutomaticMaskGenerator`
        (``options`` are its keyword arguments), reusing the cached embedding; records have
        COCO RLE segmentations."""
        from samkit.automatic import AutomaticMaskGenerator

        pixels = load_image(self.project.image_path(image.file_name))
        with self.using_model(f"segmenting everything in image {image.id}", patience,
                              background=background):
            generator = AutomaticMaskGenerator(self.model, output_mode="coco_rle",
                                               encoder_dtype=self.encoder_dtype, **options)
            return generator.generate(pixels, embedding=self._embedding(image))

    # ------------------------------------------------------------------ versions
    def switch(self, version: ModelVersion, patience: float = CLICK_PATIENCE_S) -> None:
        """Load ``version``'s weights and make it the project's current version."""
        with self.using_model(f"loading model version {version.id}", patience):
            self._load(version)
            self.project.db.set_settings({"model_version": version.id})


def _read_embedding(path: Path, device: torch.device) -> EmbeddedImage | None:
    """An embedding file, or None when it is unreadable (a torn write before a crash is
    impossible thanks to the atomic rename, but a disk can still fail: recompute then)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            features = f.get_tensor("features").to(device)
        return EmbeddedImage(features, _pair(meta["original_size"]), _pair(meta["input_size"]))
    except Exception:
        return None


def _write_embedding(path: Path, embedded: EmbeddedImage) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"original_size": "%d,%d" % embedded.original_size,
            "input_size": "%d,%d" % embedded.input_size}
    with atomic_output(path) as tmp:
        save_file({"features": embedded.features.detach().cpu().contiguous()}, str(tmp),
                  metadata=meta)


def _pair(text: str) -> tuple[int, int]:
    a, b = text.split(",")
    return int(a), int(b)
