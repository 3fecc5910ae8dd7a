"""End-to-end training with tiny models on synthetic shapes: overfitting, exact resume
(in-process and after ``kill -9``), torchrun/DDP equivalence, the CLI, export."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from samkit.build import build_sam_from_config, load_state_dict
from samkit.cli import main as samkit_main
from samkit.errors import SamkitError
from samkit.registry import get_config
from samkit.train.config import TrainConfig, load_config
from samkit.train.data import AugmentConfig, TrainDataset, collate, open_source
from samkit.train.loop import read_metrics, train
from samkit.train.step import TrainStep

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
SIZE = 128
TINY_DECODER = {"image_size": SIZE, "prompt_embed_dim": 64, "decoder_num_heads": 2,
                "decoder_mlp_dim": 128}
# TinyViT needs its last width in (320, 448, 576) for the stride-16 embedding grid.
TINY_VIT = {"model": "vit_t", "model_overrides": TINY_DECODER | {"encoder": {
    "embed_dims": [16, 32, 48, 320], "depths": [1, 1, 1, 1], "num_heads": [1, 2, 3, 4],
    "window_sizes": [2, 2, 4, 2]}}}
# LayerNorm only (TinyViT's BatchNorm would see per-process batches under DDP).
TINY_PLAIN_VIT = {"model": "vit_b", "model_overrides": TINY_DECODER | {"encoder": {
    "embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": [1], "window_size": 4}}}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 images (96 x 128, so the input has padding) with one coloured shape each."""
    root = tmp_path_factory.mktemp("shapes")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    h, w = 96, 128
    yy, xx = np.mgrid[:h, :w]
    for i in range(4):
        image = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
        if i % 2 == 0:
            cy, cx = rng.integers(28, h - 28), rng.integers(28, w - 28)
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < 25**2
        else:
            y0, x0 = rng.integers(0, h - 32), rng.integers(0, w - 64)
            mask = (yy >= y0) & (yy < y0 + 32) & (xx >= x0) & (xx < x0 + 64)
        image[mask] = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 210, 40)][i]
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"{i}.png")
    return root


def run_config(data: Path, out: Path, **fields) -> TrainConfig:
    values = TINY_VIT | {
        "data": [str(data)], "out_dir": str(out), "batch_size": 2, "iterations": 8,
        "lr": 2e-3, "warmup": 2, "layer_decay": 0.8, "drop_path": 0.1, "num_workers": 0,
        "log_interval": 1, "ckpt_interval": 100, "progress": False, "max_mask_fraction": 0.95,
    }
    return TrainConfig(**(values | fields))


