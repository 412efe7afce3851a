"""synthehr pipelines: one shared DAG (``builder.build_pipeline``) per dataset; compiled YAML under ``compiled/``."""
