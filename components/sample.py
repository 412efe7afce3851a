"""sample: draw one synthetic cohort shard (one seed) from a trained HALO / ConSequence checkpoint."""
from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components._images import SAMPLE_IMAGE


@dsl.component(base_image=SAMPLE_IMAGE, install_kfp_package=False)
def sample(model: Input[Model], seed: int, n_patients_per_seed: int, batch_size: int, temperature: float,
           condition: str, device: str, shard: Output[Dataset]) -> int:
    """Sample one shard; shards differ only by seed.

    Args:
        model: Checkpoint directory from train.
        seed: RNG seed of this shard.
        n_patients_per_seed: Patients to sample in this shard (those with no visit are dropped and counted).
        batch_size: Patients sampled together.
        temperature: Softmax temperature; 1.0 samples the model's own distribution.
        condition: Label conditioning: "" = the model samples the label row, "label_probs" = label rows drawn
            from the training label mix, or a JSON object such as {"gender": "F"} = only matching label rows.
        device: "auto" (cuda when the pod has a GPU, else cpu; an error when the pod was given a GPU that torch
            cannot use), "cpu" or "cuda". The random streams differ by
            device: use "cpu" for shards that reproduce bit for bit on any machine.
        shard: Shard tables directory (binned columns; continuous values and times still null).

    Returns:
        Number of patients in the shard.
    """
    from synthehr_core.model.config import SampleConfig, parse_condition
    from synthehr_core.model.sampling import sample_to_dir
    from synthehr_core.model.train import pick_device

    dev = pick_device(device).type   # "auto": the GPU; refuses a CPU fallback on a pod that was given one
    config = SampleConfig(seed=seed, n_patients=n_patients_per_seed, batch_size=batch_size, temperature=temperature,
                          condition=parse_condition(condition))
    meta = sample_to_dir(model.path, shard.path, config, device=dev, overwrite=True)
    shard.metadata.update({"seed": seed, "n_patients": meta["n_patients"], "n_visits": meta["n_visits"],
                           "n_dropped_no_visits": meta["n_dropped_no_visits"], "condition": condition, "device": dev,
                           "model_type": meta["model_type"], "versions": meta["versions"]})
    return meta["n_patients"]
