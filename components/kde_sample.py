"""kde-sample: fill a sampled shard's continuous values and visit times from the KDE grids."""
from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components._images import KDE_SAMPLE_IMAGE


@dsl.component(base_image=KDE_SAMPLE_IMAGE, install_kfp_package=False)
def kde_sample(shard: Input[Dataset], grids: Input[Artifact], seed: int, restored: Output[Dataset]):
    """Draw continuous values inside each sampled bin and rebuild start_offset_days.

    Args:
        shard: Sampled shard tables directory (binned columns only) from the sample stage.
        grids: KDE grids directory from kde-grids.
        seed: RNG seed; the pipeline passes the shard's own seed.
        restored: The shard's tables directory with continuous values and times filled in.
    """
    from synthehr_core import __version__
    from synthehr_core.postprocess.stage import sample_kde_to_dir

    meta = sample_kde_to_dir(shard.path, grids.path, restored.path, seed=seed, overwrite=True)
    restored.metadata.update({"seed": seed, "config_hash": meta["config_hash"], "n_patients": meta["n_patients"],
                              "n_visits": meta["n_visits"], "backoff_counts": meta["backoff_counts"],
                              "synthehr_version": __version__})
