"""The annotation page in a real browser: Playwright driving Debian's Chromium against the
server (uvicorn, in a thread of this process, with a small random model).

Open a project, click on an object, see the overlay appear, cycle and accept the mask, go to
the next image, export: the export holds the mask. Skipped, with the reason, when Playwright
or Chromium is missing (CI installs them: `apt-get install -y chromium`, `pip install
playwright`; never `playwright install`, which downloads a browser).

With ``SAMKIT_ENGINE_SCREENSHOT=docs/annotate.png`` the test also writes the docs screenshot.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

pytest.importorskip("uvicorn", reason="the annotation server needs `pip install samkit[engine]`")
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="Playwright is not installed (pip install playwright)")
CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip("Chromium not found at /usr/bin/chromium (apt-get install -y chromium)",
                allow_module_level=True)

import uvicorn  # noqa: E402

from samkit.build import build_sam  # noqa: E402
from samkit.engine.model_service import ModelService  # noqa: E402
from samkit.engine.project import Project, open_project  # noqa: E402
from samkit.engine.server import RUNTIME_DIR, create_app  # noqa: E402
from samkit.engine.web_decoder import RUNTIME_FILES  # noqa: E402
from samkit.images import load_image  # noqa: E402
from samkit.predictor import SamPredictor  # noqa: E402
from samkit.registry import SamConfig, ViTConfig  # noqa: E402
from test_engine import small_loader  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    # pycocotools (numpy 2) warns on every decode; not ours to fix.
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

# Headless, and nothing that reaches for the network (the machine has none).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
GRABCUT = Path(__file__).resolve().parents[2] / "shared" / "data" / "grabcut" / "images"
TIMEOUT_MS = 60_000


@contextmanager
def chromium_page(accept_downloads: bool = False) -> Iterator[Any]:
    """A page of a fresh headless Debian chromium (closed afterwards), at the app's size."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1180, "height": 640},
                                    accept_downloads=accept_downloads)
            page.set_default_timeout(TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def photos(folder: Path) -> Path:
    """Two photos from ../shared when present (nicer in the screenshot), else drawn ones."""
    folder.mkdir()
    shared = sorted(GRABCUT.glob("*.jpg"))[:2] if GRABCUT.is_dir() else []
    for i, path in enumerate(shared):
        shutil.copy(path, folder / f"photo{i}.jpg")
    if not shared:
        for i in range(2):
            pixels = np.full((240, 320, 3), 40, np.uint8)
            pixels[60:180, 80 + 20 * i:240] = (220, 180, 60)
            Image.fromarray(pixels).save(folder / f"photo{i}.png")
    return folder


@contextmanager
def serving(project: Project, service: ModelService, **options: Any) -> Iterator[str]:
    """The app on a free loopback port (uvicorn in a thread); yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(project, service, **options), host="127.0.0.1",
                            port=port, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        instance.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def server(tmp_path: Path):
    project = open_project(tmp_path / "project", photos(tmp_path / "src"), None, None)
    service = ModelService(project, "cpu", loader=small_loader)
    with serving(project, service) as url:
        yield url, project


# Pixels of the canvas that differ from the bare image: the drawn overlay.
OVERLAY_PIXELS = """() => {
  const canvas = document.getElementById("canvas");
  const bare = document.createElement("canvas");
  bare.width = canvas.width; bare.height = canvas.height;
  const img = new Image();
  return new Promise((resolve) => {
    img.onload = () => {
      bare.getContext("2d").drawImage(img, 0, 0);
      const a = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
      const b = bare.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
      let n = 0;
      for (let i = 0; i < a.length; i += 4) {
        const d = Math.abs(a[i] - b[i]) + Math.abs(a[i + 1] - b[i + 1]) +
          Math.abs(a[i + 2] - b[i + 2]);
        if (d > 30) n++;
      }
      resolve(n);
    };
    img.src = "/api/images/1/file";
  });
}"""


def test_click_accept_next_export_in_chromium(server, tmp_path: Path) -> None:
    url, project = server
    with chromium_page(accept_downloads=True) as page:
        page.goto(url)
        page.wait_for_selector("#canvas[data-ready='1']")
        assert "Ready" in page.inner_text("#status")
        assert "Enter" in page.inner_text("#shortcuts")
        # The small test model has random weights: the page must say so beside its masks.
        badge = page.locator("#model-badge.untrained")
        assert "UNTRAINED" in badge.inner_text() and "weights: " in badge.inner_text()
        assert page.is_hidden("#text-row")  # the small model has no text slot

        page.keyboard.press("Enter")  # nothing to accept yet: a clear message
        page.wait_for_selector("#status.error")
        assert "click on an object first" in page.inner_text("#status")

        assert page.evaluate(OVERLAY_PIXELS) == 0
        box = page.locator("#canvas").bounding_box()
        page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.55)
        page.wait_for_function("document.getElementById('canvas').dataset.prediction === '3'")
        assert page.evaluate(OVERLAY_PIXELS) > 100  # the mask is drawn over the image
        status = page.inner_text("#status")
        assert "Mask" in status and "of 3" in status
        # The cycle button says which of the 3 masks is shown, and moves with Tab.
        shown = page.inner_text("#cycle")
        assert shown.startswith("Mask ") and "of 3" in shown and page.is_enabled("#cycle")
        page.keyboard.press("Tab")
        assert "Mask" in page.inner_text("#status")
        assert page.inner_text("#cycle") != shown
        page.keyboard.press("Enter")
        page.wait_for_function(
            "document.getElementById('canvas').dataset.annotations === '1'")
        assert "Accepted mask" in page.inner_text("#status")
        assert "1 accepted" in page.text_content("#mask-count")
        # The stats table fits the side panel: nothing clipped or scrolled sideways.
        page.wait_for_function("document.querySelectorAll('#stats tbody tr').length >= 2")
        assert "1 manual" in page.inner_text("#stats")
        assert page.evaluate("(() => { const p = document.getElementById('panel');"
                             " return p.scrollWidth <= p.clientWidth; })()")
        stored = project.db.annotations(1)
        assert len(stored) == 1 and stored[0]["prompts"]["points"][0][2] == 1

        screenshot = os.environ.get("SAMKIT_ENGINE_SCREENSHOT")
        if screenshot:
            page.mouse.click(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.4)
            page.wait_for_function(
                "document.getElementById('canvas').dataset.prediction !== '0'")
            save_screenshot(page.screenshot(), Path(screenshot))
            page.keyboard.press("Escape")

        page.keyboard.press("ArrowRight")
        page.wait_for_selector("#canvas[data-ready='2']")
        assert page.get_attribute("#image-list li:nth-child(2)", "aria-current") == "true"

        good, bad = tmp_path / "my upload (1).png", tmp_path / "bad.png"
        Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(good)
        bad.write_bytes(b"this is not a picture")
        page.set_input_files("#upload", str(bad))
        page.wait_for_selector("#status.error")
        assert "not an image" in page.inner_text("#status")
        page.set_input_files("#upload", str(good))
        page.wait_for_selector("#image-list li:has-text('my_upload__1_.png')")

        with page.expect_download() as download:
            page.click("#export-coco")
        exported = json.loads(Path(download.value.path()).read_text())
    assert [a["image_id"] for a in exported["annotations"]] == [1]
    assert exported["annotations"][0]["segmentation"] == stored[0]["segmentation"]
    assert exported["annotations"][0]["area"] == stored[0]["area"] > 0


def save_screenshot(png: bytes, path: Path) -> None:
    """The page as a 256-colour PNG: a quarter of the size, the same to the eye (octree keeps
    small saturated marks such as the green click point, which median cut greys out)."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)


# ------------------------------------------------------------------ the page's own decoder
RUNTIME_MISSING = [name for name in RUNTIME_FILES if not (RUNTIME_DIR / name).is_file()]
needs_runtime = pytest.mark.skipif(
    bool(RUNTIME_MISSING), reason="onnxruntime-web is not installed in samkit/engine/static/ort "
    "(bash scripts/get_web_runtime.sh; needs npm)")
SMALL_VIT = SamConfig(ViTConfig(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,)),
                      image_size=256)
