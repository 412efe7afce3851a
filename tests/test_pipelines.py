"""IR tests on the committed pipelines/compiled/*.yaml: schema-valid, parameters, fan-out/fan-in, images, resources.

These read the YAML that a cluster would get, so they also fail when the committed files are stale.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from components import _images
from pipelines import builder

COMPILED = Path(__file__).resolve().parents[1] / "pipelines" / "compiled"
NAMES = [builder.GENERIC, *builder.bundled_datasets(), "mimic3_conditional"]   # derived: no list to keep
STAGE_OF_EXECUTOR = {"exec-preprocess": "preprocess", "exec-rules": "rules", "exec-train": "train",
                     "exec-kde-grids": "kde-grids", "exec-sample": "sample", "exec-kde-sample": "kde-sample",
                     "exec-merge": "merge", "exec-evaluate": "evaluate"}
TYPES = {str: "STRING", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", list: "LIST", dict: "STRUCT", bool: "BOOLEAN"}


def load(name: str) -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all((COMPILED / f"{name}.yaml").read_text()))
    assert len(docs) == 2, "expected PipelineSpec + kubernetes PlatformSpec documents"
    return docs[0], docs[1]


def all_tasks(spec: dict) -> dict:
    tasks = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    return tasks


@pytest.fixture(scope="module", params=NAMES)
def compiled(request):
    spec, platform = load(request.param)
    return request.param, spec, platform


def test_every_pipeline_is_compiled_and_committed():
    assert sorted(p.stem for p in COMPILED.glob("*.yaml")) == sorted(NAMES) == sorted(builder.all_pipelines())


def test_compiled_yaml_is_up_to_date(tmp_path):
    stale = []
    for name, fn in builder.all_pipelines().items():
        fresh = tmp_path / f"{name}.yaml"
        builder.compile_to(fn, fresh)
        if fresh.read_text() != (COMPILED / f"{name}.yaml").read_text():
            stale.append(name)
    assert not stale, f"pipelines/compiled/{stale} differ from a fresh compile: run `make compile` and commit."


def test_spec_parses_into_the_kfp_protos(compiled):
    name, spec, platform = compiled
    parsed = json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())
    json_format.ParseDict(platform, pipeline_spec_pb2.PlatformSpec())
    assert parsed.sdk_version == "kfp-2.17.3"
    assert parsed.pipeline_info.name == ("synthehr" if name == builder.GENERIC else "synthehr-" + name.replace("_", "-"))


def test_parameters_are_typed_defaulted_and_described(compiled):
    name, spec, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    required = {"raw_uri"} | ({"dataset_config"} if name == builder.GENERIC else set())
    for key, p in params.items():
        assert p.get("parameterType"), key
        assert ("defaultValue" in p) == (key not in required), key
        assert p.get("isOptional", False) == (key not in required), key
        assert len(p.get("description", "")) > 10, f"{key} has no description"
    assert params["epochs"]["parameterType"] == "NUMBER_INTEGER"
    assert params["dp_target_epsilon"]["defaultValue"] == 0.0
    assert params["model_type"]["defaultValue"] == "halo"
    assert params["n_patients_per_seed"]["parameterType"] == "NUMBER_INTEGER"
    assert params["n_shards"]["parameterType"] == params["first_seed"]["parameterType"] == "NUMBER_INTEGER"
    assert {"precision", "dp_delta", "min_code_count", "train_batch_size", "rules_label_min_count"} <= set(params)
    assert not {"sample_seeds", "batch_size", "rules_label_min_prevalence"} & set(params)   # the old names are gone
    assert ("condition" in params) == name.endswith("conditional")
    # every default matches the builder's Python default and type
    fn = builder.all_pipelines()[name]
    import inspect
    for key, p in inspect.signature(fn.pipeline_func).parameters.items():
        if key in required:
            assert p.default is inspect.Parameter.empty, key
            continue
        assert TYPES[type(p.default)] == params[key]["parameterType"], key
        assert params[key]["defaultValue"] == p.default, key


def test_conditional_default_follows_the_privacy_advice():
    """docs/privacy.md: label_probs releases exact label-vector frequencies; the default samples labels from
    the model instead."""
    params = load("mimic3_conditional")[0]["root"]["inputDefinitions"]["parameters"]
    assert params["condition"]["defaultValue"] == ""


def test_local_overrides_name_real_parameters():
    params = load("mimic3")[0]["root"]["inputDefinitions"]["parameters"]
    assert set(builder.LOCAL_OVERRIDES) <= set(params)


def test_sampling_loop_has_static_parallelism_over_the_seeds_of_the_first_task(compiled):
    _, spec, _ = compiled
    loops = [t for t in all_tasks(spec).values() if "parameterIterator" in t]
    assert len(loops) == 1
    assert loops[0]["iteratorPolicy"]["parallelismLimit"] == builder.MAX_PARALLEL_SHARDS
    assert loops[0]["taskInfo"]["name"] == "sample-shards"
    items = loops[0]["parameterIterator"]["items"]["inputParameter"]
    feed = loops[0]["inputs"]["parameters"][items]["taskOutputParameter"]
    assert feed == {"outputParameterKey": "Output", "producerTask": "check-options"}
    loop_comp = spec["components"][loops[0]["componentRef"]["name"]]
    assert set(loop_comp["dag"]["tasks"]) == {"sample", "kde-sample"}


def test_merge_takes_an_artifact_list_and_evaluate_reads_the_merged_cohort(compiled):
    _, spec, _ = compiled
    assert spec["components"]["comp-merge"]["inputDefinitions"]["artifacts"]["shards"]["isArtifactList"]
    ev = all_tasks(spec)["evaluate"]["inputs"]["artifacts"]
    assert ev["cohort"]["taskOutputArtifact"] == {"outputArtifactKey": "cohort", "producerTask": "merge"}
    assert ev["real"]["taskOutputArtifact"]["producerTask"] == "preprocess"


def test_exit_handler_wraps_the_dag_and_notify_gets_the_final_status(compiled):
    _, spec, _ = compiled
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"exit-handler-1", "notify"}
    assert root["notify"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert root["notify"]["dependentTasks"] == ["exit-handler-1"]
    assert "status" in spec["components"]["comp-notify"]["inputDefinitions"]["parameters"]
    inner = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert {"check-options", "importer", "preprocess", "rules", "train", "kde-grids", "for-loop-2", "merge",
            "evaluate"} <= set(inner)


def test_each_executor_runs_its_own_pinned_image_without_pip(compiled):
    _, spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    assert set(executors) == {*STAGE_OF_EXECUTOR, "exec-notify", "exec-importer", "exec-check", "exec-check-options"}
    assert executors["exec-check"]["container"]["image"] == _images.image("preprocess")
    assert executors["exec-check-options"]["container"]["image"] == _images.image("preprocess")
    for ex, stage in STAGE_OF_EXECUTOR.items():
        image = executors[ex]["container"]["image"]
        assert image == _images.image(stage), ex
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
    assert executors["exec-notify"]["container"]["image"] == _images.NOTIFY_IMAGE
    for ex, e in executors.items():
        if "container" in e:
            command = " ".join(e["container"]["command"] + e["container"].get("args", []))
            assert "pip install" not in command and "pip3 install" not in command, ex


def test_gpu_memory_retries_caching_and_shm(compiled):
    _, spec, platform = compiled
    executors = spec["deploymentSpec"]["executors"]
    for ex in ("exec-train", "exec-sample"):
        res = executors[ex]["container"]["resources"]
        assert res["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert res["accelerator"]["resourceCount"] == ("1" if ex == "exec-sample" else  # train: the train_gpus param
                                                       "{{$.inputs.parameters['pipelinechannel--train_gpus']}}")
        assert res["resourceMemoryLimit"]
    tasks = all_tasks(spec)
    assert tasks["sample"]["retryPolicy"]["maxRetryCount"] == builder.SAMPLE_RETRIES
    for t in ("preprocess", "kde-grids", "rules"):
        assert tasks[t]["cachingOptions"]["enableCache"] is True, t
    for t in ("train", "sample"):
        assert not tasks[t]["cachingOptions"].get("enableCache", False), t
    mounts = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]["emptyDirMounts"]
    assert mounts == [{"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": builder.SHM_SIZE,
                       "volumeName": "dshm"}]


def test_conditional_variant_passes_condition_to_sample_and_plain_passes_empty():
    for name, expect in (("mimic3", {"runtimeValue": {"constant": ""}}),
                         ("mimic3_conditional", {"componentInputParameter": "pipelinechannel--condition"})):
        cond = all_tasks(load(name)[0])["sample"]["inputs"]["parameters"]["condition"]
        assert cond == expect, name


def test_dataset_defaults_come_from_the_dataset_configs():
    from synthehr_core.data.config import load_config

    for name in builder.bundled_datasets():
        params = load(name)[0]["root"]["inputDefinitions"]["parameters"]
        cfg = load_config(name)
        assert params["dataset_config"]["defaultValue"] == name
        assert params["split_seed"]["defaultValue"] == cfg.split.seed
        assert params["kde_config"]["defaultValue"] == cfg.kde
        assert "defaultValue" not in params["raw_uri"]        # required: no placeholder bucket


def test_unknown_dataset_is_refused():
    with pytest.raises(ValueError, match=r"not a bundled config \(synthehr_core/configs/\*.yml.*--config"):
        builder.build_pipeline("not_a_bundled_dataset")


def test_the_generic_pipeline_takes_dataset_config_and_raw_uri_and_checks_first():
    spec, _ = load(builder.GENERIC)
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert "defaultValue" not in params["dataset_config"] and "defaultValue" not in params["raw_uri"]
    assert params["kde_config"]["defaultValue"] == "" and params["split_seed"]["defaultValue"] == -1
    tasks = all_tasks(spec)
    assert "check" in tasks["preprocess"]["dependentTasks"]
    kde = tasks["kde-grids"]["inputs"]["parameters"]["kde_config"]
    assert kde["taskOutputParameter"] == {"outputParameterKey": "Output", "producerTask": "check"}


# --- cluster settings (second YAML document) -----------------------------------------------------------------
def k8s(platform: dict) -> dict:
    return platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_every_first_task_checks_every_free_text_option_before_any_data_is_read(compiled):
    name, spec, _ = compiled
    tasks = all_tasks(spec)
    opts = tasks["check-options"]
    assert "dependentTasks" not in opts and "artifacts" not in opts["inputs"]      # nothing to wait for or download
    assert "check-options" in tasks["check"]["dependentTasks"]                   # raw files only after the options
    assert "check" in tasks["preprocess"]["dependentTasks"]
    passed = opts["inputs"]["parameters"]
    for key in ("model_type", "preset", "sample_device", "precision", "condition", "gpu_tolerations", "train_gpus",
                "train_patience", "train_checkpoint_root"):
        assert key in passed, key
    if name.endswith("conditional"):
        assert passed["condition"] == {"componentInputParameter": "pipelinechannel--condition"}


def test_gpu_tasks_take_node_selector_and_tolerations_from_run_parameters(compiled):
    _, spec, platform = compiled
    ex = k8s(platform)
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["gpu_node_selector"]["parameterType"] == "STRUCT" and params["gpu_node_selector"]["defaultValue"] == {}
    assert params["gpu_tolerations"]["parameterType"] == "LIST"
    assert params["gpu_tolerations"]["defaultValue"] == builder.GPU_TOLERATIONS
    for e in ("exec-train", "exec-sample"):
        assert ex[e]["nodeSelector"] == {"nodeSelectorJson": {"componentInputParameter": "pipelinechannel--gpu_node_selector"}}
        assert ex[e]["tolerations"] == [{"tolerationJson": {"componentInputParameter": "pipelinechannel--gpu_tolerations"}}]
    for e in set(ex) - {"exec-train", "exec-sample"}:                      # CPU tasks stay off the GPU pools
        assert "nodeSelector" not in ex[e] and "tolerations" not in ex[e], e


def test_every_pod_gets_the_pull_secret_and_a_timeout(compiled):
    _, spec, platform = compiled
    ex = k8s(platform)
    containers = {k for k, v in spec["deploymentSpec"]["executors"].items() if "container" in v}
    assert set(ex) == containers                                          # the importer is no pod of ours
    for e, cfg in ex.items():
        # notify sits at the root (the run parameter itself), the others inside the exit handler's DAG
        param = "image_pull_secret" if e == "exec-notify" else "pipelinechannel--image_pull_secret"
        assert cfg["imagePullSecret"] == [{"secretNameParameter": {"componentInputParameter": param}}], e
        assert int(cfg["activeDeadlineSeconds"]) == builder.TASK_TIMEOUTS[e.removeprefix("exec-")], e
    assert spec["root"]["inputDefinitions"]["parameters"]["image_pull_secret"]["defaultValue"] == builder.IMAGE_PULL_SECRET


def test_object_store_secret_is_optional_env_and_files_of_the_stage_pods(compiled):
    _, spec, platform = compiled
    ex = k8s(platform)
    name_param = {"componentInputParameter": "pipelinechannel--object_store_secret"}
    for e in set(STAGE_OF_EXECUTOR) | {"exec-check"}:
        (env,) = ex[e]["secretAsEnv"]
        assert env["secretNameParameter"] == name_param and env["optional"] is True
        assert {m["secretKey"]: m["envVar"] for m in env["keyToEnv"]} == {k: k for k in builder.OBJECT_STORE_ENV}
        (vol,) = ex[e]["secretAsVolume"]
        assert vol == {"mountPath": builder.OBJECT_STORE_MOUNT, "optional": True, "secretNameParameter": name_param}
    for e in ("exec-check-options", "exec-notify"):                        # they read no object store
        assert "secretAsEnv" not in ex[e] and "secretAsVolume" not in ex[e]
    assert spec["root"]["inputDefinitions"]["parameters"]["object_store_secret"]["defaultValue"] == \
        builder.OBJECT_STORE_SECRET


def test_secret_defaults_are_valid_names_and_the_first_task_refuses_empty_ones():
    from synthehr_core.errors import ConfigError
    from synthehr_core.run_options import check_run_options

    assert check_run_options({"image_pull_secret": builder.IMAGE_PULL_SECRET,
                              "object_store_secret": builder.OBJECT_STORE_SECRET}) == []
    with pytest.raises(ConfigError, match=r"object_store_secret must be a Kubernetes secret name .*got ''"):
        check_run_options({"object_store_secret": ""})


def test_gpu_tasks_name_their_image_for_the_device_check(compiled):
    _, spec, _ = compiled
    for e, stage in (("exec-train", "train"), ("exec-sample", "sample")):
        env = {v["name"]: v["value"] for v in spec["deploymentSpec"]["executors"][e]["container"]["env"]}
        assert env["SYNTHEHR_IMAGE"] == _images.image(stage)


def test_a_bad_model_type_fails_the_local_run_at_the_first_task_within_seconds(tmp_path):
    """kfp.local, the real DAG: model_type=hallo stops the run at check-options, before the raw data is checked
    or preprocessed (those tasks never run); the exit handler still records FAILED."""
    import time

    from kfp import local
    from kfp.local import config as local_config

    from synthehr_core.data.config import load_config

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path), raise_on_error=True)
    t0 = time.perf_counter()
    try:
        with pytest.raises(RuntimeError, match=r"Inner task failed: \S*'check-options'"):
            builder.build_pipeline("mimic3")(raw_uri=load_config("mimic3").raw_path("local"), model_type="hallo")
    finally:
        local_config.LocalExecutionConfig.instance = None
    seconds = time.perf_counter() - t0
    (run,) = tmp_path.iterdir()
    assert {p.name for p in run.iterdir()} == {"notify"}      # no task wrote outputs: check, preprocess never ran
    assert "FAILED" in (run / "notify" / "executor_output.json").read_text()
    assert seconds < 20, f"the first task took {seconds:.1f} s to fail"
    print(f"bad model_type failed the local run in {seconds:.2f} s")
