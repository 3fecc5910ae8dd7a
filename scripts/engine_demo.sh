#!/usr/bin/env bash
# The data engine end to end (paper §4) on 6 GrabCut images from ../shared/data:
#   create a project -> stage 1 (scripted clicks through the HTTP API) -> stage 2 (prefilled
#   candidates, kept or deleted against the ground truth, missing object clicked) -> stage 3
#   (`samkit engine auto`) -> a short retrain -> switch the running server to the new model
#   -> stats table -> exports, checked with pycocotools.
#
# Usage: scripts/engine_demo.sh   (env: WORK=dir PORT=8765 STEPS=3 DEVICE=cpu THRESH=0)
# Needs: pip install -e ".[engine]"; about 3 minutes on 2 CPU cores.
#
# The "annotator" is a script: it clicks where the paper's click simulator would (the
# interior point of the object, then of the largest error region) and is credited 2 s per
# click + 1 s per accept, so the stats table's times are simulated, not measured on people.
# Without trained weights (samkit-tiny until they ship) the masks are random and no real
# quality threshold passes them: the demo checks the plumbing, with the stage-2/3 predicted-IoU
# and stability thresholds at THRESH (default 0). With trained weights try THRESH=0.9.
set -euo pipefail
cd "$(dirname "$0")/.."

SOURCE=${SOURCE:-../shared/data/grabcut}
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/samkit-engine-demo.XXXXXX")}
PORT=${PORT:-8765}
STEPS=${STEPS:-3}
THRESH=${THRESH:-0}
DEVICE=${DEVICE:-cpu}
PYTHON=${PYTHON:-python}
[ -d "$SOURCE/images" ] || { echo "no GrabCut data at $SOURCE (needs ../shared)" >&2; exit 1; }

echo "== work folder: $WORK"
mkdir -p "$WORK/images" "$WORK/gt"
for name in $(ls "$SOURCE/images" | grep '\.jpg$' | head -6); do
  cp "$SOURCE/images/$name" "$WORK/images/"
  cp "$SOURCE/masks/${name%.jpg}.png" "$WORK/gt/"
done

echo "== create the project"
$PYTHON -m samkit.cli engine init "$WORK/project" --images "$WORK/images"

echo "== start the annotation server on 127.0.0.1:$PORT"
$PYTHON -m samkit.cli annotate "$WORK/project" --port "$PORT" --device "$DEVICE" \
  >"$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT

# The scripted annotator (stdlib HTTP client; numpy, OpenCV and pycocotools from samkit's deps).
$PYTHON - "$PORT" "$WORK" "$THRESH" <<'PY'
import json, sys, time, urllib.request
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

port, work, thresh = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
SECONDS_PER_CLICK, SECONDS_PER_ACCEPT = 2.0, 1.0


