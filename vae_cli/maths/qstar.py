"""q*(z|x): the diagonal Gaussian that maximizes one image's ELBO, and the two gaps it splits the
ELBO's gap into (Cremer, Li & Duvenaud, ICML 2018, "Inference suboptimality in variational autoencoders"):

    gap_elbo = log p(x) - ELBO(q)
             = [log p(x) - ELBO(q*)]  +  [ELBO(q*) - ELBO(q)]
               approximation gap         amortization gap

The first is what the diagonal-Gaussian family cannot fit of p(z|x); the second what one encoder for
all images loses against each image's own q*. ELBO(q) = E_q log p(x|z) - KL(q || p(z)), the KL in
closed form, as the evaluation's ELBO.

    optimize(model, x, mean, logvar, seed, first)   each image's (mean, log-variance) from a start
    closed_form(lg, x)                               for a linear-Gaussian model: mean m and variances
                                                     1 / Lambda_ii of the posterior N(m, Lambda^-1)
    elbo(model, x, mean, logvar, eps)                the ELBO of N(mean, diag(exp(logvar))) from draws eps

The optimizer: the posterior's mode nearest the start (Adam on log p(x, z), one decoded point a step),
its Laplace variances 1 / H_ii as the start of q (exact for a Gaussian posterior), then natural-gradient
ascent of the ELBO with reparameterized draws, fresh at every step (fixed draws would fit q* to them),
from each image's own stream, so no image's q* depends on the batch it is fitted in; q* is the mean of
the last half of the iterates, so the gradient's noise does not decide where it stops.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vae_cli.maths import streams
from vae_cli.maths.densities import kl_to_standard_normal, standard_normal_log_prob
from vae_cli.maths.linear_gaussian import LinearGaussian
from vae_cli.maths.models import LatentVariableModel

QSTAR_STREAM = "qstar"  # the optimizer's draws, per image
INIT_STREAM = "qstar.init"  # an encoder-free model's starting point, per image
STEPS = 500  # natural-gradient steps of the ELBO per image
SAMPLES = 64  # reparameterized draws per step (half of them antithetic)
LR = 0.1  # the natural gradient's step
MAX_STEP = 0.5  # the largest step: of the mean, in sds; of the log-variance
INIT_DRAWS = 1000  # prior draws that place an encoder-free model's start
AVERAGED = 0.5  # the result is the mean of the last half of the iterates (Polyak & Juditsky 1992)
ADAM_BETAS = (0.9, 0.99)  # for the mode
MODE_STEPS = 500  # Adam steps towards the posterior's mode before the ELBO's (each 1 / SAMPLES of one of those)
MODE_LR = 0.05
LAPLACE_STEP = 1e-3  # the central differences' step in z
WINDOW = 0.1  # convergence: the change of the ELBO's running mean over the last tenth of the steps
MIN_LOGVAR = math.log(1e-6)  # the start's variance floor (one prior draw carrying all the weight)


@dataclass(frozen=True)
class QStar:
    mean: torch.Tensor  # (N, K)
    logvar: torch.Tensor  # (N, K)
    change: torch.Tensor  # (N,) mean ELBO of the last tenth of the steps minus that of the tenth before


def elbo(
    model: LatentVariableModel, x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """(1/S) sum_s log p(x|mean + sigma eps_s) - KL(q || p(z)) (closed form) per image; eps (B, S, K)."""
    z = mean.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps
    return model.log_px_given_z(x, z).mean(-1) - kl_to_standard_normal(mean, logvar).sum(-1)


def optimize(
    model: LatentVariableModel,
    x: torch.Tensor,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    seed: int,
    first: int,
    steps: int = STEPS,
    samples: int = SAMPLES,
    lr: float = LR,
    progress: Callable[[float], None] | None = None,
) -> QStar:
    """q* of images first..first+B-1 (x: (B, 784)) by Adam on (mean, logvar) from the given start (B, K).
    Adam's update is per coordinate, so each image's path is its own whatever else is in the batch.
    progress, if given, is told the share of the ELBO's steps done after each (the mode's cost 1/samples)."""
    generators = [streams.stream(seed, QSTAR_STREAM, first + i) for i in range(len(x))]
    dtype = next(model.decoder.parameters()).dtype
    mean = posterior_mode(model, x, mean.detach().to(dtype))
    logvar = laplace_logvar(model, x, mean, logvar.detach().to(dtype)).requires_grad_(True)
    mean.requires_grad_(True)
    history = torch.empty(steps, len(x), dtype=torch.float64)
    averaged = max(1, int(AVERAGED * steps))
    mean_sum, logvar_sum = torch.zeros_like(mean), torch.zeros_like(mean)
    with torch.enable_grad():
        for step in range(steps):
            eps = torch.stack([streams.normal(g, (samples // 2, mean.shape[1])) for g in generators])
            eps = torch.cat([eps, -eps], 1).to(x.device, dtype)  # antithetic: the gradient's odd terms cancel
            value = elbo(model, x, mean, logvar, eps)
            # only (mean, logvar)'s gradients: the model's parameters keep theirs (none)
            grad_mean, grad_logvar = torch.autograd.grad(value.sum(), [mean, logvar])
            with torch.no_grad():
                # The natural gradient: the Fisher information of N(mean, s) is 1 / s for the mean and
                # 1/2 for log s, so a step of 1 is Newton's for a Gaussian posterior; clipped while far
                sd = torch.exp(0.5 * logvar)
                mean += (lr * logvar.exp() * grad_mean).clamp(-MAX_STEP * sd, MAX_STEP * sd)
                logvar += (lr * 2 * grad_logvar).clamp(-MAX_STEP, MAX_STEP)
            history[step] = value.detach().double().cpu()
            if step >= steps - averaged:  # Polyak-Ruppert: the mean of the last iterates, not the last one
                mean_sum += mean.detach()
                logvar_sum += logvar.detach()
            if progress is not None:
                progress((step + 1) / steps)
    w = max(1, int(WINDOW * steps))
    change = history[-w:].mean(0) - history[-2 * w : -w].mean(0) if steps >= 2 * w else history[-1] - history[0]
    return QStar(mean_sum / averaged, logvar_sum / averaged, change)


def posterior_mode(
    model: LatentVariableModel, x: torch.Tensor, z: torch.Tensor, steps: int = MODE_STEPS
) -> torch.Tensor:
    """The mode of p(z|x) nearest z (B, K), by Adam on log p(x|z) + log p(z) in absolute steps: where q*'s
    optimizer starts its mean. A start many posterior widths off (an encoder that misses the posterior)
    would otherwise be crossed in steps of a fraction of a width. One decoded point an image a step."""
    z = z.clone().requires_grad_(True)
    moments = torch.zeros(2, *z.shape, dtype=z.dtype, device=z.device)
    with torch.enable_grad():
        for step in range(steps):
            log_joint = model.log_px_given_z(x, z.unsqueeze(1))[:, 0] + standard_normal_log_prob(z)
            (grad,) = torch.autograd.grad(log_joint.sum(), [z])
            with torch.no_grad():
                z += adam_step(moments, grad, step, learning_rate(step, steps, MODE_LR))
    return z.detach()


def _log_joint_grad(model: LatentVariableModel, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """d/dz [log p(x|z) + log p(z)] at points z (B, S, K) for each image of x (B, 784)."""
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        log_joint = model.log_px_given_z(x, z) + standard_normal_log_prob(z)
        return torch.autograd.grad(log_joint.sum(), [z])[0]


def laplace_logvar(
    model: LatentVariableModel, x: torch.Tensor, mode: torch.Tensor, logvar: torch.Tensor, h: float = LAPLACE_STEP
) -> torch.Tensor:
    """log 1 / H_ii, H the Hessian of -log p(x, z) at the mode (B, K): for a Gaussian posterior N(m, H^-1),
    q*'s variances exactly; elsewhere a start of the right size. H_ii by central differences of the
    gradient (2K decoded points an image). Where H_ii is not positive, the given logvar stays."""
    K = mode.shape[1]
    steps = h * torch.eye(K, dtype=mode.dtype, device=mode.device)
    grad = _log_joint_grad(model, x, torch.cat([mode.unsqueeze(1) + steps, mode.unsqueeze(1) - steps], 1))
    curvature = -(grad[:, :K] - grad[:, K:]).diagonal(dim1=1, dim2=2) / (2 * h)  # (B, K)
    return torch.where(curvature > 0, -curvature.clamp(min=1e-30).log(), logvar)


def learning_rate(step: int, steps: int, lr: float) -> float:
    """lr for the first half of the steps (to reach q* from a far start), then a cosine to lr / 100."""
    half = steps // 2
    if step < half:
        return lr
    return lr / 100 + (lr - lr / 100) * 0.5 * (1 + math.cos(math.pi * (step - half) / max(1, steps - half)))


def adam_step(moments: torch.Tensor, grad: torch.Tensor, step: int, lr: float) -> torch.Tensor:
    """Adam's step (Kingma & Ba 2015, algorithm 1) for the gradient `grad`, its moments updated in place.
    beta2 = 0.99: the gradient's scale far from q* is forgotten within a hundred steps."""
    beta1, beta2 = ADAM_BETAS
    moments[0].mul_(beta1).add_(grad, alpha=1 - beta1)
    moments[1].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    first = moments[0] / (1 - beta1 ** (step + 1))
    second = moments[1] / (1 - beta2 ** (step + 1))
    return lr * first / (second.sqrt() + 1e-8)


