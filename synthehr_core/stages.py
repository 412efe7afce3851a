"""The eight pipeline stages as one list: ``run_<stage>`` is the library function the stage's component, CLI
command and image call. Looked up lazily, so importing this module (or calling a light stage) never loads torch.

    from synthehr_core import stages
    stages.run_preprocess("mimic3", "w/tables")
    stages.run_train(...)        # imports torch only now

=============  ===============================================  =====================  ====================
stage          function                                         reads                  writes
=============  ===============================================  =====================  ====================
preprocess     data.preprocess.preprocess                       raw extract            tables dir
rules          rules.mining.mine_rules_to_dir                   tables                 rules.json
train          model.train.train_to_dir                         tables (+ rules)       checkpoint dir
kde_grids      postprocess (generate_kde_grids_to_dir)          tables                 KDE grids dir
sample         model.sampling.sample_to_dir                     checkpoint             shard (binned)
kde_sample     postprocess (sample_kde_to_dir)                  shard + grids          shard (values, dates)
merge          data.merge.merge_shards                          shards                 cohort
evaluate       evaluation.stage.evaluate_to_dir                 tables + cohort        report dir
=============  ===============================================  =====================  ====================
"""
from __future__ import annotations

import importlib
from typing import Any

# stage -> "module:function", in pipeline order. The one place to look a stage up (docs/architecture.md).
STAGES: dict[str, str] = {
    "preprocess": "synthehr_core.data.preprocess:preprocess",
    "rules": "synthehr_core.rules.mining:mine_rules_to_dir",
    "train": "synthehr_core.model.train:train_to_dir",
    "kde_grids": "synthehr_core.postprocess.stage:generate_kde_grids_to_dir",
    "sample": "synthehr_core.model.sampling:sample_to_dir",
    "kde_sample": "synthehr_core.postprocess.stage:sample_kde_to_dir",
    "merge": "synthehr_core.data.merge:merge_shards",
    "evaluate": "synthehr_core.evaluation.stage:evaluate_to_dir",
}
__all__ = [f"run_{name}" for name in STAGES]


def stage_function(stage: str):
    """The library function of ``stage`` (imported on first use)."""
    if stage not in STAGES:
        raise KeyError(f"no stage {stage!r}; the stages are {list(STAGES)}.")
    module, name = STAGES[stage].split(":")
    return getattr(importlib.import_module(module), name)


def __getattr__(attr: str) -> Any:
    if attr.startswith("run_") and attr[4:] in STAGES:
        return stage_function(attr[4:])
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}; stages: {__all__}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
