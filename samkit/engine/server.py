"""The annotation server: a FastAPI app over one project (routes only; the work is done by
:mod:`~samkit.engine.model_service`, :mod:`~samkit.engine.stages`, :mod:`~samkit.engine.db`
and :mod:`~samkit.engine.export`).

Every error is JSON ``{"error": "one clear line"}``: 400 bad input, 404 unknown id, 409 a
clash with the project's state, 413 too large, 415 not an image, 422 malformed request,
503 model busy (with ``Retry-After``). Model work runs in FastAPI's thread pool (plain ``def``
routes), so a long embedding never blocks the event loop or other requests' I/O.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from samkit.engine import export as exporter
from samkit.engine import stages
from samkit.engine.db import Conflict, ImageRow, NewAnnotation
from samkit.engine.model_service import (CLICK_PATIENCE_S, PREVIEW_PATIENCE_S, Busy,
                                         ModelService)
from samkit.engine.project import Project, check_image_name
from samkit.engine.security import (AccessMiddleware, BodyLimitMiddleware,
                                    IsolationMiddleware)
from samkit.engine.stats import format_table, stats_rows
from samkit.engine.web_decoder import FILES, RUNTIME_FILES, WebDecoder
from samkit.errors import SamkitError
from samkit.prompts import Prompts, check_prompts_fit, wants_multimask
from samkit.rle import encode_masks, parse_rle

STATIC_DIR = Path(__file__).resolve().parent / "static"
RUNTIME_DIR = STATIC_DIR / "ort"  # onnxruntime-web, from scripts/get_web_runtime.sh
DEFAULT_MAX_UPLOAD_BYTES = 50 * 1024 * 1024
# JSON bodies (prompts, accepted masks as RLE, settings): a 100 MP mask's RLE is a few MB.
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_POINTS = 64  # more clicks than anyone makes on one object
MAX_TEXT_CHARS = 200  # CLIP reads 77 tokens; a phrase names one object
MAX_SECONDS = 86_400.0
ANNOTATOR_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,63}$"


# ------------------------------------------------------------------------------ request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class PromptIn(_Body):
    """Prompts in image pixels: points ``[x, y, label]`` (1 foreground, 0 background), an
    optional XYXY box, and an optional text phrase (models with a text slot)."""

    points: list[tuple[float, float, Literal[0, 1]]] = Field(default=[], max_length=MAX_POINTS)
    box: tuple[float, float, float, float] | None = None
    text: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)

    @field_validator("text")
    @classmethod
    def _phrase(cls, text: str | None) -> str | None:
        """The phrase as decoded and stored: trimmed; blank is no text."""
        return None if text is None else text.strip() or None


class DecodeIn(PromptIn):
    preview: bool = False  # a hover preview: answered busy at once rather than queued
    multimask: bool | None = None  # default: 3 masks for an ambiguous prompt, else 1


class AcceptIn(_Body):
    segmentation: dict[str, Any]  # COCO RLE, checked by samkit.rle.parse_rle
    prompts: PromptIn | None = None
    score: float | None = None
    seconds: float = Field(ge=0, le=MAX_SECONDS)
    annotator: str = Field(pattern=ANNOTATOR_PATTERN)
    model_version: int | None = None


class ReviewIn(_Body):
    seconds: float | None = Field(default=None, ge=0, le=MAX_SECONDS)
    annotator: str | None = Field(default=None, pattern=ANNOTATOR_PATTERN)


class SettingsIn(_Body):
    stage: Literal[1, 2] | None = None
    prefill_points_per_side: int | None = Field(default=None, ge=2, le=64)
    prefill_iou_thresh: float | None = Field(default=None, ge=0, le=1)
    prefill_stability_thresh: float | None = Field(default=None, ge=0, le=1)


class EverythingIn(_Body):
    """The "segment everything" generator's knobs (default: the official thresholds, and the
    grid of the stage-2 prefill)."""

    points_per_side: int | None = Field(default=None, ge=2, le=64)
    pred_iou_thresh: float = Field(default=0.88, ge=0, le=1)
    stability_score_thresh: float = Field(default=0.95, ge=0, le=1)


class ModelIn(_Body):
    version: int


# ------------------------------------------------------------------------------------ the app
def create_app(project: Project, service: ModelService, *, token: str | None = None,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               prefetch: bool = True, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               browser_decoder: bool = True, runtime_dir: Path = RUNTIME_DIR,
               isolate: bool = True) -> FastAPI:
    """The app for ``project``; ``token`` None means loopback-only without a token (see
    :mod:`samkit.engine.security`); ``prefetch`` starts the background precompute thread;
    ``browser_decoder`` lets the page decode by itself with the onnxruntime-web files in
    ``runtime_dir`` (see :mod:`samkit.engine.web_decoder`); ``isolate`` sends the headers
    that make the page cross-origin isolated, which wasm threads need."""
    app = FastAPI(title="samkit annotate", docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json")
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, exempt=("/api/images",))
    if isolate:
        app.add_middleware(IsolationMiddleware)
    app.add_middleware(AccessMiddleware, token=token)  # outermost: access is checked first

    # Before the /static mount, which would otherwise answer first; only the runtime's files.
    @app.get("/static/ort/{name}", include_in_schema=False)
    def runtime_file(name: str) -> FileResponse:
        if name not in RUNTIME_FILES or not (runtime_dir / name).is_file():
            raise HTTPException(404, f"no browser runtime file {name!r} (run "
                                     "scripts/get_web_runtime.sh)")
        return FileResponse(runtime_dir / name, headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    db = project.db
    prefetcher = stages.Prefetcher(project, service) if prefetch else None
    web = WebDecoder(project, service, runtime_dir, enabled=browser_decoder)
    _add_error_handlers(app)

    def get_image(image_id: int) -> ImageRow:
        image = db.image(image_id)
        if image is None:
            raise HTTPException(404, f"unknown image id {image_id}")
        return image

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/project")
    def project_info() -> dict[str, Any]:
        return {"name": project.root.name, "images": len(db.images()),
                "settings": settings(), "model": service.status(),
                "max_upload_bytes": max_upload_bytes}

    # ----------------------------------------------------------------------------- images
    @app.get("/api/images")
    def list_images() -> list[dict[str, Any]]:
        return db.image_summaries()

    @app.post("/api/images", status_code=201)
    async def upload(request: Request, name: str) -> dict[str, Any]:
        """The request body is the image file; ``name`` its name in the project."""
        check_image_name(name)
        if db.image_by_name(name) is not None:
            raise Conflict(f"the project already has an image named {name!r}")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_upload_bytes:
            raise HTTPException(413, _too_large(max_upload_bytes))
        tmp = project.images_dir / f".upload-{secrets.token_hex(8)}.tmp"
        try:
            size = 0
            with tmp.open("xb") as handle:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > max_upload_bytes:  # a lying or absent Content-Length
                        raise HTTPException(413, _too_large(max_upload_bytes))
                    handle.write(chunk)
            if size == 0:
                raise HTTPException(400, "empty upload: send the image file as the body")
            try:
                image = await run_in_threadpool(project.add_image_file, tmp, name, move=True)
            except Conflict:
                raise
            except SamkitError as err:
                raise HTTPException(415, str(err).replace(str(tmp), name)) from None
        finally:
            tmp.unlink(missing_ok=True)
        return {"id": image.id, "file_name": image.file_name,
                "width": image.width, "height": image.height}

    @app.get("/api/images/{image_id}")
    def image_info(image_id: int) -> dict[str, Any]:
        image = get_image(image_id)
        return {"id": image.id, "file_name": image.file_name, "width": image.width,
                "height": image.height, "embedded": service.has_embedding(image.id)}

    @app.get("/api/images/{image_id}/file")
    def image_file(image_id: int) -> FileResponse:
        return FileResponse(project.image_path(get_image(image_id).file_name))

    @app.post("/api/images/{image_id}/prepare")
    def prepare(image_id: int) -> dict[str, Any]:
        """Embed (and in stage 2 prefill) an image before the first click; then queue the
        following images for the background thread."""
        image = get_image(image_id)
        start = time.perf_counter()
        added = stages.prepare_image(project, service, image)
        if prefetcher is not None:
            prefetcher.after(image.id)
        return {"image_id": image.id, "candidates_added": added,
                "seconds": round(time.perf_counter() - start, 3)}

    @app.post("/api/images/{image_id}/decode")
    def decode(image_id: int, body: DecodeIn) -> dict[str, Any]:
        start = time.perf_counter()
        image = get_image(image_id)
        prompts = to_prompts(body, image)
        multimask = body.multimask if body.multimask is not None else \
            wants_multimask(prompts, single=False)
        patience = PREVIEW_PATIENCE_S if body.preview else CLICK_PATIENCE_S
        result = service.decode(image, prompts, multimask, patience)
        masks = encode_masks(result.masks)
        for mask, score in zip(masks, result.scores.tolist()):
            mask["score"] = score
        return {"image_id": image.id, "model_version": result.version_id, "masks": masks,
                "best": int(np.argmax(result.scores)), "decode_ms": round(result.decode_ms, 3),
                "server_ms": round((time.perf_counter() - start) * 1e3, 3)}

    @app.get("/api/images/{image_id}/embedding")
    def embedding(image_id: int, version: int | None = None) -> Response:
        """The image's embedding for the page's decoder: float16 bytes (little-endian,
        C order); shape and model version in ``X-Samkit-Shape`` / ``X-Samkit-Model-Version``.
        ``version``: the model version the page's graphs are for (409 if not the loaded one)."""
        image = get_image(image_id)
        if version is not None and version != service.version.id:
            raise Conflict(f"model version {version} is not loaded (the server has version "
                           f"{service.version.id}): reload the decoder")
        data, shape, made_by = service.embedding_f16(image, CLICK_PATIENCE_S)
        return Response(data, media_type="application/octet-stream", headers={
            "X-Samkit-Shape": ",".join(map(str, shape)),
            "X-Samkit-Model-Version": str(made_by), "Cache-Control": "no-store"})

    @app.post("/api/images/{image_id}/everything")
    def everything(image_id: int, body: EverythingIn | None = None) -> dict[str, Any]:
        image = get_image(image_id)
        options = (body or EverythingIn()).model_dump(exclude_none=True)
        options.setdefault("points_per_side", int(db.get_setting("prefill_points_per_side")))
        return {"image_id": image.id,
                "candidates_added": stages.segment_everything(project, service, image, options)}

    # ------------------------------------------------------------------------ annotations
    @app.get("/api/images/{image_id}/annotations")
    def list_annotations(image_id: int) -> list[dict[str, Any]]:
        return db.annotations(get_image(image_id).id)

    @app.post("/api/images/{image_id}/annotations", status_code=201)
    def accept(image_id: int, body: AcceptIn) -> dict[str, Any]:
        image = get_image(image_id)
        mask = parse_rle(body.segmentation, image.height, image.width)
        if body.prompts is not None:
            to_prompts(body.prompts, image)  # stored as sent, once known to be valid
        version = body.model_version if body.model_version is not None else service.version.id
        if db.model_version(version) is None:
            raise SamkitError(f"unknown model version {version}")
        item = NewAnnotation(
            image_id=image.id, stage=int(db.get_setting("stage")), status="accepted",
            segmentation=mask["segmentation"], area=mask["area"], bbox=mask["bbox"],
            prompts=None if body.prompts is None else body.prompts.model_dump(
                exclude={"text"} if body.prompts.text is None else None),
            score=body.score, stability=None, annotator=body.annotator, seconds=body.seconds,
            model_version=version,
        )
        created = db.annotation(db.add_annotations([item])[0])
        assert created is not None
        return created

    @app.post("/api/annotations/{annotation_id}/keep")
    def keep(annotation_id: int, body: ReviewIn | None = None) -> dict[str, Any]:
        """Stage 2: the annotator keeps a candidate (``seconds`` = time spent reviewing it)."""
        return reviewed(annotation_id, "keep", body)

    @app.delete("/api/annotations/{annotation_id}")
    def delete(annotation_id: int) -> dict[str, Any]:
        return reviewed(annotation_id, "delete", None)

    @app.post("/api/annotations/{annotation_id}/restore")
    def restore(annotation_id: int) -> dict[str, Any]:
        """Undo a delete."""
        return reviewed(annotation_id, "restore", None)

    def reviewed(annotation_id: int, action: str, body: ReviewIn | None) -> dict[str, Any]:
        body = body or ReviewIn()
        result = db.review(annotation_id, action, annotator=body.annotator, seconds=body.seconds)
        if result is None:
            raise HTTPException(404, f"unknown annotation id {annotation_id}")
        return result

    # ------------------------------------------------------------------ settings and models
    @app.get("/api/settings")
    def settings() -> dict[str, Any]:
        return {key: db.get_setting(key) for key in SettingsIn.model_fields}

    @app.put("/api/settings")
    def update_settings(body: SettingsIn) -> dict[str, Any]:
        db.set_settings(body.model_dump(exclude_none=True))
        return settings()

    @app.get("/api/models")
    def models() -> dict[str, Any]:
        return {"loaded": service.version.id, "trained": service.trained,
                "model": service.version.model, "weights": service.weights,
                "text": service.text_status(),
                "versions": [v.to_json() for v in db.model_versions()]}

    @app.post("/api/models/current")
    def switch_model(body: ModelIn) -> dict[str, Any]:
        version = db.model_version(body.version)
        if version is None:
            raise HTTPException(404, f"unknown model version {body.version}")
        if version.id != service.version.id:
            service.switch(version)
        return models()

    @app.get("/api/decoder")
    def decoder() -> dict[str, Any]:
        """The page's decoder for the loaded version (graph URLs and sha256s), or
        ``available: false`` with the reason; the first call per version starts the export."""
        return web.manifest()

    @app.get("/api/decoder/v{version_id}/{name}")
    def decoder_graph(version_id: int, name: str) -> FileResponse:
        path = web.graph_path(version_id, name)
        if path is None:
            raise HTTPException(404, f"no {name!r} decoder graph for model version "
                                     f"{version_id} (graphs: {', '.join(FILES)})")
        return FileResponse(path, media_type="application/octet-stream",
                            headers={"Cache-Control": "no-cache"})

    # ------------------------------------------------------------------- stats and export
    @app.get("/api/stats")
    def stats() -> dict[str, Any]:
        rows = stats_rows(project)
        return {"rows": rows, "table": format_table(rows)}

    @app.get("/api/export")
    def export(fmt: Annotated[Literal["coco", "sa1b"], Query(alias="format")] = "coco",
               stages_text: Annotated[str, Query(alias="stages")] = "1,2,3") -> Response:
        chosen = exporter.parse_stages(stages_text)
        name = f"{project.root.name}-{fmt}"
        if fmt == "coco":
            return JSONResponse(exporter.coco_document(project, chosen), headers={
                "Content-Disposition": f'attachment; filename="{name}.json"'})
        return Response(exporter.sa1b_zip(project, chosen), media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{name}.zip"'})

    return app


def to_prompts(body: PromptIn, image: ImageRow) -> Prompts:
    """Validated prompts for ``image``; every problem is a one-line :class:`SamkitError`."""
    if not body.points and body.box is None and body.text is None:
        raise SamkitError("no prompt given: send at least one point, a box or a text")
    points = np.array([p[:2] for p in body.points], dtype=np.float64).reshape(-1, 2)
    labels = np.array([p[2] for p in body.points], dtype=np.int64)
    box = None
    if body.box is not None:
        x0, y0, x1, y1 = body.box
        if x1 <= x0 or y1 <= y0:
            raise SamkitError("box must be [x0, y0, x1, y1] with x1 > x0 and y1 > y0")
        box = np.array(body.box, dtype=np.float64)
    prompts = Prompts(points, labels, box, body.text)
    check_prompts_fit(prompts, height=image.height, width=image.width)
    return prompts


def _too_large(limit: int) -> str:
    return f"upload too large: the limit is {limit / 1024 / 1024:.1f} MiB"


def field_name(part: str | int) -> str:
    """A request field's name as an error message shows it: as sent when it is a plain name
    or index, quoted with escapes otherwise (a client's key may hold a newline)."""
    return str(part) if isinstance(part, int) or part.isidentifier() else repr(part)


def _add_error_handlers(app: FastAPI) -> None:
    """Every failure as ``{"error": message}`` with the status that fits it."""

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(SamkitError)
    async def samkit_error(_: Request, err: SamkitError) -> JSONResponse:
        return error(409 if isinstance(err, Conflict) else 400, str(err))

    @app.exception_handler(Busy)
    async def busy(_: Request, err: Busy) -> JSONResponse:
        return error(503, str(err), {"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return error(err.status_code, str(err.detail), getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = [
            "the body is not valid JSON" if e["type"] == "json_invalid" else
            f"{'.'.join(field_name(part) for part in e['loc'] if part != 'body') or 'body'}: "
            f"{e['msg']}"
            for e in err.errors()[:5]
        ]
        return error(422, "invalid request: " + "; ".join(problems))
