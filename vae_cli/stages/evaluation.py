"""The evaluation stage: test-set log p(x) of a trained model by every estimator that applies, next
to the bounds and their gaps.

    result, per_image = evaluate(model, spec, images, cfg_eval)

runs a plan (vae_cli.stages.estimates.plan): the estimator of log_px first (the closed form for a linear model with a
Gaussian likelihood, the quadrature where K <= 2, else annealed importance sampling), then the
others, each of which reports its mean difference from log_px on the same images. The memory
check counts exactly the estimators of that plan. Every number is a mean over the same test images
with its standard error; a gap is the mean of per-image differences:

    gap_jensen = log p(x) - E_p(z) log p(x|z)  = mean KL(p(z) || p(z|x))
    gap_elbo   = log p(x) - ELBO               = mean KL(q(z|x) || p(z|x))

Every image's value by each estimator goes to eval_images.csv (`per_image`). `evaluate_run` is
vae-eval: a run from its own files, reusing the estimates eval.json already holds for the same
checkpoint and settings.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import vae_cli
from vae_cli.errors import RunDirError
from vae_cli.maths.estimators import encoder_statistics
from vae_cli.maths.linear_gaussian import LinearGaussian
from vae_cli.maths.models import LatentVariableModel
from vae_cli.maths.spec import N_PIXELS, QUADRATURE_MAX_K, ModelSpec
from vae_cli.run.checkpoint import load_model
from vae_cli.run.config import data_config, eval_config, missing_logger_package, model_spec, objective_options
from vae_cli.run.data import LEVELS, Images, load_images, load_images_here
from vae_cli.run.datafiles import split_sizes
from vae_cli.run.files import check_writable
from vae_cli.run.keys import GREY_LEVELS, EvalConfig
from vae_cli.run.machine import resolve_device, set_process_speed_settings
from vae_cli.run.rundir import CHECKPOINT, EVAL, GRADIENT_SNR_PNG, RunLock, read_run, write_evaluation
from vae_cli.stages.drawing import save_gradient_snr
from vae_cli.stages.estimates import (
    BOUND_SOURCES,
    ESTIMATORS,
    Bounds,
    PerImage,
    Planned,
    RunResult,
    Stopwatch,
    check_memory,
    describe_gradient_snr,
    float32_matmuls,
    gap_decomposition,
    gradient_snr_applies,
    mean_stderr,
    memory_gradient_snr,
    memory_parts,
    paired_difference,
    plan,
    psis_against,
    run_gradient_snr,
)
from vae_cli.stages.tracking import open_tracker

log = logging.getLogger(__name__)

ACTIVE_UNIT_THRESHOLD = 0.01  # a latent dimension is active when Var_x E_q[z_j] exceeds this


# --- the evaluation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Previous:
    """What eval.json and eval_images.csv hold of the same checkpoint, for vae-eval to reuse."""

    result: dict[str, Any]
    per_image: dict[str, list[float]]

    def reusable(self, planned: Planned) -> RunResult | None:
        """The entry, per-image values and bounds of `planned` as they were, where they can stand again
        (not where a hand-edited eval.json holds something else than vae-eval writes: it is computed again)."""
        try:
            entry = self.result["estimates"][planned.name]
            numbers = [entry[key] for key in ("value", "stderr", "seconds")]
            if entry["settings"] != planned.settings or not all(isinstance(n, (int, float)) for n in numbers):
                return None
            values = {
                k: torch.tensor(v, dtype=torch.float64) for k, v in self.per_image.items() if _of(k, planned.name)
            }
            bounds = dict(entry.get("bounds", {}))
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        if len(values.get(planned.name, ())) != planned.n_images or any(
            f"{planned.name}.{b}" not in values for b in bounds
        ):
            return None
        return {k: v for k, v in entry.items() if k not in ("minus_log_px", "n_images", "bounds")}, values, bounds


def _of(column: str, estimator: str) -> bool:
    return column == estimator or column.startswith(estimator + ".")


@torch.no_grad()
@float32_matmuls()
def evaluate(
    model: LatentVariableModel,
    spec: ModelSpec,
    images: Images,
    cfg_eval: DictConfig | EvalConfig,
    previous: Previous | None = None,
    ais_everywhere: bool = False,
    report: Callable[[str], None] = log.info,
) -> tuple[dict[str, Any], PerImage]:
    """eval.json's dict and the per-image values for `model` (of shape `spec`) on the test images of
    `images`; see the module docstring. `previous`: estimates to reuse where their settings are the same.
    `report` is told what runs, and after its first seconds how long each estimator will take."""
    x = images.test[: cfg_eval.n_images].to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    start, lap = time.perf_counter(), Stopwatch(x.device, report)
    estimates: dict[str, dict[str, Any]] = {}
    per_image: PerImage = {}
    produced: dict[str, dict[str, Bounds]] = {}
    reused: list[str] = []
    planned_runs = plan(spec, cfg_eval, x.device, len(x), ais_everywhere)
    for planned in planned_runs:
        found = previous.reusable(planned) if previous is not None else None
        if found is not None:
            reused.append(planned.name)
        else:
            report(f"evaluating: {planned.name} on {planned.n_images} test images")
            lap.begin(planned.name, ESTIMATORS[planned.name].shorten)
        entry, values, bounds = found or ESTIMATORS[planned.name].run(model, x, cfg_eval, planned, lap)
        estimates[planned.name] = {**entry, "n_images": len(values[planned.name]), "bounds": bounds}
        per_image.update(values)
        produced[planned.name] = bounds
    estimator = planned_runs[0].name
    log_px = per_image[estimator]
    for name, entry in estimates.items():  # each estimator's distance to log_px, paired per image
        if name != estimator:
            entry["minus_log_px"] = paired_difference(per_image[name], log_px)
            if "psis" in entry:
                entry["psis"]["vs_log_px"] = psis_against(per_image, name, log_px)

    result: dict[str, Any] = {
        "log_px": estimates[estimator]["value"],
        "log_px_stderr": estimates[estimator]["stderr"],
        "estimator": estimator,
        "n_images": len(log_px),
        "K": model.K,
    }
    result["bounds"] = {}
    for bound, sources in BOUND_SOURCES.items():
        source = next((s for s in sources if bound in produced.get(s, {})), None)
        if source is not None:
            result["bounds"][bound] = {**produced[source][bound], "from": source}
    # Gaps are means of per-image differences on the images both have (the first n): paired, so
    # their stderr is small. For a closed-form model they are exact, and the estimated ones beside them.
    for bound in ("jensen", "elbo"):
        gap = {"value": None, "stderr": None, "n_images": None}
        if bound in result["bounds"]:
            gap = paired_difference(log_px, per_image[f"{result['bounds'][bound]['from']}.{bound}"])
        result[f"gap_{bound}"], result[f"gap_{bound}_stderr"] = gap["value"], gap["stderr"]
        result[f"gap_{bound}_n_images"] = gap["n_images"]
        if estimator == "closed_form":
            result[f"gap_{bound}_estimated"] = _estimated_gap(bound, planned_runs, per_image, produced)
    if "qstar" in estimates:  # gap_elbo split into the approximation and amortization gaps
        elbo_from = result["bounds"].get("elbo", {}).get("from") if model.encoder is not None else None
        result.update(gap_decomposition(per_image, log_px, elbo_from))
    if images.binarization == GREY_LEVELS:  # nats of the density on [0, 1)^784 -> bits per 8-bit pixel
        bits = mean_stderr((-log_px.double() / N_PIXELS + math.log(LEVELS)) / math.log(2))
        result["bits_per_dim"], result["bits_per_dim_stderr"] = bits["value"], bits["stderr"]
    result["estimates"] = estimates
    if "bdmc" in estimates.get("ais", {}):
        result["bdmc_gap"] = estimates["ais"]["bdmc"]["gap"]["value"]
    if spec.likelihood.closed_form and images.binarization == GREY_LEVELS:  # what a linear decoder reaches
        result["reference"] = {"ppca": reference_ppca(images, spec.K, x, log_px)}
    if model.encoder is not None:
        result.update(encoder_summary(model, x, cfg_eval))
    result.update(
        reused=reused,
        seconds=time.perf_counter() - start,
        device=str(x.device),
        torch_version=torch.__version__,
        vae_cli_version=vae_cli.__version__,
    )
    model.train(was_training)
    return result, per_image


def _estimated_gap(bound: str, planned: list[Planned], per_image: PerImage, produced: dict) -> dict[str, Any] | None:
    """The gap as the estimators alone would give it (for a closed-form model, next to the exact one):
    the first other estimator's log p(x) minus the first other estimate of the bound."""
    log_px_by = next((p.name for p in planned if p.name != "closed_form"), None)
    bound_by = next((s for s in BOUND_SOURCES[bound] if s != "closed_form" and bound in produced.get(s, {})), None)
    if log_px_by is None or bound_by is None:
        return None
    gap = paired_difference(per_image[log_px_by], per_image[f"{bound_by}.{bound}"])
    return {**gap, "log_px_by": log_px_by, "bound_by": bound_by}


