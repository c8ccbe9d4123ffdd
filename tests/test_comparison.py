"""Comparing runs of like with like: by the keys that define an experiment (never how a run was kept),
values written one way, runs that differ only by their seed as mean +- sd over the seeds, log p(x) on
the test images every run was evaluated on, and the paired per-image difference from the first run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import TINY, run_cli

from vae_cli.commands.plot import main as plot_main
from vae_cli.run.rundir import EVAL_IMAGES, collect, per_image_csv, read_run, write_evaluation
from vae_cli.stages.comparison import compare, differing_keys


def fake_run(run_dir: Path, overrides: list[str], final_loss: float, log_px: list[float] | None = None) -> None:
    """A run directory as an older vae-train wrote it (its keys from .hydra/overrides.yaml), evaluated on
    len(log_px) images with their per-image values."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    rows = [f"{s},{final_loss + 1 / s:.6f},{final_loss + 1:.6f}" for s in range(1, 21)]
    (run_dir / "losses.csv").write_text("step,loss,lme\n" + "\n".join(rows) + "\n")
    summary = {"status": "completed", "steps": 20, "final_loss": final_loss, "final_loss_stderr": 0.5}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    if log_px is not None:
        mean = sum(log_px) / len(log_px)
        evaluation = {"log_px": mean, "log_px_stderr": 0.1, "estimator": "quadrature", "n_images": len(log_px)}
        write_evaluation(run_dir, evaluation, {"quadrature": log_px}, None)


def table(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_keys_that_say_how_a_run_was_kept_are_not_compared(tmp_path):
    fake_run(tmp_path / "a", ["objective=jensen", "progress=True", "checkpoint_every=10", "eval.n_images=100"], 150.0)
    fake_run(tmp_path / "b", ["objective=prior_iwae", "progress=false", "checkpoint_every=50"], 140.0)
    runs, _ = collect([tmp_path / "a", tmp_path / "b"])
    assert differing_keys(runs) == ["objective"]
    out = tmp_path / "out"
    plot_main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)])
    assert (out / "metrics_by_run.png").exists()  # no numeric experiment key varies
    assert not list(out.glob("vs_*.png"))


def test_values_are_written_one_way(tmp_path):
    fake_run(tmp_path / "a", ["objective=jensen", "objective.shared_samples=True"], 150.0)
    fake_run(tmp_path / "b", ["objective=jensen", "objective.shared_samples=false"], 150.0)
    comparison = compare(collect([tmp_path / "a", tmp_path / "b"])[0])
    assert comparison.keys == ["objective.shared_samples"]
    assert [comparison.key_values(run) for run in comparison.runs] == [
        "objective.shared_samples=true",
        "objective.shared_samples=false",
    ]


def test_log_px_is_compared_on_the_images_every_run_was_evaluated_on(tmp_path):
    fake_run(tmp_path / "a", ["objective=jensen"], 150.0, log_px=[-100.0] * 50 + [-300.0] * 50)
    fake_run(tmp_path / "b", ["objective=prior_iwae"], 140.0, log_px=[-90.0] * 50)
    fake_run(tmp_path / "c", ["objective=elbo"], 140.0)  # not evaluated
    out = tmp_path / "out"
    plot_main([str(tmp_path / p) for p in "abc"] + ["--out", str(out)])
    rows = {row["run"]: row for row in table(out / "comparison.csv")}
    assert float(rows["a"]["log_px"]) == -100.0 and rows["a"]["eval_images"] == "50"  # its first 50 of 100
    assert float(rows["b"]["log_px"]) == -90.0 and rows["c"]["log_px"] == ""
    assert float(rows["b"]["log_px_minus_first"]) == pytest.approx(10.0)  # paired, per image, on the same 50
    md = (out / "comparison.md").read_text()
    assert "over the first 50 test images, which every run was evaluated on" in md and "paired per-image" in md


def test_runs_that_differ_only_by_their_seed_give_mean_and_sd_over_seeds(tmp_path):
    finals = {"jensen": [206.0, 207.0, 208.0], "prior_iwae": [140.0, 144.0, 142.0]}
    for objective, values in finals.items():
        for seed, value in enumerate(values):
            fake_run(tmp_path / f"{objective}-{seed}", [f"objective={objective}", f"seed={seed}"], value)
    out = tmp_path / "out"
    plot_main(sorted(str(p) for p in tmp_path.iterdir()) + ["--out", str(out)])
    rows = table(out / "comparison.csv")
    assert len(rows) == 6 + 2  # every run, then each group
    groups = {row["objective"]: row for row in rows if row["run"] == "mean of 3 seeds"}
    assert float(groups["jensen"]["final_loss"]) == pytest.approx(207.0)
    assert float(groups["jensen"]["final_loss_stderr"]) == pytest.approx(1.0)  # the sd over the seeds
    assert float(groups["prior_iwae"]["final_loss_stderr"]) == pytest.approx(2.0)
    assert groups["jensen"]["n_seeds"] == "3" and groups["jensen"]["seed"] == "0,1,2"
    assert "the sd over the seeds" in (out / "comparison.md").read_text()
    assert (out / "metrics_by_run.png").exists() and "sd over the seeds" in (out / "report.md").read_text()


@pytest.mark.slow
def test_a_seeds_sweep_then_vae_plot_gives_mean_and_sd_per_objective(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        ["vae-train", "-m", "+sweep=seeds", "objective=jensen,prior_iwae", *TINY, f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert run_cli(["vae-plot", str(sweep)], cwd=tmp_path).returncode == 0
    rows = table(sweep / "comparison.csv")
    groups = [row for row in rows if row["run"] == "mean of 3 seeds"]
    assert sorted(row["objective"] for row in groups) == ["jensen", "prior_iwae"]
    assert all(row["n_seeds"] == "3" and float(row["final_loss_stderr"]) > 0 for row in groups)


def test_an_eval_images_csv_that_eval_json_was_not_written_with_is_not_used(tmp_path):
    """A kill between the two files of an evaluation (eval_images.csv is written first) leaves a pair
    that is not one evaluation: the per-image values are left out, and said so."""
    fake_run(tmp_path / "a", ["objective=jensen"], 150.0, [-100.0] * 4)
    assert read_run(tmp_path / "a").per_image == {"quadrature": [-100.0] * 4}
    (tmp_path / "a" / EVAL_IMAGES).write_bytes(per_image_csv({"quadrature": [-1.0] * 4}))
    run = read_run(tmp_path / "a", strict=True)
    assert run.per_image is None
    assert run.notes == [
        f"{EVAL_IMAGES} is not the one eval.json was written with (an evaluation stopped between them)"
    ]
