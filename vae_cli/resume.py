"""Runs that survive: checkpoints to resume from, signals that stop a run between steps, and
the guard that stops it on a non-finite loss or gradient.

    vae-train resume=RUN_DIR [n_train_iters=N] [device=...] [progress=...] [checkpoint_every=...]

continues RUN_DIR in place from its last checkpoint with the config saved in it. checkpoint.pt
holds the model, the optimizer, the step and every RNG state (torch's, CUDA's), so on the CPU a
resumed run is bit for bit the run that was never stopped: the same batch draws, the same
dynamic binarization, the same latent samples. The static binarization is recomputed from
the seed. losses.csv is cut back to the checkpoint's step, so it ends with every step once.

Checkpoints: at step 0 (before losses.csv exists), every `checkpoint_every` steps, at the end,
and when SIGINT or SIGTERM arrives; always atomically (rundir.save_checkpoint).
Exit codes: 2 bad input, 3 non-finite loss or gradient, 130 SIGINT, 143 SIGTERM.

Under hydra/launcher=submitit_*, the preemption signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL
says otherwise) writes a checkpoint at the next step boundary, then hands over to submitit's
own handler, which calls Hydra's launcher `checkpoint` (a DelayedSubmission of the same job)
and requeues it. The requeued job composes the same config into the same directory, and
`prepare` resumes it there because it finds an unfinished checkpoint of an identical config.
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import vae_cli
from vae_cli.errors import ConfigError, Interrupted, NonFiniteError, RunDirError
from vae_cli.rundir import CHECKPOINT, LOSSES, SUMMARY, atomic_write_bytes, load_checkpoint, mean_and_stderr, save_checkpoint, write_json

log = logging.getLogger(__name__)

# Keys `vae-train resume=DIR KEY=VALUE` may change; any other override that differs from the
# saved config is refused (it would change the model, the data or the optimization).
# micro_batch splits the same step differently (same maths; float sums in another order),
# data.root and data.download only say where the md5-checked files are.
# cuda.* and compile are speed options of the machine the run continues on.
MUTABLE_ON_RESUME = ("n_train_iters", "progress", "device", "checkpoint_every", "micro_batch", "eval", "cuda", "compile",
                     "resume", "data.root", "data.download")
MUTABLE_TEXT = "n_train_iters, checkpoint_every, device, progress, micro_batch, eval.*, cuda.*, compile, data.root, data.download"
SUMMARY_WINDOW = 50  # as training.FINAL_WINDOW: final_loss of a stopped run is the mean of its last 50 steps
HYDRA_CONFIG = Path(".hydra") / "config.yaml"


# --- where a run starts ---------------------------------------------------------------------------


@dataclass
class StartPoint:
    """The config a run trains with and the checkpoint it continues (None: from step 0)."""

    cfg: DictConfig
    state: dict[str, Any] | None
    resumed: bool
    losses: bytes | None = None  # losses.csv cut back to the checkpoint's step (resumed runs)


def resume_command(run_dir: Path) -> str:
    return f"vae-train resume={shlex.quote(str(Path(run_dir).absolute()))}"


def prepare(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> StartPoint:
    """Check, without writing anything, where `train` starts in run_dir.

    resume=DIR: DIR's checkpoint and saved config, with the allowed overrides. Else an empty run
    directory starts from step 0, a requeued submitit job resumes its own unfinished checkpoint,
    and anything else is refused rather than overwritten."""
    run_dir = Path(run_dir)
    if cfg.resume is not None:
        if run_dir.absolute() != Path(cfg.resume).absolute():
            raise ConfigError(f"invalid value resume={cfg.resume!r}: a run resumes in its own directory, not in {run_dir} "
                              "(drop hydra.run.dir)")
        return _resume(cfg, run_dir, _task_overrides(overrides))
    if not ((run_dir / CHECKPOINT).exists() or (run_dir / LOSSES).exists()):
        return StartPoint(cfg, None, resumed=False)
    if os.environ.get("SUBMITIT_EXECUTOR") and (run_dir / CHECKPOINT).exists():
        start = _resume(cfg, run_dir, [])
        if _comparable(start.cfg) == _comparable(cfg):
            log.info("requeued job: resuming %s from step %d", run_dir, start.state["step"] if start.state else 0)
            return start
    raise RunDirError(f"{run_dir} already holds a run: refusing to overwrite it (continue it with {resume_command(run_dir)})")


def _comparable(cfg: DictConfig) -> dict:
    config = OmegaConf.to_container(cfg, resolve=True)
    for key in ("resume", "progress", "hydra"):
        config.pop(key, None)
    return config


def _resume(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> StartPoint:
    if not run_dir.is_dir():
        raise RunDirError(f"cannot resume {run_dir}: no such directory")
    if (run_dir / CHECKPOINT).exists():
        state = load_checkpoint(run_dir / CHECKPOINT)
        saved, source = state.get("config"), run_dir / CHECKPOINT
        step = state.get("step")
        if not isinstance(saved, dict) or not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise RunDirError(f"{source} is not a vae-cli training checkpoint (no config or step)")
        for key in ("model", "optimizer", "rng"):
            if not isinstance(state.get(key), dict):
                raise RunDirError(f"{source} is not a vae-cli training checkpoint (no {key})")
    elif (run_dir / LOSSES).exists():
        raise RunDirError(f"cannot resume {run_dir}: it has {LOSSES} but no {CHECKPOINT}")
    elif (run_dir / HYDRA_CONFIG).exists():  # stopped before its step-0 checkpoint: start again from step 0
        state, source, step = None, run_dir / HYDRA_CONFIG, 0
        try:
            saved = OmegaConf.to_container(OmegaConf.load(source))
        except (OSError, UnicodeDecodeError, ValueError, OmegaConfBaseException, yaml.YAMLError) as exc:
            raise RunDirError(f"{source} is not a readable config ({type(exc).__name__})") from None
        if not isinstance(saved, dict):
            raise RunDirError(f"{source} does not hold a config")
    else:
        raise RunDirError(f"cannot resume {run_dir}: not a vae-train run directory (no {CHECKPOINT})")

    effective = _effective_config(cfg, saved, source, overrides)
    if step > effective.n_train_iters:
        raise ConfigError(
            f"invalid value n_train_iters={effective.n_train_iters}: {run_dir} is already at step {step}; allowed >= {step}"
        )
    summary = run_dir / SUMMARY
    if step == effective.n_train_iters and summary.exists() and _status(summary) == "completed":
        raise RunDirError(
            f"{run_dir} is complete at step {step}: nothing to resume (pass n_train_iters=N with N > {step} to extend it)"
        )
    losses = None
    if state is not None:
        from vae_cli.objectives import OBJECTIVES

        _check_state(state, effective, source)
        columns = ["step", "loss", *OBJECTIVES[effective.objective.name].terms]
        losses = losses_up_to(run_dir / LOSSES, columns, step)
    return StartPoint(effective, state, resumed=True, losses=losses)


def _check_state(state: dict[str, Any], cfg: DictConfig, source: Path) -> None:
    """Load the checkpoint into a throwaway model and optimizer built from cfg, so that a
    mismatch is found before anything in the run directory is written."""
    from vae_cli.models import build_model
    from vae_cli.objectives import OBJECTIVES

    model = build_model(cfg, OBJECTIVES[cfg.objective.name].uses_encoder)
    rng = state["rng"].get("torch")
    try:
        model.load_state_dict(state["model"])
        torch.optim.Adam(model.parameters(), lr=cfg.lr).load_state_dict(state["optimizer"])
        ok_rng = isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and rng.shape == torch.get_rng_state().shape
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise RunDirError(f"{source} does not match its own config: {str(exc).splitlines()[0][:200]}") from None
    if not ok_rng:
        raise RunDirError(f"{source} does not hold torch's RNG state")


def check_data_files(cfg: DictConfig) -> None:
    """The md5s (MNIST) or sizes of a resumed run's data files, when they are there: a bad file is
    refused before Hydra writes into the run directory (missing ones are built by load_data)."""
    if cfg.data.name == "synthetic":
        return
    from vae_cli.data import RAW_FILES, check_raw_files, raw_folder

    raw = raw_folder(cfg.data.name, Path(str(cfg.data.root)).expanduser())
    if all((raw / f).exists() for f in RAW_FILES):
        check_raw_files(cfg.data.name, raw)


def _status(summary: Path) -> str | None:
    from vae_cli.rundir import read_json

    return read_json(summary).get("status")


def _task_overrides(overrides: list[str] | None) -> list[str]:
    if overrides is not None:
        return list(overrides)
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _effective_config(cfg: DictConfig, saved: dict, source: Path, overrides: list[str]) -> DictConfig:
    """The saved config, with the command line's values of the keys that may change."""
    from vae_cli.config import validate

    current = OmegaConf.create({k: cfg[k] for k in cfg if k != "hydra"}) if "hydra" in cfg else cfg.copy()
    effective = saved_config(saved, source)
    for key, value in _changed_keys(current, overrides):
        before = OmegaConf.select(effective, key, default=None)
        if before != value:
            raise ConfigError(
                f"cannot change {key} when resuming: the run has {key}={before!r}, the command line asks {key}={value!r} "
                f"(a resumed run may change {MUTABLE_TEXT}; start a new run instead)"
            )
    mutable = list(_changed_keys(current, overrides, mutable_only=True))
    for key, value in mutable:
        OmegaConf.update(effective, key, value, merge=False)
    try:
        validate(effective)
    except ConfigError as exc:
        if mutable:
            raise
        raise RunDirError(f"{source} holds a config this vae-cli refuses: {exc}") from None
    return effective


