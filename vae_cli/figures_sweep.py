"""Figures that compare runs: overlaid loss curves, and each metric against a swept parameter
(one line per value of the other differing overrides, error bars from the stderr)."""

from __future__ import annotations

import math
from pathlib import Path

from vae_cli.compare import METRICS, Run, differing_keys, key_values, metric, run_labels, run_value
from vae_cli.plotting import moving_average, plt, save_figure, smoothing_window

METRIC_LABELS = {
    "final_loss": "final training loss (nats)",
    "log_px": "log p(x) (nats)",
    "gap_jensen": "gap of the Jensen bound (nats)",
    "gap_elbo": "gap of the ELBO (nats)",
}


def save_loss_curves(runs: list[Run], path: Path) -> int:
    """Every run's loss, as a moving average over the same window, on one axes; returns the number drawn."""
    drawn = [(run, label) for run, label in zip(runs, run_labels(runs)) if run.losses and run.losses["step"]]
    window = smoothing_window(max((len(run.losses["step"]) for run, _ in drawn), default=1))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (run, label) in enumerate(drawn):
        color = plt.cm.tab10(i % 10) if len(drawn) <= 10 else plt.cm.viridis(i / (len(drawn) - 1))
        ax.plot(
            run.losses["step"],
            moving_average(run.losses["loss"], window),
            lw=1.1,
            color=color,
            ls="-" if run.completed else "--",
            label=label,
        )
    smoothing = f"moving average over {window} steps" if window > 1 else "every step"
    ax.set_title(f"training loss of {len(drawn)} runs ({smoothing}; dashed: not completed)", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per image)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    save_figure(fig, path)
    return len(drawn)


def numeric_keys(runs: list[Run]) -> list[str]:
    """Differing keys whose values are all numbers: the swept parameters to plot against."""
    keys = []
    for key in differing_keys(runs):
        values = [run_value(run, key) for run in runs]
        if all(_number(v) is not None for v in values):
            keys.append(key)
    return keys


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def metrics_present(runs: list[Run]) -> list[str]:
    return [m for m in METRICS if any(not math.isnan(metric(run, m)[0]) for run in runs)]


def save_metrics_against(runs: list[Run], key: str, path: Path) -> None:
    """One panel per metric against `key`, one line per combination of the other differing keys."""
    others = [k for k in differing_keys(runs) if k != key]
    metrics = metrics_present(runs)
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(key_values(run, others) or "all runs", []).append(run)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics) + 1.5, 3.6), squeeze=False)
    xs_all = [_number(run_value(run, key)) for run in runs]
    log_x = min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 8
    handles: dict[str, object] = {}  # one legend entry per group, whichever panel drew it
    for ax, m in zip(axes[0], metrics):
        for i, (group, members) in enumerate(groups.items()):
            points = sorted((_number(run_value(r, key)), *metric(r, m), r.completed) for r in members)
            points = [p for p in points if not math.isnan(p[1])]
            if not points:
                continue
            xs, ys, errs, done = zip(*points)
            errs = [0.0 if math.isnan(e) else e for e in errs]
            handles.setdefault(
                group,
                ax.errorbar(xs, ys, yerr=errs, marker="o", ms=4, capsize=3, lw=1.2, color=plt.cm.tab10(i % 10)),
            )
            for x, y, d in zip(xs, ys, done):
                if not d:
                    ax.annotate("partial", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if log_x:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(set(xs_all)), [f"{x:g}" for x in sorted(set(xs_all))])
        ax.set_xlabel(key)
        ax.set_ylabel(METRIC_LABELS.get(m, m))
        ax.grid(alpha=0.3)
    # The last panel may lack some groups (gap_elbo: encoder objectives only), so the legend lists them all.
    labels = [group for group in groups if group in handles]
    axes[0, -1].legend([handles[g] for g in labels], labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(
        f"{', '.join(METRIC_LABELS.get(m, m).split(' (')[0] for m in metrics)} against {key} (error bars: 1 stderr)",
        fontsize=9,
    )
    fig.tight_layout()
    save_figure(fig, path)


def save_metrics_by_run(runs: list[Run], path: Path) -> None:
    """Each metric per run (one row per run), when no numeric parameter was swept (e.g. objectives compared)."""
    metrics = metrics_present(runs)
    labels = run_labels(runs)
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(3.2 * len(metrics) + 2.5, 0.35 * len(runs) + 1.3), sharey=True, squeeze=False
    )
    for ax, m in zip(axes[0], metrics):
        values = [metric(run, m) for run in runs]
        ax.errorbar(
            [v for v, _ in values],
            range(len(runs)),
            xerr=[0.0 if math.isnan(e) else e for _, e in values],
            fmt="o",
            capsize=4,
            color="C0",
        )
        ax.set_xlabel(METRIC_LABELS.get(m, m), fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, 0].set_yticks(range(len(runs)), labels, fontsize=7)
    axes[0, 0].invert_yaxis()
    fig.suptitle("metrics per run (error bars: 1 stderr)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
