"""``samkit annotate`` and ``samkit engine {init,auto,retrain,stats,export}``."""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
from pathlib import Path

from samkit.errors import SamkitError
from samkit.registry import DEFAULT_MODEL, MODEL_CONFIGS


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``samkit annotate`` and ``samkit engine``."""
    from samkit.commands.arguments import BF16_HELP, add_generator_arguments

    annotate = subparsers.add_parser(
        "annotate", help="the data engine's annotation web app (paper §4)",
        description="Serve the annotation web app for PROJECT_DIR, creating the project (and "
        "importing --images) if needed. Open the printed URL in a browser.",
    )
    annotate.add_argument("project", metavar="PROJECT_DIR", type=Path)
    _add_project_arguments(annotate)
    annotate.add_argument("--host", default="127.0.0.1",
                          help="address to bind (default 127.0.0.1; any other address "
                          "requires an access token)")
    annotate.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free port, printed)")
    annotate.add_argument("--token", metavar="T",
                          help="access token (default: generated and printed when --host is "
                          "not loopback)")
    annotate.add_argument("--device", metavar="cpu|cuda",
                          help="default: cuda if available, else cpu")
    annotate.add_argument("--bf16", action="store_true",
                          help=BF16_HELP + "; bf16 embeddings are cached apart from fp32 ones")
    annotate.add_argument("--max-upload-mb", type=float, default=50.0, metavar="MB",
                          help="largest image upload accepted (default 50)")
    annotate.add_argument("--max-body-mb", type=float, default=16.0, metavar="MB",
                          help="largest JSON request body accepted (prompts, masks; default 16)")
    annotate.add_argument("--decoder", choices=("browser", "server"), default="browser",
                          help="where masks are decoded: in the page (default; needs "
                          "scripts/get_web_runtime.sh, else the server does it) or always "
                          "on the server")
    annotate.add_argument("--clip", metavar="DIR",
                          help="CLIP weights for text prompts (a Hugging Face CLIP folder): "
                          "the page shows a text box when the model has a text slot "
                          "(docs/text.md)")
    annotate.set_defaults(func=run_annotate)

    engine = subparsers.add_parser(
        "engine", help="data engine: init, stage-3 auto, retrain, stats, export",
        description="Work on a data-engine project without the web app.",
    )
    commands = engine.add_subparsers(dest="engine_command", metavar="COMMAND", required=True)

    init = commands.add_parser("init", help="create a project / import images, no server")
    init.add_argument("project", metavar="PROJECT_DIR", type=Path)
    _add_project_arguments(init)
    init.set_defaults(func=run_init)

    auto = commands.add_parser(
        "auto", help="stage 3: segment everything in every unannotated image (resumable)")
    auto.add_argument("project", metavar="PROJECT_DIR", type=Path)
    auto.add_argument("--shard", metavar="i/n",
                      help="do only shard i (0-based) of n (default under torchrun: RANK/"
                      "WORLD_SIZE)")
    add_generator_arguments(auto)
    auto.add_argument("--model-version", type=int, metavar="V",
                      help="model version to use (default: the project's current one)")
    auto.add_argument("--device", metavar="cpu|cuda",
                      help="default: cuda if available, else cpu")
    auto.add_argument("--bf16", action="store_true", help=BF16_HELP)
    auto.set_defaults(func=run_auto)

    retrain = commands.add_parser(
        "retrain", help="fine-tune the current model on the accepted masks -> new version")
    retrain.add_argument("project", metavar="PROJECT_DIR", type=Path)
    retrain.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    retrain.add_argument("--config", metavar="FILE", help="samkit train config (YAML)")
    retrain.add_argument("--set", dest="overrides", action="append", default=[],
                         metavar="KEY=VALUE", help="override a train config key (repeatable)")
    retrain.add_argument("--stages", default="1,2,3",
                         help="train on masks of these stages (default 1,2,3)")
    retrain.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    retrain.add_argument("--no-activate", action="store_true",
                         help="register the new version without making it current")
    retrain.set_defaults(func=run_retrain)

    stats = commands.add_parser("stats", help="masks, images and time per stage and model")
    stats.add_argument("project", metavar="PROJECT_DIR", type=Path)
    stats.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    stats.set_defaults(func=run_stats)

    export = commands.add_parser("export", help="accepted masks as SA-1B JSONs or COCO JSON")
    export.add_argument("project", metavar="PROJECT_DIR", type=Path)
    export.add_argument("--format", required=True, choices=("sa1b", "coco"))
    export.add_argument("-o", "--out", required=True, type=Path,
                        help="sa1b: a folder; coco: a .json file")
    export.add_argument("--stages", default="1,2,3",
                        help="export masks of these stages (default 1,2,3)")
    export.set_defaults(func=run_export)


def _add_project_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=Path, metavar="DIR",
                        help="import the images under DIR (hard-linked or copied; new names "
                        "only, so it can be repeated)")
    parser.add_argument("--model", metavar="NAME",
                        help=f"one of {', '.join(MODEL_CONFIGS)} (default: the project's "
                        f"current model, {DEFAULT_MODEL} for a new project)")
    parser.add_argument("--checkpoint", type=Path, metavar="PATH",
                        help="weights for --model (registered as a model version)")


# ------------------------------------------------------------------------------------ commands
def run_init(args: argparse.Namespace) -> int:
    from samkit.engine.project import open_project

    project = open_project(args.project, args.images, args.model, args.checkpoint)
    version = project.db.current_model_version()
    print(f"project {project.root}: {len(project.db.images())} images, model version "
          f"{version.id} ({version.model})")
    return 0


def run_annotate(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from samkit.engine.model_service import ModelService
    from samkit.engine.project import open_project
    from samkit.engine.security import resolve_token
    from samkit.engine.server import create_app
    from samkit.loading import resolve_device, warn_if_untrained

    if not 0 <= args.port <= 65535:
        raise SamkitError(f"--port must be 0-65535, got {args.port}")
    if args.max_upload_mb <= 0 or args.max_body_mb <= 0:
        raise SamkitError("--max-upload-mb and --max-body-mb must be positive")
    token, generated = resolve_token(args.host, args.token)
    device = resolve_device(args.device)
    # Bound before the model loads, so a busy port fails at once and --port 0 can print the
    # port the system picked; uvicorn serves on this very socket (no window for a race).
    listener = bind_listener(args.host, args.port)
    port = listener.getsockname()[1]
    clip = None
    if args.clip is not None:  # before the project: a bad --clip leaves no new project behind
        from samkit.clip import load_clip

        clip = load_clip(args.clip, device=device)
    project = open_project(args.project, args.images, args.model, args.checkpoint)
    service = ModelService(project, device,
                           encoder_dtype=torch.bfloat16 if args.bf16 else None, clip=clip)
    warn_if_untrained(f"model version {service.version.id} ({service.version.model})",
                      service.trained, fix="until it is trained")
    app = create_app(project, service, token=token,
                     max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                     max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                     browser_decoder=args.decoder == "browser")
    shown_host = "<this machine's address>" if args.host in ("0.0.0.0", "::") else args.host
    shown_host = f"[{shown_host}]" if ":" in shown_host else shown_host
    url = f"http://{shown_host}:{port}/" + (f"?token={token}" if token else "")
    print(f"samkit annotate: {project.root} ({len(project.db.images())} images, model version "
          f"{service.version.id} on {device})\n  open {url}"
          + ("\n  (access token generated for this run)" if generated else ""), flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[listener])
    return 0


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port`` 0: a free one the system picks).

    A port another program holds is a :class:`SamkitError`: the URL samkit would print
    would open that program instead.
    """
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as err:
        raise SamkitError(f"--host {host}: {err.strerror}") from None
    listener = socket.socket(family, socket.SOCK_STREAM)
    if os.name != "nt":  # as uvicorn does: a restart may reuse a port in TIME_WAIT
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
        listener.listen(128)
    except OSError as err:
        listener.close()
        if err.errno == errno.EADDRINUSE:
            raise SamkitError(f"port {port} on {host} is in use by another program; choose "
                              "another with --port, or --port 0 for a free one") from None
        raise SamkitError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return listener