def saved_config(saved: Any, source: Path) -> DictConfig:
    """A run's saved config (checkpoint.pt or .hydra/config.yaml) typed by this version's schema:
    a key this version does not know, or a value of the wrong type, is a RunDirError. Keys the
    run predates get their defaults."""
    from vae_cli.config import Config, objective_schema

    if not isinstance(saved, dict):
        raise RunDirError(f"{source} does not hold a vae-cli config")
    try:
        objective = saved.get("objective") or {}
        typed = OmegaConf.merge(OmegaConf.structured(Config), {k: v for k, v in saved.items() if k != "objective"})
        typed.objective = OmegaConf.merge(OmegaConf.structured(objective_schema(OmegaConf.create(objective))), objective)
    except (OmegaConfBaseException, ValueError, TypeError, AttributeError) as exc:
        raise RunDirError(f"{source} is from another vae-cli version or program: {str(exc).splitlines()[0]}") from None
    return typed


def _changed_keys(current: DictConfig, overrides: list[str], mutable_only: bool = False):
    """(key, value) for each command-line override of a task key; group choices give their name."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group.replace("/", ".")
        if key.startswith("hydra") or key == "resume":
            continue
        mutable = any(key == m or key.startswith(m + ".") for m in MUTABLE_ON_RESUME)
        if mutable_only != mutable:
            continue
        node = OmegaConf.select(current, key, default=None)
        if mutable_only:
            yield key, OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        elif OmegaConf.is_dict(node):  # a config group choice (objective=elbo): compare its name
            if "name" in node:
                yield f"{key}.name", node.name
        else:
            yield key, node


# --- losses.csv -----------------------------------------------------------------------------------


def losses_up_to(path: Path, columns: list[str], step: int) -> bytes:
    """losses.csv's header and rows for steps 1..step, checked; rows after step (written after the
    checkpoint, or torn by a kill) are left out. RunDirError if those rows are not all there."""
    header = ",".join(columns)
    if step == 0:
        return (header + "\n").encode()
    try:
        lines = path.read_bytes().decode().split("\n")
    except FileNotFoundError:
        raise RunDirError(f"{path} does not exist, but the checkpoint is at step {step}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path} cannot be read ({type(exc).__name__})") from None
    if lines[0] != header:
        raise RunDirError(f"{path} has header {lines[0][:80]!r}, expected {header!r}")
    kept = [header]
    for i, line in enumerate(lines[1 : step + 1], start=1):
        fields = line.split(",")
        try:
            ok = len(fields) == len(columns) and int(fields[0]) == i and all(_is_number(f) for f in fields[1:])
        except ValueError:
            ok = False
        if not ok or (i == step and len(lines) == step + 1):  # the checkpoint's own row must be whole
            raise RunDirError(f"{path} line {i + 1} is not the row of step {i}: {line[:80]!r} (the file is corrupt)")
        kept.append(line)
    if len(kept) < step + 1:
        raise RunDirError(f"{path} ends at step {len(kept) - 1}, but the checkpoint is at step {step} (the file is corrupt)")
    return ("\n".join(kept) + "\n").encode()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --- checkpoints ------------------------------------------------------------------------------------


class Checkpointer:
    """Writes the run's checkpoint.pt: model, optimizer, step, every RNG state, resolved config."""

    def __init__(self, run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: DictConfig,
                 device: torch.device):
        self.path = Path(run_dir) / CHECKPOINT
        self.model, self.optimizer, self.cfg, self.device = model, optimizer, cfg, device
        self.step: int | None = None  # the step of the last checkpoint written or restored

    def save(self, step: int) -> None:
        save_checkpoint(
            self.path,
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "step": step,
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
                },
                "config": OmegaConf.to_container(self.cfg, resolve=True),
                "vae_cli_version": vae_cli.__version__,
            },
        )
        self.step = step

    def maybe_save(self, step: int) -> None:
        if step % self.cfg.checkpoint_every == 0:
            self.save(step)

    def begin(self, start: StartPoint, losses_path: Path) -> int:
        """Restore start's checkpoint (RNG states last) and cut losses.csv back to its step; or,
        for a new run, write the step-0 checkpoint. Returns the step training continues after."""
        run_dir = self.path.parent
        state = start.state
        if state is not None:  # checked by prepare(): loads into this model and optimizer
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"]["torch"])
            if self.device.type == "cuda" and state["rng"].get("cuda"):
                torch.cuda.set_rng_state_all([t.cpu() for t in state["rng"]["cuda"]])
        for stale in run_dir.glob(".*.tmp-*"):  # left by a kill during an atomic write
            stale.unlink(missing_ok=True)
        if start.resumed:
            (run_dir / SUMMARY).unlink(missing_ok=True)  # the stopped run's summary; rewritten at the end
        if state is None:
            if start.resumed:
                losses_path.unlink(missing_ok=True)
            self.save(0)
            return 0
        atomic_write_bytes(losses_path, start.losses)
        self.step = state["step"]
        log.info("resumed %s at step %d of %d", run_dir, self.step, self.cfg.n_train_iters)
        return self.step


