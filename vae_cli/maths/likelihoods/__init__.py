"""The likelihoods p(x|z), one unit each: a module that declares the likelihood's keys, which images it
models, its rules and its implementation. Everything else (the schema and --help, the config's rules,
the model, the evaluation's bits/dim and references, the docs' key table) reads it from LIKELIHOODS.

A unit module is torch-free, so that the command line is checked before torch is imported; its
implementation, a class with the methods below, is named by `implementation` ("module:Class") and
imported the first time a model is built (vae_cli.maths.likelihoods.kernels.build_likelihood). A
formula that tensor methods can write (continuous_bernoulli) lives in the unit module itself; one that
needs autograd's own kernels or learned parameters (bernoulli's fused gradient, gaussian's sigma) in
kernels.py. Each implementation, given the decoder's output f(z):

    log_prob(x, out)         log p(x_b | z_b...) for x (B, D) and out (B, ..., D) -> (B, ...)
    log_prob_shared(x, out)  log p(x_b | z_s) for out (S, D) shared by every image -> (B, S)
    mean(out)                E[x|z]
    sample(out, generator)   x ~ p(x|z)
    initial_output(means)    the output whose E[x|z] is `means` (the model starts at the mean image)

Adding a likelihood: one module here with its UNIT, one line in UNITS below, one test module.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vae_cli.maths.spec import LikelihoodSpec

BINARY, GREY = "binary", "grey"  # the images a likelihood models: binarized, or grey levels in [0, 1]


@dataclass(frozen=True)
class LikelihoodUnit:
    name: str
    help: str  # one line: --help, the docs' key table
    config: type  # a dataclass of its keys (vae_cli.maths.options.key fields), empty if it has none
    pixels: str  # BINARY or GREY: the images it is a density (or a distribution) of
    implementation: str  # "module:Class", imported on first use (torch)
    closed_form: bool = False  # with a linear decoder, log p(x) is a closed form (probabilistic PCA)
    # (its config node, data.binarization) -> a one-line refusal, or None: its rules beyond the pixels it models
    rules: tuple[Callable[[Any, str], str | None], ...] = ()
    waives_pixels: Callable[[Any], bool] = lambda node: False  # a key of its own lets the other images in
    waiver: str = ""  # that key, as the refusal names it
    describe: Callable[[Any], str] | None = None  # its config in a few words, for titles (default: the name)

    def spec(self, node: Any) -> LikelihoodSpec:
        """The plain spec of a config node (or any object with its keys as attributes)."""
        options = tuple((f.name, getattr(node, f.name)) for f in dataclasses.fields(self.config))
        return LikelihoodSpec(self.name, options, self.closed_form)

    def words(self, node: Any) -> str:
        return self.describe(node) if self.describe is not None else self.name

    def load(self) -> type:
        module, _, attribute = self.implementation.partition(":")
        return getattr(importlib.import_module(module), attribute)


def likelihood_spec(name: str, **options: Any) -> LikelihoodSpec:
    """The spec of likelihood `name` with its defaults, as `options` change them (the tests, the API, the benchmark)."""
    return LIKELIHOODS[name].spec(LIKELIHOODS[name].config(**options))


from vae_cli.maths.likelihoods import bernoulli, continuous_bernoulli, gaussian  # noqa: E402  (the units need the class above)

UNITS = (bernoulli.UNIT, gaussian.UNIT, continuous_bernoulli.UNIT)
LIKELIHOODS: dict[str, LikelihoodUnit] = {unit.name: unit for unit in UNITS}
