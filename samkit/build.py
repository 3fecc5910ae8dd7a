"""Model configs, the registry, and checkpoint loading / saving.

Official ``.pth`` files (``sam_vit_{b,l,h}_*.pth``, MobileSAM's ``mobile_sam.pt``) load
unchanged and strictly, with ``torch.load(weights_only=True)``. samkit's own checkpoints are
safetensors files that also record which config they belong to.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from samkit.errors import SamkitError
from samkit.io import atomic_output
from samkit.modeling.hed import HED_PIXEL_MEAN, HED_PIXEL_STD
from samkit.modeling.image_encoder import ImageEncoderViT
from samkit.modeling.mask_decoder import MaskDecoder
from samkit.modeling.prompt_encoder import PromptEncoder
from samkit.modeling.quant import dequantize_int8, quantize_int8
from samkit.modeling.sam import PIXEL_MEAN, PIXEL_STD, Sam
from samkit.modeling.transformer import TwoWayTransformer
from samkit.registry import (DEFAULT_MODEL, MODEL_CONFIGS, HedConfig, SamConfig, TinyViTConfig,
                             ViTConfig, get_config)

BUNDLED_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# A tensor stored as int8 has its per-channel fp32 scale under its name + this suffix.
INT8_SCALE_SUFFIX = ".int8_scale"


def build_image_encoder(cfg: SamConfig, drop_path_rate: float = 0.0) -> nn.Module:
    enc = cfg.encoder
    if isinstance(enc, ViTConfig):
        return ImageEncoderViT(
            img_size=cfg.image_size,
            patch_size=enc.patch_size,
            embed_dim=enc.embed_dim,
            depth=enc.depth,
            num_heads=enc.num_heads,
            mlp_ratio=enc.mlp_ratio,
            out_chans=cfg.prompt_embed_dim,
            window_size=enc.window_size,
            global_attn_indexes=enc.global_attn_indexes,
            drop_path_rate=drop_path_rate,
        )
    if isinstance(enc, HedConfig):
        from samkit.modeling.hed_encoder import HedEncoder

        return HedEncoder(img_size=cfg.image_size, out_chans=cfg.prompt_embed_dim,
                          neck_blocks=enc.neck_blocks, stem_int8=enc.stem_int8,
                          context_block=enc.context_block, detail_block=enc.detail_block,
                          train_block4=enc.train_block4)
    from samkit.modeling.tiny_vit import TinyViT

    return TinyViT(
        img_size=cfg.image_size,
        embed_dims=enc.embed_dims,
        depths=enc.depths,
        num_heads=enc.num_heads,
        window_sizes=enc.window_sizes,
        mlp_ratio=enc.mlp_ratio,
        drop_path_rate=drop_path_rate,
        out_chans=cfg.prompt_embed_dim,
    )


def build_sam_from_config(cfg: SamConfig, drop_path_rate: float = 0.0) -> Sam:
    """A randomly initialised SAM for ``cfg`` (eval mode)."""
    grid = cfg.embedding_size
    hed = isinstance(cfg.encoder, HedConfig)
    model = Sam(
        image_encoder=build_image_encoder(cfg, drop_path_rate),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(cfg.image_size, cfg.image_size),
            mask_in_chans=cfg.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=cfg.prompt_embed_dim,
            transformer=TwoWayTransformer(
                depth=cfg.decoder_depth,
                embedding_dim=cfg.prompt_embed_dim,
                num_heads=cfg.decoder_num_heads,
                mlp_dim=cfg.decoder_mlp_dim,
            ),
            num_multimask_outputs=cfg.num_multimask_outputs,
        ),
        pixel_mean=HED_PIXEL_MEAN if hed else PIXEL_MEAN,
        pixel_std=HED_PIXEL_STD if hed else PIXEL_STD,
    )
    model.samkit_config = cfg  # type: ignore[attr-defined]  # recorded by save_checkpoint
    return model.eval()


RANDOM_WEIGHTS_SEED = 0  # the one initialisation of every untrained model build_sam returns


def build_sam(
    model: str | SamConfig = DEFAULT_MODEL,
    checkpoint: str | Path | None = None,
    *,
    drop_path_rate: float = 0.0,
    device: str | torch.device | None = None,
) -> Sam:
    """Build a SAM by registry name (``vit_b``, ``vit_l``, ``vit_h``, ``vit_t``,
    ``samkit-tiny``) or config, optionally loading a checkpoint strictly.

    Without ``checkpoint`` a model with bundled weights (``samkit-tiny``) loads them if the
    package ships them; otherwise the weights are random (check :func:`is_trained`), drawn
    from seed :data:`RANDOM_WEIGHTS_SEED` whatever the caller's RNG state, so every command
    gives an untrained model the same weights (and the same masks) on every run.
    """
    cfg = get_config(model) if isinstance(model, str) else model
    name = model if isinstance(model, str) else "custom config"
    if checkpoint is None and cfg.bundled_weights:
        bundled = BUNDLED_WEIGHTS_DIR / cfg.bundled_weights
        checkpoint = bundled if bundled.is_file() else None
    if checkpoint is not None:  # a variant of the model (trained with model_overrides)
        cfg = dataclasses.replace(cfg, encoder=recorded_encoder(checkpoint, cfg))
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        sam = build_sam_from_config(cfg, drop_path_rate)
    sam.samkit_trained = False  # type: ignore[attr-defined]
    sam.samkit_weights = f"random (seed {RANDOM_WEIGHTS_SEED})"  # type: ignore[attr-defined]
    if checkpoint is not None:
        _check_image_size(checkpoint, cfg, name)
        state_dict = load_state_dict(checkpoint)
        attach_recorded_text_prompt(sam, state_dict, checkpoint_metadata(checkpoint))
        load_into(sam, state_dict, name, source=str(checkpoint))
        sam.samkit_trained = True  # type: ignore[attr-defined]
        bundled_file = Path(checkpoint).parent == BUNDLED_WEIGHTS_DIR
        sam.samkit_weights = (  # type: ignore[attr-defined]
            f"bundled {Path(checkpoint).name}" if bundled_file else Path(checkpoint).name)
    return sam.to(device) if device is not None else sam


TEXT_PROMPT_KEY = "text_prompt.proj.0.weight"  # embed_dim x clip_dim: the slot's CLIP size


def attach_recorded_text_prompt(sam: Sam, state_dict: Mapping[str, torch.Tensor],
                                metadata: Mapping[str, str]) -> None:
    """Give ``sam`` the text slot a checkpoint holds (paper §7.5), sized from its weights and
    named after the CLIP recorded with it; a checkpoint without one leaves ``sam`` as is."""
    weight = state_dict.get(TEXT_PROMPT_KEY)
    if weight is None:
        return
    recorded = metadata.get("text_clip_dim")
    if recorded is not None and int(recorded) != weight.shape[1]:
        raise SamkitError(f"checkpoint's text slot takes {weight.shape[1]}-d CLIP embeddings "
                          f"but records text_clip_dim={recorded}: the file is inconsistent")
    sam.attach_text_prompt(int(weight.shape[1]), metadata.get("text_clip_name", ""))


def is_trained(model: Sam) -> bool:
    """False for a randomly initialised model (its masks mean nothing)."""
    return bool(getattr(model, "samkit_trained", False))


def weights_source(model: Sam) -> str:
    """Where a model's weights came from, in a few words: ``random (seed 0)``, ``bundled
    samkit_tiny.safetensors`` or a checkpoint's file name; ``unknown`` for a model that
    :func:`build_sam` did not build."""
    return str(getattr(model, "samkit_weights", "unknown"))


ENCODER_KEY = "encoder"  # header: the encoder config a samkit checkpoint was saved with


def recorded_encoder(path: str | Path, cfg: SamConfig) -> ViTConfig | TinyViTConfig | HedConfig:
    """The encoder config a samkit checkpoint records (``save_checkpoint``), as ``cfg``'s
    encoder with the recorded fields; ``cfg.encoder`` when nothing is recorded or the record
    is of another encoder type (the strict load then says what does not fit). A samkit file
    of samkit-tiny's encoder saved before encoders were recorded holds the plain stem
    (``HedConfig()``: the only one such a file could be loaded as then)."""
    metadata = checkpoint_metadata(path)
    text = metadata.get(ENCODER_KEY)
    if text is None:
        if isinstance(cfg.encoder, HedConfig) and metadata.get("format") == "samkit":
            return HedConfig()
        return cfg.encoder
    try:
        fields = json.loads(text)
        if not isinstance(fields, dict):
            raise ValueError("not a JSON object")
        if fields.pop("type", None) != type(cfg.encoder).__name__:
            return cfg.encoder
        return with_encoder_fields(cfg.encoder, fields)
    except ValueError as err:  # json's decode errors are ValueErrors too
        raise SamkitError(f"checkpoint {path} has a malformed encoder record: {err}") from None


EncoderConfig = ViTConfig | TinyViTConfig | HedConfig


def with_encoder_fields(encoder: EncoderConfig, fields: dict[str, Any]) -> EncoderConfig:
    """``encoder`` with ``fields`` replaced, each checked to be a field of it and of its
    type (lists become tuples; bool is not int); a ValueError names the first that is not."""
    known = {f.name: getattr(encoder, f.name) for f in dataclasses.fields(encoder)}
    values = {}
    for key, value in fields.items():
        if key not in known:
            raise ValueError(f"unknown field {key!r}")
        value = tuple(value) if isinstance(value, list) else value
        default = known[key]
        if type(value) is not type(default) or (isinstance(value, tuple) and not (
                {type(v) for v in value} <= {type(d) for d in default})):  # bool is not int
            raise ValueError(f"{key}={value!r} is not of the type of {default!r}")
        values[key] = value
    return dataclasses.replace(encoder, **values)


def _check_image_size(path: str | Path, cfg: SamConfig, name: str) -> None:
    """samkit checkpoints record their input size: TinyViT weights trained at 512 px have the
    same keys and shapes as at 1024 px, so only this tells the two apart."""
    recorded = checkpoint_metadata(path).get("image_size")
    if recorded is not None and int(recorded) != cfg.image_size:
        raise SamkitError(
            f"checkpoint {path} was trained at image size {recorded}, but model {name!r} "
            f"uses {cfg.image_size}; pick the model it was trained as"
        )


def checkpoint_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a samkit safetensors checkpoint ({} for other files)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # unreadable: load_state_dict reports it with a clear message
        return {}


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file safely (safetensors, or torch pickle with weights_only=True).

    Accepts a bare state dict or a training checkpoint holding one under ``"model"``.
    """
    path = Path(path)
    if not path.is_file():
        raise SamkitError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise SamkitError(f"checkpoint {path} is empty (0 bytes)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path))
        else:
            with warnings.catch_warnings():  # torch's pickle-protocol notice says nothing useful
                warnings.simplefilter("ignore", UserWarning)
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated, or not a checkpoint at all
        raise SamkitError(
            f"{path} is not a PyTorch/safetensors checkpoint ({_load_failure(err)})"
        ) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise SamkitError(f"checkpoint {path} does not hold a state dict of tensors")
    return _dequantized(dict(obj), path)


def _dequantized(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """int8-stored tensors (``save_checkpoint(int8=...)``) back to fp32 weights."""
    for scale_key in [k for k in state if k.endswith(INT8_SCALE_SUFFIX)]:
        key = scale_key[: -len(INT8_SCALE_SUFFIX)]
        q, scale = state.get(key), state.pop(scale_key)
        if q is None or q.dtype != torch.int8 or scale.shape != q.shape[:1]:
            raise SamkitError(f"checkpoint {path} has an int8 scale for {key!r} without "
                              "its int8 weight")
        state[key] = dequantize_int8(q, scale)
    return state


def _load_failure(err: Exception) -> str:
    """Why a checkpoint did not load, in a few words. torch's own text for the safe unpickler
    runs to paragraphs and suggests ``weights_only=False``, which would run the file's code."""
    text = str(err)
    if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in text:
        unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if unsupported:
            return f"it holds a Python object, {unsupported.group(1)}, that the safe loader refuses"
        return "its content is not tensors the safe loader can read"
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return first[:160]


def detect_model_type(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Which registry model a state dict's keys and shapes belong to, if any."""
    for name in MODEL_CONFIGS:
        if _fits(state_dict, _reference_shapes(name)):
            return name
    return None


def _reference_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape for a registry model, built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        model = build_sam_from_config(MODEL_CONFIGS[name])
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _fits(state_dict: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> bool:
    return state_dict.keys() == shapes.keys() and all(
        tuple(state_dict[k].shape) == s for k, s in shapes.items()
    )


def load_into(model: Sam, state_dict: Mapping[str, torch.Tensor], name: str, source: str) -> None:
    """Strictly load ``state_dict`` into ``model``; a mismatch is one clear line."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if not _fits(state_dict, expected):
        guess = detect_model_type(state_dict)
        if guess is not None and guess != name:  # the same name: a changed config (overrides)
            raise SamkitError(
                f"checkpoint {source} does not fit model {name!r}: it looks like a {guess!r} "
                f"checkpoint (use --model {guess})"
            )
        missing = sorted(expected.keys() - state_dict.keys())
        unexpected = sorted(state_dict.keys() - expected.keys())
        wrong = [k for k in expected.keys() & state_dict.keys()
                 if tuple(state_dict[k].shape) != expected[k]]
        detail = "; ".join(
            f"{label}: {len(keys)} (e.g. {keys[0]})"
            for label, keys in (("missing", missing), ("unexpected", unexpected),
                                ("wrong shape", wrong))
            if keys
        )
        raise SamkitError(
            f"checkpoint {source} does not fit model {name!r} and matches no known model "
            f"type ({detail})"
        )
    # fp16 shipped weights go back to each tensor's own dtype (BatchNorm counters stay int).
    target = model.state_dict()
    model.load_state_dict({k: v.to(target[k].dtype) for k, v in state_dict.items()}, strict=True)


def save_checkpoint(
    model: Sam, path: str | Path, *, half: bool = False, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write the model's state dict as safetensors (optionally fp16 for shipping), recording
    its input size (and any extra string ``metadata``) in the header. With ``half``, weights
    the model keeps int8-valued (samkit-tiny's stem with ``stem_int8``) are stored as int8
    and a per-channel scale."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {
        k: (v.half() if half and v.is_floating_point() else v).contiguous()
        for k, v in model.state_dict().items()
    }
    from samkit.modeling.hed_encoder import HedEncoder

    encoder = model.image_encoder
    int8_names = encoder.int8_weight_names() if half and isinstance(encoder, HedEncoder) else []
    for name in int8_names:
        key = f"image_encoder.{name}"
        tensors[key], tensors[key + INT8_SCALE_SUFFIX] = quantize_int8(model.state_dict()[key])
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": "samkit", "image_size": str(model.image_size), **(metadata or {})}
    config = getattr(model, "samkit_config", None)
    if config is not None:  # so a variant (model_overrides) loads by its registry name
        header[ENCODER_KEY] = json.dumps({"type": type(config.encoder).__name__,
                                          **dataclasses.asdict(config.encoder)})
    if model.text_prompt is not None:  # which CLIP the text slot was trained with
        header |= {"text_clip_name": model.text_prompt.clip_name,
                   "text_clip_dim": str(model.text_prompt.clip_dim)}
    with atomic_output(path, fsync=True) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def _registry_builder(name: str) -> Callable[..., Sam]:
    def build(checkpoint: str | Path | None = None) -> Sam:
        return build_sam(name, checkpoint)

    return build


# Drop-in for ``segment_anything.sam_model_registry[...](checkpoint=...)``.
sam_model_registry: dict[str, Callable[..., Sam]] = {
    name: _registry_builder(name) for name in MODEL_CONFIGS
}
sam_model_registry["default"] = sam_model_registry["vit_h"]
