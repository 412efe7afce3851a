"""evaluate: fidelity, longitudinal checks, rules, privacy and utility of the merged cohort, and a release gate."""
from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from components._images import EVALUATE_IMAGE


@dsl.component(base_image=EVALUATE_IMAGE, install_kfp_package=False)
def evaluate(real: Input[Dataset], cohort: Input[Dataset], ruleset: Input[Artifact], model: Input[Model], seed: int,
             dataset_config: str, policy: str, release_gate: bool, run_id: str, metrics: Output[Metrics],
             roc: Output[ClassificationMetrics], report: Output[HTML], summary: Output[Markdown],
             details: Output[Artifact]):
    """Compare the synthetic cohort with the real one (train split as reference, test split held out) and decide
    on its release under the policy.

    Args:
        real: Canonical tables directory from preprocess.
        cohort: Merged synthetic cohort from merge.
        ruleset: rules-stage output; rule violations are counted for every model type.
        model: Trained checkpoint; only its meta.json is read (provenance: model, epochs, DP epsilon).
        seed: Seed of the evaluation's own subsampling and bootstrap (privacy attacks, utility models).
        dataset_config: Dataset config (its longitudinal.ordinal stage families are checked).
        policy: Release policy YAML path/URI; "" = the bundled release_policy.yml.
        release_gate: True = the task fails when the decision is "do not release" (after writing its outputs).
        run_id: Pipeline run id for the provenance block.
        metrics: Every scalar metric (with .ci_lo / .ci_hi bootstrap intervals).
        roc: ROC curve of the first label classifier trained on synthetic, tested on real.
        report: HTML release report: decision, verdicts, provenance, plots, metric appendix.
        summary: Markdown summary.
        details: Directory with metrics.json, verdicts.json, provenance.json, roc.json, report.html, summary.md.
    """
    import json
    import shutil

    from synthehr_core.evaluation.stage import evaluate_to_dir

    res = evaluate_to_dir(real.path, cohort.path, details.path, rules_path=f"{ruleset.path}/rules.json", seed=seed,
                          overwrite=True, policy=policy or None, dataset_config=dataset_config, model_dir=model.path,
                          run_id=run_id)
    for k, v in res["metrics"].items():
        metrics.log_metric(k, v)
    curves = json.load(open(f"{details.path}/roc.json"))
    for task, c in list(curves.items())[:1]:
        roc.log_roc_curve(c["fpr"], c["tpr"], c["threshold"])
        roc.metadata["task"] = task
    shutil.copyfile(f"{details.path}/report.html", report.path)
    shutil.copyfile(f"{details.path}/summary.md", summary.path)
    details.metadata.update({"seed": seed, "decision": res["decision"], "reasons": res["verdicts"]["reasons"]})
    if release_gate and res["decision"] == "do not release":
        raise RuntimeError("release gate: do not release: " + " | ".join(res["verdicts"]["reasons"]))
