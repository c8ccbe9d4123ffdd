"""The latent-variable model p(z) p(x|z): a standard-normal prior, an MLP Bernoulli decoder,
and (for the ELBO and IWAE objectives) a Gaussian MLP encoder q(z|x)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

N_PIXELS = 28 * 28
PIXEL_MEAN_CLAMP = 1e-4  # keeps the logit of never-seen pixels finite
# ELU and ReLU run in place on the Linear output they follow (Linear's backward does not need
# its output): one (rows, hidden) buffer per layer instead of two, and the backward reads the result.
ACTIVATIONS = {
    "elu": lambda: nn.ELU(inplace=True),
    "relu": lambda: nn.ReLU(inplace=True),
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}
LOG_2PI = math.log(2 * math.pi)


def mlp(sizes: list[int], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


# On the CPU the likelihood runs over images in chunks of about this many floats (512 KiB), which
# stay in cache between the passes of softplus, the product with x and, backward, the gradient.
CPU_LIKELIHOOD_CHUNK_ELEMENTS = 1 << 17


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


HALF_WIDTH = 6.0  # a grid over [-6, 6]^K: prior mass outside it is 2e-9 per dimension
QUADRATURE_MAX_K = 2  # beyond 2 dimensions a grid that resolves the posterior is too large


def quadrature_grid(
    K: int,
    points_per_dim: int,
    half_width: float = HALF_WIDTH,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints z_g (G, K) of a regular grid over [-L, L]^K and log w_g = log p(z_g) h^K, normalized, so that
    log p(x) ~= logsumexp_g (log w_g + log p(x|z_g)): the midpoint rule for the integral of p(x|z) p(z) dz.

    Normalizing renormalizes the prior to the grid's box; the mass it drops is negligible at L=6."""
    h = 2 * half_width / points_per_dim
    axis = -half_width + h * (torch.arange(points_per_dim, dtype=torch.float64) + 0.5)
    z = torch.cartesian_prod(*[axis] * K).reshape(-1, K)
    log_w = standard_normal_log_prob(z) + K * math.log(h)
    log_w = log_w - torch.logsumexp(log_w, 0)
    dtype = dtype or torch.get_default_dtype()
    return z.to(device, dtype), log_w.to(device, dtype)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I), summed over the last (latent) dimension."""
    return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)


def diagonal_normal_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the latent dimension; z is (B, S, K), mu and logvar (B, K)."""
    mu, logvar = mu.unsqueeze(1), logvar.unsqueeze(1)
    return -0.5 * ((z - mu).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per latent dimension (Kingma & Welling 2014, appendix B)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)


class Decoder(nn.Module):
    """z (..., K) -> Bernoulli logits (..., 784)."""

    def __init__(self, K: int, hidden: int, depth: int, activation: str, pixel_means: torch.Tensor | None = None):
        super().__init__()
        self.net = mlp([K] + [hidden] * depth + [N_PIXELS], activation)
        if pixel_means is not None:  # start at the mean-image model: sigmoid(bias) = training pixel means
            with torch.no_grad():
                self.net[-1].bias.copy_(torch.logit(pixel_means.clamp(PIXEL_MEAN_CLAMP, 1 - PIXEL_MEAN_CLAMP)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Encoder(nn.Module):
    """x (B, 784) -> mean and log-variance (B, K) of the diagonal Gaussian q(z|x)."""

    def __init__(self, K: int, hidden: int, depth: int, activation: str):
        super().__init__()
        self.net = mlp([N_PIXELS] + [hidden] * depth + [2 * K], activation)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(x).chunk(2, dim=-1)
        return mu, logvar


class LatentVariableModel(nn.Module):
    def __init__(self, K: int, decoder: Decoder, encoder: Encoder | None = None):
        super().__init__()
        self.K = K
        self.decoder = decoder
        self.encoder = encoder

    def sample_prior(self, *shape: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """z ~ N(0, I) of shape (*shape, K) on the model's device."""
        weight = self.decoder.net[0].weight  # the model's device and dtype
        return torch.randn(*shape, self.K, device=weight.device, dtype=weight.dtype, generator=generator)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.encoder is None:
            raise RuntimeError("this model has no encoder")
        return self.encoder(x)

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, n_samples: int) -> torch.Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I): (B, K) -> (B, n_samples, K), differentiable in mu and logvar."""
        eps = torch.randn(mu.shape[0], n_samples, mu.shape[1], device=mu.device, dtype=mu.dtype)
        return mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def log_px_given_z(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x_b | z_bs) for x (B, 784) and z (B, S, K) -> (B, S)."""
        return self._log_px_given_z(x, z)

    def _log_px_given_z(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return bernoulli_log_likelihood(x, self.decode(z), overwrite=True)  # the logits live only here

    def log_px_given_shared_z(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x_b | z_s) for x (B, 784) and z (S, K) shared by every image -> (B, S)."""
        return bernoulli_log_likelihood_shared(x, self.decode(z))

    def use_autograd_likelihood(self) -> None:
        """log_px_given_z through autograd's graph of the plain formula instead of the fused
        function: the same numbers, more memory (the benchmark's "w/o fused lik." and the tests)."""
        self._log_px_given_z = lambda x, z: bernoulli_log_likelihood_formula(x, self.decode(z))

    def compile_likelihood(self, **options) -> None:
        """torch.compile the decoder and the likelihood of log_px_given_z as one graph, compiled on
        first call. Inductor is given the plain formula and fuses its element-wise work itself."""

        def log_px_given_z(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            return bernoulli_log_likelihood_formula(x, self.decode(z))

        self._log_px_given_z = torch.compile(log_px_given_z, **options)


@dataclass(frozen=True)
class ModelSpec:
    """The model's shape: everything build_model needs (config.model_spec makes one from a run's config)."""

    K: int  # latent dimensions
    hidden: int  # width of every hidden layer
    depth: int  # hidden layers of the decoder
    activation: str
    encoder_hidden: int | None = None  # None: no encoder (decoder-only objectives)
    encoder_depth: int | None = None


def build_model(spec: ModelSpec, pixel_means: torch.Tensor | None = None) -> LatentVariableModel:
    """The decoder (and the encoder, where the spec has one) sized from spec."""
    decoder = Decoder(spec.K, spec.hidden, spec.depth, spec.activation, pixel_means)
    encoder = None
    if spec.encoder_hidden is not None:
        encoder = Encoder(spec.K, spec.encoder_hidden, spec.encoder_depth or spec.depth, spec.activation)
    return LatentVariableModel(spec.K, decoder, encoder)


# The figures and TensorBoard's grids draw with their own generator: redrawing a run (or a
# checkpoint) gives the same images, and training's RNG stream is never touched.
PRIOR_DRAWS_SEED = 2024


@torch.no_grad()
def prior_draws(model: LatentVariableModel, n: int, seed: int = PRIOR_DRAWS_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder means sigmoid(decoder(z)) and binary samples x ~ p(x|z) for n fixed prior draws z ~ p(z),
    both (n, 784) on the CPU."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, model.K, generator=g)
    device = next(model.parameters()).device
    means = torch.sigmoid(model.decode(z.to(device)).float()).cpu()
    samples = torch.bernoulli(means, generator=g)
    return means, samples
