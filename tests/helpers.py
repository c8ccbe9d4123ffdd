"""Helpers the tests share: tiny settings, configs composed in-process with Hydra's compose API,
the console scripts run in a subprocess or in-process."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from hydra.core.global_hydra import GlobalHydra

import vae_cli.stages.figures
import vae_cli.stages.pipeline
import vae_cli.stages.training
from vae_cli.commands.app import compose_config as compose_app_config
from vae_cli.commands.app import register_configs
from vae_cli.commands.train import main as train_main
from vae_cli.maths.densities import quadrature_grid
from vae_cli.maths.estimators import importance_sums, weighted_sums
from vae_cli.maths.likelihoods import likelihood_spec
from vae_cli.maths.spec import ModelSpec
from vae_cli.run.checkpoint import load_checkpoint
from vae_cli.run.data import Images
from vae_cli.run.rundir import CHECKPOINT, LOSSES, SUMMARY
from vae_cli.stages.evaluation import evaluate

register_configs()

# Tiny settings: synthetic data, a small decoder, a few steps. Fast on 2 CPU cores.
TINY = [
    "data=synthetic",
    "data.n_train=256",
    "data.n_test=64",
    "K=2",
    "model.hidden=16",
    "model.depth=2",
    "n_samples=4",
    "batch_size=16",
    "n_train_iters=5",
    "progress=false",
    "device=cpu",
    "eval.enabled=false",  # the end-of-training evaluation is tested on its own in test_eval.py
]
BIN = Path(sys.executable).parent


def compose_config(overrides: list[str] | None = None, tiny: bool = True):
    """The config `vae-train <overrides>` would run, composed in-process, the command line checked as
    vae-train checks it (TINY first, where asked; its synthetic sizes only while the data set stays synthetic)."""
    overrides = list(overrides or [])
    base = TINY if tiny else []
    if any(o.startswith("data=") and o != "data=synthetic" for o in overrides):
        base = [o for o in base if not o.startswith(("data.n_train", "data.n_test"))]
    if "model=linear" in overrides:  # the MLP's sizes are no keys of a linear model
        base = [o for o in base if not o.startswith("model.")]
    return compose_app_config(base + overrides)


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one of the installed console scripts (vae-train, vae-plot, ...) in a subprocess."""
    exe = shutil.which(args[0], path=str(BIN)) or args[0]
    inherited = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "VAE_CLI_FULL_ERROR")}
    full_env = {**inherited, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([exe, *args[1:]], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


class Reached(BaseException):
    """Raised instead of loading data: the command line was accepted."""


def _reached(*args, **kwargs):
    raise Reached


def vae_train(args: list[str], env: dict[str, str] | None = None) -> tuple[int | None, str, list[str]]:
    """Run `vae-train ARGS` in-process in an empty directory: (exit code, stderr, files created).

    Data loading raises Reached (the command line was accepted). Warnings are errors here: Hydra
    reports an exception in a callback as a warning."""
    cwd = os.getcwd()
    saved_env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        err = io.StringIO()
        saved_argv, saved_load = sys.argv, vae_cli.stages.pipeline.load_images
        sys.argv = ["vae-train", *args]
        vae_cli.stages.pipeline.load_images = _reached
        for key in ("HYDRA_FULL_ERROR", "VAE_CLI_FULL_ERROR"):
            os.environ.pop(key, None)
        os.environ.update(env or {})
        try:
            with contextlib.redirect_stderr(err), warnings.catch_warnings():
                warnings.simplefilter("error")
                train_main()
            code = 0
        except SystemExit as exc:
            code = exc.code
        finally:
            sys.argv, vae_cli.stages.pipeline.load_images = saved_argv, saved_load
            os.environ.clear()
            os.environ.update(saved_env)
            GlobalHydra.instance().clear()
            os.chdir(cwd)
            created = sorted(str(p.relative_to(tmp)) for p in Path(tmp).rglob("*"))
    return code, err.getvalue(), created


RUN_FILES = ("losses.csv", "summary.json", "checkpoint.pt", "loss.png", "samples.png", "means.png", "train.log")


def read_table(path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def check_jobs(sweep, n_jobs: int) -> list[dict[str, str]]:
    for i in range(n_jobs):
        for name in RUN_FILES:
            assert (sweep / str(i) / name).stat().st_size > 0, f"job {i}: {name}"
    table = read_table(sweep / "comparison.csv")
    assert [row["run"] for row in table] == [str(i) for i in range(n_jobs)]
    assert all(row["status"] == "completed" and float(row["final_loss"]) > 0 for row in table)
    return table


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Final parameters and optimizer state equal (torch.equal), losses.csv equal byte for byte."""
    got, want = load_checkpoint(run_dir / CHECKPOINT), load_checkpoint(reference / CHECKPOINT)
    assert got["step"] == want["step"]
    assert got["model"].keys() == want["model"].keys()
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    for i, state in want["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(got["optimizer"]["state"][i][key], value), (i, key)
    assert torch.equal(got["rng"]["torch"], want["rng"]["torch"])
    assert (run_dir / LOSSES).read_bytes() == (reference / LOSSES).read_bytes()
    assert json.loads((run_dir / SUMMARY).read_text())["status"] == "completed"


class Crash(BaseException):
    """Stands in for a crash or kill -9 inside the process: nothing catches it, only `finally`s run."""


def at_step(monkeypatch, step: int, how) -> None:
    """Call how() (raise Crash, send a signal) just before training's step-th train_step."""
    real_step, calls = vae_cli.stages.training.train_step, iter(range(1, 10**6))

    def train_step(*args, **kwargs):
        if next(calls) == step:
            how()
        return real_step(*args, **kwargs)

    monkeypatch.setattr(vae_cli.stages.training, "train_step", train_step)


def crash(*args, **kwargs):
    raise Crash


def skip_figures(monkeypatch) -> None:
    """The figures are not part of what many tests compare, and drawing them costs seconds."""
    monkeypatch.setattr(vae_cli.stages.figures, "draw_run", lambda cfg, model, losses, out, *a, **k: out)


# The estimators as one-liners, from the functions evaluation runs (the tests score each against the truth).
HALF_WIDTH = 6.0


def log_px_quadrature(model, x, points_per_dim: int, half_width: float = HALF_WIDTH) -> torch.Tensor:
    grid = quadrature_grid(model.K, points_per_dim, half_width, x.device, x.dtype)
    return weighted_sums(model, x, *grid, 1000).log_px


def prior_sums(model, x, n_samples: int, generator=None):
    z = model.prior_sample(n_samples, generator=generator)
    log_w = torch.full((n_samples,), -math.log(n_samples), device=z.device)
    return weighted_sums(model, x, z, log_w, 1000)


def jensen_bound(model, x, points_per_dim=None, n_samples=None, generator=None) -> torch.Tensor:
    """E_p(z) log p(x|z): on the quadrature grid if points_per_dim is given, else over n_samples prior draws."""
    if points_per_dim is not None:
        return weighted_sums(model, x, *quadrature_grid(model.K, points_per_dim, HALF_WIDTH, x.device), 1000).jensen
    return prior_sums(model, x, n_samples, generator).jensen


def log_px_importance(model, x, k: int, seed: int = 0) -> torch.Tensor:
    return importance_sums(model, x, k, k, seed, 1000).log_px


def elbo_bound(model, x, n_samples: int, seed: int = 0) -> torch.Tensor:
    return importance_sums(model, x, n_samples, n_samples, seed, 1000).elbo


def iwae_bound(model, x, k: int, n_repeats: int = 1, seed: int = 0) -> torch.Tensor:
    return importance_sums(model, x, k * n_repeats, k, seed, 1000).iwae


def mlp_spec(K: int, hidden: int = 32, depth: int = 2, encoder: bool = False, likelihood: str = "bernoulli"):
    """The shape of a small MLP model with Bernoulli (or other) pixels, and its encoder where asked."""
    from_likelihood = likelihood_spec(likelihood)
    extra = {"encoder": "mlp", "encoder_hidden": hidden, "encoder_depth": depth} if encoder else {}
    return ModelSpec(K, "mlp", from_likelihood, hidden=hidden, depth=depth, activation="elu", **extra)


def images_of(x: torch.Tensor, binarization: str = "static") -> Images:
    """Test images x (N, 784) as the evaluation takes them (the training set is x too)."""
    return Images(
        train=x,
        test=x,
        test_labels=torch.zeros(len(x), dtype=torch.long),
        pixel_means=x.mean(0),
        pixel_sd=x.std(0),
        binarization=binarization,
        source="given images",
    )


def evaluate_images(model, spec, x: torch.Tensor, cfg_eval, **kwargs) -> dict:
    """eval.json's dict of `model` (of shape `spec`) on the images x."""
    return evaluate(model, spec, images_of(x), cfg_eval, **kwargs)[0]