@torch.no_grad()
def prior_start(
    model: LatentVariableModel, x: torch.Tensor, seed: int, first: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A start for a model without an encoder: the mean and variance of INIT_DRAWS prior draws
    weighted by p(x|z) (self-normalized importance sampling from p(z)), per image."""
    z = torch.stack(
        [streams.normal(streams.stream(seed, INIT_STREAM, first + i), (INIT_DRAWS, model.K)) for i in range(len(x))]
    )
    z = z.to(x.device, next(model.decoder.parameters()).dtype)
    w = torch.softmax(model.log_px_given_z(x, z), -1).unsqueeze(-1)  # (B, S, 1)
    mean = (w * z).sum(1)
    var = (w * (z - mean.unsqueeze(1)).pow(2)).sum(1)
    return mean, var.log().clamp(min=MIN_LOGVAR)


def closed_form(lg: LinearGaussian, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q* of a linear-Gaussian model: the diagonal Gaussian closest in KL(q || p) to p(z|x) = N(m, Lambda^-1)
    has mean m and variances 1 / Lambda_ii (mean-field on a Gaussian: Bishop 2006, eq. 10.12-10.13)."""
    m, covariance = lg.posterior(x)
    precision = torch.linalg.inv(covariance)
    return m, (-precision.diagonal().log()).expand_as(m)


@torch.no_grad()
def elbo_from_draws(
    model: LatentVariableModel, x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor, chunk: int
) -> torch.Tensor:
    """The ELBO from draws eps (B, S, K), decoding chunk draws at a time; float64 (B,)."""
    log_px_z = torch.cat(
        [
            model.log_px_given_z(x, mean.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * e)
            for e in eps.split(chunk, dim=1)
        ],
        dim=1,
    )
    return (log_px_z.double().mean(-1) - kl_to_standard_normal(mean, logvar).double().sum(-1)).double()
