"""Stage 1, data: dataset configs, adapters (raw extract -> RawCohort), canonical parquet tables, vocabulary,
preprocess and merge. No torch here."""