MODELS = {"samkit-tiny": "samkit-tiny", "small-vit": SMALL_VIT}
EXPORT_MS = 300_000  # exporting the decoder graphs on a busy 2-core machine
MATCH_IOU = 0.99


def model_loader(config: Any):
    """A ModelLoader for ``config`` (samkit-tiny: its bundled weights; the small ViT: random
    weights, seeded)."""

    def load(project: Project, version: Any, device: str) -> torch.nn.Module:
        torch.manual_seed(0)
        return build_sam(config)

    return load


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def rle_mask(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}) > 0


def server_decode(url: str, prompts: dict) -> list[np.ndarray]:
    """The server path: POST /decode with the page's prompts."""
    request = urllib.request.Request(f"{url}/api/images/1/decode", method="POST",
                                     data=json.dumps(prompts).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return [rle_mask(m["segmentation"]) for m in json.loads(response.read())["masks"]]


PAGE_MASKS = """() => ({
  points: state.points, box: state.box, choice: state.prediction.choice,
  masks: state.prediction.masks.map((m) =>
    SamkitDecoder.rleEncode(m.bits, state.info.height, state.info.width)),
  lowRes: Array.from(state.prediction.lowRes[state.prediction.choice]),
  decoder: window.samkitTimings[window.samkitTimings.length - 1].decoder,
  session: window.samkitTimings[window.samkitTimings.length - 1].session,
})"""


IDB_KEYS = """() => new Promise((resolve, reject) => {
  const open = indexedDB.open("samkit-annotate", 1);
  open.onsuccess = () => {
    const request = open.result.transaction("blobs").objectStore("blobs").getAllKeys();
    request.onsuccess = () => resolve(request.result.map(String));
    request.onerror = () => reject(request.error);
  };
  open.onerror = () => reject(open.error);
})"""


def decodes(page: Any) -> int:
    return int(page.evaluate("Number(document.getElementById('canvas').dataset.decodes || 0)"))


def wait_decode(page: Any, before: int) -> dict:
    page.wait_for_function(
        f"Number(document.getElementById('canvas').dataset.decodes || 0) > {before}")
    return page.evaluate(PAGE_MASKS)


@needs_runtime
@pytest.mark.parametrize("name", list(MODELS))
def test_browser_decoder_matches_the_server(name: str, tmp_path: Path) -> None:
    """Click, box and a refining second click decoded in the page give the server's masks
    (the click and the box through the shared-image pair's ``decoder_prompts.onnx``, the
    refinement, which has a mask prompt, through ``decoder_select.onnx``); accepting stores
    the page's mask; the page caches the graphs it runs; revisiting an image downloads
    nothing."""
    project = open_project(tmp_path / "project", photos(tmp_path / "src"), None, None)
    service = ModelService(project, "cpu", loader=model_loader(MODELS[name]))
    with serving(project, service, prefetch=False) as url, \
            chromium_page() as page:
        page.goto(url)
        # Ready, or a reason shown (a failed export says why instead of timing out).
        page.wait_for_function(
            "document.getElementById('canvas').dataset.local === '1' || "
            "/failed|did not start/.test(document.getElementById('decoder').textContent)",
            timeout=EXPORT_MS)
        assert page.get_attribute("#canvas", "data-decoder") == "browser", \
            page.inner_text("#decoder")
        assert page.evaluate("crossOriginIsolated")  # COOP/COEP: wasm threads allowed
        assert "Decoding in this page" in page.inner_text("#decoder")
        # The fp32 graphs, each downloaded once and kept in IndexedDB by sha256: the pair
        # now, decoder_select at the first refinement.
        with urllib.request.urlopen(f"{url}/api/decoder", timeout=60) as response:
            graphs = json.loads(response.read())["graphs"]["fp32"]

        def loaded(roles: list[str]) -> None:
            assert page.evaluate("state.decoder.bytes.graph") == sum(
                graphs[r]["bytes"] for r in roles)
            assert {k for k in page.evaluate(IDB_KEYS) if k.startswith("graph:")} == {
                f"graph:{graphs[r]['sha256']}" for r in roles}

        loaded(["decoder_image", "decoder_prompts"])
        box = page.locator("#canvas").bounding_box()

        def at(fx: float, fy: float) -> tuple[float, float]:
            return box["x"] + box["width"] * fx, box["y"] + box["height"] * fy

        # One click: 3 masks, each the server's.
        before = decodes(page)
        page.mouse.click(*at(0.5, 0.55))
        one = wait_decode(page, before)
        assert one["decoder"] == "browser" and len(one["masks"]) == 3
        assert one["session"] == "decoder_prompts"
        prompts = {"points": one["points"], "box": one["box"]}
        for ours, theirs in zip(one["masks"], server_decode(url, prompts), strict=True):
            assert mask_iou(rle_mask(ours), theirs) >= MATCH_IOU

        # A second click refines the shown mask: the server's predictor with the same
        # low-res logits as the mask prompt.
        before = decodes(page)
        page.mouse.click(*at(0.3, 0.4), button="right")
        two = wait_decode(page, before)
        assert len(two["masks"]) == 1 and two["points"][1][2] == 0
        assert two["session"] == "decoder_select"
        loaded(["decoder_image", "decoder_prompts", "decoder_select"])
        reference = refined_reference(service, project, one, two)
        assert mask_iou(rle_mask(two["masks"][0]), reference) >= MATCH_IOU

        # Accept: the server stores exactly the page's mask.
        page.keyboard.press("Enter")
        page.wait_for_function(
            "document.getElementById('canvas').dataset.annotations === '1'")
        stored = project.db.annotations(1)[0]
        assert stored["segmentation"]["counts"] == two["masks"][0]["counts"]
        assert stored["prompts"]["points"] == two["points"]

        # A box alone: 3 masks again.
        before = decodes(page)
        start, end = at(0.25, 0.3), at(0.75, 0.8)
        page.mouse.move(*start)
        page.mouse.down()
        page.mouse.move(*end, steps=5)
        page.mouse.up()
        boxed = wait_decode(page, before)
        assert boxed["box"] is not None and not boxed["points"]
        assert boxed["session"] == "decoder_prompts"
        server = server_decode(url, {"points": [], "box": boxed["box"]})
        for ours, theirs in zip(boxed["masks"], server, strict=True):
            assert mask_iou(rle_mask(ours), theirs) >= MATCH_IOU
        page.keyboard.press("Escape")

        # Next image and back: the first image's embedding comes from IndexedDB.
        fetched = page.evaluate("state.decoder.bytes.embeddings")
        page.keyboard.press("ArrowRight")
        page.wait_for_selector("#canvas[data-local='2']")
        second = page.evaluate("state.decoder.bytes.embeddings")
        assert second > fetched
        page.keyboard.press("ArrowLeft")
        page.wait_for_selector("#canvas[data-local='1']")
        assert page.evaluate("state.decoder.bytes.embeddings") == second
        assert all(t["decoder"] == "browser" for t in page.evaluate("samkitTimings"))


def refined_reference(service: ModelService, project: Project, one: dict,
                      two: dict) -> np.ndarray:
    """The server's predictor on the page's two-click prompt, with the first click's chosen
    mask (its low-res logits, recomputed on the server) as the mask prompt."""
    image = project.db.image(1)
    assert image is not None
    predictor = SamPredictor(service.model)
    predictor.set_image(load_image(project.image_path(image.file_name)))
    first = np.array([p[:2] for p in one["points"]])
    _, _, low = predictor.predict(point_coords=first, point_labels=np.array([1]),
                                  multimask_output=True)
    points = np.array([p[:2] for p in two["points"]])
    labels = np.array([p[2] for p in two["points"]])
    masks, _, _ = predictor.predict(point_coords=points, point_labels=labels,
                                    mask_input=low[one["choice"]][None],
                                    multimask_output=False)
    return masks[0]


def test_without_the_runtime_the_server_decodes(tmp_path: Path) -> None:
    """No runtime files: the page says so and every click is decoded on the server."""
    project = open_project(tmp_path / "project", photos(tmp_path / "src"), None, None)
    service = ModelService(project, "cpu", loader=small_loader)
    with serving(project, service, prefetch=False, runtime_dir=tmp_path / "no-ort") as url, \
            chromium_page() as page:
        page.goto(url)
        page.wait_for_selector("#canvas[data-ready='1'][data-decoder='server']")
        note = page.inner_text("#decoder")
        assert "Decoding on the server" in note and "runtime is not installed" in note
        box = page.locator("#canvas").bounding_box()
        page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.55)
        page.wait_for_function("document.getElementById('canvas').dataset.decodes === '1'")
        assert page.evaluate("samkitTimings[0].decoder") == "server"
        assert "on the server" in page.inner_text("#status")
        page.keyboard.press("Enter")
        page.wait_for_function(
            "document.getElementById('canvas').dataset.annotations === '1'")


