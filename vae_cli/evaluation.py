"""Test-set log p(x) of a trained model, every estimator next to the bounds and their gaps.

`evaluate(model, x, cfg_eval)` returns eval.json's dict; `evaluate_and_record` writes it into
a run directory (vae-train's last stage); `evaluate_run(run_dir)` loads a run from its own
files first (vae-eval). Every number is a mean over
the same test images with its standard error; a gap is the mean of per-image differences:

    gap_jensen = log p(x) - E_p(z) log p(x|z)  = mean KL(p(z) || p(z|x))
    gap_elbo   = log p(x) - ELBO               = mean KL(q(z|x) || p(z|x))

log_px is the quadrature where K <= 2 (exact up to the grid, whose halving is reported) and
annealed importance sampling where K > 2, with its BDMC gap on images simulated from the model
(vae_cli.ais); every other estimator reports its mean difference from log_px on the same images.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import vae_cli
from vae_cli.ais import SIGMOID_SCALE, TARGET_ACCEPTANCE, ais, bdmc
from vae_cli.config import (
    EvalConfig,
    ais_batch_images,
    ais_settings,
    ais_sizes,
    check_memory,
    data_config,
    eval_memory_parts,
    importance_sizes,
    missing_logger_package,
    validate_eval,
)
from vae_cli.data import load_data, load_data_here
from vae_cli.device import resolve_device
from vae_cli.errors import ConfigError, RunDirError
from vae_cli.estimators import (
    QUADRATURE_MAX_K,
    encoder_statistics,
    importance_sums,
    model_device,
    quadrature_grid,
    weighted_sums,
)
from vae_cli.models import LatentVariableModel
from vae_cli.rundir import load_run_model, mean_and_stderr, read_summary, record_evaluation
from vae_cli.tracking import open_tracker

log = logging.getLogger(__name__)

ACTIVE_UNIT_THRESHOLD = 0.01  # a latent dimension is active when Var_x E_q[z_j] exceeds this


def mean_stderr(values: torch.Tensor) -> dict[str, float]:
    value, stderr = mean_and_stderr(values.double().cpu().tolist())
    return {"value": value, "stderr": stderr}


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    """Mean and stderr of a - b per image, on the images both have (the first n), and n."""
    n = min(len(a), len(b))
    return {**mean_stderr(a[:n] - b[:n]), "n_images": n}


def points_per_dim(total: int, K: int) -> int:
    return max(2, int(round(total ** (1 / K))))


@contextmanager
def float32_matmuls():
    """Full float32 matmuls while evaluating, even after training with TF32 ones (cuda.tf32=true):
    TF32's 10-bit mantissa moves a sum of 784 logits by tenths of a nat."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


class Stopwatch:
    """Seconds since the last call, the device synchronized so queued GPU work is counted."""

    def __init__(self, device: torch.device):
        self.device = device
        self.last = time.perf_counter()

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds


PerImage = dict[str, torch.Tensor]  # per-image values of estimators and bounds, by name
Bounds = dict[str, dict[str, Any]]
RunResult = tuple[dict[str, Any], PerImage, Bounds]  # an estimator's entry, its per-image values, its bounds


