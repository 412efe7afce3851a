"""Render an evaluation result as a self-contained HTML report (plots as base64 PNG) and a Markdown summary.

Matplotlib is used through ``Figure`` + the Agg canvas directly (no pyplot, no global backend switch), so the
report renders in a headless container and the Kubeflow UI can show the single HTML file.
"""
from __future__ import annotations

import base64
import html
import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..data.schema import WEEKDAYS

REAL, SYNTH, TEST = "#1f77b4", "#ff7f0e", "#2ca02c"
HEADLINE = [
    ("fidelity.code_record.r2", "code prevalence per record, R²"),
    ("fidelity.code_visit.r2", "code prevalence per visit, R²"),
    ("fidelity.pair_visit.r2", "within-visit pairs per visit, R²"),
    ("fidelity.seq_visit.r2", "consecutive-visit pairs per visit, R²"),
    ("fidelity.labels.r2", "label prevalence, R²"),
    ("privacy.exact_copies", "exact copies of training records"),
    ("privacy.mia.accuracy", "membership inference accuracy (0.5 = none)"),
    ("privacy.nnaar", "NNAA risk (≈0 good)"),
    ("privacy.attribute.f1_gap", "attribute inference F1 minus baseline"),
    ("utility.mean_tstr_auroc", "mean AUROC, trained on synthetic"),
    ("utility.mean_trtr_auroc", "mean AUROC, trained on real"),
    ("rules.percent_valid", "percent of synthetic patients without rule violations"),
]


def _png(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _hist(ax, r: np.ndarray, s: np.ndarray, title: str, labels=("real train", "synthetic"), colors=(REAL, SYNTH),
          discrete: bool = False) -> None:
    both = np.r_[r, s]
    if not len(both):
        return
    if discrete:
        bins = np.arange(np.floor(both.min()), np.ceil(both.max()) + 2) - 0.5
    else:
        lo, hi = np.quantile(both, [0.005, 0.995])
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 40)
    for x, lab, col in ((r, labels[0], colors[0]), (s, labels[1], colors[1])):
        ax.hist(np.clip(x, bins[0], bins[-1]), bins=bins, density=True, histtype="step", lw=1.8, label=lab, color=col)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)


def _scatter(ax, r: np.ndarray, s: np.ndarray, title: str, r2: float | None) -> None:
    ax.scatter(r, s, s=8, alpha=0.6, color=SYNTH)
    top = max(float(np.max(r, initial=0)), float(np.max(s, initial=0)), 1e-6) * 1.05
    ax.plot([0, top], [0, top], color="grey", lw=1, ls="--")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("real train")
    ax.set_ylabel("synthetic")
    ax.set_title(title + ("" if r2 is None else f"  (R² = {r2:.3f})"), fontsize=10)


