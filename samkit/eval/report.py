"""Writing a run's results: ``OUT.json`` (every number and setting), ``OUT.md`` (tables) and
``OUT.<dataset>.png`` plots (matplotlib, headless)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from samkit.io import write_bytes_atomic

Row = Callable[[dict[str, Any]], list[str]]

# Per protocol: the table's column names and how to read them off one method's metrics.
TABLES: dict[str, tuple[list[str], Row]] = {
    "points": (
        ["objects", "mIoU@1", "@2", "@3", "@5", "@9", "oracle@1", "box mIoU", "NoC@85",
         "NoC@90", "obj/s"],
        lambda m: [
            str(m.get("objects", 0)),
            *(_num(m.get("miou", {}).get(k)) for k in ("1", "2", "3", "5", "9")),
            _num(m.get("oracle_miou_1")),
            _num(m.get("box_miou")),
            _num(m.get("noc", {}).get("85"), 2),
            _num(m.get("noc", {}).get("90"), 2),
            _num(m.get("objects_per_s"), 2),
        ],
    ),
    "edges": (
        ["images", "ODS", "OIS", "AP", "R50"],
        lambda m: [str(m.get("images", 0)), *(_num(m.get(k)) for k in ("ods", "ois", "ap", "r50"))],
    ),
    "proposals": (
        ["images", "AR@10", "AR@100", "AR@1000", "AR_S@1000", "AR_M@1000", "AR_L@1000"],
        lambda m: [str(m.get("images", 0)), *(_num(m.get(k)) for k in (
            "AR@10", "AR@100", "AR@1000", "AR_small@1000", "AR_medium@1000", "AR_large@1000"))],
    ),
    "instances": (
        ["images", "masks", "AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L"],
        lambda m: [str(m.get("images", 0)), str(m.get("masks", 0)), *(_num(m.get(k)) for k in (
            "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large"))],
    ),
    "text": (
        ["phrases", "text mIoU", "instances", "text + point mIoU", "point mIoU"],
        lambda m: [str(m.get("text_prompts", 0)), _num(m.get("text_miou")),
                   str(m.get("text_point_prompts", 0)), _num(m.get("text_point_miou")),
                   _num(m.get("point_miou"))],
    ),
}


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def output_paths(json_path: Path) -> tuple[Path, Path]:
    """``OUT.md`` and the stem ``OUT`` the plots are named after."""
    return json_path.with_suffix(".md"), json_path.with_suffix("")


def write_report(json_path: Path, document: dict[str, Any]) -> list[Path]:
    """Write the plots, the Markdown and the JSON (last, so its presence means a finished
    run); returns every path written."""
    md_path, stem = output_paths(json_path)
    plots = [plot_dataset(document["protocol"], ds, Path(f"{stem}.{ds['name']}.png"),
                          model=document.get("model"), baselines=document.get("baselines", ()))
             for ds in document["datasets"] if ds.get("methods")]
    document["outputs"] = {"markdown": md_path.name, "plots": [p.name for p in plots]}
    write_bytes_atomic(md_path, markdown(document).encode())
    text = json.dumps(document, indent=1, default=_json_scalar)
    write_bytes_atomic(json_path, (text + "\n").encode())
    return [json_path, md_path, *plots]


def _json_scalar(value: Any) -> Any:
    """numpy scalars (from metric arithmetic) as plain Python numbers."""
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def markdown(document: dict[str, Any]) -> str:
    """A Markdown summary: what ran, one table per dataset, and the skipped items."""
    model = document["model"]
    lines = [f"# samkit eval {document['protocol']} ({document['paper']})", ""]
    if model is not None:
        trained = ("trained" if model["trained"]
                   else "**UNTRAINED — RANDOM WEIGHTS, numbers mean nothing**")
        lines += [f"Model: `{model['name']}` ({trained}), checkpoint `{model['checkpoint']}`", ""]
    lines += [f"Command: `{document['command']}`", "",
              f"Runtime: {document['runtime_s']:.1f} s, seed {document['seed']}", ""]
    columns, row = TABLES[document["protocol"]]
    for ds in document["datasets"]:
        lines += [f"## {ds['name']} (`{ds['path']}`)", ""]
        if not ds.get("methods"):
            lines += ["Not evaluated: " + ds.get("error", "no items"), ""]
            continue
        lines += ["| method | " + " | ".join(columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for name, metrics in ds["methods"].items():
            lines.append(f"| {name} | " + " | ".join(row(metrics)) + " |")
        lines.append("")
        if ds["errors"]:
            lines.append(f"{len(ds['errors'])} item(s) skipped (see the JSON for reasons).")
            lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- plots
def plot_dataset(protocol: str, dataset: dict[str, Any], path: Path, *,
                 model: dict[str, Any] | None = None, baselines: Sequence[str] = ()) -> Path:
    """One PNG per dataset: the protocol's curve for every method. ``model`` (the eval
    document's model record) names the model's weights in the legend of its curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=110)
    methods = {legend_label(name, model, baselines): metrics
               for name, metrics in dataset["methods"].items()}
    PLOTTERS[protocol](ax, methods)
    ax.set_title(f"{protocol}: {dataset['name']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def legend_label(method: str, model: dict[str, Any] | None, baselines: Sequence[str]) -> str:
    """A method's legend entry: a model's curve says whether it is trained and on what."""
    if model is None or method in baselines:
        return method
    if not model.get("trained"):
        return f"{method} (UNTRAINED: {model.get('weights', 'random weights')})"
    return f"{method} ({model.get('weights', 'trained')})"


def _plot_points(ax: Any, methods: dict[str, Any]) -> None:
    for name, m in methods.items():
        curve = m.get("miou_curve", [])
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=name)
    ax.set(xlabel="number of clicks", ylabel="mIoU", ylim=(0, 1))
    ax.xaxis.get_major_locator().set_params(integer=True)


