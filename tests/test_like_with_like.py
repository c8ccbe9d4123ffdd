"""Figures compare like with like: a vs_<key> figure only where two runs that agree on every other
experiment key differ in that key; each panel's caption says what its error bars are over; and
comparison.md states the keys every run shares above its table."""

from __future__ import annotations

import json
from pathlib import Path

from vae_cli.run.rundir import collect, write_evaluation
from vae_cli.stages import drawing_sweep
from vae_cli.stages.comparison import compare, write_comparison
from vae_cli.stages.figures import draw_comparison


def fake_run(run_dir: Path, overrides: list[str], final_loss: float, log_px: list[float]) -> None:
    """A run directory with its keys in .hydra/overrides.yaml, evaluated on len(log_px) images."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    rows = [f"{s},{final_loss + 1 / s:.6f}" for s in range(1, 21)]
    (run_dir / "losses.csv").write_text("step,loss\n" + "\n".join(rows) + "\n")
    summary = {"status": "completed", "steps": 20, "final_loss": final_loss, "final_loss_stderr": 0.5}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    evaluation = {
        "log_px": sum(log_px) / len(log_px),
        "log_px_stderr": 0.1,
        "estimator": "ais",
        "n_images": len(log_px),
    }
    write_evaluation(run_dir, evaluation, {"ais": log_px}, None)


def demo_like(root: Path) -> list:
    """Each objective at its own n_samples, as the demo: no two runs differ in n_samples alone."""
    fake_run(
        root / "0", ["objective=jensen", "n_samples=128", "objective.shared_samples=true"], 200.0, [-200.0, -201.0]
    )
    fake_run(
        root / "1", ["objective=prior_iwae", "n_samples=1024", "objective.shared_samples=true"], 150.0, [-150.0, -149.0]
    )
    fake_run(root / "2", ["objective=elbo", "n_samples=1"], 120.0, [-110.0, -112.0])
    return collect([root])[0]


def test_no_vs_figure_where_no_two_runs_differ_in_that_key_alone(tmp_path):
    runs = demo_like(tmp_path / "sweep")
    comparison = compare(runs)
    assert "n_samples" in comparison.keys and comparison.numeric_keys() == []
    figures, _, _ = draw_comparison(runs, tmp_path / "sweep")
    assert [f.path.name for f in figures] == ["loss_curves.png", "metrics_by_run.png"]
    assert not (tmp_path / "sweep" / "vs_n_samples.png").exists()


def test_a_vs_figure_where_two_runs_differ_in_that_key_alone(tmp_path):
    for i, (objective, k) in enumerate([("jensen", 2), ("jensen", 4), ("elbo", 2)]):
        fake_run(tmp_path / "sweep" / str(i), [f"objective={objective}", f"K={k}"], 100.0 + i, [-100.0, -101.0])
    runs = collect([tmp_path / "sweep"])[0]
    assert compare(runs).numeric_keys() == ["K"]  # jensen at K=2 and K=4 compare like with like
    figures, _, _ = draw_comparison(runs, tmp_path / "sweep")
    assert "vs_K.png" in [f.path.name for f in figures]


def test_each_panels_caption_says_what_its_error_bars_are_over(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(drawing_sweep, "save_figure", lambda fig, path: drawn.append(fig))
    comparison = compare(demo_like(tmp_path / "sweep"))
    bars = drawing_sweep.save_metrics_by_run(comparison, tmp_path / "metrics_by_run.png")
    titles = {ax.get_xlabel(): ax.get_title() for ax in drawn[0].axes}
    assert titles["final training loss (nats)"] == "error bars: 1 stderr over the last 50 training steps"
    assert titles["log p(x) (nats)"] == "error bars: 1 stderr over test images"
    assert "test images" not in drawn[0]._suptitle.get_text()  # no one caption for every panel
    assert bars.startswith(
        "final training loss: 1 stderr over the last 50 training steps; log p(x): 1 stderr over test images"
    )


def test_comparison_md_states_the_keys_every_run_shares(tmp_path):
    fake_run(tmp_path / "a", ["objective=jensen", "objective.shared_samples=true", "seed=0"], 150.0, [-150.0])
    fake_run(tmp_path / "b", ["objective=jensen", "objective.shared_samples=true", "seed=1"], 151.0, [-151.0])
    runs = collect([tmp_path / "a", tmp_path / "b"])[0]
    _, md = write_comparison(compare(runs), tmp_path / "out")
    text = md.read_text()
    (line,) = [line for line in text.splitlines() if line.startswith("Shared by all 2 runs: ")]
    assert "`objective=jensen`" in line and "`objective.shared_samples=true`" in line and "seed" not in line
    assert text.index(line) < text.index("| run")  # above the table, which shows only what differs