def run_quadrature(model: LatentVariableModel, x: torch.Tensor, cfg_eval, lap: Stopwatch) -> RunResult:
    """log p(x) and the Jensen bound on the grid, and again at twice the spacing to show convergence."""
    n, width = points_per_dim(cfg_eval.quadrature_points, model.K), cfg_eval.quadrature_half_width
    fine = weighted_sums(model, x, *quadrature_grid(model.K, n, width, x.device), cfg_eval.batch_size)
    seconds = lap()
    coarse = weighted_sums(model, x, *quadrature_grid(model.K, n // 2, width, x.device), cfg_eval.batch_size).log_px
    entry = {**mean_stderr(fine.log_px), "seconds": seconds}
    entry["settings"] = {"points_per_dim": n, "n_points": n**model.K, "half_width": width, "spacing": 2 * width / n}
    coarse_value = mean_stderr(coarse)["value"]
    change = entry["value"] - coarse_value
    entry["halving"] = {"points_per_dim": n // 2, "value": coarse_value, "change": change, "seconds": lap()}
    jensen = {**mean_stderr(fine.jensen), "method": f"quadrature, {n}^{model.K} grid"}
    return entry, {"quadrature": fine.log_px, "jensen": fine.jensen}, {"jensen": jensen}


def run_importance(model: LatentVariableModel, x: torch.Tensor, cfg_eval, lap: Stopwatch) -> RunResult:
    """log p(x) with q(z|x) as proposal, and the ELBO and IWAE-k bound from the same draws, on the
    first eval.importance_n_images images (per-image draws cost k decoder passes an image)."""
    k, n = importance_sizes(cfg_eval, x.device, len(x))
    iwae_k = min(cfg_eval.iwae_k, k)
    imp = importance_sums(model, x[:n], k, iwae_k, cfg_eval.seed, cfg_eval.batch_size)
    settings = {"k": k, "proposal": "q(z|x)", "seed": cfg_eval.seed, "n_images": n}
    entry = {**mean_stderr(imp.log_px), "seconds": lap(), "settings": settings}
    bounds = {
        "elbo": {**mean_stderr(imp.elbo), "n_images": n, "method": f"{k} draws from q(z|x), closed-form KL"},
        "iwae_k": {
            **mean_stderr(imp.iwae),
            "k": iwae_k,
            "n_images": n,
            "method": f"mean over {k // iwae_k} groups of {iwae_k} draws",
        },
    }
    return entry, {"importance": imp.log_px, "elbo": imp.elbo}, bounds


def run_prior_mc(model: LatentVariableModel, x: torch.Tensor, cfg_eval, lap: Stopwatch) -> RunResult:
    """The log-mean-exp of p(x|z_s) over prior draws shared by every image, and the Jensen bound from them."""
    S = cfg_eval.prior_mc_samples
    z = model.sample_prior(S, generator=torch.Generator(device=x.device).manual_seed(cfg_eval.seed))
    mc = weighted_sums(model, x, z, torch.full((S,), -math.log(S), device=x.device), cfg_eval.batch_size)
    settings = {"n_samples": S, "shared": True, "seed": cfg_eval.seed}
    entry = {**mean_stderr(mc.log_px), "seconds": lap(), "settings": settings}
    jensen = {**mean_stderr(mc.jensen), "method": f"mean over {S} shared prior draws"}
    return entry, {"prior_mc": mc.log_px, "jensen": mc.jensen}, {"jensen": jensen}


def run_ais(model: LatentVariableModel, x: torch.Tensor, cfg_eval, lap: Stopwatch) -> RunResult:
    """AIS from p(z) to p(z|x) on the first eval.ais_n_images images, then BDMC on images simulated
    from the model: forward and reverse AIS bracket their log p(x), the gap is AIS's precision."""
    n, n_simulated = ais_sizes(cfg_eval, x.device, len(x))
    settings = ais_settings(cfg_eval, x.device)
    batch = ais_batch_images(cfg_eval)
    forward = ais(model, x[:n], settings, batch)
    estimate = forward.estimate()
    entry = {**mean_stderr(estimate), "seconds": lap()}
    entry["settings"] = {
        "steps": settings.steps,
        "schedule": f"sigmoid, delta={SIGMOID_SCALE:g} (Grosse et al. 2015)",
        "chains": settings.chains,
        "leapfrog": settings.leapfrog,
        "initial_step_size": settings.step_size,
        "target_acceptance": TARGET_ACCEPTANCE,
        "gradients": str(settings.gradient_dtype).removeprefix("torch."),  # energies and weights: float32
        "seed": settings.seed,
        "n_images": n,
    }
    entry.update(acceptance=float(forward.acceptance.mean()), step_size=float(forward.step_size.mean()))
    if n_simulated:
        cert = bdmc(model, n_simulated, settings, batch)
        entry["bdmc"] = {
            "n_images": n_simulated,
            "data": "simulated from the model: z ~ p(z), x ~ p(x|z)",
            "lower": mean_stderr(cert.lower),
            "upper": mean_stderr(cert.upper),
            "gap": mean_stderr(cert.upper - cert.lower),
            "acceptance": {
                "forward": float(cert.forward.acceptance.mean()),
                "reverse": float(cert.reverse.acceptance.mean()),
            },
            "seconds": lap(),
        }
    return entry, {"ais": estimate}, {}


def encoder_summary(model: LatentVariableModel, x: torch.Tensor, cfg_eval) -> dict[str, Any]:
    """Active units (Var_x E_q[z_j] > 0.01) and the mean KL(q(z_j|x) || p(z_j)) per dimension."""
    enc = encoder_statistics(model, x, cfg_eval.batch_size)
    mean_variance = enc.mean.var(0)
    edge = cfg_eval.quadrature_half_width - 1  # a grid misses mass of posteriors centred this close to its edge
    near_edge = int((enc.mean.abs() > edge).any(-1).sum()) if model.K <= QUADRATURE_MAX_K else None
    return {
        "active_units": int((mean_variance > ACTIVE_UNIT_THRESHOLD).sum()),
        "active_unit_threshold": ACTIVE_UNIT_THRESHOLD,
        "posterior_mean_variance": mean_variance.tolist(),
        "kl_per_dim": enc.kl.mean(0).tolist(),
        "posterior_means_near_grid_edge": near_edge,
    }


@torch.no_grad()
@float32_matmuls()
def evaluate(model: LatentVariableModel, data_test: torch.Tensor, cfg_eval: DictConfig | EvalConfig) -> dict[str, Any]:
    """eval.json's dict for `model` on the test images `data_test` (N, 784); see the module docstring."""
    x = data_test[: cfg_eval.n_images].to(model_device(model))
    was_training = model.training
    model.eval()
    start, lap = time.perf_counter(), Stopwatch(x.device)
    estimates: dict[str, dict[str, Any]] = {}
    per_image: PerImage = {}
    bounds: Bounds = {}
    exact = model.K <= QUADRATURE_MAX_K
    use_ais = not exact if cfg_eval.ais is None else cfg_eval.ais
    runs = [("quadrature", run_quadrature)] if exact else [("ais", run_ais)] if use_ais else []
    runs += [("importance", run_importance)] if model.encoder is not None else []
    runs += [("prior_mc", run_prior_mc)]
    runs += [("ais", run_ais)] if exact and use_ais else []  # next to the exact answer, as a check of AIS
    for name, run in runs:
        entry, values, new_bounds = run(model, x, cfg_eval, lap)
        estimates[name] = {**entry, "n_images": len(values[name])}
        per_image = {**values, **per_image}  # the Jensen bound from the first (most exact) that gives it
        bounds = {**new_bounds, **bounds}
    estimator = runs[0][0]  # quadrature where K <= 2, else AIS (importance, prior_mc where eval.ais=false)
    for name, entry in estimates.items():  # each estimator's distance to log_px, paired per image
        if name != estimator:
            entry["minus_log_px"] = paired_difference(per_image[name], per_image[estimator])

    result: dict[str, Any] = {
        "log_px": estimates[estimator]["value"],
        "log_px_stderr": estimates[estimator]["stderr"],
        "estimator": estimator,
        "n_images": len(per_image[estimator]),
        "K": model.K,
    }
    # Gaps are means of per-image differences on the images both have (the first n): paired, so
    # their stderr is small.
    for bound in ("jensen", "elbo"):
        gap = {"value": None, "stderr": None, "n_images": None}
        if bound in per_image:
            gap = paired_difference(per_image[estimator], per_image[bound])
        result[f"gap_{bound}"], result[f"gap_{bound}_stderr"] = gap["value"], gap["stderr"]
        result[f"gap_{bound}_n_images"] = gap["n_images"]
    result["estimates"] = estimates
    if "bdmc" in estimates.get("ais", {}):
        result["bdmc_gap"] = estimates["ais"]["bdmc"]["gap"]["value"]
    result["bounds"] = {name: bounds[name] for name in ("jensen", "elbo", "iwae_k") if name in bounds}
    if model.encoder is not None:
        result.update(encoder_summary(model, x, cfg_eval))
    result.update(
        seconds=time.perf_counter() - start,
        device=str(x.device),
        torch_version=torch.__version__,
        vae_cli_version=vae_cli.__version__,
    )
    model.train(was_training)
    return result


def describe(name: str, entry: dict[str, Any], K: int) -> str:
    s = entry["settings"]
    if name == "quadrature":
        return (
            f"{s['points_per_dim']}^{K} grid on [-{s['half_width']:g}, {s['half_width']:g}]^{K}; "
            f"halving the spacing changes it by {entry['halving']['change']:+.4f}"
        )
    if name == "importance":
        text = f"k={s['k']} draws from q(z|x), first {s['n_images']} images"
    elif name == "ais":
        text = (
            f"{s['steps']} steps (sigmoid), {s['chains']} chains, HMC {s['leapfrog']} leapfrog "
            f"({s.get('gradients', 'float32')} gradients), acceptance {entry['acceptance']:.2f}"  # older eval.json: float32
        )
        if "bdmc" in entry:
            b = entry["bdmc"]
            text += (
                f"; BDMC gap {b['gap']['value']:.3f} +- {b['gap']['stderr']:.3f} on {b['n_images']} simulated images"
            )
    else:
        text = f"S={s['n_samples']} prior draws shared by all images"
    if "minus_log_px" in entry:
        text += f"; {entry['minus_log_px']['value']:+.3f} vs *"
    return text


def format_table(result: dict[str, Any]) -> str:
    """One screen: each estimator and bound with its value, stderr, images and seconds, then the gaps."""
    lines = [f"{'':<14}{'log p(x)':>11}{'stderr':>9}{'images':>8}{'seconds':>9}  settings"]

    def row(name: str, value: float, stderr: float, images: int | None, seconds: float | None, note: str) -> None:
        cells = f"{name:<14}{value:11.3f}{stderr:9.4f}{images or result['n_images']:>8}"
        lines.append(f"{cells}{'' if seconds is None else f'{seconds:.1f}':>9}  {note}")

    for name, e in result["estimates"].items():
        label = name + (" *" if name == result["estimator"] else "")
        row(label, e["value"], e["stderr"], e.get("n_images"), e["seconds"], describe(name, e, result["K"]))
    for name, b in result["bounds"].items():
        label = f"bound iwae_{b['k']}" if name == "iwae_k" else f"bound {name}"
        row(label, b["value"], b["stderr"], b.get("n_images"), None, b["method"])
    for bound, what in (("jensen", "KL(p(z) || p(z|x))"), ("elbo", "KL(q(z|x) || p(z|x))")):
        if result[f"gap_{bound}"] is not None:
            gap, stderr, n = result[f"gap_{bound}"], result[f"gap_{bound}_stderr"], result.get(f"gap_{bound}_n_images")
            row(f"gap_{bound}", gap, stderr, n, None, f"log p(x) - {bound} = mean {what}, paired per image")
    units = f", active units {result['active_units']}/{result['K']}" if "active_units" in result else ""
    lines.append(
        f"* log_px ({result['estimator']}) over {result['n_images']} test images, nats; "
        f"{result['seconds']:.1f} s on {result['device']}{units}"
    )
    if result.get("posterior_means_near_grid_edge"):
        lines.append(
            f"warning: {result['posterior_means_near_grid_edge']} images have E_q[z] near the grid's edge: "
            "raise eval.quadrature_half_width"
        )
    return "\n".join(lines)


def evaluate_and_record(
    model: LatentVariableModel,
    data_test: torch.Tensor,
    cfg_eval: DictConfig | EvalConfig,
    run_dir: Path,
    **context: Any,
) -> dict[str, Any]:
    """evaluate(), then eval.json in run_dir (with `context`) and the headline numbers in summary.json."""
    run_dir = Path(run_dir)
    result = {"run_dir": str(run_dir), **context, **evaluate(model, data_test, cfg_eval)}
    record_evaluation(run_dir, result)
    log.info("test-set log p(x) of %s:\n%s", run_dir, format_table(result))
    return result


def eval_config(saved: DictConfig | None, overrides: dict[str, Any] | None = None) -> DictConfig:
    """The run's eval settings (defaults for runs from before eval existed) with `overrides`, checked."""
    try:
        cfg_eval = OmegaConf.merge(OmegaConf.structured(EvalConfig), saved or {}, overrides or {})
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid eval setting: {str(exc).splitlines()[0]}") from None
    validate_eval(OmegaConf.create({"eval": cfg_eval}))
    return cfg_eval


def evaluate_run(
    run_dir: Path, device: str = "auto", overrides: dict[str, Any] | None = None, data_root: str | None = None
) -> dict[str, Any]:
    """Evaluate a vae-train run from its own files (vae-eval): eval.json, and summary.json's headline numbers.
    Everything is read and checked (memory included) before anything is written."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is not a directory")
    cfg, model, state = load_run_model(run_dir)
    cfg.eval = eval_config(cfg.get("eval"), overrides)
    if missing := missing_logger_package(cfg):  # the numbers matter more than the run's event files
        log.warning("%s; eval.json is written, the run's event files are not", missing)
        cfg.logger = "csv"
    torch_device = resolve_device(device)
    check_memory(cfg, torch_device, eval_memory_parts(cfg, torch_device))
    load = load_data if data_root is not None else load_data_here  # a root the user names is not second-guessed
    data = load(data_config(cfg, data_root), cfg.seed, torch_device)
    result = evaluate_and_record(
        model.to(torch_device), data.test, cfg.eval, run_dir, objective=cfg.objective.name, data=data.source
    )
    summary = read_summary(run_dir)
    if summary is not None:  # a vae-train run: its own logger gets the new numbers too
        with open_tracker(cfg, run_dir) as tracker:
            tracker.evaluation(result, state["step"])
            tracker.finish(summary)
    return result
