"""The pipeline's first tasks: check_options (the run form, in seconds, before anything is read), then check
(every problem of the dataset config, KDE config and raw files at once)."""
from kfp import dsl
from kfp.dsl import Dataset, Input

from components._images import PREPROCESS_IMAGE


@dsl.component(base_image=PREPROCESS_IMAGE, install_kfp_package=False)
def check_options(model_type: str, preset: str, epochs: int, train_batch_size: int, lr: float, lr_schedule: str,
                  lr_warmup: float, lr_final: float, train_seed: int,
                  precision: str, dp_target_epsilon: float, dp_delta: float, min_code_count: int,
                  rules_min_confidence: float, n_shards: int, first_seed: int, n_patients_per_seed: int,
                  sample_batch_size: int, temperature: float, sample_device: str, condition: str, eval_seed: int,
                  gpu_node_selector: dict, gpu_tolerations: list, image_pull_secret: str,
                  object_store_secret: str, train_eval_every: int, train_patience: int,
                  train_ckpt_minutes: float, train_gpus: int, train_checkpoint_root: str,
                  small_cell_k: int) -> list:
    """Check every free-text and numeric run option at once (no data is read) and return the shard seeds.

    Args:
        model_type: "halo" or "consequence".
        preset: "tiny", "small" or "paper".
        epochs: Training passes (>= 0; 0 = auto).
        train_batch_size: Patients per training step (>= 1).
        lr: Adam learning rate, the schedule's peak (> 0).
        lr_schedule: "constant" or "cosine".
        lr_warmup: Warm-up share of the planned steps, in [0, 1).
        lr_final: Last step's lr as a share of lr, in [0, 1].
        train_seed: Model init and data order seed.
        precision: "fp32", "bf16" or "fp16".
        dp_target_epsilon: DP-SGD epsilon (>= 0; 0 = off).
        dp_delta: DP-SGD delta in [0, 1) (0 = automatic).
        min_code_count: Drop codes of fewer training patients (>= 0).
        rules_min_confidence: Rule confidence in (0, 1].
        n_shards: Number of sampled shards (1..1000).
        first_seed: Seed of the first shard (>= 0); shard i has seed first_seed + i.
        n_patients_per_seed: Patients per shard (>= 1).
        sample_batch_size: Patients sampled together (>= 1).
        temperature: Sampling temperature (> 0).
        sample_device: "auto", "cpu" or "cuda".
        condition: "", "label_probs" or a JSON object of label values.
        eval_seed: Evaluation subsampling seed.
        gpu_node_selector: Node labels the GPU tasks require (JSON object).
        gpu_tolerations: Tolerations of the GPU tasks (JSON list).
        image_pull_secret: Pull secret name of every pod.
        object_store_secret: Object-store credentials secret name.
        train_eval_every: Validation cadence in steps (>= 0; 0 = auto).
        train_patience: Early-stopping patience in validations (>= 0).
        train_ckpt_minutes: Time-based checkpoint interval in minutes (>= 0).
        train_gpus: GPUs of the train pod (1..16).
        train_checkpoint_root: "", gs://, s3://, minio:// or a path the pods see.
        small_cell_k: Small-cell threshold of merge (>= 0).

    Returns:
        The shard seeds, first_seed .. first_seed + n_shards - 1.
    """
    options = dict(locals())   # every parameter above, by name (before any import adds a local)
    from synthehr_core.run_options import check_run_options

    return check_run_options(options)


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
