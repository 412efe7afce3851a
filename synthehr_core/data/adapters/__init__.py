"""One small adapter per raw layout: ``load(raw, options, report) -> RawCohort`` (``base.py``)."""
