"""vae_cli.maths.linear_gaussian: the closed forms of pPCA / factor analysis against dense, quadrature and
Monte Carlo references written here independently (float64 throughout)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from vae_cli.maths import linear_gaussian as lg
from vae_cli.maths.linear_gaussian import (
    LinearGaussian,
    elbo,
    fit_ppca,
    gap_elbo,
    gap_jensen,
    jensen_bound,
    log_px,
    posterior,
    sample_posterior,
)

F64 = torch.float64
SIGMAS = ["shared", "per_pixel"]


def make_model(D: int, K: int, sigma_kind: str, seed: int = 0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    W = scale * torch.randn(D, K, generator=g, dtype=F64)
    b = torch.randn(D, generator=g, dtype=F64)
    if sigma_kind == "shared":
        sigma = 0.7
    else:
        sigma = 0.5 + 0.5 * torch.rand(D, generator=g, dtype=F64)
    return W, b, sigma


def draw_x(W, b, sigma, N: int, seed: int = 1) -> torch.Tensor:
    """Images from the model itself, so that their posteriors sit well inside the quadrature grids."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, W.shape[1], generator=g, dtype=F64)
    return z @ W.T + b + torch.as_tensor(sigma, dtype=F64) * torch.randn(N, W.shape[0], generator=g, dtype=F64)


def psi_diag(sigma, D: int) -> torch.Tensor:
    return (torch.as_tensor(sigma, dtype=F64) ** 2).expand(D)


def dense_log_px(W, b, sigma, x) -> torch.Tensor:
    W, b, x = W.double(), b.double(), x.double()
    C = W @ W.T + torch.diag(psi_diag(sigma, W.shape[0]))
    return MultivariateNormal(b, covariance_matrix=C).log_prob(x)


def log_lik(W, b, sigma, x, z) -> torch.Tensor:
    """log p(x | z) for one image x (D,) and many z (S, K), written out by hand."""
    var = psi_diag(sigma, W.shape[0])
    r = x - z @ W.T - b
    return -0.5 * (W.shape[0] * math.log(2 * math.pi) + var.log().sum() + (r**2 / var).sum(-1))


def log_std_normal(z) -> torch.Tensor:
    return -0.5 * (z.shape[-1] * math.log(2 * math.pi) + (z**2).sum(-1))


def midpoint_grid(K: int, n: int, width: float = 8.0) -> tuple[torch.Tensor, float]:
    h = 2 * width / n
    axis = -width + h * (torch.arange(n, dtype=F64) + 0.5)
    z = torch.cartesian_prod(*[axis] * K).reshape(-1, K)
    return z, K * math.log(h)


def quadrature(W, b, sigma, x, n: int):
    """log p(x), E[z | x] and Cov[z | x] by the midpoint rule over [-8, 8]^K, one image at a time."""
    z, log_cell = midpoint_grid(W.shape[1], n)
    log_joint_prior = log_std_normal(z) + log_cell
    logs, means, covs = [], [], []
    for xi in x:
        log_joint = log_lik(W, b, sigma, xi, z) + log_joint_prior
        lp = torch.logsumexp(log_joint, 0)
        w = (log_joint - lp).exp()
        mean = w @ z
        zc = z - mean
        logs.append(lp)
        means.append(mean)
        covs.append((zc * w[:, None]).T @ zc)
    return torch.stack(logs), torch.stack(means), torch.stack(covs)


# --- log p(x) ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_kind", SIGMAS)
@pytest.mark.parametrize("K", [2, 3])
def test_log_px_matches_a_dense_multivariate_normal(K, sigma_kind):
    W, b, sigma = make_model(6, K, sigma_kind)
    x = draw_x(W, b, sigma, 9) + torch.randn(9, 6, generator=torch.Generator().manual_seed(2), dtype=F64)
    got = log_px(W, b, sigma, x)
    assert got.shape == (9,) and got.dtype == F64
    torch.testing.assert_close(got, dense_log_px(W, b, sigma, x), rtol=0, atol=1e-9)


