"""Official SAM checkpoints: a registry, a local cache and a resumable, verifying downloader.

The registry pins every file by SHA-256 and size. The values were taken from public sources and
cross-checked between independent projects that hash the files they download:

* ``vit_h`` ``sam_vit_h_4b8939.pth``: sha256 ``a7bf3b02…c26f262e``, 2,564,550,879 bytes.
* ``vit_l`` ``sam_vit_l_0b3195.pth``: sha256 ``3adcc431…2a49a622``, 1,249,524,607 bytes.
* ``vit_b`` ``sam_vit_b_01ec64.pth``: sha256 ``ec2df627…1eb8c912``, 375,042,383 bytes.
* ``vit_t`` ``mobile_sam.pt`` (MobileSAM, TinyViT encoder): sha256 ``6dbb9052…e37d6c2f``,
  40,728,226 bytes, as published at MobileSAM commit ``f706ad9c``.

The hex suffix in the SAM file names is *not* a prefix of the file's SHA-256, so it cannot be used
as a check. An entry whose ``sha256`` is ``None`` would still be downloaded, but never recorded as
verified: :func:`fetch` warns every time it hands such a file out.

Downloads go to ``<filename>.part`` and are resumed with an HTTP ``Range`` request, hashed while
streaming, and moved into place atomically only once the hash matches, so a file under its final
name is always complete. A ``<filename>.sha256`` sidecar remembers a successful verification
(together with the file's size and mtime) so multi-GB checkpoints are not re-hashed on every use.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from samkit.errors import SamkitError

# Per-socket-operation timeout: applies to connecting and to every read, so a stalled server
# fails in bounded time without capping how long a slow but live multi-GB download may take.
TIMEOUT_S = 30.0
CHUNK_BYTES = 1 << 20
USER_AGENT = "samkit-weights/1"

_SAM_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything"


@dataclass(frozen=True)
class OfficialWeights:
    """One published checkpoint file and the facts needed to download and verify it."""

    name: str
    model_type: str
    filename: str
    url: str
    sha256: str | None
    size_bytes: int | None


REGISTRY: dict[str, OfficialWeights] = {
    w.name: w
    for w in (
        OfficialWeights(
            name="vit_h",
            model_type="vit_h",
            filename="sam_vit_h_4b8939.pth",
            url=f"{_SAM_BASE_URL}/sam_vit_h_4b8939.pth",
            sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            size_bytes=2_564_550_879,
        ),
        OfficialWeights(
            name="vit_l",
            model_type="vit_l",
            filename="sam_vit_l_0b3195.pth",
            url=f"{_SAM_BASE_URL}/sam_vit_l_0b3195.pth",
            sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
            size_bytes=1_249_524_607,
        ),
        OfficialWeights(
            name="vit_b",
            model_type="vit_b",
            filename="sam_vit_b_01ec64.pth",
            url=f"{_SAM_BASE_URL}/sam_vit_b_01ec64.pth",
            sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            size_bytes=375_042_383,
        ),
        OfficialWeights(
            name="vit_t",
            model_type="vit_t",
            filename="mobile_sam.pt",
            url="https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
            sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
            size_bytes=40_728_226,
        ),
    )
}


# --- CLIP (text prompts, docs/text.md) ----------------------------------------------------
# The Hugging Face hub copies of OpenAI's CLIPs, in the layout samkit.clip.load_clip reads.
# No sha256 is pinned: none could be computed on the machines samkit was built on (no
# internet), and samkit never pins a hash it has not computed. Downloads are therefore
# reported as unverified (as for any entry without one); fill CLIP_SHA256 from files you
# trust to make them verified, or check them with `sha256sum` against the hub's LFS pointers.
HF_BASE_URL = "https://huggingface.co"
CLIP_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "vocab.json", "merges.txt", "special_tokens_map.json")
CLIP_SHA256: dict[tuple[str, str], str] = {}  # (name, file) -> sha256, none known yet


@dataclass(frozen=True)
class OfficialClip:
    """A CLIP on the Hugging Face hub: its files under ``<repo>/resolve/<revision>/``."""

    name: str  # samkit's name, also the cache folder: clip-vit-large-patch14-336
    repo: str  # openai/clip-vit-large-patch14-336
    description: str
    revision: str = "main"
    files: tuple[str, ...] = CLIP_FILES

    def file_spec(self, filename: str, base_url: str = HF_BASE_URL) -> OfficialWeights:
        url = f"{base_url.rstrip('/')}/{self.repo}/resolve/{self.revision}/{filename}"
        return OfficialWeights(f"{self.name}/{filename}", "clip", filename, url,
                               CLIP_SHA256.get((self.name, filename)), None)


CLIP_REGISTRY: dict[str, OfficialClip] = {
    c.name: c
    for c in (
        OfficialClip("clip-vit-base-patch32", "openai/clip-vit-base-patch32",
                     "CLIP ViT-B/32 (512-d), the small one"),
        OfficialClip("clip-vit-large-patch14", "openai/clip-vit-large-patch14",
                     "CLIP ViT-L/14 (768-d)"),
        OfficialClip("clip-vit-large-patch14-336", "openai/clip-vit-large-patch14-336",
                     "CLIP ViT-L/14@336px (768-d), what the paper used (App. D.5)"),
    )
}


def clip_folder(name: str, cache: Path | None = None) -> Path:
    """Where ``samkit weights fetch <clip name>`` puts a CLIP: ``<cache>/clip/<name>/``."""
    if name not in CLIP_REGISTRY:
        raise SamkitError(f"unknown CLIP {name!r}; valid names: {', '.join(sorted(CLIP_REGISTRY))}")
    return Path(cache if cache is not None else cache_dir()) / "clip" / name


def fetch_clip(name: str, *, cache: Path | None = None, base_url: str | None = None,
               progress: bool = True) -> Path:
    """Download (resuming, verifying what can be) a hub CLIP into :func:`clip_folder`;
    returns the folder, ready for ``samkit.clip.load_clip`` / ``--clip``. ``base_url``
    replaces ``https://huggingface.co`` (a mirror with the same ``<repo>/resolve/`` paths)."""
    folder = clip_folder(name, cache)
    folder.mkdir(parents=True, exist_ok=True)
    spec = CLIP_REGISTRY[name]
    for filename in spec.files:
        file_spec = spec.file_spec(filename, base_url or HF_BASE_URL)
        _fetch_file(file_spec, folder / filename, file_spec.url, progress)
    return folder


