"""How far importance weights can be trusted, per image: the Pareto k-hat of their upper tail
(Vehtari, Simpson, Gelman, Yao & Gabry, JMLR 2024, "Pareto smoothed importance sampling") and their
effective sample size.

    k-hat   the shape of a generalized Pareto distribution fitted to the M largest weights,
            M = min(S / 5, 3 sqrt(S)) of S draws (their eq. 9 with r_eff = 1: independent draws).
            Above 0.7 the estimate's error is too large for any practical S (their section 3.2).
    ESS     (sum_s w_s)^2 / sum_s w_s^2 of the raw weights the estimator uses (Kong 1992).

The fit is Zhang & Stephens (2009)'s empirical Bayes estimate with the weakly informative prior of
Vehtari et al. (2024, appendix C: k shrunk towards 0.5 as by 10 pseudo-observations), as arviz-stats
computes it (its `_gpdfit`); here batched over images in torch, on the estimator's device, from the
M + 1 largest log-weights alone, so a running top-(M + 1) over chunks of draws is all an estimator
with S draws shared by every image needs to keep (tests/test_psis.py checks it against arviz-stats).
"""

from __future__ import annotations

import math

import torch

KHAT_THRESHOLD = 0.7  # above it, importance sampling is unreliable (Vehtari et al. 2024, section 3.2)
PRIOR_WEIGHT, PRIOR_K = 10, 0.5  # the prior on k: 10 pseudo-observations at k = 0.5
PRIOR_SCALE = 3  # Zhang & Stephens's prior on theta scaled by the first quartile


def tail_length(S: int) -> int:
    """M, the weights in the fitted tail of S independent draws (Vehtari et al. 2024, eq. 9, r_eff = 1)."""
    return int(math.floor(3 * math.sqrt(S))) if S > 225 else S // 5


def top_log_weights(log_w: torch.Tensor, S: int | None = None) -> torch.Tensor:
    """The tail_length(S) + 1 largest of each row of log_w (..., S), in descending order."""
    S = log_w.shape[-1] if S is None else S
    return log_w.topk(min(tail_length(S) + 1, log_w.shape[-1]), dim=-1).values


def merge_top(top: torch.Tensor | None, log_w: torch.Tensor, size: int) -> torch.Tensor:
    """The `size` largest of a running top (..., size) and a further chunk of log-weights (..., C)."""
    both = log_w if top is None else torch.cat([top, log_w.to(top.dtype)], -1)
    return both.topk(min(size, both.shape[-1]), dim=-1).values


def khat_from_top(top: torch.Tensor) -> torch.Tensor:
    """k-hat (...) from each row's M + 1 largest log-weights in descending order (top_log_weights):
    the generalized Pareto fit to the M exceedances w - w_(M+1), scaled by the largest weight. NaN
    where the tail has fewer than 5 weights or all are equal (no fit)."""
    top = top.double()
    M = top.shape[-1] - 1
    if M < 5:
        return torch.full(top.shape[:-1], math.nan, dtype=top.dtype, device=top.device)
    scaled = (top - top[..., :1]).exp()  # w / max w: the fit is scale-free
    tail = (scaled[..., :M] - scaled[..., M:]).flip(-1)  # (..., M) ascending exceedances over the cutoff
    k = _gpd_shape(tail)
    flat = (tail[..., -1] - tail[..., 0]) <= torch.finfo(tail.dtype).tiny
    return k.masked_fill(flat, math.nan)


def _gpd_shape(x: torch.Tensor) -> torch.Tensor:
    """The shape k of a generalized Pareto fitted to each row of x (..., n) > 0, ascending: Zhang &
    Stephens (2009)'s posterior mean of theta over m = 30 + sqrt(n) quantile-based points, then
    k = mean log(1 - theta x) (arviz-stats' sign: k > 0 is a heavy tail) shrunk towards 0.5."""
    n = x.shape[-1]
    m = 30 + int(n**0.5)
    j = torch.arange(1, m + 1, dtype=x.dtype, device=x.device)
    quartile = x[..., int(n / 4 + 0.5) - 1 : int(n / 4 + 0.5)]  # (..., 1)
    theta = (1 - torch.sqrt(m / (j - 0.5))) / (PRIOR_SCALE * quartile) + 1 / x[..., -1:]  # (..., m)
    k = torch.log1p(-theta.unsqueeze(-1) * x.unsqueeze(-2)).mean(-1)  # (..., m)
    profile = n * (torch.log(-theta / k) - k - 1)  # the profile log-likelihood of each theta
    weights = torch.softmax(profile, -1)
    weights = weights.masked_fill(weights < 10 * torch.finfo(x.dtype).eps, 0)  # as arviz-stats: drop negligible ones
    theta_post = (theta * weights).sum(-1, keepdim=True) / weights.sum(-1, keepdim=True)
    k = torch.log1p(-theta_post * x).mean(-1)
    return (n * k + PRIOR_WEIGHT * PRIOR_K) / (n + PRIOR_WEIGHT)


def pareto_khat(log_w: torch.Tensor) -> torch.Tensor:
    """k-hat of each row of log-weights (..., S)."""
    return khat_from_top(top_log_weights(log_w))


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """(sum w)^2 / sum w^2 of each row of log-weights (..., S), in log space."""
    log_w = log_w.double()
    return (2 * torch.logsumexp(log_w, -1) - torch.logsumexp(2 * log_w, -1)).exp()
