"""The training loop: `fit` trains a model from step 0 or from a checkpoint, writing losses.csv,
checkpoint.pt and summary.json (status `trained`) as it goes. Figures and evaluation are other
stages (vae_cli.pipeline). Exit codes of a stopped run: 3 non-finite loss or gradient, 130
SIGINT, 143 SIGTERM.

Under hydra/launcher=submitit_*, the preemption signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL
says otherwise) writes a checkpoint at the next step boundary, then hands over to submitit's
own handler, which calls Hydra's launcher `checkpoint` (a DelayedSubmission of the same job)
and requeues it; the requeued job resumes in its run directory (vae_cli.pipeline.prepare).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from vae_cli.config import micro_batch_size, model_spec, objective_options
from vae_cli.data import BinarizedData
from vae_cli.device import describe_device, set_process_speed_settings
from vae_cli.errors import Interrupted, NonFiniteError
from vae_cli.models import LatentVariableModel, build_model
from vae_cli.objectives import OBJECTIVES, Objective
from vae_cli.rundir import (
    LOSSES,
    SUMMARY,
    Checkpointer,
    LossLog,
    atomic_write_bytes,
    remove_temp_files,
    write_summary,
)
from vae_cli.tracking import Tracker

log = logging.getLogger(__name__)


def train_step(
    model,
    optimizer,
    objective: Objective,
    x: torch.Tensor,
    n_samples: int,
    micro_batch: int,
    options: Mapping[str, Any] | None = None,
    autocast: torch.dtype | None = None,
) -> dict[str, float]:
    """One optimizer step on the batch x: the loss is the batch mean, accumulated over micro-batches.

    `options` are the objective's own (config.objective_options); `autocast` a dtype for the forward
    pass (cuda.bf16, cpu.bf16), where the likelihood stays float32."""
    optimizer.zero_grad(set_to_none=True)
    totals: dict[str, torch.Tensor] = {}
    for xc in x.split(micro_batch):
        weight = len(xc) / len(x)
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            out = objective(model, xc, n_samples, **(options or {}))
        (out.loss * weight).backward()
        for name, value in {"loss": out.loss.detach(), **out.terms}.items():
            totals[name] = totals.get(name, 0.0) + value * weight
    check_finite(totals, model)  # NonFiniteError before a NaN or Inf reaches the parameters
    optimizer.step()
    return {name: value.item() for name, value in totals.items()}


def apply_speed_options(
    cfg: DictConfig, model: LatentVariableModel, device: torch.device
) -> tuple[dict[str, bool], torch.dtype | None]:
    """Sets this run's speed options up (TF32 matmuls on CUDA, compile) and returns them as
    summary.json records them, with the autocast dtype of train_step (cuda.bf16, cpu.bf16)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg.cuda.tf32)
    if cfg.compile:
        model.compile_likelihood()
    options = {
        "shared_samples": bool(cfg.objective.get("shared_samples", False)),
        "compile": bool(cfg.compile),
        "tf32": bool(cfg.cuda.tf32),
        "bf16": bool(cfg.cuda.bf16 or cfg.cpu.bf16),  # validate() allows each on its own device only
    }
    return options, torch.bfloat16 if options["bf16"] else None


def run_label(cfg: DictConfig) -> str:
    return f"{cfg.objective.name}, K={cfg.K}, n_samples={cfg.n_samples}, batch={cfg.batch_size}"


def resume_command(run_dir: Path) -> str:
    return f"vae-train resume={shlex.quote(str(Path(run_dir).absolute()))}"


