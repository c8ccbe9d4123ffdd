"""vae-train as one straight path in memory: prepare, train, figures, evaluate.

    summary = train(cfg, run_dir)

`claim_run` takes the run directory's lock (one writer per run) and `prepare` checks everything under
it (config, machine, memory, data, a checkpoint to resume) without writing. Training hands the
trained model and its losses to the figures and the evaluation in memory; summary.json is written
once at each stage's end, and its status says which stages remain (vae_cli.run.rundir.STATUSES),
so `vae-train resume=RUN_DIR` finishes a run killed at any point:

    vae-train resume=RUN_DIR [n_train_iters=N] [device=...] [progress=...] [checkpoint_every=...]

continues RUN_DIR in place with the config saved in it. checkpoint.pt holds the model, the
optimizer, the step and every RNG state, so on the CPU a resumed run is bit for bit the run
that was never stopped; losses.csv is cut back to the checkpoint's step. A requeued submitit
job composes the same config into the same directory and resumes there. The checkpoint is loaded
once, by prepare; a run resumed past training takes its model from there.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from vae_cli.errors import ConfigError, RunDirError
from vae_cli.maths.models import LatentVariableModel
from vae_cli.maths.objectives import OBJECTIVES
from vae_cli.maths.spec import ModelSpec
from vae_cli.run.checkpoint import load_checkpoint, model_from_state
from vae_cli.run.config import data_config, model_spec, mutable_on_resume, typed_config, validate
from vae_cli.run.data import load_images
from vae_cli.run.datafiles import DataSource, find_data, split_sizes
from vae_cli.run.machine import check_machine, flush_denormals, keep_freed_heap_memory
from vae_cli.run.preflight import occupied, preflight, requeued_job
from vae_cli.run.rundir import (
    CHECKPOINT,
    HYDRA_CONFIG,
    LOSSES,
    STAGES,
    STATUSES,
    RunLock,
    is_run_dir,
    losses_up_to,
    nearby_runs,
    read_json,
    read_losses,
    run_status,
    write_evaluation,
    write_summary,
)
from vae_cli.run.rundir import SUMMARY as SUMMARY_JSON
from vae_cli.stages import estimates, evaluation, figures, training
from vae_cli.stages.tracking import open_tracker

log = logging.getLogger(__name__)


@dataclass
class StartPoint:
    """Where a run starts: the config it runs with, the stages left, the checkpoint it continues."""

    cfg: DictConfig  # a resumed run's saved config with the allowed changes; else the config prepare() was given
    device: torch.device
    source: DataSource | None
    stages: tuple[str, ...] = STAGES
    state: dict[str, Any] | None = None  # checkpoint.pt (None: training starts from step 0)
    resumed: bool = False
    losses: bytes | None = None  # losses.csv cut back to the checkpoint's step (resumed runs)
    model: LatentVariableModel | None = None  # the checkpoint's model, checked (a run resumed past training uses it)
    spec: ModelSpec | None = None  # the model cfg describes, read from it once (prepare) for every stage


@dataclass
class Claim:
    """A run directory held by this process (its lock) and where the run starts in it."""

    lock: RunLock
    start: StartPoint
    flushed_denormals: bool


def train(
    cfg: DictConfig,
    run_dir: Path,
    changed: list[str] | None = None,
    claim: Claim | None = None,
    place: training.Place | None = None,
) -> dict[str, Any]:
    """Run the stages of vae-train that `run_dir` still needs; returns summary.json's dict.

    `changed`: the keys the command line sets (for resume=, which refuses changes to most keys);
    `claim`: the lock and start point claim_run() made already (before Hydra wrote into the run);
    `place`: the multirun job and +experiment preset the run belongs to (training.Place)."""
    run_dir = Path(run_dir)
    claim = claim or claim_run(cfg, run_dir, changed)
    try:
        summary = run_stages(claim, run_dir, place)
    finally:
        claim.lock.release()
    training.ignore_preemption_when_done()
    return summary


# preflight() has not run yet (its answer for resume= is None: the saved config's data, found later)
UNCHECKED: Any = object()


def claim_run(
    cfg: DictConfig, run_dir: Path, changed: list[str] | None = None, source: DataSource | None = UNCHECKED
) -> Claim:
    """Take run_dir's lock, then prepare the run under it; a refused run leaves nothing behind (a
    directory made for it is removed again). `source`: preflight's answer where the caller has it."""
    run_dir = Path(run_dir)
    flushed = flush_denormals()  # first: torch's worker threads keep the flag they start with
    made = _missing_folders(run_dir)
    if source is UNCHECKED:
        source = preflight(cfg, run_dir)  # before anything is made
    lock = None
    try:
        lock = RunLock.acquire(run_dir, "vae-train")
        return Claim(lock, prepare(cfg, run_dir, changed, source), flushed)
    except BaseException:
        if lock is not None:
            lock.forget()  # a refused run leaves nothing behind: not its lock file, not the folders made for it
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _missing_folders(path: Path) -> list[Path]:
    """path and those of its parents that do not exist yet, the deepest first."""
    missing = []
    path = path.absolute()
    while not path.exists():
        missing.append(path)
        path = path.parent
    return missing


