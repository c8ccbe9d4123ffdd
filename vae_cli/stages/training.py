"""The training stage: `fit` trains a model from step 0 or from a checkpoint, writing losses.csv,
checkpoint.pt and, at its end, summary.json (status `trained`), and hands the trained model and its
losses on in memory. Exit codes of a stopped run: 3 non-finite loss or gradient, 130 SIGINT, 143
SIGTERM.

Under hydra/launcher=submitit_*, the preemption signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL
says otherwise) writes a checkpoint at the next step boundary, then hands over to submitit's
own handler, which calls Hydra's launcher `checkpoint` (a DelayedSubmission of the same job)
and requeues it; the requeued job resumes in its run directory (vae_cli.stages.pipeline.prepare).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm import tqdm

import vae_cli
from vae_cli.errors import Interrupted, NonFiniteError
from vae_cli.maths.models import LatentVariableModel, build_model
from vae_cli.maths.objectives import OBJECTIVES, Objective
from vae_cli.maths.spec import FLOAT_BYTES, N_PIXELS, ModelSpec
from vae_cli.run.checkpoint import Checkpointer
from vae_cli.run.config import decodes_shared_latents, objective_options, summary_settings
from vae_cli.run.data import Images
from vae_cli.run.datafiles import split_sizes
from vae_cli.run.files import remove_temp_files
from vae_cli.run.machine import cpu_has_bf16, describe_device
from vae_cli.run.preflight import requeued_job, resume_command
from vae_cli.run.rundir import LOSSES, SUMMARY, LossLog, forget_evaluation, new_summary, write_summary
from vae_cli.stages.tracking import Tracker

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
            out = objective.fn(model, xc, n_samples, **(options or {}))
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


# On the CPU, glibc serves blocks over 32 MiB with fresh mmaps that page-fault on every step;
# micro-batches whose logits stay under this many floats (16 MiB) are reused from the heap.
CPU_MICRO_BATCH_ELEMENTS = 1 << 22


def micro_batch_size(cfg: DictConfig, device: torch.device) -> int:
    """Images per forward/backward pass. Gradients are accumulated, so the step is the same."""
    if cfg.micro_batch > 0:
        return min(cfg.micro_batch, cfg.batch_size)
    if device.type == "cuda" or decodes_shared_latents(cfg):  # shared: logits are (latents, 784)
        return cfg.batch_size
    return max(1, min(cfg.batch_size, CPU_MICRO_BATCH_ELEMENTS // (cfg.n_samples * N_PIXELS)))


@dataclass
class Fitted:
    """What training hands on in memory: the trained model, its step losses, summary.json's dict."""

    model: LatentVariableModel
    losses: dict[str, list[float]]
    summary: dict[str, Any]


