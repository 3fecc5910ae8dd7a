"""CLIP for text prompts (paper §7.5, App. D.5), through Hugging Face ``transformers``.

samkit does not ship or hand-write a CLIP: it loads the user's weights into ``transformers``'
``CLIPModel`` (``pip install 'samkit[text]'``), either

* a Hugging Face folder (``config.json``, ``model.safetensors``, tokenizer files), e.g. what
  ``samkit weights fetch clip-vit-large-patch14-336`` downloads, or
* an OpenAI / open_clip ``state_dict`` file (``.safetensors``, or ``.pt`` / ``.bin`` read with
  ``weights_only=True``), whose keys :func:`convert_openai_state_dict` maps onto
  ``CLIPModel``'s; the tokenizer files then come from a folder (``tokenizer=``).

Both give L2-normalised embeddings (App. D.5: "which we l2 normalize prior to use"): the text
embedding of a phrase, and the image embedding of the crop around a mask
(:func:`mask_crop`), which is what the text slot is trained on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from samkit.errors import SamkitError

# OpenAI CLIP's image normalisation (the same in every HF preprocessor_config.json it ships).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
OPENAI_HEAD_WIDTH = 64  # OpenAI's ViTs and text transformers all use 64-d attention heads
INSTALL_HINT = "pip install 'samkit[text]'"


def require_transformers() -> Any:
    """The ``transformers`` module, or a one-line error saying how to get it."""
    try:
        import transformers
    except ImportError:
        raise SamkitError(f"text prompts need the transformers package: {INSTALL_HINT}") from None
    return transformers


@dataclass
class Clip:
    """A frozen CLIP (``transformers.CLIPModel``, eval mode) and its tokenizer.

    ``name`` says which CLIP it is (a HF repo name such as
    ``openai/clip-vit-large-patch14-336``, or the file it came from); ``dim`` is the size of
    its joint embedding space, which a model's text slot must match.
    """

    model: Any  # transformers.CLIPModel
    tokenizer: Any  # transformers tokenizer
    name: str

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def device(self) -> torch.device:
        return self.model.text_projection.weight.device

    @torch.inference_mode()
    def embed_text(self, phrases: Sequence[str]) -> torch.Tensor:
        """``N`` phrases -> ``N x dim`` unit-length CLIP text embeddings."""
        if not phrases:
            return torch.zeros(0, self.dim, device=self.device)
        tokens = self.tokenizer(list(phrases), padding=True, truncation=True,
                                max_length=self.model.config.text_config.max_position_embeddings,
                                return_tensors="pt").to(self.device)
        out = self.model.text_model(input_ids=tokens["input_ids"],
                                    attention_mask=tokens["attention_mask"])
        return F.normalize(self.model.text_projection(out.pooler_output), dim=-1)

    @torch.inference_mode()
    def embed_images(self, crops: Sequence[np.ndarray]) -> torch.Tensor:
        """``N`` ``h x w x 3`` uint8 RGB crops (square ones, e.g. from :func:`mask_crop`) ->
        ``N x dim`` unit-length CLIP image embeddings."""
        if not crops:
            return torch.zeros(0, self.dim, device=self.device)
        pixels = torch.stack([self.pixel_tensor(c) for c in crops]).to(self.device)
        out = self.model.vision_model(pixel_values=pixels)
        return F.normalize(self.model.visual_projection(out.pooler_output), dim=-1)

    def pixel_tensor(self, crop: np.ndarray) -> torch.Tensor:
        """CLIP's preprocessing of a square crop: bicubic resize to the model's input size,
        then its mean/std normalisation (``3 x s x s`` float)."""
        s = self.image_size
        resized = cv2.resize(crop, (s, s), interpolation=cv2.INTER_CUBIC)
        x = torch.from_numpy(resized).permute(2, 0, 1).float() / 255.0
        mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        std = torch.tensor(CLIP_STD).view(3, 1, 1)
        return (x - mean) / std


def load_clip(path: str | Path, tokenizer: str | Path | None = None,
              device: str | torch.device | None = None, hidden_act: str = "quick_gelu") -> Clip:
    """Load the user's CLIP: a HF folder, or an OpenAI/open_clip state-dict file.

    ``tokenizer``: a folder with the tokenizer files (``tokenizer.json``, or ``vocab.json`` +
    ``merges.txt``); default: ``path`` itself for a folder, the file's folder for a state
    dict. ``hidden_act``: the activation of a state-dict CLIP, which its weights cannot tell
    (OpenAI's models use ``quick_gelu``; most open_clip-trained ones ``gelu``).
    """
    transformers = require_transformers()
    path = Path(path).expanduser()
    if not path.exists():
        raise SamkitError(f"CLIP weights not found: {path} (a Hugging Face CLIP folder or a "
                          "state-dict file; see docs/text.md)")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SamkitError(f"{path} is not a Hugging Face CLIP folder: it has no config.json")
        bar = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()  # local files: a bar is noise
        try:
            model = transformers.CLIPModel.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise SamkitError(f"could not load CLIP from {path}: {_first_line(err)}") from None
        finally:
            if bar:
                transformers.utils.logging.enable_progress_bar()
        name = str(getattr(model.config, "_name_or_path", "") or path.name)
        name = _hub_name(path) or name
    else:
        from samkit.build import load_state_dict

        converted, config = convert_openai_state_dict(load_state_dict(path), hidden_act)
        model = transformers.CLIPModel(config)
        _load_strict(model, converted, str(path))
        name = path.name
    tokenizer_dir = Path(tokenizer).expanduser() if tokenizer else (
        path if path.is_dir() else path.parent)
    model.requires_grad_(False).eval()
    if device is not None:
        model.to(device)
    return Clip(model, load_tokenizer(tokenizer_dir), name)


def load_tokenizer(folder: Path) -> Any:
    """CLIP's BPE tokenizer from ``folder`` (``tokenizer.json`` or ``vocab.json`` + ``merges.txt``)."""
    transformers = require_transformers()
    if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        raise SamkitError(f"no CLIP tokenizer files in {folder} (tokenizer.json, or vocab.json "
                          "and merges.txt): pass the folder that has them")
    try:
        return transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise SamkitError(f"could not load the CLIP tokenizer from {folder}: "
                          f"{_first_line(err)}") from None


def _hub_name(folder: Path) -> str | None:
    """``owner/name`` when the folder is where ``samkit weights fetch`` puts a hub CLIP."""
    from samkit.weights import CLIP_REGISTRY

    for spec in CLIP_REGISTRY.values():
        if folder.name == spec.name:
            return spec.repo
    return None


def _load_strict(model: Any, state: Mapping[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    missing = sorted(own.keys() - state.keys())
    wrong = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or wrong:
        detail = f"missing {missing[0]}" if missing else f"wrong shape {wrong[0]}"
        raise SamkitError(f"{source} is not a CLIP state dict samkit can convert ({detail})")
    model.load_state_dict(dict(state), strict=True)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


# ------------------------------------------------------------- OpenAI state dict -> transformers
_BLOCK = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: transformers' name
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "logit_scale": "logit_scale",
}


def convert_openai_state_dict(state: Mapping[str, torch.Tensor], hidden_act: str = "quick_gelu"
                              ) -> tuple[dict[str, torch.Tensor], Any]:
    """An OpenAI/open_clip ViT CLIP state dict (``visual.transformer.resblocks.*``,
    ``token_embedding``, ``text_projection``, ...) -> ``(CLIPModel state dict, CLIPConfig)``.

    The sizes are read off the weights (widths, depths, patch size, context length; heads are
    ``width / 64`` as in every OpenAI model). Fused ``in_proj`` attention weights are split
    into q, k, v; the projections, stored ``in x out`` for ``x @ P``, are transposed into
    ``nn.Linear`` weights.
    """
    transformers = require_transformers()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "visual.conv1.weight" not in state or "token_embedding.weight" not in state:
        raise SamkitError("not an OpenAI/open_clip ViT CLIP state dict (no visual.conv1.weight "
                          "or token_embedding.weight); ResNet CLIPs are not supported")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        target = _convert_key(key)
        if target is None:
            continue
        if key.endswith(("in_proj_weight", "in_proj_bias")):
            suffix = "weight" if key.endswith("weight") else "bias"
            for part, chunk in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[f"{target}.{part}_proj.{suffix}"] = chunk.clone()
        else:
            out[target] = value
    out["text_model.embeddings.position_embedding.weight"] = state["positional_embedding"]
    out["vision_model.embeddings.position_embedding.weight"] = state["visual.positional_embedding"]
    out["text_projection.weight"] = state["text_projection"].T.contiguous()
    out["visual_projection.weight"] = state["visual.proj"].T.contiguous()
    if "logit_scale" not in out:
        out["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    config = transformers.CLIPConfig(
        text_config=_tower_config(state, "transformer.resblocks", hidden_act) | {
            "vocab_size": state["token_embedding.weight"].shape[0],
            "max_position_embeddings": state["positional_embedding"].shape[0],
            # OpenAI's text tower pools at the highest token id (its end-of-text token);
            # transformers does the same for configs whose eos_token_id is 2.
            "eos_token_id": 2,
            # OpenAI's start- and end-of-text tokens are the vocab's last two.
            "bos_token_id": state["token_embedding.weight"].shape[0] - 2,
            "pad_token_id": state["token_embedding.weight"].shape[0] - 1,
        },
        vision_config=_tower_config(state, "visual.transformer.resblocks", hidden_act) | {
            "patch_size": state["visual.conv1.weight"].shape[-1],
            "image_size": state["visual.conv1.weight"].shape[-1] * math.isqrt(
                state["visual.positional_embedding"].shape[0] - 1),
        },
        projection_dim=state["text_projection"].shape[1],
    )
    return out, config


def _convert_key(key: str) -> str | None:
    if key in _TOP:
        return _TOP[key]
    match = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key)
    match_in = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)",
                            key)
    if match_in:
        tower = "vision_model" if match_in.group(1) else "text_model"
        return f"{tower}.encoder.layers.{match_in.group(2)}.self_attn"
    if match and match.group(3) in _BLOCK:
        tower = "vision_model" if match.group(1) else "text_model"
        return (f"{tower}.encoder.layers.{match.group(2)}.{_BLOCK[match.group(3)]}."
                f"{match.group(4)}")
    return None  # positional embeddings and projections are handled by the caller; the rest
    # (OpenAI's attn_mask buffer, context_length/input_resolution scalars) is not weights


