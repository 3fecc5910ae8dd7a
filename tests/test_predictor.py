"""Predictor behaviour: input conversion, validation, batching over prompts and images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samkit import SamkitError, SamPredictor, build_sam
from samkit.images import ResizeLongestSide, preprocess_shape, to_rgb_uint8


@pytest.fixture(scope="module")
def predictor() -> SamPredictor:
    torch.manual_seed(0)
    return SamPredictor(build_sam("samkit-tiny"))


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, size=(120, 200, 3), dtype=np.uint8)


def test_shapes_for_any_aspect_ratio(predictor: SamPredictor) -> None:
    for h, w in ((64, 300), (300, 64), (37, 37)):
        img = np.full((h, w, 3), 127, np.uint8)
        predictor.set_image(img)
        assert predictor.input_size == preprocess_shape(h, w, 512)
        masks, scores, low_res = predictor.predict(np.array([[w / 2, h / 2]]), np.array([1]))
        assert masks.shape == (3, h, w) and masks.dtype == bool
        assert scores.shape == (3,) and low_res.shape == (3, 128, 128)


@pytest.mark.parametrize(
    "make",
    [
        lambda rgb: rgb[..., 0],  # gray
        lambda rgb: np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]),  # RGBA
        lambda rgb: rgb.astype(np.uint16) * 257,  # 16-bit
        lambda rgb: rgb.astype(np.float32) / 255.0,  # float 0..1
    ],
)
def test_image_conversions_match_uint8_rgb(make, image: np.ndarray) -> None:
    converted = to_rgb_uint8(make(image))
    assert converted.dtype == np.uint8 and converted.shape == image.shape
    reference = np.repeat(image[..., :1], 3, axis=2) if make(image).ndim == 2 else image
    assert np.abs(converted.astype(int) - reference.astype(int)).max() <= 1


def test_bgr_input_equals_rgb(predictor: SamPredictor, image: np.ndarray) -> None:
    predictor.set_image(image)
    rgb_features = predictor.features.clone()
    predictor.set_image(np.ascontiguousarray(image[..., ::-1]), image_format="BGR")
    assert torch.equal(rgb_features, predictor.features)


def test_set_image_batch_equals_one_by_one(predictor: SamPredictor, image: np.ndarray) -> None:
    images = [image, image[:80, :150], np.ascontiguousarray(image[:, ::-1])]
    predictor.set_image_batch(images)
    batch_features = [e.features for e in predictor.images]
    for img, batch_feat in zip(images, batch_features):
        predictor.set_image(img)
        assert (predictor.features - batch_feat).abs().max().item() < 1e-4
    predictor.set_image_batch(images)
    predictor.select_image(1)
    assert predictor.original_size == (80, 150)
    masks, _, _ = predictor.predict(box=np.array([10, 10, 60, 60]))
    assert masks.shape == (3, 80, 150)


def test_predict_batch_many_point_sets(predictor: SamPredictor, image: np.ndarray) -> None:
    predictor.set_image(image)
    coords = np.array([[[10, 10], [50, 50]], [[100, 60], [0, 0]]], dtype=np.float32)
    labels = np.array([[1, 0], [1, -1]])  # the second set is one point, padded
    masks, scores, low_res = predictor.predict_batch(coords, labels, multimask_output=False)
    assert masks.shape == (2, 1, 120, 200) and scores.shape == (2, 1)
    single, single_scores, _ = predictor.predict(coords[0], labels[0], multimask_output=False)
    assert np.allclose(scores[0].numpy(), single_scores, atol=1e-5)


def test_a_single_prompt_decodes_on_one_thread(predictor: SamPredictor, image: np.ndarray,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """One prompt set decodes with ``single_prompt_threads`` (its small ops lose to a second
    thread's hand-offs), a batch with torch's count; the count is restored after, and the
    masks do not depend on it."""
    predictor.set_image(image)
    seen: list[int] = []
    decoder = predictor.model.mask_decoder
    original = type(decoder).forward

    def recording(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(self, *args, **kwargs)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(type(decoder), "forward", recording)
        one = predictor.predict(np.array([[50, 40]]), np.array([1]))
        assert seen == [1] and torch.get_num_threads() == 2
        predictor.predict_batch(np.array([[[50, 40]], [[100, 60]]]), np.array([[1], [1]]))
        assert seen[1:] == [2]
        predictor.single_prompt_threads = None
        all_threads = predictor.predict(np.array([[50, 40]]), np.array([1]))
        assert seen[2:] == [2]
    finally:
        predictor.single_prompt_threads = SamPredictor.single_prompt_threads
        torch.set_num_threads(before)
    assert (one[0] != all_threads[0]).mean() < 1e-4  # float sums may round differently
    np.testing.assert_allclose(one[1], all_threads[1], atol=1e-5)


def test_mask_input_round_trip(predictor: SamPredictor, image: np.ndarray) -> None:
    predictor.set_image(image)
    _, scores, low_res = predictor.predict(np.array([[50, 50]]), np.array([1]))
    best = low_res[np.argmax(scores)][None]
    masks, _, _ = predictor.predict(np.array([[50, 50]]), np.array([1]), mask_input=best, multimask_output=False)
    assert masks.shape == (1, 120, 200)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "no prompt given"),
        (dict(point_coords=np.array([[1, 2]])), "point_labels must be given"),
        (dict(point_coords=np.array([[1, 2]]), point_labels=np.array([1, 1])), "point labels must be"),
        (dict(point_coords=np.array([[1, 2]]), point_labels=np.array([7])), "must be 1 \\(foreground\\)"),
        (dict(point_coords=np.array([[np.nan, 2]]), point_labels=np.array([1])), "finite"),
        (dict(box=np.array([50, 10, 20, 40])), "x1 >= x0"),
        (dict(box=np.array([1, 2, 3])), "B x 4"),
        (dict(box=np.array([0, 0, 10, 10]), mask_input=np.zeros((1, 256, 256))), "mask_input must be"),
    ],
)
def test_bad_prompts_raise_one_line(predictor: SamPredictor, image: np.ndarray, kwargs, message) -> None:
    predictor.set_image(image)
    with pytest.raises(SamkitError, match=message) as err:
        predictor.predict(**kwargs)
    assert "\n" not in str(err.value)


def test_predict_before_set_image_raises() -> None:
    fresh = SamPredictor(build_sam("samkit-tiny"))
    with pytest.raises(RuntimeError, match="set_image"):
        fresh.predict(box=np.array([0, 0, 5, 5]))


def test_coordinate_transform_matches_official_rounding() -> None:
    t = ResizeLongestSide(1024)
    assert preprocess_shape(480, 640, 1024) == (768, 1024)
    assert preprocess_shape(333, 500, 1024) == (682, 1024)  # 681.98 rounds up
    pts = t.apply_coords(np.array([[640.0, 480.0]]), (480, 640))
    assert np.allclose(pts, [[1024.0, 768.0]])
    assert np.allclose(t.apply_boxes(np.array([[0, 0, 320, 240]]), (480, 640)), [[0, 0, 512, 384]])
    torch_pts = t.apply_coords_torch(torch.tensor([[320.0, 240.0]]), (480, 640))
    assert torch.allclose(torch_pts, torch.tensor([[512.0, 384.0]]))


def test_model_stays_trainable() -> None:
    """No no_grad baked into forward: gradients reach the encoder through the decoder."""
    model = build_sam("samkit-tiny").train()
    x = torch.rand(1, 3, 512, 512) * 255
    emb = model.image_encoder(model.preprocess(x[0])[None])
    sparse, dense = model.prompt_encoder(points=(torch.tensor([[[100.0, 100.0]]]), torch.tensor([[1]])), boxes=None, masks=None)
    low_res, iou = model.mask_decoder(emb, model.prompt_encoder.get_dense_pe(), sparse, dense, True)
    (low_res.mean() + iou.mean()).backward()
    assert model.image_encoder.neck.proj4.weight.grad is not None
    assert model.image_encoder.features.blocks[0].conv0.weight.grad is not None


def test_bf16_encoder_autocast_stays_close_to_fp32() -> None:
    """``encoder_dtype=torch.bfloat16``: embeddings in fp32 dtype, within bf16 rounding."""
    torch.manual_seed(0)
    model = build_sam("vit_t").eval()
    image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    exact, fast = SamPredictor(model), SamPredictor(model, encoder_dtype=torch.bfloat16)
    exact.set_image(image)
    fast.set_image(image)
    assert fast.features.dtype == torch.float32
    rel = (fast.features - exact.features).norm() / exact.features.norm()
    assert 0 < rel < 0.05  # bf16 did run (not bit-equal), and stayed close


@pytest.mark.parametrize("multimask", [True, False])
def test_no_prompts_give_empty_results(multimask: bool) -> None:
    """A batch of zero prompts (say, a detector found nothing) returns empty, shaped outputs."""
    predictor = SamPredictor(build_sam("vit_t").eval())
    predictor.set_image(np.zeros((64, 80, 3), np.uint8))
    outputs = 3 if multimask else 1
    masks, scores, low_res = predictor.predict_batch(boxes=np.zeros((0, 4)),
                                                     multimask_output=multimask)
    assert masks.shape == (0, outputs, 64, 80) and masks.dtype == torch.bool
    assert scores.shape == (0, outputs) and low_res.shape == (0, outputs, 256, 256)


def test_an_embedding_moves_to_another_predictor(predictor: SamPredictor,
                                                  image: np.ndarray) -> None:
    """get_embedding / set_embedding: a cached embedding answers prompts exactly as the
    encoder's own, without encoding the image again."""
    predictor.set_image(image)
    embedding = predictor.get_embedding()
    other = SamPredictor(predictor.model)
    other.set_embedding(embedding)
    box = np.array([10, 20, 90, 70])
    for a, b in zip(predictor.predict(box=box), other.predict(box=box), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(SamkitError, match="no image is set"):
        SamPredictor(predictor.model).get_embedding()
