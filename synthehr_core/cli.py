"""`synthehr`: compile, run locally or submit the Kubeflow pipelines, or run one stage without Kubeflow.

The pipeline commands (compile, run, submit) import the repository's `components` and `pipelines` packages and
kfp lazily, so the stage commands work in an image or on a cluster node that has only synthehr_core.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import typer
from typer.core import TyperGroup


class _Synthehr(TyperGroup):
    """The one place where errors become exit statuses (contract: ``synthehr_core/errors.py``): an expected error
    prints one line, ``error: ...``, to stderr and exits 2 (usage) or 1 (input, config, environment);
    ``--debug`` / ``SYNTHEHR_DEBUG=1`` re-raises it with its traceback; anything else is a bug and keeps its
    traceback."""

    def make_context(self, info_name, args, parent=None, **extra):
        """The global options' usage errors (``--log-level LOUD``) as one line too; help is left alone."""
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except typer.TyperException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError" or not hasattr(exc, "format_message") or \
                    "--debug" in args or os.environ.get("SYNTHEHR_DEBUG", "") not in ("", "0"):
                raise
            from .errors import one_line

            _fail(getattr(exc, "exit_code", 2), f"{info_name}: {one_line(exc.format_message())} "
                                                f"(see {info_name} --help)")

    def invoke(self, ctx: typer.Context):
        from .errors import describe, one_line

        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort):
            raise
        except typer.TyperException as exc:  # click's: a subcommand's options checked at parse time, BadParameter
            if _debug(ctx) or not hasattr(exc, "format_message"):
                raise
            sub = getattr(exc, "ctx", None)
            where = sub.command_path if sub is not None else ctx.command_path
            hint = f" (see {where} --help)" if getattr(exc, "exit_code", 1) == 2 else ""
            _fail(getattr(exc, "exit_code", 1), f"{where}: {one_line(exc.format_message())}{hint}")
        except Exception as exc:
            found = describe(exc)
            if found is None or _debug(ctx):
                raise
            _fail(*found)


def _debug(ctx: typer.Context) -> bool:
    return bool(ctx.params.get("debug")) or os.environ.get("SYNTHEHR_DEBUG", "") not in ("", "0")


def _fail(code: int, message: str):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code) from None


app = typer.Typer(
    name="synthehr",
    cls=_Synthehr,
    no_args_is_help=True,
    add_completion=False,
    help="""Synthetic EHR cohorts as a Kubeflow pipeline: raw extract -> tables -> HALO/ConSequence ->
sampled shards -> KDE values -> merge -> evaluation.

\b
Pipelines (need the "pipelines" extra: kfp, kfp-kubernetes):
  synthehr compile                       # -> pipelines/compiled/*.yaml
  synthehr run --local -d mimic3         # whole DAG here, kfp.local, CPU
  synthehr run --local --config my.yml   # your own dataset config (README "Adding a dataset")
  synthehr submit -d mimic3 --host URL -p raw_uri=gs://b/mimic3 -p epochs=50
  synthehr submit --config gs://b/my.yml --host URL -p raw_uri=gs://b/raw
\b
Your own extract:
  synthehr init-dataset mydata --raw DIR # draft mydata.yml + kde_mydata.yml
  synthehr check --config mydata.yml     # every problem at once, before any work
\b
One stage at a time, without Kubeflow (HPC, debugging):
  synthehr preprocess --config mimic3 --out w/tables
  synthehr rules --tables w/tables --out w/rules
  synthehr train --tables w/tables --out w/model --preset small
  synthehr kde-grids --tables w/tables --kde-config kde_mimic3.yml \\
      --out w/grids
  synthehr sample --model w/model --seed 3 --out w/shard-3
  synthehr kde-sample --shard w/shard-3 --grids w/grids --seed 3 \\
      --out w/kde-3
  synthehr merge w/kde-* --out w/cohort
  synthehr evaluate --real w/tables --synthetic w/cohort \\
      --rules w/rules --out w/eval
\b
Slurm array over seeds, then one merge job (sample.sh):
  #SBATCH --array=0-15 --gres=gpu:1
  S=$SLURM_ARRAY_TASK_ID
  synthehr sample --model w/model --seed $S --out w/shard-$S
  synthehr kde-sample --shard w/shard-$S --grids w/grids --seed $S \\
      --out w/kde-$S
\b
  jid=$(sbatch --parsable sample.sh)
  sbatch --dependency=afterok:$jid --wrap 'synthehr merge w/kde-* --out w/cohort'
""",
)

