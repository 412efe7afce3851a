"""The training recipe: the lr schedule, the data-sized run (schedule.py) and where they reach the loop, the run's
identity, the pipeline and its option check."""
import logging
import math

import pytest
import torch

from synthehr_core.errors import ConfigError
from synthehr_core.model.config import TrainArgs, TrainConfig
from synthehr_core.model.schedule import AUTO_MAX_EPOCHS, AUTO_TARGET_STEPS, lr_at, plan_run
from synthehr_core.model.train import run_identity, train_to_dir

COSINE = dict(lr=2e-3, lr_schedule="cosine", lr_warmup=0.1, lr_final=0.1)


class TestSchedule:
    def test_constant_is_lr_at_every_step(self):
        args = TrainArgs(lr=3e-3, epochs=2, batch_size=16)
        plan = plan_run(args, 100)
        assert plan.warmup_steps == 0
        assert {lr_at(s, plan, args) for s in range(plan.total + 3)} == {3e-3}

    def test_cosine_warms_up_linearly_then_decays_to_lr_final(self):
        args = TrainArgs(epochs=10, batch_size=10, **COSINE)
        plan = plan_run(args, 100)   # 10 steps/epoch, 100 steps, warm-up 10
        assert (plan.total, plan.warmup_steps) == (100, 10)
        ramp = [lr_at(s, plan, args) for s in range(10)]
        assert ramp == pytest.approx([2e-3 * (s + 1) / 10 for s in range(10)]) and ramp[0] > 0
        assert lr_at(10, plan, args) == pytest.approx(2e-3)                       # the peak after warm-up
        assert lr_at(55, plan, args) == pytest.approx(2e-3 * (0.1 + 0.9 * 0.5))   # half-way down
        assert lr_at(100, plan, args) == pytest.approx(2e-4)                      # lr_final x lr at the end
        assert lr_at(150, plan, args) == pytest.approx(2e-4)                      # and after it
        decay = [lr_at(s, plan, args) for s in range(10, 101)]
        assert all(a > b for a, b in zip(decay, decay[1:]))

    def test_cosine_without_warmup_or_decay_is_the_constant_lr(self):
        args = TrainArgs(epochs=2, batch_size=16, lr=3e-3, lr_schedule="cosine", lr_warmup=0.0, lr_final=1.0)
        plan = plan_run(args, 100)
        assert all(lr_at(s, plan, args) == 3e-3 for s in range(plan.total))

    def test_auto_sizing_keeps_the_demo_and_gives_a_few_thousand_patients_enough_steps(self):
        auto = TrainArgs(epochs="auto", batch_size=16, eval_every="auto", lr_schedule="cosine")
        demo = plan_run(auto, 72)          # the MIMIC-III demo's train split: 5 steps per epoch
        assert (demo.epochs, demo.total, demo.eval_every) == (10, 50, 10) == (AUTO_MAX_EPOCHS, 50, 10)
        sim = plan_run(auto, 2160)         # 3,000 simulated patients' train split
        assert (sim.per_epoch, sim.epochs, sim.total, sim.warmup_steps, sim.eval_every) == (135, 6, 810, 40, 40)
        assert sim.total >= 700 and sim.total >= AUTO_TARGET_STEPS
        big = plan_run(TrainArgs(epochs="auto", batch_size=48, eval_every="auto"), 33_000)
        assert (big.epochs, big.total, big.eval_every) == (3, 2064, 103)   # at least 3 passes
        cluster = plan_run(TrainArgs(epochs=50, batch_size=48, eval_every="auto"), 33_000)   # full MIMIC-III
        assert cluster.eval_every == 500                                   # HI's period at most
        assert sim.describe("cosine") == ("2160 train patients, batch 16: 135 steps/epoch, auto epochs 6 -> 810 "
                                          "steps, cosine lr, warmup 40, validate every 40 (auto)")
        capped = plan_run(TrainArgs(epochs="auto", batch_size=16, max_steps=100, eval_every="auto"), 2160)
        assert (capped.total, capped.eval_every) == (100, 10)
        assert plan_run(TrainArgs(epochs=4, batch_size=16, eval_every=None), 72).eval_every is None

    def test_bad_values_name_the_option_the_value_and_the_fix(self):
        with pytest.raises(ConfigError) as err:
            TrainConfig.from_dict({"lr_schedule": "linear", "lr_warmup": 1.0, "lr_final": -0.5, "epochs": "many",
                                   "eval_every": "sometimes"})
        msg = str(err.value)
        for want in ("lr_schedule must be one of ['constant', 'cosine']; got 'linear'. Use 'cosine'",
                     "lr_warmup must be a number in [0, 1) (a share of the planned steps); got 1.0. Use 0.05",
                     "lr_final must be a number in [0, 1] (the last step's lr as a share of lr); got -0.5.",
                     "epochs must be an int >= 1 or 'auto'", "got 'many'", "eval_every must be an int >= 1, None",
                     "got 'sometimes'"):
            assert want in msg, (want, msg)
        assert msg.count("\n  - ") == 5
        assert TrainConfig.from_dict({"epochs": "auto", "eval_every": "auto", **COSINE}).loop.epochs == "auto"

    def test_keep_auto_takes_the_best_weights_only_from_a_val_split_that_can_rank_them(self):
        from synthehr_core.model.schedule import KEEP_BEST_MIN_VAL, keep_weights

        assert keep_weights("auto", 8) == "last"                       # the MIMIC-III demo's val split
        assert keep_weights("auto", KEEP_BEST_MIN_VAL) == keep_weights("auto", 240) == "best"
        assert keep_weights("best", 8) == "best" and keep_weights("last", 10_000) == "last"
        with pytest.raises(ConfigError, match="keep must be one of \\['auto', 'best', 'last'\\]; got 'first'"):
            TrainConfig.from_dict({"keep": "first"})