@pytest.mark.parametrize("sigma_kind", SIGMAS)
@pytest.mark.parametrize("K, n", [(1, 4000), (2, 600)])
def test_log_px_matches_quadrature_over_z(K, n, sigma_kind):
    W, b, sigma = make_model(5, K, sigma_kind, seed=3)
    x = draw_x(W, b, sigma, 3, seed=4)
    want, _, _ = quadrature(W, b, sigma, x, n)
    torch.testing.assert_close(log_px(W, b, sigma, x), want, rtol=0, atol=1e-4)


def test_the_forms_of_a_shared_sigma_agree_and_a_vector_of_equal_sigmas_is_the_same_model():
    W, b, _ = make_model(6, 2, "shared")
    x = draw_x(W, b, 0.7, 5)
    want = dense_log_px(W, b, 0.7, x)
    for sigma in [
        0.7,
        torch.tensor(0.7, dtype=F64),
        torch.tensor([0.7], dtype=F64),
        torch.full((6,), 0.7, dtype=F64),
        -0.7,
    ]:
        torch.testing.assert_close(log_px(W, b, sigma, x), want, rtol=0, atol=1e-9)
        torch.testing.assert_close(posterior(W, b, sigma, x)[0], posterior(W, b, 0.7, x)[0], rtol=0, atol=1e-12)


def test_log_px_at_mnist_size_matches_a_dense_normal_and_returns_float64_for_float32_inputs():
    D, K, N = 784, 100, 200
    g = torch.Generator().manual_seed(5)
    W = (0.1 * torch.randn(D, K, generator=g)).float()
    b = torch.rand(D, generator=g).float()
    sigma = (0.3 + 0.7 * torch.rand(D, generator=g)).float()
    x = torch.rand(N, D, generator=g).float()
    got = log_px(W, b, sigma, x)
    assert got.shape == (N,) and got.dtype == F64 and bool(got.isfinite().all())
    torch.testing.assert_close(got[:3], dense_log_px(W, b, sigma.double(), x[:3]), rtol=1e-6, atol=0)


def test_chunking_over_images_changes_nothing(monkeypatch):
    W, b, sigma = make_model(6, 3, "per_pixel")
    x = draw_x(W, b, sigma, 7)
    g = torch.Generator().manual_seed(6)
    q_mean, q_logvar = torch.randn(7, 3, generator=g, dtype=F64), 0.3 * torch.randn(7, 3, generator=g, dtype=F64)

    def everything():
        return [
            log_px(W, b, sigma, x),
            posterior(W, b, sigma, x)[0],
            jensen_bound(W, b, sigma, x),
            gap_jensen(W, b, sigma, x),
            elbo(W, b, sigma, x, q_mean, q_logvar),
            gap_elbo(W, b, sigma, x, q_mean, q_logvar),
            sample_posterior(W, b, sigma, x, 4).shape,
        ]

    whole = everything()
    monkeypatch.setattr(lg, "CHUNK_ROWS", 3)
    chunked = everything()
    for a, c in zip(whole[:-1], chunked[:-1]):
        torch.testing.assert_close(c, a, rtol=0, atol=1e-12)
    assert chunked[-1] == whole[-1] == (7, 4, 3)


# --- the posterior -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_kind", SIGMAS)
def test_posterior_matches_the_quadrature_posteriors_moments(sigma_kind):
    W, b, sigma = make_model(5, 2, sigma_kind, seed=7)
    x = draw_x(W, b, sigma, 3, seed=8)
    _, want_mean, want_cov = quadrature(W, b, sigma, x, 600)
    mean, cov = posterior(W, b, sigma, x)
    assert mean.shape == (3, 2) and cov.shape == (2, 2)
    torch.testing.assert_close(mean, want_mean, rtol=0, atol=1e-3)
    for c in want_cov:  # one covariance for every image
        torch.testing.assert_close(cov, c, rtol=0, atol=1e-3)