def _plot_edges(ax: Any, methods: dict[str, Any]) -> None:
    import numpy as np

    r = np.linspace(0.01, 1, 100)
    for f in np.arange(0.1, 1.0, 0.1):  # iso-F curves, as in BSDS plots
        p = f * r / (2 * r - f)
        ok = (p > 0) & (p <= 1)
        ax.plot(r[ok], p[ok], color="0.85", lw=0.6)
    for name, m in methods.items():
        pr = m.get("pr_curve")
        if pr:
            ax.plot(pr["recall"], pr["precision"], label=f"{name} (ODS {m['ods']:.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1))


def _plot_proposals(ax: Any, methods: dict[str, Any]) -> None:
    for name, m in methods.items():
        dets = [int(k.split("@")[1]) for k in m if k.startswith("AR@")]
        ax.plot(dets, [m[f"AR@{d}"] or 0.0 for d in dets], marker="o", label=name)
    ax.set(xscale="log", xlabel="number of proposals", ylabel="average recall", ylim=(0, 1))


def _plot_instances(ax: Any, methods: dict[str, Any]) -> None:
    for name, m in methods.items():
        pr = m["pr_curve"]
        ax.plot(pr["recall"], pr["precision"], label=f"{name} (AP {m['AP'] or 0:.3f})")
    ax.set(xlabel="recall", ylabel="precision (mean over IoU .50:.95)", xlim=(0, 1), ylim=(0, 1))


def _plot_text(ax: Any, methods: dict[str, Any]) -> None:
    kinds = [("text_miou", "text"), ("text_point_miou", "text + point"), ("point_miou", "point")]
    width = 0.8 / max(len(methods), 1)
    for i, (name, m) in enumerate(methods.items()):
        xs = [k + i * width for k in range(len(kinds))]
        ax.bar(xs, [m.get(key) or 0.0 for key, _ in kinds], width=width, label=name)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(kinds))], [label for _, label in kinds])
    ax.set(ylabel="mIoU", ylim=(0, 1))


PLOTTERS: dict[str, Callable[[Any, dict[str, Any]], None]] = {
    "points": _plot_points,
    "edges": _plot_edges,
    "proposals": _plot_proposals,
    "instances": _plot_instances,
    "text": _plot_text,
}