def official_weights(name: str) -> OfficialWeights:
    """Return the registry entry for ``name`` or raise a :class:`SamkitError` naming the valid ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        valid = ", ".join(sorted(REGISTRY))
        raise SamkitError(f"unknown weights {name!r}; valid names: {valid}") from None


def cache_dir() -> Path:
    """Where checkpoints live.

    ``$SAMKIT_CACHE`` if set, else ``$XDG_CACHE_HOME/samkit``, else ``~/.cache/samkit``.
    """
    explicit = os.environ.get("SAMKIT_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "samkit"


def cached_path(name: str, cache: Path | None = None) -> Path:
    """The path ``name`` has (or would have) in the cache; it may not exist yet."""
    return Path(cache if cache is not None else cache_dir()) / official_weights(name).filename


def fetch(name: str, *, cache: Path | None = None, url: str | None = None, progress: bool = True) -> Path:
    """Return the local path of checkpoint ``name``, downloading and verifying it if needed.

    ``url`` overrides the registry URL (a mirror); the file must still match the registry hash.
    Raises :class:`SamkitError` on an unknown name, a network failure (the ``.part`` file is
    kept so the next call resumes) or a hash mismatch (the bad download is deleted).
    """
    spec = official_weights(name)
    return _fetch_file(spec, cached_path(name, cache), url or spec.url, progress)


def _fetch_file(spec: OfficialWeights, target: Path, url: str, progress: bool) -> Path:
    """The cached, verified ``target`` of ``spec``, downloaded from ``url`` if needed."""
    if target.exists():
        if spec.sha256 is None:
            _warn_unverified(spec, target)
            return target
        if _is_verified(target, spec.sha256):
            return target
        _warn(f"cached {target} does not match its published sha256; downloading it again")
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    digest = _download(url, part, progress=progress)
    _accept(spec, part, target, digest)
    return target


def _accept(spec: OfficialWeights, part: Path, target: Path, digest: str) -> None:
    """Move a finished download into place if its hash is right; otherwise delete it."""
    if spec.sha256 is not None and digest != spec.sha256:
        part.unlink(missing_ok=True)
        raise SamkitError(
            f"sha256 mismatch for {spec.filename}: expected {spec.sha256}, got {digest}; "
            "the download was deleted"
        )
    os.replace(part, target)
    if spec.sha256 is None:
        _warn_unverified(spec, target)
    else:
        _write_sidecar(target, digest)


def _warn(message: str) -> None:
    print(f"samkit: warning: {message}", file=sys.stderr)


def _warn_unverified(spec: OfficialWeights, path: Path) -> None:
    _warn(f"no published sha256 for {spec.name}; {path} could not be verified")


# --- verification cache -------------------------------------------------------------------


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _stamp(path: Path) -> dict[str, int]:
    """Size and mtime: cheap evidence that a file has not changed since it was hashed."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _write_sidecar(path: Path, digest: str) -> None:
    _sidecar(path).write_text(json.dumps({"sha256": digest, **_stamp(path)}))


