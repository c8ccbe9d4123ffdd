"""vae-plot in-process: the figures of one run, a partial run, broken and foreign directories,
the comparison of several runs, and the exact posterior of K=2 models."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch
from helpers import compose_config
from PIL import Image

from vae_cli.commands.plot import main as plot_main
from vae_cli.errors import DataError
from vae_cli.maths.grid_posterior import GridPosterior, grid_posterior, zoom_window
from vae_cli.maths.likelihoods.kernels import Bernoulli, bernoulli_log_likelihood
from vae_cli.maths.models import Decoder, LatentVariableModel
from vae_cli.run.rundir import collect
from vae_cli.stages import comparison, drawing_sweep
from vae_cli.stages.drawing import MANIFOLD_GRID, grid_pixels
from vae_cli.stages.pipeline import train

LATENT_FIGURES = ("manifold.png", "posterior.png", "encoded.png")


@pytest.fixture(scope="module")
def elbo_run(tmp_path_factory):
    """A finished tiny K=2 run with an encoder (so every run figure applies)."""
    run_dir = tmp_path_factory.mktemp("runs") / "elbo"
    train(compose_config(["objective=elbo"]), run_dir=run_dir)
    return run_dir


def image_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.load()
        return image.size


def test_one_run_gets_every_figure_and_a_report(elbo_run, tmp_path, capsys):
    out = tmp_path / "figures"
    plot_main([str(elbo_run), "--out", str(out)])
    for name in ("loss.png", "samples.png", "means.png", *LATENT_FIGURES):
        assert min(image_size(out / name)) > 100, name
    assert image_size(out / "samples.png") == grid_pixels(8, 8, scale=2)
    assert image_size(out / "means.png") == grid_pixels(8, 8, scale=2)
    assert image_size(out / "manifold.png") == grid_pixels(MANIFOLD_GRID, MANIFOLD_GRID, scale=1)
    report = (out / "report.md").read_text()
    for name in ("loss.png", "samples.png", "means.png", *LATENT_FIGURES):
        assert f"]({name})" in report
    assert not (out / "comparison.csv").exists()  # one run: nothing to compare
    assert f"{elbo_run} -> {out}" in capsys.readouterr().out


@pytest.mark.slow
def test_partial_run_is_drawn_with_a_note(elbo_run, tmp_path, capsys):
    """A run that is still going: losses.csv (with a torn last line), no checkpoint, no summary."""
    run_dir = tmp_path / "going"
    run_dir.mkdir()
    text = (elbo_run / "losses.csv").read_text()
    (run_dir / "losses.csv").write_text(text + "6,41")
    plot_main([str(run_dir)])
    assert image_size(run_dir / "loss.png")[0] > 100
    assert not (run_dir / "samples.png").exists()
    err = capsys.readouterr().err
    assert "no checkpoint.pt yet" in err
    assert "partial" in (run_dir / "report.md").read_text()


def test_broken_and_foreign_directories_get_one_line_each(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "losses.csv").write_text("not,a,loss,file\n1,2,3,4\n")
    (garbage / "checkpoint.pt").write_bytes(b"not a checkpoint")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("hello")
    with pytest.raises(SystemExit) as exit_info:
        plot_main([str(empty), str(garbage), str(a_file), str(tmp_path / "missing")])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    skipped = [line for line in err if line.startswith("vae-plot: skipped")]
    assert len(skipped) == 4, err
    assert f"{empty} is neither a vae-train run directory" in err[0]
    assert "is not a losses.csv" in err[1] and "garbage" in err[1]
    assert "is not a directory" in err[2] and "does not exist" in err[3]
    assert err[-1] == "vae-plot: error: nothing could be plotted"


@pytest.mark.slow
def test_a_broken_directory_does_not_stop_the_others(elbo_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(elbo_run / "losses.csv", run_dir / "losses.csv")
    with pytest.raises(SystemExit) as info:  # the other path is still drawn; the exit code says one was not
        plot_main([str(tmp_path / "missing"), str(run_dir), "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert "vae-plot: skipped" in captured.err and "does not exist" in captured.err
    assert (
        captured.err.strip().splitlines()[-1]
        == f"vae-plot: error: nothing drawn for {tmp_path / 'missing'} (see the skipped lines above)"
    )
    assert (tmp_path / "out" / "run" / "loss.png").exists()


@pytest.mark.slow
def test_latent_figures_are_skipped_with_a_note_when_test_data_are_unavailable(elbo_run, tmp_path, capsys, monkeypatch):
    def unavailable(self, cfg):
        raise DataError("mnist files missing (t10k-images-idx3-ubyte)")

    monkeypatch.setattr("vae_cli.stages.figures.TestImages.get", unavailable)
    out = tmp_path / "figures"
    plot_main([str(elbo_run), "--out", str(out)])
    assert (out / "manifold.png").exists()  # needs no data
    assert not (out / "posterior.png").exists() and not (out / "encoded.png").exists()
    assert "posterior and encoded figures skipped: test data unavailable" in capsys.readouterr().err
    assert "test data unavailable" in (out / "report.md").read_text()


def fake_run(
    run_dir,
    overrides: list[str],
    final_loss: float,
    steps: int = 20,
    evaluation: dict | None = None,
    summary: bool = True,
) -> None:
    """A run directory as vae-train writes it, without training: overrides, losses, summary, eval."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    rows = [f"{s},{final_loss + 10 / s:.6f},{final_loss + 1:.6f}" for s in range(1, steps + 1)]
    (run_dir / "losses.csv").write_text("step,loss,lme\n" + "\n".join(rows) + "\n")
    if summary:
        (run_dir / "summary.json").write_text(
            json.dumps(
                {
                    "status": "completed",
                    "objective": overrides[0].split("=")[1],
                    "K": 2,
                    "n_samples": 1,
                    "steps": steps,
                    "final_loss": final_loss,
                    "final_loss_stderr": 0.5,
                    "it_per_s": 10.0,
                }
            )
        )
    if evaluation is not None:
        (run_dir / "eval.json").write_text(json.dumps(evaluation))


