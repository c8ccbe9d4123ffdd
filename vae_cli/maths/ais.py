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

HMC: `leapfrog` steps of size eps, momentum ~ N(0, I), a Metropolis accept; eps is adapted per
chain towards TARGET_ACCEPTANCE from that chain's own past acceptances (each transition still
leaves f_t invariant given its eps). One decoder pass over images x chains latents gives log p(x|z)
and, by backward, its gradient in z. Every random draw of an image comes from its own seeded
generator, so no result depends on the batch size.

The gradient may come from a bf16 copy of the decoder (`gradient_dtype`): it only steers the
leapfrog proposal. Any force that is a fixed function of z keeps the leapfrog map reversible and
volume-preserving, so the Metropolis test, on float32 energies, still leaves the float32 f_t
invariant, and the weights are float32 log p(x|z): the estimate stays that of the float32 model.
A worse gradient can only lower the acceptance rate, which eval.json records.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from vae_cli.maths.models import LatentVariableModel

SIGMOID_SCALE = 4.0  # delta of the sigmoid schedule (Grosse et al. 2015, sec. 6)
TARGET_ACCEPTANCE = 0.65  # the optimal HMC acceptance rate (Neal 2011)
STEP_SIZE_RANGE = (1e-4, 1.0)
ADAPT = 1.02  # eps *= ADAPT when the chain accepts more often than the target, /= ADAPT when less
ACCEPTANCE_DECAY = 0.9  # the smoothing of each chain's acceptance rate


@dataclass(frozen=True)
class AISSettings:
    steps: int  # T: intermediate distributions
    chains: int  # independent chains per image
    leapfrog: int  # leapfrog steps per HMC transition
    step_size: float  # initial eps, adapted per chain
    seed: int
    gradient_dtype: torch.dtype  # of the decoder pass that gives the leapfrog's gradient


@dataclass(frozen=True)
class AISResult:
    log_w: torch.Tensor  # (N, chains) float64 log-weights
    acceptance: torch.Tensor  # (N,) the mean HMC acceptance rate over steps and chains
    step_size: torch.Tensor  # (N,) the mean of the chains' final eps

    def estimate(self, reverse: bool = False) -> torch.Tensor:
        """log mean_c w_c per image (forward: <= log p(x) in expectation); -log mean_c w_c reversed (>=)."""
        value = torch.logsumexp(self.log_w, -1) - math.log(self.log_w.shape[-1])
        return -value if reverse else value


def sigmoid_schedule(steps: int, scale: float = SIGMOID_SCALE) -> torch.Tensor:
    """beta_0..beta_T (float64): sigmoid(scale (2t/T - 1)), rescaled to run from exactly 0 to 1."""
    s = torch.sigmoid(scale * (2 * torch.arange(steps + 1, dtype=torch.float64) / steps - 1))
    return (s - s[0]) / (s[-1] - s[0])


