"""Redraw a run's figures from its own files: losses.csv and checkpoint.pt."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from vae_cli.errors import RunDirError
from vae_cli.models import build_model
from vae_cli.objectives import OBJECTIVES
from vae_cli.plotting import save_loss_plot, save_sample_grids
from vae_cli.rundir import CHECKPOINT, LOSSES, load_checkpoint, read_losses
from vae_cli.training import run_label


def load_run_model(run_dir: Path):
    """(config, model on the CPU, checkpoint dict) of a run directory."""
    state = load_checkpoint(run_dir / CHECKPOINT)
    cfg = OmegaConf.create(state["config"])
    objective = OBJECTIVES[cfg.objective.name]
    model = build_model(cfg, objective.uses_encoder)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise RunDirError(f"{run_dir / CHECKPOINT} does not match its own config: {str(exc).splitlines()[0]}") from None
    return cfg, model.eval(), state


def redraw_run(run_dir: Path, out_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is not a directory")
    if not (run_dir / LOSSES).exists() and not (run_dir / CHECKPOINT).exists():
        raise RunDirError(f"{run_dir} is not a vae-train run directory (no {LOSSES} or {CHECKPOINT})")
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = None
    if (run_dir / CHECKPOINT).exists():
        cfg, model, _ = load_run_model(run_dir)
        save_sample_grids(model, out_dir, run_label(cfg))
    if (run_dir / LOSSES).exists():
        note = "" if (run_dir / CHECKPOINT).exists() else "partial: no checkpoint yet (run still going or killed)"
        save_loss_plot(read_losses(run_dir / LOSSES), out_dir / "loss.png", run_label(cfg) if cfg else str(run_dir), note)
    return out_dir
