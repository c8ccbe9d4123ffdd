"""Each objective's math on tiny tensors against direct formulas."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from vae_cli.maths.densities import (
    diagonal_normal_log_prob,
    kl_to_standard_normal,
    log_mean_exp,
    standard_normal_log_prob,
)
from vae_cli.maths.likelihoods.kernels import Bernoulli as BernoulliPixels
from vae_cli.maths.likelihoods.kernels import bernoulli_log_likelihood
from vae_cli.maths.models import Decoder, Encoder, LatentVariableModel
from vae_cli.maths.objectives import OBJECTIVES
from vae_cli.run.keys import schema_of

pytestmark = pytest.mark.usefixtures("float64")  # exact comparisons (conftest.py)


def tiny_model(K: int = 2, encoder: bool = True) -> LatentVariableModel:
    torch.manual_seed(0)
    return LatentVariableModel(
        K, Decoder(K, 8, 2, "elu"), BernoulliPixels(), Encoder(K, 8, 2, "elu") if encoder else None
    )


OPTIONS = {
    "jensen": {"shared_samples": False},
    "prior_iwae": {"shared_samples": False},
    "exact": {"grid_points": 16, "half_width": 6.0},
}


def tiny_batch(B: int = 5) -> torch.Tensor:
    return torch.bernoulli(torch.full((B, 784), 0.3), generator=torch.Generator().manual_seed(1)).double()


def test_every_objective_unit_is_an_option_of_the_schema_with_its_own_keys():
    for name, objective in OBJECTIVES.items():
        fields = {f.name for f in dataclasses.fields(schema_of("objective", name))}
        assert fields == {"name"} | {f.name for f in dataclasses.fields(objective.config)}, name
        assert objective.help and objective.loss and objective.name == name


def test_bernoulli_log_likelihood_matches_torch_distributions():
    x, logits = tiny_batch(3), torch.randn(3, 4, 784) * 3
    expected = Bernoulli(logits=logits).log_prob(x.unsqueeze(1)).sum(-1)
    torch.testing.assert_close(bernoulli_log_likelihood(x, logits), expected)


def test_closed_form_kl_matches_kl_divergence():
    mu, logvar = torch.randn(4, 3), torch.randn(4, 3)
    q, p = Normal(mu, torch.exp(0.5 * logvar)), Normal(torch.zeros(4, 3), torch.ones(4, 3))
    torch.testing.assert_close(kl_to_standard_normal(mu, logvar), kl_divergence(q, p))


def test_normal_log_densities_match_torch_distributions():
    z, mu, logvar = torch.randn(4, 6, 3), torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(standard_normal_log_prob(z), Normal(0.0, 1.0).log_prob(z).sum(-1))
    q = Normal(mu.unsqueeze(1), torch.exp(0.5 * logvar).unsqueeze(1))
    torch.testing.assert_close(diagonal_normal_log_prob(z, mu, logvar), q.log_prob(z).sum(-1))


def test_jensen_is_minus_mean_log_likelihood_of_prior_samples():
    model, x = tiny_model(encoder=False), tiny_batch()
    torch.manual_seed(3)
    out = OBJECTIVES["jensen"](model, x, 7, shared_samples=False)
    torch.manual_seed(3)
    z = torch.randn(5, 7, 2)
    log_px_z = Bernoulli(logits=model.decoder(z)).log_prob(x.unsqueeze(1)).sum(-1)
    torch.testing.assert_close(out.loss, -log_px_z.mean())
    torch.testing.assert_close(out.terms["lme"], -(torch.logsumexp(log_px_z, 1) - math.log(7)).mean())


def test_prior_iwae_with_one_sample_equals_jensen():
    model, x = tiny_model(encoder=False), tiny_batch()
    torch.manual_seed(4)
    jensen = OBJECTIVES["jensen"](model, x, 1, shared_samples=False).loss
    torch.manual_seed(4)
    prior_iwae = OBJECTIVES["prior_iwae"](model, x, 1, shared_samples=False).loss
    torch.testing.assert_close(prior_iwae, jensen)


def test_prior_iwae_is_a_tighter_bound_than_jensen_on_the_same_samples():
    out = OBJECTIVES["prior_iwae"](tiny_model(encoder=False), tiny_batch(), 16, shared_samples=False)
    assert out.loss <= out.terms["jensen"]  # log-mean-exp >= mean (Jensen's inequality)


def test_log_mean_exp_stays_finite_where_the_naive_mean_underflows():
    t = torch.tensor([[-1000.0, -1001.0, -1002.0]])
    naive = torch.log(torch.exp(t).mean(-1))
    assert torch.isinf(naive).all()
    expected = -1000.0 + math.log((1 + math.exp(-1) + math.exp(-2)) / 3)
    torch.testing.assert_close(log_mean_exp(t), torch.tensor([expected]))


def test_elbo_is_reconstruction_plus_closed_form_kl():
    model, x = tiny_model(), tiny_batch()
    torch.manual_seed(5)
    out = OBJECTIVES["elbo"](model, x, 3)
    mu, logvar = model.encode(x)
    torch.manual_seed(5)
    z = mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * torch.randn(5, 3, 2)
    recon = -Bernoulli(logits=model.decoder(z)).log_prob(x.unsqueeze(1)).sum(-1).mean()
    kl = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(-1).mean()
    torch.testing.assert_close(out.terms["recon"], recon)
    torch.testing.assert_close(out.terms["kl"], kl)
    torch.testing.assert_close(out.loss, recon + kl)


def test_iwae_is_minus_log_mean_importance_weight():
    model, x = tiny_model(), tiny_batch()
    torch.manual_seed(6)
    out = OBJECTIVES["iwae"](model, x, 9)
    mu, logvar = model.encode(x)
    torch.manual_seed(6)
    q = Normal(mu.unsqueeze(1), torch.exp(0.5 * logvar).unsqueeze(1))
    z = mu.unsqueeze(1) + q.scale * torch.randn(5, 9, 2)
    log_w = (
        Bernoulli(logits=model.decoder(z)).log_prob(x.unsqueeze(1)).sum(-1)
        + Normal(0.0, 1.0).log_prob(z).sum(-1)
        - q.log_prob(z).sum(-1)
    )
    torch.testing.assert_close(out.loss, -(torch.logsumexp(log_w, 1) - math.log(9)).mean())


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_gives_finite_gradients_to_every_parameter(name):
    model = tiny_model(encoder=OBJECTIVES[name].uses_encoder)
    OBJECTIVES[name](model, tiny_batch(), 4, **OPTIONS.get(name, {})).loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
