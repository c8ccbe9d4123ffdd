"""The estimators of log p(x) as the evaluation runs them: which of them run for a model (`plan`),
with what settings and on how many images, each one's run over the test images, and the memory each
needs, so that the check before a run counts exactly what will run. A registry of small functions:
ESTIMATORS[name] = Estimator(applies, plan, run, memory); the maths is in vae_cli.maths."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from vae_cli.errors import ConfigError
from vae_cli.maths import qstar, streams
from vae_cli.maths.ais import (
    PILOT_CHAINS,
    SIGMOID_SCALE,
    STRETCHES,
    TARGET_ACCEPTANCE,
    AISSettings,
    ais,
    bdmc,
    max_step_size,
)
from vae_cli.maths.densities import quadrature_grid
from vae_cli.maths.estimators import (
    WeightDiagnostics,
    default_chunk_elements,
    encoder_statistics,
    importance_noise,
    importance_sums,
    weighted_sums,
)
from vae_cli.maths.gradient_snr import snr_by_sample_count
from vae_cli.maths.linear_gaussian import CHUNK_ROWS, LinearGaussian
from vae_cli.maths.models import LatentVariableModel
from vae_cli.maths.objectives import OBJECTIVES
from vae_cli.maths.psis import KHAT_THRESHOLD
from vae_cli.maths.spec import FLOAT_BYTES, N_PIXELS, QUADRATURE_MAX_K, ModelSpec
from vae_cli.run.keys import AIS_N_IMAGES, BDMC_N_IMAGES, IMPORTANCE_K, IMPORTANCE_N_IMAGES, QSTAR_N_IMAGES
from vae_cli.run.machine import available_bytes, has_native_bf16

# AIS decodes this many times eval.batch_size latents a pass: on the 2-core CPU its bf16 passes of
# 1000 latents (62 images x 16 chains) ran 30% slower than passes of 2000; float32 ones 4% slower.
AIS_LATENTS_PER_BATCH_IMAGE = 2


def mean_stderr(values: torch.Tensor) -> dict[str, float]:
    values = values.double().cpu()
    n = len(values)
    stderr = float(values.std() / math.sqrt(n)) if n > 1 else float("nan")
    return {"value": float(values.mean()), "stderr": stderr}


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    """Mean and stderr of a - b per image, on the images both have (the first n), and n."""
    n = min(len(a), len(b))
    return {**mean_stderr(a[:n].double() - b[:n].double()), "n_images": n}


def points_per_dim(total: int, K: int) -> int:
    return max(2, int(round(total ** (1 / K))))


@contextmanager
def tf32_matmuls(enabled: bool):
    """CUDA's TF32 matmul flag (process-wide) for the duration, then back to what it was."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def float32_matmuls():
    """Full float32 matmuls while evaluating, even after training with TF32 ones (cuda.tf32=true):
    TF32's 10-bit mantissa moves a sum of 784 logits by tenths of a nat."""
    return tf32_matmuls(False)


ESTIMATE_AFTER_S = 5.0  # an estimator's estimate of its own time, once it has run this long
PROGRESS_EVERY_S = 60.0  # then a line this often
LONG_S = 120.0  # an estimate this long names the keys that shorten it


class Stopwatch:
    """Seconds since the last call, the device synchronized so queued GPU work is counted; and each
    estimator's progress: after its first ESTIMATE_AFTER_S, how long it will take in all (and the keys
    that shorten it where that is long), then a line every PROGRESS_EVERY_S, through `report`."""

    def __init__(self, device: torch.device, report: Callable[[str], None] | None = None):
        self.device = device
        self.last = time.perf_counter()
        self.report = report or (lambda line: None)
        self.begin("")

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds

    def begin(self, what: str, shorten: tuple[str, ...] = ()) -> None:
        """A new stretch of work: `what` it is, and the keys that make it shorter."""
        self.what, self.shorten = what, shorten
        self.started = self.reported = time.perf_counter()
        self.estimated = False

    def progress(self, fraction: float) -> None:
        """The share of the current stretch that is done."""
        now = time.perf_counter()
        elapsed = now - self.started
        if fraction <= 0 or fraction >= 1 or elapsed < ESTIMATE_AFTER_S:
            return
        if not self.estimated:
            total = elapsed / fraction
            hint = f"; shorter with smaller {', '.join(self.shorten)}" if total > LONG_S and self.shorten else ""
            self.report(f"{self.what}: {fraction:.0%} done in {elapsed:.0f} s, about {_duration(total)} in all{hint}")
            self.estimated, self.reported = True, now
        elif now - self.reported >= PROGRESS_EVERY_S:
            left = elapsed / fraction - elapsed
            self.report(f"{self.what}: {fraction:.0%} done in {_duration(elapsed)}, about {_duration(left)} left")
            self.reported = now


def _duration(seconds: float) -> str:
    return (
        f"{seconds:.0f} s"
        if seconds < 90
        else f"{seconds / 60:.0f} min"
        if seconds < 5400
        else f"{seconds / 3600:.1f} h"
    )


# --- the sizes of each estimator ------------------------------------------------------------------


