"""The exact posterior p(z|x) of a K=2 model on a grid: p(x|z) p(z) normalized over the grid's
points in log space, with log p(x) by the midpoint rule and E_p(z) log p(x|z) on the same points.
The figures draw it; the Python API hands it out (Run.posterior)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from vae_cli.maths.densities import standard_normal_log_prob
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
    log_px: np.ndarray  # (N,) quadrature estimate log sum_g p(x|z_g) p(z_g) dA
    jensen: np.ndarray  # (N,) E_p(z) log p(x|z), the prior renormalized to the grid

    @property
    def extent(self) -> tuple[float, float, float, float]:
        return (float(self.z1[0]), float(self.z1[-1]), float(self.z2[0]), float(self.z2[-1]))

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
    offsets = torch.linspace(-limit, limit, n, dtype=torch.float64)
    z1_axis, z2_axis = (center[0] + offsets).float(), (center[1] + offsets).float()
    z2, z1 = torch.meshgrid(z2_axis, z1_axis, indexing="ij")  # row index = z2 increasing, for origin="lower"
    z = torch.stack([z1.reshape(-1), z2.reshape(-1)], dim=-1)
    device = next(model.parameters()).device
    log_px_z = model.log_px_given_shared_z(x.float().to(device), z.to(device)).cpu()  # (N, G): one decoder pass
    log_pz = standard_normal_log_prob(z)  # (G,)
    log_joint = log_px_z + log_pz
    log_norm = torch.logsumexp(log_joint, dim=-1, keepdim=True)
    cell = 2 * math.log(2 * limit / (n - 1))
    prior = torch.softmax(log_pz, 0)
    return GridPosterior(
        z1=z1_axis.numpy(),
        z2=z2_axis.numpy(),
        log_prior=(log_pz - torch.logsumexp(log_pz, 0)).reshape(n, n).numpy(),
        log_posterior=(log_joint - log_norm).reshape(len(x), n, n).numpy(),
        log_px=(log_norm[:, 0] + cell).numpy(),
        jensen=(log_px_z @ prior).numpy(),
    )


def zoom_window(post: GridPosterior, i: int) -> tuple[tuple[float, float], float]:
    """(center, half width) of a square around p(z|x_i): its mean +- 5 sd, at least two grid cells,
    at most the whole [-3, 3]^2. A sharp posterior fills one cell of the full grid; this resolves it."""
    mean, sd = post.moments(i)
    spacing = float(post.z1[1] - post.z1[0])
    half = float(min(Z_LIMIT, max(5 * sd.max(), 2 * spacing)))
    return (float(mean[0]), float(mean[1])), half