def test_sample_posterior_has_the_posteriors_mean_and_covariance():
    W, b, sigma = make_model(6, 3, "per_pixel", seed=9)
    x = draw_x(W, b, sigma, 2, seed=10)
    n = 100_000
    z = sample_posterior(W, b, sigma, x, n, generator=torch.Generator().manual_seed(11))
    assert z.shape == (2, n, 3) and z.dtype == F64
    mean, cov = posterior(W, b, sigma, x)
    se = (cov.diagonal() / n).sqrt()
    assert bool(((z.mean(1) - mean).abs() < 5 * se).all())
    for zi in z:
        torch.testing.assert_close(
            torch.cov(zi.T), cov, rtol=0, atol=5 * math.sqrt(2 / n) * cov.diagonal().max().item()
        )
    again = sample_posterior(W, b, sigma, x, n, generator=torch.Generator().manual_seed(11))
    assert torch.equal(again, z)


# --- Jensen's bound and the ELBO --------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_kind", SIGMAS)
def test_jensen_bound_matches_monte_carlo_over_the_prior_and_its_gap_is_log_px_minus_it(sigma_kind):
    W, b, sigma = make_model(6, 2, sigma_kind, seed=12)
    x = draw_x(W, b, sigma, 4, seed=13)
    S = 100_000
    z = torch.randn(S, 2, generator=torch.Generator().manual_seed(14), dtype=F64)
    got = jensen_bound(W, b, sigma, x)
    for xi, bound in zip(x, got):
        draws = log_lik(W, b, sigma, xi, z)
        assert abs(draws.mean() - bound) < 4 * draws.std() / math.sqrt(S)
    gap = gap_jensen(W, b, sigma, x)
    assert bool((gap > 0).all())
    torch.testing.assert_close(gap, log_px(W, b, sigma, x) - got, rtol=0, atol=1e-8)


def test_jensen_bound_with_shared_sigma_is_the_frobenius_norm_formula():
    W, b, sigma = make_model(6, 3, "shared", seed=15)
    x = draw_x(W, b, sigma, 4)
    log_normal = -0.5 * (6 * math.log(2 * math.pi * sigma**2) + ((x - b) ** 2).sum(1) / sigma**2)
    want = log_normal - (W**2).sum() / (2 * sigma**2)
    torch.testing.assert_close(jensen_bound(W, b, sigma, x), want, rtol=0, atol=1e-10)


