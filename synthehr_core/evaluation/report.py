"""Render an evaluation result as a self-contained HTML report (plots as base64 PNG) and a Markdown summary.

Layout, for the person who decides on a release: the decision and its reasons, the verdict per property and every
check (value, 95 % interval, records behind it, thresholds), the provenance, then the plots and section tables,
then the metric appendix with a one-line meaning per key. Real-data displays respect the small-cell floor k:
histogram bins, quantiles, prevalences and calendar cells resting on 1..k-1 real patients or visits are hidden.

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
from .glossary import meaning

REAL, SYNTH, TEST = "#1f77b4", "#ff7f0e", "#2ca02c"


def _png(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _hist(ax, r: np.ndarray, s: np.ndarray, title: str, labels=("real train", "synthetic"), colors=(REAL, SYNTH),
          discrete: bool = False, k: int = 0, xlabel: str = "", real_sides=(0,)) -> None:
    """Step histograms (density); bins of the real cohorts (``real_sides``) holding 1..k-1 records are left out."""
    both = np.r_[r, s]
    if not len(both):
        return
    if discrete:
        bins = np.arange(np.floor(both.min()), np.ceil(both.max()) + 2) - 0.5
        if len(bins) > 60:
            bins = np.linspace(bins[0], bins[-1], 41)
    else:
        lo, hi = np.quantile(both, [0.02, 0.98])
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 30)
    hidden = False
    for i, (x, lab, col) in enumerate(((r, labels[0], colors[0]), (s, labels[1], colors[1]))):
        cnt, _ = np.histogram(np.clip(x, bins[0], bins[-1]), bins=bins)
        dens = cnt / max(cnt.sum(), 1) / np.diff(bins)
        if i in real_sides and k:
            small = (cnt > 0) & (cnt < k)
            hidden |= bool(small.any())
            dens = np.where(small, np.nan, dens)
        ax.stairs(dens, bins, lw=1.8, label=lab, color=col)
    ax.set_title(title + (f"\n(real bins with < {k} records hidden)" if hidden else ""), fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("density", fontsize=9)
    ax.legend(fontsize=8)


def _scatter(ax, r: np.ndarray, s: np.ndarray, title: str, r2: float | None, floor: float = 0.0) -> None:
    """Synthetic vs real prevalence; real prevalences resting on fewer than k patients (below ``floor``) hidden."""
    keep = ~((r > 0) & (r < floor))
    r, s = r[keep], s[keep]
    ax.scatter(r, s, s=8, alpha=0.6, color=SYNTH)
    top = max(float(np.max(r, initial=0)), float(np.max(s, initial=0)), 1e-6) * 1.05
    ax.plot([0, top], [0, top], color="grey", lw=1, ls="--")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("real train prevalence")
    ax.set_ylabel("synthetic prevalence")
    ax.set_title(title + ("" if r2 is None else f"  (R² = {r2:.3f})")
                 + (f"\n({int((~keep).sum())} real values on < k patients hidden)" if (~keep).any() else ""),
                 fontsize=10)


def figures(res: dict) -> dict[str, str]:
    d, m = res["details"], res["metrics"]
    k = int(res["params"].get("small_cell_k", 0))
    n_tr = max(int(m.get("n.real_train", 1)), 1)
    out = {}
    fid = d["fidelity"]
    fig = Figure(figsize=(11, 3.6))
    ax = fig.subplots(1, 3)
    _scatter(ax[0], *fid["code_record"], "code prevalence per record", m.get("fidelity.code_record.r2"), k / n_tr)
    lab = fid["labels"]
    _scatter(ax[1], lab["real"].to_numpy(), lab["synth"].to_numpy(), "label prevalence", m.get("fidelity.labels.r2"),
             k / n_tr)
    _hist(ax[2], *fid["visits_per_patient"], "visits per patient", discrete=True, k=k, xlabel="visits")
    out["prevalence"] = _png(fig)
    fig = Figure(figsize=(4, 3.2))
    _hist(fig.subplots(), *fid["codes_per_visit"], "codes per visit", discrete=True, k=k, xlabel="codes")
    out["codes_per_visit"] = _png(fig)

    samples = d["values"]["samples"]
    cont = [c for c in samples if c not in ("gap_days", "offset_days")][:12]
    if cont:
        ncol = min(3, len(cont))
        nrow = -(-len(cont) // ncol)
        fig = Figure(figsize=(3.7 * ncol, 3 * nrow))
        axes = np.atleast_1d(fig.subplots(nrow, ncol)).ravel()
        for ax, c in zip(axes, cont):
            _hist(ax, *samples[c], c, k=k, xlabel=c)
        for ax in axes[len(cont):]:
            ax.set_visible(False)
        fig.tight_layout()
        out["values"] = _png(fig)
    if "gap_days" in samples:
        fig = Figure(figsize=(11, 3.4))
        ax = fig.subplots(1, 2)
        _hist(ax[0], *samples["gap_days"], "inter-visit gap", k=k, xlabel="days")
        if "offset_days" in samples:
            _hist(ax[1], *samples["offset_days"], "follow-up visits over time", k=k, xlabel="days since first visit")
        out["time"] = _png(fig)
    cal = d["values"]["calendar"]
    if cal:
        fig = Figure(figsize=(5.5 * len(cal), 3.2))
        axes = np.atleast_1d(fig.subplots(1, len(cal)))
        for ax, (c, (r, s_)) in zip(axes, cal.items()):
            idx = sorted(set(r.index) | set(s_.index), key=lambda v: (WEEKDAYS.index(v) if v in WEEKDAYS else 7, v))
            x = np.arange(len(idx))
            rr = r.reindex(idx, fill_value=0)
            ax.bar(x - 0.2, rr, 0.4, label="real train", color=REAL)
            ax.bar(x + 0.2, s_.reindex(idx, fill_value=0), 0.4, label="synthetic", color=SYNTH)
            ax.set_xticks(x, idx, fontsize=8)
            ax.set_title(f"visits by {c}", fontsize=10)
            ax.set_ylabel("share of visits", fontsize=9)
            ax.legend(fontsize=8)
        out["calendar"] = _png(fig)
    if d["privacy"].get("dcr") is not None:
        fig = Figure(figsize=(5.5, 3.4))
        _hist(fig.subplots(), *d["privacy"]["dcr"], "distance to the closest synthetic record",
              labels=("real train (members)", "real test (non-members)"), colors=(REAL, TEST), discrete=True, k=k,
              xlabel="Hamming distance", real_sides=(0, 1))
        out["dcr"] = _png(fig)
    roc = d["utility"].get("roc") or {}
    if roc:
        fig = Figure(figsize=(4.2, 3.6))
        ax = fig.subplots()
        for task, cur in list(roc.items())[:6]:
            ax.plot(cur["fpr"], cur["tpr"], lw=1.5, label=task)
        ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1)
        ax.set_xlabel("false positive rate", fontsize=9)
        ax.set_ylabel("true positive rate", fontsize=9)
        ax.set_title("ROC, trained on synthetic, tested on real", fontsize=10)
        ax.legend(fontsize=7)
        out["roc"] = _png(fig)
    return out


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return "" if not np.isfinite(v) else f"{v:.4g}"
    return str(v)


def _table(rows: list[tuple], header: tuple, raw_cols: tuple[int, ...] = ()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if i in raw_cols else html.escape(_fmt(c))}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _frame(df, cols: list[str] | None = None) -> str:
    if df is None or not len(df):
        return "<p class='note'>Nothing to list.</p>"
    df = df[cols] if cols else df
    return _table([tuple(r) for r in df.itertuples(index=False)], tuple(str(c).replace("_", " ") for c in df.columns))


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
th{background:#f3f3f3}td:first-child{text-align:left}.note{color:#555;font-size:13px}img{max-width:100%}
.muted{color:#666;font-size:13px}.decision{padding:14px 18px;margin:12px 0;border-radius:6px;border-left:10px solid}
.decision h2{margin:0;border:0;font-size:26px}.d-no{background:#fdecea;border-color:#d93025}
.d-warn{background:#fef7e0;border-color:#f29900}.d-ok{background:#e6f4ea;border-color:#188038}
.s-fail{background:#fdecea;font-weight:bold}.s-warn,.s-inconclusive{background:#fef7e0}.s-pass{background:#e6f4ea}
.s-notrun{color:#888}.pill{display:inline-block;padding:6px 12px;margin:3px;border-radius:14px;font-size:14px}
td.left,th.left{text-align:left}dl.prov{display:grid;grid-template-columns:max-content auto;gap:2px 14px;font-size:13px}
dl.prov dt{font-weight:bold}dl.prov dd{margin:0}"""
DECISION_CLASS = {"do not release": "d-no", "release with warnings": "d-warn", "release": "d-ok"}
STATUS_WORD = {"pass": "pass", "warn": "warning", "fail": "FAIL", "inconclusive": "too few records", "not run": "not run"}


