"""Compare runs: collect the run directories of a multirun (or several runs), find the
overrides that differ between them, and write one row per run to comparison.csv and
comparison.md. Used by the multirun callback and by vae-plot; no plotting here.

A row holds the differing overrides, the final training loss (mean of the last steps, with
its stderr), log p(x) and the bounds' gaps when the run has an eval.json, and it/s. A run
without summary.json (still going, or killed) is a `partial` row computed from losses.csv.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from vae_cli.errors import RunDirError
from vae_cli.rundir import (
    CHECKPOINT,
    COMPARISON_CSV,
    COMPARISON_MD,
    EVAL,
    HYDRA_CONFIG,
    HYDRA_DIR,
    HYDRA_OVERRIDES,
    LOSSES,
    MULTIRUN_YAML,
    RUN_FILES,
    SUMMARY,
    TRAINED,
    atomic_write_bytes,
    final_loss,
    read_json,
    read_losses,
)

log = logging.getLogger(__name__)
# Summary keys used to tell runs apart when their overrides do not (e.g. runs without .hydra/).
SUMMARY_KEYS = ("objective", "K", "n_samples", "batch_size", "steps", "seed")
# eval.json keys copied into the table; a value may be a number or {"mean"|"value"|"estimate": x, "stderr": s}.
EVAL_KEYS = ("log_px", "gap_jensen", "gap_elbo")
METRICS = ("final_loss", *EVAL_KEYS)  # the numbers with a stderr column


@dataclass
class Run:
    """What a run directory says about itself; any file may be missing."""

    path: Path
    name: str
    overrides: dict[str, str] = field(default_factory=dict)  # from .hydra/overrides.yaml, hydra.* left out
    summary: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    losses: dict[str, list] | None = None
    config: dict[str, Any] | None = None  # .hydra/config.yaml, unresolved
    notes: list[str] = field(default_factory=list)  # what could not be read, one line each

    @property
    def completed(self) -> bool:
        """Training finished (its figures or evaluation may still be to come)."""
        return self.summary is not None and self.summary.get("status", "completed") in TRAINED

    @property
    def steps(self) -> int | None:
        """Steps trained: summary.json's count, else the last step in losses.csv."""
        if self.summary is not None and self.summary.get("steps") is not None:
            return self.summary["steps"]
        return self.losses["step"][-1] if self.losses and self.losses["step"] else None

    @property
    def status(self) -> str:
        """completed; `interrupted`/`failed` (as the run's summary.json says) or `partial` (no summary.json:
        still going, or killed), with the steps done."""
        if self.completed:
            return str(self.summary.get("status", "completed"))
        what = str(self.summary.get("status")) if self.summary is not None else "partial"
        total = (self.summary or {}).get("n_train_iters") or (self.config or {}).get("n_train_iters")
        return f"{what} ({self.steps or 0}/{total} steps)" if total else f"{what} ({self.steps or 0} steps)"

    def setting(self, key: str) -> Any:
        """A config value (objective, K, n_samples, ...) from summary.json, else .hydra/config.yaml."""
        if self.summary is not None and key in self.summary:
            return self.summary[key]
        if self.config is not None:
            if key == "objective":
                objective = self.config.get("objective")
                return objective.get("name") if isinstance(objective, dict) else objective
            if key == "steps":
                return self.config.get("n_train_iters")
            return self.config.get(key)
        return None


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in RUN_FILES)


def find_runs(path: Path) -> tuple[list[Path], list[str]]:
    """The run directories `path` names: itself, or the job directories of a multirun directory.
    Returns (run dirs, one-line notes about job directories that hold no run)."""
    path = Path(path)
    if not path.exists():
        raise RunDirError(f"{path} does not exist")
    if not path.is_dir():
        raise RunDirError(f"{path} is not a directory")
    if is_run_dir(path):
        return [path], []
    children = sorted((c for c in path.iterdir() if c.is_dir() and not c.name.startswith(".")), key=_job_order)
    runs = [c for c in children if is_run_dir(c)]
    notes = [
        f"{c}: no {LOSSES}, {CHECKPOINT} or {SUMMARY} (job not started, or failed before training)"
        for c in children
        if not is_run_dir(c) and (c / HYDRA_DIR).is_dir()
    ]
    if not runs and (notes or (path / MULTIRUN_YAML).exists()):
        raise RunDirError(f"{path} is a multirun directory where no job has started training")
    if not runs:
        raise RunDirError(
            f"{path} is neither a vae-train run directory (no {LOSSES}, {CHECKPOINT} or {SUMMARY}) "
            "nor a multirun directory holding one"
        )
    return runs, notes


