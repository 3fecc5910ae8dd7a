"""Optimiser param groups (layer-wise lr decay, no-weight-decay set), the lr schedule, and
the config file / ``--set`` handling."""

from __future__ import annotations

from pathlib import Path

import pytest

from samkit.build import build_sam_from_config
from samkit.errors import SamkitError
from samkit.registry import SamConfig, TinyViTConfig, ViTConfig
from samkit.train.config import TrainConfig, load_config
from samkit.train.optim import lr_factor, no_weight_decay, param_groups

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL_DECODER = {"prompt_embed_dim": 32, "decoder_num_heads": 2, "decoder_mlp_dim": 32}


def vit_sam():
    cfg = SamConfig(ViTConfig(32, 3, 2, (2,), window_size=4), image_size=64, **SMALL_DECODER)
    return build_sam_from_config(cfg)


def tiny_vit_sam():
    enc = TinyViTConfig(embed_dims=(16, 32, 48, 320), depths=(2, 1, 1, 1), num_heads=(1, 2, 3, 4),
                        window_sizes=(2, 2, 4, 2))
    return build_sam_from_config(SamConfig(enc, image_size=128, **SMALL_DECODER))


def scales(model, decay: float = 0.5) -> dict[str, float]:
    return {name: g["lr_scale"] for g in param_groups(model, 1.0, 0.1, decay)
            for name in g["names"]}


def test_vit_layer_decay() -> None:
    s = scales(vit_sam())  # depth L = 3, decay 0.5
    assert s["image_encoder.patch_embed.proj.weight"] == 0.5**4  # decay^(L+1)
    assert s["image_encoder.pos_embed"] == 0.5**4
    for i in range(3):  # block i: decay^(L - i)
        assert s[f"image_encoder.blocks.{i}.attn.qkv.weight"] == 0.5 ** (3 - i)
        assert s[f"image_encoder.blocks.{i}.norm1.bias"] == 0.5 ** (3 - i)
    assert s["image_encoder.neck.0.weight"] == 1.0
    assert s["mask_decoder.iou_token.weight"] == 1.0
    assert s["prompt_encoder.point_embeddings.0.weight"] == 1.0


def test_tiny_vit_layer_decay_numbers_blocks_across_stages() -> None:
    s = scales(tiny_vit_sam())  # blocks in forward order: 2 + 1 + 1 + 1, L = 5
    enc = "image_encoder."
    assert s[enc + "patch_embed.seq.0.c.weight"] == 0.5**6
    assert s[enc + "layers.0.blocks.0.conv1.c.weight"] == 0.5**5  # block 0
    assert s[enc + "layers.0.blocks.1.conv1.c.weight"] == 0.5**4  # block 1
    assert s[enc + "layers.0.downsample.conv1.c.weight"] == 0.5**4  # with the stage's last
    assert s[enc + "layers.1.blocks.0.attn.qkv.weight"] == 0.5**3  # block 2
    assert s[enc + "layers.3.blocks.0.mlp.fc1.weight"] == 0.5**1  # block 4, the last
    assert s[enc + "neck.0.weight"] == 1.0


def test_no_weight_decay_set() -> None:
    model = vit_sam()
    exempt = no_weight_decay(model)
    for name in ("image_encoder.pos_embed", "image_encoder.blocks.0.attn.rel_pos_h",
                 "image_encoder.blocks.0.norm1.weight", "image_encoder.blocks.0.attn.qkv.bias",
                 "mask_decoder.iou_token.weight", "mask_decoder.mask_tokens.weight",
                 "prompt_encoder.no_mask_embed.weight", "prompt_encoder.not_a_point_embed.weight",
                 "prompt_encoder.point_embeddings.2.weight", "image_encoder.neck.1.weight"):
        assert name in exempt, name
    for name in ("image_encoder.blocks.0.attn.qkv.weight", "image_encoder.patch_embed.proj.weight",
                 "mask_decoder.output_upscaling.0.weight", "image_encoder.neck.2.weight"):
        assert name not in exempt, name
    tiny_exempt = no_weight_decay(tiny_vit_sam())
    assert "image_encoder.layers.1.blocks.0.attn.attention_biases" in tiny_exempt
    for group in param_groups(model, 1e-3, 0.1, 0.8):
        wd_expected = 0.0 if group["names"][0] in exempt else 0.1
        assert group["weight_decay"] == wd_expected
        assert all((n in exempt) == (wd_expected == 0.0) for n in group["names"])
        assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"])


def test_new_modules_get_their_own_lr_scale() -> None:
    """A grown model's new parts (init_new_modules) learn at new_module_scale times the rate
    of the trained parts, layer decay still applied on top."""
    model = vit_sam()
    new = ("mask_decoder.iou_prediction_head", "image_encoder.blocks.1")
    groups = param_groups(model, 1e-3, 0.1, 0.5, new_modules=new, new_module_scale=3.0)
    plain = scales(model)
    for group in groups:
        for name in group["names"]:
            expected = plain[name] * (3.0 if name.startswith(new) else 1.0)
            assert group["lr_scale"] == pytest.approx(expected), name
            assert group["lr"] == pytest.approx(1e-3 * expected)
    assert any(n.startswith(new[0]) for g in groups for n in g["names"] if g["lr_scale"] == 3.0)


