"""What defines a training run and a sampled shard, as frozen, validated data.

``TrainConfig`` is everything that decides a trained model: the model (type, size preset, extra ``HaloConfig``
fields), the loop (``TrainArgs``), the precision, DP-SGD (``DPConfig``) and the vocabulary filter. Where a run
reads and writes, whether it resumes, on which device and with which progress bar stay arguments of
``train_to_dir``. ``SampleConfig`` is the same for one sampled shard (``sample_to_dir``).

Both build themselves from one flat dict of *option names* (``to_dict`` / ``from_dict``): the names of the CLI
flags (dashes for underscores), the component parameters and the torchrun flags, with the DP options
``dp_``-prefixed as ``DPConfig``'s messages spell them. So each entry point builds a config from what it parsed
without retyping the fields, and a JSON file of options is a config.

Construction validates: every problem is collected and raised once as a ``ConfigError`` naming the option, the
value and the fix.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import ConfigError, bullet_list
from .checkpoint import MODEL_TYPES
from .dp import DPConfig
from .halo import PRESETS, HaloConfig
from .precision import PRECISIONS
from .schedule import KEEP, SCHEDULES

__all__ = ["TrainArgs", "TrainConfig", "SampleConfig", "parse_condition"]

CALIBRATIONS = ("full", "end", "off")  # after training: calibrate.py

# HaloConfig fields a model override may not set: sizes come from the data (vocab.json), n_ctx is its own option
_NOT_OVERRIDABLE = {"n_visit_tokens": "it comes from vocab.json", "n_labels": "it comes from vocab.json",
                    "n_ctx": "use the n_ctx option"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bullets(exc: ConfigError) -> list[str]:
    """The bullet lines of a collected-problems ConfigError (or the whole message when it has none)."""
    lines = [ln[4:] for ln in str(exc).splitlines() if ln.startswith("  - ")]
    return lines or [str(exc)]


# ---------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainArgs:
    """The loop: how long, how big a step, when to validate, stop and checkpoint."""
    epochs: int | str = 50            # HI:train_model.py; "auto" = sized from the data (schedule.plan_run)
    batch_size: int = 48              # HI:train_model.py (KI: 32)
    lr: float = 1e-4                  # HI and KI, constant; the peak of a "cosine" schedule
    lr_schedule: str = "constant"     # HI and KI; "cosine" = linear warm-up, then cosine decay (schedule.py)
    lr_warmup: float = 0.05           # cosine: warm-up share of the planned steps; docs/fidelity.md's proposal, not swept
    lr_final: float = 0.1             # cosine: lr at the last planned step, as a share of lr; same source
    max_steps: int | None = None      # stop after this many optimiser steps (None = epochs decide)
    eval_every: int | str | None = 500  # HI: every 500 iterations; None = at each epoch end; "auto" = by run size
    patience: int | None = None       # KI:train_consequence.py uses 5 (evaluations); None = no early stopping
    keep: str = "auto"                # weights published: "best" val (HI, KI), "last", "auto" (schedule.keep_weights)
    ckpt_every: int | None = None     # step checkpoint period; None = at every evaluation
    ckpt_minutes: float | None = 10.0  # also a checkpoint this often (wall clock); None = off; arbitrary; tune
    keep_checkpoints: int | None = 2  # newest step checkpoints kept (None = all); arbitrary
    seed: int = 0                     # model init and data order

    def problems(self) -> list[str]:
        out = []
        if self.epochs != "auto" and (not _is_int(self.epochs) or self.epochs < 1):
            out.append(f"epochs must be an int >= 1 or 'auto' (sized from the training set); got {self.epochs!r}.")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            out.append(f"batch_size must be an int >= 1; got {self.batch_size!r}.")
        e = self.eval_every
        if e is not None and e != "auto" and (not _is_int(e) or e < 1):
            out.append(f"eval_every must be an int >= 1, None (at each epoch end) or 'auto' (about 20 validations "
                       f"per run); got {e!r}.")
        for name in ("max_steps", "patience", "ckpt_every", "keep_checkpoints"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                out.append(f"{name} must be None or an int >= 1; got {v!r}.")
        if self.keep not in KEEP:
            out.append(f"keep must be one of {list(KEEP)}; got {self.keep!r}. 'best' publishes the weights of the "
                       "best validation, 'last' the final ones, 'auto' the best where the val split can rank them.")
        if self.lr_schedule not in SCHEDULES:
            out.append(f"lr_schedule must be one of {list(SCHEDULES)}; got {self.lr_schedule!r}. Use 'cosine' for "
                       "warm-up and decay, 'constant' for HI's fixed lr.")
        w, f = self.lr_warmup, self.lr_final
        if not (_is_number(w) and 0 <= w < 1):
            out.append(f"lr_warmup must be a number in [0, 1) (a share of the planned steps); got {w!r}. "
                       "Use 0.05 for 5 %.")
        if not (_is_number(f) and 0 <= f <= 1):
            out.append(f"lr_final must be a number in [0, 1] (the last step's lr as a share of lr); got {f!r}. "
                       "Use 0.1 for a tenth of the peak.")
        m = self.ckpt_minutes
        if m is not None and not (_is_number(m) and math.isfinite(m) and m > 0):
            out.append(f"ckpt_minutes must be None (off) or a number > 0; got {m!r}.")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            out.append(f"lr must be > 0; got {self.lr!r}.")
        if not _is_int(self.seed):
            out.append(f"seed must be an int; got {self.seed!r}.")
        return out

    def validate(self) -> TrainArgs:
        problems = self.problems()
        if problems:
            raise ConfigError("invalid training arguments:\n" + bullet_list(problems))
        return self


LOOP_OPTIONS = tuple(f.name for f in fields(TrainArgs))
DP_OPTIONS = tuple(f"dp_{f.name}" for f in fields(DPConfig))


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Build it from option names with :meth:`from_dict`; ``to_dict`` gives them back."""
    model_type: str = "halo"            # "halo" or "consequence" (needs the rules stage's output)
    preset: str = "tiny"                # HaloConfig.preset size; "tiny" runs on a laptop CPU in seconds
    loop: TrainArgs = field(default_factory=TrainArgs)
    precision: str = "fp32"             # precision.py: exact unless asked otherwise
    dp: DPConfig = field(default_factory=DPConfig)  # DP-SGD; off unless a target epsilon or noise is given
    min_code_count: int = 0             # drop clinical codes of fewer training patients; 0 = keep all (dp.py)
    n_ctx: int | None = None            # rows per patient; None = the tables' meta.json n_ctx, else 48
    group_heads: bool = True            # a categorical head per single-valued variable (vocab.token_groups)
    recurrence: bool = True             # per-token offsets for what the patient already has (halo.Recurrence)
    calibration: str = "full"           # fit output biases + group direct terms after training (calibrate.py; not DP)
    model_overrides: dict[str, Any] = field(default_factory=dict, hash=False)  # extra HaloConfig fields

    def __post_init__(self):
        if isinstance(self.model_overrides, dict):  # our own copy: the caller's dict may change later
            object.__setattr__(self, "model_overrides", dict(self.model_overrides))
        problems = self.problems()
        if problems:
            raise ConfigError("invalid training configuration:\n" + bullet_list(problems))

    def problems(self) -> list[str]:
        out = []
        if self.model_type not in MODEL_TYPES:
            out.append(f"model_type must be one of {sorted(MODEL_TYPES)}; got {self.model_type!r}.")
        if self.preset not in PRESETS:
            out.append(f"preset must be one of {sorted(PRESETS)}; got {self.preset!r}.")
        if isinstance(self.loop, TrainArgs):
            out += self.loop.problems()
        else:
            out.append(f"loop must be a TrainArgs; got {self.loop!r}. Build the config with TrainConfig.from_dict.")
        if self.precision not in PRECISIONS:
            out.append(f"precision must be one of {sorted(PRECISIONS)}; got {self.precision!r}. Use 'fp32' (exact), "
                       "'bf16' (GPUs from Ampere on) or 'fp16' (CUDA, with loss scaling).")
        if isinstance(self.dp, DPConfig):
            try:
                self.dp.validate()
            except ConfigError as exc:
                out += _bullets(exc)
        else:
            out.append(f"dp must be a DPConfig; got {self.dp!r}. Build the config with TrainConfig.from_dict.")
        if not _is_int(self.min_code_count) or self.min_code_count < 0:
            out.append(f"min_code_count must be an int >= 0 (0 = keep all codes); got {self.min_code_count!r}.")
        if self.n_ctx is not None and (not _is_int(self.n_ctx) or self.n_ctx < 2):
            out.append(f"n_ctx must be None (from the tables' meta.json) or an int >= 2; got {self.n_ctx!r}.")
        if not isinstance(self.group_heads, bool):
            out.append(f"group_heads must be True or False; got {self.group_heads!r}.")
        if not isinstance(self.recurrence, bool):
            out.append(f"recurrence must be True or False; got {self.recurrence!r}.")
        if self.calibration not in CALIBRATIONS:
            out.append(f"calibration must be one of {list(CALIBRATIONS)}; got {self.calibration!r}. 'full' fits every "
                       "output bias and the group heads' direct terms after training, 'end' only the <end> bias.")
        out += self._override_problems()
        return out

    def _override_problems(self) -> list[str]:
        if not isinstance(self.model_overrides, dict):
            return [f"model_overrides must be a dict of HaloConfig fields; got {self.model_overrides!r}."]
        known = {f.name for f in fields(HaloConfig)} - set(_NOT_OVERRIDABLE)
        out = [f"model_overrides: {k}={v!r} cannot be overridden: {_NOT_OVERRIDABLE[k]}."
               for k, v in self.model_overrides.items() if k in _NOT_OVERRIDABLE]
        unknown = sorted(set(self.model_overrides) - known - set(_NOT_OVERRIDABLE))
        if unknown:
            out.append(f"model_overrides: {unknown} are not HaloConfig fields; they are {sorted(known)}.")
        return out

    @property
    def seed(self) -> int:
        return self.loop.seed

    # ------------------------------------------------------------------ option names
    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The flat option names of :meth:`to_dict` / :meth:`from_dict`, in that order."""
        return ("model_type", "preset", *LOOP_OPTIONS, "precision", *DP_OPTIONS, "min_code_count", "n_ctx",
                "group_heads", "recurrence", "calibration", "model_overrides")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly flat options; ``TrainConfig.from_dict(c.to_dict()) == c``."""
        dp = {f"dp_{k}": v for k, v in asdict(self.dp).items()}
        return {"model_type": self.model_type, "preset": self.preset, **asdict(self.loop),
                "precision": self.precision, **dp, "min_code_count": self.min_code_count, "n_ctx": self.n_ctx,
                "group_heads": self.group_heads, "recurrence": self.recurrence,
                "calibration": self.calibration,
                "model_overrides": dict(self.model_overrides)}

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> TrainConfig:
        """Build from flat option names (any subset; the rest keep their defaults)."""
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            raise ConfigError(f"unknown training options {unknown}; the options are {list(cls.option_names())}. "
                              "Extra HaloConfig fields go in model_overrides.")
        loop = TrainArgs(**{k: options[k] for k in LOOP_OPTIONS if k in options})
        dp = DPConfig(**{k[3:]: options[k] for k in DP_OPTIONS if k in options})
        rest = {k: options[k] for k in cls.option_names() if k in options and k not in LOOP_OPTIONS + DP_OPTIONS}
        return cls(loop=loop, dp=dp, **rest)

    @classmethod
    def from_options(cls, **options: Any) -> TrainConfig:
        """``from_dict`` where names that are not options are extra HaloConfig fields (``n_embd=64``): the
        keyword shortcut of ``train_to_dir(tables, out, epochs=3, n_embd=64)``."""
        names = set(cls.option_names())
        overrides = {k: v for k, v in options.items() if k not in names}
        known = {k: v for k, v in options.items() if k in names}
        if overrides:
            known["model_overrides"] = {**known.get("model_overrides", {}), **overrides}
        return cls.from_dict(known)


