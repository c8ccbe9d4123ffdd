"""exact: log p(x) itself, log sum_g w_g p(x|z_g) on a grid over z shared by the batch (K <= 2): the
ceiling every bound is below."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vae_cli.maths.formulas import grid_points
from vae_cli.maths.objectives import Loss, Objective
from vae_cli.maths.options import POSITIVE, at_least, key
from vae_cli.maths.spec import QUADRATURE_MAX_K


@dataclass
class ExactConfig:
    grid_points: int = key(
        96, "grid points per latent dimension", at_least(4, " (the halving check uses half as many)")
    )
    half_width: float = key(6.0, "the grid covers [-w, w]^K", POSITIVE)


def _grid(x: Any, K: int, points: int, half_width: float) -> tuple[Any, Any]:
    z, log_w = grid_points(K, points, half_width)
    return x.new_tensor(z), x.new_tensor(log_w)


def exact(model: Any, x: Any, n_samples: int, grid_points: int, half_width: float) -> Loss:
    """Minus log p(x) itself, K <= 2: log p(x_b) = logsumexp_g (log w_g + log p(x_b|z_g)) by the midpoint rule
    on a grid_points^K grid over [-half_width, half_width]^K (n_samples is not used). The decoder runs once on
    the grid and log p(x_b|z_g) for every pair is one (B, 784) x (784, G) product; the gradient is the
    model's own log-likelihood gradient up to the grid's error. Terms: `jensen`, minus E_p(z) log p(x|z) on
    the same grid, and `halving`, how far the grid at twice the spacing moves log p(x) (its error)."""
    z, log_w = _grid(x, model.K, grid_points, half_width)
    log_px_z = model.log_px_given_shared_z(x, z)  # (B, G)
    log_px = (log_px_z + log_w).logsumexp(-1)
    z2, log_w2 = _grid(x, model.K, grid_points // 2, half_width)
    coarse = (model.log_px_given_shared_z(x, z2).detach() + log_w2).logsumexp(-1)
    jensen = (log_px_z.detach() @ log_w.exp()).mean()
    return Loss(-log_px.mean(), {"jensen": -jensen, "halving": (log_px.detach() - coarse).mean().abs()})


def _needs_a_small_k(cfg: Any) -> str | None:
    if cfg.K > QUADRATURE_MAX_K:
        return (
            f"invalid value K={cfg.K!r}: allowed K <= {QUADRATURE_MAX_K} with objective=exact (a grid over "
            "the latent space: beyond 2 dimensions it cannot resolve the posterior)"
        )
    return None


OBJECTIVE = Objective(
    "exact",
    exact,
    loss="-log p(x) on the grid",
    terms={
        "jensen": "-E_p(z) log p(x|z) on the same grid, the Jensen bound",
        "halving": "|change of log p(x)| from the grid at twice the spacing: the grid's error",
    },
    same_axis=(("-Jensen bound on the same grid", ("jensen",)),),
    help="log p(x) itself on a grid over z (K <= 2)",
    config=ExactConfig,
    rules=(_needs_a_small_k,),
    decodes_shared=lambda node: True,
)
