"""The mimic3 pipeline: the shared DAG with the bundled `mimic3` dataset config."""
from pipelines.builder import build_pipeline

pipeline = build_pipeline("mimic3")