def _status_cell(st: str) -> str:
    return f"<span class='s-{st.replace(' ', '')}'>{html.escape(STATUS_WORD[st])}</span>"


def _threshold(r: dict) -> str:
    op = ">" if r["worse"] == "higher" else "<"
    parts = [f"warn {op} {r['warn']:g}" if r["warn"] is not None else "", f"fail {op} {r['fail']:g}"
             if r["fail"] is not None else ""]
    return "; ".join(p for p in parts if p) + (" (blocks release)" if r["gated"] else "")


def _verdict_block(res: dict) -> list[str]:
    v = res["verdicts"]
    dec = v["decision"]
    parts = [f"<div class='decision {DECISION_CLASS[dec]}'><h2>Decision: {html.escape(dec.upper())}</h2>"]
    gated = ", ".join(c.replace("_", " ") for c in v["gated"]) or "none"
    if v["reasons"]:
        parts.append("<ol>" + "".join(f"<li>{html.escape(r)}</li>" for r in v["reasons"][:12]) + "</ol>")
    else:
        parts.append("<p>Every check passed.</p>")
    parts.append(f"<p class='muted'>Blocking checks (a failure stops the release): {html.escape(gated)}. Policy: "
                 f"{html.escape(str(v['policy']['source']).rsplit('/', 1)[-1])} (sha256 "
                 f"{html.escape(v['policy']['sha256_16'])}), small-cell k = {v['policy']['small_cell_k']}.</p></div>")
    parts.append("<p>" + "".join(
        f"<span class='pill s-{st.replace(' ', '')}'>{html.escape(p)}: {html.escape(STATUS_WORD[st])}</span>"
        for p, st in v["properties"].items()) + "</p>")
    rows = []
    for r in v["checks"]:
        iv = r["interval"]
        rows.append((r["property"], r["check"].replace("_", " "), _status_cell(r["status"]),
                     "" if r["value"] is None else _fmt(r["value"]),
                     "" if iv is None else f"{iv[0]:.3g} to {iv[1]:.3g}",
                     "" if r["n"] is None else str(r["n"]), _threshold(r), r["meaning"]))
    parts.append("<details open><summary><b>Every check</b> (value, 95% bootstrap interval, records behind it, "
                 "thresholds)</summary>" + _table(rows, ("property", "check", "status", "value", "95% interval",
                                                         "records", "thresholds", "what it measures"),
                                                  raw_cols=(2,)) + "</details>")
    return parts


