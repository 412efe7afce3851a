"""merge: fan-in of the per-seed shards into one synthetic cohort."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components._images import MERGE_IMAGE


@dsl.component(base_image=MERGE_IMAGE, install_kfp_package=False)
def merge(shards: Input[list[Dataset]], tables: Input[Dataset], small_cell_k: int, cohort: Output[Dataset]) -> int:
    """Concatenate the shards in seed order (from each shard's meta.json) and re-key patient ids; drop small cells.

    Args:
        shards: Shard tables directories collected from the sampling loop (any order).
        tables: The real canonical tables (its train split defines the small cells).
        small_cell_k: Drop codes and label combinations held by fewer than k real training patients; 0 = keep all.
        cohort: The merged synthetic cohort tables directory.

    Returns:
        Number of synthetic patients in the cohort.
    """
    from synthehr_core.data.merge import merge_shards

    meta = merge_shards([s.path for s in shards], cohort.path, overwrite=True, small_cell_k=small_cell_k,
                        real_dir=tables.path if small_cell_k else None)
    cohort.metadata.update({k: meta[k] for k in ("seeds", "n_shards", "n_patients", "n_visits", "n_codes",
                                                 "versions")})
    return meta["n_patients"]
