"""vae-plot: redraw the figures of runs from their own files (losses.csv, checkpoint.pt,
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
from typing import Any

from omegaconf import OmegaConf

from vae_cli.compare import Run, collect, differing_keys, is_run_dir, run_value, write_comparison
from vae_cli.errors import DataError, RunDirError, UserError
from vae_cli.models import build_model
from vae_cli.objectives import OBJECTIVES
from vae_cli.rundir import CHECKPOINT, load_checkpoint

REPORT = "report.md"
RUN_FIGURES = {
    "loss.png": "the training loss and each objective term on its own axes (every step, and a moving average)",
    "samples.png": "8x8 binary samples x ~ p(x|z) for fixed prior draws z ~ p(z)",
    "means.png": "8x8 decoder means sigmoid(decoder(z)) for the same z: means, not samples",
    "manifold.png": "decoder means over a 15x15 grid of z in [-3, 3]^2: what each region of the latent space draws",
    "posterior.png": "the exact posterior p(z|x) of five test digits on a grid over [-3, 3]^2 next to the prior p(z), "
    "and zoomed in around each posterior (q(z|x) as ellipses for encoder models)",
    "encoded.png": "the test set encoded: means of q(z|x), coloured by digit",
}


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

    @property
    def plotted(self) -> int:
        return sum(1 for r in self.runs if r.figures) + len(self.figures)


def load_run_model(run_dir: Path):
    """(config, model on the CPU, checkpoint dict) of a run directory."""
    state = load_checkpoint(run_dir / CHECKPOINT)
    from vae_cli.resume import saved_config

    cfg = saved_config(state.get("config"), run_dir / CHECKPOINT)  # this version's schema: unknown keys refused
    try:
        objective = OBJECTIVES[cfg.objective.name]
        model = build_model(cfg, objective.uses_encoder)
    except Exception as exc:  # a checkpoint of another program, or of an incompatible vae-cli
        raise RunDirError(
            f"{run_dir / CHECKPOINT} holds no usable vae-cli config ({type(exc).__name__}: {exc})"
        ) from None
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as exc:
        raise RunDirError(f"{run_dir / CHECKPOINT} does not match its own config: {str(exc).splitlines()[0]}") from None
    return cfg, model.eval(), state


class TestImages:
    """The binarized test set of each data config, loaded once per vae-plot call."""

    def __init__(self) -> None:
        self._cache: dict[tuple, Any] = {}

    def get(self, cfg):
        """(images, labels) on the CPU for cfg.data; DataError when the files are unavailable."""
        import torch

        from vae_cli.data import load_data

        data_cfg = cfg.data
        key = tuple(sorted((k, str(v)) for k, v in OmegaConf.to_container(data_cfg, resolve=True).items()))
        if key not in self._cache:
            try:
                self._cache[key] = load_data(data_cfg, 0, torch.device("cpu"))
            except DataError as exc:
                root = os.environ.get("VAE_CLI_DATA")
                if not root or data_cfg.name == "synthetic" or Path(root) == Path(str(data_cfg.root)).expanduser():
                    self._cache[key] = exc
                else:  # the run was trained elsewhere: try this machine's data root
                    try:
                        self._cache[key] = load_data(OmegaConf.merge(data_cfg, {"root": root}), 0, torch.device("cpu"))
                    except DataError as exc2:
                        self._cache[key] = exc2
        data = self._cache[key]
        if isinstance(data, DataError):
            raise data
        return data.test, data.test_labels


def draw_run(run: Run, out_dir: Path, test_images: TestImages) -> RunFigures:
    """Every figure of one run that its files allow; what cannot be drawn becomes a note."""
    from vae_cli import plotting
    from vae_cli.training import run_label

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
        result.figures.append(Figure(out_dir / name, RUN_FIGURES[name]))
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
        draw("loss.png", plotting.save_loss_plot, run.losses, out_dir / "loss.png", label, note)
    if model is None:
        if not (run.path / CHECKPOINT).exists():
            result.notes.append("no checkpoint.pt yet: samples, means and latent figures need the trained model")
        return result
    if draw("samples.png", plotting.save_sample_grids, model, out_dir, label):  # means.png from the same draws
        result.figures.append(Figure(out_dir / "means.png", RUN_FIGURES["means.png"]))
    if cfg.K != 2:
        result.notes.append(f"K={cfg.K}: the manifold, posterior and encoded figures are drawn for K=2 only")
        return result
    draw("manifold.png", plotting.save_manifold, model, out_dir / "manifold.png", label)
    try:
        images, labels = test_images.get(cfg)
    except DataError as exc:
        result.notes.append(f"posterior and encoded figures skipped: test data unavailable ({exc})")
        return result
    picked = plotting.pick_digits(labels)
    draw("posterior.png", plotting.save_posterior, model, images[picked], out_dir / "posterior.png", label)
    if model.encoder is not None:
        draw("encoded.png", plotting.save_encoded, model, images, labels, out_dir / "encoded.png", label)
    return result


def draw_comparison(runs: list[Run], out_dir: Path) -> tuple[list[Figure], list[Path]]:
    from vae_cli import figures_sweep

    figures: list[Figure] = []
    tables = list(write_comparison(runs, out_dir))
    keys = differing_keys(runs)
    label = ", ".join(keys) if keys else "run"
    if figures_sweep.save_loss_curves(runs, out_dir / "loss_curves.png"):
        what = f"the training loss of every run (smoothed), labelled by {label}"
        figures.append(Figure(out_dir / "loss_curves.png", what))
    metrics = figures_sweep.metrics_present(runs)
    if not metrics:  # no run has a finite final loss: the tables say so, no figure to draw
        return figures, tables
    swept = figures_sweep.numeric_keys(runs)
    for key in swept:
        others = [k for k in keys if k != key]
        lines = f"one line per {', '.join(others)}" if others else "one line"
        path = out_dir / f"vs_{_safe(key)}.png"
        figures_sweep.save_metrics_against(runs, key, path)
        figures.append(Figure(path, f"{', '.join(metrics)} against {key}, {lines}; error bars are 1 stderr"))
    if not swept:
        figures_sweep.save_metrics_by_run(runs, out_dir / "metrics_by_run.png")
        what = f"{', '.join(metrics)} of each run; error bars are 1 stderr"
        figures.append(Figure(out_dir / "metrics_by_run.png", what))
    return figures, tables


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in key)


def plot(paths: list[Path], out: Path | None = None) -> PlotResult:
    """Draw every figure the paths allow. One run directory: its figures, into it (or `out`).
    A multirun directory or several paths: each run's figures into its own directory (or out/<run>),
    and the comparison into the multirun directory (or `out`, or ./vae-plot/<date>/<time>)."""
    paths = [Path(p) for p in paths]
    runs, skipped = collect(paths)
    result = PlotResult(out_dir=None, skipped=skipped)
    if not runs:
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
    result.out_dir.mkdir(parents=True, exist_ok=True)

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
    if not single and drawn:
        result.figures, result.tables = draw_comparison(drawn, result.out_dir)
    if result.plotted:
        command = " ".join(["vae-plot", *map(str, paths), *(["--out", str(out)] if out is not None else [])])
        result.report = write_report(result, command)
    return result


def write_report(result: PlotResult, command: str) -> Path:
    """report.md: every figure with one line saying what it is, the comparison table, the notes."""
    from vae_cli.rundir import atomic_write_bytes

    out_dir = result.out_dir

    def link(path: Path) -> str:
        return os.path.relpath(path, out_dir).replace(os.sep, "/")

    lines = [f"# vae-plot report: {command.removeprefix('vae-plot ')}", ""]
    lines += [f"Made by `{command}` on {time.strftime('%Y-%m-%d %H:%M')}. "
              f"{len(result.runs)} run(s): {sum(r.run.completed for r in result.runs)} completed, "
              f"{sum(not r.run.completed for r in result.runs)} partial.", ""]
    if result.tables:
        md = next(t for t in result.tables if t.suffix == ".md")
        lines += ["## Comparison", "", md.read_text().rstrip(), "",
                  f"Tables: {', '.join(f'[{t.name}]({link(t)})' for t in result.tables)}", ""]
        for fig in result.figures:
            lines += [f"![{fig.path.stem}]({link(fig.path)})", "", f"{fig.path.name}: {fig.what}.", ""]
    keys = differing_keys([r.run for r in result.runs])
    for rf in result.runs:
        title = ", ".join(f"{k}={run_value(rf.run, k)}" for k in keys) if keys else str(rf.run.path)
        lines += [f"## Run {rf.run.name}: {title}" if len(result.runs) > 1 else f"## Run {rf.run.path}", "",
                  f"Status: {rf.run.status}. Directory: `{rf.run.path}`.", ""]
        for fig in rf.figures:
            lines += [f"![{fig.path.stem}]({link(fig.path)})", "", f"{fig.path.name}: {fig.what}.", ""]
        lines += [f"- note: {n}" for n in rf.notes] + ([""] if rf.notes else [])
    if result.skipped:
        lines += ["## Skipped", ""] + [f"- {s}" for s in result.skipped] + [""]
    path = out_dir / REPORT
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path


def redraw_run(run_dir: Path, out_dir: Path) -> Path:
    """The figures of one run directory into out_dir (kept for callers of the first vae-plot)."""
    from vae_cli.compare import load_run

    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise RunDirError(f"{run_dir} is not a vae-train run directory (no losses.csv, checkpoint.pt or summary.json)")
    figures = draw_run(load_run(run_dir), Path(out_dir), TestImages())
    if not figures.figures:
        raise RunDirError(f"{run_dir}: nothing could be drawn ({'; '.join(figures.notes)})")
    return Path(out_dir)
