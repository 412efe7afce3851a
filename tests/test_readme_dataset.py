"""README "Adding a dataset", followed literally: its YAML block and its KDE renames, on an extract no bundled
adapter reads (subfolders, renamed columns, a code-system version column), through `synthehr check`,
`synthehr run --local --config` and `synthehr compile`, with no file inside the package touched."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from synthehr_core.cli import app
from test_tables_adapter import write_versioned_extract

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "synthehr_core"
# the renames README step 1 lists for the KDE config copied from kde_mimic3.yml
KDE_RENAMES = [("gender", "sex"), ("los_days", "los_hours"), ("los_unit: days", "los_unit: hours")]


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("## Adding a dataset", 1)[1].split("\n## ", 1)[0]


def readme_dataset_config(raw: Path) -> dict:
    """The README's YAML block, with the local raw folder pointed at ``raw`` (the one edit a user makes)."""
    block = re.search(r"```yaml\n(.*?)```", readme_section(), re.DOTALL).group(1)
    data = yaml.safe_load(block)
    data["profiles"]["local"]["raw"] = str(raw)
    return data


def readme_kde_config() -> str:
    section = " ".join(readme_section().split())
    text = (PACKAGE / "configs" / "kde_mimic3.yml").read_text()
    for old, new in KDE_RENAMES:
        assert f"`{old}` -> `{new}`" in section, f"README no longer says to rename {old!r}"
        text = text.replace(old, new)
    return text


def package_state() -> dict:
    """Every file name in the package, and the mtimes where a dataset would go (configs, sample data, adapters);
    the mtimes of code files are left out: other work may edit them while the test runs."""
    files = [p for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    watched = ("configs", "sample_data", "data")
    return {str(p.relative_to(PACKAGE)): p.stat().st_mtime_ns if p.relative_to(PACKAGE).parts[0] in watched else 0
            for p in files}


def write_user_files(tmp_path: Path) -> Path:
    raw = write_versioned_extract(tmp_path / "raw")
    cfg = readme_dataset_config(raw)
    (tmp_path / cfg["kde"]).write_text(readme_kde_config())
    path = tmp_path / "mydata.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_the_readme_config_passes_check(tmp_path):
    config = write_user_files(tmp_path)
    result = CliRunner().invoke(app, ["check", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "ready to run" in result.output and '"adapter": "tables (bundled)"' in result.output


def test_without_the_kde_renames_check_names_each_column_left(tmp_path):
    config = write_user_files(tmp_path)
    (tmp_path / "kde_mydata.yml").write_text((PACKAGE / "configs" / "kde_mimic3.yml").read_text())
    result = CliRunner().invoke(app, ["check", "--config", str(config)])
    assert result.exit_code == 1
    assert "column 'gender' (patients)" in result.output and "column 'los_days' (visits)" in result.output


@pytest.mark.slow
def test_readme_steps_check_run_local_and_compile(tmp_path):
    from kfp.local import config as local_config

    before = package_state()
    config = write_user_files(tmp_path / "user")
    runner = CliRunner()
    check = runner.invoke(app, ["check", "--config", str(config)])
    assert check.exit_code == 0, check.output

    args = ["run", "--local", "--config", str(config), "--pipeline-root", str(tmp_path / "runs"),
            "-p", "epochs=2", "-p", "lr=0.01", "-p", "n_patients_per_seed=10", "-p", "n_shards=2", "-p", "first_seed=2"]
    try:
        run = runner.invoke(app, args)
    finally:
        local_config.LocalExecutionConfig.instance = None
    assert run.exit_code == 0, run.output + repr(run.exception)
    assert re.search(r"real data \(mydata\): 40 patients, 120 visits, 180 codes", run.output)
    assert re.search(r"synthetic cohort: \d+ patients, \d+ visits from 2 seed shards", run.output)
    run_dir = Path(re.search(r"^run folder:\s+(\S+)$", run.output, re.MULTILINE).group(1))
    vocab = json.loads(next(run_dir.glob("**/preprocess/tables/vocab.json")).read_text())
    assert {"cat:dx_version=9", "cat:dx_version=10"} <= {t["token"] for t in vocab["tokens"]}
    metrics = json.loads(next(run_dir.glob("**/evaluate/details/metrics.json")).read_text())
    metrics = metrics.get("metrics", metrics)
    assert "mixing.synthetic_share" in metrics                      # versions in the key: mixing is reported
    assert "<html" in Path(re.search(r"^report \(HTML\):\s+(\S+)$", run.output, re.MULTILINE).group(1)).read_text().lower()

    compiled = runner.invoke(app, ["compile", "--out", str(tmp_path / "compiled")])
    assert compiled.exit_code == 0, compiled.output
    generic = next(yaml.safe_load_all((tmp_path / "compiled" / "synthehr.yaml").read_text()))
    params = generic["root"]["inputDefinitions"]["parameters"]
    assert {"dataset_config", "raw_uri", "kde_config"} <= set(params)   # the config is a run parameter
    assert not list((tmp_path / "compiled").glob("mydata*"))           # nothing per dataset to compile
    assert package_state() == before, "a file inside the package was written"
