"""train: fit HALO or ConSequence on the train split (validation on val) and publish a model directory."""
from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components._images import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def train(tables: Input[Dataset], ruleset: Input[Artifact], model_type: str, preset: str, epochs: int,
          batch_size: int, lr: float, seed: int, dp_target_epsilon: float, model: Output[Model],
          metrics: Output[Metrics], loss_curve: Output[HTML], precision: str = "fp32", dp_delta: float = 0.0,
          min_code_count: int = 0, eval_every: int = 500, patience: int = 0, ckpt_minutes: float = 10.0,
          gpus: int = 1, checkpoint_root: str = "", pipeline_root: str = "", lr_schedule: str = "constant",
          lr_warmup: float = 0.05, lr_final: float = 0.1):
    """Train the generative model; ConSequence enforces the mined rules, HALO ignores them. Preemption-safe: step
    checkpoints go to <checkpoint root>/<checkpoint key>/ and a retried (or resubmitted) task resumes from them.

    Args:
        tables: Canonical tables directory from preprocess.
        ruleset: rules-stage output; read only when model_type is "consequence".
        model_type: "halo" or "consequence" (validated by the library).
        preset: Model size: "tiny" (CPU, seconds), "small" or "paper" (HALO paper size).
        epochs: Passes over the train split (early stopping on val may end sooner); 0 = auto, sized from the
            training set (about 800 steps, 3 to 10 epochs: synthehr_core/model/schedule.py).
        batch_size: Patients per optimiser step (the global batch, split over the GPUs).
        lr: Adam learning rate (the peak of a cosine schedule).
        seed: Model init and data order.
        dp_target_epsilon: DP-SGD privacy budget epsilon; 0 = no differential privacy.
        precision: "fp32" (exact), "bf16" or "fp16" (CUDA) autocast for the big matmuls.
        dp_delta: DP-SGD delta; 0 = automatic, min(1e-5, 1 / (10 n_train)).
        min_code_count: Drop clinical codes of fewer training patients from the vocabulary; 0 = keep all.
        model: What sampling needs: model.pt (best weights), config.json, vocab.json, history.parquet,
            label_probs.parquet, token_groups.json, meta.json; published whole at the end.
        metrics: Losses, steps and timing.
        loss_curve: Train/val loss per step.
        eval_every: Validate (and checkpoint) every N steps; 0 = auto, about 20 validations per run (every 10 to
            500 steps).
        patience: Stop after N validations without a better val loss (keeping the best); 0 = no early stopping.
        ckpt_minutes: Also checkpoint every M minutes of training; 0 = off.
        gpus: GPUs (one torchrun process each; CPU processes on a machine without GPUs).
        checkpoint_root: Root of the step checkpoints (gs://, s3://, a path the pod sees); "" =
            <pipeline_root>/checkpoints (minio:// read as s3://), or beside the model when that is "" too.
        pipeline_root: The run's pipeline root (the pipeline passes dsl.PIPELINE_ROOT_PLACEHOLDER).
        lr_schedule: "constant" (HI's fixed lr) or "cosine" (linear warm-up, then cosine decay).
        lr_warmup: Cosine: warm-up share of the planned steps.
        lr_final: Cosine: the last planned step's lr as a share of lr.
    """
    import logging

    from synthehr_core import __version__
    from synthehr_core.model.config import TrainConfig
    from synthehr_core.model.loss_curve import loss_curve_html
    from synthehr_core.model.train import train_to_dir

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    config = TrainConfig.from_dict({"model_type": model_type, "preset": preset, "epochs": epochs or "auto",
                                    "batch_size": batch_size, "lr": lr, "lr_schedule": lr_schedule,
                                    "lr_warmup": lr_warmup, "lr_final": lr_final, "seed": seed,
                                    "eval_every": eval_every or "auto", "patience": patience or None, "ckpt_minutes": ckpt_minutes or None,
                                    "dp_target_epsilon": dp_target_epsilon, "precision": precision,
                                    "dp_delta": dp_delta or None, "min_code_count": min_code_count})
    info = train_to_dir(tables.path, model.path, config, processes=gpus, overwrite=True,
                        checkpoint_uri=checkpoint_root or (f"{pipeline_root}/checkpoints" if pipeline_root else None),
                        progress=False, rules_dir=ruleset.path if model_type == "consequence" else None)
    model.metadata.update({k: info.get(k) for k in ("model_type", "preset", "seed", "config_hash", "steps", "n_train",
                                                    "n_rules", "dp_epsilon", "dp_delta", "checkpoints", "world_size")})
    model.metadata.update({"dp_target_epsilon": dp_target_epsilon, "synthehr_version": __version__})
    for k in ("first_train_loss", "final_train_loss", "best_val_loss", "steps", "planned_steps", "epochs_run",
              "seconds", "dp_epsilon", "dp_delta"):
        if info.get(k) is not None:
            metrics.log_metric(k, float(info[k]))
    with open(loss_curve.path, "w") as f:
        f.write(loss_curve_html(model.path))
