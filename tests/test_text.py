"""Text prompts (paper §7.5, App. D.5): the CLIP library path against ``transformers`` itself,
the OpenAI state-dict converter, the text slot in the model, predictor and CLI, training with
cached crop embeddings (runs, resumes, deterministic), and a synthetic end-to-end check.

No CLIP weights can be downloaded here: CLIPs are tiny and random, and the tokenizer's vocab
is built in the test.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from samkit.build import build_sam, build_sam_from_config, save_checkpoint
from samkit.cli import main as samkit_main
from samkit.errors import SamkitError
from samkit.predictor import SamPredictor
from samkit.registry import SamConfig, ViTConfig
from samkit.train.config import TrainConfig
from samkit.train.loop import read_metrics, train
from samkit.train.text import write_text_cache

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 128
TINY = SamConfig(ViTConfig(32, 2, 2, (1,), window_size=4), image_size=SIZE,
                 prompt_embed_dim=64, decoder_num_heads=2, decoder_mlp_dim=128)
TINY_MODEL = {"model": "vit_b", "model_overrides": {
    "image_size": SIZE, "prompt_embed_dim": 64, "decoder_num_heads": 2, "decoder_mlp_dim": 128,
    "encoder": {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": [1],
                "window_size": 4}}}
def reference_model(folder: Path):
    return transformers.CLIPModel.from_pretrained(str(folder)).eval()


def test_hf_folder_gives_transformers_own_embeddings(clip_dir: Path) -> None:
    from samkit.clip import load_clip

    clip = load_clip(clip_dir)
    assert clip.dim == 24 and clip.image_size == 32
    phrases = ["a red wheel", "blue"]
    ref = reference_model(clip_dir)
    tokens = transformers.CLIPTokenizer.from_pretrained(str(clip_dir))(
        phrases, padding=True, return_tensors="pt")
    with torch.inference_mode():
        expected = ref.get_text_features(**tokens)
        expected = getattr(expected, "pooler_output", expected)
    assert torch.allclose(clip.embed_text(phrases), torch.nn.functional.normalize(expected, dim=-1),
                          atol=1e-6)
    crop = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    pixels = clip.pixel_tensor(crop)[None]
    with torch.inference_mode():
        image_ref = ref.get_image_features(pixel_values=pixels)
        image_ref = getattr(image_ref, "pooler_output", image_ref)
    assert torch.allclose(clip.embed_images([crop]),
                          torch.nn.functional.normalize(image_ref, dim=-1), atol=1e-6)


def openai_layout(model) -> dict[str, torch.Tensor]:
    """The OpenAI/open_clip key layout of a transformers CLIP, written out by hand from
    OpenAI's model.py (fused in_proj, `x @ proj` projections), independently of samkit's
    converter."""
    sd = model.state_dict()
    out = {"token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           "ln_final.bias": sd["text_model.final_layer_norm.bias"],
           "text_projection": sd["text_projection.weight"].T,
           "logit_scale": sd["logit_scale"],
           "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
           "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
           "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
           "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
           "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
           "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
           "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
           "visual.proj": sd["visual_projection.weight"].T}
    for tower, prefix in (("text_model", "transformer"), ("vision_model", "visual.transformer")):
        for i in range(2):
            hf, oa = f"{tower}.encoder.layers.{i}", f"{prefix}.resblocks.{i}"
            for p in ("weight", "bias"):
                out[f"{oa}.attn.in_proj_{p}"] = torch.cat(
                    [sd[f"{hf}.self_attn.{x}_proj.{p}"] for x in "qkv"])
                out[f"{oa}.attn.out_proj.{p}"] = sd[f"{hf}.self_attn.out_proj.{p}"]
                out[f"{oa}.ln_1.{p}"] = sd[f"{hf}.layer_norm1.{p}"]
                out[f"{oa}.ln_2.{p}"] = sd[f"{hf}.layer_norm2.{p}"]
                out[f"{oa}.mlp.c_fc.{p}"] = sd[f"{hf}.mlp.fc1.{p}"]
                out[f"{oa}.mlp.c_proj.{p}"] = sd[f"{hf}.mlp.fc2.{p}"]
    out["attn_mask"] = torch.zeros(16, 16)  # OpenAI's causal-mask buffer: not a weight
    return {k: v.contiguous() for k, v in out.items()}


def test_openai_state_dict_converter_matches_transformers(clip_dir: Path, tmp_path: Path) -> None:
    """A state-dict file in OpenAI's layout, converted, is the transformers model it was
    written from: the same weights and identical text and image embeddings."""
    from safetensors.torch import save_file

    from samkit.clip import load_clip

    ref = reference_model(clip_dir)
    path = tmp_path / "ViT-tiny.safetensors"
    save_file(openai_layout(ref), str(path))
    from_file, from_folder = load_clip(path, tokenizer=clip_dir), load_clip(clip_dir)
    converted = from_file.model.state_dict()
    assert converted.keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        assert torch.equal(converted[key], value), key
    phrases = ["a red wheel", "blue", "the green one"]
    assert torch.equal(from_file.embed_text(phrases), from_folder.embed_text(phrases))
    crops = list(np.random.default_rng(1).integers(0, 255, (3, 20, 20, 3), dtype=np.uint8))
    assert torch.equal(from_file.embed_images(crops), from_folder.embed_images(crops))


def test_bad_clip_paths_are_one_line(tmp_path: Path) -> None:
    from samkit.clip import load_clip

    with pytest.raises(SamkitError, match="CLIP weights not found"):
        load_clip(tmp_path / "missing")
    with pytest.raises(SamkitError, match="no config.json"):
        load_clip(tmp_path)
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(bad))
    with pytest.raises(SamkitError, match="not an OpenAI/open_clip ViT CLIP"):
        load_clip(bad)


# ---------------------------------------------------------------------------- the text slot
def tiny_sam(clip_dim: int | None = 24):
    torch.manual_seed(0)
    sam = build_sam_from_config(TINY)
    if clip_dim is not None:
        sam.attach_text_prompt(clip_dim, "tiny-clip")
    return sam.eval()


def scene(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (96, 128, 3), dtype=np.uint8)


def test_model_without_slot_keeps_the_official_state_dict() -> None:
    plain, slotted = tiny_sam(None), tiny_sam(24)
    assert plain.text_prompt is None
    extra = slotted.state_dict().keys() - plain.state_dict().keys()
    assert extra and all(k.startswith("text_prompt.") for k in extra)
    assert plain.state_dict().keys() <= slotted.state_dict().keys()


def test_text_reaches_the_decoder_and_a_zero_projection_changes_nothing() -> None:
    sam = tiny_sam()
    predictor = SamPredictor(sam)
    predictor.set_image(scene())
    point = dict(point_coords=np.array([[40.0, 30.0]]), point_labels=np.array([1]))
    base, base_scores, _ = predictor.predict(**point, return_logits=True)
    e1, e2 = torch.nn.functional.normalize(torch.randn(2, 24, generator=torch.Generator()
                                                       .manual_seed(1)), dim=-1)
    with_1, _, _ = predictor.predict(**point, text_embedding=e1, return_logits=True)
    with_2, _, _ = predictor.predict(**point, text_embedding=e2, return_logits=True)
    assert not np.allclose(with_1, base) and not np.allclose(with_1, with_2)
    for p in sam.text_prompt.parameters():
        torch.nn.init.zeros_(p)
    zero, zero_scores, _ = predictor.predict(**point, text_embedding=e1, return_logits=True)
    assert np.array_equal(zero, base) and np.array_equal(zero_scores, base_scores)
    # Text alone answers too; a batch of texts gives one mask set each.
    masks, scores, _ = predictor.predict_batch(text_embeddings=torch.stack([e1, e2]))
    assert masks.shape[:2] == (2, 3) and scores.shape == (2, 3)


def test_text_errors_are_one_line() -> None:
    plain = SamPredictor(tiny_sam(None))
    plain.set_image(scene())
    with pytest.raises(SamkitError, match="has no text slot"):
        plain.predict(text_embedding=np.zeros(24))
    slotted = SamPredictor(tiny_sam(24))
    slotted.set_image(scene())
    with pytest.raises(SamkitError, match="need CLIP weights"):
        slotted.predict(text="a wheel")
    with pytest.raises(SamkitError, match=r"B x 24"):
        slotted.predict(text_embedding=np.zeros(16))
    with pytest.raises(SamkitError, match="one text per prompt set"):
        slotted.predict_batch(boxes=np.array([[0, 0, 9, 9], [1, 1, 9, 9]]),
                              text_embeddings=np.zeros((3, 24)))


def test_predictor_embeds_phrases_with_its_clip_and_catches_a_mismatch(clip_dir: Path) -> None:
    from samkit.clip import load_clip

    clip = load_clip(clip_dir)
    predictor = SamPredictor(tiny_sam(24), clip=clip)
    predictor.set_image(scene())
    by_text, _, _ = predictor.predict(text="a wheel", return_logits=True)
    by_vector, _, _ = predictor.predict(text_embedding=clip.embed_text(["a wheel"])[0],
                                        return_logits=True)
    assert np.array_equal(by_text, by_vector)
    with pytest.raises(SamkitError, match="gives 24-d embeddings but the model's text slot "
                                          "was trained on 16-d"):
        SamPredictor(tiny_sam(16), clip=clip)


def test_checkpoint_records_the_slot_and_its_clip(tmp_path: Path) -> None:
    from samkit.build import checkpoint_metadata

    sam = tiny_sam(24)
    path = save_checkpoint(sam, tmp_path / "text.safetensors")
    assert checkpoint_metadata(path).items() >= {"text_clip_name": "tiny-clip",
                                                 "text_clip_dim": "24"}.items()
    loaded = build_sam(TINY, path)
    assert loaded.text_prompt is not None and loaded.text_prompt.clip_name == "tiny-clip"
    for key, value in sam.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert build_sam(TINY, save_checkpoint(tiny_sam(None), tmp_path / "p.safetensors")
                     ).text_prompt is None


# ------------------------------------------------------------- synthetic scenes and training
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220),
           "yellow": (230, 210, 40)}
SHAPES_PER_SCENE = 3


def make_scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A 96 x 128 dark noisy image with 3 shapes (disc or square, 24-34 px) of 3 different
    colours, not overlapping: the image, the ``3 x H x W`` masks and their colour words."""
    h, w = 96, 128
    yy, xx = np.mgrid[:h, :w]
    image = rng.integers(0, 50, (h, w, 3)).astype(np.uint8)
    words = list(rng.choice(list(COLOURS), SHAPES_PER_SCENE, replace=False))
    masks: list[np.ndarray] = []
    while len(masks) < SHAPES_PER_SCENE:
        r = int(rng.integers(12, 18))
        cy, cx = int(rng.integers(r, h - r)), int(rng.integers(r, w - r))
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) if rng.random() < 0.5 else (
            (abs(yy - cy) < r) & (abs(xx - cx) < r))
        if all(not (mask & m).any() for m in masks):
            masks.append(mask)
    for mask, word in zip(masks, words, strict=True):
        image[mask] = COLOURS[word]
    return image, np.stack(masks), words


