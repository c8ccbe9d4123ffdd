"""What the two prior objectives (jensen, prior_iwae) share: their key and their draws z ~ p(z)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vae_cli.maths.options import key


@dataclass
class PriorObjectiveConfig:
    shared_samples: bool = key(False, "one set of n_samples prior draws per step for the whole batch (docs: Speed)")


def prior_log_px_z(model: Any, x: Any, n_samples: int, shared_samples: bool) -> Any:
    """log p(x_b|z) for z ~ p(z), (B, n_samples): independent draws per image, or with
    shared_samples one set of n_samples draws for the whole batch (the decoder runs on
    n_samples latents instead of B x n_samples; the same expectation, correlated across images)."""
    if shared_samples:
        return model.log_px_given_shared_z(x, model.prior_sample(n_samples))
    return model.log_px_given_z(x, model.prior_sample(x.shape[0], n_samples))


def shared_samples_take_the_whole_batch(cfg: Any) -> str | None:
    if cfg.objective.shared_samples and 0 < cfg.micro_batch < cfg.batch_size:
        return (
            f"invalid value micro_batch={cfg.micro_batch!r} with objective.shared_samples=true: the shared samples "
            f"are drawn once per step for the whole batch; allowed 0 (automatic) or >= batch_size={cfg.batch_size}"
        )
    return None


def decodes_shared(node: Any) -> bool:
    return bool(node.shared_samples)