def _is_verified(path: Path, expected: str) -> bool:
    """True if ``path`` hashes to ``expected``, trusting a sidecar whose stamp still matches."""
    try:
        record = json.loads(_sidecar(path).read_text())
        if record == {"sha256": expected, **_stamp(path)}:
            return True
    except (OSError, ValueError):
        pass  # No or unreadable sidecar: fall back to hashing the file.
    if _sha256_file(path) != expected:
        _sidecar(path).unlink(missing_ok=True)
        return False
    _write_sidecar(path, expected)
    return True


def _sha256_file(path: Path) -> str:
    return _hash_into(hashlib.sha256(), path).hexdigest()


def _hash_into(hasher: hashlib._Hash, path: Path) -> hashlib._Hash:
    with path.open("rb") as handle:
        while block := handle.read(CHUNK_BYTES):
            hasher.update(block)
    return hasher


# --- download -----------------------------------------------------------------------------

_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


def _download(url: str, part: Path, *, progress: bool) -> str:
    """Complete ``part`` from ``url`` (resuming what is there) and return its sha256 hex digest."""
    try:
        try:
            return _download_once(url, part, progress=progress)
        except urllib.error.HTTPError as err:
            if err.code != 416 or not part.exists():
                raise
            # 416: the server cannot serve our Range, so the .part is no prefix of the file as
            # served now (it is complete or the file changed upstream); start over from zero.
            part.unlink()
            return _download_once(url, part, progress=progress)
    except _NETWORK_ERRORS as err:
        raise _network_error(url, err, part) from None


def _network_error(url: str, err: BaseException, part: Path) -> SamkitError:
    reason: object = err
    if isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError):
        reason = err.reason  # Unwrap "<urlopen error ...>" to the underlying cause.
    kept = " (partial download kept; run again to resume)" if part.exists() else ""
    return SamkitError(" ".join(f"could not download {url}: {reason}{kept}".split()))


def _download_once(url: str, part: Path, *, progress: bool) -> str:
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        resumed = offset > 0 and response.status == 206
        if resumed and _content_range_start(response) != offset:
            part.unlink()
            raise SamkitError(f"{url} answered with the wrong byte range; run again to restart")
        # A server that ignores Range answers 200 with the whole file: restart from zero.
        start = offset if resumed else 0
        hasher = _hash_into(hashlib.sha256(), part) if resumed else hashlib.sha256()
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        with part.open("ab" if resumed else "wb") as sink:
            received = _stream(response, sink, hasher, start, total, part.name, progress)
    if total is not None and received < total:
        # http.client reports a connection closed early as a short read, not an exception.
        raise SamkitError(
            f"download of {url} stopped after {received} of {total} bytes "
            "(partial download kept; run again to resume)"
        )
    return hasher.hexdigest()


def _content_range_start(response: http.client.HTTPResponse) -> int | None:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _stream(
    response: http.client.HTTPResponse,
    sink: BinaryIO,
    hasher: hashlib._Hash,
    start: int,
    total: int | None,
    label: str,
    progress: bool,
) -> int:
    """Copy the response body to ``sink`` while hashing; return the file's size so far."""
    received = start
    with tqdm(
        total=total,
        initial=start,
        desc=label,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not progress,
    ) as bar:
        while block := response.read(CHUNK_BYTES):
            sink.write(block)
            hasher.update(block)
            received += len(block)
            bar.update(len(block))
    return received


def default_model_status() -> str:
    """The default model and whether this install has its bundled weights."""
    from samkit.build import BUNDLED_WEIGHTS_DIR
    from samkit.registry import DEFAULT_MODEL, get_config

    bundled = get_config(DEFAULT_MODEL).bundled_weights
    path = BUNDLED_WEIGHTS_DIR / bundled if bundled else None
    if path is not None and path.is_file():
        return f"{DEFAULT_MODEL}, trained: bundled {path.name} ({human_size(path.stat().st_size)})"
    return f"{DEFAULT_MODEL}, UNTRAINED: no bundled weights in this install (random weights)"


def human_size(size: int | None) -> str:
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
