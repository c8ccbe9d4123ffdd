"""checkpoint.pt: written by training (model, optimizer, step, every RNG state, the resolved config)
and read, checked, by resume, vae-eval, vae-plot and the Python API. torch.load runs with
weights_only=True, so no file of a run directory can run code."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import vae_cli
from vae_cli.errors import RunDirError
from vae_cli.maths.models import LatentVariableModel, build_model
from vae_cli.run.config import model_spec, typed_config
from vae_cli.run.files import atomic_write_bytes
from vae_cli.run.rundir import CHECKPOINT, LOSSES, nearby_runs

CHECKPOINT_FORMAT = 1


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save({**state, "format": CHECKPOINT_FORMAT}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checked vae-cli training checkpoint: tensors and plain containers only (weights_only=True,
    so it cannot run code) with a config, a step, the model, the optimizer and the RNG states."""
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles before refusing them: one line, ours
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise RunDirError(f"{path} does not exist") from None
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise RunDirError(f"{path} is not a readable vae-cli checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise RunDirError(f"{path} has checkpoint format {found!r}; this vae-cli reads format {CHECKPOINT_FORMAT}")
    step = state.get("step")
    if not isinstance(state.get("config"), dict) or not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise RunDirError(f"{path} is not a vae-cli training checkpoint (no config or step)")
    for key in ("model", "optimizer", "rng"):
        if not isinstance(state.get(key), dict):
            raise RunDirError(f"{path} is not a vae-cli training checkpoint (no {key})")
    return state


def model_from_state(cfg: DictConfig, state: dict[str, Any], source: Path) -> LatentVariableModel:
    """The model `cfg` describes with the checkpoint's parameters; RunDirError where they do not fit."""
    model = build_model(model_spec(cfg))
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise RunDirError(f"{source} does not match its own config: {str(exc).splitlines()[0][:200]}") from None
    return model


def load_model(run_dir: Path) -> tuple[DictConfig, LatentVariableModel, int]:
    """(config typed by this version's schema, model on the CPU in eval mode, its step) of a trained run."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        why = (
            "training has not finished (or was killed)"
            if (Path(run_dir) / LOSSES).exists()
            else f"not a vae-train run directory{nearby_runs(Path(run_dir))}"
        )
        raise RunDirError(f"{run_dir} has no {CHECKPOINT}: {why}")
    state = load_checkpoint(path)
    cfg = typed_config(state["config"], path)
    return cfg, model_from_state(cfg, state, path).eval(), state["step"]


class Checkpointer:
    """Writes the run's checkpoint.pt: model, optimizer, step, every RNG state, resolved config."""

    def __init__(
        self,
        run_dir: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: DictConfig,
        device: torch.device,
    ):
        self.path = Path(run_dir) / CHECKPOINT
        self.model, self.optimizer, self.cfg, self.device = model, optimizer, cfg, device
        self.config = OmegaConf.to_container(cfg, resolve=True)
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
                "config": self.config,
                "vae_cli_version": vae_cli.__version__,
            },
        )
        self.step = step

    def maybe_save(self, step: int) -> bool:
        """Save at every checkpoint_every-th step; whether it saved."""
        if step % self.cfg.checkpoint_every == 0:
            self.save(step)
            return True
        return False

    def restore(self, state: dict[str, Any]) -> int:
        """Load a checked checkpoint into this model and optimizer, RNG states last; its step."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and state["rng"].get("cuda"):
            torch.cuda.set_rng_state_all([t.cpu() for t in state["rng"]["cuda"]])
        self.step = state["step"]
        return self.step
