"""The one synthehr DAG. A dataset is only a config passed in: ``build_pipeline()`` is the generic pipeline
(``dataset_config`` and ``raw_uri`` are run parameters), ``build_pipeline("mimic3")`` the same DAG with a bundled
config's defaults. The bundled pipelines are derived from ``synthehr_core/configs/*.yml``: no list to keep.

    exit handler (notify records the final status)
    └─ importer(raw_uri) → check → preprocess ─┬─ rules ───────────────┐
                                       ├─ train (GPU) ─────────┤
                                       └─ kde-grids ───────────┤
       ParallelFor(sample_seeds): sample (GPU, retried) → kde-sample
       → merge(Collected shards, seed order) → evaluate(real, cohort, rules)

Rules are always mined: ConSequence trains with them and evaluation counts rule violations for HALO too.
Defaults are sized for a cluster; ``LOCAL_OVERRIDES`` are what ``synthehr run --local`` uses instead, so that
a whole MIMIC-III demo runs on a laptop CPU in a few minutes.
"""
import inspect

from kfp import dsl, kubernetes

from components.check import check
from components.evaluate import evaluate
from components.kde_grids import kde_grids
from components.kde_sample import kde_sample
from components.merge import merge
from components.notify import notify
from components.preprocess import preprocess
from components.rules import rules
from components.sample import sample
from components.train import train

GENERIC = "synthehr"                 # the generic pipeline's file stem and name
MAX_PARALLEL_SHARDS = 4              # arbitrary; GPUs one run may hold at once while sampling (static in the IR)
TRAIN_MEMORY_LIMIT = "32G"           # arbitrary; tune (the "paper" preset on the full MIMIC-III fits)
SAMPLE_MEMORY_LIMIT = "16G"          # arbitrary; tune
SAMPLE_RETRIES = 2                   # a preempted GPU node should not fail the whole run
SHM_SIZE = "8Gi"                     # /dev/shm for torch DataLoader workers

# What `synthehr run --local` passes unless `-p` says otherwise: a tiny model, a few epochs, two small shards
# (`make demo` on the bundled 100-patient MIMIC-III demo). lr 3e-3, measured on the demo over 10 epochs: val
# loss 0.0027 (1e-2: 0.0031, 1e-3: 0.0033). An undertrained model samples hundreds of codes per visit, and
# sampling time grows with the codes drawn, so a too-small lr also makes the demo slower.
LOCAL_OVERRIDES = {
    "preset": "tiny", "epochs": 10, "batch_size": 16, "lr": 3e-3, "sample_seeds": [0, 1],
    "n_patients_per_seed": 50, "sample_batch_size": 64, "sample_device": "cpu",
    "rules_label_min_prevalence": 5, "rules_pair_min_prevalence": 3, "rules_persistence_min_prevalence": 3,
    "rules_prerequisite_min_prevalence": 3,
    "release_gate": False,   # the 100-patient demo is all small cells: report the decision, do not fail the run
}

_DOC = """Synthetic {dataset} cohort: preprocess → rules → train → KDE grids → sample per seed → KDE values → merge → evaluate.

Args:
    raw_uri: Raw {dataset} extract directory (gs://, s3:// or minio:// on a cluster; a local path for local runs).
    dataset_config: Bundled dataset config name or a YAML path/URI readable in the pods (gs://, s3://, a mount).
    split_seed: Seed of the patient-level train/val/test split; -1 = the dataset config's split.seed.
    model_type: "halo" or "consequence" (rule-enforcing); validated by the train stage.
    preset: Model size: "tiny" (CPU, seconds), "small" or "paper" (HALO paper size).
    epochs: Training passes over the train split; early stopping on val may end sooner.
    batch_size: Patients per training step.
    lr: Adam learning rate.
    train_seed: Model init and data order seed.
    dp_target_epsilon: DP-SGD privacy budget epsilon for training; 0 = no differential privacy.
    rules_label_min_prevalence: Visits with a code before a label rule is mined.
    rules_pair_min_prevalence: Visits with a code pair before a pair rule is mined.
    rules_persistence_min_prevalence: Patients with a code before a persistence rule is mined.
    rules_prerequisite_min_prevalence: Patients with a code before a prerequisite rule is mined.
    rules_min_confidence: Fraction of cases a rule must hold in (1.0 = exceptionless).
    kde_config: KDE config (bundled file name or YAML path) for continuous values and times; "" = the dataset config's kde:.
    sample_seeds: One shard per seed; at most {parallel} shards are sampled at once.
    n_patients_per_seed: Synthetic patients per shard (cohort size = this x number of seeds, minus empty ones).
    sample_batch_size: Patients sampled together in one shard.
    temperature: Sampling temperature; 1.0 samples the model's own distribution.
    sample_device: "auto" (GPU when present), "cpu" (bit-reproducible on any machine) or "cuda".
{condition_doc}    eval_seed: Seed of the evaluation's subsampling.
    eval_policy: Release policy YAML (path/URI readable in the pods); "" = the bundled release_policy.yml.
    release_gate: True = the evaluate task fails when the decision is "do not release".
"""
_CONDITION_DOC = ('    condition: Label conditioning: "label_probs" = the training label mix, or a JSON object such as\n'
                  '        {"gender": "F"} = only patients with those labels.\n')


