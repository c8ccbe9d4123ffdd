"""The figures stage of vae-train, and vae-plot: draw the figures of runs from their own files (losses.csv, checkpoint.pt,
summary.json, eval.json), and for a multirun or several runs the comparison figures and
tables, with a report.md that shows every figure and says what it is.

One run, drawn into the run directory (or --out):
    loss.png        the loss and each objective term on its own axes
    samples.png     8x8 samples x ~ p(x|z), z ~ p(z)
    means.png       8x8 decoder means for the same z
    manifold.png    (K=2) decoder means over a grid of z in [-3, 3]^2
    posterior.png   (K=2) exact p(z|x) on grids for five test digits, next to p(z), zoomed; q(z|x) if any
    encoded.png     (K=2, encoder models) means of q(z|x) of the test set, coloured by digit
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

from vae_cli import figures_sweep, plotting
from vae_cli.compare import Run, collect, differing_keys, is_run_dir, key_values, load_run, write_comparison
from vae_cli.config import data_config
from vae_cli.data import load_data_here
from vae_cli.errors import DataError, RunDirError, UserError
from vae_cli.rundir import (
    CHECKPOINT,
    ENCODED_PNG,
    FIGURES,
    LOSS_CURVES_PNG,
    LOSS_PNG,
    MANIFOLD_PNG,
    MEANS_PNG,
    METRICS_BY_RUN_PNG,
    POSTERIOR_PNG,
    REPORT,
    SAMPLES_PNG,
    atomic_write_bytes,
    check_creatable,
    load_run_model,
    metric_figure_name,
)


@dataclass
class Figure:
    path: Path
    what: str


@dataclass
class RunFigures:
    run: Run
    out_dir: Path
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

    @property
    def plotted(self) -> int:
        return sum(1 for r in self.runs if r.figures) + len(self.figures)


def run_label(cfg: DictConfig) -> str:
    return f"{cfg.objective.name}, K={cfg.K}, n_samples={cfg.n_samples}, batch={cfg.batch_size}"


TestSet = tuple[torch.Tensor, torch.Tensor]  # binary test images (N, 784) and their labels, on the CPU


class TestImages:
    """The binarized test set of each data config, loaded once per vae-plot call."""

    def __init__(self, preloaded: dict[str, TestSet] | None = None) -> None:
        self._cache: dict[str, TestSet | DataError] = dict(preloaded or {})

    @staticmethod
    def key(cfg: DictConfig) -> str:
        return repr(sorted(OmegaConf.to_container(cfg.data, resolve=True).items()))

    def get(self, cfg: DictConfig) -> TestSet:
        """(images, labels) on the CPU for cfg.data; DataError when the files are unavailable."""
        key = self.key(cfg)
        if key not in self._cache:
            try:
                data = load_data_here(data_config(cfg), 0, torch.device("cpu"))
                self._cache[key] = (data.test, data.test_labels)
            except DataError as exc:
                self._cache[key] = exc
        found = self._cache[key]
        if isinstance(found, DataError):
            raise found
        return found


def draw_run(run: Run, out_dir: Path, test_images: TestImages) -> RunFigures:
    """Every figure of one run that its files allow; what cannot be drawn becomes a note."""
    result = RunFigures(run, out_dir, notes=list(run.notes))
    out_dir.mkdir(parents=True, exist_ok=True)

    def draw(name: str, fn, *args) -> bool:
        try:
            fn(*args)
        except UserError as exc:
            result.notes.append(f"{name} not drawn: {exc}")
            return False
        except Exception as exc:  # one bad figure must not cost the others
            result.notes.append(f"{name} not drawn: {type(exc).__name__}: {exc}")
            return False
        result.figures.append(Figure(out_dir / name, FIGURES[name]))
        return True

    cfg = model = None
    if (run.path / CHECKPOINT).exists():
        try:
            cfg, model, state = load_run_model(run.path)
        except RunDirError as exc:
            result.notes.append(str(exc))
    label = run_label(cfg) if cfg is not None else run.name
    if model is not None and not run.completed:
        label += f" (checkpoint at step {state.get('step')})"

    if run.losses and run.losses["step"]:
        note = ""
        if not run.completed:
            note = run.status + ("" if run.summary else ": no summary.json (still going, or killed)")
        draw(LOSS_PNG, plotting.save_loss_plot, run.losses, out_dir / LOSS_PNG, label, note)
    if model is None:
        if not (run.path / CHECKPOINT).exists():
            result.notes.append("no checkpoint.pt yet: samples, means and latent figures need the trained model")
        return result
    samples_and_means = (plotting.save_sample_grids, model, out_dir / SAMPLES_PNG, out_dir / MEANS_PNG, label)
    if draw(SAMPLES_PNG, *samples_and_means):  # the means from the same draws
        result.figures.append(Figure(out_dir / MEANS_PNG, FIGURES[MEANS_PNG]))
    if cfg.K != 2:
        result.notes.append(f"K={cfg.K}: the manifold, posterior and encoded figures are drawn for K=2 only")
        return result
    draw(MANIFOLD_PNG, plotting.save_manifold, model, out_dir / MANIFOLD_PNG, label)
    try:
        images, labels = test_images.get(cfg)
    except DataError as exc:
        result.notes.append(f"posterior and encoded figures skipped: test data unavailable ({exc})")
        return result
    picked = plotting.pick_digits(labels)
    draw(POSTERIOR_PNG, plotting.save_posterior, model, images[picked], out_dir / POSTERIOR_PNG, label)
    if model.encoder is not None:
        draw(ENCODED_PNG, plotting.save_encoded, model, images, labels, out_dir / ENCODED_PNG, label)
    return result


def draw_comparison(runs: list[Run], out_dir: Path) -> tuple[list[Figure], list[Path]]:
    figures: list[Figure] = []
    tables = list(write_comparison(runs, out_dir))
    keys = differing_keys(runs)
    label = ", ".join(keys) if keys else "run"
    if figures_sweep.save_loss_curves(runs, out_dir / LOSS_CURVES_PNG):
        what = f"the training loss of every run (smoothed), labelled by {label}"
        figures.append(Figure(out_dir / LOSS_CURVES_PNG, what))
    metrics = figures_sweep.metrics_present(runs)
    if not metrics:  # no run has a finite final loss: the tables say so, no figure to draw
        return figures, tables
    swept = figures_sweep.numeric_keys(runs)
    for key in swept:
        others = [k for k in keys if k != key]
        lines = f"one line per {', '.join(others)}" if others else "one line"
        path = out_dir / metric_figure_name(key)
        figures_sweep.save_metrics_against(runs, key, path)
        figures.append(Figure(path, f"{', '.join(metrics)} against {key}, {lines}; error bars are 1 stderr"))
    if not swept:
        figures_sweep.save_metrics_by_run(runs, out_dir / METRICS_BY_RUN_PNG)
        what = f"{', '.join(metrics)} of each run; error bars are 1 stderr"
        figures.append(Figure(out_dir / METRICS_BY_RUN_PNG, what))
    return figures, tables


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
    for run in runs:
        run_out = result.out_dir if single else (result.out_dir / run.name if out is not None else run.path)
        figures = draw_run(run, run_out, test_images)
        if figures.figures:
            result.runs.append(figures)
        else:
            why = "; ".join(figures.notes) or "no losses, no checkpoint"
            result.skipped.append(f"{run.path}: nothing could be drawn ({why})")
    drawn = [r.run for r in result.runs]
    result.requested_skipped = [p for p in paths if not any(r.path == p or p in r.path.parents for r in drawn)]
    if not single and drawn:
        result.figures, result.tables = draw_comparison(drawn, result.out_dir)
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
        f"{len(result.runs)} run(s): {sum(r.run.completed for r in result.runs)} completed, "
        f"{sum(not r.run.completed for r in result.runs)} partial.",
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
    keys = differing_keys([r.run for r in result.runs])
    for rf in result.runs:
        title = key_values(rf.run, keys) or str(rf.run.path)
        lines += [
            f"## Run {rf.run.name}: {title}" if len(result.runs) > 1 else f"## Run {rf.run.path}",
            "",
            f"Status: {rf.run.status}. Directory: `{rf.run.path}`.",
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


def draw_run_dir(run_dir: Path, cfg: DictConfig | None = None, test_set: TestSet | None = None) -> RunFigures:
    """vae-train's figures stage: every figure of one run into its directory; the test set of the
    run's config `cfg`, where given, saves reloading it. RunDirError where nothing could be drawn."""
    run_dir = Path(run_dir)
    preloaded = {TestImages.key(cfg): (test_set[0].cpu(), test_set[1].cpu())} if cfg is not None and test_set else None
    figures = draw_run(load_run(run_dir), run_dir, TestImages(preloaded))
    if not figures.figures:
        raise RunDirError(f"{run_dir}: nothing could be drawn ({'; '.join(figures.notes)})")
    return figures
