"""q*(z|x), each image's best diagonal Gaussian: the optimizer against the closed form of a
linear-Gaussian model, and gap_elbo = gap_approximation + gap_amortization in the evaluation."""

import math

import pytest
import torch
from helpers import images_of, mlp_spec
from omegaconf import OmegaConf

from vae_cli.maths import qstar
from vae_cli.maths.likelihoods import likelihood_spec
from vae_cli.maths.models import build_model
from vae_cli.maths.spec import ModelSpec
from vae_cli.run.keys import EvalConfig
from vae_cli.stages.evaluation import evaluate, format_table

SIGMA = 0.27  # the trained K=2 linear model: posteriors about 0.01 wide


def sharp_linear_model(K: int, n: int, seed: int = 0):
    """A linear-Gaussian model with sharp posteriors and n images drawn from it."""
    torch.manual_seed(seed)
    spec = ModelSpec(K, "linear", likelihood_spec("gaussian", sigma=None, per_pixel=False, sigma_min=1e-3))
    model = build_model(spec, pixel_sd=torch.full((784,), SIGMA)).eval()
    with torch.no_grad():
        model.decoder.net.weight.mul_(3.0)
        x = model.decoder(torch.randn(n, K)) + SIGMA * torch.randn(n, 784)
    return model, spec, x


@pytest.mark.parametrize("K", [2, 50])
def test_the_optimizer_finds_the_closed_form_q_star_within_a_hundredth_of_a_nat(K):
    model, _, x = sharp_linear_model(K, 4)
    lg = model.linear_gaussian()
    mean, logvar = qstar.closed_form(lg, x)
    best = lg.elbo(x, mean, logvar)
    sd = torch.exp(0.5 * logvar)
    start = (mean + 2 * sd * torch.randn_like(mean), logvar + 1)  # an encoder's miss: 2 sd off, e times too wide
    fit = qstar.optimize(model, x, *start, seed=0, first=0)
    deficit = best - lg.elbo(x, fit.mean, fit.logvar)
    assert bool((deficit >= -1e-9).all()) and float(deficit.max()) < 0.01, deficit


def test_the_closed_form_is_the_best_diagonal_gaussian():
    model, _, x = sharp_linear_model(3, 5)
    lg = model.linear_gaussian()
    mean, logvar = qstar.closed_form(lg, x)
    best = lg.elbo(x, mean, logvar)
    for d_mean, d_logvar in ((0.01, 0), (-0.01, 0), (0, 0.05), (0, -0.05)):
        assert bool((lg.elbo(x, mean + d_mean, logvar + d_logvar) < best).all())


def test_each_image_gets_the_same_q_star_in_any_batch():
    torch.manual_seed(0)
    model = build_model(mlp_spec(2, hidden=16, depth=1, encoder=True)).eval()
    x = torch.rand(3, 784).round()
    with torch.no_grad():
        mean, logvar = model.encode(x)
    together = qstar.optimize(model, x, mean, logvar, seed=1, first=0, steps=20)
    alone = qstar.optimize(model, x[2:], mean[2:], logvar[2:], seed=1, first=2, steps=20)
    # the same draws and steps; float32 matrix products of another batch size round differently
    torch.testing.assert_close(together.mean[2:], alone.mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(together.logvar[2:], alone.logvar, rtol=1e-4, atol=1e-4)


CHEAP = dict(quadrature_points=1024, importance_k=128, iwae_k=16, prior_mc_samples=256, ais=False, qstar_n_images=6)


def evaluated(model, spec, x, **settings):
    result, per_image = evaluate(model, spec, images_of(x), OmegaConf.structured(EvalConfig(**{**CHEAP, **settings})))
    return result, per_image


def test_gap_elbo_is_the_approximation_gap_plus_the_amortization_gap():
    torch.manual_seed(0)
    spec = mlp_spec(2, hidden=16, depth=1, encoder=True)
    model = build_model(spec)
    x = torch.rand(10, 784).round()
    result, per_image = evaluated(model, spec, x)
    assert result["gap_approximation_n_images"] == result["gap_amortization_n_images"] == 6
    total = result["gap_approximation"] + result["gap_amortization"]
    assert total == pytest.approx(result["gap_elbo_same_images"], abs=1e-9)
    # an untrained encoder is far from each image's q*; q* is still a diagonal Gaussian, so below log p(x)
    assert result["gap_amortization"] > 0 and result["gap_approximation"] > -0.05
    assert result["gap_amortization_negative_images"] == 0
    assert len(per_image["qstar"]) == len(per_image["qstar.change"]) == 6
    table = format_table(result)
    assert "gap_approximation" in table and "gap_amortization" in table and "= gap_elbo" in table


def test_a_linear_model_s_q_star_is_its_closed_form_and_the_optimizer_is_checked_against_it():
    model, spec, x = sharp_linear_model(2, 8)
    spec = ModelSpec(2, "linear", spec.likelihood, encoder="linear")
    encoder_model = build_model(spec, pixel_sd=torch.full((784,), SIGMA)).eval()
    encoder_model.decoder.load_state_dict(model.decoder.state_dict())
    encoder_model.likelihood.load_state_dict(model.likelihood.state_dict())
    result, per_image = evaluated(encoder_model, spec, x)
    entry = result["estimates"]["qstar"]
    assert result["estimator"] == "closed_form" and entry["optimizer_vs_closed_form"]["max"] < 0.01
    total = result["gap_approximation"] + result["gap_amortization"]
    assert total == pytest.approx(result["gap_elbo_same_images"], abs=1e-9)
    assert result["gap_amortization"] > 0 and result["gap_approximation"] > 0  # exact: both KLs


def test_an_encoder_free_model_has_an_approximation_gap_and_no_amortization_gap():
    torch.manual_seed(0)
    spec = mlp_spec(2, hidden=16, depth=1)
    model = build_model(spec)
    result, _ = evaluated(model, spec, torch.rand(8, 784).round())
    assert math.isfinite(result["gap_approximation"]) and result["gap_approximation"] > -0.05
    assert result["gap_amortization"] is None and "no encoder" in result["gap_amortization_note"]
    assert "no encoder" in format_table(result)