def word_embeddings(dim: int = 16) -> dict[str, torch.Tensor]:
    """One fixed unit vector per colour word: the same at training and inference, standing
    in for CLIP's aligned image and text embeddings."""
    vectors = torch.nn.functional.normalize(
        torch.randn(len(COLOURS), dim, generator=torch.Generator().manual_seed(7)), dim=-1)
    return dict(zip(COLOURS, vectors, strict=True))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """16 training scenes (images/ + id-map masks/) and their text cache: each shape's
    "crop embedding" is its colour word's vector."""
    root = tmp_path_factory.mktemp("scenes")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    vectors = word_embeddings()
    rows, images, masks_index = [], [], []
    for i in range(16):
        image, masks, words = make_scene(rng)
        Image.fromarray(image).save(root / "images" / f"{i:02d}.png")
        ids = np.zeros(image.shape[:2], np.uint8)
        for k, mask in enumerate(masks):
            ids[mask] = k + 1
        Image.fromarray(ids).save(root / "masks" / f"{i:02d}.png")
        for k, word in enumerate(words):
            rows.append(vectors[word])
            images.append(i)
            masks_index.append(k)
    cache = write_text_cache(root / "text_cache.safetensors", torch.stack(rows), images,
                             masks_index, "colour-words", [str(root)], 16)
    return root, cache


