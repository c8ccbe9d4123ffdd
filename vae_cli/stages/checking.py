"""vae-check: certify this installation on its own device, in minutes, on models it builds itself.

Each check is one Line: what was measured, against a stated tolerance, ok or FAIL. The kinds:

    environment   versions, the device, its memory, BLAS, threads (information, never a failure)
    objective     every objective's loss and gradient on a fixed batch against a float64 copy of the
                  same model through the same formula, with the same draws: in float32, and with each
                  speed option the device allows (cuda.tf32, cuda.bf16, cpu.bf16, compile)
    truth         every estimator against the closed form of a linear-Gaussian model (pPCA, K=2):
                  the quadrature, prior Monte Carlo, importance sampling, the ELBO, AIS and BDMC
    resume        a tiny run trained straight through, and the same run stopped at its middle
                  checkpoint and resumed: the same parameters, optimizer state, RNG state and losses
    floor         the device's measured matmul rate and a default training step's fraction of the
                  floor it sets (information: timings depend on what else the machine runs)

Each line's tolerance is a module constant here, stated in its line and in docs/check.md.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, open_dict

import vae_cli
from vae_cli.errors import UserError
from vae_cli.maths.ais import AISSettings, ais, bdmc, simulate
from vae_cli.maths.densities import quadrature_grid
from vae_cli.maths.estimators import importance_sums, weighted_sums
from vae_cli.maths.likelihoods import likelihood_spec
from vae_cli.maths.models import LatentVariableModel, build_model
from vae_cli.maths.objectives import OBJECTIVES
from vae_cli.maths.spec import N_PIXELS, ModelSpec
from vae_cli.run.checkpoint import load_checkpoint
from vae_cli.run.config import data_config, model_spec, objective_options
from vae_cli.run.data import load_images
from vae_cli.run.keys import leaf_fields, schema_of
from vae_cli.run.machine import (
    MATMUL_SIZE,
    available_bytes,
    describe_device,
    has_native_bf16,
    machine_facts,
    set_process_speed_settings,
    synchronize,
    time_matmul,
)
from vae_cli.run.rundir import CHECKPOINT, LOSSES, losses_up_to
from vae_cli.stages.estimates import tf32_matmuls
from vae_cli.stages.training import apply_speed_options, fit, micro_batch_size, step_flops, train_step

CHECK_JSON = "check.json"


@dataclass(frozen=True)
class Line:
    """One line of the table: a check (ok True or False) or a fact (ok None: information, or skipped)."""

    name: str
    measured: float | str
    tolerance: str  # in words: "<= 0.001 nats", "in [-0.05, +0.01] nats"
    ok: bool | None
    note: str = ""
    kind: str = ""
    skipped: bool = False  # a check this device does not allow (or --quick leaves out): the note says why

    @property
    def status(self) -> str:
        if self.ok is None:
            return "skip" if self.skipped else "info"
        return "ok" if self.ok else "FAIL"


def at_most(name: str, measured: float, limit: float, unit: str, note: str = "", kind: str = "") -> Line:
    """A check that `measured` is finite and at most `limit`."""
    ok = math.isfinite(measured) and measured <= limit
    return Line(name, measured, f"<= {limit:g} {unit}".strip(), ok, note, kind)


def between(name: str, measured: float, low: float, high: float, unit: str, note: str = "", kind: str = "") -> Line:
    """A check that `measured` lies in [low, high]."""
    ok = math.isfinite(measured) and low <= measured <= high
    return Line(name, measured, f"in [{low:+.3g}, {high:+.3g}] {unit}".strip(), ok, note, kind)


def info(name: str, value: Any, note: str = "", kind: str = "") -> Line:
    return Line(name, value if isinstance(value, float) else str(value), "", None, note, kind)


def skipped(name: str, why: str, kind: str = "") -> Line:
    return Line(name, "-", "", None, f"skipped: {why}", kind, skipped=True)


def guarded(name: str, kind: str, check: Callable[[], list[Line]]) -> list[Line]:
    """The check's lines, or, where it raises (compile=true without a C++ compiler, a CUDA kernel that
    fails), one failed line naming the error: what this device cannot run is a finding, not a crash.
    Bad input (a UserError) is not caught: the command answers it with exit code 2."""
    try:
        return check()
    except UserError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return [Line(name, "-", "runs", False, f"raised {type(exc).__name__}: {first}", kind)]


# --- how much each run of vae-check does ----------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    batch: int  # images of the objectives' fixed batch
    n_samples: int  # the objectives' samples per image
    compile: bool  # run the compile lines (torch.compile takes minutes on a small CPU)
    compile_cpu_objectives: tuple[str, ...]  # on the CPU, compile only these (each compiles afresh)
    truth_images: int  # linear-Gaussian images for the quadrature, importance sampling, prior MC
    importance_k: int
    prior_samples: int
    ais_images: int
    ais_steps: int
    ais_chains: int
    bdmc_images: int
    resume_steps: int  # the tiny run's steps; it is stopped and resumed at half of them
    floor_steps: int  # timed default training steps (after one untimed)
    floor_batch: int | None  # the timed step's batch; None: the default's
    matmul_probes: int


QUICK = Sizes(
    batch=16,
    n_samples=8,
    compile=False,
    compile_cpu_objectives=(),
    truth_images=64,
    importance_k=500,
    prior_samples=20000,
    ais_images=16,
    ais_steps=50,
    ais_chains=32,
    bdmc_images=8,
    resume_steps=6,
    floor_steps=1,
    floor_batch=32,
    matmul_probes=2,
)
FULL = Sizes(
    batch=32,
    n_samples=16,
    compile=True,
    compile_cpu_objectives=("jensen",),
    truth_images=256,
    importance_k=1000,
    prior_samples=50000,
    ais_images=16,
    ais_steps=100,
    ais_chains=64,
    bdmc_images=16,
    resume_steps=12,
    floor_steps=2,
    floor_batch=None,
    matmul_probes=3,
)


# --- the environment ----------------------------------------------------------------------------------


def nvidia_driver() -> str:
    """The NVIDIA kernel driver's version, as the driver itself reports it (Linux), else 'unknown'."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            words = f.readline().split()
    except OSError:
        return "unknown"
    return next((w for w in words if w[:1].isdigit() and "." in w), "unknown")


