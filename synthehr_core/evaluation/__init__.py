"""Stage 5, evaluation: fidelity, values and time, temporal realism, rules, privacy attacks and utility of a
synthetic cohort, and the HTML / Markdown report (``stage.evaluate_to_dir``).

No torch and no kfp anywhere below this package (the evaluate image has neither). Definitions: docs/evaluation.md.
"""
