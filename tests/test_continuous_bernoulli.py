"""likelihood=continuous_bernoulli (Loaiza-Ganem & Cunningham 2019): a density of grey levels on [0, 1],
checked against numerical integration, and run by every objective and estimator like any likelihood."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TINY, compose_config, evaluate_images, vae_train

from vae_cli.maths.likelihoods import continuous_bernoulli as cb
from vae_cli.maths.likelihoods import likelihood_spec
from vae_cli.maths.models import build_model
from vae_cli.maths.objectives import OBJECTIVES
from vae_cli.maths.spec import ModelSpec
from vae_cli.run.config import model_spec, objective_options
from vae_cli.run.keys import EvalConfig

ETAS = torch.tensor(
    [-60.0, -8.0, -1.0, -0.3001, -0.2999, -0.01, 0.0, 1e-7, 0.05, 0.3, 0.7, 3.0, 25.0], dtype=torch.float64
)
GRID = 200_000  # midpoints on [0, 1]


def grid() -> torch.Tensor:
    return (torch.arange(GRID, dtype=torch.float64) + 0.5) / GRID


def density(eta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """p(x|eta) for every pair: (len(eta), len(x))."""
    eta = eta.unsqueeze(-1)
    return (x * eta - cb.softplus(eta) + cb.log_normalizer(eta)).exp()


def test_the_density_integrates_to_one_for_every_eta():
    integral = density(ETAS, grid()).mean(-1)
    torch.testing.assert_close(integral, torch.ones_like(integral), rtol=0, atol=1e-6)


def test_the_mean_is_the_integral_of_x_p_x_and_continuous_at_zero():
    x = grid()
    torch.testing.assert_close(cb.mean(ETAS), (density(ETAS, x) * x).mean(-1), rtol=0, atol=1e-6)
    assert cb.mean(torch.tensor(0.0)) == 0.5


def test_float32_matches_float64_on_both_sides_of_the_series():
    for fn in (cb.log_normalizer, cb.mean):
        torch.testing.assert_close(fn(ETAS.float()).double(), fn(ETAS), rtol=1e-6, atol=1e-6)


def test_samples_have_the_mean_and_stay_in_the_unit_interval():
    eta = torch.tensor([-40.0, -2.0, 0.0, 0.1, 2.0, 40.0, 200.0]).repeat(200_000, 1)
    x = cb.quantile(eta, torch.rand(eta.shape, generator=torch.Generator().manual_seed(0)))
    assert x.min() >= 0 and x.max() <= 1 and x.isfinite().all()
    torch.testing.assert_close(x.mean(0), cb.mean(eta[0]), rtol=0, atol=3e-3)


def test_initial_output_inverts_the_mean():
    means = torch.tensor([0.002, 0.1, 0.4999, 0.5, 0.73, 0.998])
    torch.testing.assert_close(cb.mean(cb.ContinuousBernoulli(None, 6).initial_output(means).double()).float(), means)


def test_shared_and_per_latent_log_likelihoods_agree():
    torch.manual_seed(0)
    model = build_model(
        ModelSpec(2, "mlp", likelihood_spec("continuous_bernoulli"), hidden=8, depth=1, activation="elu")
    )
    x, z = torch.rand(3, 784), torch.randn(5, 2)
    shared = model.log_px_given_shared_z(x, z)
    torch.testing.assert_close(shared, model.log_px_given_z(x, z.expand(3, 5, 2)), rtol=1e-5, atol=1e-3)
    assert model.decode(z).min() >= 0 and model.sample(4).max() <= 1


def test_the_mean_image_model_starts_at_the_mean_image():
    means = torch.rand(784) * 0.9 + 0.05
    model = build_model(ModelSpec(2, "linear", likelihood_spec("continuous_bernoulli")), pixel_means=means)
    with torch.no_grad():
        model.decoder.net.weight.zero_()
    torch.testing.assert_close(model.decode(torch.zeros(1, 2))[0], means, rtol=0, atol=1e-5)


GREY = ["likelihood=continuous_bernoulli", "data.binarization=none"]


def test_binary_images_are_refused_in_one_line():
    code, err, created = vae_train([*TINY, "likelihood=continuous_bernoulli"])
    assert code == 2 and err.count("\n") == 1 and "it models grey levels" in err and created == [], err


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_every_objective_trains_and_every_estimator_evaluates(objective):
    cfg = compose_config([*GREY, f"objective={objective}", "model=linear"])
    spec = model_spec(cfg)
    torch.manual_seed(0)
    model = build_model(spec, pixel_means=torch.full((784,), 0.3))
    x = torch.rand(6, 784, generator=torch.Generator().manual_seed(1))
    loss = OBJECTIVES[objective](model, x, 3, **objective_options(cfg)).loss
    loss.backward()
    assert loss.isfinite() and all(p.grad.isfinite().all() for p in model.parameters() if p.grad is not None)
    cfg_eval = EvalConfig(
        quadrature_points=1024, importance_k=16, iwae_k=4, prior_mc_samples=64, ais=True, ais_steps=10, ais_chains=2
    )
    result = evaluate_images(model.eval(), spec, x, cfg_eval)
    names = set(result["estimates"])
    assert {"quadrature", "prior_mc", "ais"} <= names and ("importance" in names) == (spec.encoder is not None)
    for entry in result["estimates"].values():
        assert math.isfinite(entry["value"])
    assert abs(result["estimates"]["prior_mc"]["minus_log_px"]["value"]) < 5
