"""The gradient estimators of elbo and iwae (objective.gradient) against the formulas, on the linear-Gaussian
model: the same bound's value whatever the estimator, the decoder's gradient untouched, DReG's and STL's
(for the ELBO) encoder gradients unbiased, STL's under IWAE with several samples biased (Tucker et al. 2019)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from helpers import compose_config

from vae_cli.errors import ConfigError
from vae_cli.maths.likelihoods import likelihood_spec
from vae_cli.maths.models import build_model
from vae_cli.maths.objectives import OBJECTIVES
from vae_cli.maths.spec import ModelSpec
from vae_cli.run.config import validate

K, S, B = 2, 8, 2


pytestmark = pytest.mark.usefixtures("float64")  # exact comparisons (conftest.py)


def linear_gaussian() -> tuple[Any, torch.Tensor]:
    """A linear decoder with Gaussian pixels (sigma 1) and a linear encoder away from the posterior; two images from it."""
    torch.manual_seed(0)
    model = build_model(ModelSpec(K, "linear", likelihood_spec("gaussian", sigma=1.0), encoder="linear")).double()
    with torch.no_grad():
        model.encoder.logvar.fill_(math.log(0.3))  # sigma != 1: no term of the STL difference vanishes identically
    return model, model.sample(B, seed=1).double()


class FixedEncoder:
    """The model with q's mean and log-variance given per image (leaves): the gradient with respect to
    them is each image's own, so R replicates of a batch run as one batch of R x B images."""

    def __init__(self, model: Any, mu: torch.Tensor, logvar: torch.Tensor):
        self.model, self.mu, self.logvar = model, mu, logvar

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu, self.logvar

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def encoder_gradients(objective: str, gradient: str, R: int, n_samples: int = S, seed: int = 0) -> torch.Tensor:
    """(R, 2K): each replicate's gradient of its loss (the mean over the B images) with respect to the
    encoder's bias and log-variance, replicates drawn from `seed` (the same draws for every estimator)."""
    model, x = linear_gaussian()
    xs = x.repeat(R, 1)
    with torch.no_grad():
        mu, logvar = model.encode(xs)
    mu, logvar = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
    torch.manual_seed(seed)
    loss = OBJECTIVES[objective](FixedEncoder(model, mu, logvar), xs, n_samples, gradient=gradient).loss
    d_mu, d_logvar = torch.autograd.grad(loss * R, (mu, logvar))  # loss * R: the sum of the replicates' losses
    return torch.cat([d_mu.view(R, B, K).sum(1), d_logvar.view(R, B, K).sum(1)], -1)


def paired_z(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The mean of a - b over the replicates in units of its standard error, per coordinate."""
    d = a - b
    return d.mean(0) / (d.std(0) / math.sqrt(len(d)))


def test_the_replicates_gradients_are_those_of_the_parameters():
    model, x = linear_gaussian()
    torch.manual_seed(0)
    loss = OBJECTIVES["iwae"](model, x, S, gradient="dreg").loss
    direct = torch.cat([g.flatten() for g in torch.autograd.grad(loss, (model.encoder.net.bias, model.encoder.logvar))])
    assert torch.allclose(encoder_gradients("iwae", "dreg", 1)[0], direct, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("objective", "gradient"), [("iwae", "stl"), ("iwae", "dreg"), ("elbo", "stl")])
def test_the_same_bound_and_the_same_decoder_gradient_whatever_the_estimator(objective, gradient):
    model, x = linear_gaussian()
    decoder = list(model.decoder.parameters())
    results = []
    for g in ("standard", gradient):
        torch.manual_seed(3)
        out = OBJECTIVES[objective](model, x, S, gradient=g)
        results.append((out, torch.autograd.grad(out.loss, decoder + list(model.encoder.parameters()))))
    (standard, g_standard), (other, g_other) = results
    assert torch.allclose(standard.loss, other.loss, rtol=1e-12) and standard.terms.keys() == other.terms.keys()
    assert all(torch.allclose(standard.terms[t], other.terms[t], rtol=1e-12) for t in standard.terms)
    for a, b in zip(g_standard[: len(decoder)], g_other[: len(decoder)]):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)  # the decoder's gradient is the standard one
    assert not all(torch.allclose(a, b) for a, b in zip(g_standard[len(decoder) :], g_other[len(decoder) :]))


R = 4000  # replicates: stderr of a mean gradient coordinate about 1.5% of its sd


def test_dreg_is_unbiased_for_iwae_and_has_less_variance():
    standard, dreg = encoder_gradients("iwae", "standard", R), encoder_gradients("iwae", "dreg", R)
    z = paired_z(dreg, standard)
    assert z.abs().max() < 4.5, z  # the same expectation (Tucker et al. 2019, eq. 5)
    assert (dreg.std(0) < standard.std(0)).all()  # the score term's variance is gone


def test_stl_is_unbiased_for_the_elbo():
    standard, stl = (
        encoder_gradients("elbo", "standard", R, n_samples=2),
        encoder_gradients("elbo", "stl", R, n_samples=2),
    )
    z = paired_z(stl, standard)
    assert (stl - standard).std(0).min() > 1e-6  # a real difference per draw, not round-off
    assert z.abs().max() < 4.5, z


def test_stl_is_biased_for_iwae_beyond_one_sample():
    standard, stl = encoder_gradients("iwae", "standard", R), encoder_gradients("iwae", "stl", R)
    z = paired_z(stl, standard)
    bias = (stl - standard).mean(0)
    size = bias.norm() / standard.mean(0).norm()
    print(f"STL under IWAE, S={S}: bias {bias.tolist()}, |bias| / |E gradient| = {size:.3f}, z = {z.tolist()}")
    assert z.abs().max() > 8 and size > 0.02
    at_one = paired_z(
        encoder_gradients("iwae", "stl", R, n_samples=1), encoder_gradients("iwae", "standard", R, n_samples=1)
    )
    assert at_one.abs().max() < 4.5  # at S = 1 it is the ELBO's STL: unbiased


def test_the_key_is_checked_before_any_work():
    assert compose_config(["objective=iwae", "objective.gradient=dreg"]).objective.gradient == "dreg"
    assert compose_config(["objective=elbo", "objective.gradient=stl"]).objective.gradient == "stl"
    with pytest.raises(ConfigError, match="objective.gradient='dreg' with objective=elbo"):
        validate(compose_config(["objective=elbo", "objective.gradient=dreg"]))
    with pytest.raises(ConfigError, match="objective.gradient"):
        validate(compose_config(["objective=iwae", "objective.gradient=reinforce"]))
