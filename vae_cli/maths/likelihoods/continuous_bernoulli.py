"""The continuous Bernoulli (Loaiza-Ganem & Cunningham, NeurIPS 2019), for grey levels in [0, 1]:

    p(x|eta) = C(eta) sigmoid(eta)^x (1 - sigmoid(eta))^(1-x),   log p(x|eta) = x eta - softplus(eta) + log C(eta),

logits eta = f(z) (its natural parameter). A Bernoulli likelihood on grey levels (a BCE loss) is not a density on [0, 1]: its
integral over x is not 1. C(eta) makes it one: in logits (their eq. 7, lambda = sigmoid(eta)),

    C(eta) = 2 atanh(1 - 2 lambda) / (1 - 2 lambda) = eta / tanh(eta / 2),   with C(0) = 2.

Every formula is written with tensor methods, so this unit imports no torch; near eta = 0, where the
closed forms are 0/0, their Taylor series stand in (|eta| < NEAR_ZERO: the next term is below 1e-8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from vae_cli.maths import likelihoods

NEAR_ZERO = 0.3
LOG_2 = math.log(2.0)
MEAN_CLAMP = 1e-3  # the smallest mean (and 1 - the largest) initial_output fits: eta = -+1000
BISECTIONS = 64


@dataclass
class ContinuousBernoulliConfig:
    """p(x|z) = C(eta) sigmoid(eta)^x (1 - sigmoid(eta))^(1-x), eta = f(z): a density of grey levels on [0, 1]."""


def softplus(eta: Any) -> Any:
    return eta.clamp_min(0) + (-eta.abs()).exp().log1p()


def log_normalizer(eta: Any) -> Any:
    """log C(eta) = log |eta| - log tanh(|eta| / 2); near 0, log 2 + eta^2/12 - 7 eta^4/1440 + 31 eta^6/90720."""
    a = eta.abs()
    far = a.clamp_min(NEAR_ZERO)  # both branches are computed: the far one never sees 0
    exact = far.log() - (-far).exp().neg().log1p() + (-far).exp().log1p()
    eta2 = eta * eta
    near = LOG_2 + eta2 / 12 - 7 * eta2 * eta2 / 1440 + 31 * eta2 * eta2 * eta2 / 90720
    return exact.where(a >= NEAR_ZERO, near)


def mean(eta: Any) -> Any:
    """E[x] = 1 / (1 - e^-eta) - 1 / eta (their eq. 8 in logits); near 0, 1/2 + eta/12 - eta^3/720 + eta^5/30240."""
    far = eta.where(eta.abs() >= NEAR_ZERO, NEAR_ZERO)
    exact = -1 / (-far).expm1() - 1 / far
    eta3 = eta * eta * eta
    return exact.where(eta.abs() >= NEAR_ZERO, 0.5 + eta / 12 - eta3 / 720 + eta3 * eta * eta / 30240)


def quantile(eta: Any, u: Any) -> Any:
    """The inverse CDF at u: log(1 + u (e^eta - 1)) / eta, written as 1 + log(u + (1 - u) e^-eta) / eta where eta > 1
    (e^eta would overflow) and u itself where eta is 0."""
    safe = eta.where(eta.abs() > 1e-6, 1.0)
    small = (u * safe.expm1()).log1p() / safe
    large = 1 + (u + (1 - u) * (-safe).exp()).log() / safe
    x = large.where(eta > 1, small).where(eta.abs() > 1e-6, u)
    return x.clamp(0, 1)


class ContinuousBernoulli:
    """The unit's implementation (see vae_cli.maths.likelihoods): formulas only, nothing learned."""

    def __init__(self, spec: Any, n_pixels: int, pixel_sd: Any = None) -> None:
        pass

    def log_prob(self, x: Any, logits: Any) -> Any:
        x = x.view(x.shape[0], *[1] * (logits.dim() - 2), x.shape[-1]).to(logits.dtype)
        return (x * logits - softplus(logits) + log_normalizer(logits)).sum(-1)

    def log_prob_shared(self, x: Any, logits: Any) -> Any:
        return x.to(logits.dtype) @ logits.T + (log_normalizer(logits) - softplus(logits)).sum(-1)

    def mean(self, logits: Any) -> Any:
        return mean(logits)

    def sample(self, logits: Any, generator: Any = None) -> Any:
        return quantile(logits, logits.new_empty(logits.shape).uniform_(generator=generator))

    def initial_output(self, means: Any) -> Any:
        """The logits whose mean is `means`, by bisection (the mean rises with eta)."""
        target = means.double().clamp(MEAN_CLAMP, 1 - MEAN_CLAMP)
        low, high = target.new_full(target.shape, -1 / MEAN_CLAMP), target.new_full(target.shape, 1 / MEAN_CLAMP)
        for _ in range(BISECTIONS):
            middle = (low + high) / 2
            above = mean(middle) > target
            high, low = middle.where(above, high), low.where(above, middle)
        return ((low + high) / 2).float()


UNIT = likelihoods.LikelihoodUnit(
    name="continuous_bernoulli",
    help="the continuous Bernoulli, a density of grey levels on [0, 1] (data.binarization=none)",
    config=ContinuousBernoulliConfig,
    pixels=likelihoods.GREY,
    implementation="vae_cli.maths.likelihoods.continuous_bernoulli:ContinuousBernoulli",
)
