"""The figures stage of vae-train (the trained model and its losses in memory), and vae-plot (runs
read back from their own files: losses.csv, checkpoint.pt, summary.json, eval.json), and for a
multirun or several runs the comparison figures and tables, with a report.md that shows every
figure and says what it is.

One run, drawn into the run directory (or --out):
    loss.png        the loss with the bounds of the same samples on one axis, each other term on its own
    samples.png     8x8 samples x ~ p(x|z), z ~ p(z)
    means.png       8x8 decoder means for the same z
    manifold.png    (K=2) decoder means over a grid of z in [-3, 3]^2
    posterior.png   (K=2) exact p(z|x) on grids for five test digits, next to p(z), zoomed; q(z|x) if any
    encoded.png     (K=2, encoder models) means of q(z|x) of the test set, coloured by digit
    gradient_snr.png  (vae-plot, where eval.json has it) the gradients' signal-to-noise by sample count
Several runs, into the multirun directory (or --out), each run's figures in its own directory:
    loss_curves.png, vs_<parameter>.png (or metrics_by_run.png), comparison.csv, comparison.md
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from vae_cli.errors import DataError, RunDirError, UserError
from vae_cli.maths.models import LatentVariableModel
from vae_cli.run.checkpoint import load_model
from vae_cli.run.config import data_config, model_description
from vae_cli.run.data import load_images_here
from vae_cli.run.files import atomic_write_bytes, check_creatable
from vae_cli.run.rundir import (
    CHECKPOINT,
    ENCODED_PNG,
    FIGURES,
    GRADIENT_SNR_PNG,
    LOSS_CURVES_PNG,
    LOSS_PNG,
    MANIFOLD_PNG,
    MEANS_PNG,
    METRICS_BY_RUN_PNG,
    POSTERIOR_PNG,
    REPORT,
    SAMPLES_PNG,
    SUMMARY,
    RunFiles,
    collect,
    is_run_dir,
    metric_figure_name,
)
from vae_cli.stages import drawing, drawing_sweep
from vae_cli.stages.comparison import Comparison, compare, write_comparison
from vae_cli.stages.estimates import points_per_dim


@dataclass
class Figure:
    path: Path
    what: str


@dataclass
class RunFigures:
    name: str
    path: Path  # the run directory
    out_dir: Path
    status: str = "completed"
    completed: bool = True
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class PlotResult:
    out_dir: Path | None
    runs: list[RunFigures] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)  # the comparison figures
    tables: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    report: Path | None = None
    requested_skipped: list[Path] = field(default_factory=list)  # paths asked for of which nothing was drawn
    comparison: Comparison | None = None

    @property
    def plotted(self) -> int:
        return sum(1 for r in self.runs if r.figures) + len(self.figures)


def run_label(cfg: DictConfig) -> str:
    """A run in one line, for titles: what it trained and the model's shape."""
    return (
        f"{cfg.objective.name}, K={cfg.K}, n_samples={cfg.n_samples}, batch={cfg.batch_size}; {model_description(cfg)}"
    )


TestSet = tuple[torch.Tensor, torch.Tensor]  # test images (N, 784) as the model sees them and their labels, on the CPU


class TestImages:
    """The test set of each data config, loaded once per vae-plot call."""

    def __init__(self) -> None:
        self._cache: dict[str, TestSet | DataError] = {}

    def get(self, cfg: DictConfig) -> TestSet:
        """(images, labels) on the CPU for cfg.data; DataError when the files are unavailable."""
        key = repr(sorted(OmegaConf.to_container(cfg.data, resolve=True).items()))
        if key not in self._cache:
            try:
                images = load_images_here(data_config(cfg), 0, torch.device("cpu"))
                self._cache[key] = (images.test, images.test_labels)
            except DataError as exc:
                self._cache[key] = exc
        found = self._cache[key]
        if isinstance(found, DataError):
            raise found
        return found