def fit(
    cfg: DictConfig,
    run_dir: Path,
    data: BinarizedData,
    device: torch.device,
    state: dict[str, Any] | None = None,
    losses: bytes | None = None,
    resumed: bool = False,
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Train the model cfg describes on `data`, from step 0 or from the checked checkpoint `state`
    (with losses.csv cut back to its step: `losses`); returns summary.json's dict (status trained).
    `tracker` (vae_cli.tracking) is given every step and every checkpoint.

    Expects torch's RNG seeded with cfg.seed before `data` was loaded (the batches draw from it)."""
    run_dir = Path(run_dir)
    process_settings = set_process_speed_settings(device)
    objective = OBJECTIVES[cfg.objective.name]
    model = build_model(model_spec(cfg), data.pixel_means).to(device)
    speed, autocast = apply_speed_options(cfg, model, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    checkpoints = Checkpointer(run_dir, model, optimizer, cfg, device)
    first_step = _begin(checkpoints, state, losses, resumed)  # restores every RNG state last
    tracker = tracker or Tracker(cfg, run_dir)
    if first_step == 0:
        tracker.checkpoint(0, model)  # prior_draws has its own generator: training's RNG stream is untouched
    log_file = LossLog(run_dir / LOSSES, ["step", "loss", *objective.terms])
    micro_batch = micro_batch_size(cfg, device)
    options = objective_options(cfg)
    facts = {"micro_batch": micro_batch, "device": describe_device(device), "data": data.source}

    def stopped(status: str, step: int, extra: dict[str, Any]) -> dict[str, Any]:  # a run that stops early
        return write_summary(run_dir, cfg, status, step, facts, extra)

    start = last = time.perf_counter()
    bar = tqdm(
        range(first_step + 1, cfg.n_train_iters + 1),
        initial=first_step,
        total=cfg.n_train_iters,
        desc=cfg.objective.name,
        disable=not cfg.progress,
        unit="it",
    )
    try:
        with StopSignals() as signals:
            for step in bar:
                if signals.received is not None:  # SIGINT, SIGTERM, preemption: checkpoint at step - 1
                    signals.stop(checkpoints, step - 1, stopped)
                try:
                    x = data.batch(cfg.batch_size)
                    row = {
                        "step": step,
                        **train_step(model, optimizer, objective, x, cfg.n_samples, micro_batch, options, autocast),
                    }
                except NonFiniteError as exc:
                    raise failure(exc, step, checkpoints, stopped) from None
                log_file.append(row)
                now = time.perf_counter()
                tracker.step(row, 1.0 / (now - last))
                last = now
                if checkpoints.maybe_save(step):
                    tracker.checkpoint(step, model)
                bar.set_postfix(loss=f"{row['loss']:.2f}", refresh=False)
                if step % max(1, cfg.n_train_iters // 10) == 0 or step == cfg.n_train_iters:
                    log.info("step %d/%d loss %.3f", step, cfg.n_train_iters, row["loss"])
    finally:
        log_file.close()
        bar.close()
    train_seconds = time.perf_counter() - start
    if checkpoints.step != cfg.n_train_iters:
        checkpoints.save(cfg.n_train_iters)
        tracker.checkpoint(cfg.n_train_iters, model)
    facts.update(
        speed_options=speed,
        process_settings=process_settings,
        train_seconds=train_seconds,
        it_per_s=(cfg.n_train_iters - first_step) / train_seconds,
    )
    summary = write_summary(run_dir, cfg, "trained", cfg.n_train_iters, facts)
    log.info(
        "%s: final loss %.2f +- %.2f nats (mean of last %d steps), %.2f it/s on %s; wrote %s",
        cfg.objective.name,
        summary["final_loss"],
        summary["final_loss_stderr"],
        summary["final_loss_window"],
        summary["it_per_s"],
        summary["device"],
        run_dir,
    )
    return summary


def _begin(checkpoints: Checkpointer, state: dict[str, Any] | None, losses: bytes | None, resumed: bool) -> int:
    """Restore `state` and cut losses.csv back to its step; or, for a new run, write the step-0
    checkpoint. Returns the step training continues after."""
    run_dir = checkpoints.path.parent
    remove_temp_files(run_dir)  # left by a kill during an atomic write
    if resumed:
        (run_dir / SUMMARY).unlink(missing_ok=True)  # the stopped run's summary; rewritten at the end
    if state is None:
        if resumed:
            (run_dir / LOSSES).unlink(missing_ok=True)
        checkpoints.save(0)
        return 0
    step = checkpoints.restore(state)
    atomic_write_bytes(run_dir / LOSSES, losses)
    log.info("resumed %s at step %d of %d", run_dir, step, checkpoints.cfg.n_train_iters)
    return step


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

    def __enter__(self) -> StopSignals:
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

    def stop(self, checkpoints: Checkpointer, step: int, summary: Callable[[str, int, dict], object]) -> None:
        """Act on the signal received during step `step + 1`'s predecessor: checkpoint at `step`,
        then raise Interrupted (SIGINT, SIGTERM), or hand a preemption over to submitit."""
        signum, self.received = self.received, None
        if checkpoints.step != step:
            checkpoints.save(step)
        name = signal.Signals(signum).name
        run_dir = checkpoints.path.parent
        if signum in (signal.SIGINT, signal.SIGTERM):
            summary("interrupted", step, {"signal": name, "resume": resume_command(run_dir)})
            raise Interrupted(
                f"interrupted at step {step} ({name}); resume with: {resume_command(run_dir)}", 128 + signum
            )
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


def failure(
    exc: NonFiniteError, step: int, checkpoints: Checkpointer, summary: Callable[[str, int, dict], object]
) -> NonFiniteError:
    """The error that ends a run whose step `step` went non-finite; summary.json says failed.
    No optimizer step was taken and no checkpoint is written: the last good one stays."""
    term = str(exc)
    summary("failed", step - 1, {"failed_step": step, "failed_term": term, "checkpoint_step": checkpoints.step})
    return NonFiniteError(
        f"non-finite {term} at step {step}: run stopped, checkpoint of step {checkpoints.step} kept, "
        f"summary.json status failed ({checkpoints.path.parent})"
    )
