"""The training loop: `train(cfg) -> metrics`, a plain function that Hydra's entry point calls."""
from __future__ import annotations

import ctypes
import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm import tqdm

import vae_cli
from vae_cli.config import validate
from vae_cli.data import load_data
from vae_cli.errors import ConfigError, NonFiniteError, RunDirError
from vae_cli.models import N_PIXELS, LatentVariableModel, build_model
from vae_cli.objectives import OBJECTIVES, Objective
from vae_cli.plotting import save_loss_plot, save_sample_grids
from vae_cli.resume import Checkpointer, StopSignals, check_finite, failure, prepare, write_stopped_summary
from vae_cli.rundir import LOSSES, SUMMARY, LossLog, mean_and_stderr, read_losses, write_json

log = logging.getLogger(__name__)

FINAL_WINDOW = 50  # final_loss is the mean of the last this-many step losses
# On the CPU, glibc serves blocks over 32 MiB with fresh mmaps that page-fault on every step;
# micro-batches whose logits stay under this many floats (16 MiB) are reused from the heap.
CPU_MICRO_BATCH_ELEMENTS = 1 << 22


# glibc's mallopt parameters; M_MMAP_THRESHOLD is capped at 32 MiB on 64-bit systems.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_MMAP_THRESHOLD = 32 << 20
HEAP_TRIM_THRESHOLD = 1 << 30


def keep_freed_heap_memory() -> bool:
    """Ask glibc to serve blocks up to 32 MiB from the heap and to keep up to 1 GiB of freed heap
    instead of handing it back to the system, which made every CPU step page-fault its logits and
    activations in anew (~25k faults a step; the default jensen step went from 0.82 s to 0.78 s).
    Process-wide; False where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD))


def set_process_speed_settings(device: torch.device, heap: bool = True) -> dict[str, bool]:
    """The process-wide settings train() makes before its first step; the benchmark makes them too.

    Importance weights drive most of prior_iwae's gradients towards zero, and denormal floats made
    its CPU step 5x slower (4.1 s vs 0.83 s, `make bench`). Flushing changes values below 1e-38 only."""
    return {"flush_denormal": torch.set_flush_denormal(True),
            "heap_kept": heap and device.type == "cpu" and keep_freed_heap_memory()}


def micro_batch_size(cfg: DictConfig, device: torch.device) -> int:
    """Images per forward/backward pass. Gradients are accumulated, so the step is the same."""
    if cfg.micro_batch > 0:
        return min(cfg.micro_batch, cfg.batch_size)
    if device.type == "cuda" or cfg.objective.get("shared_samples", False):  # shared: logits are (n_samples, 784)
        return cfg.batch_size
    return max(1, min(cfg.batch_size, CPU_MICRO_BATCH_ELEMENTS // (cfg.n_samples * N_PIXELS)))


def train_step(model, optimizer, objective: Objective, x: torch.Tensor, n_samples: int, micro_batch: int,
               options: Any = None, autocast: torch.dtype | None = None) -> dict[str, float]:
    """One optimizer step on the batch x: the loss is the batch mean, accumulated over micro-batches.

    `options` is the objective's config node; `autocast` a dtype for the forward pass (cuda.bf16)."""
    optimizer.zero_grad(set_to_none=True)
    totals: dict[str, torch.Tensor] = {}
    for xc in x.split(micro_batch):
        weight = len(xc) / len(x)
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            out = objective(model, xc, n_samples, options)
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
    summary.json records them, with the autocast dtype of train_step (cuda.bf16)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg.cuda.tf32)
    if cfg.compile:
        model.compile_likelihood()
    options = {
        "shared_samples": bool(cfg.objective.get("shared_samples", False)),
        "compile": bool(cfg.compile),
        "tf32": bool(cfg.cuda.tf32),
        "bf16": bool(cfg.cuda.bf16),
    }
    return options, torch.bfloat16 if cfg.cuda.bf16 else None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.info("CUDA is not available: training on the CPU (%d threads)", torch.get_num_threads())
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("invalid value device='cuda': CUDA is not available here; allowed auto, cpu")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def run_label(cfg: DictConfig) -> str:
    return f"{cfg.objective.name}, K={cfg.K}, n_samples={cfg.n_samples}, batch={cfg.batch_size}"


def default_run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise RunDirError("no run directory: call train(cfg, run_dir=...) outside a Hydra app")
    return Path(HydraConfig.get().runtime.output_dir)


