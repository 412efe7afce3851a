"""train: fit HALO or ConSequence on the train split (validation on val) and write a checkpoint directory."""
from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components._images import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def train(tables: Input[Dataset], ruleset: Input[Artifact], model_type: str, preset: str, epochs: int,
          batch_size: int, lr: float, seed: int, dp_target_epsilon: float, model: Output[Model],
          metrics: Output[Metrics], loss_curve: Output[HTML], precision: str = "fp32", dp_delta: float = 0.0,
          min_code_count: int = 0):
    """Train the generative model; ConSequence enforces the mined rules, HALO ignores them.

    Args:
        tables: Canonical tables directory from preprocess.
        ruleset: rules-stage output; read only when model_type is "consequence".
        model_type: "halo" or "consequence" (validated by the library).
        preset: Model size: "tiny" (CPU, seconds), "small" or "paper" (HALO paper size).
        epochs: Passes over the train split (early stopping on val may end sooner).
        batch_size: Patients per optimiser step.
        lr: Adam learning rate.
        seed: Model init and data order.
        dp_target_epsilon: DP-SGD privacy budget epsilon; 0 = no differential privacy.
        precision: "fp32" (exact), "bf16" or "fp16" (CUDA) autocast for the big matmuls.
        dp_delta: DP-SGD delta; 0 = automatic, min(1e-5, 1 / (10 n_train)).
        min_code_count: Drop clinical codes of fewer training patients from the vocabulary; 0 = keep all.
        model: Checkpoint directory (model.pt, config.json, vocab.json, history.parquet, label_probs.parquet,
            token_groups.json).
        metrics: Losses, steps and timing.
        loss_curve: Train/val loss per step.
    """
    from synthehr_core import __version__
    from synthehr_core.model.config import TrainConfig
    from synthehr_core.model.loss_curve import loss_curve_html
    from synthehr_core.model.train import train_to_dir

    config = TrainConfig.from_dict({"model_type": model_type, "preset": preset, "epochs": epochs,
                                    "batch_size": batch_size, "lr": lr, "seed": seed,
                                    "dp_target_epsilon": dp_target_epsilon, "precision": precision,
                                    "dp_delta": dp_delta or None, "min_code_count": min_code_count})
    info = train_to_dir(tables.path, model.path, config, progress=False,
                        rules_dir=ruleset.path if model_type == "consequence" else None)
    model.metadata.update({k: info.get(k) for k in ("model_type", "preset", "seed", "config_hash", "steps",
                                                    "n_train", "n_rules", "dp_epsilon", "dp_delta")})
    model.metadata.update({"dp_target_epsilon": dp_target_epsilon, "synthehr_version": __version__})
    for k in ("first_train_loss", "final_train_loss", "best_val_loss", "steps", "epochs_run", "seconds",
              "dp_epsilon", "dp_delta"):
        if info.get(k) is not None:
            metrics.log_metric(k, float(info[k]))
    with open(loss_curve.path, "w") as f:
        f.write(loss_curve_html(model.path))
