"""The one synthehr DAG. A dataset is only a config passed in: ``build_pipeline()`` is the generic pipeline
(``dataset_config`` and ``raw_uri`` are required run parameters), ``build_pipeline("mimic3")`` the same DAG with a
bundled config's defaults (``raw_uri`` stays required: no placeholder bucket). The bundled pipelines are derived
from ``synthehr_core/configs/*.yml``: no list to keep.

    exit handler (notify records the final status)
    └─ check-options (the run form, seconds; returns the shard seeds)
       → importer(raw_uri) → check → preprocess ─┬─ rules ───────────────┐
                                                 ├─ train (GPU) ─────────┤
                                                 └─ kde-grids ───────────┤
       ParallelFor(seeds): sample (GPU, retried) → kde-sample
       → merge(Collected shards, seed order) → evaluate(real, cohort, rules)

Rules are always mined: ConSequence trains with them and evaluation counts rule violations for HALO too.
Defaults are sized for a cluster; ``LOCAL_OVERRIDES`` are what ``synthehr run --local`` uses instead, so that
a whole MIMIC-III demo runs on a laptop CPU in a few minutes.

Where tasks get their cluster settings: ``_on_cluster`` (pull secret, timeout, object-store secret, and for the
GPU tasks node selector and tolerations), called once per task; per-task resources sit next to each task.
The pod settings that kfp-kubernetes 2.17.3 accepts as pipeline parameters are run parameters (node selector,
tolerations, secret names); the ones it accepts only as constants (``set_timeout``) are ``TASK_TIMEOUTS`` here.
"""
import copy
import inspect
from pathlib import Path

from kfp import dsl, kubernetes

from components import _images
from components.check import check, check_options
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
TRAIN_RETRIES = 3                    # arbitrary; each retry resumes from the run's newest complete checkpoint
SHM_SIZE = "8Gi"                     # /dev/shm for torch DataLoader workers

# Pod deadline per task (Kubernetes activeDeadlineSeconds), in seconds. kfp.kubernetes.set_timeout takes only a
# constant, so these are compile-time settings: build_pipeline(timeouts=...), `synthehr submit --task-timeout
# train=86400` (submit compiles afresh), or edit here and recompile. All arbitrary; generous.
TASK_TIMEOUTS = {
    "check-options": 10 * 60, "check": 60 * 60, "preprocess": 6 * 3600, "rules": 4 * 3600,
    "train": 72 * 3600, "kde-grids": 4 * 3600, "sample": 24 * 3600, "kde-sample": 4 * 3600,
    "merge": 2 * 3600, "evaluate": 12 * 3600, "notify": 10 * 60,
}
# Keys of the object-store secret, each exposed under the same env var name when present (optional: a missing
# secret or key is skipped). S3 / MinIO keys are read by boto3; GOOGLE_APPLICATION_CREDENTIALS names a key file,
# which the same secret provides under OBJECT_STORE_MOUNT (docs/deploy.md, "Object-store credentials").
OBJECT_STORE_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "GOOGLE_APPLICATION_CREDENTIALS")
OBJECT_STORE_MOUNT = "/var/run/secrets/synthehr/object-store"
# Defaults that work on a vanilla cluster: no node selector; a toleration of the usual GPU taint (harmless where
# no node has it); secret names that need not exist (a missing pull secret is skipped with a warning event, a
# missing object-store secret leaves the pods on their own identity: workload identity, IRSA, node role).
GPU_NODE_SELECTOR: dict = {}
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
IMAGE_PULL_SECRET = "synthehr-registry"
OBJECT_STORE_SECRET = "synthehr-object-store"