def bundled_datasets() -> list[str]:
    """The bundled dataset configs (``synthehr_core/configs/*.yml``): each gets a convenience pipeline."""
    from synthehr_core.data.config import bundled_configs  # pydantic + yaml only; no torch

    return bundled_configs()


def dataset_defaults(dataset: str | None) -> dict:
    """Parameter defaults: from a bundled dataset config, or placeholders for the generic pipeline (None)."""
    from synthehr_core.data.config import load_config

    if dataset is None:
        return {"raw_uri": "gs://CHANGE-ME/raw-extract", "dataset_config": "gs://CHANGE-ME/dataset.yml",
                "split_seed": -1, "kde_config": ""}
    if dataset not in bundled_datasets():
        raise ValueError(f"dataset {dataset!r} is not a bundled config (synthehr_core/configs/*.yml: "
                         f"{bundled_datasets()}); choose one of those, or run the generic pipeline with your config: "
                         "synthehr run --local --config PATH / synthehr submit --config URI.")
    cfg = load_config(dataset)
    return {"raw_uri": cfg.profiles["kubeflow"].raw if "kubeflow" in cfg.profiles else "gs://CHANGE-ME/raw-extract",
            "dataset_config": dataset, "split_seed": cfg.split.seed, "kde_config": cfg.kde or ""}


def pipeline_name(dataset: str | None, conditional: bool = False) -> str:
    return (GENERIC if dataset is None else f"synthehr-{dataset}") + ("-conditional" if conditional else "")