DEFAULT_COMPILED = Path("pipelines/compiled")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
SEED_MAX = 2**63 - 1     # seeds are int64 (numpy SeedSequence takes more; torch.manual_seed does not)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a test runner swaps it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def configure_logging(level: str) -> None:
    """The ``synthehr_core`` loggers at ``level`` to stderr, one handler however often this is called."""
    logger = logging.getLogger("synthehr_core")
    for h in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level.upper())


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", envvar="SYNTHEHR_DEBUG",
                               help="show the traceback of an error [env SYNTHEHR_DEBUG=1]"),
    log_level: str = typer.Option("INFO", "--log-level", callback=lambda v: _log_level(v),
                                  help=f"log lines of the stages shown on stderr: {', '.join(LOG_LEVELS)}"),
):
    """Global options (before the command: synthehr --debug preprocess ...)."""
    configure_logging(log_level)


def _log_level(value: str) -> str:
    if value.upper() not in LOG_LEVELS:
        raise typer.BadParameter(f"{value!r:.40} is not a log level; use one of {', '.join(LOG_LEVELS)}.")
    return value.upper()


def _positive(value: float) -> float:
    import math

    if not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value!r} must be a finite number > 0.")
    return value


def seed_option(default, help: str):  # noqa: A002
    """A seed: an int in [0, 2**63), checked when the command line is parsed."""
    return typer.Option(default, min=0, max=SEED_MAX, help=help)


def _condition(value: str) -> str:
    """``--condition``: "", "label_probs" or a JSON object, checked when the command line is parsed."""
    text = value.strip()
    if text in ("", "label_probs"):
        return value
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        from .errors import show

        raise typer.BadParameter(f"{show(text)} is not valid JSON ({exc.msg} at character {exc.pos}); write it "
                                 "like '{\"gender\": \"F\"}' (double quotes), or pass \"\" or label_probs.") from None
    if not isinstance(parsed, dict) or not parsed or not all(isinstance(k, str) for k in parsed):
        raise typer.BadParameter(f"{value!r:.80} must be a non-empty JSON object {{variable: value}}, "
                                 "\"\" or label_probs.")
    return value
LOCAL_WARNING = r".*(non-Python base image|have no effect in the current local runner).*"


def _echo_json(obj: dict) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _kfp_imports():
    """Import kfp and the repo's pipelines, with advice instead of a traceback when they are missing."""
    import sys

    # An installed `synthehr` script does not put the working directory on sys.path, and an editable install
    # made before components/ and pipelines/ existed does not map them: use the repository we run from.
    if (Path.cwd() / "pipelines" / "builder.py").exists() and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        import kfp  # noqa: F401

        from pipelines import builder
    except ModuleNotFoundError as exc:
        name = exc.name or str(exc)
        if name.startswith("kfp"):
            hint = "install the pipelines extra: pip install -e '.[pipelines]' (kfp==2.17.3, kfp-kubernetes)."
        else:
            hint = ("run from the repository root (the `components` and `pipelines` packages live there) or "
                    "pip install -e . from it.")
        raise typer.BadParameter(f"cannot import {name!r}: {hint}") from exc
    return builder


def parse_params(pairs: list[str], defaults: dict | None = None, option: str = "-p",
                 example: str = "-p epochs=3 or -p n_shards=2") -> dict:
    """``["epochs=3", "n_shards=2", "model_type=halo"]`` -> typed dict (JSON values, else strings)."""
    out = dict(defaults or {})
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{option} {pair!r}: expected key=value, e.g. {example}.")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def pipeline_args(fn, pairs: list[str], defaults: dict | None = None) -> dict:
    """``-p key=value`` pairs typed by the pipeline's own parameter types; String parameters keep the raw text
    (so ``-p condition={"gender": "F"}`` stays a string), the others are parsed as JSON and checked."""
    inputs = fn.component_spec.inputs or {}
    out = dict(defaults or {})
    problems = []
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"-p {pair!r}: expected key=value, e.g. -p epochs=3 or -p n_shards=2.")
        elif key not in inputs:
            problems.append(f"-p {key}: unknown pipeline parameter; this pipeline has {sorted(inputs)}.")
        elif inputs[key].type == "String":
            out[key] = value
        else:
            expect = {"Integer": int, "Float": (int, float), "Boolean": bool}.get(inputs[key].type, (list, dict))
            try:
                out[key] = json.loads(value)
            except json.JSONDecodeError:
                out[key] = None
            if not isinstance(out[key], expect) or (expect is int and isinstance(out[key], bool)):
                problems.append(f"-p {key}={value}: {key} is {inputs[key].type}; got {value!r}.")
    unknown = sorted(set(out) - set(inputs))
    if unknown:
        problems.append(f"defaults name unknown parameters {unknown}.")
    if problems:
        raise typer.BadParameter("\n".join(problems))
    return out