def random_q(N: int, K: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return 0.5 * torch.randn(N, K, generator=g, dtype=F64), -1.0 + 0.5 * torch.randn(N, K, generator=g, dtype=F64)


@pytest.mark.parametrize("sigma_kind", SIGMAS)
def test_elbo_matches_monte_carlo_over_q_and_its_gap_is_log_px_minus_it(sigma_kind):
    W, b, sigma = make_model(6, 3, sigma_kind, seed=16)
    x = draw_x(W, b, sigma, 4, seed=17)
    q_mean, q_logvar = random_q(4, 3, seed=18)
    got = elbo(W, b, sigma, x, q_mean, q_logvar)
    S = 100_000
    eps = torch.randn(S, 3, generator=torch.Generator().manual_seed(19), dtype=F64)
    for xi, mu, logvar, bound in zip(x, q_mean, q_logvar, got):
        z = mu + (0.5 * logvar).exp() * eps
        log_q = (-0.5 * (math.log(2 * math.pi) + logvar + eps**2)).sum(-1)
        draws = log_lik(W, b, sigma, xi, z) + log_std_normal(z) - log_q
        assert abs(draws.mean() - bound) < 4 * draws.std() / math.sqrt(S)
    gap = gap_elbo(W, b, sigma, x, q_mean, q_logvar)
    assert bool((gap > 0).all())
    torch.testing.assert_close(gap, log_px(W, b, sigma, x) - got, rtol=0, atol=1e-8)


@pytest.mark.parametrize("sigma_kind", SIGMAS)
def test_the_elbo_is_tight_when_q_is_the_exact_posterior(sigma_kind):
    # W = Psi^{1/2} Q diag(c) with orthonormal Q makes W^T Psi^{-1} W = diag(c^2), so M and the posterior are diagonal
    D, K = 6, 3
    _, b, sigma = make_model(D, K, sigma_kind, seed=20)
    Q, _ = torch.linalg.qr(torch.randn(D, K, generator=torch.Generator().manual_seed(21), dtype=F64))
    W = psi_diag(sigma, D).sqrt()[:, None] * Q * torch.tensor([1.5, 0.7, 2.0], dtype=F64)
    x = draw_x(W, b, sigma, 5, seed=22)
    mean, cov = posterior(W, b, sigma, x)
    torch.testing.assert_close(cov, torch.diag(cov.diagonal()), rtol=0, atol=1e-12)
    q_logvar = cov.diagonal().log().expand(5, K)
    torch.testing.assert_close(gap_elbo(W, b, sigma, x, mean, q_logvar), torch.zeros(5, dtype=F64), rtol=0, atol=1e-10)
    torch.testing.assert_close(elbo(W, b, sigma, x, mean, q_logvar), log_px(W, b, sigma, x), rtol=0, atol=1e-9)


# --- the maximum-likelihood pPCA ---------------------------------------------------------------------------


def gradient_ascent_ppca(x, K: int, steps: int = 2000):
    """Maximise the dense mean log-likelihood over W, b, log sigma with Adam, from a random start."""
    g = torch.Generator().manual_seed(23)
    W = (0.5 * torch.randn(x.shape[1], K, generator=g, dtype=F64)).requires_grad_()
    b = torch.zeros(x.shape[1], dtype=F64, requires_grad=True)
    log_sigma = torch.zeros((), dtype=F64, requires_grad=True)
    opt = torch.optim.Adam([W, b, log_sigma], lr=0.03)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        loss = -dense_log_px(W, b, log_sigma.exp(), x).mean()
        loss.backward()
        opt.step()
        sched.step()
    return W.detach(), b.detach(), log_sigma.exp().detach()


@pytest.mark.slow
def test_fit_ppca_is_the_maximum_likelihood_and_agrees_with_gradient_ascent():
    D, K, N = 5, 2, 400
    g = torch.Generator().manual_seed(24)
    W_true = torch.randn(D, K, generator=g, dtype=F64)
    b_true = torch.randn(D, generator=g, dtype=F64)
    x = draw_x(W_true, b_true, 0.5, N, seed=25)

    W, b, sigma = fit_ppca(x, K)
    assert W.shape == (D, K) and b.shape == (D,) and sigma.shape == () and sigma.dtype == F64
    torch.testing.assert_close(b, x.mean(0), rtol=0, atol=1e-12)
    xc = x - x.mean(0)
    eigenvalues = torch.linalg.eigvalsh(xc.T @ xc / N)  # ascending
    assert sigma.item() ** 2 == pytest.approx(eigenvalues[: D - K].mean().item(), rel=1e-10)

    W_gd, b_gd, sigma_gd = gradient_ascent_ppca(x, K)
    best = dense_log_px(W, b, sigma, x).mean().item()
    best_gd = dense_log_px(W_gd, b_gd, sigma_gd, x).mean().item()
    assert best >= best_gd - 1e-4
    assert best == pytest.approx(best_gd, abs=1e-3)
    torch.testing.assert_close(W @ W.T, W_gd @ W_gd.T, rtol=0, atol=1e-5)  # W is unique only up to a rotation
    assert sigma.item() == pytest.approx(sigma_gd.item(), abs=1e-6)
    assert log_px(W, b, sigma, x).mean().item() == pytest.approx(best, abs=1e-10)

    # a maximum: the gradient of the mean log-likelihood vanishes there
    params = [t.clone().requires_grad_() for t in (W, b, sigma.log())]
    grads = torch.autograd.grad(dense_log_px(params[0], params[1], params[2].exp(), x).mean(), params)
    for grad in grads:
        torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-8)


