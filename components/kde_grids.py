"""kde-grids: fit the KDE grids of continuous values and times on the real training split."""
from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components._images import KDE_GRIDS_IMAGE


@dsl.component(base_image=KDE_GRIDS_IMAGE, install_kfp_package=False)
def kde_grids(tables: Input[Dataset], kde_config: str, grids: Output[Artifact]):
    """Fit one grid per configured variable (docs/kde.md); grids are outside any DP guarantee.

    Args:
        tables: Canonical tables directory from preprocess (only the train split is used).
        kde_config: Bundled KDE config name (kde_mimic3.yml, ...) or a YAML path readable in the pod.
        grids: Directory of grid_<var>_kde.parquet files, kde_config.json and meta.json.
    """
    from synthehr_core import __version__
    from synthehr_core.postprocess.stage import generate_kde_grids_to_dir

    meta = generate_kde_grids_to_dir(tables.path, kde_config, grids.path, overwrite=True)
    grids.metadata.update({"kde_config": kde_config, "config_hash": meta["config_hash"],
                           "n_patients": meta["n_patients"], "n_visits": meta["n_visits"],
                           "variables": sorted(meta["grids"]),
                           "synthehr_version": __version__})