def train(cfg: DictConfig, run_dir: Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train the model `cfg` describes, write every artifact into `run_dir`, return summary.json's dict.

    With cfg.resume set, continue that run in place from its checkpoint with its saved config
    (`overrides`, by default Hydra's task overrides, say which keys the command line changes)."""
    validate(cfg)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir()
    start_point = prepare(cfg, run_dir, overrides)  # refuses an occupied run dir; a resumed run's own config
    cfg = start_point.cfg
    run_dir.mkdir(parents=True, exist_ok=True)

    device = resolve_device(cfg.device)
    process_settings = set_process_speed_settings(device)
    torch.manual_seed(cfg.seed)
    data = load_data(cfg.data, cfg.seed, device)
    log.info("data: %s, %d training images, binarization %s", data.source, len(data.train), cfg.data.binarization)
    objective = OBJECTIVES[cfg.objective.name]
    model = build_model(cfg, objective.uses_encoder, data.pixel_means).to(device)
    speed, autocast = apply_speed_options(cfg, model, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    checkpoints = Checkpointer(run_dir, model, optimizer, cfg, device)
    first_step = checkpoints.begin(start_point, run_dir / LOSSES)  # restores every RNG state last
    columns = ["step", "loss", *objective.terms]
    losses = LossLog(run_dir / LOSSES, columns)
    label = run_label(cfg)
    micro_batch = micro_batch_size(cfg, device)
    facts = {"micro_batch": micro_batch, "device": describe_device(device), "data": data.source}

    def stopped(status: str, step: int, extra: dict[str, Any]) -> None:  # summary.json of a run that stops early
        write_stopped_summary(run_dir, cfg, status, step, facts, extra)

    start = time.perf_counter()
    bar = tqdm(range(first_step + 1, cfg.n_train_iters + 1), initial=first_step, total=cfg.n_train_iters,
               desc=cfg.objective.name, disable=not cfg.progress, unit="it")
    try:
        with StopSignals() as signals:
            for step in bar:
                if signals.received is not None:  # SIGINT, SIGTERM, preemption: checkpoint at step - 1
                    signals.stop(checkpoints, step - 1, stopped)
                try:
                    x = data.batch(cfg.batch_size)
                    row = {"step": step, **train_step(model, optimizer, objective, x, cfg.n_samples, micro_batch, cfg.objective, autocast)}
                except NonFiniteError as exc:
                    raise failure(exc, step, checkpoints, stopped) from None
                losses.append(row)
                checkpoints.maybe_save(step)
                bar.set_postfix(loss=f"{row['loss']:.2f}", refresh=False)
                if step % max(1, cfg.n_train_iters // 10) == 0 or step == cfg.n_train_iters:
                    log.info("step %d/%d loss %.3f", step, cfg.n_train_iters, row["loss"])
    finally:
        losses.close()
        bar.close()
    train_seconds = time.perf_counter() - start

    if checkpoints.step != cfg.n_train_iters:
        checkpoints.save(cfg.n_train_iters)
    history = read_losses(run_dir / LOSSES)
    window = history["loss"][-FINAL_WINDOW:]
    final_loss, final_loss_stderr = mean_and_stderr(window)
    summary = {
        "status": "completed",
        "objective": cfg.objective.name,
        "K": cfg.K,
        "n_samples": cfg.n_samples,
        "batch_size": cfg.batch_size,
        "micro_batch": micro_batch,
        "speed_options": speed,
        "process_settings": process_settings,
        "steps": cfg.n_train_iters,
        "final_loss": final_loss,
        "final_loss_stderr": final_loss_stderr,
        "final_loss_window": len(window),
        "last_loss": history["loss"][-1],
        "train_seconds": train_seconds,
        "it_per_s": (cfg.n_train_iters - first_step) / train_seconds,
        "device": describe_device(device),
        "torch_version": torch.__version__,
        "vae_cli_version": vae_cli.__version__,
        "data": data.source,
        "seed": cfg.seed,
    }
    save_loss_plot(history, run_dir / "loss.png", label)
    save_sample_grids(model, run_dir, label)
    write_json(run_dir / SUMMARY, summary)
    log.info(
        "%s: final loss %.2f +- %.2f nats (mean of last %d steps), %.2f it/s on %s; wrote %s",
        cfg.objective.name, final_loss, final_loss_stderr, len(window), summary["it_per_s"], summary["device"], run_dir,
    )
    if cfg.eval.enabled:  # test-set log p(x) and the bounds' gaps: eval.json, headline numbers into summary.json
        from vae_cli.evaluate import evaluate_and_save, headline

        result = evaluate_and_save(model, data.test, cfg.eval, run_dir, objective=cfg.objective.name, data=data.source)
        summary.update(headline(result))
    return summary
