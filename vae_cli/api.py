"""The Python API: a run directory in Python, and runs from Python.

    import vae_cli
    run = vae_cli.load_run("outputs/2026-12-01/12-00-00_jensen")
    x = run.model.sample(16, seed=0)                    # 16 images x ~ p(x|z), z ~ p(z): (16, 784)
    run.log_px(vae_cli.test_images(run.config, n=100))  # per image, by the estimator vae-eval would use
    summary = vae_cli.train(["objective=elbo", "n_train_iters=200"], "runs/elbo")

A run is read once, strictly (a broken or foreign directory raises the one-line error the commands
print, a vae_cli.errors.UserError) and never written. Images are flat: (N, 784) rows of 28 x 28
pixels, binary for a Bernoulli likelihood and grey levels in [0, 1] for a Gaussian one. Every input
is checked (a vae_cli.errors.InputError naming what was given and what is expected) and every output
is a tensor without gradients, ready for numpy and matplotlib; run.model.module is the torch module
itself, whose outputs carry gradients, for a user who differentiates (docs/api.md). The rest of the
package is private by convention: its names may change between versions.
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
from vae_cli.errors import ConfigError, InputError
from vae_cli.maths import likelihoods
from vae_cli.maths.grid_posterior import POSTERIOR_GRID, Z_LIMIT, GridPosterior, grid_posterior
from vae_cli.maths.likelihoods import LIKELIHOODS
from vae_cli.maths.models import LatentVariableModel
from vae_cli.maths.spec import N_PIXELS
from vae_cli.run.checkpoint import load_model
from vae_cli.run.config import data_config, eval_config, model_spec, typed_config
from vae_cli.run.data import load_images_here
from vae_cli.run.keys import EVERY_IMAGE
from vae_cli.run.rundir import read_run
from vae_cli.stages import estimates

__all__ = ["Model", "Run", "load_run", "test_images", "train", "train_images"]

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --- what the API accepts ------------------------------------------------------------------------


def _size(value: Any, where: str, name: str) -> int:
    """A count (of images, of draws): an int >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{where}: {name}={value!r} ({type(value).__name__}), expected an int >= 0")
    if value < 0:
        raise InputError(f"{where}: {name}={value}, expected an int >= 0")
    return int(value)


def _seed(value: Any, where: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
        raise InputError(f"{where}: seed={value!r} ({type(value).__name__}), expected an int or None")
    return None if value is None else int(value)


def _rows(value: Any, where: str, name: str, width: int, what: str, device: torch.device) -> torch.Tensor:
    """`value` as a float32 tensor (N, width) on `device`, finite; InputError naming what it is instead."""
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError, RuntimeError):
            raise InputError(
                f"{where}: {name} is a {type(value).__name__}, expected a tensor (N, {width}) of {what}"
            ) from None
    if value.dtype not in FLOATS:
        scale = " (bytes 0..255: divide by 255)" if value.dtype == torch.uint8 else ""
        raise InputError(f"{where}: {name} has dtype {value.dtype}, expected floating point (float32){scale}")
    if value.ndim != 2 or value.shape[1] != width:
        flat = " (images are flat: x.reshape(-1, 784))" if width == N_PIXELS and value.shape[-2:] == (28, 28) else ""
        raise InputError(f"{where}: {name} has shape {tuple(value.shape)}, expected (N, {width}): {what}{flat}")
    if value.device != device:
        raise InputError(
            f"{where}: {name} is on {value.device}, the model on {device}: give {name}.to({str(device)!r})"
        )
    if not bool(torch.isfinite(value).all()):
        raise InputError(f"{where}: {name} holds NaN or infinite values, expected finite {what}")
    return value.float()


def _images(likelihood: str, x: Any, where: str, device: torch.device) -> torch.Tensor:
    """Images (N, 784) that the run's likelihood models: binary pixels, or grey levels in [0, 1]."""
    x = _rows(x, where, "x", N_PIXELS, "images, 784 pixels each", device)
    if LIKELIHOODS[likelihood].pixels == likelihoods.BINARY:
        other = x[(x != 0) & (x != 1)]
        if len(other):
            raise InputError(
                f"{where}: x holds values other than 0 and 1 (e.g. {other[0].item():g}), expected binary pixels "
                f"(this run's likelihood={likelihood} models binary images): binarize them, e.g. (x > 0.5).float(), "
                "or use vae_cli.test_images"
            )
    elif len(x) and (x.min() < 0 or x.max() > 1):
        raise InputError(
            f"{where}: x holds values in [{x.min().item():g}, {x.max().item():g}], expected grey levels in [0, 1] "
            f"(this run's likelihood={likelihood} models grey levels): divide bytes by 255"
        )
    return x


