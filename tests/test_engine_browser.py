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
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("uvicorn", reason="the annotation server needs `pip install samkit[engine]`")
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="Playwright is not installed (pip install playwright)")
CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip("Chromium not found at /usr/bin/chromium (apt-get install -y chromium)",
                allow_module_level=True)

import uvicorn  # noqa: E402

from samkit.engine.model_service import ModelService  # noqa: E402
from samkit.engine.project import open_project  # noqa: E402
from samkit.engine.server import create_app  # noqa: E402
from test_engine import small_loader  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Headless, and nothing that reaches for the network (the machine has none).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
GRABCUT = Path(__file__).resolve().parents[2] / "shared" / "data" / "grabcut" / "images"
TIMEOUT_MS = 60_000


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


@pytest.fixture
def server(tmp_path: Path):
    project = open_project(tmp_path / "project", photos(tmp_path / "src"), None, None)
    service = ModelService(project, "cpu", loader=small_loader)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(project, service), host="127.0.0.1", port=port,
                            log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", project
    instance.should_exit = True
    thread.join(timeout=10)


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
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1180, "height": 640}, accept_downloads=True)
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            page.wait_for_selector("#canvas[data-ready='1']")
            assert "Ready" in page.inner_text("#status")
            assert "Enter" in page.inner_text("#shortcuts")
            # The small test model has random weights: the page must say so beside its masks.
            badge = page.locator("#model-badge.untrained")
            assert "UNTRAINED" in badge.inner_text() and "weights: " in badge.inner_text()

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
        finally:
            browser.close()
    assert [a["image_id"] for a in exported["annotations"]] == [1]
    assert exported["annotations"][0]["segmentation"] == stored[0]["segmentation"]
    assert exported["annotations"][0]["area"] == stored[0]["area"] > 0


def save_screenshot(png: bytes, path: Path) -> None:
    """The page as a 256-colour PNG: a quarter of the size, the same to the eye (octree keeps
    small saturated marks such as the green click point, which median cut greys out)."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
