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
points. Importance draws are seeded per image, so no result depends on the batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vae_cli.models import (
    HALF_WIDTH,
    N_PIXELS,
    QUADRATURE_MAX_K,
    LatentVariableModel,
    bernoulli_log_likelihood_shared,
    diagonal_normal_log_prob,
    kl_to_standard_normal,
    quadrature_grid,
    standard_normal_log_prob,
)
from vae_cli.objectives import log_mean_exp

BATCH_SIZE = 1000
# Floats in the largest temporary. On the CPU, blocks under 32 MiB are reused from the heap
# instead of page-faulting fresh mmaps (see config.CPU_MICRO_BATCH_ELEMENTS).
CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 27}


def model_device(model: LatentVariableModel) -> torch.device:
    return next(model.parameters()).device


def default_chunk_elements(device: torch.device) -> int:
    return CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cpu"])


# --- Latent points shared by every image: the quadrature grid and prior draws --------------------


@dataclass(frozen=True)
class WeightedSums:
    log_px: torch.Tensor  # (N,) log sum_g w_g p(x|z_g)
    jensen: torch.Tensor  # (N,) sum_g w_g log p(x|z_g)


def weighted_sums(
    model: LatentVariableModel,
    x: torch.Tensor,
    z: torch.Tensor,
    log_w: torch.Tensor,
    batch_size: int = BATCH_SIZE,
    chunk_elements: int | None = None,
) -> WeightedSums:
    """Per image, for points z (G, K) with normalized log-weights log_w (G,):
    log sum_g w_g p(x|z_g) and sum_g w_g log p(x|z_g).

    The decoder runs once per point; the sums run over chunks of points (a running logsumexp),
    accumulated in float64."""
    n = len(x)
    batch_size = min(batch_size, n)
    chunk = max(1, (chunk_elements or default_chunk_elements(x.device)) // max(batch_size, N_PIXELS))
    log_px = torch.full((n,), -math.inf, dtype=torch.float64, device=x.device)
    jensen = torch.zeros(n, dtype=torch.float64, device=x.device)
    for zc, log_wc in zip(z.split(chunk), log_w.split(chunk)):
        logits = model.decode(zc)
        wc = log_wc.exp()
        for start in range(0, n, batch_size):
            rows = slice(start, start + batch_size)
            ll = bernoulli_log_likelihood_shared(x[rows], logits)  # one matrix product
            jensen[rows] += (ll @ wc).double()
            # logsumexp(ll + log w), in place in ll's buffer: no further (batch, chunk) temporaries
            log_joint = ll.add_(log_wc)
            top = log_joint.amax(-1)
            chunk_log_px = log_joint.sub_(top.unsqueeze(-1)).exp_().sum(-1).log_() + top
            log_px[rows] = torch.logaddexp(log_px[rows], chunk_log_px.double())
    return WeightedSums(log_px, jensen)


def log_px_quadrature(
    model: LatentVariableModel,
    x: torch.Tensor,
    points_per_dim: int,
    half_width: float = HALF_WIDTH,
    batch_size: int = BATCH_SIZE,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """log p(x) = log integral p(x|z) p(z) dz by the midpoint rule on a points_per_dim^K grid (K <= 2)."""
    if model.K > QUADRATURE_MAX_K:
        raise ValueError(f"quadrature needs K <= {QUADRATURE_MAX_K}, this model has K={model.K}")
    z, log_w = quadrature_grid(model.K, points_per_dim, half_width, x.device)
    return weighted_sums(model, x, z, log_w, batch_size, chunk_elements).log_px


def log_px_prior_mc(
    model: LatentVariableModel,
    x: torch.Tensor,
    n_samples: int,
    generator: torch.Generator | None = None,
    batch_size: int = BATCH_SIZE,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """log (1/S) sum_s p(x|z_s) over S prior draws shared by every image: one decoder pass per draw."""
    z = model.sample_prior(n_samples, generator=generator)
    log_w = torch.full((n_samples,), -math.log(n_samples), device=z.device)
    return weighted_sums(model, x, z, log_w, batch_size, chunk_elements).log_px


def jensen_bound(
    model: LatentVariableModel,
    x: torch.Tensor,
    points_per_dim: int | None = None,
    n_samples: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = BATCH_SIZE,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """E_p(z) log p(x|z): on the quadrature grid if points_per_dim is given, else the mean over n_samples prior draws."""
    if points_per_dim is not None:
        z, log_w = quadrature_grid(model.K, points_per_dim, device=x.device)
    elif n_samples is not None:
        z = model.sample_prior(n_samples, generator=generator)
        log_w = torch.full((n_samples,), -math.log(n_samples), device=z.device)
    else:
        raise ValueError("jensen_bound needs points_per_dim or n_samples")
    return weighted_sums(model, x, z, log_w, batch_size, chunk_elements).jensen


# --- Draws from the encoder q(z|x): importance sampling, the ELBO and IWAE-k ----------------------


@dataclass(frozen=True)
class ImportanceSums:
    log_px: torch.Tensor  # (N,) log (1/k) sum_s w_s, the k-sample importance estimate
    elbo: torch.Tensor  # (N,) (1/k) sum_s log p(x|z_s) - KL(q(z|x) || p(z)) in closed form
    iwae: torch.Tensor  # (N,) mean over the k // iwae_k groups of log (1/iwae_k) sum_{s in group} w_s


def importance_noise(
    n: int, k: int, K: int, seed: int, first: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """eps (n, k, K) ~ N(0, I) for images first..first+n-1, each image from its own seeded stream,
    so an image gets the same draws whatever batch it is evaluated in."""
    generator = torch.Generator(device=device)
    eps = torch.empty(n, k, K, device=device, dtype=dtype)
    for i in range(n):
        generator.manual_seed((seed << 32) + first + i)
        eps[i] = torch.randn(k, K, generator=generator, device=device, dtype=dtype)
    return eps


def importance_sums(
    model: LatentVariableModel,
    x: torch.Tensor,
    k: int,
    iwae_k: int | None = None,
    seed: int = 0,
    batch_size: int = BATCH_SIZE,
    chunk_elements: int | None = None,
) -> ImportanceSums:
    """Per image, from the same k draws z_s ~ q(z|x): the importance estimate of log p(x), the ELBO and IWAE-iwae_k.

    log w_s = log p(x|z_s) + log p(z_s) - log q(z_s|x). The decoder sees chunks of draws whose
    logits hold at most chunk_elements floats; the (batch, k) log-weights are kept whole."""
    iwae_k = k if iwae_k is None else iwae_k
    if not 1 <= iwae_k <= k:
        raise ValueError(f"iwae_k={iwae_k} must be between 1 and k={k}")
    n = len(x)
    batch_size = min(batch_size, n)
    chunk = max(1, (chunk_elements or default_chunk_elements(x.device)) // (batch_size * N_PIXELS))
    groups = k // iwae_k
    out: dict[str, list[torch.Tensor]] = {"log_px": [], "elbo": [], "iwae": []}
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
        log_w = log_px_z + standard_normal_log_prob(z) - diagonal_normal_log_prob(z, mu, logvar)
        out["log_px"].append(log_mean_exp(log_w))
        out["elbo"].append(log_px_z.mean(-1) - kl_to_standard_normal(mu, logvar).sum(-1))
        out["iwae"].append(log_mean_exp(log_w[:, : groups * iwae_k].reshape(len(xb), groups, iwae_k)).mean(-1))
    return ImportanceSums(**{name: torch.cat(parts).double() for name, parts in out.items()})


def log_px_importance(model: LatentVariableModel, x: torch.Tensor, k: int, seed: int = 0, **chunking) -> torch.Tensor:
    """The k-sample importance-weighted estimate of log p(x) with q(z|x) as proposal."""
    return importance_sums(model, x, k, seed=seed, **chunking).log_px


def elbo_bound(model: LatentVariableModel, x: torch.Tensor, n_samples: int, seed: int = 0, **chunking) -> torch.Tensor:
    """E_q log p(x|z) - KL(q(z|x) || p(z)): the expectation over n_samples draws, the KL in closed form."""
    return importance_sums(model, x, n_samples, seed=seed, **chunking).elbo


def iwae_bound(
    model: LatentVariableModel, x: torch.Tensor, k: int, n_repeats: int = 1, seed: int = 0, **chunking
) -> torch.Tensor:
    """The IWAE-k bound E log (1/k) sum_s w_s, averaged over n_repeats independent groups of k draws."""
    return importance_sums(model, x, k * n_repeats, iwae_k=k, seed=seed, **chunking).iwae


@dataclass(frozen=True)
class EncoderStatistics:
    mean: torch.Tensor  # (N, K) E_q[z] per image
    kl: torch.Tensor  # (N, K) KL(q(z_j|x) || p(z_j)) per image and dimension


def encoder_statistics(model: LatentVariableModel, x: torch.Tensor, batch_size: int = BATCH_SIZE) -> EncoderStatistics:
    means, kls = [], []
    for xb in x.split(batch_size):
        mu, logvar = model.encode(xb)
        means.append(mu)
        kls.append(kl_to_standard_normal(mu, logvar))
    return EncoderStatistics(torch.cat(means), torch.cat(kls))
