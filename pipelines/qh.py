"""The qh pipeline: the shared DAG with the bundled `qh` dataset config."""
from pipelines.builder import build_pipeline

pipeline = build_pipeline("qh")