def test_frozen_parameters_are_left_out() -> None:
    model = vit_sam()
    model.image_encoder.requires_grad_(False)
    names = {n for g in param_groups(model, 1.0, 0.1, 0.8) for n in g["names"]}
    assert names and not any(n.startswith("image_encoder.") for n in names)


def test_lr_schedule_warmup_and_step_decay() -> None:
    kw = {"warmup": 250, "iterations": 90_000,
          "decay_fractions": (60_000 / 90_000, 86_666 / 90_000)}
    assert lr_factor(0, **kw) == pytest.approx(1 / 250)
    assert lr_factor(124, **kw) == pytest.approx(0.5)
    assert lr_factor(249, **kw) == 1.0 and lr_factor(59_999, **kw) == 1.0
    assert lr_factor(60_000, **kw) == pytest.approx(0.1)
    assert lr_factor(86_665, **kw) == pytest.approx(0.1)
    assert lr_factor(86_666, **kw) == pytest.approx(0.01)


def test_config_yaml_and_set_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model: vit_b\nlr: 1\ndata: [a, b]\nmodel_overrides: {image_size: 512}\n")
    cfg = load_config(path, ["lr=2e-4", "scale_range=[0.5, 1]", "amp=false",
                             "model_overrides.encoder.depth=2", "data=only"])
    assert cfg.lr == 2e-4 and isinstance(cfg.lr, float)
    assert cfg.scale_range == (0.5, 1.0) and cfg.amp is False and cfg.data == ["only"]
    model = cfg.model_config()
    assert model.image_size == 512 and model.encoder.depth == 2
    assert load_config(path).lr == 1.0  # YAML int -> float field
    with pytest.raises(SamkitError, match="unknown config key"):
        load_config(path, ["learning_rate=1"])
    with pytest.raises(SamkitError, match="expects"):
        load_config(path, ["batch_size=two"])
    with pytest.raises(SamkitError, match="finetune"):
        TrainConfig(finetune="lora")
    with pytest.raises(SamkitError, match="model_overrides"):
        load_config(path, ["model_overrides.encoder.width=3"]).model_config()
    for bad in ("depth=two", "depth=true", "window_size=1.5"):  # the field's own type
        with pytest.raises(SamkitError, match="bad model_overrides: .* is not of the type"):
            load_config(path, [f"model_overrides.encoder.{bad}"]).model_config()
    tiny = TrainConfig(model="vit_t", model_overrides={"encoder": {"mlp_ratio": 3}})
    assert tiny.model_config().encoder.mlp_ratio == 3.0  # YAML's 3 for a float field


@pytest.mark.parametrize("name", ["samkit-tiny", "vit_b", "vit_l", "vit_h"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.model == name and len(cfg.data) == (11 if name == "samkit-tiny" else 3)
    assert cfg.model_config().image_size == (512 if name == "samkit-tiny" else 1024)
    if name != "samkit-tiny":
        assert cfg.init_checkpoint == "official"


def test_localising_init_ties_and_scales_the_cross_attention_projections() -> None:
    import torch

    from samkit.build import build_sam_from_config
    from samkit.registry import get_config
    from samkit.train.init import cross_attentions, localising_init

    torch.manual_seed(0)
    decoder = build_sam_from_config(get_config("samkit-tiny")).mask_decoder
    before = [a.q_proj.weight.clone() for a in cross_attentions(decoder)]
    self_attn = decoder.transformer.layers[0].self_attn.k_proj.weight.clone()
    localising_init(decoder, gain=2.0)
    attentions = cross_attentions(decoder)
    assert len(attentions) == 5  # 2 layers x 2 directions + the final token-to-image
    for attn, q in zip(attentions, before, strict=True):
        assert torch.equal(attn.q_proj.weight, 2.0 * q)
        assert torch.equal(attn.k_proj.weight, attn.q_proj.weight)
        assert not attn.q_proj.bias.any() and not attn.k_proj.bias.any()
    assert torch.equal(decoder.transformer.layers[0].self_attn.k_proj.weight, self_attn)


def test_config_rejects_bad_schedules_and_inits() -> None:
    with pytest.raises(SamkitError, match="prompt_iterations"):
        TrainConfig(prompt_iterations=[[5, 1]])
    with pytest.raises(SamkitError, match="prompt_iterations"):
        TrainConfig(prompt_iterations=[[0, 0]])
    with pytest.raises(SamkitError, match="decoder_init"):
        TrainConfig(decoder_init="xavier")
    with pytest.raises(SamkitError, match="balanced_bce_weight must be >= 0"):
        TrainConfig(balanced_bce_weight=-0.5)
