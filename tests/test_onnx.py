"""ONNX export (``samkit export-onnx``) and :class:`OnnxSamPredictor` against the PyTorch
predictor with the same (random) weights.

The graphs are exported once per module: samkit-tiny (TinyViT at 512 px) through the CLI, int8
included, and a two-block ViT at 256 px through the Python API, so the ViT encoder and a
second image size are covered too. Skipped when the ``onnx`` extra is not installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from samkit import SamkitError, SamPredictor, build_sam, cli
from samkit.build import build_sam_from_config, save_checkpoint
from samkit.images import preprocess_shape
from samkit.modeling.sam import Sam
from samkit.onnx.export import export_onnx
from samkit.onnx.predictor import OnnxSamPredictor
from samkit.registry import SamConfig, ViTConfig, get_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-3
SMALL_VIT = SamConfig(ViTConfig(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,)),
                      image_size=256)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Sam, Path]:
    """A random samkit-tiny and its export by ``samkit export-onnx --quantize int8``."""
    folder = tmp_path_factory.mktemp("onnx-tiny")
    torch.manual_seed(0)
    checkpoint = save_checkpoint(build_sam_from_config(get_config("samkit-tiny")),
                                 folder / "random.safetensors")
    out = folder / "export"
    argv = ["export-onnx", "--model", "samkit-tiny", "--checkpoint", str(checkpoint),
            "-o", str(out), "--quantize", "int8"]
    assert cli.main(argv) == 0
    return build_sam("samkit-tiny", checkpoint), out


@pytest.fixture(scope="module")
def small_vit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Sam, Path]:
    torch.manual_seed(1)
    sam = build_sam(SMALL_VIT)
    out = tmp_path_factory.mktemp("onnx-vit")
    export_onnx(sam, out, model_name="small-vit")
    return sam, out


def onnx_predictor(out: Path, int8: bool = False, shared: bool = False) -> OnnxSamPredictor:
    """The encoder and decoder graphs, plus the shared-image decoder pair with ``shared``."""
    if shared:
        return OnnxSamPredictor.from_folder(out, int8=int8)
    suffix = ".int8.onnx" if int8 else ".onnx"
    return OnnxSamPredictor(out / f"encoder{suffix}", out / f"decoder{suffix}")


def prompts(h: int, w: int, mask_side: int) -> dict[str, dict[str, np.ndarray]]:
    """Every prompt kind, in original-image pixels."""
    box = np.array([0.1 * w, 0.2 * h, 0.7 * w, 0.9 * h])
    logits = np.random.default_rng(h * w).normal(0, 4, (1, mask_side, mask_side))
    return {
        "point": {"point_coords": np.array([[0.3 * w, 0.6 * h]]), "point_labels": np.array([1])},
        "box": {"box": box},
        "points+box": {"point_coords": np.array([[0.3 * w, 0.6 * h], [0.5 * w, 0.4 * h]]),
                       "point_labels": np.array([1, 0]), "box": box},
        "mask": {"mask_input": logits.astype(np.float32)},
        "point+mask": {"point_coords": np.array([[0.5 * w, 0.5 * h]]),
                       "point_labels": np.array([1]), "mask_input": logits.astype(np.float32)},
    }


def assert_same_outputs(
    torch_out: tuple[np.ndarray, ...], onnx_out: tuple[np.ndarray, ...]
) -> None:
    (t_masks, t_scores, t_low), (o_masks, o_scores, o_low) = torch_out, onnx_out
    assert o_masks.shape == t_masks.shape and o_low.shape == t_low.shape
    assert np.abs(o_low - t_low).max() <= TOL
    assert np.abs(o_scores - t_scores).max() <= TOL
    assert np.abs(o_masks - t_masks).max() <= TOL
    # Thresholded masks agree wherever the logit is not within float noise of the threshold.
    assert np.all(((o_masks > 0) == (t_masks > 0)) | (np.abs(t_masks) <= TOL))


@pytest.mark.parametrize("shared", [False, True], ids=["decoder", "shared-image"])
@pytest.mark.parametrize("size", [(480, 640), (700, 300), (400, 400)])
def test_onnx_matches_pytorch(tiny: tuple[Sam, Path], size: tuple[int, int],
                              shared: bool) -> None:
    sam, out = tiny
    image = np.random.default_rng(size[0]).integers(0, 256, (*size, 3), dtype=np.uint8)
    reference, predictor = SamPredictor(sam), onnx_predictor(out, shared=shared)
    assert (predictor.decoder_prompts is not None) == shared
    reference.set_image(image)
    predictor.set_image(image)
    assert predictor.input_size == preprocess_shape(*size, sam.image_size)
    assert np.abs(predictor.get_image_embedding() - reference.features.numpy()).max() <= TOL
    for kind, prompt in prompts(*size, 128).items():
        for multimask in (True, False):
            expected = reference.predict(**prompt, multimask_output=multimask, return_logits=True)
            got = predictor.predict(**prompt, multimask_output=multimask, return_logits=True)
            assert got[0].shape == (3 if multimask else 1, *size), kind
            assert_same_outputs(expected, got)
    masks, _, _ = predictor.predict(**prompts(*size, 128)["point"])
    assert masks.dtype == bool and masks.shape == (3, *size)


@pytest.mark.parametrize("shared", [False, True], ids=["decoder", "shared-image"])
def test_vit_encoder_and_another_image_size(small_vit: tuple[Sam, Path], shared: bool) -> None:
    sam, out = small_vit
    image = np.random.default_rng(2).integers(0, 256, (300, 700, 3), dtype=np.uint8)
    reference, predictor = SamPredictor(sam), onnx_predictor(out, shared=shared)
    assert predictor.image_size == 256
    reference.set_image(image)
    predictor.set_image(image)
    assert np.abs(predictor.get_image_embedding() - reference.features.numpy()).max() <= TOL
    for prompt in prompts(300, 700, 64).values():
        expected = reference.predict(**prompt, return_logits=True)
        assert_same_outputs(expected, predictor.predict(**prompt, return_logits=True))


@pytest.mark.parametrize(
    "original", [(1, 1), (2, 1000), (1023, 1024), (1025, 77), (333, 334), (1500, 997)]
)
def test_decoder_upscales_to_any_size(tiny: tuple[Sam, Path], original: tuple[int, int]) -> None:
    """The resized size is derived inside the graph; it must round as preprocess_shape does
    (the official ONNX decoder gets this wrong for many aspect ratios)."""
    sam, out = tiny
    predictor = onnx_predictor(out)
    embeddings = np.random.default_rng(3).normal(size=(1, 256, 32, 32)).astype(np.float32)
    feeds = {
        "image_embeddings": embeddings,
        "point_coords": np.array([[[100.0, 200.0], [0.0, 0.0]]], np.float32),
        "point_labels": np.array([[1.0, -1.0]], np.float32),
        "mask_input": np.zeros((1, 1, 128, 128), np.float32),
        "has_mask_input": np.zeros(1, np.float32),
        "orig_im_size": np.array(original, np.float32),
    }
    masks, _, low_res = predictor.decoder.run(None, feeds)
    expected = sam.postprocess_masks(
        torch.from_numpy(low_res), preprocess_shape(*original, sam.image_size), original
    )
    assert masks.shape == (1, 4, *original)
    assert np.abs(masks - expected.numpy()).max() <= TOL


def test_decoder_select_upscales_only_the_masks_asked_for(tiny: tuple[Sam, Path],
                                                           tmp_path: Path) -> None:
    """``decoder_select.onnx`` (the annotation page's graph for mask-prompt refinement) is
    ``decoder.onnx`` plus ``mask_index``: the same numbers, for the masks it names only."""
    import onnx
    import onnxruntime as ort

    from samkit.onnx.export import export_decoder
    from samkit.onnx.names import SELECT_INPUTS

    sam, out = tiny
    path = export_decoder(sam, tmp_path / "decoder_select.onnx", "samkit-tiny", select_masks=True)
    graph = onnx.load(str(path)).graph
    assert [v.name for v in graph.input] == SELECT_INPUTS
    [masks_out] = [v for v in graph.output if v.name == "masks"]
    assert [d.dim_param or d.dim_value for d in masks_out.type.tensor_type.shape.dim] == [
        1, "num_masks", "height", "width"]
    rng = np.random.default_rng(5)
    feeds = {
        "image_embeddings": rng.normal(size=(1, 256, 32, 32)).astype(np.float32),
        "point_coords": np.array([[[100.0, 200.0], [300.0, 120.0], [0.0, 0.0]]], np.float32),
        "point_labels": np.array([[1.0, 0.0, -1.0]], np.float32),
        "mask_input": rng.normal(0, 4, (1, 1, 128, 128)).astype(np.float32),
        "has_mask_input": np.ones(1, np.float32),
        "orig_im_size": np.array([480, 640], np.float32),
    }
    full = onnx_predictor(out).decoder.run(None, feeds)
    select = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for index in ([0], [1, 2, 3]):
        masks, iou, low_res = select.run(None, {**feeds, "mask_index": np.array(index)})
        assert masks.shape == (1, len(index), 480, 640)
        assert np.abs(masks - full[0][:, index]).max() <= TOL
        assert np.abs(iou - full[1]).max() <= TOL and np.abs(low_res - full[2]).max() <= TOL


@pytest.mark.parametrize("shared", [False, True], ids=["decoder", "shared-image"])
def test_int8_runs_and_stays_close(tiny: tuple[Sam, Path], shared: bool) -> None:
    _, out = tiny
    image = np.random.default_rng(4).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    fp32, int8 = onnx_predictor(out), onnx_predictor(out, int8=True, shared=shared)
    assert (int8.decoder_prompts is not None) == shared
    ious = []
    for predictor in (fp32, int8):
        predictor.set_image(image)
    for prompt in prompts(480, 640, 128).values():
        a, _, _ = fp32.predict(**prompt)
        b, scores, _ = int8.predict(**prompt)
        assert b.shape == a.shape and np.isfinite(scores).all()
        # Two empty masks agree (IoU 1).
        ious += [(x & y).sum() / (x | y).sum() if (x | y).any() else 1.0
                 for x, y in zip(a, b, strict=True)]
    print(f"int8 vs fp32 mask IoU (random weights): mean {np.mean(ious):.3f}, "
          f"min {np.min(ious):.3f}")
    assert np.mean(ious) >= 0.8


def test_export_files_and_graph_interface(tiny: tuple[Sam, Path]) -> None:
    import onnx

    _, out = tiny
    info = json.loads((out / "samkit_onnx.json").read_text())
    assert info["model"] == "samkit-tiny" and info["image_size"] == 512 and info["trained"]
    assert set(info["files"].values()) == {
        "encoder.onnx", "decoder.onnx", "encoder.int8.onnx", "decoder.int8.onnx",
        "decoder_image.onnx", "decoder_prompts.onnx", "decoder_prompts.int8.onnx",
    }
    decoder = onnx.load(str(out / "decoder.onnx"))
    assert decoder.opset_import[0].version == 20
    ops = {node.op_type for node in decoder.graph.node}
    assert "Gelu" in ops and "Erf" not in ops  # opset 20's fused GELU

    def dims(value: onnx.ValueInfoProto) -> list[str | int]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    graph = {v.name: dims(v) for v in [*decoder.graph.input, *decoder.graph.output]}
    assert graph["point_coords"] == [1, "num_points", 2]
    assert graph["point_labels"] == [1, "num_points"]
    assert graph["mask_input"] == [1, 1, 128, 128]
    assert graph["masks"] == [1, 4, "height", "width"]
    int8 = onnx.load(str(out / "decoder.int8.onnx"))
    assert {p.key: p.value for p in int8.metadata_props}["samkit.image_size"] == "512"
    # The shared-image pair: the image graph's outputs are exactly the prompt graph's
    # image-side inputs; prompts and the masks to upscale are dynamic.
    image, prompts = (onnx.load(str(out / f"decoder_{n}.onnx")) for n in ("image", "prompts"))
    products = [v.name for v in image.graph.output]
    assert [v.name for v in image.graph.input] == ["image_embeddings"] and products
    graph = {v.name: dims(v) for v in [*prompts.graph.input, *prompts.graph.output]}
    assert list(graph)[: len(products)] == products
    assert graph["mask_index"] == ["num_masks"]
    assert graph["masks"] == [1, "num_masks", "height", "width"]


def test_load_errors_are_one_line(tiny: tuple[Sam, Path], small_vit: tuple[Sam, Path],
                                  tmp_path: Path) -> None:
    _, out = tiny
    encoder, decoder = out / "encoder.onnx", out / "decoder.onnx"
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07not really onnx" * 10)
    cases = [
        ((tmp_path / "missing.onnx", decoder), "ONNX encoder not found"),
        ((encoder, corrupt), "cannot load ONNX decoder"),
        ((decoder, encoder), "is not a samkit encoder graph"),
        ((encoder, small_vit[1] / "decoder.onnx"), "is for 512-px images but the decoder for 256"),
    ]
    for paths, message in cases:
        with pytest.raises(SamkitError, match=message) as err:
            OnnxSamPredictor(*paths)
        assert "\n" not in str(err.value)
    vit = small_vit[1]
    shared_cases = [
        ({"decoder_image_path": out / "decoder_image.onnx"}, "or neither"),
        ({"decoder_image_path": vit / "decoder_image.onnx",
          "decoder_prompts_path": vit / "decoder_prompts.onnx"}, "is for 256-px images"),
        ({"decoder_image_path": out / "decoder_image.onnx",
          "decoder_prompts_path": vit / "decoder_prompts.onnx"}, "prompts .* is for 256-px"),
        ({"decoder_image_path": out / "decoder_image.onnx", "decoder_prompts_path": decoder},
         "not a samkit decoder prompts graph"),
        ({"decoder_image_path": decoder, "decoder_prompts_path": out / "decoder_prompts.onnx"},
         "not a samkit decoder image graph"),
    ]
    for kwargs, message in shared_cases:
        with pytest.raises(SamkitError, match=message) as err:
            OnnxSamPredictor(encoder, decoder, **kwargs)
        assert "\n" not in str(err.value)


def test_prompt_errors(tiny: tuple[Sam, Path]) -> None:
    predictor = onnx_predictor(tiny[1])
    with pytest.raises(RuntimeError, match="must be set"):
        predictor.predict(np.array([[1.0, 1.0]]), np.array([1]))
    predictor.set_image(np.zeros((40, 60, 3), np.uint8))
    bad = [
        ({}, "no prompt given"),
        ({"point_coords": np.array([[1.0, 2.0]])}, "point_labels must be given"),
        ({"point_coords": np.array([[1.0, 2.0]]), "point_labels": np.array([5])}, "point labels"),
        ({"point_coords": np.array([[1.0, 2.0]]), "point_labels": np.array([1, 1])},
         "point labels must be N = \\(1,\\)"),
        ({"point_coords": np.array([[1.0, 2.0]]), "point_labels": np.zeros(0)},
         "point labels must be N"),
        ({"box": np.array([10.0, 10.0, 5.0, 20.0])}, "x1 >= x0"),
        ({"mask_input": np.zeros((1, 64, 64))}, "mask_input must be 1 x 128 x 128"),
    ]
    for kwargs, message in bad:
        with pytest.raises(SamkitError, match=message):
            predictor.predict(**kwargs)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--quantize", "int4"], "unknown --quantize 'int4'"),
        (["--model", "vit_x"], "unknown model 'vit_x'"),
        (["--checkpoint", "/nonexistent.pth"], "checkpoint not found"),
    ],
)
def test_cli_errors_are_one_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["export-onnx", "-o", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_missing_export_package_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else find_spec(name, *a))
    code = cli.main(["export-onnx", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "onnxscript (torch's ONNX exporter)" in err[0] and "samkit[onnx]" in err[0]


def test_eval_points_compares_pytorch_bf16_and_onnx(tiny: tuple[Sam, Path],
                                                     tmp_path: Path) -> None:
    """``samkit eval points --bf16 --onnx DIR``: one run scores the PyTorch model, its bf16
    encoder path and both exported graph pairs with the same clicks."""
    grabcut = Path(__file__).resolve().parents[2] / "shared" / "data" / "grabcut"
    if not grabcut.is_dir():
        pytest.skip(f"shared dataset grabcut absent (expected at {grabcut})")
    _, out = tiny
    res = tmp_path / "res.json"
    argv = ["eval", "points", "--data", str(grabcut), "--limit", "2", "--max-clicks", "2",
            "--checkpoint", str(out.parent / "random.safetensors"), "--bf16",
            "--onnx", str(out), "--json", str(res)]
    assert cli.main(argv) == 0
    methods = json.loads(res.read_text())["datasets"][0]["methods"]
    assert set(methods) == {"samkit-tiny", "samkit-tiny (bf16 encoder)", "onnx fp32",
                            "onnx int8"}
    torch_run, onnx_run = methods["samkit-tiny"], methods["onnx fp32"]
    for click in ("1", "2"):
        assert abs(torch_run["miou"][click] - onnx_run["miou"][click]) < 1e-3
    assert abs(torch_run["box_miou"] - onnx_run["box_miou"]) < 1e-3


def test_eval_onnx_folder_must_hold_an_export(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["eval", "points", "--data", str(tmp_path), "--onnx", str(tmp_path),
            "--json", str(tmp_path / "r.json")]
    assert cli.main(argv) == 2
    assert "no decoder.onnx" in capsys.readouterr().err


def test_graph_label_values_are_the_prompt_encoders() -> None:
    from samkit.modeling import prompt_encoder
    from samkit.onnx import names

    for label in ("LABEL_PAD", "LABEL_BOX_TOP_LEFT", "LABEL_BOX_BOTTOM_RIGHT"):
        assert getattr(names, label) == getattr(prompt_encoder, label)