# What `synthehr run --local` passes unless `-p` says otherwise: a tiny model, a run sized from the data, two
# small shards (`make demo` on the bundled 100-patient MIMIC-III demo). epochs 0 = auto (schedule.plan_run: the
# demo's 72 train patients keep 10 epochs = 50 steps, 3,000 simulated patients get 6 epochs = 810 steps), the
# pipeline's cosine schedule, validation period and patience 5. Peak lr 5e-3 (docs/training.md "Training recipe",
# cosine peaks 1e-3 .. 1e-2 on the 3,000-patient simulator and the demo): below it the decayed lr undertrains (val
# loss, rule violations, and on the demo sampled prevalences); 1e-2 is as good on val loss but its visits per
# patient swung by 11 %. An undertrained model samples hundreds of codes per visit, and sampling time grows with
# the codes drawn, so a too-small lr also makes the demo slower.
LOCAL_OVERRIDES = {
    "preset": "tiny", "epochs": 0, "train_batch_size": 16, "lr": 5e-3, "lr_schedule": "cosine", "n_shards": 2,
    "first_seed": 0,
    "n_patients_per_seed": 50, "sample_batch_size": 64, "sample_device": "cpu",
    "rules_label_min_count": 5, "rules_pair_min_count": 3, "rules_persistence_min_count": 3,
    "rules_prerequisite_min_count": 3,
    "release_gate": False,   # the 100-patient demo is all small cells: report the decision, do not fail the run
    "small_cell_k": 0,       # ... and suppressing them would leave almost nothing of a 100-patient cohort
}

_DOC = """Synthetic {dataset} cohort: preprocess → rules → train → KDE grids → sample per seed → KDE values → merge → evaluate.

Args:
    raw_uri: Raw {dataset} extract directory (gs://, s3:// or minio:// on a cluster; a local path for local runs). Required.
    dataset_config: Bundled dataset config name or a YAML path/URI readable in the pods (gs://, s3://, a mount).
    split_seed: Seed of the patient-level train/val/test split; -1 = the dataset config's split.seed.
    kde_config: KDE config (bundled file name or YAML path) for continuous values and times; "" = the dataset config's kde:.
    model_type: "halo" or "consequence" (rule-enforcing); checked by the first task.
    preset: Model size: "tiny" (CPU, seconds), "small" or "paper" (HALO paper size).
    epochs: Training passes over the train split; early stopping on val may end sooner. 0 = auto: sized from the training set (about 800 steps, 3 to 10 epochs).
    train_batch_size: Patients per training step.
    lr: Adam learning rate; the peak of the cosine schedule.
    lr_schedule: "cosine" (linear warm-up, then cosine decay to lr_final x lr at the last planned step) or "constant" (HI's fixed lr).
    lr_warmup: Cosine warm-up, as a share of the planned steps.
    lr_final: Cosine: the last planned step's lr, as a share of lr.
    train_seed: Model init and data order seed.
    precision: Training matmul precision: "fp32" (exact), "bf16" (Ampere or newer GPUs) or "fp16" (CUDA, loss scaling).
    dp_target_epsilon: DP-SGD privacy budget epsilon for training; 0 = no differential privacy.
    dp_delta: DP-SGD delta; 0 = automatic, min(1e-5, 1 / (10 x training patients)).
    min_code_count: Drop clinical codes held by fewer training patients (a release safeguard); 0 = keep all.
    train_eval_every: Validate on the val split every N training steps (and checkpoint then); 0 = auto: about 20 validations per run, every 10 to 500 steps.
    train_patience: Early stopping: stop after N validations without a better val loss, keeping the best weights; 0 = train all epochs.
    train_ckpt_minutes: Also checkpoint every M minutes, so a preempted or retried train task loses at most that; 0 = off.
    train_gpus: GPUs for training (one torchrun DDP process each; the batch is split over them).
    train_checkpoint_root: Where step checkpoints go (gs://, s3:// or a path the pods see); "" = <pipeline root>/checkpoints. A retried task, or a new run of the same config and data, resumes from them.
    rules_label_min_count: Visits with a code before a label rule is mined.
    rules_pair_min_count: Visits with a code pair before a pair rule is mined.
    rules_persistence_min_count: Patients with a code before a persistence rule is mined.
    rules_prerequisite_min_count: Patients with a code before a prerequisite rule is mined.
    rules_min_confidence: Fraction of cases a rule must hold in (1.0 = exceptionless).
    n_shards: Sampled shards (one GPU task each, at most {parallel} at once); shard i has seed first_seed + i.
    first_seed: Seed of the first shard.
    n_patients_per_seed: Synthetic patients per shard (cohort size = this x n_shards, minus empty ones).
    sample_batch_size: Patients sampled together in one shard.
    temperature: Sampling temperature; 1.0 samples the model's own distribution.
    sample_device: "auto" (the GPU when the pod has one; refuses a CPU fallback on a GPU pod), "cpu" (bit-reproducible on any machine) or "cuda".
{condition_doc}    small_cell_k: Merge drops synthetic codes held by fewer than k real training patients, and patients whose label combination is that rare (the release policy's small-cell check uses k = 10); 0 = keep all (the report then flags them).
    eval_seed: Seed of the evaluation's subsampling.
    eval_policy: Release policy YAML (path/URI readable in the pods); "" = the bundled release_policy.yml.
    release_gate: True = the evaluate task fails when the decision is "do not release".
    gpu_node_selector: Node labels the train and sample pods require, e.g. {{"cloud.google.com/gke-accelerator": "nvidia-l4"}}; {{}} = any node with a GPU.
    gpu_tolerations: Tolerations of the train and sample pods (a JSON list); the default tolerates the usual nvidia.com/gpu taint.
    image_pull_secret: Image pull secret of every pod; a name that does not exist is skipped (public registry, or the service account's own pull secrets).
    object_store_secret: Secret with object-store credentials (AWS_* keys, or a GCS key file) for the pods' own reads; a name that does not exist = the pods' identity (workload identity, IRSA).
"""
_CONDITION_DOC = ('    condition: Label conditioning: "" = labels sampled by the model (docs/privacy.md: the released\n'
                  '        label mix holds rare vectors exactly), "label_probs" = the training label mix, or a JSON object such\n'
                  '        as {"gender": "F"} = only patients with those labels.\n')