def build_pipeline(dataset: str | None = None, conditional: bool = False):
    """The ``@dsl.pipeline`` function: generic (``None``) or with a bundled ``dataset``'s defaults;
    ``conditional`` adds a label ``condition`` parameter."""
    d = dataset_defaults(dataset)

    def synthehr(raw_uri: str = d["raw_uri"], dataset_config: str = d["dataset_config"],
                 split_seed: int = d["split_seed"],
                 model_type: str = "halo",                 # HALO paper
                 preset: str = "small",                    # arbitrary; "paper" for the HALO paper size
                 epochs: int = 50,                         # train_to_dir default
                 batch_size: int = 48,                     # train_to_dir default
                 lr: float = 1e-4,                         # HI:config.py lr
                 train_seed: int = 0,
                 dp_target_epsilon: float = 0.0,           # 0 = no differential privacy
                 rules_label_min_prevalence: int = 500,    # KI:utils/find_rules.py
                 rules_pair_min_prevalence: int = 10,      # KI:utils/find_rules.py
                 rules_persistence_min_prevalence: int = 10,   # KI:utils/find_rules.py
                 rules_prerequisite_min_prevalence: int = 10,  # KI:utils/find_rules.py
                 rules_min_confidence: float = 1.0,        # KI mines exceptionless rules only
                 kde_config: str = d["kde_config"],
                 sample_seeds: list[int] = [0, 1, 2, 3],  # noqa: B006 (KFP reads the default); arbitrary
                 n_patients_per_seed: int = 1000,          # arbitrary; tune
                 sample_batch_size: int = 256,             # sample_to_dir default
                 temperature: float = 1.0,                 # the model's own distribution
                 sample_device: str = "auto",
                 eval_seed: int = 0,
                 eval_policy: str = "",                    # "" = the bundled release_policy.yml
                 release_gate: bool = True,                # evaluate fails on "do not release"
                 # last: KFP passes the parameters by position, so the plain variant, which drops it from the
                 # signature, would shift every parameter after it (eval_seed was silently the constant 0)
                 condition: str = "label_probs"):          # only a parameter of the conditional variant
        exit_task = notify()
        with dsl.ExitHandler(exit_task, name="synthehr"):
            raw = dsl.importer(artifact_uri=raw_uri, artifact_class=dsl.Dataset, reimport=False)
            raw.set_display_name("raw-extract")
            checked = check(raw=raw.output, dataset_config=dataset_config, kde_config=kde_config)
            checked.set_caching_options(False)
            prep = preprocess(raw=raw.output, dataset_config=dataset_config, split_seed=split_seed)
            prep.set_caching_options(True).set_memory_limit("16G").after(checked)
            tables = prep.outputs["tables"]

            mined = rules(tables=tables, label_min_prevalence=rules_label_min_prevalence,
                          pair_min_prevalence=rules_pair_min_prevalence,
                          persistence_min_prevalence=rules_persistence_min_prevalence,
                          prerequisite_min_prevalence=rules_prerequisite_min_prevalence,
                          min_confidence=rules_min_confidence)
            mined.set_caching_options(True)

            fit = train(tables=tables, ruleset=mined.outputs["ruleset"], model_type=model_type, preset=preset,
                        epochs=epochs, batch_size=batch_size, lr=lr, seed=train_seed,
                        dp_target_epsilon=dp_target_epsilon)
            fit.set_caching_options(False).set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
            fit.set_cpu_request("4").set_memory_request("8G").set_memory_limit(TRAIN_MEMORY_LIMIT)
            kubernetes.empty_dir_mount(fit, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                       size_limit=SHM_SIZE)

            grids = kde_grids(tables=tables, kde_config=checked.output)   # the dataset config's kde: unless given
            grids.set_caching_options(True)

            with dsl.ParallelFor(sample_seeds, parallelism=MAX_PARALLEL_SHARDS, name="sample-shards") as seed:
                shard = sample(model=fit.outputs["model"], seed=seed, n_patients_per_seed=n_patients_per_seed,
                               batch_size=sample_batch_size, temperature=temperature,
                               condition=condition if conditional else "", device=sample_device)
                shard.set_caching_options(False).set_retry(SAMPLE_RETRIES, backoff_duration="30s")
                shard.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
                shard.set_memory_request("4G").set_memory_limit(SAMPLE_MEMORY_LIMIT)
                restored = kde_sample(shard=shard.outputs["shard"], grids=grids.outputs["grids"], seed=seed)
                restored.set_caching_options(False)

            merged = merge(shards=dsl.Collected(restored.outputs["restored"]))
            merged.set_caching_options(False)
            evaluation = evaluate(real=tables, cohort=merged.outputs["cohort"], ruleset=mined.outputs["ruleset"],
                                  model=fit.outputs["model"], seed=eval_seed, dataset_config=dataset_config,
                                  policy=eval_policy, release_gate=release_gate,
                                  run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
            evaluation.set_caching_options(False).set_memory_limit("16G")
        # No pipeline outputs: KFP only returns outputs from the top level, not from inside an ExitHandler.

    sig = inspect.signature(synthehr)
    if not conditional:   # the plain variant samples labels from the model: no condition parameter at all
        synthehr.__signature__ = sig.replace(parameters=[p for n, p in sig.parameters.items() if n != "condition"])
    synthehr.__doc__ = _DOC.format(dataset=dataset or "EHR", parallel=MAX_PARALLEL_SHARDS,
                                   condition_doc=_CONDITION_DOC if conditional else "")
    synthehr.__name__ = synthehr.__qualname__ = pipeline_name(dataset, conditional).replace("-", "_")
    return dsl.pipeline(name=pipeline_name(dataset, conditional),
                        description=synthehr.__doc__.splitlines()[0])(synthehr)


def all_pipelines() -> dict:
    """``{file stem: pipeline function}`` for every committed pipeline (compile and the IR tests use this): the
    generic one, one per bundled config, and MIMIC-III's label-conditioned variant."""
    out = {GENERIC: build_pipeline(None)}
    out.update({dataset: build_pipeline(dataset) for dataset in bundled_datasets()})
    out["mimic3_conditional"] = build_pipeline("mimic3", conditional=True)
    return out
