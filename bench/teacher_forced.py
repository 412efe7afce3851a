"""Teacher-forced diagnostics of a trained model on real patients: does it *know* what the data says?

For a model directory and a tables directory (same vocabulary), over one split's patients, the model's own
probabilities on the real rows (no sampling), against the observed rates:

* ``end``: mean p(<end> in visit k) vs the share of patients whose visit k is their last, k = 1, 2, 3+;
* ``persistence``: for the codes given (default: the simulator's chronic codes), mean p(c in visit t+1) where visit t
  has c, vs the observed recurrence; and where visit t lacks c (the dependence the model must learn);
* ``weekday | event type``: mean p(weekday d) per event type vs the observed mix (from the group heads when the
  model has them, else the normalised Bernoulli logits of the weekday tokens).

A calibrated model with a biased *sampled* cohort points at exposure bias (the row sampled before the column
differs from the real one); an uncalibrated one at the training.

    .venv/bin/python bench/teacher_forced.py MODEL_DIR TABLES_DIR [--split train]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
import torch


def diagnose(model_dir, tables_dir, split: str = "train", codes: list[str] | None = None, batch: int = 128) -> dict:
    from synthehr_core.data.fixtures.longitudinal import CHRONIC
    from synthehr_core.model.checkpoint import load_model
    from synthehr_core.model.tensors import EHRParquetDataset, collate_halo

    model, vocab, _ = load_model(model_dir, "cpu")
    T = model.config.n_ctx
    ds = EHRParquetDataset(tables_dir, split, T, vocab=vocab)
    fvr = vocab.first_visit_row
    codes = codes or [f"dx:{c}" for c in CHRONIC]
    cidx = [vocab.index(c) for c in codes if c in vocab]
    wd = [i for i, t in enumerate(vocab.tokens) if t.token.startswith("cal:weekday=")]
    et = [i for i, t in enumerate(vocab.tokens) if t.token.startswith("evt:")]
    groups = {tuple(r): k for k, r in enumerate(model.config.groups or ())}
    wd_head = groups.get((min(wd), max(wd) + 1)) if wd else None
    end_p, pers = [], []
    wd_rows = []
    with torch.no_grad():
        for b0 in range(0, len(ds), batch):
            X, mask = collate_halo([ds[i] for i in range(b0, min(b0 + batch, len(ds)))], vocab, T, trim=True)
            tgt = X[:, 1:]
            hidden, logits, prior = model.teacher_forced(X)
            p = torch.sigmoid(logits)
            live = mask[:, 1:, 0] > 0                                    # (B, T-1) real target rows
            vis = torch.arange(1, X.size(1))[None, :] >= fvr              # visit rows
            k = (torch.arange(1, X.size(1)) - fvr + 1)[None, :].expand_as(live)  # visit number of the target row
            sel = live & vis
            end_p.append(pd.DataFrame({"k": k[sel].numpy(), "p": p[..., vocab.end_index][sel].numpy(),
                                       "y": tgt[..., vocab.end_index][sel].numpy()}))
            prev_vis = sel & (k > 1)
            for c in cidx:
                had = X[:, :-1, c][prev_vis] > 0
                pers.append(pd.DataFrame({"code": vocab.tokens[c].token, "had": had.numpy(),
                                          "p": p[..., c][prev_vis].numpy(), "y": tgt[..., c][prev_vis].numpy()}))
            if wd and et:
                if wd_head is not None:
                    q = torch.softmax(model.group_logits(hidden, wd_head, prior, tgt), -1)[..., :len(wd)]
                else:
                    q = p[..., wd] / p[..., wd].sum(-1, keepdim=True)
                evt = tgt[..., et].argmax(-1)
                for j, name in enumerate(vocab.tokens[i].token[len("cal:weekday="):] for i in wd):
                    wd_rows.append(pd.DataFrame({"type": [vocab.tokens[et[e]].token for e in evt[sel].tolist()],
                                                 "day": name, "p": q[..., j][sel].numpy(),
                                                 "y": tgt[..., wd[j]][sel].numpy()}))
    end = pd.concat(end_p)
    end["k"] = end["k"].clip(upper=3)
    out = {"end": end.groupby("k")[["p", "y"]].mean().rename(columns={"p": "model p(end)", "y": "observed"})}
    if pers:
        pr = pd.concat(pers)
        out["persistence"] = pr.groupby("had")[["p", "y"]].mean().rename(
            columns={"p": "model p(c next)", "y": "observed"})
    if wd_rows:
        w = pd.concat(wd_rows)
        out["weekday"] = (100 * w.groupby(["type", "day"])[["p", "y"]].mean()).unstack("day")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("tables_dir")
    ap.add_argument("--split", default="train")
    a = ap.parse_args(argv)
    pd.set_option("display.width", 200)
    for name, df in diagnose(a.model_dir, a.tables_dir, a.split).items():
        print(f"\n## {name}\n")
        print(df.round(3).to_string())


if __name__ == "__main__":
    main()