def text_run(data: Path, cache: Path, out: Path, **fields) -> TrainConfig:
    values = TINY_MODEL | {
        "data": [str(data)], "out_dir": str(out), "text_cache": str(cache), "batch_size": 4,
        "iterations": 300, "lr": 2e-3, "warmup": 10, "layer_decay": 1.0, "drop_path": 0.0,
        "num_workers": 0, "log_interval": 10, "ckpt_interval": 1000, "progress": False,
        "scale_range": [1.0, 1.0], "hflip": False, "prompt_iterations": [[0, 1]],
        "loss_resolution": "low", "weight_decay": 0.0, "text_share": 1.0,
        "focal_weight": 1.0,
    }
    return TrainConfig(**(values | fields))


def test_training_with_crop_embeddings_runs_resumes_and_is_deterministic(
        scenes: tuple[Path, Path], tmp_path: Path) -> None:
    data, cache = scenes
    short = {"iterations": 6, "log_interval": 1, "prompt_iterations": [[0, 3]],
             "text_share": 0.5}
    once = train(text_run(data, cache, tmp_path / "a", **short))
    again = train(text_run(data, cache, tmp_path / "b", **short))
    assert [r["loss"] for r in once] == [r["loss"] for r in again]
    train(text_run(data, cache, tmp_path / "c", max_steps=3, ckpt_interval=3, **short))
    resumed = train(text_run(data, cache, tmp_path / "c", resume=True, **short))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in once[3:]]
    assert read_metrics(tmp_path / "c" / "metrics.csv")[-1]["loss"] == once[-1]["loss"]
    model = build_sam(text_run(data, cache, tmp_path).model_config(),
                      tmp_path / "a" / "model.safetensors")
    assert model.text_prompt is not None and model.text_prompt.clip_name == "colour-words"


