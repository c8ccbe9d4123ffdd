"""Training objectives: a registry of small functions, each returning the loss to minimize
(a negative bound on log p(x), nats per image) and its named terms.

    exact       log p(x) = log sum_g w_g p(x|z_g) on a grid shared by the batch (K <= 2): the ceiling
    jensen      E_{z~p(z)} log p(x|z) <= log p(x); the gap is KL(p(z) || p(z|x))
    prior_iwae  log (1/S) sum_s p(x|z_s), z_s ~ p(z): the IWAE bound with the prior as proposal
    elbo        E_q log p(x|z) - KL(q(z|x) || p(z)), q Gaussian from an encoder
    iwae        log (1/S) sum_s p(x|z_s) p(z_s) / q(z_s|x), z_s ~ q(z|x)  (Burda et al. 2016, eq. 8)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vae_cli.maths.densities import (
    diagonal_normal_log_prob,
    kl_to_standard_normal,
    log_mean_exp,
    quadrature_grid,
    standard_normal_log_prob,
)
from vae_cli.maths.models import LatentVariableModel


@dataclass(frozen=True)
class Loss:
    loss: torch.Tensor  # scalar to minimize
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars, nats per image


# fn(model, x, n_samples, **options): the options are the keys of the objective's own config node
# (shared_samples for the prior objectives, grid_points and half_width for exact).
LossFn = Callable[..., Loss]


@dataclass(frozen=True)
class Objective:
    name: str
    fn: LossFn
    loss: str  # what the loss is, in words
    terms: dict[str, str]  # the columns it logs besides the loss, and what each is
    # curves drawn on the loss's own axis: (what it is, the columns whose sum it is); the others get their own
    same_axis: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __call__(self, model: LatentVariableModel, x: torch.Tensor, n_samples: int, **options: Any) -> Loss:
        return self.fn(model, x, n_samples, **options)


OBJECTIVES: dict[str, Objective] = {}


def register(name: str, loss: str, terms: dict[str, str], same_axis=()) -> Callable[[LossFn], LossFn]:
    def add(fn: LossFn) -> LossFn:
        OBJECTIVES[name] = Objective(name, fn, loss, terms, tuple(same_axis))
        return fn

    return add


def prior_log_px_z(model: LatentVariableModel, x: torch.Tensor, n_samples: int, shared_samples: bool) -> torch.Tensor:
    """log p(x_b|z) for z ~ p(z), (B, n_samples): independent draws per image, or with
    shared_samples one set of n_samples draws for the whole batch (the decoder runs on
    n_samples latents instead of B x n_samples; the same expectation, correlated across images)."""
    if shared_samples:
        return model.log_px_given_shared_z(x, model.prior_sample(n_samples))
    return model.log_px_given_z(x, model.prior_sample(x.shape[0], n_samples))


@register(
    "jensen",
    loss="-E_p(z) log p(x|z), the Jensen bound",
    terms={"lme": "-log (1/S) sum_s p(x|z_s), the log-mean-exp of the same samples"},
    same_axis=[("-log-mean-exp of the same samples (a tighter bound)", ("lme",))],
)
def jensen(model: LatentVariableModel, x: torch.Tensor, n_samples: int, shared_samples: bool) -> Loss:
    """Minus the mean over prior samples of log p(x|z); `lme` is the log-mean-exp of the same samples."""
    log_px_z = prior_log_px_z(model, x, n_samples, shared_samples)
    return Loss(-log_px_z.mean(), {"lme": -log_mean_exp(log_px_z.detach()).mean()})


@register(
    "prior_iwae",
    loss="-log (1/S) sum_s p(x|z_s), the log-mean-exp of prior samples",
    terms={"jensen": "-E_p(z) log p(x|z), the Jensen bound of the same samples"},
    same_axis=[("-Jensen bound of the same samples (looser)", ("jensen",))],
)
def prior_iwae(model: LatentVariableModel, x: torch.Tensor, n_samples: int, shared_samples: bool) -> Loss:
    """Minus the log-mean-exp of p(x|z_s) over prior samples; `jensen` is the plain mean of the same samples."""
    log_px_z = prior_log_px_z(model, x, n_samples, shared_samples)
    return Loss(-log_mean_exp(log_px_z).mean(), {"jensen": -log_px_z.detach().mean()})


@register(
    "elbo",
    loss="-ELBO = recon + kl",
    terms={"recon": "-E_q log p(x|z), the reconstruction term", "kl": "KL(q(z|x) || p(z))"},
)
def elbo(model: LatentVariableModel, x: torch.Tensor, n_samples: int) -> Loss:
    """Minus the ELBO: reconstruction averaged over n_samples reparameterized draws plus the closed-form KL."""
    mu, logvar = model.encode(x)
    recon = -model.log_px_given_z(x, model.reparameterize(mu, logvar, n_samples)).mean()
    kl = kl_to_standard_normal(mu, logvar).sum(-1).mean()
    return Loss(recon + kl, {"recon": recon.detach(), "kl": kl.detach()})


@register(
    "iwae",
    loss="-IWAE bound, -log (1/S) sum_s p(x|z_s) p(z_s) / q(z_s|x)",
    terms={"recon": "-E_q log p(x|z) over the same draws", "kl": "KL(q(z|x) || p(z))"},
    same_axis=[("-ELBO of the same draws (recon + kl, looser)", ("recon", "kl"))],
)
def iwae(model: LatentVariableModel, x: torch.Tensor, n_samples: int) -> Loss:
    """Minus the importance-weighted bound; recon + kl is minus the ELBO on the same draws."""
    mu, logvar = model.encode(x)
    z = model.reparameterize(mu, logvar, n_samples)
    log_px_z = model.log_px_given_z(x, z)
    log_w = log_px_z + standard_normal_log_prob(z) - diagonal_normal_log_prob(z, mu, logvar)
    kl = kl_to_standard_normal(mu, logvar).sum(-1).mean()
    return Loss(-log_mean_exp(log_w).mean(), {"recon": -log_px_z.detach().mean(), "kl": kl.detach()})


@register(
    "exact",
    loss="-log p(x) on the grid",
    terms={
        "jensen": "-E_p(z) log p(x|z) on the same grid, the Jensen bound",
        "halving": "|change of log p(x)| from the grid at twice the spacing: the grid's error",
    },
    same_axis=[("-Jensen bound on the same grid", ("jensen",))],
)
def exact(model: LatentVariableModel, x: torch.Tensor, n_samples: int, grid_points: int, half_width: float) -> Loss:
    """Minus log p(x) itself, K <= 2: log p(x_b) = logsumexp_g (log w_g + log p(x_b|z_g)) by the midpoint rule
    on a grid_points^K grid over [-half_width, half_width]^K (n_samples is not used). The decoder runs once on
    the grid and log p(x_b|z_g) for every pair is one (B, 784) x (784, G) product; the gradient is the
    model's own log-likelihood gradient up to the grid's error. Terms: `jensen`, minus E_p(z) log p(x|z) on
    the same grid, and `halving`, how far the grid at twice the spacing moves log p(x) (its error)."""
    z, log_w = quadrature_grid(model.K, grid_points, half_width, x.device, x.dtype)
    log_px_z = model.log_px_given_shared_z(x, z)  # (B, G)
    log_px = torch.logsumexp(log_px_z + log_w, -1)
    with torch.no_grad():
        jensen = (log_px_z @ log_w.exp()).mean()
        z2, log_w2 = quadrature_grid(model.K, grid_points // 2, half_width, x.device, x.dtype)
        coarse = torch.logsumexp(model.log_px_given_shared_z(x, z2) + log_w2, -1)
    return Loss(-log_px.mean(), {"jensen": -jensen, "halving": (log_px.detach() - coarse).mean().abs()})
