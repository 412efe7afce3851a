"""The train stage's loss curve for pipeline UIs: one HTML page with a matplotlib PNG (Agg canvas, no pyplot).

Training loss per step as a line, validation loss as markers (a run validated once still shows its point), log
scale on the loss axis when it spans more than a factor of 10, and a title built from the run's meta.json (model,
preset, steps), never from a pod-local path.
"""
from __future__ import annotations

import base64
import html
import io
import os

import numpy as np

from .. import storage

COLOURS = {"train": "#1f77b4", "val": "#d62728"}


def loss_figure_png(hist, title: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for split, g in hist.groupby("split", sort=True):
        g = g.sort_values("step")
        style = {"marker": "o", "ms": 5, "lw": 1.2} if split != "train" or len(g) < 3 else {"lw": 1.2}
        ax.plot(g["step"], g["loss"], color=COLOURS.get(split, "#555"), label=f"{split} loss", **style)
    loss = hist["loss"].to_numpy(float)
    pos = loss[loss > 0]
    if len(pos) and pos.max() / pos.min() > 10:
        ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (masked BCE per token)" + (", log scale" if ax.get_yscale() == "log" else ""))
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _title(model_dir) -> str:
    meta_path = storage.join(model_dir, "meta.json")
    meta = storage.read_json(meta_path) if storage.exists(meta_path) else {}
    if not meta:
        return "Training loss"
    parts = [str(meta.get("model_type", "")).upper(), f"preset {meta.get('preset')}" if meta.get("preset") else "",
             f"{meta.get('steps')} steps" if meta.get("steps") is not None else "",
             f"ε = {meta['dp_epsilon']:.3g}" if meta.get("dp_epsilon") else ""]
    return "Training loss: " + ", ".join(p for p in parts if p)


def loss_curve_html(model_dir: str | os.PathLike) -> str:
    """An HTML page with the train/val loss per step from a checkpoint's ``history.parquet``."""
    hist = storage.read_parquet(storage.join(model_dir, "history.parquet")).to_pandas()
    title = _title(model_dir)
    if hist.empty:
        return f"<html><body><h3>{html.escape(title)}</h3><p>No loss was recorded.</p></body></html>"
    png = base64.b64encode(loss_figure_png(hist, title)).decode()
    val = hist[hist["split"] == "val"]
    best = f"best validation loss {val['loss'].min():.4g} at step {int(val.loc[val['loss'].idxmin(), 'step'])}" \
        if len(val) and np.isfinite(val["loss"]).any() else "no validation loss recorded"
    return (f"<html><head><meta charset='utf-8'></head><body style='font-family:sans-serif'>"
            f"<img alt='{html.escape(title)}' src='data:image/png;base64,{png}'><p>{html.escape(best)}</p>"
            "</body></html>")