def environment(device: torch.device) -> dict[str, str]:
    """What the numbers here depend on besides the code: versions, the device, its memory, BLAS, threads."""
    facts = machine_facts()
    env = {
        "vae-cli": vae_cli.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "CUDA (torch built with)": torch.version.cuda or "none (a CPU build of torch)",
        "device": describe_device(device),
        "BLAS": str(facts["blas"]),
        "threads": str(facts["threads"]),
        "CPU": f"{facts['processor']}, {os.cpu_count()} cores, {' '.join(facts['cpu_flags']) or 'no AVX'}",
        "native bf16": "yes" if has_native_bf16(device) else "no",
    }
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        major, minor = torch.cuda.get_device_capability(device)
        env.update(
            {
                "NVIDIA driver": nvidia_driver(),
                "cuDNN": str(torch.backends.cudnn.version()),
                "capability": f"{major}.{minor}",
                "memory": f"{total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free",
            }
        )
    else:
        env["memory"] = f"{available_bytes(device) / 2**30:.1f} GiB available"
    return env


def environment_lines(device: torch.device) -> list[Line]:
    return [info(f"environment: {name}", value, kind="environment") for name, value in environment(device).items()]


# --- every objective against a float64 copy of itself ---------------------------------------------------


@dataclass(frozen=True)
class Precision:
    """A way to run the objectives: what it sets up, where it applies, and its tolerance in nats."""

    name: str
    loss_nats: float  # |loss - float64 loss|, nats per image
    gradient: float  # |g - g64| / |g64|, the relative error of the whole gradient
    why: str  # the tolerance's reason, in a few words
    allowed: Callable[[torch.device], str | None]  # None where it applies, else why not
    autocast: torch.dtype | None = None
    tf32: bool = False
    compile: bool = False


def _always(device: torch.device) -> str | None:
    return None


def _cuda_only(device: torch.device) -> str | None:
    return None if device.type == "cuda" else "a CUDA-only option"


def _cpu_native_bf16(device: torch.device) -> str | None:
    if device.type != "cpu":
        return "a CPU-only option (cuda.bf16 on CUDA)"
    return (
        None
        if has_native_bf16(device)
        else "this CPU has no native bf16 (avx512_bf16 or amx_bf16); vae-train refuses it"
    )