def _noise(n: int, first: int, settings: AISSettings, K: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per image, from its own generator seeded by (seed, image index): the start z_0 ~ p(z)
    (n, C, K), the momenta (T, n, C, K) and the accept uniforms (T, n, C)."""
    T, C = settings.steps, settings.chains
    generator = torch.Generator(device=device)
    z0 = torch.empty(n, C, K, device=device)
    momenta = torch.empty(T, n, C, K, device=device)
    uniforms = torch.empty(T, n, C, device=device)
    for i in range(n):
        generator.manual_seed((settings.seed << 32) + first + i)
        z0[i] = torch.randn(C, K, generator=generator, device=device)
        momenta[:, i] = torch.randn(T, C, K, generator=generator, device=device)
        uniforms[:, i] = torch.rand(T, C, generator=generator, device=device)
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


class _Chains:
    """The chains of a batch of images: positions, log p(x|z) and its gradient there, step sizes."""

    def __init__(self, likelihood: _Likelihood, z: torch.Tensor, settings: AISSettings) -> None:
        self.likelihood, self.z, self.leapfrog = likelihood, z, settings.leapfrog
        self.ll, self.grad_ll = likelihood.value_and_grad(z)
        self.eps = torch.full(z.shape[:2], settings.step_size, device=z.device)
        self.rate = torch.full(z.shape[:2], TARGET_ACCEPTANCE, device=z.device)
        self.accepted = torch.zeros(z.shape[:2], device=z.device)

    def hmc(self, beta: float, momentum: torch.Tensor, uniform: torch.Tensor) -> None:
        """One HMC transition leaving f(z) = p(z) p(x|z)^beta invariant; U(z) = |z|^2 / 2 - beta log p(x|z)."""
        eps = self.eps.unsqueeze(-1)
        z, ll, grad_ll = self.z, self.ll, self.grad_ll
        energy = 0.5 * (z * z).sum(-1) - beta * ll + 0.5 * (momentum * momentum).sum(-1)
        p = momentum - 0.5 * eps * (z - beta * grad_ll)
        for step in range(1, self.leapfrog + 1):
            z = z + eps * p
            if step < self.leapfrog:
                p = p - eps * (z - beta * self.likelihood.grad(z))
        ll, grad_ll = self.likelihood.value_and_grad(z)  # the energy at the proposal is float32
        p = p - 0.5 * eps * (z - beta * grad_ll)  # the last half step
        new_energy = 0.5 * (z * z).sum(-1) - beta * ll + 0.5 * (p * p).sum(-1)
        accept = torch.log(uniform) < (energy - new_energy)  # NaN energies compare False: rejected
        self.z = torch.where(accept.unsqueeze(-1), z, self.z)
        self.ll = torch.where(accept, ll, self.ll)
        self.grad_ll = torch.where(accept.unsqueeze(-1), grad_ll, self.grad_ll)
        self.accepted += accept
        self.rate = ACCEPTANCE_DECAY * self.rate + (1 - ACCEPTANCE_DECAY) * accept
        self.eps = torch.where(self.rate > TARGET_ACCEPTANCE, self.eps * ADAPT, self.eps / ADAPT).clamp(
            *STEP_SIZE_RANGE
        )


def ais(
    model: LatentVariableModel,
    x: torch.Tensor,
    settings: AISSettings,
    batch_size: int,
    start: torch.Tensor | None = None,
    first: int = 0,
) -> AISResult:
    """AIS log-weights of every image x (N, 784): forward from z_0 ~ p(z), or, given `start` (N, K),
    exact posterior samples, in reverse from beta = 1 to 0 with every chain starting there.

    `first`: the index of x[0] in the data set (it seeds the image's draws)."""
    betas = sigmoid_schedule(settings.steps).tolist()
    if start is not None:
        betas = betas[::-1]
    parts: dict[str, list[torch.Tensor]] = {"log_w": [], "acceptance": [], "step_size": []}
    gradient_model = _in_dtype(model, settings.gradient_dtype)
    for offset in range(0, len(x), batch_size):
        xb = x[offset : offset + batch_size]
        z0, momenta, uniforms = _noise(len(xb), first + offset, settings, model.K, x.device)
        if start is not None:
            z0 = start[offset : offset + batch_size].unsqueeze(1).expand_as(z0).clone()
        chains = _Chains(_Likelihood(model, gradient_model, xb), z0, settings)
        log_w = torch.zeros(z0.shape[:2], dtype=torch.float64, device=x.device)
        for t in range(1, settings.steps + 1):
            log_w += (betas[t] - betas[t - 1]) * chains.ll.double()  # log f_t(z_{t-1}) - log f_{t-1}(z_{t-1})
            chains.hmc(betas[t], momenta[t - 1], uniforms[t - 1])
        parts["log_w"].append(log_w)
        parts["acceptance"].append((chains.accepted / settings.steps).mean(-1))
        parts["step_size"].append(chains.eps.mean(-1))
    return AISResult(*(torch.cat(parts[name]) for name in ("log_w", "acceptance", "step_size")))


@torch.no_grad()
def simulate(model: LatentVariableModel, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n images from the model with the latents that made them: z ~ p(z), x ~ p(x|z); (x, z)."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    z = torch.randn(n, model.K, generator=generator).to(device)
    x = model.likelihood.sample(model.decoder(z).float().cpu(), generator).to(device)
    return x, z


@dataclass(frozen=True)
class BDMCResult:
    lower: torch.Tensor  # (n,) forward AIS: a stochastic lower bound of log p(x)
    upper: torch.Tensor  # (n,) reverse AIS from the exact posterior sample: a stochastic upper bound
    forward: AISResult
    reverse: AISResult


def bdmc(model: LatentVariableModel, n: int, settings: AISSettings, batch_size: int) -> BDMCResult:
    """Bidirectional Monte Carlo on n images simulated from the model: forward and reverse AIS
    with the same settings; their gap bounds the error of forward AIS on those images."""
    x, z = simulate(model, n, settings.seed)
    forward = ais(model, x, settings, batch_size)
    reverse = ais(model, x, settings, batch_size, start=z)
    return BDMCResult(forward.estimate(), reverse.estimate(reverse=True), forward, reverse)
