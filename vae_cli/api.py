"""The Python API: a run directory in Python, and runs from Python.

    import vae_cli
    run = vae_cli.load_run("outputs/2026-12-01/12-00-00_jensen")
    x = run.model.sample(16, seed=0)                    # 16 images x ~ p(x|z), z ~ p(z)
    run.log_px(vae_cli.test_images(run.config, n=100))  # per image, by the estimator vae-eval would use
    summary = vae_cli.train(["objective=elbo", "n_train_iters=200"], "runs/elbo")

A run is read once, strictly (a broken or foreign directory raises the one-line error the commands
print, a vae_cli.errors.UserError) and never written. The rest of the package is private by
convention: its names may change between versions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from vae_cli.commands.app import compose_config
from vae_cli.commands.callbacks import changed_keys
from vae_cli.errors import ConfigError
from vae_cli.maths.grid_posterior import POSTERIOR_GRID, Z_LIMIT, GridPosterior, grid_posterior
from vae_cli.maths.models import LatentVariableModel
from vae_cli.run.checkpoint import load_model
from vae_cli.run.config import data_config, eval_config, model_spec, typed_config
from vae_cli.run.data import load_images_here
from vae_cli.run.keys import EVERY_IMAGE
from vae_cli.run.rundir import read_run
from vae_cli.stages import estimates

__all__ = ["Run", "load_run", "test_images", "train", "train_images"]


@dataclass
class Run:
    """A trained run as its directory holds it."""

    path: Path
    config: dict[str, Any]  # the run's config, plain values
    summary: dict[str, Any] | None  # summary.json
    eval: dict[str, Any] | None  # eval.json; None when the run was not evaluated
    per_image: dict[str, np.ndarray] | None  # eval_images.csv: each estimator's value of every test image
    losses: dict[str, np.ndarray]  # losses.csv, a column each
    status: str  # completed, trained, interrupted, ... (summary.json), or partial
    model: LatentVariableModel  # in eval mode, on the device load_run was given
    step: int  # the checkpoint's step
    _cfg: DictConfig

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def log_px(self, x: torch.Tensor, estimator: str = "auto", **settings: Any) -> torch.Tensor:
        """log p(x) of each image x (N, 784) by the estimators of vae-eval, float64 on the CPU. auto:
        the closed form where it exists, else the quadrature where K <= 2, else the run's eval.ais choice
        (AIS, or importance / prior MC where it is false). `settings` are eval.* keys without the
        prefix (ais_steps=1000, importance_k=5000, ...); the rest are the run's."""
        # every image given, not the CPU's default subsets, and no BDMC: only the images' own values are returned
        cfg_eval = eval_config(self._cfg.get("eval"), {**settings, **EVERY_IMAGE, "bdmc_n_images": 0})
        spec = model_spec(self._cfg)
        x = torch.as_tensor(x, dtype=torch.float32).to(self.device)
        if estimator == "auto":
            estimator = estimates.plan(spec, cfg_eval, self.device, len(x))[0].name
        applicable = [name for name, e in estimates.ESTIMATORS.items() if e.applies(spec)]
        if estimator not in applicable:
            raise ConfigError(
                f"invalid estimator {estimator!r} for this run (K={spec.K}, model={spec.decoder}, "
                f"likelihood={spec.likelihood.name}): allowed auto, {', '.join(applicable)}"
            )
        planned = estimates.ESTIMATORS[estimator].plan(spec, cfg_eval, self.device, len(x))
        with torch.no_grad(), estimates.float32_matmuls():
            _, values, _ = estimates.ESTIMATORS[estimator].run(
                self.model, x, cfg_eval, planned, estimates.Stopwatch(self.device)
            )
        return values[estimator].double().cpu()

    def posterior(self, x: torch.Tensor, points: int = POSTERIOR_GRID, limit: float = Z_LIMIT) -> GridPosterior:
        """The exact p(z|x) of each image on a points x points grid over [-limit, limit]^2 (K = 2)."""
        if self.model.K != 2:
            raise ConfigError(f"posterior: the grid is drawn for K = 2, this run has K={self.model.K}")
        return grid_posterior(self.model, torch.as_tensor(x, dtype=torch.float32), n=points, limit=limit)


def load_run(path: str | Path, device: str | torch.device = "cpu") -> Run:
    """A run directory, read once: its config, summary, evaluation, losses and model (on `device`)."""
    path = Path(path)
    files = read_run(path, strict=True)
    cfg, model, step = load_model(path)
    losses = {k: np.asarray(v) for k, v in (files.losses or {}).items()}
    per_image = {k: np.asarray(v) for k, v in files.per_image.items()} if files.per_image else None
    return Run(
        path=path,
        config=OmegaConf.to_container(cfg, resolve=True),
        summary=files.summary,
        eval=files.evaluation,
        per_image=per_image,
        losses=losses,
        status=files.status,
        model=model.to(device).eval(),
        step=step,
        _cfg=cfg,
    )


def _typed(config: dict[str, Any] | DictConfig) -> DictConfig:
    return config if isinstance(config, DictConfig) else typed_config(config, Path("<config>"))


def test_images(config: dict[str, Any] | DictConfig, n: int | None = None) -> torch.Tensor:
    """The first n test images (all where n is None) as the runs of `config` are evaluated on them:
    binarized, or dequantized, with the test set's fixed seed. (n, 784) float32 on the CPU."""
    cfg = _typed(config)
    return load_images_here(data_config(cfg), cfg.seed, torch.device("cpu")).test[:n]


def train_images(config: dict[str, Any] | DictConfig, n: int | None = None, seed: int = 0) -> torch.Tensor:
    """The first n training images as the runs of `config` see them: the static binarization of the
    run's seed; for dynamic binarization and grey levels one fresh draw from `seed`."""
    cfg = _typed(config)
    images = load_images_here(data_config(cfg), cfg.seed, torch.device("cpu"))
    return images.as_seen(images.train[:n], torch.Generator().manual_seed(seed))


def train(overrides: list[str], run_dir: str | Path) -> dict[str, Any]:
    """The run `vae-train OVERRIDES hydra.run.dir=RUN_DIR` would make, from Python (Hydra's compose
    API: no Hydra files in run_dir, no logging set up); returns summary.json's dict. Usable in a loop."""
    # The pipeline draws the run's figures, so it brings matplotlib: imported here, where a run is made,
    # so that loading and evaluating runs never pays for it.
    from vae_cli.stages import pipeline

    cfg = compose_config(list(overrides))
    return pipeline.train(cfg, Path(run_dir), changed_keys(overrides))