@needs_runtime
def test_a_new_model_version_replaces_the_pages_cache(tmp_path: Path) -> None:
    """Switching to another model version (as after a retrain) loads that version's graphs
    and embeddings and drops the old version's embeddings from IndexedDB."""
    project = open_project(tmp_path / "project", photos(tmp_path / "src"), None, None)
    service = ModelService(project, "cpu", loader=small_loader)
    first = service.version
    second = project.db.add_model_version(first.model, None, first.id, note={"steps": 1})
    with serving(project, service, prefetch=False) as url, \
            chromium_page() as page:
        page.goto(url)
        page.wait_for_selector("#canvas[data-local='1']", timeout=EXPORT_MS)
        assert any(f":v{first.id}:1" in key for key in page.evaluate(IDB_KEYS))
        page.evaluate("window.firstDecoder = state.decoder")
        page.select_option("#model-version", str(second.id))
        page.wait_for_function(
            f"state.decoder && state.decoder.version === {second.id} && "
            "document.getElementById('canvas').dataset.local === '1' && "
            "state.decoder.image !== null", timeout=EXPORT_MS)
        assert f"model v{second.id}" in page.inner_text("#decoder")
        # The old version's sessions are released (their wasm memory freed).
        assert page.evaluate("firstDecoder.released && "
                             "Object.keys(firstDecoder.sessions).length === 0")
        keys = [k for k in page.evaluate(IDB_KEYS) if k.startswith("emb:")]
        assert keys and all(f":v{second.id}:" in key for key in keys)
        box = page.locator("#canvas").bounding_box()
        before = decodes(page)
        page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.55)
        assert wait_decode(page, before)["decoder"] == "browser"
        page.keyboard.press("Enter")
        page.wait_for_function(
            "document.getElementById('canvas').dataset.annotations === '1'")
        assert project.db.annotations(1)[0]["model_version"] == second.id


