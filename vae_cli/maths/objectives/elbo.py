"""elbo: E_q log p(x|z) - KL(q(z|x) || p(z)) = log p(x) - KL(q(z|x) || p(z|x)), q a Gaussian from an
encoder (Kingma & Welling 2014)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vae_cli.maths.formulas import kl_to_standard_normal
from vae_cli.maths.objectives import Loss, Objective


@dataclass
class ElboConfig:
    """The ELBO's keys (none yet)."""


def elbo(model: Any, x: Any, n_samples: int) -> Loss:
    """Minus the ELBO: reconstruction averaged over n_samples reparameterized draws plus the closed-form KL."""
    mu, logvar = model.encode(x)
    recon = -model.log_px_given_z(x, model.reparameterize(mu, logvar, n_samples)).mean()
    kl = kl_to_standard_normal(mu, logvar).sum(-1).mean()
    return Loss(recon + kl, {"recon": recon.detach(), "kl": kl.detach()})


OBJECTIVE = Objective(
    "elbo",
    elbo,
    loss="-ELBO = recon + kl",
    terms={"recon": "-E_q log p(x|z), the reconstruction term", "kl": "KL(q(z|x) || p(z))"},
    help="the ELBO with a Gaussian encoder q(z|x)",
    config=ElboConfig,
    uses_encoder=True,
)
