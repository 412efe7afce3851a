"""The evaluate stage: fidelity, values and time, rules, privacy and utility of a synthetic cohort.

No torch and no kfp anywhere below this package (the evaluate image has neither). Definitions: docs/evaluation.md.
"""
from .stage import evaluate, evaluate_tables, evaluate_to_dir

__all__ = ["evaluate", "evaluate_tables", "evaluate_to_dir"]