def run_stages(claim: Claim, run_dir: Path, place: training.Place | None = None) -> dict[str, Any]:
    start = claim.start
    cfg, device = start.cfg, start.device
    heap = device.type == "cpu" and keep_freed_heap_memory()
    facts: dict[str, Any] = {
        "data": start.source.describe(),
        "process_settings": {"flush_denormal": claim.flushed_denormals, "heap_kept": heap},
    }
    if not claim.lock.held:
        facts["lock"] = f"none ({claim.lock.reason})"
    torch.manual_seed(cfg.seed)  # the batches draw from torch's RNG; a resumed run restores it
    images = load_images(data_config(cfg), cfg.seed, device, start.source)
    log.info("data: %s, %d training images, binarization %s", images.source, len(images.train), cfg.data.binarization)

    with open_tracker(cfg, run_dir, purge_step(start)) as tracker:
        if "train" in start.stages:
            fitted = training.fit(
                cfg, start.spec, run_dir, images, device, facts, start.state, start.losses, tracker, place
            )
            model, losses, summary = fitted.model, fitted.losses, fitted.summary
        else:  # resumed past training: the checkpoint's model, the run's own losses and summary
            model, losses = start.model.to(device), read_losses(run_dir / LOSSES)
            summary = read_json(run_dir / SUMMARY_JSON)
        if "figures" in start.stages:
            out = figures.RunFigures(run_dir.name, run_dir, run_dir)
            test_set = (images.test.cpu(), images.test_labels.cpu())
            drawn = figures.draw_run(cfg, model, losses, out, test_set, figures.run_label(cfg))
            if not drawn.figures and drawn.notes:
                raise RunDirError(f"{run_dir}: nothing could be drawn ({'; '.join(drawn.notes)})")
            summary = write_summary(run_dir, {**summary, "status": "drawn"})
        if "evaluate" in start.stages and cfg.eval.enabled:
            result, per_image = evaluation.evaluate(model, start.spec, images, cfg.eval)
            digest = evaluation.checkpoint_digest(run_dir)
            result = evaluation.of_run(result, run_dir, cfg, images, cfg.n_train_iters, digest)
            result.update(evaluation.gradient_snr(model, images, cfg, run_dir))
            summary = write_evaluation(
                run_dir, result, evaluation.per_image_lists(per_image), {**summary, "status": "completed"}
            )
            log.info("test-set log p(x) of %s:\n%s", run_dir, evaluation.format_table(result))
            tracker.evaluation(result, cfg.n_train_iters)
        else:
            summary = write_summary(run_dir, {**summary, "status": "completed"})
        tracker.finish(summary)
    return summary


def purge_step(start: StartPoint) -> int | None:
    """Where a resumed run's logger stream drops the stopped run's later steps: the step after the
    checkpoint training continues from (0 where it starts again from nothing); None if it does not train."""
    if not (start.resumed and "train" in start.stages):
        return None
    return start.state["step"] + 1 if start.state is not None else 0


# --- where a run starts ---------------------------------------------------------------------------


def prepare(
    cfg: DictConfig, run_dir: Path, changed: list[str] | None = None, source: DataSource | None = UNCHECKED
) -> StartPoint:
    """Check, without writing anything, that the run can start in run_dir, and where.

    resume=DIR: DIR's checkpoint and saved config, with the allowed changes. Else an empty run
    directory starts from step 0, a requeued submitit job resumes its own unfinished checkpoint,
    and anything else was refused by preflight rather than overwritten."""
    run_dir = Path(run_dir)
    if source is UNCHECKED:
        source = preflight(cfg, run_dir)
    cfg = without_hydra(cfg)
    if cfg.resume is not None:
        start = _resume(cfg, run_dir, list(changed or []))
    elif (run_dir / CHECKPOINT).exists() and requeued_job() and _is_requeued(cfg, run_dir):
        start = _resume(cfg, run_dir, [])
        log.info("requeued job: resuming %s from step %d", run_dir, start.state["step"] if start.state else 0)
    elif is_run_dir(run_dir):  # again under the lock: preflight's look was before it
        raise occupied(run_dir)
    else:
        start = StartPoint(cfg, torch.device("cpu"), source)
    if start.source is None:  # resume=: the data of the saved config (data.root may have changed)
        start.source = find_data(data_config(start.cfg))
    start.device, start.spec = check_job(start.cfg)
    return start


def check_job(cfg: DictConfig) -> tuple[torch.device, ModelSpec]:
    """What a run needs of the machine it runs on, beyond preflight: its device allows the options
    asked for, and training and evaluation fit its memory. The device and the model's spec."""
    device, spec = check_machine(cfg), model_spec(cfg)
    check_run_memory(cfg, spec, device)
    return device, spec


