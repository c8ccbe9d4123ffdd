"""Sweeps: the presets expand to the jobs Hydra will launch; a tiny preset multirun through the
console script on the joblib launcher writes comparison.csv and vae-plot draws every figure of
it; the submitit_local launcher runs real submitit jobs."""

from __future__ import annotations

import pytest
from helpers import TINY, check_jobs, compose_config, read_table, run_cli
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from vae_cli.commands.callbacks import sweep_job_overrides
from vae_cli.run.config import validate
from vae_cli.stages.drawing import MANIFOLD_GRID, grid_pixels
from vae_cli.stages.pipeline import train

TINY_NO_SAMPLES = [o for o in TINY if not o.startswith("n_samples=")]
ENV = {"OMP_NUM_THREADS": "1"}  # tiny models: one thread each is faster than fighting over the cores


def job_overrides(overrides: list[str]) -> list[list[str]]:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="vae_cli.conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
            return sweep_job_overrides(cfg)
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize("preset, n_jobs", [("n_samples", 8), ("objectives", 4), ("K", 12), ("gradients", 12)])
def test_presets_expand_to_jobs_that_validate(preset, n_jobs):
    jobs = job_overrides([f"+sweep={preset}", "data=synthetic"])
    assert len(jobs) == n_jobs
    assert len({tuple(sorted(j)) for j in jobs}) == n_jobs
    validate(compose_config(jobs[-1]))


def test_the_gradients_preset_pairs_each_objective_with_its_estimators_and_trains_two_steps(tmp_path):
    jobs = job_overrides(["+sweep=gradients", "data=synthetic"])
    pairs = set()
    for job in jobs:
        cfg = compose_config(job)
        validate(cfg)
        pairs.add((cfg.objective.name, cfg.objective.gradient, cfg.n_samples))
        assert cfg.eval.gradient_snr
    assert {(o, g) for o, g, _ in pairs} == {
        ("iwae", "standard"),
        ("iwae", "dreg"),
        ("elbo", "standard"),
        ("elbo", "stl"),
    }
    assert {n for _, _, n in pairs} == {1, 8, 64}
    smoke = ["n_train_iters=2", "eval.enabled=false", "model.hidden=16"]
    summary = train(
        compose_config([*next(j for j in jobs if "+estimator=iwae_dreg" in j), *smoke]), run_dir=tmp_path / "r"
    )
    assert summary["status"] == "completed"


def test_the_command_line_replaces_a_presets_values():
    jobs = job_overrides(["+sweep=n_samples", "n_samples=4"])  # as `vae-train -m +sweep=n_samples n_samples=4`
    assert sorted(j for job in jobs for j in job if j.startswith("n_samples")) == ["n_samples=4"] * 2


def image_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.load()
        return image.size


@pytest.mark.slow
def test_preset_multirun_on_joblib_then_vae_plot(tmp_path):
    """Two jobs at a time in joblib's worker processes (the basic launcher's multirun is in test_cli.py)."""
    sweep = tmp_path / "sweep"
    result = run_cli(
        [
            "vae-train",
            "-m",
            "+sweep=n_samples",
            "objective=jensen",
            "n_samples=1,8",  # 2 of the preset's 8 jobs
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            *TINY_NO_SAMPLES,
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = check_jobs(sweep, 2)
    assert [(r["objective"], r["n_samples"]) for r in table] == [("jensen", "1"), ("jensen", "8")]

    result = run_cli(["vae-plot", str(sweep)], cwd=tmp_path, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "vae-plot:" not in result.stderr  # no run skipped, no figure left out
    for i in range(2):
        for name in ("loss.png", "samples.png", "means.png", "manifold.png", "posterior.png"):
            assert min(image_size(sweep / str(i) / name)) > 100
        assert image_size(sweep / str(i) / "samples.png") == grid_pixels(8, 8, scale=2)
        assert image_size(sweep / str(i) / "manifold.png") == grid_pixels(MANIFOLD_GRID, MANIFOLD_GRID, scale=1)
    for name in ("loss_curves.png", "vs_n_samples.png"):
        assert min(image_size(sweep / name)) > 100
    assert len(read_table(sweep / "comparison.csv")) == 2
    md_rows = [line for line in (sweep / "comparison.md").read_text().splitlines() if line.startswith("| ")]
    md_rows = [line for line in md_rows if "---" not in line]
    assert len(md_rows) == 1 + 2
    report = (sweep / "report.md").read_text()
    links = [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert len(links) == 2 + 2 * 5
    assert all((sweep / link).is_file() for link in links)


@pytest.mark.slow
def test_submitit_local_runs_real_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        [
            "vae-train",
            "-m",
            "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=10",
            "objective=jensen,elbo",
            *TINY,
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = check_jobs(sweep, 2)
    assert [r["objective"] for r in table] == ["jensen", "elbo"]
    logs = list((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2 and all("Job completed successfully" in log.read_text() for log in logs)


def test_the_demo_preset_sweeps_three_objectives_at_its_sizes():
    """+experiment=demo: jensen and the log-mean-exp with shared prior draws, the ELBO with one draw of q;
    every job is valid, and the evaluation is sized for a CPU."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="vae_cli.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=demo"], return_hydra_config=True)
        jobs = sweep_job_overrides(cfg)
        composed = [compose(config_name="config", overrides=job) for job in jobs]
    GlobalHydra.instance().clear()
    assert [[o for o in job if o.startswith("+demo=")] for job in jobs] == [
        ["+demo=jensen"],
        ["+demo=prior_iwae"],
        ["+demo=elbo"],
    ]
    for job in composed:
        validate(job)
    assert [(c.objective.name, c.objective.get("shared_samples"), c.n_samples) for c in composed] == [
        ("jensen", True, 128),
        ("prior_iwae", True, 1024),
        ("elbo", None, 1),
    ]
    assert all(c.eval.n_images == 2000 and c.n_train_iters == 1500 for c in composed)