def test_text_finetune_trains_only_the_slot_and_the_decoder(
        scenes: tuple[Path, Path], tmp_path: Path) -> None:
    """App. D.5 as a fine-tune of an existing (text-less) checkpoint."""
    data, cache = scenes
    base = text_run(data, cache, tmp_path)
    init = save_checkpoint(build_sam_from_config(base.model_config()), tmp_path / "init.safetensors")
    before = build_sam(base.model_config(), init).state_dict()
    train(text_run(data, cache, tmp_path / "ft", iterations=3, finetune="text",
                   init_checkpoint=str(init)))
    after = build_sam(base.model_config(), tmp_path / "ft" / "model.safetensors").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("mask_decoder.") for k in changed)
    assert any(k.startswith("text_prompt.") for k in after)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_synthetic_end_to_end_text_finds_the_named_shape(
        scenes: tuple[Path, Path], tmp_path: Path) -> None:
    """Train a tiny model whose only first prompt is the text slot, fed each shape's colour
    word; on new scenes the word alone must find its shape far better than any text-blind
    answer can (the best single shape per scene, chosen knowing the ground truth)."""
    data, cache = scenes
    train(text_run(data, cache, tmp_path))
    sam = build_sam(text_run(data, cache, tmp_path).model_config(),
                    tmp_path / "model.safetensors")
    predictor = SamPredictor(sam)
    vectors = word_embeddings()
    rng = np.random.default_rng(123)
    text_ious, chance = [], []
    for _ in range(8):
        image, masks, words = make_scene(rng)
        predictor.set_image(image)
        out, scores, _ = predictor.predict_batch(
            text_embeddings=torch.stack([vectors[w] for w in words]))
        for k in range(SHAPES_PER_SCENE):
            text_ious.append(iou(out[k, int(scores[k].argmax())].numpy(), masks[k]))
        chance.append(max(np.mean([iou(masks[j], masks[k]) for k in range(SHAPES_PER_SCENE)])
                          for j in range(SHAPES_PER_SCENE)))
    text_miou, chance_miou = float(np.mean(text_ious)), float(np.mean(chance))
    print(f"text-only mIoU {text_miou:.3f} vs text-blind best {chance_miou:.3f}")
    assert text_miou >= chance_miou + 0.3