# --- stopping between steps ------------------------------------------------------------------------


def preemption_signal() -> signal.Signals | None:
    """The signal submitit sends before preempting or timing out a job (USR2 unless configured)."""
    name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, name, None)


class StopSignals:
    """SIGINT and SIGTERM, and under submitit its preemption signal, set a flag that the training
    loop reads between steps (a handler does no I/O: the step in progress finishes first).
    Handlers are installed only in the main thread and restored on exit."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self
        signals = [signal.SIGINT, signal.SIGTERM]
        preempt = preemption_signal()
        if preempt is not None and callable(signal.getsignal(preempt)):  # submitit installed its requeue handler
            signals.append(preempt)
        for sig in signals:
            if signal.getsignal(sig) is not signal.SIG_IGN:  # ignored (nohup, a background job): leave it so
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def stop(self, checkpoints: Checkpointer, step: int, summary: Callable[[str, int, dict], None]) -> None:
        """Act on the signal received during step `step + 1`'s predecessor: checkpoint at `step`,
        then raise Interrupted (SIGINT, SIGTERM), or hand a preemption over to submitit."""
        signum, self.received = self.received, None
        if checkpoints.step != step:
            checkpoints.save(step)
        name = signal.Signals(signum).name
        run_dir = checkpoints.path.parent
        if signum in (signal.SIGINT, signal.SIGTERM):
            summary("interrupted", step, {"signal": name, "resume": resume_command(run_dir)})
            raise Interrupted(f"interrupted at step {step} ({name}); resume with: {resume_command(run_dir)}", 128 + signum)
        summary("preempted", step, {"signal": name, "resume": resume_command(run_dir)})
        log.warning("%s at step %d: checkpoint written; handing over to submitit to requeue the job", name, step)
        previous = self._previous.get(signum)
        signal.signal(signum, previous)  # submitit's handler; it requeues and exits
        del self._previous[signum]
        previous(signum, None)


# --- numerical faults -----------------------------------------------------------------------------


def check_finite(totals: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Raise NonFiniteError naming the first non-finite loss term or parameter gradient; one
    device sync per step. Called after backward, before the optimizer step."""
    grads = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
    norms = torch._foreach_norm([g for _, g in grads]) if grads else []
    values = [torch.as_tensor(v).detach().float().reshape(()) for v in totals.values()]
    if bool(torch.isfinite(torch.stack(values + [n.float() for n in norms])).all()):
        return
    for name, value in totals.items():
        if not torch.isfinite(torch.as_tensor(value)).all():
            raise NonFiniteError(f"{name} = {float(value)}")
    for (name, _), norm in zip(grads, norms):
        if not torch.isfinite(norm):
            raise NonFiniteError(f"gradient of {name} (norm {float(norm)})")
    raise NonFiniteError("loss terms or gradients")  # pragma: no cover - isfinite disagreed with itself


