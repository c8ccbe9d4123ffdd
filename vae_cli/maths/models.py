"""The latent-variable model p(z) p(x|z): a standard-normal prior, a decoder f(z) (an MLP, or
linear: f(z) = W z + b) into a likelihood (vae_cli.maths.likelihoods), and for the ELBO and IWAE
objectives a Gaussian encoder q(z|x).

    encode(x)                    mean and log-variance of q(z|x)
    reparameterize(mu, logvar)   z = mu + sigma * eps, differentiable in both
    decode(z)                    E[x|z], the likelihood's mean of the decoder's output
    log_px_given_z(x, z)         log p(x|z)
    sample(n), prior_sample(n)   x ~ p(x|z) with z ~ p(z), and z ~ p(z)
"""

from __future__ import annotations

import torch
from torch import nn

from vae_cli.maths.likelihoods.kernels import build_likelihood
from vae_cli.maths.linear_gaussian import LinearGaussian
from vae_cli.maths.spec import ACTIVATIONS, N_PIXELS, ModelSpec


def activation(name: str) -> nn.Module:
    cls, in_place = ACTIVATIONS[name]
    return getattr(nn, cls)(inplace=True) if in_place else getattr(nn, cls)()


def mlp(sizes: list[int], activation_name: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(activation(activation_name))
    return nn.Sequential(*layers)


class Decoder(nn.Module):
    """z (..., K) -> f(z) (..., 784): an MLP, or with depth 0 the linear map W z + b."""

    def __init__(self, K: int, hidden: int = 0, depth: int = 0, activation_name: str = ""):
        super().__init__()
        self.net = mlp([K] + [hidden] * depth + [N_PIXELS], activation_name) if depth else nn.Linear(K, N_PIXELS)

    def output_layer(self) -> nn.Linear:
        return self.net[-1] if isinstance(self.net, nn.Sequential) else self.net

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Encoder(nn.Module):
    """x (B, 784) -> mean and log-variance (B, K) of the diagonal Gaussian q(z|x), from an MLP."""

    def __init__(self, K: int, hidden: int, depth: int, activation_name: str):
        super().__init__()
        self.net = mlp([N_PIXELS] + [hidden] * depth + [2 * K], activation_name)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(x).chunk(2, dim=-1)
        return mu, logvar


class LinearEncoder(nn.Module):
    """q(z|x) = N(V x + c, diag(exp(logvar))) with a variance that does not depend on x: the linear
    VAE whose ELBO has the maximum-likelihood pPCA at its optimum (Lucas et al. 2019)."""

    def __init__(self, K: int):
        super().__init__()
        self.net = nn.Linear(N_PIXELS, K)
        self.logvar = nn.Parameter(torch.zeros(K))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = self.net(x)
        return mu, self.logvar.expand_as(mu)


class LatentVariableModel(nn.Module):
    def __init__(self, K: int, decoder: Decoder, likelihood: nn.Module, encoder: nn.Module | None = None):
        super().__init__()
        self.K = K
        self.decoder = decoder
        self.likelihood = likelihood
        self.encoder = encoder
        self.use_fused_likelihood()

    # --- p(z) and q(z|x) ---

    def prior_sample(self, *shape: int, seed: int | None = None, generator: torch.Generator | None = None):
        """z ~ N(0, I) of shape (*shape, K) on the model's device (drawn on the CPU where `seed` is given)."""
        weight = next(self.decoder.parameters())  # the model's device and dtype
        if seed is not None:
            z = torch.randn(*shape, self.K, generator=torch.Generator().manual_seed(seed))
            return z.to(weight.device, weight.dtype)
        return torch.randn(*shape, self.K, device=weight.device, dtype=weight.dtype, generator=generator)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and log-variance of q(z|x), each (B, K)."""
        if self.encoder is None:
            raise RuntimeError("this model has no encoder (objectives jensen, prior_iwae and exact train none)")
        return self.encoder(x)

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, n_samples: int) -> torch.Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I): (B, K) -> (B, n_samples, K), differentiable in mu and logvar."""
        eps = torch.randn(mu.shape[0], n_samples, mu.shape[1], device=mu.device, dtype=mu.dtype)
        return mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps

    # --- p(x|z) ---

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """E[x|z] (..., 784): the likelihood's mean of the decoder's output (sigmoid of Bernoulli logits)."""
        return self.likelihood.mean(self.decoder(z))

    def log_px_given_z(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x_b | z_bs) for x (B, 784) and z (B, S, K) -> (B, S)."""
        return self._log_px_given_z(x, z)

    def log_px_given_shared_z(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x_b | z_s) for x (B, 784) and z (S, K) shared by every image -> (B, S)."""
        return self.likelihood.log_prob_shared(x, self.decoder(z))

    def sample(self, n: int, seed: int | None = None) -> torch.Tensor:
        """n images x ~ p(x|z), z ~ p(z) (samples, not means), (n, 784) on the CPU."""
        return prior_draws(self, n, seed)[1]

    def linear_gaussian(self) -> LinearGaussian | None:
        """The closed form of a linear decoder with a Gaussian likelihood (pPCA or factor analysis); else None."""
        if not isinstance(self.decoder.net, nn.Linear) or not getattr(self.likelihood, "closed_form", False):
            return None
        layer = self.decoder.net
        return LinearGaussian(layer.weight.detach(), layer.bias.detach(), self.likelihood.sigma().detach())

    # --- how log p(x|z) is computed: the same numbers three ways ---

    def _fused(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.likelihood.log_prob(x, self.decoder(z), overwrite=True)  # the logits live only here

    def _formula(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.likelihood.log_prob_formula(x, self.decoder(z))

    def use_fused_likelihood(self) -> None:
        """The default: the likelihood's speed path (Bernoulli's hand-written gradient, in cache-sized chunks)."""
        self._log_px_given_z = self._fused

    def use_autograd_likelihood(self) -> None:
        """log_px_given_z through autograd's graph of the plain formula instead of the fused
        function: the same numbers, more memory (the benchmark's "w/o fused lik." and the tests)."""
        self._log_px_given_z = self._formula

    def compile_likelihood(self, **options) -> None:
        """torch.compile the decoder and the likelihood of log_px_given_z as one graph, compiled on
        first call. Inductor is given the plain formula and fuses its element-wise work itself."""
        self._log_px_given_z = torch.compile(self._formula, **options)


def build_model(
    spec: ModelSpec, pixel_means: torch.Tensor | None = None, pixel_sd: torch.Tensor | None = None
) -> LatentVariableModel:
    """The decoder, its likelihood and (where the spec has one) the encoder, sized from spec. Given the
    training pixels' means (and sd), the model starts at the mean-image model: the decoder's output
    bias makes E[x|z] the mean image, and a learned sigma starts at the pixels' spread."""
    if spec.decoder == "linear":
        decoder = Decoder(spec.K)
    else:
        decoder = Decoder(spec.K, spec.hidden, spec.depth, spec.activation)
    likelihood = build_likelihood(spec.likelihood, N_PIXELS, pixel_sd)
    if pixel_means is not None:
        with torch.no_grad():
            decoder.output_layer().bias.copy_(likelihood.initial_output(pixel_means))
    encoder: nn.Module | None = None
    if spec.encoder == "linear":
        encoder = LinearEncoder(spec.K)
    elif spec.encoder == "mlp":
        encoder = Encoder(spec.K, spec.encoder_hidden, spec.encoder_depth, spec.activation)
    return LatentVariableModel(spec.K, decoder, likelihood, encoder)


# The figures and TensorBoard's grids draw with their own generator: redrawing a run (or a
# checkpoint) gives the same images, and training's RNG stream is never touched.
PRIOR_DRAWS_SEED = 2024


@torch.no_grad()
def prior_draws(
    model: LatentVariableModel, n: int, seed: int | None = PRIOR_DRAWS_SEED
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder means E[x|z] and samples x ~ p(x|z) for n prior draws z ~ p(z) from `seed`,
    both (n, 784) on the CPU."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    z = torch.randn(n, model.K, generator=generator)
    out = model.decoder(z.to(next(model.decoder.parameters()).device)).float().cpu()
    return model.likelihood.mean(out), model.likelihood.sample(out, generator)