# ------------------------------------------------------------------------------ text prompts
def test_text_prompt_in_chromium(tmp_path: Path, clip_dir: Path) -> None:
    """A model with a text slot, served with a CLIP: the page shows its text box; a phrase and
    Enter give the predictor's masks for that phrase (decoded on the server, which holds the
    CLIP); accepting stores the phrase with the mask and empties the box."""
    from samkit.clip import load_clip
    from test_engine import text_loader

    project = open_project(tmp_path / "project", photos(tmp_path / "src"), None, None)
    clip = load_clip(clip_dir)
    service = ModelService(project, "cpu", loader=text_loader, clip=clip)
    with serving(project, service, prefetch=False) as url, chromium_page() as page:
        page.goto(url)
        page.wait_for_selector("#canvas[data-ready='1']")
        page.wait_for_selector("#text-prompt:enabled")
        assert clip.name in page.get_attribute("#text-prompt", "title")
        page.fill("#text-prompt", "a wheel")
        before = decodes(page)
        page.press("#text-prompt", "Enter")
        page.wait_for_function(
            f"Number(document.getElementById('canvas').dataset.decodes || 0) > {before}")
        assert page.evaluate("window.samkitTimings.at(-1).decoder") == "server"
        assert page.get_attribute("#canvas", "data-prediction") == "3"  # text alone: 3 masks
        choice = page.evaluate("state.prediction.choice")
        page.evaluate("document.activeElement.blur()")
        page.keyboard.press("Enter")  # accept, outside the text box
        page.wait_for_function(
            "document.getElementById('canvas').dataset.annotations === '1'")
        assert page.input_value("#text-prompt") == ""
    [stored] = project.db.annotations(1)
    assert stored["prompts"] == {"points": [], "box": None, "text": "a wheel"}
    predictor = SamPredictor(service.model, clip=clip)  # the served weights
    predictor.set_image(load_image(project.image_path(project.db.images()[0].file_name)))
    expected, _, _ = predictor.predict(text="a wheel")
    assert mask_iou(rle_mask(stored["segmentation"]), expected[choice]) >= MATCH_IOU