# ------------------------------------------------------------------------------------------- pipelines
def _image_record(images: str | None) -> str | None:
    """The build record to pin images from: --images PATH, "none" = the release tags, default
    $SYNTHEHR_IMAGES_LOCK or build/images.json when it exists."""
    import os

    if images == "none":
        return None
    path = images or os.environ.get("SYNTHEHR_IMAGES_LOCK") or ("build/images.json" if Path("build/images.json").exists()
                                                                else None)
    if path is not None and not Path(path).exists():
        raise typer.BadParameter(f"--images {path}: no such build record; run `make images` (or make images-push), "
                                 "or pass --images none to use the release tags.")
    return path


@app.command("compile")
def compile_cmd(out: Path = typer.Option(DEFAULT_COMPILED, "--out", help="folder for the YAML files"),  # noqa: B008
                images: str | None = typer.Option(None, help="build record (build/images.json) to pin image@sha256 "
                                                  "from; default: none, the release tags of the committed YAML"),
                task_timeout: list[str] = typer.Option([], "--task-timeout",  # noqa: B008
                                                       help="TASK=SECONDS pod deadline (repeatable)")):
    """Compile every pipeline (the generic synthehr.yaml, one per bundled config, mimic3_conditional) to OUT/<name>.yaml."""
    builder = _kfp_imports()
    from components import _images

    refs = _images.refs(images) if images else None
    timeouts = _task_timeouts(builder, task_timeout)
    out.mkdir(parents=True, exist_ok=True)
    for name, fn in builder.all_pipelines(images=refs, timeouts=timeouts).items():
        path = out / f"{name}.yaml"
        builder.compile_to(fn, path)
        typer.echo(f"wrote {path}")


def _find_output(run_dir: Path, task: str, name: str) -> Path | None:
    hits = sorted(run_dir.glob(f"**/{task}/{name}"))
    return hits[-1] if hits else None


def _bundled_help() -> str:
    from .data.config import bundled_configs

    return "bundled dataset config: " + ", ".join(bundled_configs())


