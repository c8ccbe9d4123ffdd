"""iwae: log (1/S) sum_s p(x|z_s) p(z_s) / q(z_s|x), z_s ~ q(z|x) (Burda et al. 2016, eq. 8): rises with S
towards log p(x); at S = 1 it is the ELBO."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vae_cli.maths.formulas import (
    diagonal_normal_log_prob,
    kl_to_standard_normal,
    log_mean_exp,
    standard_normal_log_prob,
)
from vae_cli.maths.objectives import Loss, Objective


@dataclass
class IwaeConfig:
    """The IWAE bound's keys (none yet)."""


def iwae(model: Any, x: Any, n_samples: int) -> Loss:
    """Minus the importance-weighted bound; recon + kl is minus the ELBO on the same draws."""
    mu, logvar = model.encode(x)
    z = model.reparameterize(mu, logvar, n_samples)
    log_px_z = model.log_px_given_z(x, z)
    log_w = log_px_z + standard_normal_log_prob(z) - diagonal_normal_log_prob(z, mu, logvar)
    kl = kl_to_standard_normal(mu, logvar).sum(-1).mean()
    return Loss(-log_mean_exp(log_w).mean(), {"recon": -log_px_z.detach().mean(), "kl": kl.detach()})


OBJECTIVE = Objective(
    "iwae",
    iwae,
    loss="-IWAE bound, -log (1/S) sum_s p(x|z_s) p(z_s) / q(z_s|x)",
    terms={"recon": "-E_q log p(x|z) over the same draws", "kl": "KL(q(z|x) || p(z))"},
    same_axis=(("-ELBO of the same draws (recon + kl, looser)", ("recon", "kl")),),
    help="the importance-weighted bound with q(z|x) as proposal",
    config=IwaeConfig,
    uses_encoder=True,
)
