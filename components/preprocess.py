"""preprocess: raw extract -> canonical tables directory (patients/visits/codes parquet, vocab.json, meta.json)."""
from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components._images import PREPROCESS_IMAGE


@dsl.component(base_image=PREPROCESS_IMAGE, install_kfp_package=False)
def preprocess(raw: Input[Dataset], dataset_config: str, split_seed: int, tables: Output[Dataset]):
    """Run the dataset's adapter on a raw extract and write the canonical tables.

    Args:
        raw: Raw extract directory (e.g. MIMIC-III CSVs), brought in by an importer.
        dataset_config: Bundled dataset config name or a YAML path/URI readable in the pod.
        split_seed: Seed of the patient-level train/val/test split; -1 = the dataset config's split.seed.
        tables: Canonical tables directory (docs/canonical-tables.md).
    """
    from synthehr_core.data.preprocess import preprocess as run

    meta = run(dataset_config, tables.path, seed=None if split_seed < 0 else split_seed, raw=raw.path, overwrite=True)
    tables.metadata.update({k: meta[k] for k in ("dataset", "seed", "config_hash", "versions", "n_patients",
                                                 "n_visits", "n_codes", "vocab_size", "split_sizes")})
