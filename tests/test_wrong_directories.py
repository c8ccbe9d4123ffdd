"""A directory given in the wrong place gets the right one named: a sweep's parent names its sweeps,
a sweep given where one run is expected names its runs, a run's subfolder names the run it lies in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vae_cli.commands import plot
from vae_cli.errors import RunDirError
from vae_cli.run.checkpoint import load_model
from vae_cli.run.rundir import find_runs


def fake_run(run_dir: Path) -> None:
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "losses.csv").write_text("step,loss\n1,100.0\n")
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "steps": 1, "final_loss": 100.0}))


@pytest.fixture
def sweep(tmp_path) -> Path:
    """multirun/demo/DATE holding the runs 0, 1, 2."""
    folder = tmp_path / "multirun" / "demo" / "2026-12-04_10-00-00"
    for job in range(3):
        fake_run(folder / str(job))
    (folder / "multirun.yaml").write_text("hydra: {}\n")
    return folder


def test_a_sweeps_parent_names_the_sweep_beneath_it(sweep, capsys):
    with pytest.raises(RunDirError, match=f"the multirun directories beneath it: {sweep} \\(3 runs\\)"):
        find_runs(sweep.parent)
    with pytest.raises(SystemExit) as exit_info:
        plot.main([str(sweep.parent)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"beneath it: {sweep} (3 runs)" in err


def test_a_sweep_given_as_one_run_names_its_runs(sweep):
    with pytest.raises(RunDirError) as info:
        load_model(sweep)  # what vae_cli.load_run reads
    message = str(info.value)
    assert "\n" not in message
    assert f"holding the runs {sweep / '0'}, {sweep / '1'}, {sweep / '2'}: give one of them" in message


def test_a_runs_subfolder_names_the_run(sweep):
    with pytest.raises(RunDirError, match=f"lies in the run directory {sweep / '1'}: give that one"):
        load_model(sweep / "1" / ".hydra")
    with pytest.raises(RunDirError, match=f"lies in the run directory {sweep / '1'}"):
        find_runs(sweep / "1" / ".hydra")


def test_a_directory_far_from_any_run_names_none(tmp_path):
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    with pytest.raises(RunDirError) as info:
        find_runs(tmp_path / "empty" / "deeper")
    assert str(info.value).endswith("nor a multirun directory holding one")