@pytest.mark.slow
def test_comparison_of_a_sweep_rows_columns_and_figures(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    evaluation = {
        "log_px": -150.0,
        "log_px_stderr": 0.4,
        "estimator": "quadrature",
        "gap_jensen": 30.0,
        "gap_jensen_stderr": 0.2,
        "gap_elbo": None,
        "gap_elbo_stderr": None,
    }
    jobs = [(o, n) for o in ("jensen", "prior_iwae") for n in (1, 8)]
    for i, (objective, n) in enumerate(jobs):
        fake_run(
            sweep / str(i),
            [f"objective={objective}", f"n_samples={n}", "data=synthetic", "hydra.run.dir=x"],
            180.0 - i,
            evaluation=evaluation if i % 2 == 0 else None,
            summary=i != 3,
        )
    (sweep / "4" / ".hydra").mkdir(parents=True)  # a job that failed before training
    (sweep / ".submitit").mkdir()

    runs, skipped = collect([sweep])
    assert [r.name for r in runs] == ["0", "1", "2", "3"]
    assert len(skipped) == 1 and "job not started, or failed before training" in skipped[0]
    assert comparison.differing_keys(runs) == ["objective", "n_samples"]

    plot_main([str(sweep)])
    with open(sweep / "comparison.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(jobs)
    assert [(r["objective"], r["n_samples"]) for r in table] == [(o, str(n)) for o, n in jobs]
    assert float(table[0]["log_px"]) == -150.0 and table[0]["estimator"] == "quadrature" and table[1]["log_px"] == ""
    assert table[3]["status"] == "partial (20 steps)" and table[3]["it_per_s"] == ""
    assert math.isclose(float(table[3]["final_loss"]), 177.0 + sum(10 / s for s in range(1, 21)) / 20, abs_tol=1e-3)
    md_rows = [line for line in (sweep / "comparison.md").read_text().splitlines() if line.startswith("| ")]
    md_rows = [line for line in md_rows if "---" not in line]
    assert len(md_rows) == 1 + len(jobs)  # header and one row per run
    for name in ("loss_curves.png", "vs_n_samples.png"):
        assert min(image_size(sweep / name)) > 100
    assert not (sweep / "metrics_by_run.png").exists()
    report = (sweep / "report.md").read_text()
    assert "](loss_curves.png)" in report and "](vs_n_samples.png)" in report and "](0/loss.png)" in report
    assert "log_px" in report and "## Skipped" in report
    assert capsys.readouterr().err.count("vae-plot: skipped") == 1


@pytest.mark.slow
def test_runs_differing_only_by_objective_get_metrics_by_run(tmp_path):
    gaps = {"gap_elbo": 3.0, "gap_approximation": 0.5, "gap_amortization": 2.5, "gap_amortization_stderr": 0.2}
    for objective in ("jensen", "elbo"):
        fake_run(
            tmp_path / objective, [f"objective={objective}"], 150.0, evaluation=gaps if objective == "elbo" else None
        )
    out = tmp_path / "out"
    plot_main([str(tmp_path / "jensen"), str(tmp_path / "elbo"), "--out", str(out)])
    assert (out / "metrics_by_run.png").exists() and (out / "loss_curves.png").exists()
    assert (out / "jensen" / "loss.png").exists() and (out / "elbo" / "loss.png").exists()
    with open(out / "comparison.csv") as f:
        table = {row["objective"]: row for row in csv.DictReader(f)}
    # q*'s split of the ELBO's gap is compared like the other gaps
    assert float(table["elbo"]["gap_amortization"]) == 2.5 and float(table["elbo"]["gap_amortization_stderr"]) == 0.2
    assert float(table["elbo"]["gap_approximation"]) == 0.5 and table["jensen"]["gap_approximation"] == ""


@pytest.mark.slow
def test_metrics_against_k_legend_names_every_objective(tmp_path, monkeypatch):
    """A K sweep of jensen (shared samples) and elbo: the last panel (gap_elbo) has elbo points
    only, and the legend still names both groups, each by the keys its runs have."""
    evaluation = {"log_px": -150.0, "log_px_stderr": 0.4, "gap_jensen": 30.0, "gap_jensen_stderr": 0.2}
    for objective, extra in (("jensen", ["objective.shared_samples=true"]), ("elbo", [])):
        for K in (2, 4):
            gap_elbo = {"gap_elbo": 3.0, "gap_elbo_stderr": 0.1} if objective == "elbo" else {}
            fake_run(tmp_path / f"{objective}-{K}", [f"objective={objective}", f"K={K}", *extra], 150.0,
                     evaluation={**evaluation, **gap_elbo})  # fmt: skip
    runs, _ = collect(sorted(tmp_path.iterdir()))
    drawn = []
    monkeypatch.setattr(drawing_sweep, "save_figure", lambda fig, path: drawn.append(fig))
    drawing_sweep.save_metrics_against(comparison.compare(runs), "K", tmp_path / "vs_K.png")
    (fig,) = drawn
    panels = [ax.get_ylabel() for ax in fig.axes]
    assert panels == [drawing_sweep.METRIC_LABELS[m] for m in ("final_loss", "log_px", "gap_jensen", "gap_elbo")]
    assert len(fig.axes[-1].lines) < len(fig.axes[0].lines)  # gap_elbo: the elbo line only
    legend = [text.get_text() for text in fig.axes[-1].get_legend().get_texts()]
    assert legend == ["objective=elbo", "objective=jensen, objective.shared_samples=true"]


def test_posterior_of_a_decoder_that_ignores_z_is_the_prior():
    """x independent of z: p(z|x) = p(z), and the grid's log p(x) is log p(x|z) plus the log of the
    prior mass inside [-3, 3]^2."""
    torch.manual_seed(0)
    decoder = Decoder(2, 8, 1, "elu")
    with torch.no_grad():
        decoder.net[-1].weight.zero_()
    model = LatentVariableModel(2, decoder, Bernoulli())
    x = torch.bernoulli(torch.full((3, 784), 0.3))
    post = grid_posterior(model, x, n=61)
    assert torch.allclose(torch.tensor(post.log_posterior), torch.tensor(post.log_prior).expand(3, -1, -1), atol=1e-5)
    assert math.isclose(float(torch.tensor(post.log_prior).exp().sum()), 1.0, rel_tol=1e-5)
    log_px_z = bernoulli_log_likelihood(x, decoder(torch.zeros(3, 2)))
    mass = math.erf(3 / math.sqrt(2)) ** 2
    assert torch.allclose(torch.tensor(post.log_px).double(), log_px_z.double() + math.log(mass), atol=0.02)


def test_zoom_window_resolves_a_sharp_posterior_and_keeps_a_broad_one():
    n = 61
    axis = np.linspace(-3, 3, n, dtype=np.float32)
    spike = np.full((1, n, n), -np.inf, dtype=np.float32)
    spike[0, 40, 10] = 0.0  # all the mass in one cell: z1 = axis[10], z2 = axis[40]
    broad = np.log(np.full((1, n, n), 1.0 / n**2, dtype=np.float32))
    flat_prior = broad[0]
    (c1, c2), half = zoom_window(GridPosterior(axis, axis, flat_prior, spike, np.zeros(1), np.zeros(1)), 0)
    assert math.isclose(c1, axis[10], abs_tol=1e-5) and math.isclose(c2, axis[40], abs_tol=1e-5)
    assert math.isclose(half, 2 * (axis[1] - axis[0]), rel_tol=1e-5)
    (c1, c2), half = zoom_window(GridPosterior(axis, axis, flat_prior, broad, np.zeros(1), np.zeros(1)), 0)
    assert abs(c1) < 1e-5 and abs(c2) < 1e-5 and half == 3.0
