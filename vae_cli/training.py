"""The training loop: `train(cfg) -> metrics`, a plain function that Hydra's entry point calls."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import vae_cli
from vae_cli.config import validate
from vae_cli.data import load_data
from vae_cli.errors import ConfigError, RunDirError
from vae_cli.models import N_PIXELS, build_model
from vae_cli.objectives import OBJECTIVES, Objective
from vae_cli.plotting import save_loss_plot, save_sample_grids
from vae_cli.rundir import CHECKPOINT, LOSSES, SUMMARY, LossLog, mean_and_stderr, read_losses, save_checkpoint, write_json

log = logging.getLogger(__name__)

FINAL_WINDOW = 50  # final_loss is the mean of the last this-many step losses
# On the CPU, glibc serves blocks over 32 MiB with fresh mmaps that page-fault on every step;
# micro-batches whose logits stay under this many floats (16 MiB) are reused from the heap.
CPU_MICRO_BATCH_ELEMENTS = 1 << 22


def micro_batch_size(cfg: DictConfig, device: torch.device) -> int:
    """Images per forward/backward pass. Gradients are accumulated, so the step is the same."""
    if cfg.micro_batch > 0:
        return min(cfg.micro_batch, cfg.batch_size)
    if device.type == "cuda":
        return cfg.batch_size
    return max(1, min(cfg.batch_size, CPU_MICRO_BATCH_ELEMENTS // (cfg.n_samples * N_PIXELS)))


def train_step(model, optimizer, objective: Objective, x: torch.Tensor, n_samples: int, micro_batch: int) -> dict[str, float]:
    """One optimizer step on the batch x: the loss is the batch mean, accumulated over micro-batches."""
    optimizer.zero_grad(set_to_none=True)
    totals: dict[str, torch.Tensor] = {}
    for xc in x.split(micro_batch):
        weight = len(xc) / len(x)
        out = objective(model, xc, n_samples)
        (out.loss * weight).backward()
        for name, value in {"loss": out.loss.detach(), **out.terms}.items():
            totals[name] = totals.get(name, 0.0) + value * weight
    optimizer.step()
    return {name: value.item() for name, value in totals.items()}


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


def train(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """Train the model `cfg` describes, write every artifact into `run_dir`, return summary.json's dict."""
    validate(cfg)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir()
    if (run_dir / CHECKPOINT).exists() or (run_dir / LOSSES).exists():
        raise RunDirError(f"{run_dir} already holds a run: refusing to overwrite it")
    run_dir.mkdir(parents=True, exist_ok=True)

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    data = load_data(cfg.data, cfg.seed, device)
    log.info("data: %s, %d training images, binarization %s", data.source, len(data.train), cfg.data.binarization)
    objective = OBJECTIVES[cfg.objective.name]
    model = build_model(cfg, objective.uses_encoder, data.pixel_means).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    columns = ["step", "loss", *objective.terms]
    losses = LossLog(run_dir / LOSSES, columns)
    label = run_label(cfg)
    micro_batch = micro_batch_size(cfg, device)

    start = time.perf_counter()
    bar = tqdm(range(1, cfg.n_train_iters + 1), desc=cfg.objective.name, disable=not cfg.progress, unit="it")
    try:
        for step in bar:
            row = {"step": step, **train_step(model, optimizer, objective, data.batch(cfg.batch_size), cfg.n_samples, micro_batch)}
            losses.append(row)
            bar.set_postfix(loss=f"{row['loss']:.2f}", refresh=False)
            if step % max(1, cfg.n_train_iters // 10) == 0 or step == cfg.n_train_iters:
                log.info("step %d/%d loss %.3f", step, cfg.n_train_iters, row["loss"])
    finally:
        losses.close()
        bar.close()
    train_seconds = time.perf_counter() - start

    config = OmegaConf.to_container(cfg, resolve=True)
    save_checkpoint(
        run_dir / CHECKPOINT,
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": cfg.n_train_iters,
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []},
            "config": config,
            "vae_cli_version": vae_cli.__version__,
        },
    )
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
        "steps": cfg.n_train_iters,
        "final_loss": final_loss,
        "final_loss_stderr": final_loss_stderr,
        "final_loss_window": len(window),
        "last_loss": history["loss"][-1],
        "train_seconds": train_seconds,
        "it_per_s": cfg.n_train_iters / train_seconds,
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
    return summary