def failure(exc: NonFiniteError, step: int, checkpoints: Checkpointer, summary: Callable[[str, int, dict], None]) -> NonFiniteError:
    """The error that ends a run whose step `step` went non-finite; summary.json says failed.
    No optimizer step was taken and no checkpoint is written: the last good one stays."""
    term = str(exc)
    summary("failed", step - 1, {"failed_step": step, "failed_term": term, "checkpoint_step": checkpoints.step})
    return NonFiniteError(
        f"non-finite {term} at step {step}: run stopped, checkpoint of step {checkpoints.step} kept, "
        f"summary.json status failed ({checkpoints.path.parent})"
    )


def write_stopped_summary(run_dir: Path, cfg: DictConfig, status: str, step: int, facts: dict[str, Any],
                          extra: dict[str, Any]) -> None:
    """summary.json of a run that stopped before the end: the same headline keys as a completed run's,
    from the losses so far, with `status` and what happened."""
    from vae_cli.rundir import read_losses

    try:
        history = read_losses(Path(run_dir) / LOSSES)["loss"][:step]
    except RunDirError:
        history = []
    window = history[-SUMMARY_WINDOW:]
    final_loss, stderr = mean_and_stderr(window) if window else (float("nan"), float("nan"))
    write_json(Path(run_dir) / SUMMARY, {
        "status": status,
        "objective": cfg.objective.name,
        "K": cfg.K,
        "n_samples": cfg.n_samples,
        "batch_size": cfg.batch_size,
        "steps": step,
        "n_train_iters": cfg.n_train_iters,
        "final_loss": final_loss,
        "final_loss_stderr": stderr,
        "final_loss_window": len(window),
        "last_loss": history[-1] if history else float("nan"),
        **facts,
        "torch_version": torch.__version__,
        "vae_cli_version": vae_cli.__version__,
        "seed": cfg.seed,
        **extra,
    })