def _tower_config(state: Mapping[str, torch.Tensor], prefix: str, hidden_act: str) -> dict[str, Any]:
    depth = 1 + max(int(m.group(1)) for k in state
                    if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k)))
    width = state[f"{prefix}.0.ln_1.weight"].shape[0]
    return {
        "hidden_size": width,
        "intermediate_size": state[f"{prefix}.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": depth,
        "num_attention_heads": width // OPENAI_HEAD_WIDTH,
        "hidden_act": hidden_act,
    }


# ------------------------------------------------------------------- training crops (App. D.5)
def mask_crop(image: np.ndarray, mask: np.ndarray, enlarge: float, zero_outside: bool
              ) -> np.ndarray:
    """The crop App. D.5 gives CLIP for a mask: its bounding box enlarged ``enlarge`` times
    about its centre, made square (the long side) so the aspect ratio survives the resize,
    zero-padded where it leaves the image; with ``zero_outside`` the pixels outside the mask
    are zeroed. ``image`` H x W x 3 uint8, ``mask`` H x W bool (non-empty)."""
    ys, xs = np.nonzero(mask)
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    side = max(1, round(enlarge * max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)))
    y0, x0 = round(cy - side / 2), round(cx - side / 2)
    pixels = np.where(mask[..., None], image, 0) if zero_outside else image
    crop = np.zeros((side, side, 3), np.uint8)
    h, w = mask.shape
    sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y0 + side, h), min(x0 + side, w)
    crop[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = pixels[sy0:sy1, sx0:sx1]
    return crop


def check_clip_fits(clip_dim: int, clip_name: str, slot_dim: int, slot_name: str) -> None:
    """A CLIP whose embeddings the model's text slot was not trained on is an error at load."""
    if clip_dim != slot_dim:
        trained = f" ({slot_name})" if slot_name else ""
        raise SamkitError(f"CLIP {clip_name} gives {clip_dim}-d embeddings but the model's text "
                          f"slot was trained on {slot_dim}-d ones{trained}: use that CLIP")
