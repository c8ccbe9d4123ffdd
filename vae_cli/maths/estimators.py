"""Estimators of log p(x) and the bounds below it, one value per image, all in log space.

    quadrature  log sum_g w_g p(x|z_g): midpoint grid over [-L, L]^K, w_g = p(z_g) h^K normalized (K <= 2)
    importance  log (1/k) sum_s p(x|z_s) p(z_s) / q(z_s|x), z_s ~ q(z|x)        (Burda et al. 2016, eq. 8)
    prior_mc    log (1/S) sum_s p(x|z_s), z_s ~ p(z), the same S draws for every image

    jensen      E_p(z) log p(x|z)          = log p(x) - KL(p(z) || p(z|x))
    elbo        E_q log p(x|z) - KL(q || p) = log p(x) - KL(q(z|x) || p(z|x))
    iwae_k      E log (1/k) sum_s w_s, which rises with k towards log p(x)

Points shared by every image (the grid, prior draws) are decoded once, and log p(x|z_g) for
a batch of images against a chunk of points is one matrix product; sums over chunks are
running logsumexps, so memory is bounded by `chunk_elements` floats whatever the number of
points. Every draw comes from its own stream (vae_cli.maths.streams), per image where it is an
image's, so no result depends on the batch size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vae_cli.maths import streams
from vae_cli.maths.densities import (
    diagonal_normal_log_prob,
    kl_to_standard_normal,
    log_mean_exp,
    standard_normal_log_prob,
)
from vae_cli.maths.models import LatentVariableModel
from vae_cli.maths.psis import effective_sample_size, khat_from_top, merge_top, tail_length, top_log_weights
from vae_cli.maths.spec import N_PIXELS

# Floats in the largest temporary. On the CPU, blocks under 32 MiB are reused from the heap
# instead of page-faulting fresh mmaps (see training.CPU_MICRO_BATCH_ELEMENTS).
CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 27}


def default_chunk_elements(device: torch.device) -> int:
    return CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cpu"])


# --- Latent points shared by every image: the quadrature grid and prior draws --------------------


@dataclass(frozen=True)
class WeightDiagnostics:
    """How far each image's importance weights can be trusted (vae_cli.maths.psis)."""

    khat: torch.Tensor  # (N,) Pareto k-hat of the weights' upper tail
    ess: torch.Tensor  # (N,) (sum w)^2 / sum w^2


@dataclass(frozen=True)
class WeightedSums:
    log_px: torch.Tensor  # (N,) log sum_g w_g p(x|z_g)
    jensen: torch.Tensor  # (N,) sum_g w_g log p(x|z_g)
    diagnostics: WeightDiagnostics | None = None  # where asked: of the weights w_g p(x|z_g)