def _provenance(res: dict) -> str:
    prov = res.get("provenance") or {}
    m, p = res["metrics"], res["params"]
    n = int(m.get("privacy.sample_size", 0))
    facts = dict(prov)
    facts["cohorts"] = (f"{int(m.get('n.real_train', 0))} real training, {int(m.get('n.real_test', 0))} held-out "
                        f"test and {int(m.get('n.synthetic', 0))} synthetic patients")
    facts["attack records"] = (f"{n} members + {n} non-members (limit {p['privacy_sample']} per group)" if n
                               else "no attacks (no held-out test split)")
    facts["utility records"] = (f"trained on {int(m.get('utility.n_train', 0))} synthetic, tested on "
                                f"{int(m.get('utility.n_test', 0))} real held-out" if "utility.n_test" in m else "n/a")
    facts["evaluation seed"] = str(p["seed"])
    return "<dl class='prov'>" + "".join(f"<dt>{html.escape(k.replace('_', ' '))}</dt><dd>{html.escape(str(v))}</dd>"
                                         for k, v in facts.items()) + "</dl>"


def _real_cell(count: float, n: float, k: int) -> str:
    return f"< {k}/{int(n)}" if 0 < count < k else f"{count / max(n, 1):.4g}"


def _quantiles(q, k: int) -> list[tuple]:
    rows = []
    for r in q.itertuples(index=False):
        d = r._asdict()
        vals = []
        for c in q.columns:
            v = d[c]
            if c.startswith("q") and d["cohort"] == "real":
                qq = int(c[1:]) / 100
                if d["n"] * min(qq, 1 - qq) < k:        # fewer than k real values beyond this quantile
                    v = f"(< {k} beyond)"
            vals.append(v)
        rows.append(tuple(vals))
    return rows


