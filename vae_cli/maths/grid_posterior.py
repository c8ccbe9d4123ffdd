"""The exact posterior p(z|x) of a K=2 model on a grid: p(x|z) p(z) normalized over the grid's
points in log space, with log p(x) and E_p(z) log p(x|z) by the midpoint rule on the same points
(densities.quadrature_grid: the evaluation's convention). The figures draw it; the Python API hands
it out (Run.posterior)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vae_cli.maths.densities import grid_axis, quadrature_grid
from vae_cli.maths.models import LatentVariableModel
from vae_cli.maths.spec import Z_LIMIT

POSTERIOR_GRID = 101  # p(z|x) on a 101x101 grid (spacing 0.06)


@dataclass
class GridPosterior:
    """p(z|x) = p(x|z) p(z) / p(x) on the points of a square grid, normalized over the grid in log space."""

    z1: np.ndarray  # (n,) grid coordinates along z1 (columns)
    z2: np.ndarray  # (n,) grid coordinates along z2 (rows, bottom to top: draw with origin="lower")
    log_prior: np.ndarray  # (n, n) log p(z_g) normalized over the grid
    log_posterior: np.ndarray  # (N, n, n) log p(z_g | x_i) normalized over the grid
    log_px: np.ndarray  # (N,) the midpoint rule, log sum_g p(x|z_g) p(z_g) h^2
    jensen: np.ndarray  # (N,) E_p(z) log p(x|z) by the same rule

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """The cells' outer edges: each point is the midpoint of its cell."""
        h1, h2 = float(self.z1[1] - self.z1[0]), float(self.z2[1] - self.z2[0])
        return (
            float(self.z1[0]) - h1 / 2,
            float(self.z1[-1]) + h1 / 2,
            float(self.z2[0]) - h2 / 2,
            float(self.z2[-1]) + h2 / 2,
        )

    def moments(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation (per axis) of p(z|x_i) on the grid."""
        p = np.exp(self.log_posterior[i].astype(np.float64))
        g2, g1 = np.meshgrid(self.z2, self.z1, indexing="ij")
        mean = np.array([(p * g1).sum(), (p * g2).sum()])
        sd = np.sqrt(np.array([(p * (g1 - mean[0]) ** 2).sum(), (p * (g2 - mean[1]) ** 2).sum()]))
        return mean, sd


@torch.no_grad()
def grid_posterior(
    model: LatentVariableModel,
    x: torch.Tensor,
    n: int = POSTERIOR_GRID,
    limit: float = Z_LIMIT,
    center: tuple[float, float] = (0.0, 0.0),
) -> GridPosterior:
    """The exact posterior of a K=2 model for each image in x (N, 784) on an n x n grid over
    center + [-limit, limit]^2."""
    z, log_w = quadrature_grid(2, n, limit, center=center, dtype=torch.float64)
    # cartesian_prod runs z2 fastest: (z1, z2) -> rows z2 (bottom to top, for origin="lower"), columns z1
    device = next(model.parameters()).device
    log_px_z = model.log_px_given_shared_z(x.float().to(device), z.float().to(device)).cpu().double()  # (N, G)
    log_joint = log_px_z + log_w
    log_px = torch.logsumexp(log_joint, dim=-1, keepdim=True)

    def image(values: torch.Tensor) -> np.ndarray:  # (..., G) -> (..., n rows of z2, n columns of z1)
        return values.reshape(*values.shape[:-1], n, n).transpose(-1, -2).float().numpy()

    return GridPosterior(
        z1=grid_axis(n, limit, center[0]).float().numpy(),
        z2=grid_axis(n, limit, center[1]).float().numpy(),
        log_prior=image(log_w - torch.logsumexp(log_w, 0)),
        log_posterior=image(log_joint - log_px),
        log_px=log_px[:, 0].float().numpy(),
        jensen=(log_px_z @ log_w.exp()).float().numpy(),
    )


def zoom_window(post: GridPosterior, i: int) -> tuple[tuple[float, float], float]:
    """(center, half width) of a square around p(z|x_i): its mean +- 5 sd, at least two grid cells,
    at most the whole [-3, 3]^2. A sharp posterior fills one cell of the full grid; this resolves it."""
    mean, sd = post.moments(i)
    spacing = float(post.z1[1] - post.z1[0])
    half = float(min(Z_LIMIT, max(5 * sd.max(), 2 * spacing)))
    return (float(mean[0]), float(mean[1])), half