def reference_ppca(images: Images, K: int, x: torch.Tensor, log_px: torch.Tensor) -> dict[str, Any]:
    """The maximum-likelihood pPCA at the run's K (Tipping & Bishop 1999, from the training images'
    covariance), scored on the same test images: the ceiling a linear decoder can reach."""
    mean, cov = images.train_moments()
    ppca = LinearGaussian.from_moments(mean, cov, K)
    values = ppca.log_px(x)
    return {
        **mean_stderr(values),
        "K": K,
        "sigma": float(ppca.sigma),
        "minus_log_px": paired_difference(values, log_px),
        "method": "maximum-likelihood pPCA of the training images (Tipping & Bishop 1999)",
    }


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


def per_image_lists(per_image: PerImage) -> dict[str, list[float]]:
    return {name: values.double().cpu().tolist() for name, values in per_image.items()}


# --- gradient signal-to-noise (eval.gradient_snr) --------------------------------------------------


def gradient_snr(model: LatentVariableModel, images: Images, cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """{"gradient_snr": entry} for eval.json where eval.gradient_snr asks for it and the objective has
    gradient noise to measure (exact has none), and gradient_snr.png in the run directory; else {}."""
    if not cfg.eval.gradient_snr or not gradient_snr_applies(cfg.objective.name):
        return {}
    x = images.train[: cfg.eval.gradient_snr_images].to(next(model.parameters()).device)
    entry = run_gradient_snr(model, x, cfg.eval, cfg.objective.name, objective_options(cfg))
    save_gradient_snr(entry, Path(run_dir) / GRADIENT_SNR_PNG, Path(run_dir).name)
    return {"gradient_snr": entry}


# --- the table vae-eval prints ----------------------------------------------------------------------


def format_table(result: dict[str, Any]) -> str:
    """One screen: each estimator and bound with its value, stderr, its paired distance to log_px (the
    number to look at: how far below the best estimate it is), images and seconds, then the gaps; rows
    on fewer images than log_px in blocks of their own, which say which images they share. The
    settings cell is short: eval.json holds every setting."""
    n_all = result["n_images"]
    rows: list[tuple[int, str, str]] = []  # (images, name, the cells after it): names padded once all are known

    def row(name: str, value: float, stderr: float, images: int | None, seconds: float | None, note: str,
            vs: dict[str, Any] | None = None) -> None:  # fmt: skip
        images = images or n_all
        distance = f"{vs['value']:+9.3f}{vs['stderr']:8.3f}" if vs else f"{'':17}"
        time = "" if seconds is None else f"{seconds:.1f}"
        rows.append((images, name, f"{value:11.3f}{stderr:9.4f}{distance}{images:>8}{time:>9}  {note}"))

    for name, e in result["estimates"].items():
        label = (
            name
            + (" *" if name == result["estimator"] else "")
            + (" (reused)" if name in result.get("reused", []) else "")
        )
        note = ESTIMATORS[name].describe(e, result["K"]) if name in ESTIMATORS else ""
        row(label, e["value"], e["stderr"], e.get("n_images"), e["seconds"], note, e.get("minus_log_px"))
    for name, b in result["bounds"].items():
        label = f"bound iwae_{b['k']}" if name == "iwae_k" else f"bound {name}"
        row(label, b["value"], b["stderr"], b.get("n_images"), None, b["method"])
    for bound, what in (("jensen", "KL(p(z) || p(z|x))"), ("elbo", "KL(q(z|x) || p(z|x))")):
        if result[f"gap_{bound}"] is not None:
            gap, stderr, n = result[f"gap_{bound}"], result[f"gap_{bound}_stderr"], result.get(f"gap_{bound}_n_images")
            exact = "exact, " if result["estimator"] == "closed_form" else ""
            row(f"gap_{bound}", gap, stderr, n, None, f"log p(x) - {bound} = mean {what}, {exact}paired per image")
        if bound == "elbo" and result.get("gap_approximation") is not None:
            _decomposition_rows(result, row)
        estimated = result.get(f"gap_{bound}_estimated")
        if estimated:
            note = f"the same gap estimated: {estimated['log_px_by']} - {estimated['bound_by']}'s {bound}"
            row(f"gap_{bound} (est.)", estimated["value"], estimated["stderr"], estimated["n_images"], None, note)
    ppca = result.get("reference", {}).get("ppca")
    if ppca:
        row("reference ppca", ppca["value"], ppca["stderr"], None, None,
            f"ML pPCA at K={ppca['K']}, sigma {ppca['sigma']:.4f}", ppca["minus_log_px"])  # fmt: skip
    width = max([16] + [len(name) + 1 for _, name, _ in rows])
    header = f"{'log p(x)':>11}{'stderr':>9}{'vs *':>9}{'stderr':>8}{'images':>8}{'seconds':>9}  settings"
    lines = [f"{'':<{width}}{header}"]
    lines += [f"{name:<{width}}{cells}" for images, name, cells in rows if images == n_all]
    for images in sorted({images for images, _, _ in rows if images != n_all}, reverse=True):
        lines.append(f"-- on the first {images} test images only (log_px's first {images} are the same images):")
        lines += [f"{name:<{width}}{cells}" for n, name, cells in rows if n == images]
    units = f", active units {result['active_units']}/{result['K']}" if "active_units" in result else ""
    bits = f" ({result['bits_per_dim']:.3f} bits/dim)" if result.get("bits_per_dim") is not None else ""
    lines.append(
        f"* log_px ({result['estimator']}){bits} over {n_all} test images, nats; vs *: the paired mean difference "
        f"from it on the same images; {result['seconds']:.1f} s on {result['device']}{units}; every setting in {EVAL}"
    )
    if result.get("reused"):
        lines.append(
            f"reused from {EVAL} (same checkpoint and settings): {', '.join(result['reused'])}; --recompute runs them again"
        )
    if "gradient_snr" in result:
        lines += describe_gradient_snr(result["gradient_snr"])
    if result.get("posterior_means_near_grid_edge"):
        lines.append(
            f"warning: {result['posterior_means_near_grid_edge']} images have E_q[z] near the grid's edge: "
            "raise eval.quadrature_half_width"
        )
    return "\n".join(lines)


def _decomposition_rows(result: dict[str, Any], row) -> None:
    """gap_approximation and gap_amortization, and their sum against gap_elbo on the same images."""
    n = result["gap_approximation_n_images"]
    row("gap_approximation", result["gap_approximation"], result["gap_approximation_stderr"], n, None,
        "log p(x) - ELBO(q*) = mean KL(q* || p(z|x)): what no diagonal Gaussian fits")  # fmt: skip
    if result.get("gap_amortization") is None:
        row("gap_amortization", math.nan, math.nan, n, None, result.get("gap_amortization_note", "not defined"))
        return
    note = (
        f"ELBO(q*) - ELBO(q) = KL(q || p(z|x)) - KL(q* || p(z|x)): one encoder for all images; "
        f"sum {result['gap_approximation'] + result['gap_amortization']:.3f} = gap_elbo "
        f"{result['gap_elbo_same_images']:.3f} on these images"
    )
    n = result["gap_amortization_n_images"]
    row("gap_amortization", result["gap_amortization"], result["gap_amortization_stderr"], n, None, note)


# --- vae-eval: a run from its own files ------------------------------------------------------------


def checkpoint_digest(run_dir: Path) -> str:
    return hashlib.sha256((Path(run_dir) / CHECKPOINT).read_bytes()).hexdigest()


def of_run(result: dict[str, Any], run_dir: Path, cfg: DictConfig, images: Images, step: int, digest: str) -> dict:
    """eval.json's dict: the run, objective, data and checkpoint the estimates are of, then the estimates."""
    checkpoint = {"step": step, "sha256": digest}
    return {
        "run_dir": str(run_dir),
        "objective": cfg.objective.name,
        "data": images.source,
        "checkpoint": checkpoint,
        **result,
    }


def evaluate_run(
    run_dir: Path,
    device: str = "auto",
    overrides: dict[str, Any] | None = None,
    data_root: str | None = None,
    recompute: bool = False,
    report: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Evaluate a vae-train run from its own files (vae-eval): eval.json, eval_images.csv and summary.json's
    headline numbers. Everything is read and checked (memory included) and the run's lock taken before
    anything is written; estimates eval.json holds for the same checkpoint and settings are reused."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is not a directory")
    check_writable(run_dir, "run directory")  # eval.json goes here: say so before any work
    torch_device = resolve_device(device)
    settings = set_process_speed_settings(torch_device)  # before any torch work starts its threads
    # The lock before the run is read: what is evaluated and written is what no other process changes.
    with RunLock.acquire(run_dir, "vae-eval") as lock:
        files = read_run(run_dir, strict=True)
        cfg, model, step = load_model(run_dir)
        cfg.eval = eval_config(cfg.get("eval"), overrides)
        if missing := missing_logger_package(cfg.logger):  # the numbers matter more than the run's event files
            log.warning("%s; %s is written, the run's event files are not", missing, EVAL)
            cfg.logger = "csv"
        spec = model_spec(cfg)
        parts = memory_parts(
            spec, cfg.eval, torch_device, cfg.eval.n_images or split_sizes(cfg.data)["test"], ais_everywhere=True
        )
        if cfg.eval.gradient_snr and gradient_snr_applies(cfg.objective.name):
            parts += memory_gradient_snr(spec, cfg.eval)
        check_memory(parts, torch_device, lambda k: OmegaConf.select(cfg, k))
        digest = checkpoint_digest(run_dir)
        previous = None
        if (
            not recompute
            and files.evaluation is not None
            and isinstance(files.evaluation.get("checkpoint"), dict)
            and files.evaluation["checkpoint"].get("sha256") == digest
        ):
            previous = Previous(files.evaluation, files.per_image or {})
        load = load_images if data_root is not None else load_images_here  # a root the user names is not second-guessed
        images = load(data_config(cfg, data_root), cfg.seed, torch_device)
        model = model.to(torch_device)
        result, per_image = evaluate(model, spec, images, cfg.eval, previous, ais_everywhere=True, report=report)
        result = {**of_run(result, run_dir, cfg, images, step, digest), "process_settings": settings}
        result.update(gradient_snr(model, images, cfg, run_dir))
        if not lock.held:
            result["lock"] = f"none ({lock.reason})"
        summary = write_evaluation(run_dir, result, per_image_lists(per_image), files.summary)
        if summary is not None:  # a vae-train run: its own logger gets the new numbers too
            with open_tracker(cfg, run_dir) as tracker:
                tracker.evaluation(result, step)
                tracker.finish(summary)
    return result
