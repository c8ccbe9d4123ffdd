"""Compare runs of like with like: the keys that define an experiment and differ between the runs
(vae_cli.run.config.experiment_values: never how a run was kept, such as progress or eval.* sizes),
runs that differ only by their seed grouped, with mean +- sd over the seeds, log p(x) compared on the
test images every run was evaluated on, and the paired per-image difference from the first run.
Writes comparison.csv and comparison.md; used by the multirun callback and by vae-plot; no drawing here.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vae_cli.run.files import atomic_write_bytes
from vae_cli.run.rundir import COMPARISON_CSV, COMPARISON_MD, EVAL, RunFiles, collect, final_loss, mean_and_stderr

log = logging.getLogger(__name__)

# the numbers with a stderr column; q*'s split of gap_elbo is over eval.qstar_n_images images
METRICS = ("final_loss", "log_px", "gap_jensen", "gap_elbo", "gap_approximation", "gap_amortization")
SEED = "seed"
SHOWN_ALWAYS = ("objective", "K", "n_samples")  # columns of every table, differing or not


def metric(run: RunFiles, key: str) -> tuple[float, float]:
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


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def estimator(run: RunFiles) -> str | None:
    """The estimator behind log_px (closed_form, quadrature, ais, importance, prior_mc)."""
    return (run.evaluation or {}).get("estimator") or (run.summary or {}).get("log_px_estimator")


def eval_images(run: RunFiles) -> int | None:
    """How many test images (the first n) log_px is over."""
    n = (run.evaluation or {}).get("n_images") or (run.summary or {}).get("eval_n_images")
    return int(n) if n else None


def log_px_per_image(run: RunFiles) -> list[float] | None:
    """The run's log p(x) of every test image it was evaluated on, by its log_px estimator."""
    name = estimator(run)
    return (run.per_image or {}).get(name) if name else None


@dataclass
class SeedGroup:
    """Runs whose experiment differs only by the seed."""

    label: str
    runs: list[RunFiles]

    @property
    def seeds(self) -> list[str]:
        return [run.experiment.get(SEED, "?") for run in self.runs]


@dataclass
class Comparison:
    """Everything the tables and figures say about a set of runs, worked out once."""

    runs: list[RunFiles]
    keys: list[str]  # the experiment keys that differ between the runs, in schema order
    values: dict[str, dict[str, tuple[float, float]]]  # run name -> metric -> (value, stderr)
    groups: list[SeedGroup] = field(default_factory=list)  # the groups of two or more seeds
    log_px_images: int | None = None  # the test images log_px is compared on, where the runs' counts differ
    log_px_note: str = ""  # why log_px is compared as it is
    paired: dict[str, dict[str, float]] = field(default_factory=dict)  # run name -> paired difference from the first

    def key_values(self, run: RunFiles, keys: list[str] | None = None) -> str:
        """key=value for each differing key the run has (a key of one objective only is left out of the others')."""
        experiment = run.experiment
        return ", ".join(f"{k}={experiment[k]}" for k in (self.keys if keys is None else keys) if k in experiment)

    def label(self, run: RunFiles, keys: list[str] | None = None) -> str:
        label = self.key_values(run, keys) or run.name
        return label if run.completed else f"{label} ({run.status.split(' (')[0]})"

    def labels(self) -> list[str]:
        """A legend label per run; the run's name is added where two would read the same."""
        labels = [self.label(run) for run in self.runs]
        return [f"{label} [{run.name}]" if labels.count(label) > 1 else label for run, label in zip(self.runs, labels)]

    def group_values(self, group: SeedGroup) -> dict[str, tuple[float, float, int]]:
        """Each metric's mean and sd over the group's seeds, and how many seeds have it."""
        out = {}
        for m in METRICS:
            found = [self.values[run.name][m][0] for run in group.runs]
            found = [v for v in found if not math.isnan(v)]
            sd = statistics.stdev(found) if len(found) > 1 else float("nan")
            out[m] = (statistics.fmean(found) if found else float("nan"), sd, len(found))
        return out

    def numeric_keys(self) -> list[str]:
        """The parameters to plot against: differing experiment keys whose values are all numbers, the
        seed aside, where at least two runs that agree on every other experiment key (the seed aside:
        runs of several seeds are one point) differ in it, so that a line compares like with like."""
        out = []
        for key in self.keys:
            if key == SEED:
                continue
            values = [run.experiment.get(key) for run in self.runs]
            if all(v is not None and _number(v) is not None for v in values) and self._varies_alone(key):
                out.append(key)
        return out

    def _varies_alone(self, key: str) -> bool:
        values_by_rest: dict[tuple, set[str]] = {}
        for run in self.runs:
            rest = tuple(sorted((k, v) for k, v in run.experiment.items() if k not in (key, SEED)))
            values_by_rest.setdefault(rest, set()).add(run.experiment.get(key))
        return any(len(values) > 1 for values in values_by_rest.values())

    def shared(self) -> dict[str, str]:
        """The experiment keys every run has with the same value (those the table's columns leave out)."""
        first, *rest = [run.experiment for run in self.runs] or [{}]
        return {k: v for k, v in first.items() if k not in self.keys and all(e.get(k) == v for e in rest)}

    def metrics_present(self) -> list[str]:
        return [m for m in METRICS if any(not math.isnan(self.values[run.name][m][0]) for run in self.runs)]


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def differing_keys(runs: list[RunFiles]) -> list[str]:
    """The experiment keys whose values differ between runs (a key missing from some run counts as
    different), in the order the schema has them."""
    if len(runs) < 2:
        return []
    keys = list(dict.fromkeys(k for run in runs for k in run.experiment))
    return [k for k in keys if len({run.experiment.get(k) for run in runs}) > 1]


