"""evaluate: fidelity, rule violations, privacy and utility of the merged cohort against the real tables."""
from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Output

from components._images import EVALUATE_IMAGE


@dsl.component(base_image=EVALUATE_IMAGE, install_kfp_package=False)
def evaluate(real: Input[Dataset], cohort: Input[Dataset], ruleset: Input[Artifact], seed: int,
             metrics: Output[Metrics], report: Output[HTML], summary: Output[Markdown], details: Output[Artifact]):
    """Compare the synthetic cohort with the real one (train split as reference, test split held out).

    Args:
        real: Canonical tables directory from preprocess.
        cohort: Merged synthetic cohort from merge.
        ruleset: rules-stage output; rule violations are counted for every model type.
        seed: Seed of the evaluation's own subsampling (privacy attacks, utility models).
        metrics: Every scalar metric.
        report: HTML report with tables and plots.
        summary: Markdown summary.
        details: Directory with metrics.json, report.html and summary.md.
    """
    import math
    import shutil

    from synthehr_core import __version__
    from synthehr_core.evaluation.stage import evaluate_to_dir

    res = evaluate_to_dir(real.path, cohort.path, details.path, rules_path=f"{ruleset.path}/rules.json", seed=seed,
                          overwrite=True)
    for k, v in sorted(res["metrics"].items()):
        if isinstance(v, (int, float)) and math.isfinite(v):
            metrics.log_metric(k, float(v))
    shutil.copyfile(f"{details.path}/report.html", report.path)
    shutil.copyfile(f"{details.path}/summary.md", summary.path)
    details.metadata.update({"seed": seed, "flags": res["flags"], "n_metrics": len(res["metrics"]),
                             "synthehr_version": __version__})
