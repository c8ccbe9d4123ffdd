"""The estimators of log p(x) against exact values: a decoder that ignores z (log p(x) in
closed form) and a 2-D model whose posterior a very fine grid resolves (ground truth)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import elbo_bound, iwae_bound, jensen_bound, log_px_importance, log_px_quadrature, prior_sums
from torch import nn

from vae_cli.maths.densities import quadrature_grid
from vae_cli.maths.estimators import importance_sums, weighted_sums
from vae_cli.maths.likelihoods.kernels import Bernoulli as BernoulliPixels
from vae_cli.maths.likelihoods.kernels import bernoulli_log_likelihood, bernoulli_log_likelihood_shared
from vae_cli.maths.models import Decoder, Encoder, LatentVariableModel

K = 2
N_IMAGES = 12
TRUTH_POINTS = 200  # per dimension: spacing 0.06, under half the narrowest posterior sd


def linear_model(encoder_targets: torch.Tensor | None = None, x: torch.Tensor | None = None) -> LatentVariableModel:
    """logits = A z + b with A ~ N(0, 0.5^2): posterior sds of about 0.1-0.3. The encoder is one
    linear layer fitted exactly (x has full row rank) to give `encoder_targets` (mu, logvar) on x."""
    g = torch.Generator().manual_seed(0)
    decoder = Decoder(K, 1, 1, "elu")
    decoder.net = nn.Sequential(nn.Linear(K, 784))
    with torch.no_grad():
        decoder.net[0].weight.copy_(0.5 * torch.randn(784, K, generator=g))
        decoder.net[0].bias.copy_(torch.randn(784, generator=g))
    encoder = Encoder(K, 1, 1, "elu")
    encoder.net = nn.Sequential(nn.Linear(784, 2 * K))
    if encoder_targets is not None:
        with torch.no_grad():
            encoder.net[0].weight.copy_((torch.linalg.pinv(x.double()) @ encoder_targets.double()).T)
            encoder.net[0].bias.zero_()
    return LatentVariableModel(K, decoder, BernoulliPixels(), encoder).eval()


@pytest.fixture(scope="module")
def small():
    """(model, x, truth): images drawn from the linear model, q(z|x) the Gaussian with the exact
    posterior's means and 1.2x its sds, truth log p(x) from a 200^2 grid."""
    model = linear_model()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        z = torch.randn(N_IMAGES, K, generator=g)
        x = torch.bernoulli(torch.sigmoid(model.decoder(z)), generator=g)
        grid, log_w = quadrature_grid(K, TRUTH_POINTS, 6.0)
        log_joint = bernoulli_log_likelihood_shared(x, model.decoder(grid)) + log_w
        truth = torch.logsumexp(log_joint.double(), -1)
        posterior = torch.softmax(log_joint.double(), -1)
        mean = posterior @ grid.double()
        var = posterior @ grid.double().pow(2) - mean.pow(2)
    targets = torch.cat([mean, torch.log(1.44 * var)], -1)
    model = linear_model(targets, x)
    with torch.no_grad():
        mu, logvar = model.encode(x)
    torch.testing.assert_close(mu.double(), mean, atol=1e-3, rtol=0)
    return model, x, truth


