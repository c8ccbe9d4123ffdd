"""The training objectives, one unit each: a module that declares the objective's keys, whether an
encoder proposes z, what it logs, its rules across keys and its loss function. Everything else (the
schema and --help, the config's rules, the model's encoder, training, the loss figure, the docs'
key table) reads it from OBJECTIVES.

Each loss function, fn(model, x, n_samples, **options), returns the loss to minimize (a negative
bound on log p(x), nats per image) and its named terms; the options are the keys of the objective's
own config. The functions are written with tensor methods and the torch-free vae_cli.maths.formulas,
so the units import no torch and the command line is checked before torch is imported.

Adding an objective: one module here with its OBJECTIVE, one line in UNITS below, one test module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Loss:
    loss: Any  # scalar tensor to minimize
    terms: dict[str, Any] = field(default_factory=dict)  # detached scalars, nats per image


@dataclass(frozen=True)
class Objective:
    name: str
    fn: Callable[..., Loss]
    loss: str  # what the loss is, in words
    terms: dict[str, str]  # the columns it logs besides the loss, and what each is
    # curves drawn on the loss's own axis: (what it is, the columns whose sum it is); the others get their own
    same_axis: tuple[tuple[str, tuple[str, ...]], ...] = ()
    help: str = ""  # one line: --help, the docs' key table
    config: type | None = None  # a dataclass of its keys (vae_cli.maths.options.key fields)
    uses_encoder: bool = False  # an encoder q(z|x) proposes z
    rules: tuple[Callable[[Any], str | None], ...] = ()  # (the run's config) -> a one-line refusal, or None
    decodes_shared: Callable[[Any], bool] = lambda node: False  # the decoder runs once for the whole batch
    gradients: tuple[str, ...] = ("standard",)  # the gradient estimators it allows (objective.gradient)

    def __call__(self, model: Any, x: Any, n_samples: int, **options: Any) -> Loss:
        return self.fn(model, x, n_samples, **options)


from vae_cli.maths.objectives import elbo, exact, iwae, jensen, prior_iwae  # noqa: E402  (they need the classes above)

UNITS = (jensen.OBJECTIVE, prior_iwae.OBJECTIVE, elbo.OBJECTIVE, iwae.OBJECTIVE, exact.OBJECTIVE)
OBJECTIVES: dict[str, Objective] = {unit.name: unit for unit in UNITS}