def _pipeline_for(builder, dataset: str | None, config: str | None, conditional: bool):
    """(pipeline function, its name, dataset_config value): --config -> the generic pipeline."""
    if config is not None and dataset is not None:
        raise typer.BadParameter("give --dataset NAME or --config PATH, not both.")
    if config is not None:
        if conditional:
            raise typer.BadParameter("--conditional has a bundled variant only (mimic3); with --config pass "
                                     "-p condition=... to a conditional build of your own.")
        return builder.build_pipeline(None), builder.pipeline_name(None), config
    dataset = dataset or "mimic3"
    try:
        return builder.build_pipeline(dataset, conditional=conditional), builder.pipeline_name(dataset, conditional), dataset
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command("run")
def run_cmd(
    dataset: str | None = typer.Option(None, "--dataset", "-d", help=_bundled_help() + " (default mimic3)"),
    config: str | None = typer.Option(None, "--config", "-c", help="your dataset config (a YAML path): the generic pipeline"),
    local: bool = typer.Option(True, "--local/--no-local", help="run here with kfp.local (the only mode so far)"),
    params: list[str] = typer.Option([], "--param", "-p", help="pipeline parameter key=value (repeatable)"),  # noqa: B008
    conditional: bool = typer.Option(False, help="use the label-conditioned variant (adds -p condition=...)"),
    pipeline_root: Path = typer.Option(Path("runs"), help="where kfp.local writes every task's outputs"),  # noqa: B008
    raw: str | None = typer.Option(None, help="raw extract directory; default: the dataset's bundled sample"),
):
    """Run a whole pipeline locally (kfp.local SubprocessRunner, this venv, CPU).

    Local runs start from pipelines.builder.LOCAL_OVERRIDES (tiny model, a run sized from the data, 2 small shards); -p wins over
    them. Example: synthehr run --local --dataset mimic3 -p epochs=20 -p model_type=consequence
    """
    if not local:
        raise typer.BadParameter("only --local runs are supported here; use `synthehr submit` for a cluster.")
    builder = _kfp_imports()
    from kfp import local as kfp_local

    from .data.config import load_config

    fn, name, dataset_config = _pipeline_for(builder, dataset, config, conditional)
    if config is not None:
        dataset_config = str(Path(config).resolve()) if Path(config).exists() else config
    raw_dir = raw or load_config(dataset_config).raw_path("local")
    defaults = {**builder.LOCAL_OVERRIDES, "raw_uri": str(Path(raw_dir).resolve())}
    if config is not None:
        defaults["dataset_config"] = dataset_config
    args = pipeline_args(fn, params, defaults)
    root = pipeline_root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    before = set(root.iterdir())
    warnings.filterwarnings("ignore", message=LOCAL_WARNING, category=RuntimeWarning)
    warnings.filterwarnings("ignore", message=LOCAL_WARNING, category=UserWarning)
    kfp_local.init(runner=kfp_local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    typer.echo(f"running {name} with {json.dumps(args)}")
    t0 = time.perf_counter()
    try:
        fn(**args)
        failure = None
    except RuntimeError as exc:   # kfp.local: "Pipeline ... finished with status FAILURE"; task logs are above
        failure = exc
    wall = time.perf_counter() - t0
    new = sorted(set(root.iterdir()) - before, key=lambda p: p.stat().st_mtime)
    run_dir = new[-1] if new else root
    if failure is not None:
        typer.echo(f"\n{failure}\nThe failing task's log and traceback are printed above; its outputs are under "
                   f"{run_dir}. Wall time {wall:.1f} s.", err=True)
        raise typer.Exit(1)
    cohort = _find_output(run_dir, "merge", "cohort")
    report = _find_output(run_dir, "evaluate", "report")
    summary = _find_output(run_dir, "evaluate", "summary")
    typer.echo("\n" + _run_summary(run_dir))
    typer.echo(f"\nrun folder:      {run_dir}\nmerged cohort:   {cohort}\nreport (HTML):   {report}\n"
               f"summary (MD):    {summary}\nwall time:       {wall:.1f} s")


def _run_summary(run_dir: Path) -> str:
    """What the run read and made, from the stages' meta.json / metrics.json files."""
    lines = []
    tables = _find_output(run_dir, "preprocess", "tables")
    if tables and (Path(tables) / "meta.json").exists():
        m = json.loads((Path(tables) / "meta.json").read_text())
        s = m.get("split_sizes", {})
        lines.append(f"real data ({m.get('dataset')}): {m.get('n_patients')} patients, {m.get('n_visits')} visits, "
                     f"{m.get('n_codes')} codes; vocabulary {m.get('vocab_size')} tokens "
                     f"({m.get('n_visit_tokens')} visit tokens, {m.get('n_labels')} labels); "
                     f"split train/val/test = {s.get('train')}/{s.get('val')}/{s.get('test')}")
    cohort = _find_output(run_dir, "merge", "cohort")
    if cohort and (Path(cohort) / "meta.json").exists():
        m = json.loads((Path(cohort) / "meta.json").read_text())
        lines.append(f"synthetic cohort: {m.get('n_patients')} patients, {m.get('n_visits')} visits from "
                     f"{m.get('n_shards', '?')} seed shards")
    report = _find_output(run_dir, "evaluate", "report")
    metrics = Path(report).parent / "details" / "metrics.json" if report else None
    if metrics and metrics.exists():
        mm = json.loads(metrics.read_text())
        mm = mm.get("metrics", mm)
        keys = [("fidelity.code_record.r2", "code prevalence R²"), ("privacy.exact_copies", "exact copies"),
                ("privacy.mia.accuracy", "MIA accuracy"), ("rules.percent_valid", "% rule-valid")]
        got = [f"{label} {mm[k]:.3g}" for k, label in keys if isinstance(mm.get(k), (int, float))]
        if got:
            lines.append("evaluation: " + ", ".join(got))
    verdicts = Path(report).parent / "details" / "verdicts.json" if report else None
    if verdicts and verdicts.exists():
        v = json.loads(verdicts.read_text())
        first = (v.get("reasons") or [""])[0].split(". Measures:")[0]
        lines.append(f"release decision: {str(v.get('decision', '?')).upper()}" + (f" ({first})" if first else ""))
    return "\n".join(lines)


@app.command("submit")
def submit_cmd(
    dataset: str | None = typer.Option(None, "--dataset", "-d", help=_bundled_help() + " (default mimic3)"),
    config: str | None = typer.Option(None, "--config", "-c",
                                      help="dataset config path or URI readable in the pods: the generic pipeline"),
    params: list[str] = typer.Option([], "--param", "-p", help="pipeline parameter key=value (repeatable)"),  # noqa: B008
    conditional: bool = typer.Option(False, help="submit the label-conditioned variant"),
    host: str | None = typer.Option(None, envvar="KFP_HOST", help="KFP API endpoint [env KFP_HOST]"),
    namespace: str | None = typer.Option(None, envvar="KFP_NAMESPACE", help="profile namespace [env KFP_NAMESPACE]"),
    token: str | None = typer.Option(None, envvar="KFP_TOKEN", help="bearer token [env KFP_TOKEN]"),
    experiment: str = typer.Option("synthehr", help="experiment the run goes into"),
    run_name: str | None = typer.Option(None, help="default: <pipeline>-<UTC timestamp>"),
    version: str | None = typer.Option(None, help="pipeline version name; default: package version + timestamp"),
    images: str | None = typer.Option(None, help="build record to pin images from (default: $SYNTHEHR_IMAGES_LOCK "
                                      "or build/images.json if present; 'none' = the release tags)"),
    task_timeout: list[str] = typer.Option([], "--task-timeout",  # noqa: B008
                                           help="TASK=SECONDS pod deadline for this run, e.g. train=259200 (repeatable)"),
    wait: bool = typer.Option(False, "--wait", help="wait for the run; exit 0 only if it SUCCEEDED"),
    timeout: int = typer.Option(7 * 24 * 3600, help="seconds --wait waits before giving up (exit 2)"),
    package: Path | None = typer.Option(None, help="upload this compiled YAML instead of compiling afresh"),  # noqa: B008
):
    """Compile the pipeline afresh (this checkout's code, SYNTHEHR_IMAGE_REGISTRY, the images of the build record
    pinned by digest), upload it as a new version, start a run with -p overrides and print its URL."""
    import tempfile

    builder = _kfp_imports()
    import kfp

    from components import _images

    from . import __version__

    if package is not None and not package.exists():
        raise typer.BadParameter(f"--package {package} does not exist: run `synthehr compile` (or make compile) "
                                 "first, or leave --package out to compile afresh.")
    record = _image_record(images)
    refs = _images.refs(record)
    unpushed = sorted(stage for stage, ref in refs.items() if record and "@sha256:" not in ref)
    if unpushed and package is None:
        raise typer.BadParameter(f"build record {record}: {unpushed} were built but never pushed (no registry "
                                 "digest), so the cluster cannot pull them; run `make images-push`, or pass "
                                 "--images none to use the release tags.")
    fn, name, dataset_config = _pipeline_for(builder, dataset, config, conditional)
    timeouts = _task_timeouts(builder, task_timeout)
    fn = (builder.build_pipeline(None, images=refs, timeouts=timeouts) if config is not None
          else builder.build_pipeline(dataset or "mimic3", conditional=conditional, images=refs, timeouts=timeouts))
    args = pipeline_args(fn, params, _submit_defaults(config) if config is not None else None)
    if "CHANGE-ME" in str(args.get("raw_uri", "CHANGE-ME")):
        raise typer.BadParameter(f"raw_uri is required (got {args.get('raw_uri', 'none')!r}): pass -p "
                                 "raw_uri=gs://BUCKET/path (or s3://, minio://) of the raw extract the pods read.")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="synthehr-submit-") as tmp:
        if package is None:
            package = Path(tmp) / f"{name}.yaml"
            builder.compile_to(fn, package)
        client = kfp.Client(host=host, namespace=namespace, existing_token=token)
        version = version or f"{__version__}-{stamp}"
        pipeline_id = client.get_pipeline_id(name)
        if pipeline_id is None:   # a new pipeline comes with its first version
            pipeline_id = client.upload_pipeline(str(package), pipeline_name=name, namespace=namespace).pipeline_id
            version_id = client.list_pipeline_versions(pipeline_id).pipeline_versions[0].pipeline_version_id
        else:
            version_id = client.upload_pipeline_version(str(package), pipeline_version_name=version,
                                                        pipeline_id=pipeline_id).pipeline_version_id
    exp = client.create_experiment(experiment, namespace=namespace)
    run = client.run_pipeline(experiment_id=exp.experiment_id, job_name=run_name or f"{name}-{stamp}",
                              params=args, pipeline_id=pipeline_id, version_id=version_id)
    typer.echo(f"submitted run {run.run_id} of {name} (version {version_id}) to {host or 'in-cluster KFP'}\n"
               f"run: {client._get_url_prefix()}/#/runs/details/{run.run_id}")   # the link kfp itself prints
    if not wait:
        return
    try:
        done = client.wait_for_run_completion(run.run_id, timeout=timeout)
    except TimeoutError:
        typer.echo(f"run {run.run_id} still running after {timeout} s", err=True)
        raise typer.Exit(2) from None
    state = str(getattr(done, "state", None) or getattr(getattr(done, "run", None), "status", "UNKNOWN"))
    typer.echo(f"run {run.run_id} finished: {state}")
    if state.upper() != "SUCCEEDED":
        raise typer.Exit(1)


