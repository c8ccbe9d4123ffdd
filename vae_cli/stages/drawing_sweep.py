"""Figures that compare runs: overlaid loss curves, and each metric against a swept experiment key
(one line per value of the other differing keys; runs that differ only by their seed as one point,
the mean with the sd over the seeds as its error bar, else the run's stderr). Each panel's caption
says what its error bars are over: the final loss's over the last training steps, the evaluation's
over test images."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib import colormaps

from vae_cli.run.rundir import FINAL_WINDOW, RunFiles
from vae_cli.stages.comparison import SEED, Comparison, _number
from vae_cli.stages.drawing import moving_average, save_figure, smoothing_window, subplots

METRIC_LABELS = {
    "final_loss": "final training loss (nats)",
    "log_px": "log p(x) (nats)",
    "gap_jensen": "gap of the Jensen bound (nats)",
    "gap_elbo": "gap of the ELBO (nats)",
    "gap_approximation": "approximation gap, log p(x) - ELBO(q*) (nats)",
    "gap_amortization": "amortization gap, ELBO(q*) - ELBO(q) (nats)",
}


def save_loss_curves(comparison: Comparison, path: Path) -> int:
    """Every run's loss, as a moving average over the same window, on one axes; returns the number drawn."""
    drawn = [
        (run, label) for run, label in zip(comparison.runs, comparison.labels()) if run.losses and run.losses["step"]
    ]
    window = smoothing_window(max((len(run.losses["step"]) for run, _ in drawn), default=1))
    fig, ax = subplots(figsize=(7, 4.2))
    for i, (run, label) in enumerate(drawn):
        color = colormaps["tab10"](i % 10) if len(drawn) <= 10 else colormaps["viridis"](i / (len(drawn) - 1))
        ls = "-" if run.completed else "--"
        ax.plot(run.losses["step"], moving_average(run.losses["loss"], window), lw=1.1, color=color, ls=ls, label=label)
    smoothing = f"moving average over {window} steps" if window > 1 else "every step"
    ax.set_title(f"training loss of {len(drawn)} runs ({smoothing}; dashed: not completed)", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per image)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    save_figure(fig, path)
    return len(drawn)


def _points(
    comparison: Comparison, members: list[RunFiles], key: str, m: str
) -> list[tuple[float, float, float, bool]]:
    """(x, value, error, completed) per value of `key`: the mean and sd over seeds where runs differ
    only by their seed, else the run's value and stderr."""
    by_x: dict[float, list[RunFiles]] = {}
    for run in members:
        by_x.setdefault(_number(run.experiment.get(key)), []).append(run)
    points = []
    for x, runs in sorted(by_x.items()):
        values = [comparison.values[run.name][m] for run in runs if not math.isnan(comparison.values[run.name][m][0])]
        if not values:
            continue
        if len(values) > 1:
            mean = sum(v for v, _ in values) / len(values)
            sd = math.sqrt(sum((v - mean) ** 2 for v, _ in values) / (len(values) - 1))
            points.append((x, mean, sd, all(run.completed for run in runs)))
        else:
            error = values[0][1]
            points.append((x, values[0][0], 0.0 if math.isnan(error) else error, runs[0].completed))
    return points


def save_metrics_against(comparison: Comparison, key: str, path: Path) -> str:
    """One panel per metric against `key`, one line per combination of the other differing keys
    (the seed aside); returns what the error bars are."""
    others = [k for k in comparison.keys if k not in (key, SEED)]
    metrics = comparison.metrics_present()
    groups: dict[str, list[RunFiles]] = {}
    for run in comparison.runs:
        groups.setdefault(comparison.key_values(run, others) or "all runs", []).append(run)
    fig, axes = subplots(1, len(metrics), figsize=(4.2 * len(metrics) + 1.5, 3.6), squeeze=False)
    xs_all = [_number(run.experiment.get(key)) for run in comparison.runs]
    log_x = min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 8
    handles: dict[str, object] = {}  # one legend entry per group, whichever panel drew it
    for ax, m in zip(axes[0], metrics):
        for i, (group, members) in enumerate(groups.items()):
            points = _points(comparison, members, key, m)
            if not points:
                continue
            xs, ys, errs, done = zip(*points)
            handles.setdefault(
                group,
                ax.errorbar(xs, ys, yerr=errs, marker="o", ms=4, capsize=3, lw=1.2, color=colormaps["tab10"](i % 10)),
            )
            for x, y, d in zip(xs, ys, done):
                if not d:
                    ax.annotate("partial", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if log_x:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(set(xs_all)), [f"{x:g}" for x in sorted(set(xs_all))])
        ax.set_xlabel(key)
        ax.set_ylabel(METRIC_LABELS.get(m, m))
        ax.set_title(f"error bars: {bar_caption(m, 'point' if comparison.groups else '')}", fontsize=7, wrap=True)
        ax.grid(alpha=0.3)
    # The last panel may lack some groups (gap_elbo: encoder objectives only), so the legend lists them all.
    labels = [group for group in groups if group in handles]
    axes[0, -1].legend([handles[g] for g in labels], labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    names = ", ".join(METRIC_LABELS.get(m, m).split(" (")[0] for m in metrics)
    fig.suptitle(f"{names} against {key}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    return error_bars(metrics, "point" if comparison.groups else "")


def bar_caption(m: str, seeds: str = "") -> str:
    """What metric m's error bars are over; `seeds` names what a mean of seeds is drawn as (point, row)."""
    own = f"1 stderr over the last {FINAL_WINDOW} training steps" if m == "final_loss" else "1 stderr over test images"
    return f"sd over the seeds where a {seeds} is a mean of seeds, else {own}" if seeds else own


def error_bars(metrics: list[str], seeds: str = "") -> str:
    """Every panel's caption, for the report: `metric: what its bars are over`, joined."""
    return "; ".join(f"{METRIC_LABELS.get(m, m).split(' (')[0]}: {bar_caption(m, seeds)}" for m in metrics)


def save_metrics_by_run(comparison: Comparison, path: Path) -> str:
    """Each metric per run (one row per run, then per group of seeds), when no numeric key was swept."""
    metrics = comparison.metrics_present()
    labels = comparison.labels() + [f"{g.label}: mean of seeds {','.join(g.seeds)}" for g in comparison.groups]
    rows = [[comparison.values[run.name][m] for m in metrics] for run in comparison.runs]
    rows += [
        [(mean, sd) for mean, sd, _ in (comparison.group_values(g)[m] for m in metrics)] for g in comparison.groups
    ]
    fig, axes = subplots(
        1, len(metrics), figsize=(3.2 * len(metrics) + 2.5, 0.35 * len(labels) + 1.3), sharey=True, squeeze=False
    )
    for j, (ax, m) in enumerate(zip(axes[0], metrics)):
        values = [row[j] for row in rows]
        ax.errorbar(
            [v for v, _ in values],
            range(len(values)),
            xerr=[0.0 if math.isnan(e) else e for _, e in values],
            fmt="o",
            capsize=4,
            color="C0",
        )
        ax.set_xlabel(METRIC_LABELS.get(m, m), fontsize=8)
        ax.set_title(f"error bars: {bar_caption(m, 'row' if comparison.groups else '')}", fontsize=7, wrap=True)
        ax.grid(alpha=0.3)
    axes[0, 0].set_yticks(range(len(labels)), labels, fontsize=7)
    axes[0, 0].invert_yaxis()
    fig.suptitle("metrics per run", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    return error_bars(metrics, "row" if comparison.groups else "")