_REQUIRED = object()    # a parameter default meaning "no default: required in the run form"


def bundled_datasets() -> list[str]:
    """The bundled dataset configs (``synthehr_core/configs/*.yml``): each gets a convenience pipeline."""
    from synthehr_core.data.config import bundled_configs  # pydantic + yaml only; no torch

    return bundled_configs()


def dataset_defaults(dataset: str | None) -> dict:
    """Parameter defaults of a bundled dataset config; for the generic pipeline (None) ``dataset_config`` is
    required too. ``raw_uri`` is required in both: a placeholder bucket would only fail later, in the pod."""
    from synthehr_core.data.config import load_config

    if dataset is None:
        return {"dataset_config": _REQUIRED, "split_seed": -1, "kde_config": ""}
    if dataset not in bundled_datasets():
        raise ValueError(f"dataset {dataset!r} is not a bundled config (synthehr_core/configs/*.yml: "
                         f"{bundled_datasets()}); choose one of those, or run the generic pipeline with your config: "
                         "synthehr run --local --config PATH / synthehr submit --config URI.")
    cfg = load_config(dataset)
    return {"dataset_config": dataset, "split_seed": cfg.split.seed, "kde_config": cfg.kde or ""}


def pipeline_name(dataset: str | None, conditional: bool = False) -> str:
    return (GENERIC if dataset is None else f"synthehr-{dataset}") + ("-conditional" if conditional else "")


# The image each task runs (its component's stage; the checks share preprocess's, notify merge's light image).
IMAGE_OF_TASK = {"check-options": "preprocess", "check": "preprocess", "notify": "merge"}


def _on_cluster(task, name: str, cluster: dict, gpu: bool = False, object_store: bool = True):
    """The cluster settings of one task: its image reference (``images``, pinned by digest when compiled from a
    build record), pull secret, timeout, object-store credentials (optional secret as env vars and as files),
    and for a GPU task the run's node selector and tolerations."""
    image = cluster["images"][IMAGE_OF_TASK.get(name, name)]
    task.set_container_image(image)
    if gpu:
        task.set_env_variable("SYNTHEHR_IMAGE", image)    # named by pick_device's error on a CPU-only torch
    kubernetes.set_image_pull_secrets(task, [cluster["image_pull_secret"]])
    kubernetes.set_timeout(task, cluster["timeouts"][name])
    if object_store:
        kubernetes.use_secret_as_env(task, cluster["object_store_secret"], {k: k for k in OBJECT_STORE_ENV},
                                     optional=True)
        kubernetes.use_secret_as_volume(task, cluster["object_store_secret"], OBJECT_STORE_MOUNT, optional=True)
    if gpu:
        kubernetes.add_node_selector_json(task, cluster["gpu_node_selector"])
        kubernetes.add_toleration_json(task, cluster["gpu_tolerations"])
    return task