def _task_timeouts(builder, pairs: list[str]) -> dict[str, int]:
    """``["train=86400"]`` -> {"train": 86400}, checked by the builder."""
    out = {}
    for pair in pairs:
        task, sep, seconds = pair.partition("=")
        if not sep or not seconds.strip().isdigit():
            raise typer.BadParameter(f"--task-timeout {pair!r}: expected TASK=SECONDS, e.g. train=259200.")
        out[task.strip()] = int(seconds)
    try:
        return builder.task_timeouts(out)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _submit_defaults(config: str) -> dict:
    """dataset_config = the URI; raw_uri from the config's kubeflow profile when the config is readable here."""
    from .data.config import load_config
    from .errors import ConfigError

    out = {"dataset_config": config}
    try:
        cfg = load_config(config)
    except ConfigError:
        return out          # e.g. a gs:// URI without credentials here: the pods read it; pass -p raw_uri=...
    if "kubeflow" in cfg.profiles:
        out["raw_uri"] = cfg.profiles["kubeflow"].raw
    return out


@app.command("check")
def check_cmd(config: str = typer.Option(..., "--config", "-c", help="bundled config name or YAML path/URI"),
              raw: str | None = typer.Option(None, help="raw extract directory; default: the profile's"),
              profile: str = typer.Option("local", help="config profile giving the raw location"),
              kde_config: str | None = typer.Option(None, help="KDE config; default: the dataset config's kde:"),
              sample_rows: int = typer.Option(2000, help="rows read per file (tables adapter)")):
    """Check a dataset before any work: config, KDE config, adapter, files, columns; every problem at once."""
    from .check import check_dataset

    res = check_dataset(config, raw=raw, profile=profile, kde_config=kde_config, sample_rows=sample_rows)
    if not res.ok:
        typer.echo(res.message(config), err=True)
        raise typer.Exit(1)
    typer.echo(f"ok: {config} is ready to run")
    _echo_json(res.summary)


