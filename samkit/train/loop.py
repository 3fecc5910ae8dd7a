"""The training loop: ``train(cfg)``, readable top to bottom.

Single process: ``python -m samkit.train --config configs/samkit-tiny.yaml``.
Several: ``torchrun --nproc_per_node=N -m samkit.train --config ...`` (DDP; gloo on CPU,
nccl on CUDA; the process group is initialised from ``env://`` only when WORLD_SIZE > 1).
``batch_size`` is per process, so the global batch is ``N x batch_size``.

Rank 0 writes ``out_dir/``: ``config.yaml`` (the resolved config), ``metrics.csv``,
``checkpoint.pt`` (everything needed for an exact resume, written atomically) and, at the
end, ``model.safetensors`` (the weights, loadable with ``samkit.build_sam``).
"""

from __future__ import annotations

import csv
import math
import os
import random
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from samkit.build import (
    build_sam_from_config,
    load_into,
    load_state_dict,
    save_checkpoint,
)
from samkit.errors import SamkitError
from samkit.io import atomic_output
from samkit.modeling.hed import convert_keras_h5
from samkit.modeling.hed_encoder import HedEncoder, load_hed_context, load_hed_stem
from samkit.modeling.image_encoder import ImageEncoderViT
from samkit.modeling.sam import Sam
from samkit.modeling.tiny_vit import TinyViT
from samkit.train.config import TrainConfig
from samkit.train.data import (
    AugmentConfig,
    ResumableSampler,
    TrainDataset,
    collate,
    open_source,
    worker_init,
)
from samkit.train.features import FeatureCache, build_feature_cache
from samkit.train.init import localising_init
from samkit.train.losses import LossWeights
from samkit.train.optim import build_optimizer, build_scheduler, lr_factor
from samkit.train.step import METRICS, TrainStep
from samkit.train.text import attach_training_slot, open_text_cache

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.csv"
EXPORT_NAME = "model.safetensors"
METRIC_COLUMNS = ("step", "epoch", "loss", *METRICS, "lr", "images_per_s", "encoder_share",
                  "decoder_share", "elapsed_s", "empty_images")


