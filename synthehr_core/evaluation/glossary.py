"""One-line meanings of the metric keys, for the report's appendix (the first matching pattern wins).

Patterns are ``fnmatch`` globs over the dotted keys; ``{family}`` style words in a meaning are filled from the key.
Full definitions: docs/evaluation.md.
"""
from __future__ import annotations

from fnmatch import fnmatchcase

FAMILY = {"code_record": "code c anywhere in a patient's record (share of patients)",
          "code_visit": "code c in a visit (share of visits)",
          "pair_record": "codes a and b together in some visit of a record (share of patients)",
          "pair_visit": "codes a and b together in a visit (share of visits)",
          "seq_record": "a in visit t-1 and b in visit t, some t (share of patients)",
          "seq_visit": "a in visit t-1 then b in visit t (share of visit transitions)"}

GLOSSARY: list[tuple[str, str]] = [
    ("*.ci_lo", "lower end of the 95% bootstrap interval of the metric named before .ci_lo"),
    ("*.ci_hi", "upper end of the 95% bootstrap interval of the metric named before .ci_hi"),
    ("n.real_train", "real training patients (the reference)"),
    ("n.real_test", "real held-out test patients (never seen by the model)"),
    ("n.synthetic", "synthetic patients evaluated"),
    ("fidelity.baseline.*.r2", "R² of the held-out real test split against train: the best a generator can expect"),
    ("fidelity.baseline.*.pearson", "Pearson r of the held-out real test split against train"),
    ("fidelity.labels.r2", "R² of label value prevalences, synthetic vs real train"),
    ("fidelity.labels.pearson", "Pearson r of label value prevalences"),
    ("fidelity.labels.max_abs_diff", "largest absolute difference of a label value's prevalence"),
    ("fidelity.*.r2", "R² (1 - residual / total sum of squares, real as truth) of the probabilities of {family}"),
    ("fidelity.*.pearson", "Pearson correlation of the probabilities of {family}"),
    ("fidelity.*.n_keys", "distinct keys in either cohort for {family}"),
    ("fidelity.*.real_mean", "mean in the real training data"), ("fidelity.*.synth_mean", "mean in the synthetic data"),
    ("fidelity.*.real_sd", "standard deviation in the real training data"),
    ("fidelity.*.synth_sd", "standard deviation in the synthetic data"),
    ("fidelity.*.wasserstein", "1-Wasserstein (earth mover's) distance of the two distributions"),
    ("fidelity.*.ks", "Kolmogorov-Smirnov statistic: largest gap between the two cumulative distributions (0-1)"),
    ("values.corr.*", "absolute differences of the Pearson correlations between numeric visit variables"),
    ("values.*.tvd", "total variation distance of the category shares (0 = same, 1 = disjoint)"),
    ("values.*.ks", "Kolmogorov-Smirnov statistic of the variable's values (0 = same distribution)"),
    ("values.*.wasserstein", "1-Wasserstein distance of the variable's values (in its units)"),
    ("values.*.null_frac_diff", "share of missing values, synthetic minus real"),
    ("time.gap_days.*median", "median days between consecutive visits"),
    ("time.gap_days.*", "days between consecutive visits of a patient: distance of the distributions"),
    ("time.offset_days.*", "days from a patient's first visit to each follow-up visit: distance of the distributions"),
    ("time.*.tvd", "total variation distance of the calendar distribution of visits"),
    ("temporal.monthly.*.r", "correlation of visits per calendar month"),
    ("temporal.monthly.*.nmae", "visits per month: sum |real - synthetic| / sum real"),
    ("temporal.weekly.*.r", "correlation of visits per week"), ("temporal.weekly.*.nmae", "visits per week: normalised MAE"),
    ("temporal.season.*", "seasonal profile: amplitude and winter/summer ratio"),
    ("temporal.month_of_year.*", "month-of-year profile of visits"),
    ("temporal.weekday*", "day-of-week profile, largest difference in percentage points"),
    ("temporal.hour.*", "hour-of-day profile, largest difference in percentage points"),
    ("temporal.acf*", "autocorrelation of daily visit counts at that lag"),
    ("longitudinal.persistence.max_abs_diff", "largest gap in P(code in next visit | code in this visit), beyond "
                                              "2 standard errors of noise"),
    ("longitudinal.persistence.mean_abs_diff", "mean absolute gap in P(code in next visit | code in this visit)"),
    ("longitudinal.persistence.n_codes", "frequent codes compared for persistence"),
    ("longitudinal.ordinal.excess_per_1000", "patients per 1000 whose declared stage goes down, synthetic minus real "
                                             "(worst family)"),
    ("longitudinal.ordinal.*", "patients per 1000 whose stage in this family goes down"),
    ("longitudinal.dependence.max_share_gap", "largest gap in P(b = v | a = u) between visit variables, beyond "
                                              "2 standard errors of noise"),
    ("longitudinal.dependence.max_cramers_v_gap", "largest difference of Cramér's V (association strength, 0-1) "
                                                  "between two visit variables"),
    ("longitudinal.exclusive.n_pairs", "code or category pairs that never meet in a real visit though frequent"),
    ("longitudinal.exclusive.synthetic_share", "share of synthetic visits holding such a never-together pair"),
    ("mixing.*", "code categories (code-system versions) never combined in a real visit, and synthetic visits "
                 "combining them"),
    ("smallcells.k", "small-cell threshold k (real training patients)"),
    ("smallcells.synthetic_patients", "synthetic patients with a code or label combination held by 1 to k-1 real "
                                      "training patients"),
    ("smallcells.synthetic_share", "the same as a share of synthetic patients"),
    ("smallcells.codes", "distinct small-cell codes in the synthetic cohort"),
    ("smallcells.label_combinations", "distinct small-cell label combinations in the synthetic cohort"),
    ("smallcells.real_rare_codes", "codes held by 1 to k-1 real training patients"),
    ("rules.heldout.n_rules", "mined rules that fire on the held-out val split and are never violated there"),
    ("rules.heldout.n_spurious", "mined rules violated on held-out real data (spurious)"),
    ("rules.heldout.n_untested", "mined rules that never fire on the held-out val split"),
    ("rules.heldout.baseline_test.*", "held-out real test patients against the rules that hold out"),
    ("rules.heldout.*", "synthetic violations of the rules that hold on held-out real data"),
    ("rules.baseline_test.*", "held-out real test patients against every mined rule"),
    ("rules.violations.*", "violations of rules of this family"),
    ("rules.percent_valid", "percent of synthetic patients violating no mined rule (spurious rules included)"),
    ("rules.*", "rule violations of the synthetic cohort against every mined rule"),
    ("privacy.exact_copy_excess", "share of synthetic records equal to a training record minus the chance share"),
    ("privacy.exact_copies", "synthetic records equal to a training record (labels and every visit's codes)"),
    ("privacy.exact_copy_rate", "share of synthetic records equal to a training record"),
    ("privacy.train_records_copied", "distinct training records reproduced"),
    ("privacy.exact_copies_of_test", "synthetic records equal to a held-out record (chance level)"),
    ("privacy.test_in_train_rate", "share of held-out records equal to a training record (chance level)"),
    ("privacy.sample_size", "records per group the distance attacks used"),
    ("privacy.limit", "upper limit on records per group for the distance attacks"),
    ("privacy.dcr_*", "distance from real records to the closest synthetic record (members = train, non-members = "
                      "test)"),
    ("privacy.mia.accuracy", "membership inference: accuracy of guessing training membership (0.5 = no leakage)"),
    ("privacy.mia.auc", "membership inference: AUROC of closeness as a membership score (0.5 = no leakage)"),
    ("privacy.mia.n_records", "records attacked (members + non-members)"),
    ("privacy.mia.*", "membership inference attack: precision / recall / F1 of the 'member' guesses"),
    ("privacy.nnaa.*", "nearest-neighbour adversarial accuracy (0.5 = synthetic indistinguishable from real)"),
    ("privacy.nnaar", "NNAA risk: test minus train adversarial accuracy (0 = no overfitting)"),
    ("privacy.attribute.f1_gap", "attribute inference F1 minus the held-out baseline (0 or below = no extra risk)"),
    ("privacy.attribute.*", "attribute inference from the nearest record: F1, baseline F1, known codes"),
    ("utility.mean_tstr_auroc", "mean AUROC, trained on synthetic, tested on real held-out (0.5 = chance)"),
    ("utility.mean_trtr_auroc", "mean AUROC, trained on real train, tested on real held-out"),
    ("utility.mean_auroc_gap", "mean AUROC trained on real minus trained on synthetic"),
    ("utility.*.tstr_auroc", "AUROC of this label's classifier trained on synthetic, tested on real"),
    ("utility.*.trtr_auroc", "AUROC of this label's classifier trained on real, tested on real"),
    ("utility.n_*", "records used to train (synthetic) and to test (real held-out)"),
    ("peers.sdmetrics.*", "SDMetrics report score on the patient-level table (0-1, 1 = same)"),
    ("peers.anonymeter.*", "anonymeter risk on the patient-level table (0 = none; main attack minus control)"),
]


def meaning(key: str) -> str:
    for pat, text in GLOSSARY:
        if fnmatchcase(key, pat):
            fam = next((f for f in FAMILY if f".{f}." in f".{key}."), None)
            return text.replace("{family}", FAMILY.get(fam, "the family")) if fam else text.replace(
                " of {family}", "").replace(" for {family}", "")
    return ""