def draw_run(
    cfg: DictConfig,
    model: LatentVariableModel | None,
    losses: dict[str, list] | None,
    out: RunFigures,
    test_set: TestSet | None | DataError,
    label: str,
    evaluation: dict | None = None,
) -> RunFigures:
    """Every figure of one run that its parts allow, into out.out_dir; what cannot be drawn becomes a
    note. vae-train's figures stage and vae-plot both draw with it: the model and losses in memory, or
    read from the run's files (and eval.json's gradient SNR, which vae-train's evaluation draws itself)."""
    out.out_dir.mkdir(parents=True, exist_ok=True)

    def draw(name: str, fn, *args) -> bool:
        try:
            fn(*args)
        except UserError as exc:
            out.notes.append(f"{name} not drawn: {exc}")
            return False
        except Exception as exc:  # one bad figure must not cost the others
            out.notes.append(f"{name} not drawn: {type(exc).__name__}: {exc}")
            return False
        out.figures.append(Figure(out.out_dir / name, FIGURES[name]))
        return True

    objective = cfg.objective.name if cfg is not None else ""
    if losses and losses["step"]:
        note = "" if out.completed else out.status
        draw(LOSS_PNG, drawing.save_loss_plot, losses, out.out_dir / LOSS_PNG, label, objective, note)
    snr = (evaluation or {}).get("gradient_snr")
    if snr:
        draw(GRADIENT_SNR_PNG, drawing.save_gradient_snr, snr, out.out_dir / GRADIENT_SNR_PNG, label)
    if model is None:
        return out
    samples_and_means = (drawing.save_sample_grids, model, out.out_dir / SAMPLES_PNG, out.out_dir / MEANS_PNG, label)
    if draw(SAMPLES_PNG, *samples_and_means):  # the means from the same draws
        out.figures.append(Figure(out.out_dir / MEANS_PNG, FIGURES[MEANS_PNG]))
    if cfg.K != 2:
        out.notes.append(f"K={cfg.K}: the manifold, posterior and encoded figures are drawn for K=2 only")
        return out
    draw(MANIFOLD_PNG, drawing.save_manifold, model, out.out_dir / MANIFOLD_PNG, label)
    if isinstance(test_set, DataError) or test_set is None:
        out.notes.append(f"posterior and encoded figures skipped: test data unavailable ({test_set})")
        return out
    images, labels = test_set
    picked = drawing.pick_digits(labels)
    grid = (points_per_dim(cfg.eval.quadrature_points, cfg.K), cfg.eval.quadrature_half_width)  # the evaluation's
    draw(POSTERIOR_PNG, drawing.save_posterior, model, images[picked], out.out_dir / POSTERIOR_PNG, label, grid)
    if model.encoder is not None:
        draw(ENCODED_PNG, drawing.save_encoded, model, images, labels, out.out_dir / ENCODED_PNG, label)
    return out


def draw_run_dir(run: RunFiles, out_dir: Path, test_images: TestImages) -> RunFigures:
    """vae-plot's figures of one run, from its own files."""
    out = RunFigures(run.name, run.path, out_dir, run.status, run.completed, notes=list(run.notes))
    cfg = model = None
    if (run.path / CHECKPOINT).exists():
        try:
            cfg, model, step = load_model(run.path)
        except RunDirError as exc:
            out.notes.append(str(exc))
    elif run.losses:
        out.notes.append(f"no {CHECKPOINT} yet: samples, means and latent figures need the trained model")
    label = run_label(cfg) if cfg is not None else run.name
    if model is not None and not run.completed:
        label += f" (checkpoint at step {step})"
    if not run.completed and run.summary is None:
        out.status = f"{run.status}: no {SUMMARY} (still going, or killed)"
    test_set = None
    if cfg is not None and cfg.K == 2:
        try:
            test_set = test_images.get(cfg)
        except DataError as exc:
            test_set = exc
    objective_cfg = (
        cfg if cfg is not None else OmegaConf.create({"objective": {"name": (run.summary or {}).get("objective", "")}})
    )
    return draw_run(objective_cfg, model, run.losses, out, test_set, label, run.evaluation)


def draw_comparison(runs: list[RunFiles], out_dir: Path) -> tuple[list[Figure], list[Path], Comparison]:
    comparison = compare(runs)
    figures: list[Figure] = []
    tables = list(write_comparison(comparison, out_dir))
    label = ", ".join(comparison.keys) if comparison.keys else "run"
    if drawing_sweep.save_loss_curves(comparison, out_dir / LOSS_CURVES_PNG):
        what = f"the training loss of every run (smoothed), labelled by {label}"
        figures.append(Figure(out_dir / LOSS_CURVES_PNG, what))
    metrics = comparison.metrics_present()
    if not metrics:  # no run has a finite final loss: the tables say so, no figure to draw
        return figures, tables, comparison
    swept = comparison.numeric_keys()
    for key in swept:
        others = [k for k in comparison.keys if k not in (key, "seed")]
        lines = f"one line per {', '.join(others)}" if others else "one line"
        path = out_dir / metric_figure_name(key)
        bars = drawing_sweep.save_metrics_against(comparison, key, path)
        figures.append(Figure(path, f"{', '.join(metrics)} against {key}, {lines}; error bars: {bars}"))
    if not swept:
        bars = drawing_sweep.save_metrics_by_run(comparison, out_dir / METRICS_BY_RUN_PNG)
        figures.append(Figure(out_dir / METRICS_BY_RUN_PNG, f"{', '.join(metrics)} of each run; error bars: {bars}"))
    return figures, tables, comparison


