"""elbo: E_q log p(x|z) - KL(q(z|x) || p(z)) = log p(x) - KL(q(z|x) || p(z|x)), q a Gaussian from an
encoder (Kingma & Welling 2014).

Its gradient estimator (objective.gradient) changes the encoder's gradient only, never the value logged:
standard, the reparameterized gradient with the KL in closed form; stl, "sticking the landing" (Roeder et
al. 2017), log p(x|z) + log p(z) - log q(z|x) on the draws with q's parameters held fixed in log q: the same
expectation, and no variance left where q is the posterior."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vae_cli.maths.formulas import diagonal_normal_log_prob, kl_to_standard_normal, standard_normal_log_prob
from vae_cli.maths.objectives import Loss, Objective
from vae_cli.maths.objectives.iwae import gradient_key, surrogate

ALLOWS = ("standard", "stl")  # DReG's weights w~_s^2 are those of several samples' bound


@dataclass
class ElboConfig:
    gradient: str = gradient_key()


def _gradient_of_the_elbo(cfg: Any) -> str | None:
    if cfg.objective.gradient not in ALLOWS:
        return (
            f"invalid value objective.gradient={cfg.objective.gradient!r} with objective=elbo: allowed "
            f"{', '.join(ALLOWS)} (dreg is the importance-weighted bound's: objective=iwae)"
        )
    return None


def elbo(model: Any, x: Any, n_samples: int, gradient: str = "standard") -> Loss:
    """Minus the ELBO: reconstruction averaged over n_samples reparameterized draws plus the closed-form KL."""
    mu, logvar = model.encode(x)
    z = model.reparameterize(mu, logvar, n_samples)
    log_px_z = model.log_px_given_z(x, z)
    recon = -log_px_z.mean()
    kl = kl_to_standard_normal(mu, logvar).sum(-1).mean()
    loss = recon + kl
    if gradient == "stl":  # the value stays the closed-form KL's; the gradient is STL's
        log_w = log_px_z + standard_normal_log_prob(z) - diagonal_normal_log_prob(z, mu.detach(), logvar.detach())
        loss = surrogate(loss, -log_w.mean())
    return Loss(loss, {"recon": recon.detach(), "kl": kl.detach()})


OBJECTIVE = Objective(
    "elbo",
    elbo,
    loss="-ELBO = recon + kl",
    terms={"recon": "-E_q log p(x|z), the reconstruction term", "kl": "KL(q(z|x) || p(z))"},
    help="the ELBO with a Gaussian encoder q(z|x)",
    config=ElboConfig,
    uses_encoder=True,
    gradients=ALLOWS,
    rules=(_gradient_of_the_elbo,),
)