def task_timeouts(overrides: dict | None = None) -> dict[str, int]:
    """TASK_TIMEOUTS with ``overrides`` ({task: seconds}) applied; unknown tasks and non-positive values refused."""
    overrides = dict(overrides or {})
    bad = [f"{k}={v!r}" for k, v in overrides.items()
           if k not in TASK_TIMEOUTS or not isinstance(v, int) or isinstance(v, bool) or v <= 0]
    if bad:
        raise ValueError(f"task timeouts {bad}: give TASK=SECONDS with an integer > 0 for tasks of "
                         f"{sorted(TASK_TIMEOUTS)}.")
    return {**TASK_TIMEOUTS, **overrides}


def build_pipeline(dataset: str | None = None, conditional: bool = False, images: dict | None = None,
                   timeouts: dict | None = None):
    """The ``@dsl.pipeline`` function: generic (``None``) or with a bundled ``dataset``'s defaults;
    ``conditional`` adds a label ``condition`` parameter; ``images`` ({stage: reference}, default
    ``_images.refs()``: the release tags, or a build record's digests) are the images the tasks run;
    ``timeouts`` ({task: seconds}) override TASK_TIMEOUTS."""
    d = dataset_defaults(dataset)
    images = images or _images.refs()
    deadlines = task_timeouts(timeouts)

    # Signature order = the docstring's and the YAML header's. (The KFP UI lists parameters alphabetically.)
    def synthehr(raw_uri: str, dataset_config: str = d["dataset_config"], split_seed: int = d["split_seed"],
                 kde_config: str = d["kde_config"],
                 model_type: str = "halo",                 # HALO paper
                 preset: str = "small",                    # arbitrary; "paper" for the HALO paper size
                 epochs: int = 50,                         # train_to_dir default
                 train_batch_size: int = 48,               # HI:train_model.py
                 lr: float = 1e-4,                         # HI:config.py lr
                 lr_schedule: str = "cosine",              # docs/training.md "Training recipe"
                 lr_warmup: float = 0.05,                  # docs/fidelity.md's proposal; not swept
                 lr_final: float = 0.1,                    # docs/fidelity.md's proposal; not swept
                 train_seed: int = 0,
                 precision: str = "fp32",                  # exact; bf16 is the fast choice on Ampere+ GPUs
                 dp_target_epsilon: float = 0.0,           # 0 = no differential privacy
                 dp_delta: float = 0.0,                    # 0 = automatic (dp.py)
                 min_code_count: int = 0,                  # 0 = keep all codes (dp.py)
                 train_eval_every: int = 0,                # auto; 500 (HI:train_model.py) on a large data set
                 train_patience: int = 5,                  # KI:train_consequence.py
                 train_ckpt_minutes: float = 10.0,         # arbitrary; tune
                 train_gpus: int = 1,                      # the original pipeline's largest dataset: 4
                 train_checkpoint_root: str = "",
                 rules_label_min_count: int = 500,         # KI:utils/find_rules.py
                 rules_pair_min_count: int = 10,           # KI:utils/find_rules.py
                 rules_persistence_min_count: int = 10,    # KI:utils/find_rules.py
                 rules_prerequisite_min_count: int = 10,   # KI:utils/find_rules.py
                 rules_min_confidence: float = 1.0,        # KI mines exceptionless rules only
                 n_shards: int = 4,                        # arbitrary; tune
                 first_seed: int = 0,
                 n_patients_per_seed: int = 1000,          # arbitrary; tune
                 sample_batch_size: int = 256,             # sample_to_dir default
                 temperature: float = 1.0,                 # the model's own distribution
                 sample_device: str = "auto",
                 small_cell_k: int = 10,                   # release_policy.yml's small_cell_k
                 eval_seed: int = 0,
                 eval_policy: str = "",                    # "" = the bundled release_policy.yml
                 release_gate: bool = True,                # evaluate fails on "do not release"
                 gpu_node_selector: dict = copy.deepcopy(GPU_NODE_SELECTOR),   # copies: KFP edits defaults
                 gpu_tolerations: list = copy.deepcopy(GPU_TOLERATIONS),
                 image_pull_secret: str = IMAGE_PULL_SECRET,
                 object_store_secret: str = OBJECT_STORE_SECRET,
                 condition: str = ""):   # docs/privacy.md. Last: the plain variant drops it (KFP passes by position)
        cluster = {"gpu_node_selector": gpu_node_selector, "gpu_tolerations": gpu_tolerations,
                   "image_pull_secret": image_pull_secret, "object_store_secret": object_store_secret,
                   "images": images, "timeouts": deadlines}
        condition = condition if conditional else ""
        exit_task = notify()
        _on_cluster(exit_task, "notify", cluster, object_store=False)
        with dsl.ExitHandler(exit_task, name="synthehr"):
            options = check_options(
                model_type=model_type, preset=preset, epochs=epochs, train_batch_size=train_batch_size, lr=lr,
                lr_schedule=lr_schedule, lr_warmup=lr_warmup, lr_final=lr_final, train_seed=train_seed,
                precision=precision, dp_target_epsilon=dp_target_epsilon, dp_delta=dp_delta,
                min_code_count=min_code_count, rules_min_confidence=rules_min_confidence, n_shards=n_shards,
                first_seed=first_seed, n_patients_per_seed=n_patients_per_seed, sample_batch_size=sample_batch_size,
                temperature=temperature, sample_device=sample_device, condition=condition, eval_seed=eval_seed,
                gpu_node_selector=gpu_node_selector, gpu_tolerations=gpu_tolerations,
                image_pull_secret=image_pull_secret, object_store_secret=object_store_secret,
                train_eval_every=train_eval_every, train_patience=train_patience,
                train_ckpt_minutes=train_ckpt_minutes, train_gpus=train_gpus,
                train_checkpoint_root=train_checkpoint_root, small_cell_k=small_cell_k)
            options.set_caching_options(False)
            _on_cluster(options, "check-options", cluster, object_store=False)

            raw = dsl.importer(artifact_uri=raw_uri, artifact_class=dsl.Dataset, reimport=False)
            raw.set_display_name("raw-extract")
            checked = check(raw=raw.output, dataset_config=dataset_config, kde_config=kde_config)
            checked.set_caching_options(False).after(options)
            _on_cluster(checked, "check", cluster)
            prep = preprocess(raw=raw.output, dataset_config=dataset_config, split_seed=split_seed)
            prep.set_caching_options(True).set_memory_limit("16G").after(checked)
            _on_cluster(prep, "preprocess", cluster)
            tables = prep.outputs["tables"]

            mined = rules(tables=tables, label_min_prevalence=rules_label_min_count,
                          pair_min_prevalence=rules_pair_min_count,
                          persistence_min_prevalence=rules_persistence_min_count,
                          prerequisite_min_prevalence=rules_prerequisite_min_count,
                          min_confidence=rules_min_confidence)
            mined.set_caching_options(True)
            _on_cluster(mined, "rules", cluster)

            fit = train(tables=tables, ruleset=mined.outputs["ruleset"], model_type=model_type, preset=preset,
                        epochs=epochs, batch_size=train_batch_size, lr=lr, seed=train_seed,
                        dp_target_epsilon=dp_target_epsilon, precision=precision, dp_delta=dp_delta,
                        min_code_count=min_code_count, eval_every=train_eval_every, patience=train_patience,
                        ckpt_minutes=train_ckpt_minutes, gpus=train_gpus, checkpoint_root=train_checkpoint_root,
                        pipeline_root=dsl.PIPELINE_ROOT_PLACEHOLDER, lr_schedule=lr_schedule, lr_warmup=lr_warmup,
                        lr_final=lr_final)
            fit.set_caching_options(False).set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(train_gpus)
            fit.set_retry(TRAIN_RETRIES, backoff_duration="60s")
            fit.set_cpu_request("4").set_memory_request("8G").set_memory_limit(TRAIN_MEMORY_LIMIT)
            kubernetes.empty_dir_mount(fit, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                       size_limit=SHM_SIZE)
            _on_cluster(fit, "train", cluster, gpu=True)

            grids = kde_grids(tables=tables, kde_config=checked.output)   # the dataset config's kde: unless given
            grids.set_caching_options(True)
            _on_cluster(grids, "kde-grids", cluster)

            with dsl.ParallelFor(options.output, parallelism=MAX_PARALLEL_SHARDS, name="sample-shards") as seed:
                shard = sample(model=fit.outputs["model"], seed=seed, n_patients_per_seed=n_patients_per_seed,
                               batch_size=sample_batch_size, temperature=temperature, condition=condition,
                               device=sample_device)
                shard.set_caching_options(False).set_retry(SAMPLE_RETRIES, backoff_duration="30s")
                shard.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
                shard.set_memory_request("4G").set_memory_limit(SAMPLE_MEMORY_LIMIT)
                _on_cluster(shard, "sample", cluster, gpu=True)
                restored = kde_sample(shard=shard.outputs["shard"], grids=grids.outputs["grids"], seed=seed)
                restored.set_caching_options(False)
                _on_cluster(restored, "kde-sample", cluster)

            merged = merge(shards=dsl.Collected(restored.outputs["restored"]), tables=tables,
                           small_cell_k=small_cell_k)
            merged.set_caching_options(False)
            _on_cluster(merged, "merge", cluster)
            evaluation = evaluate(real=tables, cohort=merged.outputs["cohort"], ruleset=mined.outputs["ruleset"],
                                  model=fit.outputs["model"], seed=eval_seed, dataset_config=dataset_config,
                                  policy=eval_policy, release_gate=release_gate,
                                  run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
            evaluation.set_caching_options(False).set_memory_limit("16G")
            _on_cluster(evaluation, "evaluate", cluster)
        # No pipeline outputs: KFP only returns outputs from the top level, not from inside an ExitHandler.

    sig = inspect.signature(synthehr)
    params = [p.replace(default=inspect.Parameter.empty) if p.default is _REQUIRED else p
              for n, p in sig.parameters.items() if conditional or n != "condition"]
    synthehr.__signature__ = sig.replace(parameters=params)   # no `condition` in the plain variant
    synthehr.__doc__ = _DOC.format(dataset=dataset or "EHR", parallel=MAX_PARALLEL_SHARDS,
                                   condition_doc=_CONDITION_DOC if conditional else "")
    synthehr.__name__ = synthehr.__qualname__ = pipeline_name(dataset, conditional).replace("-", "_")
    return dsl.pipeline(name=pipeline_name(dataset, conditional),
                        description=synthehr.__doc__.splitlines()[0])(synthehr)


def compile_to(fn, path) -> None:
    """Compile one pipeline to ``path``: the KFP compiler, then its "# Inputs:" comment with list/dict defaults
    printed with sorted keys (the compiler prints them in protobuf map order, which changes with the process's
    hash seed, so the committed YAML would differ between two compiles of the same code)."""
    import ast
    import re

    from kfp import compiler

    def canonical(value):
        if isinstance(value, dict):
            return {k: canonical(value[k]) for k in sorted(value)}
        return [canonical(v) for v in value] if isinstance(value, list) else value

    compiler.Compiler().compile(fn, str(path))
    text = Path(path).read_text()
    head, sep, body = text.partition("\ncomponents:\n")
    head = re.sub(r"(?m)^(#    \w+: (?:list|dict) \[Default: )(.*)\]$",
                  lambda m: m.group(1) + repr(canonical(ast.literal_eval(m.group(2)))) + "]", head)
    Path(path).write_text(head + sep + body)


def all_pipelines(images: dict | None = None, timeouts: dict | None = None) -> dict:
    """``{file stem: pipeline function}`` for every committed pipeline (compile and the IR tests use this): the
    generic one, one per bundled config, and MIMIC-III's label-conditioned variant."""
    kw = {"images": images, "timeouts": timeouts}
    out = {GENERIC: build_pipeline(None, **kw)}
    out.update({dataset: build_pipeline(dataset, **kw) for dataset in bundled_datasets()})
    out["mimic3_conditional"] = build_pipeline("mimic3", conditional=True, **kw)
    return out