# ---------------------------------------------------------------------------------------------- sampling
def parse_condition(text: str) -> str | dict | None:
    """The text form of ``SampleConfig.condition`` (CLI flag, pipeline parameter): ``""`` = None,
    ``"label_probs"``, or a JSON object such as ``{"gender": "F"}``."""
    text = text.strip()
    if not text.startswith("{"):
        return text or None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"condition {text!r} is not valid JSON ({exc}); write it like "
                          '\'{"gender": "F"}\' (double quotes), or pass "" or "label_probs".') from exc


@dataclass(frozen=True)
class SampleConfig:
    """One sampled shard: shards of one model differ only by ``seed``."""
    seed: int                           # shard seed: the one torch.Generator of the shard
    n_patients: int                     # patients sampled (those with no visit are dropped and counted)
    batch_size: int = 256               # patients sampled together; arbitrary, memory-bound
    temperature: float = 1.0            # 1.0 samples the model's own distribution
    condition: str | dict | None = field(default=None, hash=False)  # None, "label_probs" or {variable: value}
    constrain: bool = True              # one value per single-valued variable (the checkpoint's token_groups.json)

    def __post_init__(self):
        if isinstance(self.condition, dict):
            object.__setattr__(self, "condition", dict(self.condition))
        problems = self.problems()
        if problems:
            raise ConfigError("invalid sampling configuration:\n" + bullet_list(problems))

    def problems(self) -> list[str]:
        out = []
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            out.append(f"seed must be an int in [0, 2**63); got {self.seed!r:.40}.")
        if not _is_int(self.n_patients) or self.n_patients < 1:
            out.append(f"n_patients must be an int >= 1 (a shard of 0 patients is empty); got {self.n_patients!r}.")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            out.append(f"batch_size must be an int >= 1; got {self.batch_size!r}.")
        if not (_is_number(self.temperature) and math.isfinite(self.temperature) and self.temperature > 0):
            out.append(f"temperature must be a finite number > 0; got {self.temperature!r}. "
                       "Use 1.0 for the model's distribution.")
        c = self.condition
        if not (c is None or c == "label_probs" or (isinstance(c, dict) and all(isinstance(k, str) for k in c))):
            out.append(f"condition must be None, 'label_probs' or a dict like {{'sex': 'F'}}; got {c!r}.")
        if not isinstance(self.constrain, bool):
            out.append(f"constrain must be True or False; got {self.constrain!r}.")
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> SampleConfig:
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(names))
        missing = [n for n in ("seed", "n_patients") if n not in options]
        if unknown or missing:
            raise ConfigError(f"sampling options: unknown {unknown}, missing {missing}; the options are {names} "
                              "(seed and n_patients have no default).")
        return cls(**options)


def config_or_options(cls, config, options: dict, build):
    """``config`` itself, or ``build(options)`` when only option keywords were given (the stage functions' two ways
    to be called); both, or a config of the wrong type, is a TypeError naming the fix."""
    if config is None:
        return build(options)
    if not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__}; got {type(config).__name__} {config!r}. Build one with "
                        f"{cls.__name__}.from_dict({{...}}), or pass the options as keywords.")
    if options:
        raise TypeError(f"give config or option keywords, not both; got config and {sorted(options)}. "
                        "Use dataclasses.replace(config, ...).")
    return config