def render_html(res: dict) -> str:
    m = res["metrics"]
    k = int(res["params"].get("small_cell_k", 0))
    figs = figures(res)
    d = res["details"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>synthehr release report</title>"
             f"<style>{CSS}</style></head><body><h1>Synthetic EHR release report</h1>"]
    prov = res.get("provenance") or {}
    parts.append(f"<p class='muted'>Dataset {html.escape(str(prov.get('dataset', '?')))} — model "
                 f"{html.escape(str(prov.get('model', '?')))} — privacy: "
                 f"{html.escape(str(prov.get('differential_privacy', '?')))} — evaluated "
                 f"{html.escape(str(prov.get('evaluated', '?')))}</p>")
    parts += _verdict_block(res)
    parts.append("<h2>Provenance</h2>" + _provenance(res))

    parts.append("<h2>Fidelity: codes</h2><p class='note'>R² compares each key's probability in the synthetic "
                 "cohort with the real training data (1 = identical); the held-out column is what a second real "
                 "sample of the same size reaches.</p>" + _families(m) + figs["prevalence"] + figs["codes_per_visit"])
    lab = d["fidelity"]["labels"]
    if len(lab):
        n_tr = m.get("n.real_train", 1)
        parts.append(_table([(i, _real_cell(r.real * n_tr, n_tr, k), r.synth, r.synth - r.real if r.real * n_tr >= k
                              or r.real == 0 else "") for i, r in lab.iterrows()],
                            ("label", "real train share", "synthetic share", "difference")))
    parts.append("<h2>Longitudinal structure</h2>")
    lon = d.get("longitudinal") or {}
    parts.append("<h3>Persistence: P(code in next visit | code in this visit), largest gaps</h3>"
                 + _frame(lon.get("persistence")))
    parts.append("<h3>Declared stage progressions: patients whose stage goes down</h3>" + _frame(lon.get("ordinal")))
    shares = lon.get("shares")
    if shares is not None and len(shares):
        shares = shares.assign(real=[_real_cell(c, n, k) for c, n in zip(shares["real_count"], shares["real_n"])])
        shares = shares.drop(columns=["real_count"])
    parts.append("<h3>Dependence between visit variables: largest gaps in conditional shares</h3>" + _frame(shares))
    parts.append("<h3>Association strength (Cramér's V)</h3>" + _frame(lon.get("cramers_v")))
    parts.append("<h3>Never together in a real visit, together in synthetic ones</h3>"
                 + _frame(lon.get("never_together")))

    parts.append("<h2>Values and time</h2>")
    q = d["values"]["quantiles"]
    if len(q):
        parts.append(_table(_quantiles(q, k), tuple(q.columns)))
    parts += [figs.get("values", ""), figs.get("time", ""), figs.get("calendar", "")]
    tem = d.get("temporal") or {}
    if tem.get("result"):                        # visits per month, weekday/month/hour profiles (docs/temporal.md)
        from .temporal import temporal_figure

        parts.append(temporal_figure(tem["result"], k=k))

    parts.append("<h2>Rules</h2>")
    if any(key.startswith("rules.") for key in m):
        parts.append(f"<p>Headline: {m.get('rules.heldout.percent_valid', float('nan')):.4g}% of synthetic patients "
                     f"violate none of the {int(m.get('rules.heldout.n_rules', 0))} rules that also hold on held-out "
                     f"real patients. Apart: {int(m.get('rules.heldout.n_spurious', 0))} spurious rules (violated by "
                     f"held-out real patients) and {int(m.get('rules.heldout.n_untested', 0))} untested ones; against "
                     f"every mined rule {m.get('rules.percent_valid', float('nan')):.4g}% are valid (held-out real: "
                     f"{m.get('rules.baseline_test.percent_valid', float('nan')):.4g}%).</p>")
        top = (d["rules"] or {}).get("heldout_top_violated") or (d["rules"] or {}).get("top_violated", [])
        if top:
            parts.append("<p>Most violated rules:</p>" + _table(
                [(t["rule"], t["family"], t["output"], t["violations"]) for t in top],
                ("rule", "family", "output", "violations")))
    else:
        parts.append("<p class='note'>No rules checked.</p>")

    parts.append("<h2>Privacy</h2>" + figs.get("dcr", "") + "<h3>Small cells</h3>"
                 + _frame((d.get("smallcells") or {}).get("table")))
    parts.append("<h2>Utility (train on synthetic vs real, test on real)</h2>" + figs.get("roc", ""))
    tab = d["utility"]["table"]
    if len(tab):
        parts.append(_frame(tab))

    parts.append("<h2>Appendix: every metric</h2><p class='note'>metrics.json holds the same keys; .ci_lo / .ci_hi "
                 "are 95% bootstrap intervals (200 resamples, seeded).</p>")
    parts.append(_table([(key, v, meaning(key)) for key, v in m.items()], ("metric", "value", "meaning")))
    if res["notes"]:
        parts.append("<h2>Notes</h2><ul class='note'>" + "".join(f"<li>{html.escape(n)}</li>" for n in res["notes"])
                     + "</ul>")
    parts.append("<p class='muted'>Timings (s): " + ", ".join(f"{key} {v:.2f}" for key, v in res["timings_s"].items())
                 + "</p></body></html>")
    return "\n".join(parts)


