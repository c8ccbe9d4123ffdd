"""The densities and the quadrature grid as torch tensors; the formulas themselves are in
vae_cli.maths.formulas (torch-free, so that the method units can use them)."""

from __future__ import annotations

import torch

from vae_cli.maths.formulas import (  # noqa: F401  (this module's own names for them)
    LOG_2PI,
    diagonal_normal_log_prob,
    grid_points,
    kl_to_standard_normal,
    log_mean_exp,
    standard_normal_log_prob,
)
from vae_cli.maths.formulas import grid_axis as _grid_axis


def grid_axis(points_per_dim: int, half_width: float, center: float = 0.0) -> torch.Tensor:
    """The midpoints of points_per_dim cells of width h = 2 L / points_per_dim over center +- L (float64)."""
    return torch.from_numpy(_grid_axis(points_per_dim, half_width, center))


def quadrature_grid(
    K: int,
    points_per_dim: int,
    half_width: float,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    center: tuple[float, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints z_g (G, K) of a regular grid over center + [-L, L]^K and log w_g = log p(z_g) h^K / Z, so that
    log p(x) ~= logsumexp_g (log w_g + log p(x|z_g)): the midpoint rule for the integral of p(x|z) p(z) dz.

    The one convention of every quadrature in vae-cli (the evaluation, objective=exact, the figures and
    Run.posterior). Z is the rule's sum of p over the whole lattice of that spacing, not over the box:
    the prior's weights sum to 1 however coarse the grid, and a box off the origin (a zoom on a sharp
    posterior) sums the same integral as the whole grid. Over [-6, 6]^K the box holds all but 2e-9 of
    the lattice's mass per dimension."""
    z, log_w = grid_points(K, points_per_dim, half_width, center)
    dtype = dtype or torch.get_default_dtype()
    return torch.from_numpy(z).to(device, dtype), torch.from_numpy(log_w).to(device, dtype)