def fit(
    cfg: DictConfig,
    spec: ModelSpec,
    run_dir: Path,
    images: Images,
    device: torch.device,
    facts: dict[str, Any],
    state: dict[str, Any] | None = None,
    losses: bytes | None = None,
    tracker: Tracker | None = None,
    place: Place | None = None,
) -> Fitted:
    """Train the model `spec` (the one cfg describes) on `images`, from step 0 or from the checked checkpoint `state`
    (with losses.csv cut back to its step: `losses`); summary.json says `trained` at the end.
    `facts` are the run's own (data, process settings, the lock), recorded in summary.json; `tracker`
    (vae_cli.stages.tracking) is given every step and every checkpoint; `place` where the run sits (a
    multirun's job, an +experiment preset), for the estimate after its first steps.

    Expects torch's RNG seeded with cfg.seed before `images` were loaded (the batches draw from it)."""
    run_dir = Path(run_dir)
    objective = OBJECTIVES[cfg.objective.name]
    model = build_model(spec, images.pixel_means, images.pixel_sd).to(device)
    speed, autocast = apply_speed_options(cfg, model, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    checkpoints = Checkpointer(run_dir, model, optimizer, cfg, device)
    remove_temp_files(run_dir)  # left by a kill during an atomic write
    (run_dir / SUMMARY).unlink(missing_ok=True)  # a stopped run's summary; rewritten when this one ends
    forget_evaluation(run_dir)  # a run trained further: its evaluation was of older parameters
    if state is None:
        (run_dir / LOSSES).unlink(missing_ok=True)  # a run killed before its step-0 checkpoint starts again
        checkpoints.save(0)
        first_step = 0
    else:
        first_step = checkpoints.restore(state)  # every RNG state last
        log.info("resumed %s at step %d of %d", run_dir, first_step, cfg.n_train_iters)
    log_file = LossLog(run_dir / LOSSES, ["step", "loss", *objective.terms], losses if state is not None else None)
    bar = None
    try:  # losses.csv is closed however this ends
        tracker = tracker or Tracker(cfg, run_dir)
        if first_step == 0:
            tracker.checkpoint(0, model)  # prior_draws has its own generator: training's RNG stream is untouched
        micro_batch = micro_batch_size(cfg, device)
        options = objective_options(cfg)
        settings = summary_settings(cfg)
        facts = {
            "micro_batch": micro_batch,
            "device": describe_device(device),
            **facts,
            "torch_version": torch.__version__,
            "vae_cli_version": vae_cli.__version__,
        }

        def stopped(status: str, step: int, extra: dict[str, Any]) -> dict[str, Any]:  # a run that stops early
            return write_summary(
                run_dir, {**new_summary(status, step, settings, log_file.history["loss"], facts), **extra}
            )

        start = last = time.perf_counter()
        hint = CpuHint(cfg, device, first_step, place)
        bar = tqdm(
            range(first_step + 1, cfg.n_train_iters + 1),
            initial=first_step,
            total=cfg.n_train_iters,
            desc=cfg.objective.name,
            disable=not cfg.progress,
            unit="it",
        )
        with StopSignals() as signals:
            for step in bar:
                if signals.received is not None:  # SIGINT, SIGTERM, preemption: checkpoint at step - 1
                    signals.stop(checkpoints, step - 1, stopped)
                try:
                    x = images.batch(cfg.batch_size)
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
                hint.after(step, now)
                if checkpoints.maybe_save(step):
                    tracker.checkpoint(step, model)
                bar.set_postfix(loss=f"{row['loss']:.2f}", refresh=False)
                if step % max(1, cfg.n_train_iters // 10) == 0 or step == cfg.n_train_iters:
                    log.info("step %d/%d loss %.3f", step, cfg.n_train_iters, row["loss"])
            if signals.received is not None:  # during the last step: the final checkpoint, then stop the same way
                signals.stop(checkpoints, cfg.n_train_iters, stopped)
    finally:
        log_file.close()
        if bar is not None:
            bar.close()
    train_seconds = time.perf_counter() - start
    if checkpoints.step != cfg.n_train_iters:
        checkpoints.save(cfg.n_train_iters)
        tracker.checkpoint(cfg.n_train_iters, model)
    facts.update(
        speed_options=speed, train_seconds=train_seconds, it_per_s=(cfg.n_train_iters - first_step) / train_seconds
    )
    summary = new_summary("trained", cfg.n_train_iters, settings, log_file.history["loss"], facts)
    write_summary(run_dir, summary)
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
    model.use_fused_likelihood()  # the stages after training run the plain model (compile was for the steps)
    return Fitted(model, log_file.history, summary)


@dataclass(frozen=True)
class Place:
    """Where a run sits: the +experiment preset it belongs to (its CPU hint never proposes that one),
    and in a multirun its job number and the number of jobs (it then estimates the sweep's total)."""

    experiment: str | None = None
    job: int | None = None  # 0-based
    jobs: int | None = None


DEMO = "demo"  # the +experiment preset the CPU hint proposes


class CpuHint:
    """One line after the first steps of a run on the CPU: how long the whole run will take at this
    pace, and the faster ways to the same lesson where they apply (the defaults are the reference
    experiment, sized for a GPU). A job of a multirun says, at the same point and on any device,
    how long the sweep's training will take at this pace."""

    STEPS = 3  # the first step warms up; the pace is taken over the next ones
    WORTH_IT_S = 120  # a run shorter than this needs no hint

    def __init__(self, cfg: DictConfig, device: torch.device, first_step: int, place: Place | None = None):
        self.cfg, self.first_step, self.place = cfg, first_step, place or Place()
        self.on_cpu = device.type == "cpu"
        self.done = not self.on_cpu and self.place.jobs is None
        self.since: float | None = None

    def after(self, step: int, now: float) -> None:
        """Called after every step with the time it ended."""
        if self.done:
            return
        if step == self.first_step + 1:
            self.since = now
        elif step - self.first_step > self.STEPS:
            self.done = True
            per_step = (now - self.since) / (step - self.first_step - 1)
            if self.place.jobs is not None:
                log.info(sweep_estimate(self.cfg, self.place, per_step, step))
            line = cpu_hint(self.cfg, per_step * (self.cfg.n_train_iters - step), self.place) if self.on_cpu else None
            if line:
                log.warning(line)


def sweep_estimate(cfg: DictConfig, place: Place, per_step: float, step: int) -> str:
    """The line a multirun's job says after its first steps: its own training time left, and the
    sweep's, the jobs after it taken at this job's pace (evaluation comes on top)."""
    this = per_step * (cfg.n_train_iters - step)
    later = max(0, place.jobs - place.job - 1)
    rest = this + later * per_step * cfg.n_train_iters
    what = f"the {place.experiment}" if place.experiment else "this sweep"
    return (
        f"{what}: run {place.job + 1} of {place.jobs} needs about {_duration(this)} more for its "
        f"{cfg.n_train_iters} steps; the {later} run{'' if later == 1 else 's'} after it about "
        f"{_duration(rest - this)} more at this pace: about {_duration(rest)} of training left in all "
        "(each run's evaluation adds to it)"
    )


def cpu_hint(cfg: DictConfig, seconds_left: float, place: Place | None = None) -> str | None:
    """The hint's line, where the rest of the run takes WORTH_IT_S or more; it never proposes the
    experiment the run belongs to."""
    if seconds_left < CpuHint.WORTH_IT_S:
        return None
    faster = []
    if "shared_samples" in cfg.objective and not cfg.objective.shared_samples:
        faster.append("objective.shared_samples=true (one set of prior draws per step: about 100x a step)")
    if not cfg.cpu.bf16 and cpu_has_bf16():
        faster.append("cpu.bf16=true (this CPU multiplies bf16 natively: about 2.7x a step)")
    if (place or Place()).experiment != DEMO:
        faster.append("vae-train -m +experiment=demo (jensen, the log-mean-exp and the ELBO in about 4 minutes)")
    elif not faster:
        return f"on the CPU this run needs about {_duration(seconds_left)} more for its {cfg.n_train_iters} steps"
    return (
        f"on the CPU this run needs about {_duration(seconds_left)} more for its {cfg.n_train_iters} steps "
        "(the defaults are the reference experiment, sized for a GPU); faster ways to the same lesson: "
        + "; ".join(faster)
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# --- the memory training needs ------------------------------------------------------------------------

# Adam keeps two moments beside each parameter and its gradient; a checkpoint copies both once more.
BYTES_PER_PARAMETER = 6 * FLOAT_BYTES
# A layer's output is kept for the backward and its gradient made there: two copies of each activation.
ACTIVATION_COPIES = 2


def _mlp_parameters(sizes: list[int]) -> int:
    return sum(n_in * n_out + n_out for n_in, n_out in zip(sizes[:-1], sizes[1:]))


def memory_parts(cfg: DictConfig, spec: ModelSpec, device: torch.device) -> list[tuple[str, int]]:
    """(the keys that set it, bytes) for each large allocation of training on `device`: estimates from
    the layer sizes, within a small factor of what torch allocates (the check is for sizes that are
    off by orders of magnitude, not for tuning)."""
    if spec.decoder == "linear":
        decoder, pass_width = [spec.K, N_PIXELS], N_PIXELS
    else:
        decoder, pass_width = [spec.K] + [spec.hidden] * spec.depth + [N_PIXELS], spec.hidden * spec.depth + N_PIXELS
    params = _mlp_parameters(decoder)
    if spec.encoder == "mlp":
        params += _mlp_parameters([N_PIXELS] + [spec.encoder_hidden] * spec.encoder_depth + [2 * spec.K])
    elif spec.encoder == "linear":
        params += _mlp_parameters([N_PIXELS, spec.K])
    images = sum(split_sizes(cfg.data).values())
    micro = micro_batch_size(cfg, device)
    shared = decodes_shared_latents(cfg)
    latents = cfg.objective.grid_points**cfg.K if cfg.objective.name == "exact" else cfg.n_samples
    rows = latents if shared else micro * cfg.n_samples
    return [
        ("model.hidden, model.depth", params * BYTES_PER_PARAMETER),
        ("", 2 * images * N_PIXELS * FLOAT_BYTES),  # the data set's images: no key makes them smaller
        ("batch_size", 2 * cfg.batch_size * N_PIXELS * FLOAT_BYTES),
        (
            "n_samples, batch_size, micro_batch, model.hidden",
            ACTIVATION_COPIES * rows * pass_width * FLOAT_BYTES
            + (micro * cfg.n_samples * FLOAT_BYTES if shared else 0),
        ),
    ]


def mlp_flops(rows: int, sizes: list[int]) -> int:
    """Matmul FLOPs of an MLP's forward pass over `rows` inputs: 2mnk per product."""
    return 2 * rows * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))


def step_flops(cfg: DictConfig, uses_encoder: bool, shared: bool) -> int:
    """Matmul FLOPs of one training step: forward 2mnk per product, backward twice the forward
    (make bench and vae-check divide it by the measured matmul rate: the step's floor)."""
    m, B, S = cfg.model, cfg.batch_size, cfg.n_samples
    forward = mlp_flops(S if shared else B * S, [cfg.K] + [m.hidden] * m.depth + [N_PIXELS])
    if shared:
        forward += 2 * B * S * N_PIXELS  # x @ logits.T
    if uses_encoder:
        hidden = m.encoder_hidden or m.hidden
        forward += mlp_flops(B, [N_PIXELS] + [hidden] * (m.encoder_depth or m.depth) + [2 * cfg.K])
    return 3 * forward


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
        name, resume = signal.Signals(signum).name, resume_command(checkpoints.path.parent)
        if signum in (signal.SIGINT, signal.SIGTERM):
            summary("interrupted", step, {"signal": name, "resume": resume})
            raise Interrupted(f"interrupted at step {step} ({name}); resume with: {resume}", 128 + signum)
        summary("preempted", step, {"signal": name, "resume": resume})
        log.warning("%s at step %d: checkpoint written; handing over to submitit to requeue the job", name, step)
        previous = self._previous.get(signum)
        signal.signal(signum, previous)  # submitit's handler; it requeues and exits
        del self._previous[signum]
        previous(signum, None)


def ignore_preemption_when_done() -> None:
    """Under submitit, once the run has finished: ignore the preemption signal for the rest of the
    process. A timeout signal between the run's end and the process's exit would otherwise kill a
    finished job (SLURM then reports it FAILED): Python gives its own handlers back to SIG_DFL while
    it shuts down, but keeps SIG_IGN."""
    preempt = preemption_signal()
    if preempt is not None and requeued_job() and threading.current_thread() is threading.main_thread():
        signal.signal(preempt, signal.SIG_IGN)


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
        f"{SUMMARY} status failed ({checkpoints.path.parent})"
    )
