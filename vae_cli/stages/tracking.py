"""Watching a run live: the `logger` config choice.

    with open_tracker(cfg, run_dir, purge_step) as tracker:
        tracker.step(row, it_per_s)        # every training step: the loss, each term, it/s
        tracker.checkpoint(step, model)    # every checkpoint: the grids, and the stream flushed
        tracker.evaluation(result, step)   # eval.json's numbers
        tracker.finish(summary)            # hyper-parameters with the final metrics

`csv`, the default, adds nothing: losses.csv, which training writes under every logger, is the
run's record. `tensorboard` adds TensorBoard event files in the run directory, so that
`tensorboard --logdir multirun/DATE/TIME` shows each run of a sweep as its job number.

A resumed run opens its stream with `purge_step`, the step after its checkpoint: TensorBoard then
drops what the stopped run logged past the checkpoint (the old files keep those events on disk),
and every step is shown once. The stream is flushed at every checkpoint, so nothing up to a
checkpoint is lost when the process is killed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from vae_cli.maths.models import LatentVariableModel, prior_draws
from vae_cli.run.rundir import SAMPLE_GRID

FLUSH_SECONDS = 10  # how stale a live view may be between checkpoints

# Tags, grouped into TensorBoard's sections by their prefix.
TRAIN = "train/"  # per step: loss, each objective term, it_per_s
SAMPLES = "grids/samples"  # x ~ p(x|z), z ~ p(z): binary, or with a Gaussian's noise
MEANS = "grids/means_not_samples"  # the means E[x|z] for the same z, labelled so
EVAL = "eval/"  # log_px and its stderr, the gaps, every estimate
FINAL = "final/"  # the metrics of the HParams view
# Config keys shown as hyper-parameters; a group (objective, data) by its name.
HPARAMS = ("objective", "model", "likelihood", "K", "n_samples", "batch_size", "lr", "seed", "data", "n_train_iters")
GROUP_HPARAMS = ("objective", "model", "likelihood", "data")
# summary.json keys shown as metrics next to the hyper-parameters (those a run has).
FINAL_METRICS = (
    "final_loss",
    "log_px",
    "log_px_stderr",
    "gap_jensen",
    "gap_elbo",
    "gap_approximation",
    "gap_amortization",
)
# eval.json's numbers written as scalars of the evaluation (those it has)
EVAL_SCALARS = tuple(f"{gap}{part}" for gap in ("gap_jensen", "gap_elbo", "gap_approximation", "gap_amortization")
                     for part in ("", "_stderr"))  # fmt: skip


class Tracker:
    """logger=csv: losses.csv alone, so every call is a no-op. The base of every other logger."""

    def __init__(self, cfg: DictConfig, run_dir: Path, purge_step: int | None = None) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)

    def step(self, row: dict[str, float], it_per_s: float) -> None:
        """One training step's losses.csv row (step, loss, terms) and its speed."""

    def checkpoint(self, step: int, model: LatentVariableModel) -> None:
        """A checkpoint was written at `step` (step 0 too)."""

    def evaluation(self, result: dict[str, Any], step: int) -> None:
        """eval.json's dict, of the model at `step`."""

    def finish(self, summary: dict[str, Any]) -> None:
        """summary.json's dict when the run ends (or vae-eval updated it)."""

    def close(self) -> None:
        pass

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class TensorBoardTracker(Tracker):
    """logger=tensorboard: event files in the run directory, beside losses.csv."""

    def __init__(self, cfg: DictConfig, run_dir: Path, purge_step: int | None = None) -> None:
        super().__init__(cfg, run_dir, purge_step)
        # Imported here, not at the top: tensorboard is an optional dependency (vae-cli[tensorboard]),
        # checked by config.validate before any work, and logger=csv must not need it.
        from torch.utils.tensorboard import SummaryWriter, summary

        self.hparams = summary.hparams  # the HParams plugin's three summaries for a dict of values
        self.writer = SummaryWriter(str(self.run_dir), purge_step=purge_step, flush_secs=FLUSH_SECONDS)

    def step(self, row: dict[str, float], it_per_s: float) -> None:
        step = int(row["step"])
        for name, value in row.items():
            if name != "step":
                self.writer.add_scalar(TRAIN + name, value, step)
        self.writer.add_scalar(TRAIN + "it_per_s", it_per_s, step)

    def checkpoint(self, step: int, model: LatentVariableModel) -> None:
        means, samples = prior_draws(model, SAMPLE_GRID * SAMPLE_GRID)
        self.writer.add_image(SAMPLES, _grid(samples), step)
        self.writer.add_image(MEANS, _grid(means), step)
        self.writer.flush()

    def evaluation(self, result: dict[str, Any], step: int) -> None:
        for key in ("log_px", "log_px_stderr", *EVAL_SCALARS):
            if _is_number(result.get(key)):
                self.writer.add_scalar(EVAL + key, result[key], step)
        for name, estimate in result.get("estimates", {}).items():
            self.writer.add_scalar(f"{EVAL}estimates/{name}", estimate["value"], step)
        for name, bound in result.get("bounds", {}).items():
            if _is_number(bound.get("value")):
                self.writer.add_scalar(f"{EVAL}bounds/{name}", bound["value"], step)
        self.writer.add_text(EVAL + "estimator", f"log_px by {result['estimator']}", step)
        self.writer.flush()

    def finish(self, summary: dict[str, Any]) -> None:
        # The HParams view pairs a run's session info with its scalars; written here into the run's own
        # stream (SummaryWriter.add_hparams would open a new run for it). The experiment summary is left
        # out: TensorBoard then builds it from every run of the sweep, and shows the hyper-parameters
        # that differ between them first (it would take one run's, which cannot know that).
        values = {key: self.cfg[key].name if key in GROUP_HPARAMS else self.cfg[key] for key in HPARAMS}
        values["estimator"] = summary.get("log_px_estimator", "none")
        metrics = {FINAL + key: summary[key] for key in FINAL_METRICS if _is_number(summary.get(key))}
        _, session_start, session_end = self.hparams(values, metrics)
        for part in (session_start, session_end):
            self.writer.file_writer.add_summary(part)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, summary["steps"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


TRACKERS: dict[str, type[Tracker]] = {"csv": Tracker, "tensorboard": TensorBoardTracker}


def open_tracker(cfg: DictConfig, run_dir: Path, purge_step: int | None = None) -> Tracker:
    """The logger cfg.logger names (config.validate checked it, and that its package is installed)."""
    return TRACKERS[cfg.logger](cfg, run_dir, purge_step)


PAD = 2  # pixels of grey between the tiles and around them


def _grid(images: torch.Tensor) -> torch.Tensor:
    """(n, 784) in [0, 1] -> one (3, H, W) image of SAMPLE_GRID columns, the tiles parted by grey lines."""
    tiles = images.clamp(0, 1).view(-1, 28, 28)
    rows = -(-len(tiles) // SAMPLE_GRID)
    side = 28 + PAD
    canvas = torch.full((rows * side + PAD, SAMPLE_GRID * side + PAD), 0.5)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, SAMPLE_GRID)
        canvas[PAD + r * side : PAD + r * side + 28, PAD + c * side : PAD + c * side + 28] = tile
    return canvas.expand(3, -1, -1)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