def write_yaml(cfg: TrainConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def subprocess_env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.mark.parametrize("loss_resolution", ["input", "low"])
def test_tiny_model_overfits_four_images(shapes: Path, tmp_path: Path,
                                         loss_resolution: str) -> None:
    cfg = run_config(shapes, tmp_path, batch_size=4, iterations=60, lr=4e-3, warmup=5,
                     decay_fractions=(0.8,), layer_decay=1.0, drop_path=0.0,
                     scale_range=(1.0, 1.0), hflip=False, log_interval=1,
                     loss_resolution=loss_resolution)
    rows = train(cfg)
    sam = build_sam_from_config(cfg.model_config())
    sam.load_state_dict(load_state_dict(tmp_path / "model.safetensors"))
    dataset = TrainDataset([open_source(str(shapes))], AugmentConfig(SIZE, (1.0, 1.0), hflip=False),
                           seed=99)
    step = TrainStep(sam, frozen_encoder=False, seed=99).eval()
    with torch.no_grad():  # fresh prompts, not the ones trained on
        outs = [step(collate([dataset[(e, i)] for i in range(4)], SIZE), e) for e in range(2)]
    final_loss = np.mean([o.loss.item() for o in outs])
    assert final_loss <= 0.2 * rows[0]["loss"], (rows[0]["loss"], final_loss)
    assert np.mean([o.metrics["miou"].item() for o in outs]) >= 0.9
    assert np.mean([o.metrics["miou_first"].item() for o in outs]) >= 0.8
    assert set(rows[-1]) >= {"loss", "focal", "dice", "iou_mse", "miou", "lr", "images_per_s",
                             "encoder_share", "decoder_share"}
    assert 0 < rows[-1]["encoder_share"] + rows[-1]["decoder_share"] <= 1


@pytest.fixture(scope="module")
def reference_run(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 uninterrupted steps: jitter, flips, copy-paste and drop path all consume randomness."""
    out = tmp_path_factory.mktemp("reference")
    torch.set_num_threads(1)
    train(run_config(shapes, out, copy_paste=True))
    return out


def assert_same_run(a: Path, b: Path) -> None:
    rows_a, rows_b = read_metrics(a / "metrics.csv"), read_metrics(b / "metrics.csv")
    assert [r["step"] for r in rows_b] == list(range(1, 9))
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for key in ("loss", "focal", "dice", "iou_mse", "miou", "lr"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
    wa, wb = load_state_dict(a / "model.safetensors"), load_state_dict(b / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_is_exact(shapes: Path, tmp_path: Path, reference_run: Path) -> None:
    train(run_config(shapes, tmp_path, copy_paste=True, max_steps=3))  # stops mid-epoch 1
    assert len(read_metrics(tmp_path / "metrics.csv")) == 3
    train(run_config(shapes, tmp_path, copy_paste=True, resume=True))
    assert_same_run(reference_run, tmp_path)


def test_resume_after_kill_9(shapes: Path, tmp_path: Path, reference_run: Path) -> None:
    config = write_yaml(run_config(shapes, tmp_path, copy_paste=True, ckpt_interval=2,
                                   num_workers=1), tmp_path / "run.yaml")
    command = [sys.executable, "-m", "samkit.train", "--config", str(config)]
    proc = subprocess.Popen(command, env=subprocess_env(), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = tmp_path / "checkpoint.pt"
    deadline = time.monotonic() + 60
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (tmp_path / "model.safetensors").exists()  # it really died mid-run
    done = subprocess.run(command + ["--resume"], env=subprocess_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming at step" in done.stdout
    assert_same_run(reference_run, tmp_path)


def test_torchrun_two_processes_match_one(shapes: Path, tmp_path: Path) -> None:
    """2 processes x batch 1 (gloo) == 1 process x batch 2: same data, prompts, gradients."""
    fields = TINY_PLAIN_VIT | {"iterations": 4, "drop_path": 0.0}
    single = run_config(shapes, tmp_path / "single", **fields)
    train(single)
    config = write_yaml(run_config(shapes, tmp_path / "ddp", batch_size=1, **fields),
                        tmp_path / "ddp.yaml")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "samkit.train", "--config", str(config)],
        env=subprocess_env(), capture_output=True, text=True, timeout=180, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows_1 = read_metrics(tmp_path / "single" / "metrics.csv")
    rows_2 = read_metrics(tmp_path / "ddp" / "metrics.csv")
    assert len(rows_1) == len(rows_2) == 4
    for r1, r2 in zip(rows_1, rows_2, strict=False):
        for key in ("loss", "focal", "dice", "iou_mse", "miou"):
            assert r1[key] == pytest.approx(r2[key], rel=1e-4, abs=1e-6), (r1["step"], key)
    assert rows_1[-1]["loss"] != rows_1[0]["loss"]  # it did train


def test_cli_set_and_data_overrides(shapes: Path, tmp_path: Path) -> None:
    cfg_path = write_yaml(run_config(tmp_path / "nowhere", tmp_path / "ignored"),
                          tmp_path / "cli.yaml")
    out = tmp_path / "out"
    code = samkit_main(["train", "--config", str(cfg_path), "--data", str(shapes),
                        "--out-dir", str(out), "--max-steps", "1", "--set", "export_fp16=true",
                        "--set", "finetune=frozen_encoder", "--set", "layer_decay=1"])
    assert code == 0
    weights = load_state_dict(out / "model.safetensors")
    assert weights["mask_decoder.iou_token.weight"].dtype == torch.float16
    saved = load_config(out / "config.yaml")
    assert saved.data == [str(shapes)] and saved.max_steps == 1
    assert samkit_main(["train", "--config", str(cfg_path), "--set", "batch_size=0"]) == 2


def test_low_res_loss_tracks_input_frame_loss(shapes: Path, tmp_path: Path) -> None:
    """``loss_resolution="low"`` scores the same predictions against area-downsampled
    targets: close to the input-frame loss, with gradients, and no finer than the logits."""
    cfg = run_config(shapes, tmp_path, batch_size=2, scale_range=(1.0, 1.0), hflip=False)
    sam = build_sam_from_config(cfg.model_config())
    dataset = TrainDataset([open_source(str(shapes))], AugmentConfig(SIZE, (1.0, 1.0), hflip=False),
                           seed=3)
    batch = collate([dataset[(0, i)] for i in range(2)], SIZE)
    outs = {}
    for resolution in ("input", "low"):
        torch.manual_seed(0)
        step = TrainStep(sam, frozen_encoder=False, seed=5, loss_resolution=resolution).train()
        outs[resolution] = step(batch, 0)
    low, full = outs["low"].loss, outs["input"].loss
    assert low.requires_grad and torch.isfinite(low)
    assert abs(low.item() - full.item()) <= 0.15 * full.item(), (low.item(), full.item())
    (grad,) = torch.autograd.grad(low, sam.mask_decoder.iou_token.weight)
    assert grad.abs().sum() > 0


def test_loss_resolution_is_validated() -> None:
    with pytest.raises(SamkitError, match="loss_resolution"):
        TrainConfig(loss_resolution="full")


HED_TINY = {"model": "samkit-tiny", "model_overrides": TINY_DECODER}


@pytest.mark.parametrize("encoder", [{}, {"detail_block": True, "context_block": True},
                                     {"train_block4": True}],
                         ids=["plain", "detail+context", "train_block4"])
def test_cached_feature_step_equals_uncached(shapes: Path, tmp_path: Path,
                                             encoder: dict) -> None:
    """A step on cached stem features gives the loss and gradients of the same step on the
    pixels (the cache is the stem's exact output, fp32 here; fp16 is the default); with the
    detail branch the cache holds block 2 too."""
    from samkit.train.features import FeatureCache, build_feature_cache

    torch.manual_seed(0)
    cfg = run_config(shapes, tmp_path, model="samkit-tiny",
                     model_overrides=TINY_DECODER | {"encoder": encoder},
                     scale_range=(1.0, 1.0), hflip=False,
                     loss_resolution="low", prompt_iterations=[[0, 3]])
    sam = build_sam_from_config(cfg.model_config())
    sam.image_encoder.freeze_stem()
    aug = AugmentConfig(SIZE, (1.0, 1.0), hflip=False)
    plain = TrainDataset([open_source(str(shapes))], aug, seed=0)
    build_feature_cache(plain, sam, [str(shapes)], tmp_path / "cache", dtype=torch.float32,
                        progress=False)
    cache = FeatureCache(tmp_path / "cache")
    cache.check(sam, [str(shapes)], len(plain))
    assert cache.manifest["features"] == list(sam.image_encoder.stem_outputs)
    for proj in (sam.image_encoder.neck.proj2, sam.image_encoder.neck.proj5):
        if proj is not None:  # a new branch starts at zero: give it an effect to compare
            torch.nn.init.normal_(proj.weight, std=0.05)
    cached = TrainDataset([open_source(str(shapes))], aug, seed=0, feature_cache=cache)

    step = TrainStep(sam, frozen_encoder=False, seed=0, loss_resolution="low",
                     prompt_iterations=[[0, 3]]).train()
    results = []
    for dataset in (plain, cached):
        batch = collate([dataset[(0, i)] for i in range(4)], SIZE)
        assert (batch.features is None) == (dataset is plain)
        sam.zero_grad()
        out = step(batch, 0)
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in sam.parameters()
                                             if p.requires_grad]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_step_pads_images_as_inference_does(shapes: Path, tmp_path: Path) -> None:
    """The step's batched normalise-and-zero of collated images is bit for bit inference's
    per-image normalise-then-pad (``Sam.preprocess``)."""
    cfg = run_config(shapes, tmp_path, scale_range=(0.5, 1.0))
    sam = build_sam_from_config(cfg.model_config()).eval()
    dataset = TrainDataset([open_source(str(shapes))], AugmentConfig(SIZE, (0.5, 1.0)), seed=0)
    batch = collate([dataset[(0, i)] for i in range(4)], SIZE)
    assert len({tuple(s) for s in batch.sizes.tolist()}) > 1  # images of different sizes
    step = TrainStep(sam, frozen_encoder=True, seed=0)
    expected = torch.stack([sam.preprocess(img[:, :h, :w].float())
                            for img, (h, w) in zip(batch.images, batch.sizes.tolist())])
    with torch.no_grad():
        assert torch.equal(step.embed(batch), sam.image_encoder(expected))


def test_feature_cache_refuses_a_mismatch(shapes: Path, tmp_path: Path) -> None:
    from samkit.train.features import FeatureCache, build_feature_cache

    cfg = run_config(shapes, tmp_path, **HED_TINY, scale_range=(1.0, 1.0), hflip=False)
    sam = build_sam_from_config(cfg.model_config())
    aug = AugmentConfig(SIZE, (1.0, 1.0), hflip=False)
    dataset = TrainDataset([open_source(str(shapes))], aug, seed=0)
    build_feature_cache(dataset, sam, [str(shapes)], tmp_path / "cache", progress=False)
    cache = FeatureCache(tmp_path / "cache")
    with pytest.raises(SamkitError, match="does not match this run"):
        cache.check(sam, ["other"], len(dataset))
    other = build_sam_from_config(cfg.model_config())  # another random stem
    with pytest.raises(SamkitError, match="stem"):
        cache.check(other, [str(shapes)], len(dataset))
    detail = run_config(shapes, tmp_path, model="samkit-tiny", model_overrides=TINY_DECODER
                        | {"encoder": {"detail_block": True}}, scale_range=(1.0, 1.0),
                        hflip=False)
    needs_block2 = build_sam_from_config(detail.model_config())
    needs_block2.image_encoder.features.load_state_dict(sam.image_encoder.features.state_dict())
    with pytest.raises(SamkitError, match="differs in: features"):
        cache.check(needs_block2, [str(shapes)], len(dataset))
    with pytest.raises(SamkitError, match="hflip"):
        TrainDataset([open_source(str(shapes))], AugmentConfig(SIZE), seed=0,
                     feature_cache=cache)
    with pytest.raises(SamkitError, match="not a feature cache"):
        FeatureCache(tmp_path)


def test_resume_with_a_new_lr_uses_it(shapes: Path, tmp_path: Path) -> None:
    """A config changed for the resume (here the lr) takes effect from the resumed step."""
    cfg = run_config(shapes, tmp_path, iterations=6, warmup=1, lr=1e-3, max_steps=3,
                     decay_fractions=(),
                     log_interval=1, layer_decay=1.0)
    train(cfg)
    rows = train(dataclasses.replace(cfg, lr=2e-4, max_steps=None, resume=True))
    assert [r["step"] for r in rows] == [4, 5, 6]
    assert all(r["lr"] == pytest.approx(2e-4) for r in rows)


class NanStep(TrainStep):
    """A TrainStep whose loss is NaN at the steps in ``NAN_STEPS`` (0-based)."""

    NAN_STEPS: set[int] = set()

    def forward(self, batch, step: int):
        out = super().forward(batch, step)
        if step in self.NAN_STEPS:
            out = dataclasses.replace(out, loss=out.loss * float("nan"))
        return out


def test_non_finite_steps_leave_the_weights_and_too_many_stop_the_run(
        shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import samkit.train.loop as loop

    monkeypatch.setattr(loop, "TrainStep", NanStep)
    monkeypatch.setattr(NanStep, "NAN_STEPS", {0, 1, 2})
    cfg = run_config(shapes, tmp_path / "skipped", iterations=3)
    train(cfg)
    assert capsys.readouterr().err.count("skipped: non-finite loss") == 3
    # No step was applied: every parameter is as initialised (BatchNorm statistics, buffers,
    # do move in the forward passes).
    initial = dict(loop.build_model(cfg, torch.device("cpu")).named_parameters())
    trained = load_state_dict(tmp_path / "skipped" / "model.safetensors")
    assert all(torch.equal(p.detach(), trained[k]) for k, p in initial.items())

    monkeypatch.setattr(NanStep, "NAN_STEPS", {1, 2, 3, 4})
    with pytest.raises(SamkitError, match="3 steps in a row had a non-finite loss") as err:
        train(run_config(shapes, tmp_path / "diverged", iterations=8, max_nonfinite_steps=3))
    assert "\n" not in str(err.value)
    assert (tmp_path / "diverged" / "metrics.csv").is_file()  # the good step was logged


def test_a_grown_model_starts_as_its_checkpoint(tmp_path) -> None:
    """init_new_modules: neck blocks added to a trained samkit-tiny start as the identity, so
    the grown model's embedding is the checkpoint's; without it the load says what is missing."""
    from samkit.build import save_checkpoint
    from samkit.errors import SamkitError
    from samkit.train.loop import build_model

    torch.manual_seed(0)
    trained = build_sam_from_config(get_config("samkit-tiny"))
    with torch.no_grad():
        trained.image_encoder.round_stem_to_int8()  # as every trained samkit-tiny's stem is
    trained.image_encoder.neck.conv.weight.data.normal_(std=0.05)  # not an initialisation
    path = save_checkpoint(trained, tmp_path / "trained.safetensors")
    base = dict(model="samkit-tiny", init_checkpoint=str(path), out_dir=str(tmp_path / "run"),
                model_overrides={"encoder": {"neck_blocks": 2}})
    grown = build_model(TrainConfig(**base, init_new_modules=["image_encoder.neck.blocks"]),
                        torch.device("cpu")).eval()
    assert len(grown.image_encoder.neck.blocks) == 2
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        assert torch.equal(grown.image_encoder(x), trained.eval().image_encoder(x))
    with pytest.raises(SamkitError, match=r"missing: \d+ \(e.g. image_encoder.neck.blocks"):
        build_model(TrainConfig(**base), torch.device("cpu"))


def test_content_dropout_decodes_on_the_spatial_mean(shapes: Path) -> None:
    """With content_dropout 1 every mask is decoded on its image's spatial mean embedding:
    shuffling the embedding's positions leaves the loss unchanged; at 0 it does not."""
    cfg = run_config(shapes, Path("unused"), scale_range=(1.0, 1.0), hflip=False)
    torch.manual_seed(0)
    sam = build_sam_from_config(cfg.model_config())
    dataset = TrainDataset([open_source(str(shapes))], AugmentConfig(SIZE, (1.0, 1.0),
                                                                     hflip=False), seed=3)
    batch = collate([dataset[(0, i)] for i in range(2)], SIZE)

    def loss(dropout: float, shuffle: bool) -> float:
        step = TrainStep(sam, frozen_encoder=True, seed=5, prompt_iterations=((0, 3),),
                         content_dropout=dropout).eval()
        embed = step.embed

        def shuffled(b):
            e = embed(b)
            order = torch.randperm(e.shape[-2] * e.shape[-1],
                                   generator=torch.Generator().manual_seed(1))
            return e.flatten(2)[..., order].view_as(e) if shuffle else e

        step.embed = shuffled
        with torch.no_grad():
            return step(batch, 0).loss.item()

    assert math.isclose(loss(1.0, False), loss(1.0, True), rel_tol=1e-6)
    assert not math.isclose(loss(0.0, False), loss(0.0, True), rel_tol=1e-4)
    with pytest.raises(SamkitError, match="content_dropout must be in"):
        TrainConfig(content_dropout=1.5)