def api(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


for _ in range(600):  # the server imports torch and builds the model first
    try:
        api("GET", "/api/project")
        break
    except OSError:
        time.sleep(0.5)
else:
    sys.exit(f"server did not start:\n{(work / 'server.log').read_text()}")


def ground_truth(image):
    ids = np.asarray(Image.open(work / "gt" / (Path(image["file_name"]).stem + ".png")))
    return ids == 255, ids != 128  # object, pixels that count (128 = unlabeled band)


def iou(mask, gt, valid):
    inter = np.logical_and(mask, gt)[valid].sum()
    union = np.logical_or(mask, gt)[valid].sum()
    return inter / max(union, 1)


def interior_point(region):
    """The pixel farthest from the region's border (the paper's click simulator)."""
    distance = cv2.distanceTransform(np.pad(region, 1).astype(np.uint8), cv2.DIST_L2, 5)
    y, x = np.unravel_index(np.argmax(distance[1:-1, 1:-1]), region.shape)
    return [float(x), float(y)]


def annotate_object(image, gt, valid, max_clicks=3):
    """Click until IoU >= 0.9 or max_clicks; accept the best mask seen."""
    points, best = [], None
    for _ in range(max_clicks):
        if best is None:
            points.append(interior_point(gt) + [1])
        else:
            missed, extra = gt & ~best["mask"] & valid, best["mask"] & ~gt & valid
            region, label = (missed, 1) if missed.sum() >= extra.sum() else (extra, 0)
            points.append(interior_point(region) + [label])
        result = api("POST", f"/api/images/{image['id']}/decode", {"points": points})
        for m in result["masks"]:
            mask = mask_utils.decode(m["segmentation"]).astype(bool)
            score = iou(mask, gt, valid)
            if best is None or score > best["iou"]:
                best = {"iou": score, "mask": mask, "record": m, "points": list(points),
                        "version": result["model_version"]}
        if best["iou"] >= 0.9:
            break
    seconds = SECONDS_PER_CLICK * len(best["points"]) + SECONDS_PER_ACCEPT
    api("POST", f"/api/images/{image['id']}/annotations", {
        "segmentation": best["record"]["segmentation"], "score": best["record"]["score"],
        "prompts": {"points": best["points"], "box": None}, "seconds": seconds,
        "annotator": "demo-script", "model_version": best["version"]})
    return best["iou"], len(best["points"])


images = api("GET", "/api/images")
print("== stage 1: assisted-manual annotation of images 1-3 (scripted clicks)")
for image in images[:3]:
    api("POST", f"/api/images/{image['id']}/prepare")
    gt, valid = ground_truth(image)
    score, clicks = annotate_object(image, gt, valid)
    print(f"   {image['file_name']}: accepted after {clicks} click(s), IoU {score:.2f} vs GT")

print("== stage 2: semi-automatic on images 4-5 (prefilled candidates, then clicks)")
api("PUT", "/api/settings", {"stage": 2, "prefill_points_per_side": 8,
                             "prefill_iou_thresh": thresh, "prefill_stability_thresh": thresh})
for image in images[3:5]:
    added = api("POST", f"/api/images/{image['id']}/prepare")["candidates_added"]
    gt, valid = ground_truth(image)
    kept = 0
    for candidate in api("GET", f"/api/images/{image['id']}/annotations"):
        mask = mask_utils.decode(candidate["segmentation"]).astype(bool)
        if iou(mask, gt, valid) >= 0.5:  # the reviewer keeps what matches an object
            api("POST", f"/api/annotations/{candidate['id']}/keep",
                {"seconds": SECONDS_PER_ACCEPT, "annotator": "demo-script"})
            kept += 1
        else:
            api("DELETE", f"/api/annotations/{candidate['id']}")
    line = f"   {image['file_name']}: {added} candidates, {kept} kept"
    if kept == 0:  # the object was missed: click it
        score, clicks = annotate_object(image, gt, valid)
        line += f", object added with {clicks} click(s) (IoU {score:.2f})"
    print(line)
PY

echo "== stage 3: segment everything in the images nobody annotated"
$PYTHON -m samkit.cli engine auto "$WORK/project" --points-per-side 8 \
  --pred-iou-thresh "$THRESH" --stability-score-thresh "$THRESH" --device "$DEVICE"
echo "== resume check: a second run has nothing left to do"
$PYTHON -m samkit.cli engine auto "$WORK/project" --points-per-side 8 --device "$DEVICE"

echo "== retrain on the accepted masks ($STEPS steps)"
$PYTHON -m samkit.cli engine retrain "$WORK/project" --steps "$STEPS" --stages 1,2 \
  --set num_workers=0 --set log_interval=1 --device "$DEVICE"

echo "== switch the running server to the new model version and click once with it"
$PYTHON - "$PORT" <<'PY'
import json, sys, urllib.request

port = sys.argv[1]


def api(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


newest = api("GET", "/api/models")["versions"][-1]
api("POST", "/api/models/current", {"version": newest["id"]})
api("POST", "/api/images/1/prepare")
result = api("POST", "/api/images/1/decode", {"points": [[100, 100, 1]]})
note = newest["note"]
print(f"   decoded with model version {result['model_version']} (retrained {note['steps']} "
      f"steps on {note['masks']} masks, final loss {note['loss']:.3f})")
PY

echo "== stats"
$PYTHON -m samkit.cli engine stats "$WORK/project"

echo "== export (SA-1B folder + COCO JSON), loaded back with pycocotools / samkit train's reader"
$PYTHON -m samkit.cli engine export "$WORK/project" --format sa1b -o "$WORK/export-sa1b"
$PYTHON -m samkit.cli engine export "$WORK/project" --format coco -o "$WORK/export-coco.json"
$PYTHON - "$WORK" <<'PY'
import contextlib, io, sys
from pathlib import Path

from pycocotools.coco import COCO

from samkit.train.data import open_source

work = Path(sys.argv[1])
with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO(str(work / "export-coco.json"))
print(f"   COCO: {len(coco.getImgIds())} images, {len(coco.getAnnIds())} masks")
for spec in (str(work / "export-sa1b"), f"coco:{work / 'export-coco.json'}:{work / 'project/images'}"):
    source = open_source(spec)
    image, masks = source.load(0)
    print(f"   samkit train reads {spec.split(':')[0] if ':' in spec else 'sa1b'}: "
          f"{len(source)} images, first {image.shape[1]}x{image.shape[0]} with {len(masks)} masks")
PY
echo "== done: project in $WORK/project (open it with: samkit annotate $WORK/project)"