def train(cfg: TrainConfig) -> list[dict[str, float]]:
    """Run (or resume) training; returns the metric rows rank 0 logged in this call."""
    if not cfg.data:
        raise SamkitError("no training data: set `data` in the config or pass --data")
    env = setup_distributed(cfg.device)
    out_dir = Path(cfg.out_dir)
    is_main = env.rank == 0
    try:
        # --- model, optimiser, schedule
        sam = build_model(cfg, env.device)
        if env.world_size > 1 and env.device.type == "cuda":
            sam = nn.SyncBatchNorm.convert_sync_batchnorm(sam)  # TinyViT's BN over all GPUs
        optimizer = build_optimizer(sam, cfg.lr, cfg.weight_decay, cfg.layer_decay, cfg.betas,
                                    cfg.init_new_modules, cfg.new_module_lr_scale)
        scheduler = build_scheduler(optimizer, cfg.warmup, cfg.iterations, cfg.decay_fractions)

        # --- data
        dataset = build_dataset(cfg, sam)
        sampler = ResumableSampler(dataset, env.world_size, env.rank, cfg.seed, cfg.batch_size)
        steps_per_epoch = sampler.num_samples // cfg.batch_size
        if steps_per_epoch == 0:
            raise SamkitError(f"{len(dataset)} images cannot fill one batch of "
                              f"{cfg.batch_size} on each of {env.world_size} processes")
        loader = DataLoader(
            dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
            collate_fn=partial(collate, image_size=sam.image_size),
            num_workers=cfg.num_workers, worker_init_fn=worker_init,
            pin_memory=env.device.type == "cuda",
            # Its own generator: creating a loader iterator must not consume the global RNG,
            # or a resumed run (which creates one mid-epoch) would drift from the original.
            generator=torch.Generator(),
        )

        # --- resume, or start fresh
        step, epoch, batches_done = 0, 0, 0
        checkpoint_path = out_dir / CHECKPOINT_NAME
        resumed = cfg.resume and checkpoint_path.is_file()
        if resumed:
            state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
            sam.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            # The run's lr is the config's, also when it was changed for the resume.
            scheduler.base_lrs = [cfg.lr * g["lr_scale"] for g in optimizer.param_groups]
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
                group["lr"] = base * lr_factor(state["step"], cfg.warmup, cfg.iterations,
                                               cfg.decay_fractions)
            step, epoch, batches_done = state["step"], state["epoch"], state["batches_done"]
        step_module = TrainStep(sam, cfg.finetune != "full", cfg.seed,
                                cfg.loss_resolution, cfg.prompt_iterations,
                                LossWeights(cfg.focal_weight, cfg.dice_weight,
                                            cfg.iou_weight, cfg.balanced_bce_weight),
                                cfg.box_multimask, cfg.text_share,
                                cfg.content_dropout).train()
        model: nn.Module = step_module
        if env.world_size > 1:
            # Some parameters sit out some steps (box-corner embeddings when every first
            # prompt on a rank is a point, the encoder in an all-empty batch).
            model = DistributedDataParallel(step_module, find_unused_parameters=True)
        if resumed:
            restore_rng(state["rng"], env, state["world_size"])
        else:
            seed_everything(cfg.seed + env.rank)  # drop path differs per rank

        log = None
        if is_main:
            log = MetricsLog(out_dir / METRICS_NAME, keep_until=step if resumed else 0)
            (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            print(f"samkit train: {'resuming at step ' + str(step) if resumed else 'starting'}"
                  f"; {len(dataset)} images, {steps_per_epoch} steps/epoch, "
                  f"{env.world_size} process(es) on {env.device}", flush=True)

        # --- the loop
        stop = cfg.stop_step
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.amp
                    and env.device.type == "cuda" else nullcontext())
        bar = tqdm(total=stop, initial=step, disable=not (is_main and cfg.progress),
                   desc="train", dynamic_ncols=True)
        rows: list[dict[str, float]] = []
        start_time = last_end = time.perf_counter()
        empty_images = 0  # since the last log row (on this process)
        nonfinite_run = 0  # consecutive steps with a NaN/inf loss or gradient
        while step < stop:
            sampler.set_position(epoch, batches_done)
            for batch in loader:
                # Images with no usable mask (none in the file, or all too small or too large)
                # add nothing to the loss; they are counted in the log.
                empty_images += sum(len(m) == 0 for m in batch.masks)
                batch = batch.to(env.device)
                with autocast:
                    out = model(batch, step)
                optimizer.zero_grad(set_to_none=True)
                step_module.backward(out.loss)
                # The norm of the (all-reduced) gradient: the same on every process, so all
                # skip a bad step together.
                grad_norm = nn.utils.clip_grad_norm_(
                    sam.parameters(), cfg.clip_grad if cfg.clip_grad > 0 else math.inf)
                lr = max(g["lr"] for g in optimizer.param_groups)  # this step's lr
                if torch.isfinite(grad_norm) and torch.isfinite(out.loss.detach()):
                    optimizer.step()
                    nonfinite_run = 0
                else:
                    nonfinite_run += 1
                    if is_main:
                        tqdm.write(f"samkit train: step {step + 1} skipped: non-finite loss "
                                   f"{out.loss.item():.4g} or gradient norm "
                                   f"{grad_norm.item():.4g}; the weights are unchanged",
                                   file=sys.stderr)
                    if nonfinite_run >= cfg.max_nonfinite_steps:
                        raise SamkitError(
                            f"{nonfinite_run} steps in a row had a non-finite loss or gradient "
                            f"(up to step {step + 1}): the run diverged; resume from the last "
                            f"checkpoint with a lower lr (--set lr=...), or check the data")
                with warnings.catch_warnings():  # the schedule counts skipped steps too
                    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
                    scheduler.step()
                step, batches_done = step + 1, batches_done + 1
                now = time.perf_counter()
                step_time, last_end = now - last_end, now

                if step % cfg.log_interval == 0 or step == stop:
                    values = reduce_metrics(out, env)
                    encoder_share, decoder_share = step_module.timer.shares(step_time)
                    row = {"step": step, "epoch": epoch, **values,
                           "lr": lr,
                           "images_per_s": cfg.batch_size * env.world_size / step_time,
                           "encoder_share": encoder_share, "decoder_share": decoder_share,
                           "elapsed_s": now - start_time, "empty_images": empty_images}
                    empty_images = 0
                    if log is not None:
                        log.write(row)
                        rows.append(row)
                    bar.set_postfix(loss=f"{values['loss']:.4f}", mIoU=f"{values['miou']:.3f}")
                if step % cfg.ckpt_interval == 0 or step == stop:
                    save_training_state(checkpoint_path, sam, optimizer, scheduler, cfg,
                                        step, epoch, batches_done, env)
                bar.update(1)
                if step >= stop:
                    break
            else:  # the epoch ran out
                epoch, batches_done = epoch + 1, 0
        bar.close()
        if is_main:
            save_checkpoint(sam, out_dir / EXPORT_NAME, half=cfg.export_fp16)
        return rows
    finally:
        if env.world_size > 1:
            dist.destroy_process_group()


