#!/usr/bin/env bash
# The annotation page's browser decoder: onnxruntime-web from the npm registry, at the version
# pinned in samkit/engine/web/package-lock.json (`npm ci`: exactly the lock, integrity
# checked). Copies the three files the page loads (the wasm-only runtime, its wasm binary and
# the module that loads it) into samkit/engine/static/ort/, which `samkit annotate` serves
# and git ignores. Without them the page decodes on the server (docs/engine.md).
#
# Usage: bash scripts/get_web_runtime.sh     (needs node + npm; nothing else is downloaded)
set -euo pipefail
cd "$(dirname "$0")/.."
WEB=samkit/engine/web
OUT=samkit/engine/static/ort
FILES=(ort.wasm.min.js ort-wasm-simd-threaded.wasm ort-wasm-simd-threaded.mjs)

if ! command -v npm >/dev/null 2>&1; then
  echo "get_web_runtime.sh: npm not found (Debian: apt-get install -y nodejs npm)" >&2
  exit 1
fi
# --ignore-scripts: the page needs only files from the package; no install script runs.
(cd "$WEB" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
mkdir -p "$OUT"
for name in "${FILES[@]}"; do
  cp "$WEB/node_modules/onnxruntime-web/dist/$name" "$OUT/$name"
done
version=$(node -p "require('./$WEB/node_modules/onnxruntime-web/package.json').version")
echo "$version" > "$OUT/VERSION"
echo "onnxruntime-web $version -> $OUT/ ($(du -sh "$OUT" | cut -f1))"
