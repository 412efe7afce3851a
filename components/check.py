"""check: the pipeline's first task; every problem of the dataset config, KDE config and raw files at once."""
from kfp import dsl
from kfp.dsl import Dataset, Input

from components._images import PREPROCESS_IMAGE


@dsl.component(base_image=PREPROCESS_IMAGE, install_kfp_package=False)
def check(raw: Input[Dataset], dataset_config: str, kde_config: str) -> str:
    """Check the dataset before any work starts (synthehr check) and return the KDE config the run uses.

    Args:
        raw: Raw extract directory, brought in by an importer.
        dataset_config: Bundled dataset config name or a YAML path/URI readable in the pod.
        kde_config: KDE config (bundled name or YAML path); "" = the dataset config's `kde:`.
    """
    from synthehr_core.check import require_ready

    return require_ready(dataset_config, raw=raw.path, kde_config=kde_config or None)
