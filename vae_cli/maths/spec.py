"""The shape of a model as plain values: what build_model needs, importable without torch (the
config checks names against these before torch is loaded)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

N_PIXELS = 28 * 28
QUADRATURE_MAX_K = 2  # beyond 2 dimensions a grid that resolves the posterior is too large
Z_LIMIT = 3.0  # the latent figures and the grid posterior cover z in [-Z_LIMIT, Z_LIMIT]^2
FLOAT_BYTES = 4  # a float32, for the memory estimates

# name -> (torch.nn class, whether it may run in place on the Linear output it follows: Linear's
# backward does not need its output, so ELU and ReLU keep one (rows, hidden) buffer per layer, not two)
ACTIVATIONS = {
    "elu": ("ELU", True),
    "relu": ("ReLU", True),
    "tanh": ("Tanh", False),
    "gelu": ("GELU", False),
    "silu": ("SiLU", False),
}


@dataclass(frozen=True)
class LikelihoodSpec:
    """p(x|z) as its unit (vae_cli.maths.likelihoods) declares it: its name, its own options, and whether a
    linear decoder with it has log p(x) in closed form. Build one with likelihoods.likelihood_spec."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()  # the likelihood's keys and their values
    closed_form: bool = False

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)


@dataclass(frozen=True)
class ModelSpec:
    """Everything build_model needs (vae_cli.run.config.model_spec makes one from a run's config)."""

    K: int  # latent dimensions
    decoder: str  # mlp | linear
    likelihood: LikelihoodSpec
    hidden: int = 0  # mlp: width of every hidden layer
    depth: int = 0  # mlp: hidden layers of the decoder
    activation: str = ""
    encoder: str | None = None  # None (decoder-only objectives), mlp or linear
    encoder_hidden: int = 0
    encoder_depth: int = 0

    @property
    def closed_form(self) -> bool:
        """log p(x), p(z|x) and every gap are exact formulas: a linear decoder with a Gaussian likelihood."""
        return self.decoder == "linear" and self.likelihood.closed_form