def plot(paths: list[Path], out: Path | None = None) -> PlotResult:
    """Draw every figure the paths allow. One run directory: its figures, into it (or `out`).
    A multirun directory or several paths: each run's figures into its own directory (or out/<run>),
    and the comparison into the multirun directory (or `out`, or ./vae-plot/<date>/<time>)."""
    paths = [Path(p) for p in paths]
    runs, skipped = collect(paths)
    result = PlotResult(out_dir=None, skipped=skipped)
    if not runs:
        result.requested_skipped = list(paths)
        return result
    single = len(paths) == 1 and is_run_dir(paths[0])
    if single:
        result.out_dir = Path(out) if out is not None else paths[0]
    elif out is not None:
        result.out_dir = Path(out)
    elif len(paths) == 1:
        result.out_dir = paths[0]
    else:
        result.out_dir = Path("vae-plot") / time.strftime("%Y-%m-%d") / time.strftime("%H-%M-%S")
    check_creatable(result.out_dir, "output directory")

    test_images = TestImages()
    drawn: list[RunFiles] = []
    for run in runs:
        run_out = result.out_dir if single else (result.out_dir / run.name if out is not None else run.path)
        figures = draw_run_dir(run, run_out, test_images)
        if figures.figures:
            result.runs.append(figures)
            drawn.append(run)
        else:
            why = "; ".join(figures.notes) or "no losses, no checkpoint"
            result.skipped.append(f"{run.path}: nothing could be drawn ({why})")
    result.requested_skipped = [p for p in paths if not any(r.path == p or p in r.path.parents for r in drawn)]
    if not single and drawn:
        result.figures, result.tables, result.comparison = draw_comparison(drawn, result.out_dir)
    if result.plotted:
        command = " ".join(["vae-plot", *map(str, paths), *(["--out", str(out)] if out is not None else [])])
        result.report = write_report(result, command)
    return result


def write_report(result: PlotResult, command: str) -> Path:
    """report.md: every figure with one line saying what it is, the comparison table, the notes."""
    out_dir = result.out_dir

    def link(path: Path) -> str:
        return os.path.relpath(path, out_dir).replace(os.sep, "/")

    lines = [f"# vae-plot report: {command.removeprefix('vae-plot ')}", ""]
    lines += [
        f"Made by `{command}` on {time.strftime('%Y-%m-%d %H:%M')}. "
        f"{len(result.runs)} run(s): {sum(r.completed for r in result.runs)} completed, "
        f"{sum(not r.completed for r in result.runs)} partial.",
        "",
    ]
    if result.tables:
        md = next(t for t in result.tables if t.suffix == ".md")
        lines += [
            "## Comparison",
            "",
            md.read_text().rstrip(),
            "",
            f"Tables: {', '.join(f'[{t.name}]({link(t)})' for t in result.tables)}",
            "",
        ]
        for fig in result.figures:
            lines += [f"![{fig.path.stem}]({link(fig.path)})", "", f"{fig.path.name}: {fig.what}.", ""]
    runs = {run.path: run for run in result.comparison.runs} if result.comparison else {}
    for rf in result.runs:
        title = result.comparison.key_values(runs[rf.path]) if rf.path in runs else ""
        lines += [
            f"## Run {rf.name}: {title or rf.path}" if len(result.runs) > 1 else f"## Run {rf.path}",
            "",
            f"Status: {rf.status}. Directory: `{rf.path}`.",
            "",
        ]
        for fig in rf.figures:
            lines += [f"![{fig.path.stem}]({link(fig.path)})", "", f"{fig.path.name}: {fig.what}.", ""]
        lines += [f"- note: {n}" for n in rf.notes] + ([""] if rf.notes else [])
    if result.skipped:
        lines += ["## Skipped", ""] + [f"- {s}" for s in result.skipped] + [""]
    path = out_dir / REPORT
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path
