"""iwae: log (1/S) sum_s p(x|z_s) p(z_s) / q(z_s|x), z_s ~ q(z|x) (Burda et al. 2016, eq. 8): rises with S
towards log p(x); at S = 1 it is the ELBO.

Its gradient estimator (objective.gradient) changes the encoder's gradient only, never the value logged:
standard, the reparameterized gradient of the bound; stl, "sticking the landing" (Roeder et al. 2017),
log q(z|x) with its parameters held fixed, biased beyond S = 1 (Tucker et al. 2019); dreg, the doubly
reparameterized gradient (Tucker et al. 2019, eq. 5), unbiased, whose signal-to-noise does not fall as S grows.
"""

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
from vae_cli.maths.options import key, one_of

GRADIENTS = ("standard", "stl", "dreg")  # the estimators of the encoder's gradient, for any objective
ALLOWS = GRADIENTS  # those of iwae


def gradient_key() -> Any:
    """objective.gradient, the one key elbo and iwae share (its help and its values, once)."""
    return key(
        "standard",
        "the encoder's gradient: standard; stl (Roeder et al. 2017; biased for iwae beyond 1 sample); "
        "dreg (Tucker et al. 2019; iwae only). The bound logged is the same",
        one_of(*GRADIENTS),
    )


@dataclass
class IwaeConfig:
    gradient: str = gradient_key()


def surrogate(value: Any, gradient_of: Any) -> Any:
    """A tensor with the value of `value` and the gradient of `gradient_of`."""
    return value.detach() + gradient_of - gradient_of.detach()


def iwae(model: Any, x: Any, n_samples: int, gradient: str = "standard") -> Loss:
    """Minus the importance-weighted bound; recon + kl is minus the ELBO on the same draws."""
    mu, logvar = model.encode(x)
    z = model.reparameterize(mu, logvar, n_samples)
    log_px_z = model.log_px_given_z(x, z)
    log_pz = standard_normal_log_prob(z)
    kl = kl_to_standard_normal(mu, logvar).sum(-1).mean()
    terms = {"recon": -log_px_z.detach().mean(), "kl": kl.detach()}
    if gradient == "standard":
        log_w = log_px_z + log_pz - diagonal_normal_log_prob(z, mu, logvar)
        return Loss(-log_mean_exp(log_w).mean(), terms)
    # stl and dreg: q's parameters held fixed in log q, z still reparameterized (the same values)
    log_w = log_px_z + log_pz - diagonal_normal_log_prob(z, mu.detach(), logvar.detach())
    bound = log_mean_exp(log_w)
    if gradient == "stl":
        return Loss(-bound.mean(), terms)
    # dreg (Tucker et al. 2019, eq. 5): the encoder gets sum_s w~_s^2 d log w_s/dz_s dz_s/dphi, the decoder
    # sum_s w~_s d log w_s/dtheta (the standard gradient). sum_s w~_s log w_s gives the decoder's, and the
    # gradient reaching z_s is scaled once more by w~_s on its way to the encoder.
    weights = log_w.detach().softmax(-1)  # w~_s, normalized importance weights
    if z.requires_grad:
        z.register_hook(lambda g: g * weights.unsqueeze(-1))
    return Loss(-surrogate(bound, (weights * log_w).sum(-1)).mean(), terms)


OBJECTIVE = Objective(
    "iwae",
    iwae,
    loss="-IWAE bound, -log (1/S) sum_s p(x|z_s) p(z_s) / q(z_s|x)",
    terms={"recon": "-E_q log p(x|z) over the same draws", "kl": "KL(q(z|x) || p(z))"},
    same_axis=(("-ELBO of the same draws (recon + kl, looser)", ("recon", "kl")),),
    help="the importance-weighted bound with q(z|x) as proposal",
    config=IwaeConfig,
    uses_encoder=True,
    gradients=ALLOWS,
)
