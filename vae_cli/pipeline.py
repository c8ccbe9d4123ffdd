"""vae-train as one pipeline: prepare, train, figures, evaluate.

    summary = train(cfg, run_dir)

`prepare` checks everything (config, memory, paths, the run directory, a checkpoint to resume)
without writing; each stage then writes into the run directory, and summary.json's status says
which stages remain (vae_cli.rundir.STATUSES), so `vae-train resume=RUN_DIR` finishes a run
killed at any point:

    vae-train resume=RUN_DIR [n_train_iters=N] [device=...] [progress=...] [checkpoint_every=...]

continues RUN_DIR in place with the config saved in it. checkpoint.pt holds the model, the
optimizer, the step and every RNG state, so on the CPU a resumed run is bit for bit the run
that was never stopped; losses.csv is cut back to the checkpoint's step. A requeued submitit
job composes the same config into the same directory and resumes there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vae_cli import evaluation, figures, training
from vae_cli.config import data_config, saved_config, validate
from vae_cli.data import check_data_files, load_data
from vae_cli.device import flush_denormals, resolve_device
from vae_cli.errors import ConfigError, RunDirError
from vae_cli.objectives import OBJECTIVES
from vae_cli.rundir import (
    CHECKPOINT,
    HYDRA_CONFIG,
    LOSSES,
    STAGES,
    STATUSES,
    check_creatable,
    load_checkpoint,
    load_run_model,
    losses_up_to,
    model_from_state,
    run_status,
    set_status,
)
from vae_cli.tracking import open_tracker

log = logging.getLogger(__name__)

# Keys `vae-train resume=DIR KEY=VALUE` may change; any other override that differs from the
# saved config is refused (it would change the model, the data or the optimization).
# micro_batch splits the same step differently (same maths; float sums in another order),
# data.root and data.download only say where the md5-checked files are.
# cuda.* and compile are speed options of the machine the run continues on.
MUTABLE_ON_RESUME = (
    "n_train_iters",
    "progress",
    "device",
    "checkpoint_every",
    "micro_batch",
    "eval",
    "cuda",
    "cpu",
    "compile",
    "logger",
    "resume",
    "data.root",
    "data.download",
)
MUTABLE_TEXT = (
    "n_train_iters, checkpoint_every, device, progress, micro_batch, eval.*, cuda.*, cpu.*, compile, logger, "
    "data.root, data.download"
)


@dataclass
class StartPoint:
    """Where a run starts: the config it runs with, the stages left, the checkpoint it continues."""

    cfg: DictConfig  # a resumed run's saved config with the allowed changes; else the config prepare() was given
    stages: tuple[str, ...] = STAGES
    state: dict[str, Any] | None = None  # checkpoint.pt (None: training starts from step 0)
    resumed: bool = False
    losses: bytes | None = None  # losses.csv cut back to the checkpoint's step (resumed runs)


def train(
    cfg: DictConfig, run_dir: Path, changed: list[str] | None = None, start: StartPoint | None = None
) -> dict[str, Any]:
    """Run the stages of vae-train that `run_dir` still needs; returns summary.json's dict.

    `changed`: the keys the command line sets (for resume=, which refuses changes to most keys);
    `start`: a StartPoint that prepare() made already (the command line's check before Hydra writes)."""
    run_dir = Path(run_dir)
    start = start or prepare(cfg, run_dir, changed)
    cfg = start.cfg if start.resumed else cfg  # a resumed run runs with its own saved config
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    flush_denormals()  # before loading the data starts torch's threads (the console scripts did at start)
    torch.manual_seed(cfg.seed)  # the batches draw from torch's RNG; a resumed run restores it
    data = load_data(data_config(cfg), cfg.seed, device)
    log.info("data: %s, %d training images, binarization %s", data.source, len(data.train), cfg.data.binarization)

    with open_tracker(cfg, run_dir, purge_step(start)) as tracker:
        if "train" in start.stages:
            training.fit(cfg, run_dir, data, device, start.state, start.losses, start.resumed, tracker)
        if "figures" in start.stages:
            figures.draw_run_dir(run_dir, cfg, (data.test, data.test_labels))
            set_status(run_dir, "drawn")
        if "evaluate" in start.stages and cfg.eval.enabled:
            _, model, state = load_run_model(run_dir)  # the run's own files are the stages' only meeting point
            result = evaluation.evaluate_and_record(
                model.to(device), data.test, cfg.eval, run_dir, objective=cfg.objective.name, data=data.source
            )
            tracker.evaluation(result, state["step"])
            log.info(
                "log p(x) = %.3f +- %.3f nats (%s)", result["log_px"], result["log_px_stderr"], result["estimator"]
            )
        summary = set_status(run_dir, "completed")
        tracker.finish(summary)
    return summary


def purge_step(start: StartPoint) -> int | None:
    """Where a resumed run's logger stream drops the stopped run's later steps: the step after the
    checkpoint training continues from (0 where it starts again from nothing); None if it does not train."""
    if not (start.resumed and "train" in start.stages):
        return None
    return start.state["step"] + 1 if start.state is not None else 0


# --- where a run starts ---------------------------------------------------------------------------


def prepare(cfg: DictConfig, run_dir: Path, changed: list[str] | None = None) -> StartPoint:
    """Check, without writing anything, that the run can start in run_dir, and where.

    resume=DIR: DIR's checkpoint and saved config, with the allowed changes. Else an empty run
    directory starts from step 0, a requeued submitit job resumes its own unfinished checkpoint,
    and anything else is refused rather than overwritten."""
    validate(cfg)
    run_dir = Path(run_dir)
    if cfg.resume is not None:
        if run_dir.absolute() != Path(cfg.resume).absolute():
            raise ConfigError(
                f"invalid value resume={cfg.resume!r}: a run resumes in its own directory, not in "
                f"{run_dir} (drop hydra.run.dir)"
            )
        start = _resume(cfg, run_dir, list(changed or []))
    elif not ((run_dir / CHECKPOINT).exists() or (run_dir / LOSSES).exists()):
        check_creatable(run_dir, "run directory")
        start = StartPoint(cfg)
    elif os.environ.get("SUBMITIT_EXECUTOR") and (run_dir / CHECKPOINT).exists() and _is_requeued(cfg, run_dir):
        start = _resume(cfg, run_dir, [])
        log.info("requeued job: resuming %s from step %d", run_dir, start.state["step"] if start.state else 0)
    else:
        raise RunDirError(
            f"{run_dir} already holds a run: refusing to overwrite it (continue it with {training.resume_command(run_dir)})"
        )
    check_data_files(data_config(start.cfg))
    return start


def _is_requeued(cfg: DictConfig, run_dir: Path) -> bool:
    """The checkpoint in run_dir is of this very config (submitit requeued the job that wrote it)."""
    saved = saved_config(load_checkpoint(run_dir / CHECKPOINT)["config"], run_dir / CHECKPOINT)
    return _comparable(saved) == _comparable(cfg)


def _comparable(cfg: DictConfig) -> dict:
    config = OmegaConf.to_container(cfg, resolve=True)
    for key in ("resume", "progress", "hydra"):
        config.pop(key, None)
    return config


def _resume(cfg: DictConfig, run_dir: Path, changed: list[str]) -> StartPoint:
    if not run_dir.is_dir():
        raise RunDirError(f"cannot resume {run_dir}: no such directory")
    status = run_status(run_dir)  # a corrupt summary.json is refused here, before anything is written
    if (run_dir / CHECKPOINT).exists():
        state = load_checkpoint(run_dir / CHECKPOINT)
        saved, source, step = state["config"], run_dir / CHECKPOINT, state["step"]
    elif (run_dir / LOSSES).exists():
        raise RunDirError(f"cannot resume {run_dir}: it has {LOSSES} but no {CHECKPOINT}")
    elif (run_dir / HYDRA_CONFIG).exists():  # stopped before its step-0 checkpoint: start again from step 0
        state, source, step = None, run_dir / HYDRA_CONFIG, 0
        try:
            saved = OmegaConf.to_container(OmegaConf.load(source))
        except (OSError, UnicodeDecodeError, ValueError, OmegaConfBaseException, yaml.YAMLError) as exc:
            raise RunDirError(f"{source} is not a readable config ({type(exc).__name__})") from None
    else:
        raise RunDirError(f"cannot resume {run_dir}: not a vae-train run directory (no {CHECKPOINT})")

    effective = _effective_config(cfg, saved, source, changed)
    if step > effective.n_train_iters:
        raise ConfigError(
            f"invalid value n_train_iters={effective.n_train_iters}: {run_dir} is already at step {step}; allowed >= {step}"
        )
    stages = STATUSES[status] if step == effective.n_train_iters else STAGES  # a longer run trains again
    if not effective.eval.enabled:
        stages = tuple(s for s in stages if s != "evaluate")
    if not stages:
        raise RunDirError(
            f"{run_dir} is complete at step {step}: nothing to resume (pass n_train_iters=N with N > {step} to extend it)"
        )
    losses = None
    if state is not None:
        _check_state(state, effective, source)
        columns = ["step", "loss", *OBJECTIVES[effective.objective.name].terms]
        if "train" in stages:
            losses = losses_up_to(run_dir / LOSSES, columns, step)
    return StartPoint(effective, stages, state, resumed=True, losses=losses)


def _check_state(state: dict[str, Any], cfg: DictConfig, source: Path) -> None:
    """Load the checkpoint into a throwaway model and optimizer built from cfg, so that a
    mismatch is found before anything in the run directory is written."""
    model = model_from_state(cfg, state, source)
    rng = state["rng"].get("torch")
    try:
        torch.optim.Adam(model.parameters(), lr=cfg.lr).load_state_dict(state["optimizer"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise RunDirError(f"{source} does not match its own config: {str(exc).splitlines()[0][:200]}") from None
    if not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and rng.shape == torch.get_rng_state().shape):
        raise RunDirError(f"{source} does not hold torch's RNG state")


def _effective_config(cfg: DictConfig, saved: dict, source: Path, changed: list[str]) -> DictConfig:
    """The saved config, with the command line's values of the keys that may change."""
    current = OmegaConf.create({k: cfg[k] for k in cfg if k != "hydra"}) if "hydra" in cfg else cfg.copy()
    effective = saved_config(saved, source)
    for key, value in _changed_values(current, changed):
        before = OmegaConf.select(effective, key, default=None)
        if before != value:
            raise ConfigError(
                f"cannot change {key} when resuming: the run has {key}={before!r}, the command line asks {key}={value!r} "
                f"(a resumed run may change {MUTABLE_TEXT}; start a new run instead)"
            )
    mutable = list(_changed_values(current, changed, mutable_only=True))
    for key, value in mutable:
        OmegaConf.update(effective, key, value, merge=False)
    try:
        validate(effective)
    except ConfigError as exc:
        if mutable:
            raise
        raise RunDirError(f"{source} holds a config this vae-cli refuses: {exc}") from None
    return effective


def _changed_values(current: DictConfig, changed: list[str], mutable_only: bool = False) -> Iterator[tuple[str, Any]]:
    """(key, value) for each key the command line sets; group choices (objective=elbo) give their name."""
    for key in changed:
        if key.startswith("hydra") or key == "resume":
            continue
        mutable = any(key == m or key.startswith(m + ".") for m in MUTABLE_ON_RESUME)
        if mutable_only != mutable:
            continue
        node = OmegaConf.select(current, key, default=None)
        if mutable_only:
            yield key, OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        elif OmegaConf.is_dict(node):  # a config group choice: compare its name
            if "name" in node:
                yield f"{key}.name", node.name
        else:
            yield key, node
