"""rules: mine ConSequence rules (rules.json) from the training split of the canonical tables."""
from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components._images import RULES_IMAGE


@dsl.component(base_image=RULES_IMAGE, install_kfp_package=False)
def rules(tables: Input[Dataset], ruleset: Output[Artifact], label_min_prevalence: int = 500,
          pair_min_prevalence: int = 10, persistence_min_prevalence: int = 10, persistence_min_repeats: int = 5,
          prerequisite_min_prevalence: int = 10, min_confidence: float = 1.0):
    """Mine exceptionless (or min_confidence) rules on the train split; used by ConSequence and by evaluation.

    Args:
        tables: Canonical tables directory from preprocess.
        ruleset: Directory holding rules.json and meta.json.
        label_min_prevalence: Visits with a code before a label rule is mined (KI:utils/find_rules.py).
        pair_min_prevalence: Visits with a code pair before a pair rule is mined (KI:utils/find_rules.py).
        persistence_min_prevalence: Patients with a code before a persistence rule is mined.
        persistence_min_repeats: Repeats a persistent code needs (strictly more than this).
        prerequisite_min_prevalence: Patients with a code before a prerequisite rule is mined.
        min_confidence: Fraction of supporting cases a rule must hold in; 1.0 = exceptionless.
    """
    from synthehr_core import __version__
    from synthehr_core.rules.mining import mine_rules_to_dir

    info = mine_rules_to_dir(tables.path, ruleset.path, label_min_prevalence=label_min_prevalence,
                             pair_min_prevalence=pair_min_prevalence,
                             persistence_min_prevalence=persistence_min_prevalence,
                             persistence_min_repeats=persistence_min_repeats,
                             prerequisite_min_prevalence=prerequisite_min_prevalence, min_confidence=min_confidence)
    ruleset.metadata.update({k: info[k] for k in ("n_rules", "by_family", "split", "n_patients", "thresholds")})
    ruleset.metadata["synthehr_version"] = __version__