def _subset(n: int, n_images: int) -> int:
    """The first n of n_images images (0: all of them)."""
    return n_images if n == 0 else min(n, n_images)


def _per_device(value: int | None, default, device: torch.device) -> int:
    return default.on(device.type) if value is None else value


def importance_sizes(cfg_eval: Any, device: torch.device, n_images: int) -> tuple[int, int]:
    """(draws per image, images) of importance sampling with q for cfg_eval on `device`, out of n_images."""
    k = _per_device(cfg_eval.importance_k, IMPORTANCE_K, device)
    return k, _subset(_per_device(cfg_eval.importance_n_images, IMPORTANCE_N_IMAGES, device), n_images)


def ais_sizes(cfg_eval: Any, device: torch.device, n_images: int) -> tuple[int, int]:
    """(test images, simulated images for BDMC) of AIS for cfg_eval on `device`, out of n_images."""
    n = _subset(_per_device(cfg_eval.ais_n_images, AIS_N_IMAGES, device), n_images)
    return n, _per_device(cfg_eval.bdmc_n_images, BDMC_N_IMAGES, device)


def ais_settings(cfg_eval: Any, device: torch.device, linear_decoder: bool) -> AISSettings:
    """The AIS schedule, chains and seed of cfg_eval, with the gradient's dtype on `device` and the
    mass matrix where eval.ais_mass_matrix (null: for a linear decoder) says."""
    bf16 = has_native_bf16(device) if cfg_eval.ais_bf16_gradients is None else cfg_eval.ais_bf16_gradients
    mass = linear_decoder if cfg_eval.ais_mass_matrix is None else cfg_eval.ais_mass_matrix
    return AISSettings(
        steps=cfg_eval.ais_steps,
        chains=cfg_eval.ais_chains,
        leapfrog=cfg_eval.ais_leapfrog,
        step_size=cfg_eval.ais_step_size,
        seed=cfg_eval.seed,
        gradient_dtype=torch.bfloat16 if bf16 else torch.float32,
        mass_matrix=mass,
    )


def is_linear(model: LatentVariableModel) -> bool:
    """The model's decoder is f(z) = W z + b (model=linear), as its spec's decoder says."""
    return isinstance(model.decoder.net, torch.nn.Linear)