def run_auto(args: argparse.Namespace) -> int:
    from samkit.commands.arguments import generator_filters
    from samkit.engine.project import Project
    from samkit.engine.stages import run_auto as auto
    from samkit.everything import GeneratorSpec, resolve_shard

    project = Project.open(args.project)
    db = project.db
    version = db.current_model_version() if args.model_version is None \
        else db.model_version(args.model_version)
    if version is None:
        raise SamkitError(f"unknown model version {args.model_version}")
    shard = resolve_shard(args.shard, os.environ)
    filters = generator_filters(args, version.model)
    spec = GeneratorSpec(
        model=version.model, checkpoint=project.checkpoint_path(version), device=args.device,
        points_per_side=args.points_per_side, pred_iou_thresh=filters.pred_iou_thresh,
        stability_score_thresh=filters.stability_score_thresh, crop_n_layers=args.crop_n_layers,
        min_mask_region_area=args.min_mask_region_area, bf16=args.bf16,
    )
    summary = auto(project, version, shard, spec)
    print(f"engine auto {shard[0]}/{shard[1]}: {summary}")
    return 1 if summary.failed else 0


def run_retrain(args: argparse.Namespace) -> int:
    from samkit.engine.export import parse_stages
    from samkit.engine.project import Project
    from samkit.engine.retrain import retrain

    project = Project.open(args.project)
    version = retrain(project, args.steps, config=args.config, overrides=args.overrides,
                      stages=parse_stages(args.stages), device=args.device,
                      activate=not args.no_activate)
    state = "now current" if not args.no_activate else "not activated"
    print(f"engine retrain: model version {version.id} ({version.checkpoint}), {state}; a "
          "running `samkit annotate` can switch to it in its model selector")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from samkit.engine.project import Project
    from samkit.engine.stats import format_table, stats_rows

    rows = stats_rows(Project.open(args.project))
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


def run_export(args: argparse.Namespace) -> int:
    from samkit.engine.export import export, parse_stages
    from samkit.engine.project import Project

    project = Project.open(args.project)
    images, masks = export(project, args.format, args.out, parse_stages(args.stages))
    print(f"engine export: {masks} masks on {images} images -> {args.out}")
    return 0