def render_markdown(res: dict) -> str:
    m, v = res["metrics"], res["verdicts"]
    lines = ["# Synthetic EHR release report", "", f"**Decision: {v['decision']}**", ""]
    lines += [f"{i}. {r}" for i, r in enumerate(v["reasons"], 1)] or ["Every check passed."]
    lines += ["", "| property | verdict |", "|---|---|"] + [f"| {p} | {st} |" for p, st in v["properties"].items()]
    lines += ["", "| check | status | value | 95% interval |", "|---|---|---|---|"]
    for r in v["checks"]:
        iv = r["interval"]
        lines.append(f"| {r['check']} | {r['status']} | {'' if r['value'] is None else _fmt(r['value'])} | "
                     f"{'' if iv is None else f'{iv[0]:.3g} to {iv[1]:.3g}'} |")
    lines += ["", "| family | R² | Pearson r | held-out R² |", "|---|---|---|---|"]
    for f in ("code_record", "code_visit", "pair_record", "pair_visit", "seq_record", "seq_visit"):
        lines.append(f"| {f} | {_fmt(m.get(f'fidelity.{f}.r2', float('nan')))} | "
                     f"{_fmt(m.get(f'fidelity.{f}.pearson', float('nan')))} | "
                     f"{_fmt(m.get(f'fidelity.baseline.{f}.r2', float('nan')))} |")
    if res["notes"]:
        lines += ["", "Notes:"] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"