def without_hydra(cfg: DictConfig) -> DictConfig:
    """The run's own config: a callback's holds Hydra's node too (as Hydra's run_job takes it off)."""
    if "hydra" not in cfg:
        return cfg
    cfg = copy.deepcopy(cfg)
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    return cfg


def check_run_memory(cfg: DictConfig, spec: ModelSpec, device: torch.device) -> None:
    """ConfigError where training and the evaluation it ends with need more memory than `device` has."""
    parts = training.memory_parts(cfg, spec, device)
    if cfg.eval.enabled:
        n_test = cfg.eval.n_images or split_sizes(cfg.data)["test"]
        parts += estimates.memory_parts(spec, cfg.eval, device, n_test)
        if cfg.eval.gradient_snr and estimates.gradient_snr_applies(cfg.objective.name):
            parts += estimates.memory_gradient_snr(spec, cfg.eval)
    estimates.check_memory(parts, device, lambda key: OmegaConf.select(cfg, key))


def _is_requeued(cfg: DictConfig, run_dir: Path) -> bool:
    """The checkpoint in run_dir is of this very config (submitit requeued the job that wrote it)."""
    saved = typed_config(load_checkpoint(run_dir / CHECKPOINT)["config"], run_dir / CHECKPOINT)
    return _comparable(saved) == _comparable(cfg)


def _comparable(cfg: DictConfig) -> dict:
    config = OmegaConf.to_container(cfg, resolve=True)
    for key in ("resume", "progress", "hydra"):
        config.pop(key, None)
    return config


def _resume(cfg: DictConfig, run_dir: Path, changed: list[str]) -> StartPoint:
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
        raise RunDirError(
            f"cannot resume {run_dir}: not a vae-train run directory (no {CHECKPOINT}){nearby_runs(run_dir)}"
        )

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
    losses = model = None
    if state is not None:
        model = _check_state(state, effective, source)
        columns = ["step", "loss", *OBJECTIVES[effective.objective.name].terms]
        if "train" in stages:
            losses = losses_up_to(run_dir / LOSSES, columns, step)
    return StartPoint(effective, torch.device("cpu"), None, stages, state, resumed=True, losses=losses, model=model)


def _check_state(state: dict[str, Any], cfg: DictConfig, source: Path) -> LatentVariableModel:
    """Load the checkpoint into a model and a throwaway optimizer built from cfg, so that a mismatch
    is found before anything in the run directory is written; the model, checked."""
    model = model_from_state(cfg, state, source)
    rng = state["rng"].get("torch")
    try:
        torch.optim.Adam(model.parameters(), lr=cfg.lr).load_state_dict(state["optimizer"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise RunDirError(f"{source} does not match its own config: {str(exc).splitlines()[0][:200]}") from None
    if not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and rng.shape == torch.get_rng_state().shape):
        raise RunDirError(f"{source} does not hold torch's RNG state")
    return model.eval()


def _effective_config(cfg: DictConfig, saved: dict, source: Path, changed: list[str]) -> DictConfig:
    """The saved config, with the command line's values of the keys that may change."""
    current = cfg.copy()
    effective = typed_config(saved, source)
    mutable = mutable_on_resume()
    for key, value in _changed_values(current, changed, mutable):
        before = OmegaConf.select(effective, key, default=None)
        if before != value:
            raise ConfigError(
                f"cannot change {key} when resuming: the run has {key}={before!r}, the command line asks {key}={value!r} "
                f"(a resumed run may change {', '.join(mutable)}; start a new run instead)"
            )
    changes = list(_changed_values(current, changed, mutable, mutable_only=True))
    for key, value in changes:
        try:
            OmegaConf.update(effective, key, value, merge=False)
        except OmegaConfBaseException:  # a key of the command line's choices that the run's own choice lacks
            raise ConfigError(f"unknown key {key}={value!r} for {source}: its config has no {key}") from None
    try:
        validate(effective)
    except ConfigError as exc:
        if changes:
            raise
        raise RunDirError(f"{source} holds a config this vae-cli refuses: {exc}") from None
    return effective


def _changed_values(
    current: DictConfig, changed: list[str], mutable: list[str], mutable_only: bool = False
) -> Iterator[tuple[str, Any]]:
    """(key, value) for each key the command line sets; group choices (objective=elbo) give their name."""
    for key in changed:
        if key.startswith("hydra") or key == "resume":
            continue
        is_mutable = any(key == m or key.startswith(m.removesuffix("*")) for m in mutable)
        if mutable_only != is_mutable:
            continue
        node = OmegaConf.select(current, key, default=None)
        if mutable_only:
            yield key, OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        elif OmegaConf.is_dict(node):  # a config group choice: compare its name
            if "name" in node:
                yield f"{key}.name", node.name
        else:
            yield key, node