# Measured on the 2-core CPU (the model below, losses near 364 nats): float32 within 3e-5 nats and
# 3e-5 relative of float64; bf16 autocast (emulated there) within 3e-3 nats and 1e-2 relative;
# compile as float32. TF32 rounds the matmul inputs to 10 mantissa bits (bf16 to 7, and its outputs
# too): about a tenth of bf16's error. Each tolerance is 5 to 30 times what was measured.
PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("float32", 1e-3, 1e-4, "float32 round-off", _always),
        Precision("cuda.tf32", 1e-2, 1e-2, "TF32 matmul inputs", _cuda_only, tf32=True),
        Precision("cuda.bf16", 5e-2, 5e-2, "bf16 matmuls, float32 likelihood", _cuda_only, autocast=torch.bfloat16),
        Precision(
            "cpu.bf16", 5e-2, 5e-2, "bf16 matmuls, float32 likelihood", _cpu_native_bf16, autocast=torch.bfloat16
        ),
        Precision("compile", 1e-3, 1e-4, "float32, fused by inductor", _always, compile=True),
    )
}
# compile=true compiles log_px_given_z of independent samples: the objectives that call it
COMPILED_OBJECTIVES = ("jensen", "prior_iwae", "elbo", "iwae")
DRAWS_SEED = 7


def objective_model(sizes: Sizes) -> tuple[ModelSpec, torch.Tensor]:
    """A small MLP with Bernoulli pixels and an encoder (K=2, 2x64 ELU), and a fixed batch of binary
    images: the spec and the batch (CPU, float32)."""
    spec = ModelSpec(
        2,
        "mlp",
        likelihood_spec("bernoulli"),
        hidden=64,
        depth=2,
        activation="elu",
        encoder="mlp",
        encoder_hidden=64,
        encoder_depth=2,
    )
    generator = torch.Generator().manual_seed(0)
    means = 0.5 * torch.rand(N_PIXELS, generator=generator)
    return spec, torch.bernoulli(means.expand(sizes.batch, N_PIXELS), generator=generator)


