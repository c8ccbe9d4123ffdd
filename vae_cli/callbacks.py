"""Hydra callbacks: validate every job's config before Hydra creates any directory."""
from __future__ import annotations

from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from vae_cli.config import validate
from vae_cli.errors import Abort, UserError


def sweep_job_overrides(config: DictConfig) -> list[list[str]]:
    """The override lists of every job a basic-sweeper multirun will launch, as Hydra expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    overrides = list(config.hydra.overrides.task)
    params = config.hydra.sweeper.get("params") or {}
    overrides += [f"{key}={value}" for key, value in params.items()]
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


class ValidateBeforeRun(Callback):
    """Refuse a bad config before Hydra writes anything; for a multirun, check every job first."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            validate(config)
        except UserError as exc:
            raise Abort(exc) from None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra import compose

        try:
            for job in sweep_job_overrides(config):
                validate(compose(config_name=config.hydra.job.config_name, overrides=job))
        except UserError as exc:
            raise Abort(exc) from None