def mean_error(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    return (estimate.double() - truth).mean().item()


# --- the pieces -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2])
def test_quadrature_grid_is_a_normalized_prior(dims):
    z, log_w = quadrature_grid(dims, 64, 6.0)
    w = log_w.double().exp()
    assert z.shape == (64**dims, dims) and z.abs().max() < 6
    assert w.sum().item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(w @ z.double(), torch.zeros(dims, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(w @ z.double().pow(2), torch.ones(dims, dtype=torch.float64), atol=1e-5, rtol=0)


def test_shared_log_likelihood_is_the_bernoulli_log_likelihood():
    g = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.full((5, 784), 0.3), generator=g)
    logits = 3 * torch.randn(7, 784, generator=g)
    expected = bernoulli_log_likelihood(x, logits.expand(5, 7, 784))
    torch.testing.assert_close(bernoulli_log_likelihood_shared(x, logits), expected, rtol=1e-5, atol=1e-3)


def test_chunking_is_exact(small):
    model, x, _ = small
    with torch.no_grad():
        z, log_w = quadrature_grid(K, 40, 6.0)
        whole = weighted_sums(model, x, z, log_w, batch_size=len(x), chunk_elements=1 << 30)
        chunked = weighted_sums(model, x, z, log_w, batch_size=5, chunk_elements=5000)  # 6 points per chunk
        torch.testing.assert_close(chunked.log_px, whole.log_px, rtol=0, atol=1e-4)
        torch.testing.assert_close(chunked.jensen, whole.jensen, rtol=0, atol=1e-3)
        one = importance_sums(model, x, 50, 10, 0, batch_size=len(x), chunk_elements=1 << 30)
        many = importance_sums(model, x, 50, 10, 0, batch_size=5, chunk_elements=784 * 5 * 3)  # 3 draws per chunk
        for name in ("log_px", "elbo", "iwae"):
            torch.testing.assert_close(getattr(many, name), getattr(one, name), rtol=0, atol=1e-4)


# --- a decoder that ignores z: every estimator and bound is the factorized Bernoulli likelihood -----


def test_decoder_ignoring_z_gives_the_exact_likelihood_everywhere():
    model = linear_model()
    with torch.no_grad():
        model.decoder.net[0].weight.zero_()  # logits = b whatever z is
        model.encoder.net[0].weight.zero_()  # q(z|x) = N(0, I) = p(z): every weight is exactly p(x)
        model.encoder.net[0].bias.zero_()
        x = torch.bernoulli(torch.full((6, 784), 0.3), generator=torch.Generator().manual_seed(2))
        b = model.decoder.net[0].bias
        exact = (x @ b - nn.functional.softplus(b).sum()).double()
        g = torch.Generator().manual_seed(0)
        for estimate in (
            log_px_quadrature(model, x, 32),
            log_px_importance(model, x, 20),
            prior_sums(model, x, 50, g).log_px,
            jensen_bound(model, x, points_per_dim=32),
            jensen_bound(model, x, n_samples=50, generator=g),
            elbo_bound(model, x, 20),
            iwae_bound(model, x, 5, n_repeats=4),
        ):
            torch.testing.assert_close(estimate.double(), exact, rtol=0, atol=1e-3)


# --- a 2-D model whose posterior a fine grid resolves ---------------------------------------------


def test_quadrature_converges_to_the_fine_grid(small):
    model, x, truth = small
    with torch.no_grad():
        errors = [abs(mean_error(log_px_quadrature(model, x, n), truth)) for n in (16, 32, 64, 128)]
    assert errors[0] > 0.1  # a 0.75 spacing does not resolve posteriors this narrow,
    assert 1e-4 < errors[1] < errors[0] / 10  # 0.375 nearly does,
    assert max(errors[2:]) < 1e-4  # and 0.19 and 0.09 agree with the fine grid to float32 precision


def test_importance_sampling_converges(small):
    model, x, truth = small
    with torch.no_grad():
        errors = [mean_error(log_px_importance(model, x, k), truth) for k in (1, 30, 3000)]
    assert errors[0] < -0.05  # one draw is a single-sample ELBO: clearly low
    # Past a few draws the bias (about Var(w)/2k) is below the Monte Carlo noise: no strict order.
    assert abs(errors[1]) < abs(errors[0]) / 3
    assert abs(errors[2]) < abs(errors[0]) / 10 and abs(errors[2]) < 0.01


def test_prior_monte_carlo_converges(small):
    model, x, truth = small
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        errors = [mean_error(prior_sums(model, x, S, g).log_px, truth) for S in (10, 300, 30000)]
    assert errors[0] < -1  # ten prior draws rarely land where p(z|x) is
    assert [abs(e) for e in errors] == sorted((abs(e) for e in errors), reverse=True)
    assert abs(errors[-1]) < 0.05


def test_bounds_are_ordered_below_log_px(small):
    model, x, truth = small
    with torch.no_grad():
        jensen = jensen_bound(model, x, points_per_dim=128).mean().item()
        elbo = elbo_bound(model, x, 1000).mean().item()
        iwae = [iwae_bound(model, x, k, n_repeats=256 // k).mean().item() for k in (1, 4, 16, 64, 256)]
    log_px = truth.mean().item()
    assert jensen < elbo < iwae[-1] < log_px + 0.02  # iwae_256 is within Monte Carlo noise of log p(x) here
    assert iwae == sorted(iwae)  # groups of 4k draws are nested in groups of k: monotone for every draw
    assert iwae[0] == pytest.approx(elbo, abs=0.1)  # IWAE-1 is the ELBO with the KL sampled
    assert log_px - jensen > 10 * (log_px - elbo)  # the prior is a far worse proposal than q(z|x)
    assert math.isfinite(jensen)