class TestInTheLoop:
    def test_the_run_identity_holds_the_schedule_and_constant_keeps_older_hashes(self):
        from synthehr_core.model.halo import HaloConfig

        mc = HaloConfig.tiny(20, 2)
        ident = lambda **o: run_identity(TrainConfig.from_dict(o), mc, 100, None)  # noqa: E731
        assert "lr_schedule" not in ident()                                       # constant: the hash before
        assert ident(**COSINE) != ident() and ident(**COSINE) != ident(**{**COSINE, "lr_warmup": 0.2})
        assert ident(**COSINE) != ident(**{**COSINE, "lr_final": 0.0})

    def test_the_optimizer_follows_the_schedule_the_log_shows_it_and_another_schedule_is_refused(
            self, toy_tables, tmp_path, caplog):
        caplog.set_level(logging.INFO, logger="synthehr_core.model.train")
        run = dict(preset="tiny", epochs=2, batch_size=16, eval_every="auto", progress=False, seed=0, log_every=1,
                   **COSINE)
        info = train_to_dir(toy_tables, tmp_path / "m", **run)
        plan = plan_run(TrainConfig.from_options(**{k: v for k, v in run.items()
                                                   if k not in ("progress", "log_every")}).loop, info["n_train"])
        assert (info["planned_steps"], info["eval_every"], info["lr_schedule"]) == (plan.total, plan.eval_every,
                                                                                    "cosine")
        assert f"{info['n_train']} train patients, batch 16" in caplog.text
        assert caplog.text.count("steps/epoch") == 1                     # the sizing, logged once
        lrs = [float(ln.split(" lr ")[1].split()[0]) for ln in caplog.text.splitlines() if " lr " in ln]
        assert lrs == pytest.approx([float(f"{lr_at(s, plan, TrainArgs(**COSINE, epochs=2)):.3g}")
                                     for s in range(plan.total)])
        last = torch.load(tmp_path / "m.checkpoints" / next(p.name for p in (tmp_path / "m.checkpoints").iterdir()
                                                            if not p.name.startswith(".")) /
                          f"step_{plan.total:08d}.pt", weights_only=True)
        assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr_at(plan.total - 1, plan,
                                                                                  TrainArgs(**COSINE, epochs=2)))
        with pytest.raises(ConfigError, match="lr schedule"):
            train_to_dir(toy_tables, tmp_path / "c", resume_from=tmp_path / "m", extend=True,
                         **{**run, "lr_schedule": "constant", "epochs": 3})

    def test_a_constant_schedule_steps_bit_identically_to_cosine_without_warmup_or_decay(self, toy_tables, tmp_path):
        run = dict(preset="tiny", max_steps=6, batch_size=16, lr=3e-3, eval_every=3, progress=False, seed=2)
        a = train_to_dir(toy_tables, tmp_path / "a", **run)
        b = train_to_dir(toy_tables, tmp_path / "b", **run, lr_schedule="cosine", lr_warmup=0.0, lr_final=1.0)
        assert a["config_hash"] != b["config_hash"] and a["best_val_loss"] == b["best_val_loss"]
        sa, sb = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("a", "b"))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


class TestPipeline:
    def test_ir_defaults_of_the_recipe_parameters(self):
        from pipelines import builder

        for fn in builder.all_pipelines().values():
            spec = fn.pipeline_spec
            params = spec.root.input_definitions.parameters
            assert params["lr_schedule"].default_value.string_value == "cosine"
            assert math.isclose(params["lr_warmup"].default_value.number_value, 0.05)
            assert math.isclose(params["lr_final"].default_value.number_value, 0.1)
            assert params["epochs"].default_value.number_value == 50
            assert params["train_eval_every"].default_value.number_value == 0
            assert "0 = auto" in params["epochs"].description and "cosine" in params["lr_schedule"].description
        assert builder.LOCAL_OVERRIDES["epochs"] == 0 and builder.LOCAL_OVERRIDES["lr_schedule"] == "cosine"

    def test_check_options_rejects_a_bad_schedule(self):
        from synthehr_core.run_options import check_run_options

        with pytest.raises(ConfigError) as err:
            check_run_options({"lr_schedule": "step", "lr_warmup": 1.0, "lr_final": 1.5, "epochs": -1})
        msg = str(err.value)
        for want in ("lr_schedule must be one of ['constant', 'cosine']; got 'step'.",
                     "lr_warmup must be >= 0 and < 1; got 1.0.", "lr_final must be >= 0 and <= 1; got 1.5.",
                     "epochs must be >= 0; got -1."):
            assert want in msg, (want, msg)
        assert check_run_options({"lr_schedule": "cosine", "lr_warmup": 0.0, "lr_final": 1.0, "epochs": 0}) == []

    def test_the_schedules_are_the_models_own(self):
        from synthehr_core.model.schedule import SCHEDULES
        from synthehr_core.run_options import CHOICES

        assert CHOICES["lr_schedule"] == SCHEDULES
