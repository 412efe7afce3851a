"""MIMIC-III with label-conditioned sampling: adds the `condition` parameter (e.g. {"gender": "F"})."""
from pipelines.builder import build_pipeline

pipeline = build_pipeline("mimic3", conditional=True)