def _job_order(path: Path) -> tuple[int, int | str]:
    return (0, int(path.name)) if path.name.isdigit() else (1, path.name)


def load_run(path: Path, name: str | None = None) -> Run:
    """Read a run directory; RunDirError when it holds neither a readable summary.json nor losses.csv."""
    path = Path(path)
    run = Run(path=path, name=name or path.name)
    if (path / HYDRA_OVERRIDES).exists():
        try:
            run.overrides = parse_overrides(list(OmegaConf.load(path / HYDRA_OVERRIDES)))
        except Exception as exc:  # a foreign or hand-edited file: the run is still usable
            run.notes.append(f"{HYDRA_OVERRIDES} unreadable ({type(exc).__name__})")
    if (path / HYDRA_CONFIG).exists():
        try:
            run.config = OmegaConf.to_container(OmegaConf.load(path / HYDRA_CONFIG), resolve=False)
        except Exception as exc:
            run.notes.append(f"{HYDRA_CONFIG} unreadable ({type(exc).__name__})")
    if (path / SUMMARY).exists():
        try:
            run.summary = read_json(path / SUMMARY)
            if "final_loss" not in run.summary:
                raise RunDirError(f"{path / SUMMARY} is not a vae-train summary (no final_loss)")
        except RunDirError as exc:
            run.summary = None
            run.notes.append(str(exc))
    if (path / EVAL).exists():
        try:
            run.evaluation = read_json(path / EVAL)
        except RunDirError as exc:
            run.notes.append(str(exc))
    if (path / LOSSES).exists():
        try:
            run.losses = read_losses(path / LOSSES)
        except RunDirError as exc:
            run.notes.append(str(exc))
    if run.summary is None and not (run.losses and run.losses["step"]):
        reasons = "; ".join(run.notes) or f"no {SUMMARY} and no steps in {LOSSES}"
        raise RunDirError(f"{path} has nothing to compare: {reasons}")
    return run


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """['objective=jensen', '+sweep=n_samples', 'hydra.run.dir=x'] -> {'objective': 'jensen', 'sweep': 'n_samples'}."""
    parsed: dict[str, str] = {}
    for item in overrides:
        key, sep, value = str(item).partition("=")
        key = key.lstrip("+~")
        if sep and not key.startswith("hydra.") and not key.startswith("hydra/"):
            parsed[key] = value
    return parsed


def differing_keys(runs: list[Run]) -> list[str]:
    """The overrides whose values differ between runs (a key missing from some run counts as different),
    in the order they first appear; summary settings when no override tells the runs apart."""
    if len(runs) < 2:
        return []
    keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
    differ = [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]
    if differ:
        return differ
    return [k for k in SUMMARY_KEYS if len({str(r.setting(k)) for r in runs}) > 1]


def run_value(run: Run, key: str) -> str:
    """The value of a differing key for this run: its override, else its setting."""
    if key in run.overrides:
        return run.overrides[key]
    value = run.setting(key)
    return "" if value is None else str(value)


def key_values(run: Run, keys: list[str]) -> str:
    """key=value for each of the keys the run has (a key of one objective only is left out of the others')."""
    return ", ".join(f"{k}={value}" for k in keys if (value := run_value(run, k)))


def run_label(run: Run, keys: list[str]) -> str:
    label = key_values(run, keys) or run.name
    return label if run.completed else f"{label} ({run.status.split(' (')[0]})"


def run_labels(runs: list[Run]) -> list[str]:
    """A legend label per run from the differing overrides; the run's name is added where two would read the same."""
    keys = differing_keys(runs)
    labels = [run_label(run, keys) for run in runs]
    return [f"{label} [{run.name}]" if labels.count(label) > 1 else label for run, label in zip(runs, labels)]


def metric(run: Run, key: str) -> tuple[float, float]:
    """(value, stderr) of final_loss or an eval.json number; NaN where the run does not have it."""
    nan = float("nan")
    if key == "final_loss":
        if run.summary is not None:
            return _float(run.summary.get("final_loss")), _float(run.summary.get("final_loss_stderr"))
        if run.losses and run.losses["loss"]:
            return final_loss(run.losses["loss"])[:2]
        return nan, nan
    # eval.json, else the headline numbers evaluation merged into summary.json
    source = next((d for d in (run.evaluation, run.summary) if d is not None and d.get(key) is not None), None)
    if source is None:
        return nan, nan
    value = source[key]
    if isinstance(value, dict):
        mean = next((value[k] for k in ("mean", "value", "estimate") if k in value), None)
        return _float(mean), _float(value.get("stderr"))
    return _float(value), _float(source.get(f"{key}_stderr"))