def compare(runs: list[RunFiles]) -> Comparison:
    keys = differing_keys(runs)
    values = {run.name: {m: metric(run, m) for m in METRICS} for run in runs}
    comparison = Comparison(runs, keys, values)
    _compare_log_px(comparison)
    if SEED in keys:
        by_rest: dict[tuple, list[RunFiles]] = {}
        for run in runs:
            rest = tuple((k, v) for k, v in run.experiment.items() if k != SEED)
            by_rest.setdefault(rest, []).append(run)
        others = [k for k in keys if k != SEED]
        for members in by_rest.values():
            if len(members) > 1:
                label = comparison.key_values(members[0], others) or "all runs"
                comparison.groups.append(SeedGroup(label, members))
    return comparison


def _compare_log_px(comparison: Comparison) -> None:
    """log_px of runs evaluated on different numbers of test images is compared on the first n they
    all share, from each run's per-image values; where a run has none, its log_px is marked as not
    comparable. Runs evaluated on the same images get their paired difference from the first."""
    runs = [run for run in comparison.runs if eval_images(run)]
    counts = {eval_images(run) for run in runs}
    if len(counts) > 1:
        shared = min(counts)
        comparison.log_px_images = shared
        comparison.log_px_note = (
            f"log_px over the first {shared} test images, which every run was evaluated on "
            f"(the runs were evaluated on {', '.join(str(c) for c in sorted(counts))} images)"
        )
        for run in runs:
            values = log_px_per_image(run)
            if values is not None and len(values) >= shared:
                comparison.values[run.name]["log_px"] = mean_and_stderr(values[:shared])
            else:
                comparison.values[run.name]["log_px"] = (float("nan"), float("nan"))
                comparison.log_px_note += f"; {run.name} not comparable (no per-image values: vae-eval it again)"
    per_image = [(run, log_px_per_image(run)) for run in runs]
    per_image = [(run, values) for run, values in per_image if values]
    if len(per_image) < 2:
        return
    first, reference = per_image[0]
    n = min(len(values) for _, values in per_image)
    if comparison.log_px_images is not None:
        n = min(n, comparison.log_px_images)
    for run, values in per_image[1:]:
        mean, stderr = mean_and_stderr([a - b for a, b in zip(values[:n], reference[:n])])
        comparison.paired[run.name] = {"value": mean, "stderr": stderr, "n_images": n, "minus": first.name}


# --- the tables ---------------------------------------------------------------------------------------