# ------------------------------------------------------------------------------ distributed
@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    device: torch.device


def setup_distributed(device: str) -> DistEnv:
    """Read torchrun's environment; join the process group when there is more than one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise SamkitError("device=cuda but no CUDA device is available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://",
                                rank=rank, world_size=world_size)
    return DistEnv(rank, world_size, dev)


def reduce_metrics(out: Any, env: DistEnv) -> dict[str, float]:
    """Loss and metrics averaged over processes (metrics only over those that had masks)."""
    names = ("loss", *METRICS)
    values = torch.stack([out.loss.detach().float()] +
                         [out.metrics[k].float() for k in METRICS])
    valid = ~values.isnan()
    summed = torch.stack([torch.where(valid, values, 0.0), valid.float()])
    if env.world_size > 1:
        dist.all_reduce(summed)
    means = summed[0] / summed[1]
    return dict(zip(names, means.tolist(), strict=False))


# ------------------------------------------------------------------------------------- model
def build_model(cfg: TrainConfig, device: torch.device) -> Sam:
    """The SAM to train, in train mode, with the init weights and trainable parts set."""
    torch.manual_seed(cfg.seed)  # the same init on every rank (DDP also broadcasts rank 0's)
    sam = build_sam_from_config(cfg.model_config(), drop_path_rate=cfg.drop_path)
    attach_training_slot(cfg, sam)  # text prompts (App. D.5): before the init weights load
    if cfg.init_checkpoint:
        path = _resolve_init(cfg)
        state = load_state_dict(path)
        own = sam.state_dict()
        for key in own:
            if key not in state and key.startswith((*cfg.init_new_modules, "text_prompt.")):
                state[key] = own[key]
        load_into(sam, state, cfg.model, str(path))
    elif cfg.decoder_init == "localising":
        localising_init(sam.mask_decoder, cfg.decoder_init_gain)
    encoder = sam.image_encoder
    if isinstance(encoder, HedEncoder):  # the pretrained stem stays frozen
        if cfg.stem_weights and not cfg.init_checkpoint:
            load_hed_stem(encoder, convert_keras_h5(cfg.stem_weights))
        elif cfg.stem_weights and "image_encoder.context" in cfg.init_new_modules:
            load_hed_context(encoder, convert_keras_h5(cfg.stem_weights))  # grown: pretrained
        elif not cfg.init_checkpoint:
            warnings.warn("samkit-tiny's stem starts from random weights: set stem_weights "
                          "(scripts/get_hed_weights.sh) to train on HED's", stacklevel=2)
        encoder.freeze_stem()
        encoder.round_stem_to_int8()  # what the shipped file stores; the cache is keyed on it
    if isinstance(encoder, TinyViT):  # the ImageNet classifier is kept for loading only
        encoder.head.requires_grad_(False)
        encoder.norm_head.requires_grad_(False)
    if cfg.finetune == "text":  # App. D.5 as a fine-tune: only the text slot and decoder
        sam.prompt_encoder.requires_grad_(False)
    if cfg.finetune in ("frozen_encoder", "text"):
        encoder.requires_grad_(False)
    if cfg.grad_checkpointing:
        if not isinstance(encoder, ImageEncoderViT):
            raise SamkitError("grad_checkpointing is supported for ViT encoders only")
        encoder.grad_checkpointing = True
    return sam.to(device).train()


def build_dataset(cfg: TrainConfig, sam: Sam, cached: bool = True) -> TrainDataset:
    """The run's data; with ``cached`` and ``cfg.feature_cache`` it reads stem features
    from the cache (checked against the data and the model's stem)."""
    sources = [open_source(spec) for spec in cfg.data]
    aug = AugmentConfig(sam.image_size, cfg.scale_range, cfg.hflip, cfg.copy_paste,
                        cfg.max_masks_per_image, cfg.min_mask_area, cfg.max_mask_fraction)
    cache = None
    if cached and cfg.feature_cache:
        cache = FeatureCache(cfg.feature_cache)
        cache.check(sam, list(cfg.data), sum(len(s) for s in sources))
    dataset = TrainDataset(sources, aug, cfg.seed, cache)
    dataset.text_cache = open_text_cache(cfg, dataset)
    return dataset


def build_cache(cfg: TrainConfig) -> Path:
    """Compute ``cfg.feature_cache`` for the run's data and stem (resumes a partial one)."""
    if not cfg.feature_cache:
        raise SamkitError("set feature_cache to the folder to build")
    device = setup_distributed(cfg.device).device
    sam = build_model(cfg, device).eval()
    dataset = build_dataset(cfg, sam, cached=False)
    return build_feature_cache(dataset, sam, list(cfg.data), cfg.feature_cache,
                               progress=cfg.progress)


def _resolve_init(cfg: TrainConfig) -> Path:
    if cfg.init_checkpoint == "official":
        from samkit.weights import fetch

        return fetch(cfg.model)
    return Path(cfg.init_checkpoint).expanduser()


# -------------------------------------------------------------------------- checkpoint / rng
def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU + current CUDA device) RNG states, tensor-only so the
    checkpoint loads with ``weights_only=True``."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(states: list[dict[str, Any]], env: DistEnv, saved_world_size: int) -> None:
    if saved_world_size != env.world_size:
        warnings.warn(f"checkpoint was written by {saved_world_size} process(es), resuming "
                      f"with {env.world_size}: RNG streams are re-seeded, the data order "
                      "continues but the run is no longer bit-exact", stacklevel=2)
        seed_everything(int(states[0]["torch"].sum()) + env.rank)
        return
    state = states[env.rank]
    random.setstate(_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and env.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"])


def _tuples(value: Any) -> Any:
    """``random.setstate`` needs tuples where a checkpoint round trip may give lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_training_state(path: Path, sam: Sam, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler, cfg: TrainConfig,
                        step: int, epoch: int, batches_done: int, env: DistEnv) -> None:
    """Everything for an exact resume, written by rank 0 to a temp file then renamed, so
    ``path`` always holds a complete checkpoint even if the process is killed mid-write."""
    states = [rng_state()]
    if env.world_size > 1:
        gathered: list[Any] = [None] * env.world_size
        dist.all_gather_object(gathered, states[0])
        states = gathered
    if env.rank != 0:
        return
    state = {
        "model": sam.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step, "epoch": epoch, "batches_done": batches_done,
        "rng": states, "world_size": env.world_size, "config": cfg.to_dict(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, fsync=True) as tmp:
        torch.save(state, tmp)


# ----------------------------------------------------------------------------------- metrics
class MetricsLog:
    """``metrics.csv``: one row per logged step. On resume, rows past the checkpoint (logged
    after it, before the interruption) are dropped, since they are about to be redone."""

    def __init__(self, path: Path, keep_until: int) -> None:
        self.path = path
        rows = []
        if keep_until > 0 and path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= keep_until]
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict[str, float]) -> None:
        with open(self.path, "a", newline="") as f:
            # repr keeps every bit, so runs can be compared exactly from their logs.
            csv.DictWriter(f, METRIC_COLUMNS).writerow(
                {k: repr(v) if isinstance(v, float) and math.isfinite(v) else v
                 for k, v in row.items()}
            )


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """Rows of a ``metrics.csv`` as floats (NaN where a row has no value)."""
    with open(path, newline="") as f:
        return [{k: float(v) if v else math.nan for k, v in r.items()}
                for r in csv.DictReader(f)]
