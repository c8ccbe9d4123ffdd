"""The linear-Gaussian latent-variable model (probabilistic PCA, factor analysis), in closed form.

    p(z) = N(0, I_K),   p(x | z) = N(W z + b, Psi),   Psi = diag(sigma^2),

with sigma a scalar (shared: pPCA, Tipping & Bishop 1999) or a (D,) vector (one per pixel: factor analysis).
Then p(x) = N(b, C) with C = W W^T + Psi, and everything below goes through the K x K matrix

    M = I_K + W^T Psi^{-1} W,

never a D x D one: the Woodbury identity C^{-1} = Psi^{-1} - Psi^{-1} W M^{-1} W^T Psi^{-1} and the matrix
determinant lemma |C| = |M| |Psi| make log p(x) cost O(N D K) for N images, so D=784, K=100, N=10000 takes
seconds on a CPU. Note this M is Tipping & Bishop's M = W^T W + sigma^2 I divided by sigma^2, so their posterior
covariance sigma^2 M_TB^{-1} is M^{-1} here.

Every function computes in float64 (inputs are cast) and returns float64 tensors on W's device; images are
processed in chunks of rows so that only a chunk x D array is ever held in float64 at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from vae_cli.maths.densities import LOG_2PI

__all__ = [
    "LinearGaussian",
    "elbo",
    "fit_ppca",
    "ppca_from_moments",
    "gap_elbo",
    "gap_jensen",
    "jensen_bound",
    "log_px",
    "posterior",
    "sample_posterior",
]

_F64 = torch.float64
CHUNK_ROWS = 4096  # images per chunk: 4096 x 784 float64 is 25 MB

Sigma = float | Tensor


@dataclass(frozen=True)
class _Model:
    """The parameters in float64 and the K x K quantities every function shares."""

    W: Tensor  # (D, K)
    b: Tensor  # (D,)
    var: Tensor  # (D,) the diagonal of Psi (a shared sigma broadcast to every pixel)
    PsiInvW: Tensor  # (D, K) Psi^{-1} W
    G: Tensor  # (K, K) W^T Psi^{-1} W
    M: Tensor  # (K, K) I + G
    L: Tensor  # (K, K) lower Cholesky factor of M
    logdet_M: Tensor  # ()
    logdet_Psi: Tensor  # ()


def _model(W: Tensor, b: Tensor, sigma: Sigma) -> _Model:
    W = torch.as_tensor(W, dtype=_F64)
    if W.dim() != 2:
        raise ValueError(f"W must be (D, K), got shape {tuple(W.shape)}")
    D, K = W.shape
    b = torch.as_tensor(b, dtype=_F64, device=W.device)
    if b.shape != (D,):
        raise ValueError(f"b must be ({D},) to match W {tuple(W.shape)}, got shape {tuple(b.shape)}")
    # straight to float64: a Python float through float32 would be off by ~1e-8 relative
    sigma = torch.as_tensor(sigma, dtype=_F64, device=W.device)
    if sigma.numel() == 1:
        sigma = sigma.reshape(())
    elif sigma.shape != (D,):
        raise ValueError(f"sigma must be a scalar or ({D},), got shape {tuple(sigma.shape)}")
    var = (sigma**2).expand(D)
    if not bool((var > 0).all()):
        raise ValueError("sigma must be non-zero (Psi = diag(sigma^2) must be invertible)")
    PsiInvW = W / var[:, None]
    G = W.T @ PsiInvW
    M = torch.eye(K, dtype=_F64, device=W.device) + G
    L = torch.linalg.cholesky(M)
    return _Model(
        W=W,
        b=b,
        var=var,
        PsiInvW=PsiInvW,
        G=G,
        M=M,
        L=L,
        logdet_M=2 * L.diagonal().log().sum(),
        logdet_Psi=var.log().sum(),
    )


def _as_tensor(t) -> Tensor:
    """A tensor as it is (cast chunk by chunk later); anything else straight to float64."""
    return t if isinstance(t, Tensor) else torch.as_tensor(t, dtype=_F64)


class _RowFn(Protocol):
    def __call__(self, r: Tensor, *per_image: Tensor) -> Tensor: ...


def _by_rows(m: _Model, fn: _RowFn, x: Tensor, *per_image: Tensor) -> Tensor:
    """fn(r, *per_image) on chunks of images, r = x - b in float64; the results concatenated along dim 0."""
    x = _as_tensor(x)
    D, K = m.W.shape
    if x.dim() != 2 or x.shape[1] != D:
        raise ValueError(f"x must be (N, {D}), got shape {tuple(x.shape)}")
    for t in per_image:
        if t.shape != (x.shape[0], K):
            raise ValueError(f"q_mean and q_logvar must be ({x.shape[0]}, {K}), got shape {tuple(t.shape)}")
    out = []
    for start in range(0, max(x.shape[0], 1), CHUNK_ROWS):  # N = 0 still runs one (empty) chunk, for the shape
        rows = slice(start, start + CHUNK_ROWS)
        r = x[rows].to(device=m.W.device, dtype=_F64) - m.b
        out.append(fn(r, *(t[rows].to(device=m.W.device, dtype=_F64) for t in per_image)))
    return torch.cat(out)


def _log_normal_psi(m: _Model, r: Tensor) -> Tensor:
    """log N(x; b, Psi) for r = x - b."""
    return -0.5 * (r.shape[1] * LOG_2PI + m.logdet_Psi + (r**2 / m.var).sum(1))


def _posterior_mean(m: _Model, r: Tensor) -> Tensor:
    # Tipping & Bishop 1999's posterior mean (their M is sigma^2 times this one): M^{-1} W^T Psi^{-1} (x - b)
    return torch.cholesky_solve((r @ m.PsiInvW).T, m.L).T


# --- the public functions ---------------------------------------------------------------------------------


def log_px(W: Tensor, b: Tensor, sigma: Sigma, x: Tensor) -> Tensor:
    """log N(x; b, W W^T + Psi) for each row of x (N, D); returns (N,)."""
    m = _model(W, b, sigma)

    def chunk(r: Tensor) -> Tensor:
        # Woodbury: r^T C^{-1} r = r^T Psi^{-1} r - |L^{-1} W^T Psi^{-1} r|^2, with L L^T = M
        v = torch.linalg.solve_triangular(m.L, (r @ m.PsiInvW).T, upper=False)
        mahalanobis = (r**2 / m.var).sum(1) - (v**2).sum(0)
        # determinant lemma: log|W W^T + Psi| = log|M| + log|Psi|
        return -0.5 * (r.shape[1] * LOG_2PI + m.logdet_M + m.logdet_Psi + mahalanobis)

    return _by_rows(m, chunk, x)


def posterior(W: Tensor, b: Tensor, sigma: Sigma, x: Tensor) -> tuple[Tensor, Tensor]:
    """The mean (N, K) and covariance (K, K) of p(z | x) = N(M^{-1} W^T Psi^{-1} (x - b), M^{-1}).

    The covariance does not depend on x, so it is returned once for all images."""
    m = _model(W, b, sigma)
    return _by_rows(m, lambda r: _posterior_mean(m, r), x), torch.cholesky_inverse(m.L)


def jensen_bound(W: Tensor, b: Tensor, sigma: Sigma, x: Tensor) -> Tensor:
    """E_{z ~ p(z)} log p(x | z) = log N(x; b, Psi) - tr(W^T Psi^{-1} W) / 2; returns (N,)."""
    m = _model(W, b, sigma)
    # E_z (W z)^T Psi^{-1} (W z) = tr(W^T Psi^{-1} W E[z z^T]) = tr(G) under z ~ N(0, I); the cross term has mean 0
    return _by_rows(m, lambda r: _log_normal_psi(m, r) - 0.5 * m.G.trace(), x)


def gap_jensen(W: Tensor, b: Tensor, sigma: Sigma, x: Tensor) -> Tensor:
    """KL(p(z) || p(z | x)) = log p(x) - jensen_bound, from the two Gaussians; returns (N,)."""
    m = _model(W, b, sigma)
    K = m.W.shape[1]

    def chunk(r: Tensor) -> Tensor:
        mu = _posterior_mean(m, r)
        # KL(N(0, I) || N(mu, M^{-1})) = [tr(M) + mu^T M mu - K - log|M|] / 2
        return 0.5 * (m.M.trace() + ((mu @ m.M) * mu).sum(1) - K - m.logdet_M)

    return _by_rows(m, chunk, x)


def elbo(W: Tensor, b: Tensor, sigma: Sigma, x: Tensor, q_mean: Tensor, q_logvar: Tensor) -> Tensor:
    """E_q log p(x | z) - KL(q || p(z)) for q(z | x) = N(q_mean, diag(exp(q_logvar))), both (N, K); returns (N,)."""
    m = _model(W, b, sigma)
    G_diag = m.G.diagonal()

    def chunk(r: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
        s = logvar.exp()
        # E_q (r - W z)^T Psi^{-1} (r - W z) = (r - W mu)^T Psi^{-1} (r - W mu) + tr(W^T Psi^{-1} W diag(s))
        residual = r - mu @ m.W.T
        expected_log_lik = -0.5 * (
            r.shape[1] * LOG_2PI + m.logdet_Psi + (residual**2 / m.var).sum(1) + (s * G_diag).sum(1)
        )
        kl_prior = 0.5 * (s + mu**2 - 1 - logvar).sum(1)
        return expected_log_lik - kl_prior

    return _by_rows(m, chunk, x, _as_tensor(q_mean), _as_tensor(q_logvar))


def gap_elbo(W: Tensor, b: Tensor, sigma: Sigma, x: Tensor, q_mean: Tensor, q_logvar: Tensor) -> Tensor:
    """KL(q(z | x) || p(z | x)) = log p(x) - elbo, from the two Gaussians; returns (N,)."""
    m = _model(W, b, sigma)
    K = m.W.shape[1]
    M_diag = m.M.diagonal()

    def chunk(r: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
        d = _posterior_mean(m, r) - mu
        # KL(N(mu, S) || N(m, M^{-1})) = [tr(M S) + d^T M d - K - log|M| - log|S|] / 2, d = m - mu, S diagonal
        return 0.5 * ((M_diag * logvar.exp()).sum(1) + ((d @ m.M) * d).sum(1) - K - m.logdet_M - logvar.sum(1))

    return _by_rows(m, chunk, x, _as_tensor(q_mean), _as_tensor(q_logvar))


def sample_posterior(
    W: Tensor, b: Tensor, sigma: Sigma, x: Tensor, n: int, generator: torch.Generator | None = None
) -> Tensor:
    """n exact draws from p(z | x) for each image: (N, n, K)."""
    m = _model(W, b, sigma)
    K = m.W.shape[1]

    def chunk(r: Tensor) -> Tensor:
        eps = torch.randn(r.shape[0], n, K, generator=generator, dtype=_F64, device=m.W.device)
        # with M = L L^T, Cov[z | x] = M^{-1} = L^{-T} L^{-1}, so z = mu + L^{-T} eps; as rows: eps L^{-1}
        return _posterior_mean(m, r)[:, None, :] + torch.linalg.solve_triangular(m.L, eps, upper=False, left=False)

    return _by_rows(m, chunk, x)


def fit_ppca(x: Tensor, K: int) -> tuple[Tensor, Tensor, Tensor]:
    """The maximum-likelihood pPCA (shared sigma) of x (N, D) at latent size K: (W (D, K), b (D,), sigma ()).

    Tipping & Bishop 1999 eq. (7)-(8), with the rotation R = I."""
    x = torch.as_tensor(x, dtype=_F64)
    if x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"x must be (N, D) with N >= 1, got shape {tuple(x.shape)}")
    b = x.mean(0)
    xc = x - b
    return ppca_from_moments(b, xc.T @ xc / x.shape[0], K)


def ppca_from_moments(mean: Tensor, S: Tensor, K: int) -> tuple[Tensor, Tensor, Tensor]:
    """fit_ppca from the data's mean (D,) and covariance S (D, D): the maximum-likelihood pPCA depends
    on the data through these alone (a known noise added to every pixel adds its variance to S)."""
    b, S = torch.as_tensor(mean, dtype=_F64), torch.as_tensor(S, dtype=_F64)
    D = b.shape[0]
    if isinstance(K, bool) or not isinstance(K, int) or not 1 <= K < D:
        raise ValueError(f"K must be an integer with 1 <= K < D = {D}, got {K!r}")
    lam, U = torch.linalg.eigh(S)  # ascending
    lam, U = lam.flip(0).clamp(min=0), U.flip(1)  # rounding can leave the zero eigenvalues slightly negative
    if lam[0] <= 0:
        raise ValueError("x has no variance: every row is the same, so sigma would be 0")
    # eq. (8): the variance lost in the D - K discarded directions, averaged. Where K >= rank(S) it is 0 up to
    # rounding and the likelihood is unbounded; floor it at the rounding level of eigh so the model stays finite.
    sigma2 = lam[K:].mean().clamp(min=D * torch.finfo(_F64).eps * lam[0])
    # eq. (7), R = I: W = U_K (Lambda_K - sigma^2 I)^{1/2}; a direction weaker than the noise gets no loading
    W = U[:, :K] * (lam[:K] - sigma2).clamp(min=0).sqrt()
    return W, b, sigma2.sqrt()


@dataclass(frozen=True, eq=False)  # holds tensors: == would be ambiguous
class LinearGaussian:
    """p(z) = N(0, I_K), p(x | z) = N(W z + b, diag(sigma^2)), sigma a scalar or (D,); see the module docstring."""

    W: Tensor
    b: Tensor
    sigma: Sigma

    @classmethod
    def fit_ppca(cls, x: Tensor, K: int) -> LinearGaussian:
        return cls(*fit_ppca(x, K))

    @classmethod
    def from_moments(cls, mean: Tensor, S: Tensor, K: int) -> LinearGaussian:
        """The maximum-likelihood pPCA of data with this mean and covariance."""
        return cls(*ppca_from_moments(mean, S, K))

    def log_px(self, x: Tensor) -> Tensor:
        return log_px(self.W, self.b, self.sigma, x)

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return posterior(self.W, self.b, self.sigma, x)

    def jensen_bound(self, x: Tensor) -> Tensor:
        return jensen_bound(self.W, self.b, self.sigma, x)

    def gap_jensen(self, x: Tensor) -> Tensor:
        return gap_jensen(self.W, self.b, self.sigma, x)

    def elbo(self, x: Tensor, q_mean: Tensor, q_logvar: Tensor) -> Tensor:
        return elbo(self.W, self.b, self.sigma, x, q_mean, q_logvar)

    def gap_elbo(self, x: Tensor, q_mean: Tensor, q_logvar: Tensor) -> Tensor:
        return gap_elbo(self.W, self.b, self.sigma, x, q_mean, q_logvar)

    def sample_posterior(self, x: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        return sample_posterior(self.W, self.b, self.sigma, x, n, generator)