@app.command("init-dataset")
def init_dataset_cmd(name: str = typer.Argument(..., help="dataset name (letters, digits, _ or -)"),
                     raw: Path = typer.Option(..., help="raw extract folder: .csv, .csv.gz, .parquet, subfolders"),  # noqa: B008
                     out: Path | None = typer.Option(None, help="dataset config to write; default NAME.yml; the KDE "  # noqa: B008
                                                     "config goes beside it as kde_NAME.yml"),
                     overwrite: bool = typer.Option(False, help="replace existing files"),
                     sample_rows: int = typer.Option(100_000, help="rows read per file")):
    """Draft a dataset config (adapter: tables) and KDE config from the raw files, with TODO comments."""
    from .data.draft import init_dataset
    from .errors import ConfigError, DataError

    try:
        cfg, kde, draft = init_dataset(name, raw, out, overwrite=overwrite, sample_rows=sample_rows)
    except (ConfigError, DataError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    roles = [f"visits: {draft.visits.file}", f"patients: {draft.patients.file if draft.patients else '(from visits)'}",
             *(f"codes: {t.file}" for t, *_ in draft.codes)]
    typer.echo(f"wrote {cfg} and {kde} ({'; '.join(roles)})\nnext: read the TODO lines, then "
               f"synthehr check --config {cfg}")


# ---------------------------------------------------------------------------------------------- stages
@app.command()
def preprocess(config: str = typer.Option(..., help=_bundled_help() + ", or a YAML path"),
               out: str = typer.Option(..., help="output tables directory (local or gs://)"),
               raw: str | None = typer.Option(None, help="raw extract directory; default: the profile's"),
               profile: str = typer.Option("local", help="config profile giving the raw location (local/hpc/kubeflow)"),
               seed: int | None = seed_option(None, "split seed; default: the config's split.seed"),
               overwrite: bool = False):
    """Raw extract -> canonical tables directory."""
    from .data.preprocess import preprocess as run

    meta = run(config, out, profile=profile, seed=seed, raw=raw, overwrite=overwrite)
    _echo_json({k: meta[k] for k in ("dataset", "n_patients", "n_visits", "n_codes", "vocab_size", "split_sizes")})


@app.command()
def rules(tables: str = typer.Option(..., help="tables directory from preprocess"),
          out: str = typer.Option(..., help="output directory for rules.json"),
          threshold: list[str] = typer.Option([], "--threshold", "-t",  # noqa: B008
                                              help="key=value, e.g. -t label_min_prevalence=5 (see rules.Thresholds)")):
    """Mine ConSequence rules from the train split."""
    from .rules.mining import mine_rules_to_dir

    info = mine_rules_to_dir(tables, out, **parse_params(threshold, option="-t", example="-t pair_min_prevalence=5"))
    _echo_json({k: info[k] for k in ("n_rules", "by_family", "n_patients")})


@app.command()
def train(tables: str = typer.Option(..., help="tables directory from preprocess"),
          out: str = typer.Option(..., help="model directory to publish (empty or absent; written whole at the end)"),
          model_type: str = typer.Option("halo", help="halo or consequence"),
          preset: str = typer.Option("tiny", help="tiny, small or paper"),
          epochs: int = typer.Option(50, help="passes over the train split (HI: 50); 0 = auto, sized from the "
                                     "training set (about 800 steps, 3 to 10 epochs)"),
          batch_size: int = 48,
          lr: float = typer.Option(1e-4, help="Adam learning rate (HI: 1e-4); the peak of --lr-schedule cosine"),
          lr_schedule: str = typer.Option("constant", help="constant (HI) or cosine (linear warm-up, then cosine "
                                          "decay; docs/training.md 'Training recipe')"),
          lr_warmup: float = typer.Option(0.05, help="cosine: warm-up share of the planned steps"),
          lr_final: float = typer.Option(0.1, help="cosine: the last planned step's lr as a share of --lr"),
          seed: int = 0,
          rules_dir: str | None = typer.Option(None, "--rules", help="rules directory (consequence)"),
          checkpoint_uri: str | None = typer.Option(None, help="root of the step checkpoints (local or gs://); "
                                                    "default: OUT.checkpoints. Rerunning the same command resumes "
                                                    "from the newest complete one"),
          resume_from: str | None = typer.Option(None, help="step checkpoint, checkpoint folder or model directory "
                                                 "to continue from"),
          extend: bool = typer.Option(False, help="train a finished --resume-from run on to a larger --epochs "
                                      "(weights, optimiser, best weights and history kept; patience restarts)"),
          overwrite: bool = typer.Option(False, help="replace a non-empty --out when publishing"),
          eval_every: int | None = typer.Option(500, help="validate every N steps (HI: 500); 0 = auto, about 20 "
                                                "validations per run (every 10 to 500 steps)"),
          patience: int | None = typer.Option(None, help="stop after N validations without improvement (KI: 5); "
                                              "default: no early stopping"),
          keep: str = typer.Option("auto", help="weights published: best (best validation, HI), last, or auto "
                                   "(best where the val split has >= 100 patients, else last)"),
          ckpt_every: int | None = typer.Option(None, help="a step checkpoint every N steps; default: at each "
                                                "validation"),
          ckpt_minutes: float = typer.Option(10.0, help="also a checkpoint every M minutes; 0 = off"),
          dp_target_epsilon: float = typer.Option(0.0, help="DP-SGD epsilon; 0 = no differential privacy"),
          group_heads: bool = typer.Option(True, help="one categorical head per single-valued variable (event "
                                           "type, bins, calendar, labels); --no-group-heads = HALO's head only"),
          recurrence: bool = typer.Option(True, help="per-token offsets for what the patient already has (a chronic "
                                          "code of the last visit); --no-recurrence = history only through the "
                                          "transformer, as HALO"),
          calibration: str = typer.Option("full", help="after training, fit every output bias and the group heads' "
                                          "direct terms exactly on the train split, then visits/patient on the "
                                          "model's own samples (full), only the <end> bias (end), or nothing (off); "
                                          "skipped with DP"),
          device: str | None = typer.Option(None, help="cpu, cuda, ...; default: cuda if available")):
    """Train HALO or ConSequence and publish a model directory (checkpoints go beside it, see --checkpoint-uri)."""
    from .model.config import TrainConfig
    from .model.train import train_to_dir

    config = TrainConfig.from_dict({"model_type": model_type, "preset": preset, "epochs": epochs or "auto",
                                    "batch_size": batch_size, "lr": lr, "lr_schedule": lr_schedule,
                                    "lr_warmup": lr_warmup, "lr_final": lr_final, "seed": seed,
                                    "eval_every": eval_every or "auto", "patience": patience, "keep": keep,
                                    "ckpt_every": ckpt_every,
                                    "ckpt_minutes": ckpt_minutes or None, "dp_target_epsilon": dp_target_epsilon,
                                    "group_heads": group_heads, "recurrence": recurrence,
                                    "calibration": calibration})
    _echo_json(train_to_dir(tables, out, config, rules_dir=rules_dir, checkpoint_uri=checkpoint_uri,
                            resume_from=resume_from, extend=extend, overwrite=overwrite, device=device,
                            progress=sys.stderr.isatty()))  # a bar on a terminal; log lines elsewhere


@app.command("kde-grids")
def kde_grids(tables: str = typer.Option(..., help="tables directory from preprocess"),
              kde_config: str = typer.Option(..., help="bundled KDE config (kde_mimic3.yml) or YAML path"),
              out: str = typer.Option(..., help="output grids directory"), overwrite: bool = False):
    """Fit the KDE grids of continuous values and times on the train split."""
    from .postprocess.stage import generate_kde_grids_to_dir

    meta = generate_kde_grids_to_dir(tables, kde_config, out, overwrite=overwrite)
    _echo_json({k: meta[k] for k in ("config_hash", "n_patients", "n_visits")})


@app.command()
def sample(model: str = typer.Option(..., help="checkpoint directory from train"),
           out: str = typer.Option(..., help="output shard directory"),
           seed: int = seed_option(..., "shard seed (one shard per seed)"),
           n_patients: int = typer.Option(1000, min=1, help="patients in this shard"),
           batch_size: int = typer.Option(256, min=1, help="patients sampled together"),
           temperature: float = typer.Option(1.0, callback=lambda v: _positive(v),
                                             help="> 0; 1.0 = the model's distribution"),
           condition: str = typer.Option("", callback=_condition,
                                         help='"", "label_probs" or JSON like \'{"gender": "F"}\''),
           device: str | None = typer.Option(None, help="cpu (default, reproducible) or cuda"),
           overwrite: bool = False):
    """Sample one cohort shard from a checkpoint."""
    from .model.config import SampleConfig, parse_condition
    from .model.sampling import sample_to_dir

    config = SampleConfig(seed=seed, n_patients=n_patients, batch_size=batch_size, temperature=temperature,
                          condition=parse_condition(condition))
    meta = sample_to_dir(model, out, config, device=device, overwrite=overwrite)
    _echo_json({k: meta[k] for k in ("seed", "n_patients", "n_visits", "n_codes", "n_dropped_no_visits")})


@app.command("kde-sample")
def kde_sample(shard: str = typer.Option(..., help="shard directory from sample"),
               grids: str = typer.Option(..., help="grids directory from kde-grids"),
               out: str = typer.Option(..., help="output shard directory"),
               seed: int = seed_option(..., "RNG seed; use the shard's own seed"), overwrite: bool = False):
    """Fill a shard's continuous values and visit times from the KDE grids."""
    from .postprocess.stage import sample_kde_to_dir

    meta = sample_kde_to_dir(shard, grids, out, seed=seed, overwrite=overwrite)
    _echo_json({k: meta[k] for k in ("seed", "n_patients", "n_visits", "backoff_counts")})


@app.command()
def merge(shards: list[str] = typer.Argument(..., help="shard directories (any order; sorted by their seed)"),  # noqa: B008
          out: str = typer.Option(..., help="output cohort directory"),
          small_cell_k: int = typer.Option(0, min=0, help="drop synthetic codes and label combinations held by "
                                           "fewer than K real training patients (needs --real); 0 = keep all"),
          real: str | None = typer.Option(None, help="real tables directory from preprocess (for --small-cell-k)"),
          overwrite: bool = False):
    """Merge shards into one cohort, ordered by seed, with unique patient ids (optionally without small cells)."""
    from .data.merge import merge_shards
    from .errors import UsageError

    if small_cell_k and not real:
        raise UsageError(f"--small-cell-k {small_cell_k} needs --real TABLES (the preprocess output whose "
                                "training patients define the small cells); pass --real, or --small-cell-k 0.")
    meta = merge_shards(shards, out, overwrite=overwrite, small_cell_k=small_cell_k, real_dir=real)
    _echo_json({k: meta[k] for k in ("seeds", "n_patients", "n_visits", "n_codes")})


@app.command()
def evaluate(real: str = typer.Option(..., help="real tables directory from preprocess"),
             synthetic: str = typer.Option(..., help="synthetic cohort directory from merge"),
             out: str = typer.Option(..., help="output directory (metrics.json, verdicts.json, report.html, ...)"),
             rules_dir: str | None = typer.Option(None, "--rules", help="rules directory (rule violations)"),
             policy: str | None = typer.Option(None, help="release policy YAML (default: the bundled "
                                                          "release_policy.yml)"),
             fail_on: str | None = typer.Option(None, help="comma-separated checks or properties whose failure "
                                                           "exits 3 (default: the policy's fail_on; 'none' = never)"),
             model: str | None = typer.Option(None, help="model directory from train (provenance)"),
             dataset_config: str | None = typer.Option(None, "--config", help="dataset config (declared ordinal "
                                                                                "stages); default: from meta.json"),
             run_id: str = typer.Option("", help="run id recorded in the provenance block"),
             peers: bool = typer.Option(False, help="add SDMetrics / anonymeter sections (when installed)"),
             seed: int = seed_option(0, "seed of the evaluation's subsampling and bootstrap"),
             overwrite: bool = False):
    """Fidelity, longitudinal checks, rule violations, privacy and utility of a synthetic cohort, and a release
    decision under the policy. Exit code 3 = "do not release" (a --fail-on check failed)."""
    from . import storage
    from .evaluation.policy import load_policy, parse_fail_on
    from .evaluation.stage import evaluate_to_dir

    gate = parse_fail_on(load_policy(policy), fail_on)     # checked before any work
    rules_path = storage.join(rules_dir, "rules.json") if rules_dir else None
    res = evaluate_to_dir(real, synthetic, out, rules_path=rules_path, seed=seed, overwrite=overwrite, policy=policy,
                          fail_on=gate, dataset_config=dataset_config, model_dir=model, run_id=run_id, peers=peers)
    typer.echo(f"decision: {res['decision']} ({len(res['metrics'])} metrics) -> {out}")
    for r in res["verdicts"]["reasons"]:
        typer.echo(f"  - {r}")
    if res["decision"] == "do not release":
        raise typer.Exit(3)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
