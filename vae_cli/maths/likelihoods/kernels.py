"""The torch side of the likelihoods (their units are vae_cli.maths.likelihoods): the implementations
that need autograd's own kernels or learned parameters (Bernoulli's fused gradient, the Gaussian's
sigma), the module that runs a unit's tensor-method formulas, and build_likelihood. Every density is
computed in log space and in float32 (float64 where a sum of squares would cancel), whatever dtype
the decoder ran in.

Each built likelihood is a small nn.Module (the Gaussian's sigma is a parameter or a buffer, so it
lives in the model's state dict) with the methods of the units' docstring and two more:

    log_prob(x, out, overwrite)  the speed path: may overwrite out's memory in the backward
    log_prob_formula(x, out)     the same left to autograd (or torch.compile)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vae_cli.maths.densities import LOG_2PI
from vae_cli.maths.likelihoods import LIKELIHOODS
from vae_cli.maths.spec import LikelihoodSpec

# On the CPU the likelihood runs over images in chunks of about this many floats (512 KiB), which
# stay in cache between the passes of softplus, the product with x and, backward, the gradient.
CPU_LIKELIHOOD_CHUNK_ELEMENTS = 1 << 17
PIXEL_MEAN_CLAMP = 1e-4  # keeps the logit of never-seen pixels finite


class _BernoulliLogLikelihood(torch.autograd.Function):
    """sum_d x_d l_d - softplus(l_d) with its gradient written out: d/dl = x - sigmoid(l).

    Autograd's graph of the same formula keeps the einsum's (B, ..., D) outer product and the
    softplus gradient, and adds them: three (B, ..., D) tensors in the backward. This one fills
    one buffer in place, chunk by chunk: the logits' own memory when the caller owns them
    (`overwrite`), so the backward allocates nothing of that size. Under CUDA autocast it runs
    in float32 (bf16 logits upcast)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, logits: torch.Tensor, overwrite: bool) -> torch.Tensor:
        ctx.save_for_backward(x, logits)
        ctx.overwrite = overwrite
        out = logits.new_empty(logits.shape[:-1])
        rows = _chunk_rows(logits)
        for lc, xc, oc in zip(logits.split(rows), x.split(rows), out.split(rows)):
            torch.sub(torch.einsum("b...d,bd->b...", lc, xc), F.softplus(lc).sum(-1), out=oc)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        # Overwriting bumps the logits' version: a second backward (retain_graph) fails in autograd's check.
        x, logits = ctx.saved_tensors
        grad_x = grad_logits = None
        if ctx.needs_input_grad[0]:  # before the logits are overwritten
            grad_x = torch.einsum("b...d,b...->bd", logits, grad)
        if ctx.needs_input_grad[1]:
            grad_logits = logits if ctx.overwrite else torch.empty_like(logits)
            rows = _chunk_rows(logits)
            for lc, gc, xc, g in zip(logits.split(rows), grad_logits.split(rows), x.split(rows), grad.split(rows)):
                torch.sigmoid(lc, out=gc)
                gc.sub_(xc.view(xc.shape[0], *[1] * (logits.dim() - 2), xc.shape[-1])).mul_(g.unsqueeze(-1).neg())
        return grad_x, grad_logits, None