def objective_variants() -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(label, objective, options): each objective at its config defaults, the prior ones also with
    shared_samples=true (their other code path)."""
    for name in OBJECTIVES:
        options = {f.name: f.default for f in leaf_fields(schema_of("objective", name))}
        yield name, name, options
        if "shared_samples" in options:
            yield f"{name} shared", name, {**options, "shared_samples": True}


def same_draws(model: LatentVariableModel, seed: int) -> None:
    """Every draw the objectives make (prior samples, the reparameterization's eps) from one seeded
    float64 generator on the CPU, cast to the model's dtype and device: the model and its float64 copy
    see the same z, so their losses differ by rounding alone. (It replaces the two methods on this
    instance only.)"""
    stream = torch.Generator().manual_seed(seed)

    def draw(*shape: int, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(*shape, generator=stream, dtype=torch.float64).to(like.device, like.dtype)

    def prior_sample(*shape: int, seed: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        return draw(*shape, model.K, like=next(model.decoder.parameters()))

    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, n_samples: int) -> torch.Tensor:
        eps = draw(mu.shape[0], n_samples, mu.shape[1], like=mu)
        return mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps  # z = mu + sigma * eps, as the model's

    model.prior_sample = prior_sample
    model.reparameterize = reparameterize


def loss_and_gradient(
    model: LatentVariableModel, x: torch.Tensor, objective: str, n_samples: int, options: dict, precision: Precision
) -> tuple[float, torch.Tensor]:
    """The objective's loss (nats per image) and its gradient in every parameter (flat, float64), with
    the draws of same_draws and the precision's autocast and TF32 setting."""
    same_draws(model, DRAWS_SEED)
    model.zero_grad(set_to_none=True)
    with (
        tf32_matmuls(precision.tf32),
        torch.autocast(x.device.type, dtype=precision.autocast, enabled=precision.autocast is not None),
    ):
        out = OBJECTIVES[objective](model, x, n_samples, **options)
    out.loss.backward()
    gradient = torch.cat([p.grad.flatten().double() for p in model.parameters() if p.grad is not None])
    return out.loss.item(), gradient.cpu()


def objective_lines(
    device: torch.device, precision: Precision, sizes: Sizes, only: tuple[str, ...] | None = None
) -> list[Line]:
    """Two lines per objective (`only` these, where given; the prior ones also with shared samples):
    the loss's deviation from the float64 copy's in nats, and the gradient's relative deviation."""
    spec, x = objective_model(sizes)
    lines = []
    for label, objective, options in objective_variants():
        if only is not None and objective not in only:
            continue
        name = f"objective {label} {precision.name}"
        if precision.compile and (objective not in COMPILED_OBJECTIVES or options.get("shared_samples")):
            continue  # shared samples and the grid decode once per batch, outside the compiled function
        if precision.compile and device.type == "cpu" and objective not in sizes.compile_cpu_objectives:
            continue
        torch.manual_seed(0)
        model = build_model(spec, x.mean(0)).to(device)
        reference = copy.deepcopy(model).double()
        if precision.compile:
            model.compile_likelihood()
        loss, gradient = loss_and_gradient(model, x.to(device), objective, sizes.n_samples, options, precision)
        loss64, gradient64 = loss_and_gradient(
            reference, x.to(device, torch.float64), objective, sizes.n_samples, options, PRECISIONS["float32"]
        )
        relative = ((gradient - gradient64).norm() / gradient64.norm()).item()
        note = f"vs float64 {loss64:.4f}; {precision.why}"
        lines += [
            at_most(f"{name}: loss", abs(loss - loss64), precision.loss_nats, "nats", note, "objective"),
            at_most(f"{name}: gradient", relative, precision.gradient, "relative", "|g - g64| / |g64|", "objective"),
        ]
    return lines


def precision_lines(device: torch.device, sizes: Sizes) -> list[Line]:
    """The objectives in every precision this device allows; one skipped line for each it does not."""
    lines = []
    for precision in PRECISIONS.values():
        why = precision.allowed(device)
        if why is None and precision.compile and not sizes.compile:
            why = "--quick (torch.compile takes minutes on a small CPU); the full check runs it"
        if why is not None:
            lines.append(skipped(f"objective * {precision.name}", why, "objective"))
            continue
        lines += guarded(
            f"objective * {precision.name}", "objective", partial(objective_lines, device, precision, sizes)
        )
    return lines


# --- every estimator against the closed form --------------------------------------------------------------

TRUTH_K = 2
TRUTH_SIGMA = 0.1  # p(x|z) = N(W z + b, 0.1^2 I)
TRUTH_W_SCALE = 0.01  # W's entries ~ N(0, 0.01^2): posterior sd about 0.33, resolved by the grid
GRID_POINTS = 128  # per dimension, over [-6, 6]^2
GRID_HALF_WIDTH = 6.0
IS_VARIANCE_INFLATION = 1.5  # q's variances: the exact posterior's diagonal, 1.5 times wider (bounded weights)

QUADRATURE_NATS = 1e-3  # the midpoint rule is exact here up to float32 rounding of log p(x|z)
JENSEN_GRID_NATS = 1e-2  # E_p(z) log p(x|z) on the grid: float32 sums of 16384 terms near -700
MC_BELOW_NATS = 0.05  # prior MC and importance sampling: at most this far below on average ...
# ... and at most this far above: lower bounds in expectation, but the prior draws are shared by every
# image, so their errors are correlated and the mean can sit a few of its stderr above the truth
MC_ABOVE_NATS = 0.03
ELBO_STDERRS = 4.0  # the sampled ELBO against its closed form: noise alone
ROUNDING_NATS = 1e-3  # added to the sampled estimates' limits: float32 log-weights near 700 nats
AIS_NATS = 0.1  # |mean(AIS - log p(x))|
BDMC_GAP_NATS = 0.2  # mean(upper - lower) on simulated images, with the truth between them ...
BDMC_STDERRS = 3.0  # ... each bound on its side of it, within this many standard errors


@dataclass
class KnownTruth:
    """A linear-Gaussian model (pPCA, with a linear encoder near its posterior), images simulated from
    it, and their log p(x) in closed form (float64)."""

    model: LatentVariableModel
    x: torch.Tensor
    log_px: torch.Tensor

    @property
    def closed_form(self):
        return self.model.linear_gaussian()


def known_truth(device: torch.device, n_images: int, seed: int = 0) -> KnownTruth:
    spec = ModelSpec(TRUTH_K, "linear", likelihood_spec("gaussian", sigma=TRUTH_SIGMA), encoder="linear")
    torch.manual_seed(seed)
    model = build_model(spec).to(device)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer = model.decoder.net
        layer.weight.copy_(TRUTH_W_SCALE * torch.randn(N_PIXELS, TRUTH_K, generator=generator))
        layer.bias.copy_(0.5 * torch.rand(N_PIXELS, generator=generator))
        truth = model.linear_gaussian()
        # q(z|x) = N(V x + c, s^2): V's columns are the posterior means of b + e_j less that of b
        # (the posterior mean is affine in x), s^2 the posterior covariance's diagonal, widened
        b = layer.bias.double()
        means, covariance = truth.posterior(torch.cat([b[None], b + torch.eye(N_PIXELS, device=device)]))
        model.encoder.net.weight.copy_((means[1:] - means[0]).T)
        model.encoder.net.bias.copy_(means[0] - (means[1:] - means[0]).T @ b)
        model.encoder.logvar.copy_((IS_VARIANCE_INFLATION * covariance.diagonal()).log())
    x, _ = simulate(model, n_images, seed)
    return KnownTruth(model.eval(), x, truth.log_px(x))


def _mean_and_stderr(d: torch.Tensor) -> tuple[float, float]:
    return d.mean().item(), (d.std() / math.sqrt(len(d))).item()


def quadrature_lines(case: KnownTruth) -> list[Line]:
    grid = quadrature_grid(TRUTH_K, GRID_POINTS, GRID_HALF_WIDTH, case.x.device, case.x.dtype)
    sums = weighted_sums(case.model, case.x, *grid, len(case.x))
    jensen = case.closed_form.jensen_bound(case.x)
    where = f"{GRID_POINTS}^2 grid, {len(case.x)} images"
    return [
        at_most(
            "truth quadrature: log p(x)",
            (sums.log_px - case.log_px).abs().max().item(),
            QUADRATURE_NATS,
            "nats",
            f"max |quadrature - closed form|, {where}",
            "truth",
        ),
        at_most(
            "truth quadrature: Jensen bound",
            (sums.jensen - jensen).abs().max().item(),
            JENSEN_GRID_NATS,
            "nats",
            f"max |grid E_p(z) log p(x|z) - closed form|, {where}",
            "truth",
        ),
    ]


def lower_bound_line(name: str, estimate: torch.Tensor, truth: torch.Tensor, what: str) -> Line:
    """A stochastic lower bound of log p(x) (E[estimate] <= log p(x), Jensen): its mean error over the
    images at most MC_BELOW_NATS below the truth, and above it by no more than sampling noise."""
    mean, stderr = _mean_and_stderr(estimate - truth)
    note = f"mean(estimate - truth) over {len(truth)} images, stderr {stderr:.2g}; {what}"
    return between(name, mean, -MC_BELOW_NATS, MC_ABOVE_NATS, "nats", note, "truth")


def sampling_lines(case: KnownTruth, sizes: Sizes) -> list[Line]:
    generator = torch.Generator(device=case.x.device).manual_seed(1)
    z = case.model.prior_sample(sizes.prior_samples, generator=generator)
    log_w = torch.full((sizes.prior_samples,), -math.log(sizes.prior_samples), device=z.device)
    prior = weighted_sums(case.model, case.x, z, log_w, len(case.x)).log_px
    sums = importance_sums(case.model, case.x, sizes.importance_k, sizes.importance_k, 2, len(case.x))
    with torch.no_grad():
        mu, logvar = case.model.encode(case.x)
    elbo_mean, elbo_stderr = _mean_and_stderr(sums.elbo - case.closed_form.elbo(case.x, mu, logvar))
    return [
        lower_bound_line("truth prior MC: log p(x)", prior, case.log_px, f"S={sizes.prior_samples} shared prior draws"),
        lower_bound_line(
            "truth importance: log p(x)",
            sums.log_px,
            case.log_px,
            f"k={sizes.importance_k} draws from the linear q(z|x)",
        ),
        between(
            "truth importance: ELBO",
            elbo_mean,
            -ELBO_STDERRS * elbo_stderr - ROUNDING_NATS,
            ELBO_STDERRS * elbo_stderr + ROUNDING_NATS,
            "nats",
            f"mean(sampled ELBO - closed form), stderr {elbo_stderr:.2g}: {ELBO_STDERRS:g} stderr either side",
            "truth",
        ),
    ]


def ais_settings(sizes: Sizes, gradient_dtype: torch.dtype = torch.float32) -> AISSettings:
    return AISSettings(
        steps=sizes.ais_steps,
        chains=sizes.ais_chains,
        leapfrog=5,
        step_size=None,
        seed=3,
        gradient_dtype=gradient_dtype,
        mass_matrix=True,  # the default for a linear decoder
    )


def ais_lines(case: KnownTruth, sizes: Sizes) -> list[Line]:
    """AIS within AIS_NATS of the closed form on average, with float32 leapfrog gradients and, where the
    device has native bf16, with bf16 ones (eval.ais_bf16_gradients)."""
    x, truth = case.x[: sizes.ais_images], case.log_px[: sizes.ais_images]
    lines = []
    for dtype, label in ((torch.float32, ""), (torch.bfloat16, " (bf16 gradients)")):
        name = f"truth AIS{label}: log p(x)"
        if dtype == torch.bfloat16 and not has_native_bf16(x.device):
            lines.append(skipped(name, "no native bf16 on this device", "truth"))
            continue
        settings = ais_settings(sizes, dtype)
        result = ais(case.model, x, settings, len(x))
        mean, stderr = _mean_and_stderr(result.estimate() - truth)
        note = (
            f"mean(AIS - truth) over {len(x)} images, stderr {stderr:.2g}; {settings.steps} steps, "
            f"{settings.chains} chains, acceptance {result.acceptance.mean().item():.2f}"
        )
        lines.append(between(name, mean, -AIS_NATS, AIS_NATS, "nats", note, "truth"))
    return lines


def bdmc_lines(case: KnownTruth, sizes: Sizes) -> list[Line]:
    """BDMC on images simulated from the model: the gap between reverse and forward AIS at most
    BDMC_GAP_NATS on average, and the closed form between them (each side within BDMC_STDERRS stderr)."""
    settings = ais_settings(sizes)
    result = bdmc(case.model, sizes.bdmc_images, settings, sizes.bdmc_images)
    truth = case.closed_form.log_px(simulate(case.model, sizes.bdmc_images, settings.seed)[0])
    (lower, lower_se), (upper, upper_se) = (_mean_and_stderr(b - truth) for b in (result.lower, result.upper))
    note = (
        f"forward {lower:+.3f} ({lower_se:.2g}), reverse {upper:+.3f} ({upper_se:.2g}) nats vs the closed form, "
        f"{sizes.bdmc_images} simulated images"
    )
    line = at_most("truth BDMC: upper - lower", upper - lower, BDMC_GAP_NATS, "nats", note, "truth")
    if lower > BDMC_STDERRS * lower_se or upper < -BDMC_STDERRS * upper_se:
        return [Line(line.name, line.measured, line.tolerance, False, f"{note}: the truth is outside", "truth")]
    return [line]


def truth_lines(device: torch.device, sizes: Sizes) -> list[Line]:
    case = known_truth(device, sizes.truth_images)
    return quadrature_lines(case) + sampling_lines(case, sizes) + ais_lines(case, sizes) + bdmc_lines(case, sizes)


# --- a checkpoint written and resumed ----------------------------------------------------------------------

# On CUDA a resumed run may differ by reduction order where cuBLAS picks another kernel in the
# second process's workspace, and atomics-based backward kernels (index_add, scatter) are
# nondeterministic: parameters and losses within this, in absolute terms; the RNG states exact.
RESUME_TOLERANCE = {"cpu": 0.0, "cuda": 1e-5}


def _fit(cfg: DictConfig, run_dir: Path, device: torch.device, state=None, losses=None):
    torch.manual_seed(cfg.seed)  # the batches draw from torch's RNG; a resumed run restores it
    images = load_images(data_config(cfg), cfg.seed, device)
    run_dir.mkdir(parents=True, exist_ok=True)
    return fit(cfg, model_spec(cfg), run_dir, images, device, {}, state, losses)


def _losses(run_dir: Path) -> list[list[float]]:
    with open(run_dir / LOSSES) as f:
        return [[float(v) for v in row] for row in list(csv.reader(f))[1:]]


def resume_lines(cfg: DictConfig, device: torch.device, steps: int, work: Path) -> list[Line]:
    """`cfg` trained straight for `steps` steps, and again stopped at steps // 2 (its checkpoint there)
    and resumed to the end: the final checkpoints and losses.csv compared."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.n_train_iters, cfg.checkpoint_every, cfg.progress = steps, max(1, steps // 2), False
    half = copy.deepcopy(cfg)
    half.n_train_iters = steps // 2
    _fit(cfg, work / "straight", device)
    _fit(half, work / "resumed", device)
    state = load_checkpoint(work / "resumed" / CHECKPOINT)
    columns = ["step", "loss", *OBJECTIVES[cfg.objective.name].terms]
    _fit(cfg, work / "resumed", device, state, losses_up_to(work / "resumed" / LOSSES, columns, state["step"]))
    got, want = (load_checkpoint(work / name / CHECKPOINT) for name in ("resumed", "straight"))
    differences = [0.0]
    for name, tensor in want["model"].items():
        differences.append((got["model"][name].double() - tensor.double()).abs().max().item())
    for i, moments in want["optimizer"]["state"].items():
        for key, value in moments.items():
            differences.append((got["optimizer"]["state"][i][key].double() - value.double()).abs().max().item())
    rows_got, rows_want = _losses(work / "resumed"), _losses(work / "straight")
    same_rows = len(rows_got) == len(rows_want) == steps
    differences += [abs(a - b) for r, s in zip(rows_got, rows_want) for a, b in zip(r, s)]
    rng_same = torch.equal(got["rng"]["torch"], want["rng"]["torch"]) and all(
        torch.equal(a, b) for a, b in zip(got["rng"]["cuda"], want["rng"]["cuda"])
    )
    measured = max(differences)
    tolerance = RESUME_TOLERANCE.get(device.type, RESUME_TOLERANCE["cuda"])
    note = (
        f"{cfg.objective.name}, {steps} steps, resumed at {steps // 2}: max |difference| of parameters, "
        f"Adam's moments and losses.csv; RNG states {'identical' if rng_same else 'DIFFERENT'}"
    )
    line = at_most("resume: checkpoint written and resumed", measured, tolerance, "", note, "resume")
    if not (rng_same and same_rows):
        line = Line(
            line.name, line.measured, line.tolerance, False, note + ("" if same_rows else "; rows missing"), "resume"
        )
    return [line]


# --- the matmul floor and a default step's fraction of it ---------------------------------------------------


def floor_lines(cfg: DictConfig, device: torch.device, sizes: Sizes) -> list[Line]:
    """This device's float32 matmul rate (a (2048, 2048) product, median of a few) and the default
    training step (vae-train's defaults, random binary images; sizes.floor_batch images where given) as
    a fraction of its floor: its matmul FLOPs over that rate. Information: timings depend on what else
    runs on the machine."""
    cfg = copy.deepcopy(cfg)
    cfg.batch_size = sizes.floor_batch or cfg.batch_size
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, generator=generator).to(device)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, generator=generator).to(device)
    with tf32_matmuls(False):
        time_matmul(device, a, b)  # warm-up: the first product pays for the library's set-up
        rate = 2 * MATMUL_SIZE**3 / statistics.median(time_matmul(device, a, b) for _ in range(sizes.matmul_probes))
    torch.manual_seed(cfg.seed)
    means = 0.5 * torch.rand(N_PIXELS, generator=generator)
    batches = [
        torch.bernoulli(means.expand(cfg.batch_size, N_PIXELS), generator=generator).to(device)
        for _ in range(sizes.floor_steps + 1)
    ]
    model = build_model(model_spec(cfg), means.to(device)).to(device)
    speed, autocast = apply_speed_options(cfg, model, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    objective, options = OBJECTIVES[cfg.objective.name], objective_options(cfg)
    micro_batch = micro_batch_size(cfg, device)
    seconds = []
    for x in batches:
        synchronize(device)
        start = time.perf_counter()
        train_step(model, optimizer, objective, x, cfg.n_samples, micro_batch, options, autocast)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    step = statistics.median(seconds[1:])  # the first step warms up
    uses_encoder = OBJECTIVES[cfg.objective.name].uses_encoder
    flops = step_flops(cfg, uses_encoder, speed["shared_samples"])
    what = (
        f"{cfg.objective.name}, batch {cfg.batch_size}, {cfg.n_samples} samples, {cfg.model.depth}x{cfg.model.hidden}"
    )
    return [
        info(
            "floor: matmul rate, GFLOP/s",
            rate / 1e9,
            f"({MATMUL_SIZE}, {MATMUL_SIZE}) @ ({MATMUL_SIZE}, {MATMUL_SIZE}) float32, median of {sizes.matmul_probes}",
            "floor",
        ),
        info(
            "floor: default step, s",
            step,
            f"{what}: median of {sizes.floor_steps} timed after 1 untimed; floor {flops / rate:.3g} s ({flops / 1e9:.0f} GFLOP)",
            "floor",
        ),
        info(
            "floor: default step's fraction of the floor",
            flops / rate / step,
            "floor s / step s (information, not a check)",
            "floor",
        ),
    ]


# --- all of it ---------------------------------------------------------------------------------------------


@dataclass
class Report:
    device: str
    quick: bool
    lines: list[Line] = field(default_factory=list)
    seconds: float = 0.0
    section_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> list[Line]:
        return [line for line in self.lines if line.ok is False]

    def as_json(self) -> dict[str, Any]:
        return {
            "vae_cli_version": vae_cli.__version__,
            "device": self.device,
            "quick": self.quick,
            "ok": not self.failed,
            "failed": [line.name for line in self.failed],
            "seconds": self.seconds,
            "section_seconds": self.section_seconds,
            "lines": [{**asdict(line), "status": line.status} for line in self.lines],
        }


NAME_WIDTH = 52


def header() -> str:
    return f"{'check':<{NAME_WIDTH}} {'measured':>12}  {'tolerance':<24} result"


def format_line(line: Line) -> str:
    measured = f"{line.measured:12.4g}" if isinstance(line.measured, float) else f"{line.measured:>12}"
    if line.kind == "environment":
        return f"{line.name:<{NAME_WIDTH}} {line.measured}"
    text = f"{line.name:<{NAME_WIDTH}} {measured}  {line.tolerance:<24} {line.status}"
    return f"{text}  ({line.note})" if line.note else text


@contextmanager
def one_thread_on_the_cpu(device: torch.device) -> Iterator[None]:
    """One torch thread on the CPU for the checks on small tensors: threads buy nothing there, and on a
    machine shared with other work their spin-waits made AIS 30 times slower. The floor's default step
    runs on torch's own threads, as vae-train."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_checks(
    device: torch.device,
    quick: bool,
    default_cfg: DictConfig,
    resume_cfg: DictConfig,
    on_line: Callable[[Line], None] | None = None,
) -> Report:
    """Every check on `device`, each line handed to on_line as it is made."""
    start = time.perf_counter()
    set_process_speed_settings(device)  # as vae-train makes them, before torch starts its threads
    sizes = QUICK if quick else FULL
    report = Report(describe_device(device), quick)

    def add(section: str, check: Callable[[], list[Line]]) -> None:
        begin = time.perf_counter()
        for line in guarded(section, section, check):
            report.lines.append(line)
            if on_line is not None:
                on_line(line)
        report.section_seconds[section] = time.perf_counter() - begin

    add("environment", lambda: environment_lines(device))
    with one_thread_on_the_cpu(device):
        add("objective", lambda: precision_lines(device, sizes))
        add("truth", lambda: truth_lines(device, sizes))
        with tempfile.TemporaryDirectory(prefix="vae-check-") as work:
            add("resume", lambda: resume_lines(resume_cfg, device, sizes.resume_steps, Path(work)))
    add("floor", lambda: floor_lines(default_cfg, device, sizes))
    report.seconds = time.perf_counter() - start
    return report
