"""Small, dependency-free renderings of stage outputs for pipeline UIs (no matplotlib, no kfp)."""
from __future__ import annotations

import html
import os

from .. import storage


def loss_curve_html(model_dir: str | os.PathLike, width: int = 640, height: int = 320) -> str:
    """An HTML page with an inline SVG of the train/val loss per step from a checkpoint's ``history.parquet``."""
    hist = storage.read_parquet(storage.join(model_dir, "history.parquet")).to_pandas()
    pad = 40
    title = f"Training loss ({html.escape(str(model_dir))})"
    if hist.empty:
        return f"<html><body><h3>{title}</h3><p>No loss was recorded.</p></body></html>"
    x0, x1 = float(hist["step"].min()), float(max(hist["step"].max(), hist["step"].min() + 1))
    y0, y1 = float(hist["loss"].min()), float(hist["loss"].max())
    y1 = y1 if y1 > y0 else y0 + 1e-9

    def xy(step: float, loss: float) -> str:
        x = pad + (step - x0) / (x1 - x0) * (width - 2 * pad)
        y = height - pad - (loss - y0) / (y1 - y0) * (height - 2 * pad)
        return f"{x:.1f},{y:.1f}"

    colours = {"train": "#1f77b4", "val": "#d62728"}
    lines = []
    for split, g in hist.groupby("split", sort=True):
        pts = " ".join(xy(s, v) for s, v in zip(g["step"], g["loss"]))
        lines.append(f'<polyline fill="none" stroke="{colours.get(split, "#555")}" stroke-width="1.5" points="{pts}"/>'
                     f'<text x="{width - pad}" y="{pad + 14 * len(lines)}" text-anchor="end" '
                     f'fill="{colours.get(split, "#555")}">{html.escape(str(split))}</text>')
    axes = (f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>'
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>'
            f'<text x="{pad}" y="{height - 10}">step {x0:g}</text>'
            f'<text x="{width - pad}" y="{height - 10}" text-anchor="end">step {x1:g}</text>'
            f'<text x="4" y="{pad - 6}">{y1:.4g}</text><text x="4" y="{height - pad}">{y0:.4g}</text>')
    svg = f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">{axes}{"".join(lines)}</svg>'
    return f"<html><body><h3>{title}</h3>{svg}</body></html>"
