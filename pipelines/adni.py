"""The adni pipeline: the shared DAG with the bundled `adni` dataset config."""
from pipelines.builder import build_pipeline

pipeline = build_pipeline("adni")