def _chunk_rows(logits: torch.Tensor) -> int:
    """Images per chunk of the likelihood's passes: all of them on CUDA, about 512 KiB on the CPU."""
    per_image = max(1, math.prod(logits.shape[1:]))
    if logits.device.type != "cpu":
        return max(1, logits.shape[0])
    return max(1, CPU_LIKELIHOOD_CHUNK_ELEMENTS // per_image)


def bernoulli_log_likelihood(x: torch.Tensor, logits: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """log p(x|z) = sum_d x_d l_d - softplus(l_d), for x (B, D) against logits (B, ..., D) -> (B, ...).

    The fused form of sum_d log Bern(x_d; sigmoid(l_d)): no probabilities, no distribution
    objects, no (B, ..., D) temporary beyond a cache-sized chunk. overwrite=True lets the
    backward write the gradient into the logits' memory: only for logits nobody else reads."""
    with float32_likelihood(logits) as logits32:  # a float32 copy of bf16 logits is ours to overwrite
        return _BernoulliLogLikelihood.apply(x, logits32, overwrite or logits32 is not logits)


def bernoulli_log_likelihood_formula(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The same log p(x|z) as bernoulli_log_likelihood, left to autograd (or to torch.compile)."""
    with float32_likelihood(logits) as logits:
        return torch.einsum("b...d,bd->b...", logits, x) - F.softplus(logits).sum(-1)


def bernoulli_log_likelihood_shared(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log p(x_b|z_s) = x_b . l_s - sum_d softplus(l_sd) for every pair: x (B, D), logits (S, D) -> (B, S).

    Logits shared by the whole batch: one matrix product instead of B x S decoder passes."""
    with float32_likelihood(logits) as logits:
        return x @ logits.T - F.softplus(logits).sum(-1)


@contextmanager
def float32_likelihood(logits: torch.Tensor) -> Iterator[torch.Tensor]:
    """The logits in float32 with autocast off: under bf16 autocast (cuda.bf16, cpu_bf16) the decoder's
    matrix products run in bf16, but a sum of 784 log-probabilities in bf16 (8-bit mantissa) would be
    off by nats, so the likelihood and its gradient stay float32."""
    with torch.autocast(logits.device.type, enabled=False):
        yield logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays float64


class Bernoulli(nn.Module):
    """log p(x|z) = sum_d x_d l_d - softplus(l_d) for logits l = f(z): binary pixels."""

    def __init__(self, spec: LikelihoodSpec | None = None, n_pixels: int = 0, pixel_sd: torch.Tensor | None = None):
        super().__init__()

    def log_prob(self, x: torch.Tensor, logits: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
        return bernoulli_log_likelihood(x, logits, overwrite)

    def log_prob_formula(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return bernoulli_log_likelihood_formula(x, logits)

    def log_prob_shared(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return bernoulli_log_likelihood_shared(x, logits)

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.float())

    def sample(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.bernoulli(self.mean(logits), generator=generator)

    def initial_output(self, means: torch.Tensor) -> torch.Tensor:
        return torch.logit(means.clamp(PIXEL_MEAN_CLAMP, 1 - PIXEL_MEAN_CLAMP))


class Gaussian(nn.Module):
    """log p(x|z) = log N(x; mu, sigma^2 I) for mu = f(z): grey levels.

    sigma is fixed (`sigma`), or learned, shared by every pixel or one per pixel: sigma =
    sigma_min + softplus(raw), so it never falls below sigma_min (a density of data with finitely
    many values grows without bound as sigma shrinks; dequantized 8-bit pixels have sd >= 1/(256 sqrt 12))."""

    closed_form = True  # with a linear decoder: probabilistic PCA (vae_cli.maths.linear_gaussian)

    def __init__(self, spec: LikelihoodSpec, n_pixels: int, pixel_sd: torch.Tensor | None = None):
        super().__init__()
        sigma, per_pixel = spec.option("sigma"), spec.option("per_pixel", False)
        self.sigma_min = sigma_min = spec.option("sigma_min", 0.0)
        if sigma is not None:
            self.register_buffer("fixed_sigma", torch.tensor(float(sigma)))
            self.raw_sigma = None
            return
        if pixel_sd is None:
            start = torch.ones(n_pixels if per_pixel else ())
        elif per_pixel:
            start = pixel_sd.float().expand(n_pixels).clone()
        else:  # one sigma for every pixel: their spread pooled, sqrt of the mean variance
            start = pixel_sd.float().pow(2).mean().sqrt()
        start = start.clamp_min(2 * sigma_min)
        # the inverse of softplus: the run starts at pixel_sd (the data's spread around its mean)
        self.raw_sigma = nn.Parameter(torch.log(torch.expm1(start - sigma_min)))
        self.fixed_sigma = None

    def sigma(self) -> torch.Tensor:
        """sigma, () or (D,), float32."""
        if self.raw_sigma is None:
            return self.fixed_sigma
        return self.sigma_min + F.softplus(self.raw_sigma.float())

    def _log_normalizer(self, sigma: torch.Tensor, n_pixels: int) -> torch.Tensor:
        """sum_d log sigma_d + D/2 log 2 pi."""
        log_sigma = torch.log(sigma)
        total = log_sigma.sum() if log_sigma.dim() else n_pixels * log_sigma
        return total + 0.5 * n_pixels * LOG_2PI

    def log_prob(self, x: torch.Tensor, mu: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
        return self.log_prob_formula(x, mu)  # autograd's graph is small here: no fused form needed

    def log_prob_formula(self, x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        with float32_likelihood(mu) as mu:
            sigma = self.sigma().to(mu.dtype)
            x = x.view(x.shape[0], *[1] * (mu.dim() - 2), x.shape[-1]).to(mu.dtype)
            return -0.5 * ((x - mu) / sigma).pow(2).sum(-1) - self._log_normalizer(sigma, mu.shape[-1])

    def log_prob_shared(self, x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        # |x - mu|^2 = |x|^2 - 2 x.mu + |mu|^2 as one matrix product, in float64: with sigma near 1e-3 the
        # three terms are ~1e8 each and float32 would lose whole nats to the cancellation
        with float32_likelihood(mu) as mu:
            sigma = self.sigma().double()
            a, m = x.double() / sigma, mu.double() / sigma
            squares = a.pow(2).sum(-1, keepdim=True) - 2 * a @ m.T + m.pow(2).sum(-1)
            log_px_z = -0.5 * squares.clamp_min(0) - self._log_normalizer(sigma, mu.shape[-1])
            return log_px_z.to(mu.dtype)

    def mean(self, mu: torch.Tensor) -> torch.Tensor:
        return mu.float()

    def sample(self, mu: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mu = mu.float()
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + self.sigma().to(mu.device) * noise

    def initial_output(self, means: torch.Tensor) -> torch.Tensor:
        return means


class Formulas(nn.Module):
    """A likelihood whose unit writes its formulas with tensor methods (no parameters, no kernel of its
    own): they run in float32 with autocast off, and autograd differentiates them."""

    def __init__(self, formulas: Any):
        super().__init__()
        self.formulas = formulas

    def log_prob(self, x: torch.Tensor, out: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
        return self.log_prob_formula(x, out)

    def log_prob_formula(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        with float32_likelihood(out) as out:
            return self.formulas.log_prob(x, out)

    def log_prob_shared(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        with float32_likelihood(out) as out:
            return self.formulas.log_prob_shared(x, out)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return self.formulas.mean(out.float())

    def sample(self, out: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.formulas.sample(out.float(), generator)

    def initial_output(self, means: torch.Tensor) -> torch.Tensor:
        return self.formulas.initial_output(means)


def build_likelihood(spec: LikelihoodSpec, n_pixels: int, pixel_sd: torch.Tensor | None = None) -> nn.Module:
    """The likelihood of `spec`, from its unit's implementation; pixel_sd: the training pixels' spread
    (where a learned sigma starts)."""
    implementation = LIKELIHOODS[spec.name].load()(spec, n_pixels, pixel_sd)
    return implementation if isinstance(implementation, nn.Module) else Formulas(implementation)
