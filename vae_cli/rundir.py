"""The run directory: every file name, every writer (atomic: temp file, fsync, rename), every
reader with its corrupt-file error, the summary, and the states a run passes through.

A run directory holds:
    .hydra/             Hydra's composed config and overrides (written by Hydra)
    losses.csv          step,loss,<objective terms>; appended a whole line per step
    checkpoint.pt       {model, optimizer, step, rng, config, format}
    summary.json        status and headline numbers
    loss.png, samples.png, means.png (and for K=2 manifold.png, posterior.png, encoded.png)
    eval.json           test-set log p(x) by every estimator, the bounds and their gaps

A run's status (summary.json) says which stages of `vae-train` remain, so `vae-train resume=DIR`
finishes a run killed at any point: see STATUSES.
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import vae_cli
from vae_cli.config import model_spec, saved_config
from vae_cli.errors import PathError, RunDirError
from vae_cli.models import LatentVariableModel, build_model

CHECKPOINT = "checkpoint.pt"
LOSSES = "losses.csv"
SUMMARY = "summary.json"
EVAL = "eval.json"
HYDRA_DIR = ".hydra"
HYDRA_CONFIG = f"{HYDRA_DIR}/config.yaml"
HYDRA_OVERRIDES = f"{HYDRA_DIR}/overrides.yaml"
MULTIRUN_YAML = "multirun.yaml"
COMPARISON_CSV = "comparison.csv"
COMPARISON_MD = "comparison.md"
REPORT = "report.md"
RUN_FILES = (LOSSES, CHECKPOINT, SUMMARY)  # any of these makes a directory a run directory
LOSS_PNG, SAMPLES_PNG, MEANS_PNG = "loss.png", "samples.png", "means.png"
MANIFOLD_PNG, POSTERIOR_PNG, ENCODED_PNG = "manifold.png", "posterior.png", "encoded.png"
# One run's figures, and what each shows (vae-plot's report quotes these lines).
FIGURES = {
    LOSS_PNG: "the training loss and each objective term on its own axes (every step, and a moving average)",
    SAMPLES_PNG: "8x8 binary samples x ~ p(x|z) for fixed prior draws z ~ p(z)",
    MEANS_PNG: "8x8 decoder means sigmoid(decoder(z)) for the same z: means, not samples",
    MANIFOLD_PNG: "decoder means over a 15x15 grid of z in [-3, 3]^2: what each region of the latent space draws",
    POSTERIOR_PNG: "the exact posterior p(z|x) of five test digits on a grid over [-3, 3]^2 next to the prior p(z), "
    "and zoomed in around each posterior (q(z|x) as ellipses for encoder models)",
    ENCODED_PNG: "the test set encoded: means of q(z|x), coloured by digit",
}
# The comparison of several runs (a multirun directory, or vae-plot --out)
LOSS_CURVES_PNG, METRICS_BY_RUN_PNG = "loss_curves.png", "metrics_by_run.png"


def metric_figure_name(key: str) -> str:
    """vs_<key>.png: the metrics against a swept parameter."""
    return "vs_" + "".join(c if c.isalnum() or c in "-_" else "_" for c in key) + ".png"


CHECKPOINT_FORMAT = 1
FINAL_WINDOW = 50  # final_loss is the mean of the last this-many step losses, with its stderr

# The stages of `vae-train`, and what a resume still has to do in each status. A run without
# summary.json is `running` (or was killed while training). "evaluate" is skipped where
# eval.enabled is false; `completed` means every stage the config asks for is done.
STAGES = ("train", "figures", "evaluate")
STATUSES = {
    "running": STAGES,
    "interrupted": STAGES,  # SIGINT or SIGTERM between steps
    "preempted": STAGES,  # submitit's preemption or timeout signal; requeued
    "failed": STAGES,  # a non-finite loss or gradient; the last good checkpoint is kept
    "trained": ("figures", "evaluate"),
    "drawn": ("evaluate",),
    "completed": (),
}
TRAINED = ("trained", "drawn", "completed")  # the statuses of a run whose training has finished
# eval.json keys copied into summary.json, and their names there.
HEADLINE = {
    "log_px": "log_px",
    "log_px_stderr": "log_px_stderr",
    "estimator": "log_px_estimator",
    "gap_jensen": "gap_jensen",
    "gap_jensen_stderr": "gap_jensen_stderr",
    "gap_elbo": "gap_elbo",
    "gap_elbo_stderr": "gap_elbo_stderr",
    "bdmc_gap": "bdmc_gap",
    "active_units": "active_units",
    "n_images": "eval_n_images",
}


# --- writing files --------------------------------------------------------------------------------


def check_creatable(path: Path, what: str) -> None:
    """PathError naming `what` and the reason when the directory `path` cannot be made or written.
    Its first missing folder is made and removed again: only the file system knows (/proc, a
    read-only mount, permissions)."""
    path = Path(path).expanduser().absolute()
    first_missing = None
    existing = path
    while not existing.exists():
        first_missing, existing = existing, existing.parent
    if not existing.is_dir():
        raise PathError(f"cannot create {what} {path}: {existing} is not a directory")
    try:
        if first_missing is None:
            if not os.access(path, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied")
        else:
            first_missing.mkdir()
            first_missing.rmdir()
    except OSError as exc:
        raise PathError(f"cannot create {what} {path}: {exc.strerror or type(exc).__name__}") from None


def _path_error(path: Path, exc: OSError) -> PathError:
    return PathError(f"cannot write {path}: {exc.strerror or type(exc).__name__}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """The whole file or nothing: a kill leaves the old file (and at most a hidden temp file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise _path_error(path, exc) from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def remove_temp_files(run_dir: Path) -> None:
    """The temp files of atomic writes cut short by a kill."""
    for stale in Path(run_dir).glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n").encode())


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunDirError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise RunDirError(f"{path} does not hold a JSON object")
    return obj


# --- losses.csv -----------------------------------------------------------------------------------


class LossLog:
    """Appends one CSV row per training step and flushes it, so the file is always usable."""

    def __init__(self, path: Path, columns: list[str]):
        self.path = Path(path)
        self.columns = columns
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = open(self.path, "a", newline="")
        if new:
            self._file.write(",".join(columns) + "\n")
            self._file.flush()

    def append(self, row: dict[str, float]) -> None:
        self._file.write(",".join(_format(row[c]) for c in self.columns) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _format(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6f}"


def _loss_lines(path: Path) -> list[str]:
    """losses.csv split at newlines; the last item is '' when the file ends with a whole row."""
    try:
        return Path(path).read_bytes().decode().split("\n")
    except FileNotFoundError:
        raise RunDirError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path} cannot be read ({type(exc).__name__})") from None


def _loss_row(line: str, n_columns: int) -> list[float] | None:
    """The numbers of one row, or None where the row is not n_columns numbers."""
    fields = line.split(",")
    try:
        values = [float(f) for f in fields]
    except ValueError:
        return None
    return values if len(values) == n_columns else None


def read_losses(path: Path) -> dict[str, list[float]]:
    """Columns of losses.csv as lists; a partial last line (a run killed mid-write) is dropped."""
    lines = _loss_lines(path)
    if not lines[0].startswith("step,loss"):
        raise RunDirError(f"{path} is not a losses.csv (expected a header starting with 'step,loss')")
    columns = lines[0].split(",")
    table: dict[str, list[float]] = {c: [] for c in columns}
    rows = lines[1:-1] if lines[-1] == "" else lines[1:]  # '' after the last newline is no row
    for i, line in enumerate(rows):
        values = _loss_row(line, len(columns))
        if values is None:
            if i == len(rows) - 1:  # torn last line of a killed run
                break
            raise RunDirError(f"{path} line {i + 2} is malformed: {line[:80]!r}")
        for c, v in zip(columns, values):
            table[c].append(v)
    table["step"] = [int(s) for s in table["step"]]
    return table


def losses_up_to(path: Path, columns: list[str], step: int) -> bytes:
    """losses.csv's header and rows for steps 1..step, checked; rows after step (written after the
    checkpoint, or torn by a kill) are left out. RunDirError if those rows are not all there."""
    header = ",".join(columns)
    if step == 0:
        return (header + "\n").encode()
    lines = _loss_lines(path)
    if lines[0] != header:
        raise RunDirError(f"{path} has header {lines[0][:80]!r}, expected {header!r}")
    for i, line in enumerate(lines[1 : step + 1], start=1):
        values = _loss_row(line, len(columns))
        whole = i < step or len(lines) > step + 1  # the checkpoint's own row must end with its newline
        if values is None or values[0] != i or not whole:
            raise RunDirError(f"{path} line {i + 1} is not the row of step {i}: {line[:80]!r} (the file is corrupt)")
    if len(lines) < step + 1:
        raise RunDirError(
            f"{path} ends at step {len(lines) - 1}, but the checkpoint is at step {step} (the file is corrupt)"
        )
    return ("\n".join(lines[: step + 1]) + "\n").encode()


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else float("nan")
    return mean, math.sqrt(var / n)


def final_loss(losses: list[float]) -> tuple[float, float, int]:
    """(mean, stderr, window) of the last FINAL_WINDOW step losses; NaNs where there are none."""
    window = losses[-FINAL_WINDOW:]
    if not window:
        return float("nan"), float("nan"), 0
    return (*mean_and_stderr(window), len(window))


# --- checkpoint.pt --------------------------------------------------------------------------------


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


def load_run_model(run_dir: Path) -> tuple[DictConfig, LatentVariableModel, dict[str, Any]]:
    """(config typed by this version's schema, model on the CPU in eval mode, checkpoint) of a run."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        why = (
            "training has not finished (or was killed)"
            if (Path(run_dir) / LOSSES).exists()
            else "not a vae-train run directory"
        )
        raise RunDirError(f"{run_dir} has no {CHECKPOINT}: {why}")
    state = load_checkpoint(path)
    cfg = saved_config(state["config"], path)
    return cfg, model_from_state(cfg, state, path).eval(), state


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


# --- summary.json and the run's status ------------------------------------------------------------


def run_status(run_dir: Path) -> str:
    """summary.json's status; `running` where there is none. RunDirError for a corrupt summary."""
    path = Path(run_dir) / SUMMARY
    if not path.exists():
        return "running"
    status = read_json(path).get("status")
    if status not in STATUSES:
        raise RunDirError(f"{path} has status {status!r}; allowed {', '.join(STATUSES)}")
    return status


def write_summary(
    run_dir: Path, cfg: DictConfig, status: str, step: int, facts: dict[str, Any], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """summary.json for a run at `step` with `status`: the headline keys from losses.csv and the
    config, the run's `facts` (device, speed, data) and `extra`; returns it."""
    try:
        history = read_losses(Path(run_dir) / LOSSES)["loss"][:step]
    except RunDirError:
        history = []
    mean, stderr, window = final_loss(history)
    summary = {
        "status": status,
        "objective": cfg.objective.name,
        "K": cfg.K,
        "n_samples": cfg.n_samples,
        "batch_size": cfg.batch_size,
        "steps": step,
        "n_train_iters": cfg.n_train_iters,
        "final_loss": mean,
        "final_loss_stderr": stderr,
        "final_loss_window": window,
        "last_loss": history[-1] if history else float("nan"),
        **facts,
        "torch_version": torch.__version__,
        "vae_cli_version": vae_cli.__version__,
        "seed": cfg.seed,
        **(extra or {}),
    }
    write_json(Path(run_dir) / SUMMARY, summary)
    return summary


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """summary.json's dict; None where the run has none."""
    path = Path(run_dir) / SUMMARY
    return read_json(path) if path.exists() else None


def set_status(run_dir: Path, status: str) -> dict[str, Any]:
    """summary.json with its status replaced; returns it."""
    summary = {**read_json(Path(run_dir) / SUMMARY), "status": status}
    write_json(Path(run_dir) / SUMMARY, summary)
    return summary


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers summary.json takes from eval.json."""
    return {name: result[key] for key, name in HEADLINE.items() if key in result}


def record_evaluation(run_dir: Path, result: dict[str, Any]) -> dict[str, Any]:
    """eval.json, and its headline numbers merged into summary.json (where there is one). The
    summary is read first: a corrupt one is refused before anything is written."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    write_json(run_dir / EVAL, result)
    if summary is None:
        return {}
    summary = {**summary, **headline(result)}
    write_json(run_dir / SUMMARY, summary)
    return summary
