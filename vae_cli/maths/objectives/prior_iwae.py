"""prior_iwae: log (1/S) sum_s p(x|z_s), z_s ~ p(z): the IWAE bound with the prior as proposal. It rises
with S towards log p(x), and digits appear."""

from __future__ import annotations

from typing import Any

from vae_cli.maths.formulas import log_mean_exp
from vae_cli.maths.objectives import Loss, Objective
from vae_cli.maths.objectives.prior import (
    PriorObjectiveConfig,
    decodes_shared,
    prior_log_px_z,
    shared_samples_take_the_whole_batch,
)


def prior_iwae(model: Any, x: Any, n_samples: int, shared_samples: bool) -> Loss:
    """Minus the log-mean-exp of p(x|z_s) over prior samples; `jensen` is the plain mean of the same samples."""
    log_px_z = prior_log_px_z(model, x, n_samples, shared_samples)
    return Loss(-log_mean_exp(log_px_z).mean(), {"jensen": -log_px_z.detach().mean()})


OBJECTIVE = Objective(
    "prior_iwae",
    prior_iwae,
    loss="-log (1/S) sum_s p(x|z_s), the log-mean-exp of prior samples",
    terms={"jensen": "-E_p(z) log p(x|z), the Jensen bound of the same samples"},
    same_axis=(("-Jensen bound of the same samples (looser)", ("jensen",)),),
    help="the log-mean-exp of p(x|z) over prior samples: digits appear",
    config=PriorObjectiveConfig,
    rules=(shared_samples_take_the_whole_batch,),
    decodes_shared=decodes_shared,
)