def estimator(run: Run) -> str | None:
    """The estimator behind log_px (e.g. quadrature, importance, prior_mc)."""
    return (run.evaluation or {}).get("estimator") or (run.summary or {}).get("log_px_estimator")


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def comparison_rows(runs: list[Run]) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, one dict per run) of the comparison table."""
    keys = differing_keys(runs)
    columns = ["run", *keys, *(k for k in ("objective", "K", "n_samples") if k not in keys), "steps", "status"]
    for m in METRICS:
        columns += [m, f"{m}_stderr"]
    columns += ["estimator", "it_per_s", "path"]
    rows = []
    for run in runs:
        row: dict[str, Any] = {"run": run.name, **{k: run_value(run, k) for k in keys}}
        for k in ("objective", "K", "n_samples"):
            row.setdefault(k, run.setting(k))
        row["steps"] = run.steps
        row["status"] = run.status
        for m in METRICS:
            row[m], row[f"{m}_stderr"] = metric(run, m)
        row["estimator"] = estimator(run)
        row["it_per_s"] = _float((run.summary or {}).get("it_per_s"))
        row["path"] = str(run.path)
        rows.append(row)
    return columns, rows


def _cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def comparison_csv(columns: list[str], rows: list[dict[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c), 4) for c in columns])
    return buffer.getvalue().encode()


def comparison_markdown(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """A Markdown table: value +- stderr in one cell, empty eval columns left out."""
    shown = [c for c in columns if not c.endswith("_stderr") and c != "path"]
    shown = [c for c in shown if any(_cell(r.get(c)) for r in rows) or c in ("run", "final_loss")]
    lines = ["| " + " | ".join(shown) + " |", "|" + "|".join(" --- " for _ in shown) + "|"]
    for row in rows:
        cells = []
        for c in shown:
            text = _cell(row.get(c), 2)
            stderr = _cell(row.get(f"{c}_stderr"), 2)
            cells.append(f"{text} ± {stderr}" if text and stderr else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_comparison(runs: list[Run], out_dir: Path) -> tuple[Path, Path]:
    """comparison.csv and comparison.md in out_dir, one row per run, each written atomically."""
    columns, rows = comparison_rows(runs)
    out_dir = Path(out_dir)
    md = (
        "Final loss: mean ± stderr of the last training steps (nats per image, lower is better). "
        "log_px and gaps: from each run's eval.json, where it was evaluated.\n\n" + comparison_markdown(columns, rows)
    )
    atomic_write_bytes(out_dir / COMPARISON_CSV, comparison_csv(columns, rows))
    atomic_write_bytes(out_dir / COMPARISON_MD, md.encode())
    return out_dir / COMPARISON_CSV, out_dir / COMPARISON_MD


def collect(paths: list[Path]) -> tuple[list[Run], list[str]]:
    """Every readable run under `paths` (run or multirun directories), and one line per path or job skipped.
    Names are unique: a job's number in a single multirun, else the directory names joined."""
    runs: list[Run] = []
    skipped: list[str] = []
    for path in paths:
        path = Path(path)
        try:
            run_dirs, notes = find_runs(path)
        except RunDirError as exc:
            skipped.append(str(exc))
            continue
        skipped += notes
        for run_dir in run_dirs:
            name = run_dir.name if len(paths) == 1 or run_dir == path else f"{path.name}-{run_dir.name}"
            try:
                runs.append(load_run(run_dir, name))
            except RunDirError as exc:
                skipped.append(str(exc))
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name}-{seen[run.name]}"
    return runs, skipped


def write_sweep_comparison(sweep_dir: Path) -> Path | None:
    """comparison.csv/.md at the root of a multirun directory; None (with a warning) when no job has a run."""
    runs, skipped = collect([Path(sweep_dir)])
    for line in skipped:
        log.warning("comparison: skipped %s", line)
    if not runs:
        return None
    csv_path, _ = write_comparison(runs, Path(sweep_dir))
    log.info("comparison of %d runs: %s", len(runs), csv_path)
    return csv_path
