"""Bernoulli pixels: p(x|z) = prod_d Bern(x_d; sigmoid(l_d)), logits l = f(z), for binarized images.
Its implementation is the fused log-likelihood and gradient of kernels.Bernoulli."""

from __future__ import annotations

from dataclasses import dataclass

from vae_cli.maths import likelihoods


@dataclass
class BernoulliConfig:
    """p(x|z) = prod_d Bern(x_d; sigmoid(f_d(z))), for binarized images."""


UNIT = likelihoods.LikelihoodUnit(
    name="bernoulli",
    help="Bernoulli pixels, for binarized images",
    config=BernoulliConfig,
    pixels=likelihoods.BINARY,
    implementation="vae_cli.maths.likelihoods.kernels:Bernoulli",
)