class Model:
    """A run's model for use from Python: every input is checked (InputError) and every output is a
    tensor without gradients. `module` is the torch module (vae_cli.maths.models.LatentVariableModel)
    itself: its methods take the same arguments unchecked and return tensors that carry gradients.
    Any other attribute is the module's (K, likelihood, decoder, parameters(), ...)."""

    def __init__(self, module: LatentVariableModel, likelihood: str):
        self.module = module
        self.likelihood_name = likelihood  # its unit says which images it models

    def __getattr__(self, name: str) -> Any:
        if name == "module":  # not yet set (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.module, name)

    def __repr__(self) -> str:
        return f"Model({self.module!r})"

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def prior_sample(self, *shape: int, seed: int | None = None, generator: torch.Generator | None = None):
        """z ~ N(0, I) of shape (*shape, K) on the model's device (drawn on the CPU where `seed` is given)."""
        sizes = [_size(n, "prior_sample", f"shape[{i}]") for i, n in enumerate(shape)]
        if generator is not None and not isinstance(generator, torch.Generator):
            raise InputError(f"prior_sample: generator is a {type(generator).__name__}, expected a torch.Generator")
        with torch.no_grad():
            return self.module.prior_sample(*sizes, seed=_seed(seed, "prior_sample"), generator=generator)

    def sample(self, n: int, seed: int | None = None) -> torch.Tensor:
        """n images x ~ p(x|z), z ~ p(z) (samples, not means), (n, 784) on the CPU."""
        return self.module.sample(_size(n, "sample", "n"), seed=_seed(seed, "sample"))

    def decode(self, z: Any) -> torch.Tensor:
        """E[x|z] (N, 784) for z (N, K): the decoder's means (probabilities for Bernoulli pixels)."""
        z = _rows(z, "decode", "z", self.module.K, f"latent points of K={self.module.K} dimensions", self.device)
        with torch.no_grad():
            return self.module.decode(z)

    def encode(self, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and log-variance of q(z|x), each (N, K), for images x (N, 784)."""
        if self.module.encoder is None:
            raise InputError(
                "encode: this run's model has no encoder (objectives jensen, prior_iwae and exact train none)"
            )
        x = _images(self.likelihood_name, x, "encode", self.device)
        with torch.no_grad():
            return self.module.encode(x)


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
    model: Model  # in eval mode, on the device load_run was given; model.module: the torch module
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
        x = _images(self.model.likelihood_name, x, "log_px", self.device)
        if estimator == "auto":
            estimator = estimates.plan(spec, cfg_eval, self.device, len(x))[0].name
        applicable = [name for name, e in estimates.ESTIMATORS.items() if e.applies(spec)]
        if estimator not in applicable:
            raise ConfigError(
                f"invalid estimator {estimator!r} for this run (K={spec.K}, model={spec.decoder}, "
                f"likelihood={spec.likelihood.name}): allowed auto, {', '.join(applicable)}"
            )
        if not len(x):  # no image: no estimate to run
            return torch.zeros(0, dtype=torch.float64)
        planned = estimates.ESTIMATORS[estimator].plan(spec, cfg_eval, self.device, len(x))
        with torch.no_grad(), estimates.float32_matmuls():
            _, values, _ = estimates.ESTIMATORS[estimator].run(
                self.model.module, x, cfg_eval, planned, estimates.Stopwatch(self.device)
            )
        return values[estimator].double().cpu()

    def posterior(self, x: torch.Tensor, points: int = POSTERIOR_GRID, limit: float = Z_LIMIT) -> GridPosterior:
        """The exact p(z|x) of each image on a points x points grid over [-limit, limit]^2 (K = 2)."""
        if self.model.K != 2:
            raise ConfigError(f"posterior: the grid is drawn for K = 2, this run has K={self.model.K}")
        if _size(points, "posterior", "points") < 2:
            raise InputError(f"posterior: points={points}, expected an int >= 2")
        if (
            isinstance(limit, bool)
            or not isinstance(limit, (int, float, np.integer, np.floating))
            or not 0 < limit < float("inf")
        ):
            raise InputError(f"posterior: limit={limit!r}, expected a finite number > 0")
        x = _images(self.model.likelihood_name, x, "posterior", self.device)
        return grid_posterior(self.model.module, x, n=points, limit=float(limit))


def load_run(path: str | Path, device: str | torch.device = "cpu") -> Run:
    """A run directory, read once: its config, summary, evaluation, losses and model (on `device`)."""
    path = Path(path)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"load_run: device={device!r}, expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"load_run: device={str(device)!r}, but CUDA is not available here: use cpu")
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
        model=Model(model.to(device).eval(), cfg.likelihood.name),
        step=step,
        _cfg=cfg,
    )


def _typed(config: dict[str, Any] | DictConfig) -> DictConfig:
    return config if isinstance(config, DictConfig) else typed_config(config, Path("<config>"))


def test_images(config: dict[str, Any] | DictConfig, n: int | None = None) -> torch.Tensor:
    """The first n test images (all where n is None) as the runs of `config` are evaluated on them:
    binarized, or dequantized, with the test set's fixed seed. (n, 784) float32 on the CPU."""
    cfg = _typed(config)
    n = None if n is None else _size(n, "test_images", "n")
    return load_images_here(data_config(cfg), cfg.seed, torch.device("cpu")).test[:n]


def train_images(config: dict[str, Any] | DictConfig, n: int | None = None, seed: int = 0) -> torch.Tensor:
    """The first n training images as the runs of `config` see them: the static binarization of the
    run's seed; for dynamic binarization and grey levels one fresh draw from `seed`."""
    cfg = _typed(config)
    n, seed = None if n is None else _size(n, "train_images", "n"), _seed(seed, "train_images")
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
