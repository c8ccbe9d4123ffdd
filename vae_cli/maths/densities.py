"""The Gaussian densities of the prior p(z) and the encoder q(z|x), their KL, the log-mean-exp,
and the quadrature grid over z: the pieces every objective and estimator shares."""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2 * math.pi)


def log_mean_exp(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log (1/n) sum_i exp(t_i), stable where the exp underflows."""
    return torch.logsumexp(t, dim) - math.log(t.shape[dim])


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I), summed over the last (latent) dimension."""
    return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)


def diagonal_normal_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the latent dimension; z is (B, S, K), mu and logvar (B, K)."""
    mu, logvar = mu.unsqueeze(1), logvar.unsqueeze(1)
    return -0.5 * ((z - mu).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per latent dimension (Kingma & Welling 2014, appendix B)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)


def grid_axis(points_per_dim: int, half_width: float, center: float = 0.0) -> torch.Tensor:
    """The midpoints of points_per_dim cells of width h = 2 L / points_per_dim over center +- L (float64)."""
    h = 2 * half_width / points_per_dim
    return center - half_width + h * (torch.arange(points_per_dim, dtype=torch.float64) + 0.5)


def quadrature_grid(
    K: int,
    points_per_dim: int,
    half_width: float,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    center: tuple[float, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints z_g (G, K) of a regular grid over center + [-L, L]^K and log w_g = log p(z_g) + K log h, so
    that log p(x) ~= logsumexp_g (log w_g + log p(x|z_g)): the midpoint rule for the integral of p(x|z) p(z) dz.

    The one convention of every quadrature in vae-cli (the evaluation, objective=exact, the figures and
    Run.posterior): the prior is not renormalized to the box, so a grid off the origin sums the same
    integral. (The midpoint sum of p(z) h^K over [-6, 6]^K differs from 1 by the mass outside, 2e-9 per
    dimension.)"""
    center = center or (0.0,) * K
    axes = [grid_axis(points_per_dim, half_width, c) for c in center]
    z = torch.cartesian_prod(*axes).reshape(-1, K)
    log_w = standard_normal_log_prob(z) + K * math.log(2 * half_width / points_per_dim)
    dtype = dtype or torch.get_default_dtype()
    return z.to(device, dtype), log_w.to(device, dtype)