def ais_batch_images(cfg_eval: Any) -> int:
    """Images per AIS pass: AIS_LATENTS_PER_BATCH_IMAGE x eval.batch_size latents in all, as many chains a piece."""
    return max(1, AIS_LATENTS_PER_BATCH_IMAGE * cfg_eval.batch_size // cfg_eval.ais_chains)


# --- the plan: which estimators run, on how many images, with what settings --------------------------


@dataclass(frozen=True)
class Planned:
    """One estimator of the plan: its name, the images it covers, and every setting its numbers
    depend on (eval.json records them; vae-eval reuses an estimate whose settings are the same)."""

    name: str
    n_images: int
    settings: dict[str, Any]


def plan(
    spec: ModelSpec, cfg_eval: Any, device: torch.device, n_images: int, ais_everywhere: bool = False
) -> list[Planned]:
    """The estimators evaluation runs for a model of `spec` on n_images test images, in the order their
    entries declare, log_px's first: the closed form where it exists, else the quadrature where K <= 2,
    else AIS (eval.ais=false: importance, else prior_mc), then the others. eval.ais=null runs AIS where
    no estimator that spares it (the quadrature) applies, or at every K where ais_everywhere (vae-eval,
    so that every run shows AIS next to an exact answer); there it comes last, as a check. A closed
    form does not spare AIS: above K = 2 it is where AIS is scored against the truth."""
    exact = any(e.spares_ais and e.applies(spec) for e in ESTIMATORS.values())
    names = [name for name, e in ESTIMATORS.items() if e.applies(spec) and e.enabled(cfg_eval, exact, ais_everywhere)]
    names.sort(key=lambda name: ESTIMATORS[name].position(exact))
    return [ESTIMATORS[name].plan(spec, cfg_eval, device, n_images) for name in names]


def _plan_quadrature(spec: ModelSpec, cfg_eval: Any, device: torch.device, n: int) -> Planned:
    points = points_per_dim(cfg_eval.quadrature_points, spec.K)
    width = cfg_eval.quadrature_half_width
    settings = {
        "points_per_dim": points,
        "n_points": points**spec.K,
        "half_width": width,
        "spacing": 2 * width / points,
    }
    return Planned("quadrature", n, {**settings, "n_images": n})


def _plan_importance(spec: ModelSpec, cfg_eval: Any, device: torch.device, n: int) -> Planned:
    k, n = importance_sizes(cfg_eval, device, n)
    settings = {"k": k, "iwae_k": min(cfg_eval.iwae_k, k), "proposal": "q(z|x)", "seed": cfg_eval.seed}
    return Planned("importance", n, {**settings, "diagnostics": PSIS_DIAGNOSTICS, "n_images": n})


def _plan_prior_mc(spec: ModelSpec, cfg_eval: Any, device: torch.device, n: int) -> Planned:
    settings = {"n_samples": cfg_eval.prior_mc_samples, "shared": True, "seed": cfg_eval.seed}
    return Planned("prior_mc", n, {**settings, "diagnostics": PSIS_DIAGNOSTICS, "n_images": n})


def _plan_ais(spec: ModelSpec, cfg_eval: Any, device: torch.device, n: int) -> Planned:
    n, n_simulated = ais_sizes(cfg_eval, device, n)
    settings = ais_settings(cfg_eval, device, spec.decoder == "linear")
    described = {
        "steps": settings.steps,
        "schedule": f"sigmoid, delta={SIGMOID_SCALE:g} (Grosse et al. 2015)",
        "chains": settings.chains,
        "leapfrog": settings.leapfrog,
        "initial_step_size": max_step_size(settings.leapfrog) if settings.step_size is None else settings.step_size,
        "max_step_size": max_step_size(settings.leapfrog),
        "mass_matrix": "diagonal, I + beta H from the pilot's secants" if settings.mass_matrix else "identity",
        "pilot": {"chains": PILOT_CHAINS, "stretches": STRETCHES, "target_acceptance": TARGET_ACCEPTANCE},
        "gradients": str(settings.gradient_dtype).removeprefix("torch."),  # energies and weights: float32
        "seed": settings.seed,
        "n_images": n,
        "bdmc_n_images": n_simulated,
    }
    return Planned("ais", n, described)


def _plan_qstar(spec: ModelSpec, cfg_eval: Any, device: torch.device, n: int) -> Planned:
    n = _subset(_per_device(cfg_eval.qstar_n_images, QSTAR_N_IMAGES, device), n)
    settings = {
        "optimizer": "the mode (Adam), its Laplace variances, then natural-gradient ascent of the ELBO",
        "steps": qstar.STEPS,
        "samples": qstar.SAMPLES,
        "antithetic": True,
        "lr": qstar.LR,
        "averaged": f"the last {qstar.AVERAGED:.0%} of the iterates",
        "start": "q(z|x)" if spec.encoder else f"{qstar.INIT_DRAWS} prior draws weighted by p(x|z)",
        # the ELBO of q*: as the evaluation's ELBO of q(z|x), and from the importance estimator's draws
        "elbo": "closed form" if spec.closed_form else "E_q log p(x|z) from the importance draws, closed-form KL",
        "elbo_draws": None if spec.closed_form else importance_sizes(cfg_eval, device, n)[0],
        "seed": cfg_eval.seed,
    }
    return Planned("qstar", n, {**settings, "n_images": n})


def qstar_batch_images(cfg_eval: Any) -> int:
    """Images per pass of the q* optimizer: 4 x eval.batch_size latents, qstar.SAMPLES a piece."""
    return max(1, 4 * cfg_eval.batch_size // qstar.SAMPLES)


def _plan_closed_form(spec: ModelSpec, cfg_eval: Any, device: torch.device, n: int) -> Planned:
    per_pixel = spec.likelihood.option("per_pixel", False)
    kind = "factor analysis (sigma per pixel)" if per_pixel else "probabilistic PCA (shared sigma)"
    return Planned("closed_form", n, {"model": kind, "n_images": n})


# --- how far importance weights can be trusted (importance, prior_mc) ----------------------------------

PSIS_DIAGNOSTICS = "PSIS k-hat and ESS per image (Vehtari et al. 2024)"
LOW_BY = 1.0  # an estimate this many nats below log_px missed the posterior


def psis_values(name: str, diagnostics: WeightDiagnostics) -> dict[str, torch.Tensor]:
    """eval_images.csv's columns of an estimator's diagnostics: "<name>.khat", "<name>.ess"."""
    return {f"{name}.khat": diagnostics.khat, f"{name}.ess": diagnostics.ess}


def psis_summary(diagnostics: WeightDiagnostics) -> dict[str, Any]:
    """The share of images whose k-hat flags their weights, and the ESS, over the estimator's images."""
    flagged = diagnostics.khat > KHAT_THRESHOLD
    return {
        "khat_threshold": KHAT_THRESHOLD,
        "flagged": int(flagged.sum()),
        "flagged_share": float(flagged.double().mean()),
        "khat_max": float(diagnostics.khat.nan_to_num(nan=-math.inf).max()),
        "ess": mean_stderr(diagnostics.ess),
    }


def psis_against(per_image: PerImage, name: str, log_px: torch.Tensor) -> dict[str, Any]:
    """The flag checked against log_px on the same images: the flagged images' mean distance to it,
    and as a detector of estimates over LOW_BY nats below it, the flag's precision and recall."""
    n = min(len(per_image[name]), len(log_px))
    error = (per_image[name][:n] - log_px[:n]).double()
    flagged, low = per_image[f"{name}.khat"][:n] > KHAT_THRESHOLD, error < -LOW_BY
    hits = int((flagged & low).sum())
    return {
        "flagged_minus_log_px": mean_stderr(error[flagged]) if bool(flagged.any()) else None,
        "low_by": LOW_BY,
        "low": int(low.sum()),
        "precision": hits / int(flagged.sum()) if bool(flagged.any()) else None,
        "recall": hits / int(low.sum()) if bool(low.any()) else None,
    }


def _describe_psis(entry: dict[str, Any]) -> str:
    psis = entry.get("psis")
    if psis is None:  # older eval.json
        return ""
    text = f"; k-hat > {psis['khat_threshold']:g} on {100 * psis['flagged_share']:.1f}% ({psis['flagged']})"
    against = psis.get("vs_log_px")
    if against and against["flagged_minus_log_px"] is not None:
        text += f", those {against['flagged_minus_log_px']['value']:+.2f} vs *"
    text += f", ESS {psis['ess']['value']:.0f}"
    if against and against["low"]:
        precision = "-" if against["precision"] is None else f"{against['precision']:.2f}"
        text += f"; the flag finds {against['recall']:.2f} of the {against['low']} images over {against['low_by']:g} nat low, precision {precision}"
    return text


# --- running each estimator -----------------------------------------------------------------------

PerImage = dict[str, torch.Tensor]  # per-image values: "<estimator>" (log p(x)) and "<estimator>.<bound>"
Bounds = dict[str, dict[str, Any]]
RunResult = tuple[dict[str, Any], PerImage, Bounds]  # the estimator's entry, its per-image values, its bounds


def run_quadrature(
    model: LatentVariableModel, x: torch.Tensor, cfg_eval, planned: Planned, lap: Stopwatch
) -> RunResult:
    """log p(x) and the Jensen bound on the grid, and again at twice the spacing to show convergence."""
    s = planned.settings
    n, width = s["points_per_dim"], s["half_width"]
    fine = weighted_sums(
        model, x, *quadrature_grid(model.K, n, width, x.device), cfg_eval.batch_size, progress=lap.progress
    )
    seconds = lap()
    coarse = weighted_sums(model, x, *quadrature_grid(model.K, n // 2, width, x.device), cfg_eval.batch_size).log_px
    entry = {**mean_stderr(fine.log_px), "seconds": seconds, "settings": s}
    coarse_value = mean_stderr(coarse)["value"]
    entry["halving"] = {
        "points_per_dim": n // 2,
        "value": coarse_value,
        "change": entry["value"] - coarse_value,
        "seconds": lap(),
    }
    jensen = {**mean_stderr(fine.jensen), "method": f"quadrature, {n}^{model.K} grid"}
    return entry, {"quadrature": fine.log_px, "quadrature.jensen": fine.jensen}, {"jensen": jensen}


def run_importance(
    model: LatentVariableModel, x: torch.Tensor, cfg_eval, planned: Planned, lap: Stopwatch
) -> RunResult:
    """log p(x) with q(z|x) as proposal, and the ELBO and IWAE-k bound from the same draws, on the
    first eval.importance_n_images images (per-image draws cost k decoder passes an image)."""
    s = planned.settings
    k, iwae_k, n = s["k"], s["iwae_k"], planned.n_images
    imp = importance_sums(
        model, x[:n], k, iwae_k, cfg_eval.seed, cfg_eval.batch_size, progress=lap.progress, diagnose=True
    )
    entry = {**mean_stderr(imp.log_px), "seconds": lap(), "settings": s, "psis": psis_summary(imp.diagnostics)}
    bounds = {
        "elbo": {**mean_stderr(imp.elbo), "n_images": n, "method": f"{k} draws from q(z|x), closed-form KL"},
        "iwae_k": {
            **mean_stderr(imp.iwae),
            "k": iwae_k,
            "n_images": n,
            "method": f"mean over {k // iwae_k} groups of {iwae_k} draws",
        },
    }
    values = {"importance": imp.log_px, "importance.elbo": imp.elbo, "importance.iwae_k": imp.iwae}
    return entry, {**values, **psis_values("importance", imp.diagnostics)}, bounds


def run_prior_mc(model: LatentVariableModel, x: torch.Tensor, cfg_eval, planned: Planned, lap: Stopwatch) -> RunResult:
    """The log-mean-exp of p(x|z_s) over prior draws shared by every image, and the Jensen bound from them."""
    S = planned.settings["n_samples"]
    z = streams.normal(streams.stream(cfg_eval.seed, "prior_mc"), (S, model.K), x.device)
    log_w = torch.full((S,), -math.log(S), device=x.device)
    mc = weighted_sums(model, x, z, log_w, cfg_eval.batch_size, progress=lap.progress, diagnose=True)
    entry = {
        **mean_stderr(mc.log_px),
        "seconds": lap(),
        "settings": planned.settings,
        "psis": psis_summary(mc.diagnostics),
    }
    jensen = {**mean_stderr(mc.jensen), "method": f"mean over {S} shared prior draws"}
    values = {"prior_mc": mc.log_px, "prior_mc.jensen": mc.jensen, **psis_values("prior_mc", mc.diagnostics)}
    return entry, values, {"jensen": jensen}


def run_ais(model: LatentVariableModel, x: torch.Tensor, cfg_eval, planned: Planned, lap: Stopwatch) -> RunResult:
    """AIS from p(z) to p(z|x) on the first eval.ais_n_images images, then BDMC on images simulated
    from the model: forward and reverse AIS bracket their log p(x), the gap is AIS's precision."""
    settings = ais_settings(cfg_eval, x.device, is_linear(model))
    batch = ais_batch_images(cfg_eval)
    forward = ais(model, x[: planned.n_images], settings, batch, progress=lap.progress)
    estimate = forward.estimate()
    entry = {**mean_stderr(estimate), "seconds": lap(), "settings": planned.settings}
    entry.update(acceptance=float(forward.acceptance.mean()), step_size=float(forward.step_size.mean()))
    n_simulated = planned.settings["bdmc_n_images"]
    if n_simulated:
        lap.begin("BDMC", ("eval.bdmc_n_images", "eval.ais_steps"))
        cert = bdmc(model, n_simulated, settings, batch, progress=lap.progress)
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


def run_closed_form(
    model: LatentVariableModel, x: torch.Tensor, cfg_eval, planned: Planned, lap: Stopwatch
) -> RunResult:
    """log p(x) = log N(x; b, W W^T + Psi), the Jensen bound and, for a linear encoder, the ELBO, all
    exact per image (vae_cli.maths.linear_gaussian)."""
    lg: LinearGaussian = model.linear_gaussian()
    values = {"closed_form": lg.log_px(x), "closed_form.jensen": lg.jensen_bound(x)}
    bounds = {"jensen": {**mean_stderr(values["closed_form.jensen"]), "method": "closed form"}}
    if model.encoder is not None:
        enc = encoder_statistics(model, x, cfg_eval.batch_size)
        values["closed_form.elbo"] = lg.elbo(x, enc.mean, enc.logvar)
        bounds["elbo"] = {**mean_stderr(values["closed_form.elbo"]), "method": "closed form"}
    entry = {**mean_stderr(values["closed_form"]), "seconds": lap(), "settings": planned.settings}
    return entry, values, bounds


def _pass_progress(lap: Stopwatch, before: int, size: int, n: int) -> Callable[[float], None]:
    """The progress of a pass over `size` of n images after `before` others: its share f of the whole."""
    return lambda f: lap.progress((before + f * size) / n)


def run_qstar(model: LatentVariableModel, x: torch.Tensor, cfg_eval, planned: Planned, lap: Stopwatch) -> RunResult:
    """The ELBO of q*(z|x), each image's best diagonal Gaussian (vae_cli.maths.qstar), on the first
    eval.qstar_n_images images: from the encoder's q(z|x) (from prior draws without an encoder),
    and for a linear-Gaussian model also in closed form, which is then its value (the optimizer's
    distance to it is recorded). evaluation.evaluate splits gap_elbo with it."""
    n, seed = planned.n_images, cfg_eval.seed
    k = importance_sizes(cfg_eval, x.device, n)[0]
    lg = model.linear_gaussian()
    fitted, estimated = [], []
    for first in range(0, n, qstar_batch_images(cfg_eval)):
        xb = x[first : min(n, first + qstar_batch_images(cfg_eval))]
        start = model.encode(xb) if model.encoder is not None else qstar.prior_start(model, xb, seed, first)
        fit = qstar.optimize(model, xb, *start, seed, first, progress=_pass_progress(lap, first, len(xb), n))
        fitted.append(fit)
        if lg is None:  # the same draws as the importance estimator's ELBO of q(z|x): their difference is paired
            eps = importance_noise(len(xb), k, model.K, seed, first, x.device, fit.mean.dtype)
            chunk = max(1, default_chunk_elements(x.device) // (len(xb) * N_PIXELS))
            estimated.append(qstar.elbo_from_draws(model, xb, fit.mean, fit.logvar, eps, chunk))
    mean, logvar = torch.cat([f.mean for f in fitted]), torch.cat([f.logvar for f in fitted])
    change = torch.cat([f.change for f in fitted])
    values = {"qstar.change": change}
    entry: dict[str, Any] = {}
    if lg is None:
        values["qstar"] = torch.cat(estimated)
    else:
        values["qstar"] = lg.elbo(x[:n], *qstar.closed_form(lg, x[:n]))
        values["qstar.optimized"] = lg.elbo(x[:n], mean, logvar)
        deficit = values["qstar"] - values["qstar.optimized"]
        entry["optimizer_vs_closed_form"] = {**mean_stderr(deficit), "max": float(deficit.max())}
    entry.update(mean_stderr(values["qstar"]), seconds=lap(), settings=planned.settings)
    entry["convergence"] = {
        "change": mean_stderr(change),
        "max_abs_change": float(change.abs().max()),
        "what": f"per image, the mean ELBO of the last {qstar.WINDOW:.0%} of the steps minus that of the "
        f"{qstar.WINDOW:.0%} before, each from {qstar.SAMPLES} draws a step (their noise included)",
    }
    return entry, values, {}


def gap_decomposition(per_image: PerImage, log_px: torch.Tensor, elbo_from: str | None) -> dict[str, Any]:
    """gap_elbo = gap_approximation + gap_amortization on the images q* was fitted on (Cremer et al. 2018):
    log p(x) - ELBO(q*) and ELBO(q*) - ELBO(q), each a mean of per-image differences with its stderr.
    The two sum to gap_elbo on the same images exactly (the same per-image log p(x) and ELBO(q)); where
    the optimizer falls short of q*, the approximation gap is too large and the amortization gap too
    small by as much. elbo_from: the estimator of the evaluation's ELBO of q(z|x) (None: no encoder)."""
    elbo_qstar = per_image["qstar"]
    out: dict[str, Any] = {}
    if elbo_from is None:
        gap = paired_difference(log_px, elbo_qstar)
        out["gap_amortization"] = out["gap_amortization_stderr"] = out["gap_amortization_n_images"] = None
        out["gap_amortization_note"] = (
            "not defined: the model has no encoder q(z|x) (objective jensen, prior_iwae, exact)"
        )
    else:
        elbo_q = per_image[f"{elbo_from}.elbo"]
        n = min(len(elbo_qstar), len(elbo_q), len(log_px))
        gap = paired_difference(log_px[:n], elbo_qstar[:n])
        amortization = paired_difference(elbo_qstar[:n], elbo_q[:n])
        out["gap_amortization"], out["gap_amortization_stderr"] = amortization["value"], amortization["stderr"]
        out["gap_amortization_n_images"] = n
        # the encoder beating its own q* by more than float noise: the optimizer did not converge there
        out["gap_amortization_negative_images"] = int((elbo_qstar[:n] - elbo_q[:n] < -1e-3).sum())
        out["gap_elbo_same_images"] = paired_difference(log_px[:n], elbo_q[:n])["value"]
    out["gap_approximation"], out["gap_approximation_stderr"] = gap["value"], gap["stderr"]
    out["gap_approximation_n_images"] = gap["n_images"]
    return out


@dataclass(frozen=True)
class Estimator:
    applies: Callable[[ModelSpec], bool]  # to a model of this spec at all
    plan: Callable[[ModelSpec, Any, torch.device, int], Planned]
    run: Callable[[LatentVariableModel, torch.Tensor, Any, Planned, Stopwatch], RunResult]
    memory: Callable[[ModelSpec, Any, Planned], list[tuple[str, int]]]
    describe: Callable[[dict[str, Any], int], str]  # eval.json's entry (and K) as vae-eval's table shows it
    rank: int  # its place in the plan (and as a bound's source: the lower, the more exact)
    bounds: tuple[str, ...] = ()  # the bounds its run may produce
    spares_ais: bool = False  # an exact answer cheap enough that AIS runs only where asked, last
    # whether it runs: (cfg_eval, an exact estimator applies, ais_everywhere) -> bool
    enabled: Callable[[Any, bool, bool], bool] = lambda cfg_eval, exact, everywhere: True
    after_exact: bool = False  # where an estimator that spares AIS applies it runs last, as a check of itself
    shorten: tuple[str, ...] = ()  # the keys that make it quicker, named where it will take long

    def position(self, exact: bool) -> int:
        return self.rank + (len(ESTIMATORS) if exact and self.after_exact else 0)


def _ais_enabled(cfg_eval: Any, exact: bool, everywhere: bool) -> bool:
    return (everywhere or not exact) if cfg_eval.ais is None else cfg_eval.ais


def _describe_quadrature(entry: dict[str, Any], K: int) -> str:
    s = entry["settings"]
    return (
        f"{s['points_per_dim']}^{K} grid on [-{s['half_width']:g}, {s['half_width']:g}]^{K}; "
        f"halving the spacing: {entry['halving']['change']:+.4f}"
    )


def _describe_closed_form(entry: dict[str, Any], K: int) -> str:
    return f"exact: {entry['settings'].get('model', 'linear-Gaussian')}"


def _describe_importance(entry: dict[str, Any], K: int) -> str:
    return f"k={entry['settings']['k']} draws from q(z|x)" + _describe_psis(entry)


def _describe_ais(entry: dict[str, Any], K: int) -> str:
    s = entry["settings"]
    text = f"{s['steps']} steps, {s['chains']} chains, acceptance {entry['acceptance']:.2f}"
    if "bdmc" in entry:
        b = entry["bdmc"]
        text += f"; BDMC gap {b['gap']['value']:.3f} +- {b['gap']['stderr']:.3f} ({b['n_images']} simulated)"
    return text


def _describe_prior_mc(entry: dict[str, Any], K: int) -> str:
    return f"S={entry['settings']['n_samples']} shared prior draws" + _describe_psis(entry)


def _memory_quadrature(spec: ModelSpec, cfg_eval: Any, planned: Planned) -> list[tuple[str, int]]:
    # the grid is built in float64, with its weights, twice (the halving check)
    return [("eval.quadrature_points", 4 * planned.settings["n_points"] * (spec.K + 1) * 2 * FLOAT_BYTES)]


def _memory_importance(spec: ModelSpec, cfg_eval: Any, planned: Planned) -> list[tuple[str, int]]:
    batch = min(cfg_eval.batch_size, max(planned.n_images, 1))  # the draws (B, k, K) with their (B, k) weights
    return [("eval.importance_k, eval.batch_size", 4 * batch * planned.settings["k"] * (spec.K + 1) * FLOAT_BYTES)]


def _memory_prior_mc(spec: ModelSpec, cfg_eval: Any, planned: Planned) -> list[tuple[str, int]]:
    return [("eval.prior_mc_samples", 3 * planned.settings["n_samples"] * spec.K * FLOAT_BYTES)]


def _memory_ais(spec: ModelSpec, cfg_eval: Any, planned: Planned) -> list[tuple[str, int]]:
    # every draw of a batch of images is made up front, the pilot's and then the weighted pass's:
    # momenta and accept uniforms for every step
    latents = ais_batch_images(cfg_eval) * (cfg_eval.ais_chains + PILOT_CHAINS)
    return [("eval.ais_steps, eval.batch_size", cfg_eval.ais_steps * latents * (spec.K + 1) * FLOAT_BYTES)]


def _describe_qstar(entry: dict[str, Any], K: int) -> str:
    s = entry["settings"]
    text = (
        f"ELBO of q*, each image's best diagonal Gaussian: {s['steps']} steps x {s['samples']} draws from {s['start']}"
    )
    if "optimizer_vs_closed_form" in entry:
        text += f" (closed form; the optimizer within {entry['optimizer_vs_closed_form']['max']:.4f} nats of it)"
    return text


def _memory_qstar(spec: ModelSpec, cfg_eval: Any, planned: Planned) -> list[tuple[str, int]]:
    # the graph of a pass of latents through the decoder, kept for the gradient; its ELBO's draws
    latents = qstar_batch_images(cfg_eval) * qstar.SAMPLES
    graph = latents * (spec.hidden * spec.depth + 2 * N_PIXELS) * 3 * FLOAT_BYTES
    draws = qstar_batch_images(cfg_eval) * (planned.settings["elbo_draws"] or 0) * spec.K * FLOAT_BYTES
    return [("eval.batch_size", graph + draws)]


def _memory_closed_form(spec: ModelSpec, cfg_eval: Any, planned: Planned) -> list[tuple[str, int]]:
    # float64 chunks of images, and their residuals
    return [("eval.n_images", 2 * min(planned.n_images, CHUNK_ROWS) * N_PIXELS * 2 * FLOAT_BYTES)]


def _always(spec: ModelSpec) -> bool:
    return True


ESTIMATORS: dict[str, Estimator] = {
    "closed_form": Estimator(
        lambda spec: spec.closed_form,
        _plan_closed_form,
        run_closed_form,
        _memory_closed_form,
        _describe_closed_form,
        rank=0,
        bounds=("jensen", "elbo"),
        shorten=("eval.n_images",),
    ),
    "quadrature": Estimator(
        lambda spec: spec.K <= QUADRATURE_MAX_K,
        _plan_quadrature,
        run_quadrature,
        _memory_quadrature,
        _describe_quadrature,
        rank=1,
        bounds=("jensen",),
        spares_ais=True,
        shorten=("eval.quadrature_points", "eval.n_images"),
    ),
    "ais": Estimator(
        _always,
        _plan_ais,
        run_ais,
        _memory_ais,
        _describe_ais,
        rank=2,
        enabled=_ais_enabled,
        after_exact=True,
        shorten=("eval.ais_n_images", "eval.ais_steps", "eval.ais_chains"),
    ),
    "importance": Estimator(
        lambda spec: spec.encoder is not None,
        _plan_importance,
        run_importance,
        _memory_importance,
        _describe_importance,
        rank=3,
        bounds=("elbo", "iwae_k"),
        shorten=("eval.importance_n_images", "eval.importance_k"),
    ),
    "prior_mc": Estimator(
        _always,
        _plan_prior_mc,
        run_prior_mc,
        _memory_prior_mc,
        _describe_prior_mc,
        rank=4,
        bounds=("jensen",),
        shorten=("eval.prior_mc_samples", "eval.n_images"),
    ),
    "qstar": Estimator(_always, _plan_qstar, run_qstar, _memory_qstar, _describe_qstar, rank=5),
}
# Where each bound comes from, the most exact producer first.
BOUND_SOURCES: dict[str, tuple[str, ...]] = {
    bound: tuple(sorted((n for n, e in ESTIMATORS.items() if bound in e.bounds), key=lambda n: ESTIMATORS[n].rank))
    for bound in dict.fromkeys(b for e in ESTIMATORS.values() for b in e.bounds)
}


def memory_parts(
    spec: ModelSpec, cfg_eval: Any, device: torch.device, n_images: int, ais_everywhere: bool = False
) -> list[tuple[str, int]]:
    """The evaluation's large allocations: those of each estimator of the plan, and nothing else."""
    planned = plan(spec, cfg_eval, device, n_images, ais_everywhere)
    return [part for p in planned for part in ESTIMATORS[p.name].memory(spec, cfg_eval, p)]


def check_memory(parts: list[tuple[str, int]], device: torch.device, values: Callable[[str], Any]) -> None:
    """ConfigError naming the keys of the largest allocation that keys set when `parts` need more
    memory than `device` has available, before any data is loaded or file written (a part with no
    keys, "", counts but is never named). values(key): its value."""
    needed = sum(size for _, size in parts)
    available = available_bytes(device)
    if needed <= available:
        return
    keys, size = max([part for part in parts if part[0]] or parts, key=lambda part: part[1])
    shown = ", ".join(f"{k}={values(k)}" for k in keys.split(", ") if values(k) is not None)
    raise ConfigError(
        f"too large for this machine: {shown} need about {_gib(size)} ({_gib(needed)} in all) on {device.type}, "
        f"{_gib(available)} available; allowed: smaller values of {keys}"
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**27 else f"{n / 2**20:.0f} MiB"


# --- gradient signal-to-noise (eval.gradient_snr): not an estimate of log p(x), a measure of training's gradients


def gradient_snr_counts(cfg_eval: Any) -> list[int]:
    """The sample counts 1, 4, 16, ... up to eval.gradient_snr_max_count."""
    counts = [1]
    while counts[-1] * 4 <= cfg_eval.gradient_snr_max_count:
        counts.append(counts[-1] * 4)
    return counts


def gradient_snr_applies(objective: str) -> bool:
    return OBJECTIVES[objective].name != "exact"  # its gradient has no draws: no noise to measure


def _parameters(sizes: list[int]) -> int:
    return sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))


def memory_gradient_snr(spec: ModelSpec, cfg_eval: Any) -> list[tuple[str, int]]:
    """One replicate's forward and backward at the largest count (every layer's activations of every
    latent, three copies), and the running sums of the gradient and its square (float64)."""
    decoder = [spec.K] + [spec.hidden] * spec.depth + [N_PIXELS]
    encoder = [N_PIXELS] + [spec.encoder_hidden] * spec.encoder_depth + [2 * spec.K] if spec.encoder else [0]
    latents = cfg_eval.gradient_snr_images * gradient_snr_counts(cfg_eval)[-1]
    parameters = _parameters(decoder) + _parameters(encoder) + N_PIXELS  # a learned sigma per pixel at most
    return [
        ("eval.gradient_snr_max_count, eval.gradient_snr_images", 3 * latents * sum(decoder) * FLOAT_BYTES),
        ("", 2 * parameters * 2 * FLOAT_BYTES),
    ]


def run_gradient_snr(
    model: LatentVariableModel, x: torch.Tensor, cfg_eval: Any, objective: str, options: dict[str, Any]
) -> dict[str, Any]:
    """The SNR of the gradient of the run's objective, for each estimator it allows and each sample count,
    on the fixed batch x (vae_cli.maths.gradient_snr); the model is left as it was."""
    unit = OBJECTIVES[objective]
    counts = gradient_snr_counts(cfg_eval)
    start = time.perf_counter()
    estimators = {}
    with torch.enable_grad():
        for gradient in unit.gradients:
            chosen = {**options, "gradient": gradient} if "gradient" in options else options
            measured = snr_by_sample_count(
                model, unit.fn, x, counts, cfg_eval.gradient_snr_replicates, chosen, cfg_eval.seed
            )
            estimators[gradient] = {**measured, "by_count": {str(n): v for n, v in measured["by_count"].items()}}
    model.zero_grad(set_to_none=True)
    return {
        "objective": objective,
        "trained_with": options.get("gradient", "standard"),
        "counts": counts,
        "replicates": cfg_eval.gradient_snr_replicates,
        "n_images": len(x),
        "images": "the first training images",
        "snr": "median over parameters of |mean| / sd of R replicate gradients (q1, q3: quartiles)",
        # a parameter with no signal still shows |mean| / sd of about this (the median of |N(0, 1)| / sqrt(R))
        "noise_floor": 0.6745 / math.sqrt(cfg_eval.gradient_snr_replicates),
        "theory": {"encoder": -0.5, "decoder": 0.5},  # Rainforth et al. 2018, Theorem 1, standard IWAE gradient
        "estimators": estimators,
        "seconds": time.perf_counter() - start,
    }


def describe_gradient_snr(entry: dict[str, Any]) -> list[str]:
    """vae-eval's lines: the median SNR per sample count, encoder and decoder, each estimator, and the slopes."""
    counts = entry["counts"]
    lines = [
        f"gradient SNR of {entry['objective']} ({entry['replicates']} estimates on {entry['n_images']} training "
        f"images; median over parameters; noise floor {entry.get('noise_floor', 0):.3g}; {entry['seconds']:.1f} s), "
        "by n_samples:",
        f"{'':<18}" + "".join(f"{n:>9}" for n in counts) + "   slope (theory: encoder -1/2, decoder +1/2)",
    ]
    for gradient, measured in entry["estimators"].items():
        for side, slope in measured["slope"].items():
            values = [measured["by_count"][str(n)][side]["median"] for n in counts]
            cells = "".join(f"{v:9.3g}" if v is not None else f"{'-':>9}" for v in values)
            fit = "-" if slope["slope"] is None else f"{slope['slope']:+.3f}"
            if slope.get("stderr") is not None:
                fit += f" +- {slope['stderr']:.3f}"
            lines.append(f"{gradient + ' ' + side:<18}{cells}   {fit}")
    return lines
