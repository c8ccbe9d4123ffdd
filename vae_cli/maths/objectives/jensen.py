"""jensen: E_{z~p(z)} log p(x|z) <= log p(x), over prior samples only. Its gap is KL(p(z) || p(z|x)), so
its optimum makes x and z independent: the decoder learns the mean digit."""

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


def jensen(model: Any, x: Any, n_samples: int, shared_samples: bool) -> Loss:
    """Minus the mean over prior samples of log p(x|z); `lme` is the log-mean-exp of the same samples."""
    log_px_z = prior_log_px_z(model, x, n_samples, shared_samples)
    return Loss(-log_px_z.mean(), {"lme": -log_mean_exp(log_px_z.detach()).mean()})


OBJECTIVE = Objective(
    "jensen",
    jensen,
    loss="-E_p(z) log p(x|z), the Jensen bound",
    terms={"lme": "-log (1/S) sum_s p(x|z_s), the log-mean-exp of the same samples"},
    same_axis=(("-log-mean-exp of the same samples (a tighter bound)", ("lme",)),),
    help="E_p(z) log p(x|z) over prior samples: the decoder learns the mean digit",
    config=PriorObjectiveConfig,
    rules=(shared_samples_take_the_whole_batch,),
    decodes_shared=decodes_shared,
)
