"""``synthehr check`` and the pipeline's check task: everything checked before work starts, every problem at once."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from synthehr_core.check import check_dataset, kde_config_ref
from synthehr_core.cli import app
from synthehr_core.data.config import bundled_configs, bundled_data_dir, load_config
from synthehr_core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "mimic3_tables.yml"


def test_every_bundled_config_and_the_example_pass():
    for name in [*bundled_configs(), str(EXAMPLE), str(ROOT / "examples" / "qh_tables.yml")]:
        res = check_dataset(name)
        assert res.ok, (name, res.problems)


def test_every_problem_is_reported_at_once(tmp_path):
    data = yaml.safe_load(EXAMPLE.read_text())
    data["labels"] = ["sex"]
    data["kde"] = "kde_nope.yml"
    data["visit_bins"]["los_hours"] = {"edges": [0, 1]}
    res = check_dataset(data)
    text = "\n".join(res.problems)
    assert len(res.problems) == 3, res.problems
    assert "kde_nope.yml" in text and "labels: 'sex'" in text and "visit_bins: 'los_hours'" in text


def test_a_missing_column_stops_at_the_read_and_names_the_file():
    data = yaml.safe_load(EXAMPLE.read_text())
    data["adapter_options"]["visits"]["start"] = "admit_time"
    res = check_dataset(data)
    assert len(res.problems) == 1 and "ADMISSIONS.csv.gz: visits table lacks column(s) ['admit_time']" in res.problems[0]


def test_kde_config_beside_an_external_config_is_found(tmp_path):
    (tmp_path / "kde_mine.yml").write_text((ROOT / "synthehr_core" / "configs" / "kde_mimic3.yml").read_text())
    data = {**yaml.safe_load(EXAMPLE.read_text()), "kde": "kde_mine.yml"}
    (tmp_path / "mine.yml").write_text(yaml.safe_dump(data))
    assert kde_config_ref(load_config(str(tmp_path / "mine.yml"))) == str(tmp_path / "kde_mine.yml")
    assert kde_config_ref(load_config("mimic3")) == "kde_mimic3.yml"


def test_cli_check_exits_0_or_1_with_the_problems():
    runner = CliRunner()
    ok = runner.invoke(app, ["check", "--config", str(EXAMPLE)])
    assert ok.exit_code == 0 and "ready to run" in ok.output
    bad = runner.invoke(app, ["check", "--config", "mimic3", "--kde-config", "kde_nope.yml"])
    assert bad.exit_code == 1 and "1 problem(s) found before any work started" in bad.output


def test_the_check_component_returns_the_kde_config_the_run_uses():
    from components.check import check

    raw = SimpleNamespace(path=str(bundled_data_dir("mimic3_demo")), metadata={})
    assert check.python_func(raw=raw, dataset_config="mimic3", kde_config="") == "kde_mimic3.yml"
    with pytest.raises(ConfigError, match=r"KDE config: column 'los_hours' \(visits\) is not in the visits table"):
        check.python_func(raw=raw, dataset_config="mimic3", kde_config="kde_qh")   # a KDE config of another dataset