def figures(res: dict) -> dict[str, str]:
    d, m = res["details"], res["metrics"]
    out = {}
    fid = d["fidelity"]
    fig = Figure(figsize=(11, 3.6))
    ax = fig.subplots(1, 3)
    _scatter(ax[0], *fid["code_record"], "code prevalence per record", m.get("fidelity.code_record.r2"))
    lab = fid["labels"]
    _scatter(ax[1], lab["real"].to_numpy(), lab["synth"].to_numpy(), "label prevalence", m.get("fidelity.labels.r2"))
    _hist(ax[2], *fid["visits_per_patient"], "visits per patient", discrete=True)
    out["prevalence"] = _png(fig)
    fig = Figure(figsize=(4, 3.2))
    _hist(fig.subplots(), *fid["codes_per_visit"], "codes per visit", discrete=True)
    out["codes_per_visit"] = _png(fig)

    samples = d["values"]["samples"]
    cont = [k for k in samples if k not in ("gap_days", "offset_days")][:12]
    if cont:
        ncol = min(3, len(cont))
        nrow = -(-len(cont) // ncol)
        fig = Figure(figsize=(3.7 * ncol, 3 * nrow))
        axes = np.atleast_1d(fig.subplots(nrow, ncol)).ravel()
        for ax, k in zip(axes, cont):
            _hist(ax, *samples[k], k)
        for ax in axes[len(cont):]:
            ax.set_visible(False)
        out["values"] = _png(fig)
    if "gap_days" in samples:
        fig = Figure(figsize=(11, 3.4))
        ax = fig.subplots(1, 2)
        _hist(ax[0], *samples["gap_days"], "inter-visit gap (days)")
        if "offset_days" in samples:
            _hist(ax[1], *samples["offset_days"], "follow-up visits over time (days since first visit)")
        out["time"] = _png(fig)
    cal = d["values"]["calendar"]
    if cal:
        fig = Figure(figsize=(5.5 * len(cal), 3.2))
        axes = np.atleast_1d(fig.subplots(1, len(cal)))
        for ax, (k, (r, s)) in zip(axes, cal.items()):
            idx = sorted(set(r.index) | set(s.index), key=lambda v: (WEEKDAYS.index(v) if v in WEEKDAYS else 7, v))
            x = np.arange(len(idx))
            ax.bar(x - 0.2, r.reindex(idx, fill_value=0), 0.4, label="real train", color=REAL)
            ax.bar(x + 0.2, s.reindex(idx, fill_value=0), 0.4, label="synthetic", color=SYNTH)
            ax.set_xticks(x, idx, fontsize=8)
            ax.set_title(k, fontsize=10)
            ax.legend(fontsize=8)
        out["calendar"] = _png(fig)
    if d["privacy"].get("dcr") is not None:
        fig = Figure(figsize=(5.5, 3.4))
        _hist(fig.subplots(), *d["privacy"]["dcr"], "distance to closest synthetic record",
              labels=("real train (members)", "real test (non-members)"), colors=(REAL, TEST), discrete=True)
        out["dcr"] = _png(fig)
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(rows: list[tuple], header: tuple) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _metric_rows(m: dict, prefix: str) -> list[tuple]:
    return [(k, v) for k, v in m.items() if k.startswith(prefix)]


def _families(m: dict) -> str:
    rows = []
    for f in ("code_record", "code_visit", "pair_record", "pair_visit", "seq_record", "seq_visit"):
        rows.append((f, m.get(f"fidelity.{f}.r2", np.nan), m.get(f"fidelity.{f}.pearson", np.nan),
                     m.get(f"fidelity.baseline.{f}.r2", np.nan), int(m.get(f"fidelity.{f}.n_keys", 0))))
    return _table(rows, ("family", "R² synthetic vs train", "Pearson r", "R² held-out test vs train (ceiling)",
                         "keys"))


CSS = """body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1250px}
h1{margin-bottom:4px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child{text-align:left}.flag{background:#fdecea;border-left:6px solid #d93025;
padding:8px 12px;margin:6px 0}.ok{background:#e6f4ea;border-left:6px solid #188038;padding:8px 12px}
.note{color:#555;font-size:13px}img{max-width:100%}.muted{color:#777}"""


def render_html(res: dict) -> str:
    m, p = res["metrics"], res["params"]
    figs = figures(res)
    head = (f"<!doctype html><html><head><meta charset='utf-8'><title>synthehr evaluation</title>"
            f"<style>{CSS}</style></head><body><h1>Synthetic EHR evaluation</h1>")
    where = (f"<p class='muted'>real: {html.escape(str(p.get('real_dir', '(in memory)')))} — synthetic: "
             f"{html.escape(str(p.get('synthetic_dir', '(in memory)')))} — {int(m.get('n.real_train', 0))} train, "
             f"{int(m.get('n.real_test', 0))} test, {int(m.get('n.synthetic', 0))} synthetic patients — seed "
             f"{p['seed']}, privacy sample {p['privacy_sample']}, utility sample {p['utility_sample']}</p>")
    parts = [head, where]
    if res["flags"]:
        parts += [f"<div class='flag'>⚠ {html.escape(f)}</div>" for f in res["flags"]]
    else:
        parts.append("<div class='ok'>No alarms: no exact copies, membership inference ≤ 0.6, unigram R² ≥ 0.5.</div>")
    parts.append("<h2>Headline</h2>" + _table([(label, m[k]) for k, label in HEADLINE if k in m], ("metric", "value")))
    parts.append("<h2>Fidelity: codes</h2>" + _families(m) + figs["prevalence"] + figs["codes_per_visit"])
    parts.append(_table(_metric_rows(m, "fidelity.visits_per_patient") + _metric_rows(m, "fidelity.codes_per_visit")
                        + _metric_rows(m, "fidelity.labels"), ("metric", "value")))
    lab = res["details"]["fidelity"]["labels"]
    if len(lab):
        parts.append(_table([(i, r.real, r.synth, r.synth - r.real) for i, r in lab.iterrows()],
                            ("label", "real train", "synthetic", "difference")))
    parts.append("<h2>Fidelity: values and time</h2>")
    q = res["details"]["values"]["quantiles"]
    if len(q):
        parts.append(_table([tuple(r) for r in q.itertuples(index=False)], tuple(q.columns)))
    parts += [figs.get("values", ""), figs.get("time", ""), figs.get("calendar", "")]
    tem = res["details"].get("temporal") or {}
    if tem.get("result"):                        # visits per month, weekday/month/hour profiles (docs/temporal.md)
        from .temporal import temporal_figure

        parts.append(temporal_figure(tem["result"]))
    parts.append(_table(_metric_rows(m, "values.") + _metric_rows(m, "time.") + _metric_rows(m, "temporal."),
                        ("metric", "value")))
    parts.append("<h2>Rules</h2>")
    rules = _metric_rows(m, "rules.")
    parts.append(_table(rules, ("metric", "value")) if rules else "<p class='note'>No rules checked.</p>")
    top = res["details"]["rules"].get("top_violated", []) if res["details"]["rules"] else []
    if top:
        parts.append("<p>Most violated rules:</p>" + _table([(t["rule"], t["family"], t["output"], t["violations"])
                                                             for t in top], ("rule", "family", "output", "violations")))
    parts.append("<h2>Privacy</h2>" + figs.get("dcr", "") + _table(_metric_rows(m, "privacy."), ("metric", "value")))
    parts.append("<h2>Utility (train on synthetic vs real, test on real)</h2>")
    tab = res["details"]["utility"]["table"]
    if len(tab):
        parts.append(_table([tuple(r) for r in tab.itertuples(index=False)], tuple(tab.columns)))
    if res["notes"]:
        parts.append("<h2>Notes</h2><ul class='note'>" + "".join(f"<li>{html.escape(n)}</li>" for n in res["notes"])
                     + "</ul>")
    parts.append("<p class='muted'>Definitions: docs/evaluation.md. Timings (s): "
                 + ", ".join(f"{k} {v:.2f}" for k, v in res["timings_s"].items()) + "</p></body></html>")
    return "\n".join(parts)


def render_markdown(res: dict) -> str:
    m = res["metrics"]
    lines = ["# Synthetic EHR evaluation", ""]
    lines += [f"- **ALARM**: {f}" for f in res["flags"]] or ["No alarms."]
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {label} | {_fmt(m[k])} |" for k, label in HEADLINE if k in m]
    lines += ["", "| family | R² | Pearson r | held-out R² |", "|---|---|---|---|"]
    for f in ("code_record", "code_visit", "pair_record", "pair_visit", "seq_record", "seq_visit"):
        lines.append(f"| {f} | {_fmt(m.get(f'fidelity.{f}.r2', float('nan')))} | "
                     f"{_fmt(m.get(f'fidelity.{f}.pearson', float('nan')))} | "
                     f"{_fmt(m.get(f'fidelity.baseline.{f}.r2', float('nan')))} |")
    if res["notes"]:
        lines += ["", "Notes:"] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"