# ------------------------------------------------------------------------------ CLI, weights
def test_segment_text_cli(clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    from samkit import registry

    monkeypatch.setitem(registry.MODEL_CONFIGS, "tiny-text", TINY)
    image = tmp_path / "scene.png"
    Image.fromarray(scene()).save(image)
    slotted = save_checkpoint(tiny_sam(24), tmp_path / "text.safetensors")
    plain = save_checkpoint(tiny_sam(None), tmp_path / "plain.safetensors")
    common = ["segment", str(image), "--model", "tiny-text", "--device", "cpu"]
    for argv, message in (
        ([*common, "--text", "a wheel"], "--text needs CLIP weights: pass --clip DIR"),
        ([*common, "--checkpoint", str(plain), "--text", "a wheel", "--clip", str(clip_dir)],
         "--text needs a model with a text slot"),
        ([*common, "--checkpoint", str(slotted), "--text", "a wheel", "--clip",
          str(tmp_path / "nowhere")], "CLIP weights not found"),
    ):
        assert samkit_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    out = tmp_path / "out"
    assert samkit_main([*common, "--checkpoint", str(slotted), "--text", "a wheel",
                        "--point", "40,30", "--clip", str(clip_dir), "-o", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["text"] == "a wheel" and len(result["masks"]) == 3


@pytest.fixture
def hub(tmp_path: Path, clip_dir: Path) -> Iterator[str]:
    """A loopback stand-in for huggingface.co serving <repo>/resolve/main/<file>."""
    root = tmp_path / "hub" / "openai" / "clip-vit-base-patch32" / "resolve" / "main"
    root.mkdir(parents=True)
    for f in clip_dir.iterdir():
        (root / f.name).write_bytes(f.read_bytes())
    for missing in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        if not (root / missing).exists():
            (root / missing).write_text("{}" if missing.endswith("json") else "#version: 0.2\n")
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    handler = partial(Quiet, directory=str(tmp_path / "hub"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_weights_fetch_clip_downloads_a_loadable_folder(
        hub: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from samkit import weights
    from samkit.clip import load_clip

    cache = tmp_path / "cache"
    folder = weights.fetch_clip("clip-vit-base-patch32", cache=cache, base_url=hub,
                                progress=False)
    assert folder == cache / "clip" / "clip-vit-base-patch32"
    assert "could not be verified" in capsys.readouterr().err  # no hash pinned: said so
    clip = load_clip(folder)
    assert clip.name == "openai/clip-vit-base-patch32" and clip.dim == 24
    assert samkit_main(["weights", "fetch", "clip-vit-base-patch32", "--cache-dir",
                        str(tmp_path / "c2"), "--url", hub]) == 0
    assert (tmp_path / "c2" / "clip" / "clip-vit-base-patch32" / "model.safetensors").is_file()
    # A pinned hash is checked: a wrong one deletes the download.
    monkeypatch.setitem(weights.CLIP_SHA256, ("clip-vit-base-patch32", "config.json"), "0" * 64)
    (folder / "config.json").unlink()
    with pytest.raises(SamkitError, match="sha256 mismatch for config.json"):
        weights.fetch_clip("clip-vit-base-patch32", cache=cache, base_url=hub, progress=False)
    assert not (folder / "config.json").exists()


# ------------------------------------------------------------------------------ eval text
def coco_scenes(root: Path, count: int = 3) -> Path:
    """Synthetic scenes as a COCO instances dataset whose category names are the colours."""
    from samkit.rle import to_coco_rle

    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    cats = {name: i + 1 for i, name in enumerate(COLOURS)}
    images, anns = [], []
    rng = np.random.default_rng(5)
    for i in range(count):
        image, masks, words = make_scene(rng)
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": image.shape[0],
                       "width": image.shape[1]})
        for mask, word in zip(masks, words, strict=True):
            ys, xs = np.nonzero(mask)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cats[word],
                         "segmentation": to_coco_rle(mask), "area": int(mask.sum()),
                         "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1,
                                  int(np.ptp(ys)) + 1], "iscrowd": 0})
    categories = [{"id": i, "name": name} for name, i in cats.items()]
    (root / "annotations" / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": categories}))
    return root


class ColourPredictor:
    """A method that reads the scenes' colours: a phrase "a <colour>" gets that colour's
    pixels; a click gets the pixels of the clicked colour. ``blind``: the same method without
    the text (a phrase gets the brightest colour present)."""

    def __init__(self, blind: bool = False) -> None:
        self.name = "blind" if blind else "colours"
        self.blind = blind
        self.image: np.ndarray | None = None

    def set_image(self, image: np.ndarray) -> None:
        self.image = image

    def predict(self, prompts, multimask: bool):
        from samkit.eval.predictors import Prediction

        assert self.image is not None and multimask
        masks = []
        for i in range(len(prompts)):
            if prompts.points is not None:
                x, y = prompts.points[i, 0].astype(int)
                colour = self.image[y, x]
            elif self.blind:
                colour = max(COLOURS.values(), key=lambda c: ((self.image == c).all(-1).sum()
                                                              > 0, sum(c)))
            else:
                colour = COLOURS[prompts.texts[i].removeprefix("a ")]
            masks.append((self.image == colour).all(-1))
        logits = np.stack([np.stack([m, m, m]) for m in masks]).astype(np.float32) * 2 - 1
        return Prediction(logits, np.tile([[0.1, 0.9, 0.5]], (len(masks), 1)), None)


def test_eval_text_scores_the_named_instance(tmp_path: Path) -> None:
    """The protocol's wiring: a method that finds each named colour scores 1.0 on text
    prompts; the text-blind one only where its one guess is the named shape; clicks at
    instance centres land inside their instance."""
    from samkit.eval.common import ErrorLog
    from samkit.eval.datasets import open_dataset
    from samkit.eval.text import run_text

    data = coco_scenes(tmp_path / "coco")
    dataset = open_dataset(data)
    [result] = run_text([dataset], [ColourPredictor(), ColourPredictor(blind=True)], ErrorLog(),
                        min_area=100)
    seeing, blind = result["methods"]["colours"], result["methods"]["blind"]
    assert result["images_evaluated"] == 3
    assert seeing["text_prompts"] == seeing["text_point_prompts"] == seeing["point_prompts"] == 9
    assert seeing["text_miou"] == seeing["text_point_miou"] == seeing["point_miou"] == 1.0
    assert blind["text_miou"] == pytest.approx(3 / 9)  # right for one shape of three per image
    assert blind["point_miou"] == 1.0
    assert set(seeing["text_miou_per_category"]) <= set(COLOURS)
    # Instances below min_area take no part: with a floor above every shape, nothing is asked.
    [none] = run_text([dataset], [ColourPredictor()], ErrorLog(), min_area=10**6)
    assert none["images_evaluated"] == 0 and none["methods"]["colours"]["text_prompts"] == 0
    with pytest.raises(SamkitError, match="exactly once"):
        run_text([dataset], [ColourPredictor()], ErrorLog(), template="a thing")


def test_eval_text_cli(clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                       capsys: pytest.CaptureFixture[str]) -> None:
    from samkit import registry

    monkeypatch.setitem(registry.MODEL_CONFIGS, "tiny-text", TINY)
    data = coco_scenes(tmp_path / "coco", count=2)
    slotted = save_checkpoint(tiny_sam(24), tmp_path / "text.safetensors")
    plain = save_checkpoint(tiny_sam(None), tmp_path / "plain.safetensors")
    common = ["eval", "text", "--data", str(data), "--model", "tiny-text", "--device", "cpu",
              "--min-area", "100", "--clip", str(clip_dir)]
    for argv, message in (
        ([*common, "--checkpoint", str(plain), "--json", str(tmp_path / "a.json")],
         "has no text slot"),
        ([*common, "--checkpoint", str(slotted), "--json", str(tmp_path / "b.json"),
          "--template", "a thing"], "--template must contain {} exactly once"),
        ([*common, "--checkpoint", str(slotted), "--json", str(tmp_path / "c.json"),
          "--min-area", "-1"], "--min-area must be >= 0"),
    ):
        assert samkit_main(argv) == 2
        err = capsys.readouterr().err
        assert err.strip().count("\n") == 0 and message in err, err
    out = tmp_path / "text.json"
    assert samkit_main([*common, "--checkpoint", str(slotted), "--json", str(out)]) == 0
    document = json.loads(out.read_text())
    [dataset] = document["datasets"]
    [metrics] = dataset["methods"].values()
    assert document["protocol"] == "text" and dataset["images_evaluated"] == 2
    assert metrics["text_prompts"] == metrics["point_prompts"] == 6
    assert {r["kind"] for r in metrics["per_prompt"]} == {"text", "text_point", "point"}
    assert all(0.0 <= r["iou"] <= 1.0 for r in metrics["per_prompt"])
    assert "| phrases | text mIoU |" in out.with_suffix(".md").read_text()