def test_fit_ppca_at_k_at_or_above_the_data_rank_stays_finite():
    g = torch.Generator().manual_seed(26)
    x = torch.randn(50, 2, generator=g, dtype=F64) @ torch.randn(2, 5, generator=g, dtype=F64)  # rank 2 in D = 5
    W, b, sigma = fit_ppca(x, 3)
    assert bool(W.isfinite().all()) and 0 < sigma.item() < 1e-5
    xc = x - x.mean(0)
    torch.testing.assert_close(W @ W.T, xc.T @ xc / 50, rtol=0, atol=1e-8)  # W W^T + sigma^2 I reproduces S
    assert bool(log_px(W, b, sigma, x).isfinite().all())


@pytest.mark.parametrize("K", [0, -1, 5, 6, 2.0, True])
def test_fit_ppca_requires_1_le_k_lt_d(K):
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(27), dtype=F64)
    with pytest.raises(ValueError, match="K"):
        fit_ppca(x, K)


def test_fit_ppca_rejects_data_without_variance():
    with pytest.raises(ValueError, match="variance"):
        fit_ppca(torch.ones(10, 4), 2)


# --- the dataclass and the input checks --------------------------------------------------------------------


def test_linear_gaussian_delegates_to_the_functions_and_is_frozen():
    W, b, sigma = make_model(6, 2, "per_pixel", seed=28)
    x = draw_x(W, b, sigma, 4)
    q_mean, q_logvar = random_q(4, 2, seed=29)
    model = LinearGaussian(W, b, sigma)
    torch.testing.assert_close(model.log_px(x), log_px(W, b, sigma, x), rtol=0, atol=0)
    for got, want in zip(model.posterior(x), posterior(W, b, sigma, x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(model.jensen_bound(x), jensen_bound(W, b, sigma, x), rtol=0, atol=0)
    torch.testing.assert_close(model.gap_jensen(x), gap_jensen(W, b, sigma, x), rtol=0, atol=0)
    torch.testing.assert_close(model.elbo(x, q_mean, q_logvar), elbo(W, b, sigma, x, q_mean, q_logvar), rtol=0, atol=0)
    torch.testing.assert_close(
        model.gap_elbo(x, q_mean, q_logvar), gap_elbo(W, b, sigma, x, q_mean, q_logvar), rtol=0, atol=0
    )
    torch.testing.assert_close(
        model.sample_posterior(x, 5, generator=torch.Generator().manual_seed(30)),
        sample_posterior(W, b, sigma, x, 5, generator=torch.Generator().manual_seed(30)),
        rtol=0,
        atol=0,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.sigma = 1.0

    fitted = LinearGaussian.fit_ppca(x, 2)
    for got, want in zip((fitted.W, fitted.b, fitted.sigma), fit_ppca(x, 2)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_shapes_that_do_not_fit_are_value_errors():
    W, b, sigma = make_model(6, 2, "per_pixel")
    x = draw_x(W, b, sigma, 4)
    q = torch.zeros(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="x must be"):
        log_px(W, b, sigma, x[:, :5])
    with pytest.raises(ValueError, match="b must be"):
        log_px(W, b[:5], sigma, x)
    with pytest.raises(ValueError, match="sigma must be"):
        log_px(W, b, sigma[:5], x)
    with pytest.raises(ValueError, match="sigma must be"):
        log_px(W, b, 0.0, x)
    with pytest.raises(ValueError, match="q_mean"):
        elbo(W, b, sigma, x, q[:3], q[:3])
