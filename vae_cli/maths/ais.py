"""Annealed importance sampling (Neal 2001) for log p(x) of any model, and its certification by
bidirectional Monte Carlo (Grosse et al. 2015; Wu et al. 2017).

The path runs from the prior to the posterior along the geometric mean

    f_t(z) = p(z) p(x|z)^beta_t,   0 = beta_0 < beta_1 < ... < beta_T = 1,

on the sigmoid schedule of Grosse et al. (dense at both ends). Each chain starts at z_0 ~ p(z),
and for t = 1..T adds (beta_t - beta_{t-1}) log p(x|z_{t-1}) to its log-weight, then moves z by
one HMC transition that leaves f_t invariant. E[w] = p(x), so log mean_c w_c is a stochastic
lower bound of log p(x) (Jensen). Run backwards from an exact posterior sample, E[w] = 1/p(x)
and -log mean_c w_c is a stochastic upper bound; on data simulated from the model (z ~ p(z),
x ~ p(x|z), so z is an exact sample of p(z|x)) the two bracket log p(x), and their gap is the
precision of AIS at that schedule.

HMC with a diagonal mass matrix: `leapfrog` steps of size eps, momentum ~ N(0, M), a Metropolis
accept. M = I + beta H, with H the diagonal of -d^2 log p(x|z) / dz^2, so that f_t looks like a unit
Gaussian in every coordinate, and eps L is at most pi/2: a quarter of that Gaussian's oscillation,
where a leapfrog trajectory takes z to a point whose energy is independent of where it started (a
half or whole oscillation brings the energy back, and log p(x|z), the weights' increment, then
barely changes from step to step). H and eps come from a pilot: a first AIS pass of PILOT_CHAINS
chains per image, with its own draws, that measures H from the secants of its leapfrog steps and
adapts eps towards TARGET_ACCEPTANCE, stretch by stretch of the schedule. The weights come from a
second pass whose kernels are those fixed records, so no kernel depends on the chains it moves:
each leaves f_t invariant, E[w] = p(x) exactly, and BDMC's reverse pass runs the same kernels.
(Adapting a chain's kernel from its own past instead biases the weights: measured 1.1 nats above
log p(x) on a linear-Gaussian model with K=50.) One decoder pass over images x chains latents gives
log p(x|z) and, by backward, its gradient in z. Every random draw of an image comes from its own
stream (vae_cli.maths.streams), keyed by the pass (the pilot, the chains, BDMC's reverse chains)
and the image: no result depends on the batch size, and the pilot's kernels are independent of
the chains they move.

The gradient may come from a bf16 copy of the decoder (`gradient_dtype`): it only steers the
leapfrog proposal. Any force that is a fixed function of z keeps the leapfrog map reversible and
volume-preserving, so the Metropolis test, on float32 energies, still leaves the float32 f_t
invariant, and the weights are float32 log p(x|z): the estimate stays that of the float32 model.
A worse gradient can only lower the acceptance rate, which eval.json records.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vae_cli.maths import streams
from vae_cli.maths.models import LatentVariableModel

SIGMOID_SCALE = 4.0  # delta of the sigmoid schedule (Grosse et al. 2015, sec. 6)
TARGET_ACCEPTANCE = 0.65  # the optimal HMC acceptance rate (Neal 2011)
MIN_STEP_SIZE = 1e-4
ADAPT = 1.02  # the pilot's eps *= ADAPT when an image's chains accept more often than the target, /= ADAPT when less
ACCEPTANCE_DECAY = 0.9  # the smoothing of the pilot's acceptance rate
CURVATURE_DECAY = 0.8  # the pilot's weight of its earlier secants against one transition's
MAX_CURVATURE = 1e8  # H's cap: posterior sd >= 1e-4
PILOT_CHAINS = 4  # chains per image of the pilot pass
STRETCHES = 50  # the schedule's stretches, each with one kernel per image
# the streams of the draws (vae_cli.maths.streams): test images' AIS, and BDMC's simulated images and their chains
PILOT, REVERSE, BDMC, SIMULATE = ".pilot", ".reverse", "bdmc", "bdmc.simulate"


@dataclass(frozen=True)
class AISSettings:
    steps: int  # T: intermediate distributions
    chains: int  # independent chains per image
    leapfrog: int  # leapfrog steps per HMC transition
    step_size: float | None  # the pilot's initial eps; None = the cap, pi / (2 leapfrog)
    seed: int
    gradient_dtype: torch.dtype  # of the decoder pass that gives the leapfrog's gradient
    mass_matrix: bool = True  # M = I + beta H from the pilot; False: M = I, the step size alone


@dataclass(frozen=True)
class AISResult:
    log_w: torch.Tensor  # (N, chains) float64 log-weights
    acceptance: torch.Tensor  # (N,) the mean HMC acceptance rate over steps and chains
    step_size: torch.Tensor  # (N,) the mean eps over the schedule's stretches

    def estimate(self, reverse: bool = False) -> torch.Tensor:
        """log mean_c w_c per image (forward: <= log p(x) in expectation); -log mean_c w_c reversed (>=)."""
        value = torch.logsumexp(self.log_w, -1) - math.log(self.log_w.shape[-1])
        return -value if reverse else value


def sigmoid_schedule(steps: int, scale: float = SIGMOID_SCALE) -> torch.Tensor:
    """beta_0..beta_T (float64): sigmoid(scale (2t/T - 1)), rescaled to run from exactly 0 to 1."""
    s = torch.sigmoid(scale * (2 * torch.arange(steps + 1, dtype=torch.float64) / steps - 1))
    return (s - s[0]) / (s[-1] - s[0])


def max_step_size(leapfrog: int) -> float:
    """eps with eps L = pi/2: a quarter oscillation of a unit Gaussian (in M's units, every f_t)."""
    return math.pi / (2 * leapfrog)


def _noise(
    n: int, first: int, settings: AISSettings, K: int, device: torch.device, chains: int, purpose: str
) -> tuple[torch.Tensor, ...]:
    """Per image, from its own stream (seed, purpose, image index): the start z_0 ~ p(z) (n, C, K),
    the momenta (T, n, C, K) and the accept uniforms (T, n, C)."""
    T, C = settings.steps, chains
    z0 = torch.empty(n, C, K, device=device)
    momenta = torch.empty(T, n, C, K, device=device)
    uniforms = torch.empty(T, n, C, device=device)
    for i in range(n):
        generator = streams.stream(settings.seed, purpose, first + i)
        z0[i] = streams.normal(generator, (C, K), device)
        momenta[:, i] = streams.normal(generator, (T, C, K), device)
        uniforms[:, i] = streams.uniform(generator, (T, C), device)
    return z0, momenta, uniforms


def _log_likelihood_and_grad(
    model: LatentVariableModel, x: torch.Tensor, z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x_b|z_bc) (B, C) and its gradient in z (B, C, K), from one decoder pass and its backward,
    in the model's dtype (the likelihood itself is float32: likelihoods.float32_likelihood)."""
    with torch.enable_grad():
        z = z.detach().to(next(model.parameters()).dtype).requires_grad_(True)
        ll = model.log_px_given_z(x, z)
        (grad,) = torch.autograd.grad(ll.sum(), z)  # only the path to z: no parameter gradients
    return ll.detach(), grad.float()


def _in_dtype(model: LatentVariableModel, dtype: torch.dtype) -> LatentVariableModel:
    """The model itself where it is in `dtype` already, else a copy in `dtype` (for the gradient only)."""
    if dtype == next(model.parameters()).dtype:
        return model
    return copy.deepcopy(model).to(dtype).requires_grad_(False)


class _Likelihood:
    """log p(x|z) of a batch of images x in float32, and its gradient in z from `gradient_model`
    (the model itself, or its copy in settings.gradient_dtype)."""

    def __init__(self, model: LatentVariableModel, gradient_model: LatentVariableModel, x: torch.Tensor) -> None:
        self.model, self.gradient_model, self.x = model, gradient_model, x

    def grad(self, z: torch.Tensor) -> torch.Tensor:
        return _log_likelihood_and_grad(self.gradient_model, self.x, z)[1]

    def value_and_grad(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.gradient_model is self.model:
            return _log_likelihood_and_grad(self.model, self.x, z)  # one pass gives both
        with torch.no_grad():
            return self.model.log_px_given_z(self.x, z), self.grad(z)


@dataclass(frozen=True)
class _Step:
    """What one HMC transition saw: its accepts (n, C) and, where asked, the secants of its leapfrog
    steps, summed per coordinate: -dg dz and dz^2 (n, C, K), whose ratio is H's diagonal for a
    quadratic log p(x|z)."""

    accept: torch.Tensor
    secant: torch.Tensor | None
    squares: torch.Tensor | None


class _Chains:
    """The chains of a batch of images: positions, log p(x|z) and its gradient there."""

    def __init__(self, likelihood: _Likelihood, z: torch.Tensor) -> None:
        self.likelihood, self.z = likelihood, z
        self.ll, self.grad_ll = likelihood.value_and_grad(z)

    def hmc(
        self,
        beta: float,
        mass: torch.Tensor,
        eps: torch.Tensor,
        momentum: torch.Tensor,
        uniform: torch.Tensor,
        leapfrog: int,
        secants: bool,
    ) -> _Step:
        """One HMC transition leaving f(z) = p(z) p(x|z)^beta invariant: U(z) = |z|^2 / 2 - beta log p(x|z),
        kinetic energy p M^-1 p / 2 with M = diag(mass) (n, 1, K), step eps (n, 1, 1); `secants`: sum them."""
        z, ll, grad_ll = self.z, self.ll, self.grad_ll
        p = momentum * mass.sqrt()  # ~ N(0, M)
        energy = 0.5 * (z * z).sum(-1) - beta * ll + 0.5 * (p * p / mass).sum(-1)
        secant = squares = None
        if secants:
            secant, squares = torch.zeros_like(z), torch.zeros_like(z)
        p = p - 0.5 * eps * (z - beta * grad_ll)
        for step in range(1, leapfrog + 1):
            z_before, grad_before = z, grad_ll
            z = z + eps * p / mass
            if step < leapfrog:
                grad_ll = self.likelihood.grad(z)
                p = p - eps * (z - beta * grad_ll)
            else:
                ll, grad_ll = self.likelihood.value_and_grad(z)  # the energy at the proposal is float32
            if secants:
                dz, dg = z - z_before, grad_ll - grad_before
                finite = (torch.isfinite(dz) & torch.isfinite(dg)).all(-1, keepdim=True)
                secant += torch.where(finite, -dg * dz, 0.0)
                squares += torch.where(finite, dz * dz, 0.0)
        p = p - 0.5 * eps * (z - beta * grad_ll)  # the last half step
        new_energy = 0.5 * (z * z).sum(-1) - beta * ll + 0.5 * (p * p / mass).sum(-1)
        accept = torch.log(uniform) < (energy - new_energy)  # NaN energies compare False: rejected
        self.z = torch.where(accept.unsqueeze(-1), z, self.z)
        self.ll = torch.where(accept, ll, self.ll)
        self.grad_ll = torch.where(accept.unsqueeze(-1), grad_ll, self.grad_ll)
        return _Step(accept, secant, squares)


def _stretch(j: int, steps: int) -> int:
    """The stretch of the schedule that beta_j (j = 0..T) lies in."""
    return min(max(j - 1, 0) * STRETCHES // steps, STRETCHES - 1)


@dataclass(frozen=True)
class _Kernels:
    """Per stretch of the schedule and image: H's diagonal (S, n, K) and eps (S, n), fixed."""

    curvature: torch.Tensor
    step_size: torch.Tensor
    measures_curvature = False  # fixed: its transitions' secants are not needed

    def at(self, j: int, beta: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = _stretch(j, steps)
        return (1 + beta * self.curvature[s]).unsqueeze(1), self.step_size[s][:, None, None]

    def observe(self, j: int, step: _Step) -> None:
        pass


class _Pilot:
    """The pilot pass's kernels, adapted as it goes: H from the pooled secants of an image's chains
    (decayed by CURVATURE_DECAY a transition), eps towards TARGET_ACCEPTANCE; each stretch's last
    values are recorded for the weighted pass."""

    def __init__(self, n: int, K: int, settings: AISSettings, device: torch.device) -> None:
        self.steps, self.cap = settings.steps, max_step_size(settings.leapfrog)
        self.measures_curvature = settings.mass_matrix  # else H stays 0: M = I
        initial = self.cap if settings.step_size is None else min(settings.step_size, self.cap)
        self.eps = torch.full((n,), initial, device=device)
        self.rate = torch.full((n,), TARGET_ACCEPTANCE, device=device)
        self.secant, self.squares = torch.zeros(n, K, device=device), torch.zeros(n, K, device=device)
        self.curvature = torch.zeros(n, K, device=device)
        self.record = _Kernels(torch.zeros(STRETCHES, n, K, device=device), torch.zeros(STRETCHES, n, device=device))

    def at(self, j: int, beta: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (1 + beta * self.curvature).unsqueeze(1), self.eps[:, None, None]

    def observe(self, j: int, step: _Step) -> None:
        if self.measures_curvature:
            self.secant = CURVATURE_DECAY * self.secant + step.secant.sum(1)
            self.squares = CURVATURE_DECAY * self.squares + step.squares.sum(1)
            self.curvature = (self.secant / self.squares).nan_to_num(0.0).clamp(0, MAX_CURVATURE)  # 0/0: no secant yet
        accepted = step.accept.float().mean(1)
        self.rate = ACCEPTANCE_DECAY * self.rate + (1 - ACCEPTANCE_DECAY) * accepted
        adapted = torch.where(self.rate > TARGET_ACCEPTANCE, self.eps * ADAPT, self.eps / ADAPT)
        self.eps = adapted.clamp(MIN_STEP_SIZE, self.cap)
        s = _stretch(j, self.steps)
        self.record.curvature[s], self.record.step_size[s] = self.curvature, self.eps


def _anneal(
    chains: _Chains,
    betas: list[float],
    kernels: _Kernels | _Pilot,
    noise: tuple[torch.Tensor, ...],
    settings: AISSettings,
    reverse: bool,
    on_step: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-weights (n, C) float64 along betas, and the accepts per chain; on_step() after each transition."""
    _, momenta, uniforms = noise
    T = settings.steps
    log_w = torch.zeros(chains.z.shape[:2], dtype=torch.float64, device=chains.z.device)
    accepted = torch.zeros(chains.z.shape[:2], device=chains.z.device)
    for t in range(1, T + 1):
        log_w += (betas[t] - betas[t - 1]) * chains.ll.double()  # log f_t(z_{t-1}) - log f_{t-1}(z_{t-1})
        j = T - t if reverse else t  # the index of the beta this transition leaves invariant
        mass, eps = kernels.at(j, betas[t], T)
        step = chains.hmc(
            betas[t], mass, eps, momenta[t - 1], uniforms[t - 1], settings.leapfrog, kernels.measures_curvature
        )
        kernels.observe(j, step)
        accepted += step.accept
        if on_step is not None:
            on_step()
    return log_w, accepted


def _pilot(
    likelihood: _Likelihood,
    n: int,
    first: int,
    settings: AISSettings,
    K: int,
    device: torch.device,
    purpose: str,
    on_step: Callable[[], None] | None = None,
) -> _Kernels:
    """The kernels of a batch of images, from a forward pilot pass with draws of its own stream."""
    noise = _noise(n, first, settings, K, device, PILOT_CHAINS, purpose + PILOT)
    pilot = _Pilot(n, K, settings, device)
    betas = sigmoid_schedule(settings.steps).tolist()
    _anneal(_Chains(likelihood, noise[0]), betas, pilot, noise, settings, False, on_step)
    return pilot.record


def ais(
    model: LatentVariableModel,
    x: torch.Tensor,
    settings: AISSettings,
    batch_size: int,
    start: torch.Tensor | None = None,
    first: int = 0,
    purpose: str = "ais",
    progress: Callable[[float], None] | None = None,
) -> AISResult:
    """AIS log-weights of every image x (N, 784): forward from z_0 ~ p(z), or, given `start` (N, K),
    exact posterior samples, in reverse from beta = 1 to 0 with every chain starting there; both with
    the kernels of the same forward pilot.

    `first`: the index of x[0] in the data set, `purpose` the stream's name: with the image's index they
    key its draws (vae_cli.maths.streams): the pilot's under purpose + ".pilot", the reverse chains'
    under purpose + ".reverse", so the forward and reverse passes share the pilot's kernels only.
    `progress(fraction)` is told the share of the work done after every transition."""
    betas = sigmoid_schedule(settings.steps).tolist()
    if start is not None:
        betas = betas[::-1]
    parts: dict[str, list[torch.Tensor]] = {"log_w": [], "acceptance": [], "step_size": []}
    gradient_model = _in_dtype(model, settings.gradient_dtype)
    total, done = max(1, len(x) * settings.steps * (PILOT_CHAINS + settings.chains)), 0

    def tick(latents: int) -> Callable[[], None] | None:  # a transition moves `latents` chains
        def step() -> None:
            nonlocal done
            done += latents
            progress(done / total)

        return step if progress is not None else None

    for offset in range(0, len(x), batch_size):
        xb = x[offset : offset + batch_size]
        likelihood = _Likelihood(model, gradient_model, xb)
        kernels = _pilot(
            likelihood, len(xb), first + offset, settings, model.K, x.device, purpose, tick(len(xb) * PILOT_CHAINS)
        )
        chains_purpose = purpose + (REVERSE if start is not None else "")
        noise = _noise(len(xb), first + offset, settings, model.K, x.device, settings.chains, chains_purpose)
        z0 = noise[0]
        if start is not None:
            z0 = start[offset : offset + batch_size].unsqueeze(1).expand_as(z0).clone()
        chains = _Chains(likelihood, z0)
        on_step = tick(len(xb) * settings.chains)
        log_w, accepted = _anneal(chains, betas, kernels, noise, settings, start is not None, on_step)
        parts["log_w"].append(log_w)
        parts["acceptance"].append((accepted / settings.steps).mean(-1))
        parts["step_size"].append(kernels.step_size.mean(0))
    return AISResult(*(torch.cat(parts[name]) for name in ("log_w", "acceptance", "step_size")))


@torch.no_grad()
def simulate(model: LatentVariableModel, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n images from the model with the latents that made them: z ~ p(z), x ~ p(x|z); (x, z), from the
    stream (seed, "bdmc.simulate") of their own."""
    generator = streams.stream(seed, SIMULATE)
    device = next(model.parameters()).device
    z = streams.normal(generator, (n, model.K), device)
    x = model.likelihood.sample(model.decoder(z).float().cpu(), streams.torch_generator(generator)).to(device)
    return x, z


@dataclass(frozen=True)
class BDMCResult:
    lower: torch.Tensor  # (n,) forward AIS: a stochastic lower bound of log p(x)
    upper: torch.Tensor  # (n,) reverse AIS from the exact posterior sample: a stochastic upper bound
    forward: AISResult
    reverse: AISResult


def bdmc(
    model: LatentVariableModel,
    n: int,
    settings: AISSettings,
    batch_size: int,
    progress: Callable[[float], None] | None = None,
) -> BDMCResult:
    """Bidirectional Monte Carlo on n images simulated from the model: forward and reverse AIS
    with the same settings; their gap bounds the error of forward AIS on those images."""
    x, z = simulate(model, n, settings.seed)
    half = (lambda offset: lambda f: progress(offset + f / 2)) if progress is not None else (lambda offset: None)
    forward = ais(model, x, settings, batch_size, purpose=BDMC, progress=half(0.0))
    reverse = ais(model, x, settings, batch_size, start=z, purpose=BDMC, progress=half(0.5))
    return BDMCResult(forward.estimate(), reverse.estimate(reverse=True), forward, reverse)
