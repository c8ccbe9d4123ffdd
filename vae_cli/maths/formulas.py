"""The formulas every objective and estimator shares, written with tensor methods so that a method
unit can use them without importing torch: the Gaussian densities of p(z) and q(z|x), their KL, the
log-mean-exp, and the points and weights of the quadrature grid (numpy)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

LOG_2PI = math.log(2 * math.pi)


def log_mean_exp(t: Any, dim: int = -1) -> Any:
    """log (1/n) sum_i exp(t_i), stable where the exp underflows."""
    return t.logsumexp(dim) - math.log(t.shape[dim])


def standard_normal_log_prob(z: Any) -> Any:
    """log N(z; 0, I), summed over the last (latent) dimension."""
    return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)


def diagonal_normal_log_prob(z: Any, mu: Any, logvar: Any) -> Any:
    """log N(z; mu, diag(exp(logvar))) summed over the latent dimension; z is (B, S, K), mu and logvar (B, K)."""
    mu, logvar = mu.unsqueeze(1), logvar.unsqueeze(1)
    return -0.5 * ((z - mu).pow(2) * (-logvar).exp() + logvar + LOG_2PI).sum(-1)


def kl_to_standard_normal(mu: Any, logvar: Any) -> Any:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per latent dimension (Kingma & Welling 2014, appendix B)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)


def grid_axis(points_per_dim: int, half_width: float, center: float = 0.0) -> np.ndarray:
    """The midpoints of points_per_dim cells of width h = 2 L / points_per_dim over center +- L (float64)."""
    h = 2 * half_width / points_per_dim
    return center - half_width + h * (np.arange(points_per_dim, dtype=np.float64) + 0.5)


def lattice_log_normalizer(axis: np.ndarray) -> float:
    """log sum_i p(a + i h) h over the whole 1-D lattice through the axis' points (spacing h, offset a),
    for a standard normal p: what the midpoint rule gives the prior's total mass, 1 up to the rule's error."""
    h = float(axis[1] - axis[0]) if len(axis) > 1 else 1.0
    reach = int(40 / h) + len(axis)  # p is below 1e-300 past |z| = 40
    points = axis[0] + h * np.arange(-reach, reach + 1)
    return float(np.logaddexp.reduce(-0.5 * (points**2 + LOG_2PI) + math.log(h)))


def grid_points(
    K: int, points_per_dim: int, half_width: float, center: tuple[float, ...] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Midpoints z_g (G, K) of a regular grid over center + [-L, L]^K (the last coordinate fastest) and
    log w_g = log p(z_g) + K log h - log Z, with Z the midpoint rule's sum of p over the whole lattice of
    that spacing: the prior as the lattice's distribution, which sums to 1 however coarse the grid (so a
    Jensen bound on it is an expectation), and the midpoint rule for the integral of p(x|z) p(z) dz over
    the grid's box, wherever the box lies (see vae_cli.maths.densities.quadrature_grid)."""
    axes = [grid_axis(points_per_dim, half_width, c) for c in (center or (0.0,) * K)]
    z = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, K)
    log_z = sum(lattice_log_normalizer(axis) for axis in axes)
    log_w = -0.5 * (z**2 + LOG_2PI).sum(-1) + K * math.log(2 * half_width / points_per_dim) - log_z
    return z, log_w
