"""logger=tensorboard: the event files, read back with TensorBoard's own reader, hold what
losses.csv and eval.json hold, the grids of every checkpoint and the hyper-parameters; a resumed
run shows each step once; a sweep shows one run per job."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from helpers import TINY, Crash, at_step, compose_config, crash, run_cli, skip_figures, vae_train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from vae_cli.maths.objectives import OBJECTIVES
from vae_cli.run.keys import LOGGERS
from vae_cli.run.rundir import EVAL, LOSSES, SAMPLE_GRID, SUMMARY, read_losses
from vae_cli.stages.evaluation import evaluate_run
from vae_cli.stages.pipeline import train
from vae_cli.stages.tracking import FINAL, MEANS, SAMPLES, TRACKERS, TRAIN

pytestmark = pytest.mark.slow  # make test-all only (docs/contributing.md, Tests)

RUN = ["logger=tensorboard", "n_train_iters=12", "checkpoint_every=5"]
ALL = {"scalars": 0, "images": 0, "tensors": 0}  # keep every event, not a sample


@pytest.fixture
def no_figures(monkeypatch):
    skip_figures(monkeypatch)  # not compared; seconds each


def events(run_dir: Path) -> EventAccumulator:
    """The run as TensorBoard shows it (purged steps dropped)."""
    accumulator = EventAccumulator(str(run_dir), size_guidance=ALL)
    accumulator.Reload()
    return accumulator


def assert_scalars_equal_losses_csv(run_dir: Path) -> None:
    accumulator, losses = events(run_dir), read_losses(run_dir / LOSSES)
    steps = [int(s) for s in losses["step"]]
    assert steps == list(range(1, len(steps) + 1))
    for column, values in losses.items():
        if column == "step":
            continue
        scalars = accumulator.Scalars(TRAIN + column)
        assert [s.step for s in scalars] == steps, column  # each step once, in order
        assert [s.value for s in scalars] == pytest.approx(values, rel=1e-6), column  # float32 of the CSV's value
    speeds = accumulator.Scalars(TRAIN + "it_per_s")
    assert [s.step for s in speeds] == steps and all(s.value > 0 for s in speeds)


def test_events_hold_the_csv_the_grids_the_evaluation_and_the_hparams(tmp_path, no_figures):
    run_dir = tmp_path / "run"
    summary = train(compose_config([*RUN, "objective=prior_iwae", "eval.enabled=true"]), run_dir)
    assert_scalars_equal_losses_csv(run_dir)
    assert set(OBJECTIVES["prior_iwae"].terms) <= {t[len(TRAIN) :] for t in events(run_dir).Tags()["scalars"]}

    accumulator = events(run_dir)
    side = SAMPLE_GRID * 28 + (SAMPLE_GRID + 1) * 2  # tiles and the 2-pixel lines around them
    for tag in (SAMPLES, MEANS):
        images = accumulator.Images(tag)
        assert [i.step for i in images] == [0, 5, 10, 12], tag  # step 0, every checkpoint, the last step
        assert all((i.width, i.height) == (side, side) for i in images)
    assert "means" in MEANS and "samples" not in MEANS.split("_", 1)[0]  # the means are labelled as such

    result = json.loads((run_dir / EVAL).read_text())
    assert accumulator.Scalars("eval/log_px")[-1].value == pytest.approx(result["log_px"], rel=1e-6)
    assert accumulator.Scalars("eval/log_px")[-1].step == 12
    for name, estimate in result["estimates"].items():
        assert accumulator.Scalars(f"eval/estimates/{name}")[-1].value == pytest.approx(estimate["value"], rel=1e-6)

    content = accumulator.PluginTagToContent("hparams")
    session = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert session.hparams["objective"].string_value == "prior_iwae"
    assert session.hparams["estimator"].string_value == summary["log_px_estimator"] == "quadrature"
    for key in ("K", "n_samples", "batch_size", "lr", "seed", "n_train_iters"):
        assert session.hparams[key].number_value == pytest.approx(summary.get(key, compose_config(RUN)[key]))
    assert "_hparams_/experiment" not in content  # TensorBoard builds it from all the runs of a sweep
    metrics = {tag for tag in accumulator.Tags()["scalars"] if tag.startswith(FINAL)}
    # q*'s approximation gap too (an encoder-free model has no amortization gap)
    final = ("final_loss", "log_px", "log_px_stderr", "gap_jensen", "gap_approximation")
    assert metrics == {FINAL + key for key in final}
    assert accumulator.Scalars("eval/gap_approximation")[-1].value == pytest.approx(result["gap_approximation"])
    for tag in metrics:
        assert accumulator.Scalars(tag)[-1].value == pytest.approx(summary[tag[len(FINAL) :]], rel=1e-6)

    result = evaluate_run(run_dir, overrides={"n_images": 16})  # vae-eval: the run's own logger gets its numbers
    again = events(run_dir).Scalars("eval/log_px")
    assert len(again) == 2 and again[-1].value == pytest.approx(result["log_px"], rel=1e-6)


def test_a_resumed_run_shows_each_step_once(tmp_path, no_figures, monkeypatch):
    """Stopped after step 7 (checkpoint at 5, steps 6 and 7 in the old event file), then resumed:
    TensorBoard shows steps 1..12 once, with the values of the final losses.csv."""
    run_dir = tmp_path / "run"
    with monkeypatch.context() as mp:
        at_step(mp, 8, crash)
        with pytest.raises(Crash):
            train(compose_config(RUN), run_dir)
    train(compose_config(RUN + [f"resume={run_dir}"]), run_dir, changed=[])
    assert_scalars_equal_losses_csv(run_dir)

    written = [  # every train/loss value in the files, purged ones too: steps 6 and 7 were written twice
        event.step
        for path in sorted(run_dir.glob("events.out.tfevents.*"))
        for event in EventFileLoader(str(path)).Load()
        if any(value.tag == TRAIN + "loss" for value in event.summary.value)
    ]
    assert sorted(written) == sorted([*range(1, 13), 6, 7])
    assert [i.step for i in events(run_dir).Images(MEANS)] == [0, 5, 10, 12]


def test_logger_tensorboard_without_the_package_is_one_line_before_any_work(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a)
    )
    code, err, created = vae_train([*TINY, "logger=tensorboard"])
    assert code == 2 and created == []
    assert err.strip().splitlines() == [
        "vae-cli: error: invalid value logger=tensorboard: the tensorboard package is not installed "
        "(pip install 'vae-cli[tensorboard]'; make setup installs it); allowed csv"
    ]


def test_every_logger_the_config_allows_has_a_tracker():
    assert tuple(TRACKERS) == LOGGERS


@pytest.mark.slow
def test_a_sweep_shows_one_run_per_job_with_its_hyper_parameters(tmp_path):
    """What `tensorboard --logdir SWEEP` loads: one run per job, its curve and its n_samples."""
    sweep = tmp_path / "sweep"
    tiny = [o for o in TINY if not o.startswith("n_samples=")]
    result = run_cli(
        ["vae-train", "-m", "n_samples=1,4", "logger=tensorboard", *tiny, f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    multiplexer = EventMultiplexer(size_guidance=ALL).AddRunsFromDirectory(str(sweep)).Reload()
    assert sorted(multiplexer.Runs()) == ["0", "1"]
    for run, n_samples in (("0", 1), ("1", 4)):
        assert len(multiplexer.Scalars(run, TRAIN + "loss")) == compose_config().n_train_iters
        content = multiplexer.PluginRunToTagToContent("hparams")[run]["_hparams_/session_start_info"]
        session = HParamsPluginData.FromString(content).session_start_info
        assert session.hparams["n_samples"].number_value == n_samples
        assert json.loads((sweep / run / SUMMARY).read_text())["n_samples"] == n_samples