def comparison_rows(comparison: Comparison) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, one dict per run, then one per group of seeds) of the comparison table."""
    keys = comparison.keys
    columns = ["run", *keys, *(k for k in SHOWN_ALWAYS if k not in keys), "steps", "status"]
    for m in METRICS:
        columns += [m, f"{m}_stderr"]
    columns += ["log_px_minus_first", "log_px_minus_first_stderr", "estimator", "eval_images", "n_seeds", "it_per_s",
                "path"]  # fmt: skip
    rows = []
    for run in comparison.runs:
        experiment = run.experiment
        row: dict[str, Any] = {"run": run.name, **{k: experiment.get(k, "") for k in keys}}
        for k in SHOWN_ALWAYS:
            row.setdefault(k, experiment.get(k) or (run.summary or {}).get(k))
        row["steps"] = run.steps
        row["status"] = run.status
        for m in METRICS:
            row[m], row[f"{m}_stderr"] = comparison.values[run.name][m]
        paired = comparison.paired.get(run.name)
        if paired:
            row["log_px_minus_first"], row["log_px_minus_first_stderr"] = paired["value"], paired["stderr"]
        row["estimator"] = estimator(run)
        row["eval_images"] = comparison.log_px_images or eval_images(run)
        row["it_per_s"] = _float((run.summary or {}).get("it_per_s"))
        row["path"] = str(run.path)
        rows.append(row)
    for group in comparison.groups:
        row = {"run": f"mean of {len(group.runs)} seeds"}
        row.update({k: group.runs[0].experiment.get(k, "") for k in keys if k != SEED})
        row[SEED] = ",".join(group.seeds)
        for k in SHOWN_ALWAYS:
            row.setdefault(k, group.runs[0].experiment.get(k))
        row["status"] = "sd over seeds"
        for m, (mean, sd, _) in comparison.group_values(group).items():
            row[m], row[f"{m}_stderr"] = mean, sd
        row["n_seeds"] = len(group.runs)
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
    """A Markdown table: value +- stderr in one cell, empty columns left out."""
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


def caption(comparison: Comparison) -> str:
    """What the table's numbers are, and which spread each ± is."""
    parts = [
        "Final loss: mean ± stderr of the last training steps (nats per image, lower is better). "
        f"log_px and gaps: from each run's {EVAL}, where it was evaluated; ± is the stderr over test images."
    ]
    if comparison.log_px_note:
        parts.append(comparison.log_px_note[0].upper() + comparison.log_px_note[1:] + ".")
    if comparison.paired:
        first = next(iter(comparison.paired.values()))["minus"]
        parts.append(f"log_px_minus_first: the paired per-image difference from run {first}, ± its stderr.")
    if comparison.groups:
        parts.append("Rows `mean of N seeds`: the mean over the seeds, ± the sd over the seeds (training runs).")
    return " ".join(parts)


def shared_line(comparison: Comparison) -> str:
    """The line above the table: what every run shares, which no column shows where it is not always shown."""
    shared = comparison.shared()
    if not shared:
        return "The runs share no experiment key."
    return f"Shared by all {len(comparison.runs)} runs: " + ", ".join(f"`{k}={v}`" for k, v in shared.items()) + "."


def write_comparison(comparison: Comparison, out_dir: Path) -> tuple[Path, Path]:
    """comparison.csv and comparison.md in out_dir, one row per run (and per group of seeds), each written atomically."""
    columns, rows = comparison_rows(comparison)
    out_dir = Path(out_dir)
    md = caption(comparison) + "\n\n" + shared_line(comparison) + "\n\n" + comparison_markdown(columns, rows)
    atomic_write_bytes(out_dir / COMPARISON_CSV, comparison_csv(columns, rows))
    atomic_write_bytes(out_dir / COMPARISON_MD, md.encode())
    return out_dir / COMPARISON_CSV, out_dir / COMPARISON_MD


def write_sweep_comparison(sweep_dir: Path) -> Path | None:
    """comparison.csv/.md at the root of a multirun directory; None (with a warning) when no job has a run."""
    runs, skipped = collect([Path(sweep_dir)])
    for line in skipped:
        log.warning("comparison: skipped %s", line)
    if not runs:
        return None
    csv_path, _ = write_comparison(compare(runs), Path(sweep_dir))
    log.info("comparison of %d runs: %s", len(runs), csv_path)
    return csv_path