@torch.no_grad()  # estimates, never differentiated: no graph over the whole grid
def weighted_sums(
    model: LatentVariableModel,
    x: torch.Tensor,
    z: torch.Tensor,
    log_w: torch.Tensor,
    batch_size: int,
    chunk_elements: int | None = None,
    progress: Callable[[float], None] | None = None,
    diagnose: bool = False,
) -> WeightedSums:
    """Per image, for points z (G, K) with normalized log-weights log_w (G,):
    log sum_g w_g p(x|z_g) and sum_g w_g log p(x|z_g).

    The decoder runs once per point; the sums run over chunks of points (a running logsumexp),
    accumulated in float64. diagnose: also the k-hat and ESS of each image's weights w_g p(x|z_g)
    (for draws z_g ~ p(z): prior Monte Carlo's importance weights), from a running top of each
    image's log-weights and a running logsumexp of their squares: no (images, points) array is held."""
    n = len(x)
    batch_size = min(batch_size, n)
    chunk = max(1, (chunk_elements or default_chunk_elements(x.device)) // max(batch_size, N_PIXELS))
    log_px = torch.full((n,), -math.inf, dtype=torch.float64, device=x.device)
    jensen = torch.zeros(n, dtype=torch.float64, device=x.device)
    tail = tail_length(len(z)) + 1
    tops: list[torch.Tensor | None] = [None] * math.ceil(n / batch_size)  # each batch's running top log-weights
    log_sum_sq = torch.full((n,), -math.inf, dtype=torch.float64, device=x.device)  # log sum_g w_g^2
    done = 0
    for zc, log_wc in zip(z.split(chunk), log_w.split(chunk)):
        out = model.decoder(zc)
        wc = log_wc.exp()
        for batch, start in enumerate(range(0, n, batch_size)):
            rows = slice(start, start + batch_size)
            ll = model.likelihood.log_prob_shared(x[rows], out)  # one matrix product
            jensen[rows] += (ll @ wc).double()
            # logsumexp(ll + log w), in place in ll's buffer: no further (batch, chunk) temporaries
            log_joint = ll.add_(log_wc)
            if diagnose:
                tops[batch] = merge_top(tops[batch], log_joint.double(), tail)
                log_sum_sq[rows] = torch.logaddexp(log_sum_sq[rows], torch.logsumexp(2 * log_joint.double(), -1))
            top = log_joint.amax(-1)
            chunk_log_px = log_joint.sub_(top.unsqueeze(-1)).exp_().sum(-1).log_() + top
            log_px[rows] = torch.logaddexp(log_px[rows], chunk_log_px.double())
        done += len(zc)
        if progress is not None:  # the share of the points summed
            progress(done / len(z))
    if not diagnose:
        return WeightedSums(log_px, jensen)
    khat = torch.cat([khat_from_top(t) for t in tops if t is not None])
    return WeightedSums(log_px, jensen, WeightDiagnostics(khat, (2 * log_px - log_sum_sq).exp()))


# --- Draws from the encoder q(z|x): importance sampling, the ELBO and IWAE-k ----------------------


@dataclass(frozen=True)
class ImportanceSums:
    log_px: torch.Tensor  # (N,) log (1/k) sum_s w_s, the k-sample importance estimate
    elbo: torch.Tensor  # (N,) (1/k) sum_s log p(x|z_s) - KL(q(z|x) || p(z)) in closed form
    iwae: torch.Tensor  # (N,) mean over the k // iwae_k groups of log (1/iwae_k) sum_{s in group} w_s
    diagnostics: WeightDiagnostics | None = None  # where asked: of the k weights w_s


IMPORTANCE_STREAM = "importance"


def importance_noise(
    n: int, k: int, K: int, seed: int, first: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """eps (n, k, K) ~ N(0, I) for images first..first+n-1, each image from its own stream
    (vae_cli.maths.streams), so an image gets the same draws whatever batch it is evaluated in."""
    eps = torch.empty(n, k, K, device=device, dtype=dtype)
    for i in range(n):
        eps[i] = streams.normal(streams.stream(seed, IMPORTANCE_STREAM, first + i), (k, K), device)
    return eps


@torch.no_grad()
def importance_sums(
    model: LatentVariableModel,
    x: torch.Tensor,
    k: int,
    iwae_k: int,
    seed: int,
    batch_size: int,
    chunk_elements: int | None = None,
    progress: Callable[[float], None] | None = None,
    diagnose: bool = False,
) -> ImportanceSums:
    """Per image, from the same k draws z_s ~ q(z|x): the importance estimate of log p(x), the ELBO and IWAE-iwae_k.

    log w_s = log p(x|z_s) + log p(z_s) - log q(z_s|x). The decoder sees chunks of draws whose
    logits hold at most chunk_elements floats; the (batch, k) log-weights are kept whole.
    diagnose: also the k-hat and ESS of each image's k weights (vae_cli.maths.psis)."""
    if not 1 <= iwae_k <= k:
        raise ValueError(f"iwae_k={iwae_k} must be between 1 and k={k}")
    n = len(x)
    batch_size = min(batch_size, n)
    chunk = max(1, (chunk_elements or default_chunk_elements(x.device)) // (batch_size * N_PIXELS))
    groups = k // iwae_k
    out: dict[str, list[torch.Tensor]] = {"log_px": [], "elbo": [], "iwae": [], "khat": [], "ess": []}
    for start in range(0, n, batch_size):
        xb = x[start : start + batch_size]
        mu, logvar = model.encode(xb)
        z = mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * importance_noise(
            len(xb), k, model.K, seed, start, x.device, mu.dtype
        )
        # Filled in place: small results kept alive between the large per-chunk temporaries
        # fragment glibc's heap (2.6 GB instead of 0.7 GB for 1000 images x 1000 draws).
        log_px_z = torch.empty(len(xb), k, device=x.device, dtype=mu.dtype)
        for first in range(0, k, chunk):
            log_px_z[:, first : first + chunk] = model.log_px_given_z(xb, z[:, first : first + chunk])
            if progress is not None:  # the share of the images' draws decoded
                progress((start + len(xb) * min(k, first + chunk) / k) / n)
        log_w = log_px_z + standard_normal_log_prob(z) - diagonal_normal_log_prob(z, mu, logvar)
        out["log_px"].append(log_mean_exp(log_w))
        out["elbo"].append(log_px_z.mean(-1) - kl_to_standard_normal(mu, logvar).sum(-1))
        out["iwae"].append(log_mean_exp(log_w[:, : groups * iwae_k].reshape(len(xb), groups, iwae_k)).mean(-1))
        if diagnose:
            out["khat"].append(khat_from_top(top_log_weights(log_w)))
            out["ess"].append(effective_sample_size(log_w))
    diagnostics = WeightDiagnostics(torch.cat(out["khat"]), torch.cat(out["ess"])) if diagnose else None
    return ImportanceSums(
        **{name: torch.cat(out[name]).double() for name in ("log_px", "elbo", "iwae")}, diagnostics=diagnostics
    )


@dataclass(frozen=True)
class EncoderStatistics:
    mean: torch.Tensor  # (N, K) E_q[z] per image
    logvar: torch.Tensor  # (N, K) log Var_q[z] per image
    kl: torch.Tensor  # (N, K) KL(q(z_j|x) || p(z_j)) per image and dimension


def encoder_statistics(model: LatentVariableModel, x: torch.Tensor, batch_size: int) -> EncoderStatistics:
    means, logvars = [], []
    for xb in x.split(batch_size):
        mu, logvar = model.encode(xb)
        means.append(mu)
        logvars.append(logvar)
    mean, logvar = torch.cat(means), torch.cat(logvars)
    return EncoderStatistics(mean, logvar, kl_to_standard_normal(mean, logvar))
