"""Every long stage says how long it will take, and vae-eval's table puts the distance to log_px where the eye goes: each estimator, after its first seconds, estimates its
own time (naming the keys that shorten it where that is long), then reports every so often."""

from __future__ import annotations

import torch
from helpers import images_of, mlp_spec

from vae_cli.maths.models import build_model
from vae_cli.run.keys import EvalConfig
from vae_cli.stages import estimates
from vae_cli.stages.estimates import Stopwatch
from vae_cli.stages.evaluation import evaluate, format_table


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_estimate_comes_after_the_first_seconds_and_names_the_keys_when_long(monkeypatch):
    clock, lines = Clock(), []
    monkeypatch.setattr(estimates.time, "perf_counter", clock)
    lap = Stopwatch(torch.device("cpu"), lines.append)
    lap.begin("ais", ("eval.ais_steps",))
    clock.now = 1.0
    lap.progress(0.01)
    assert lines == []  # too early to say
    clock.now = 10.0
    lap.progress(0.02)
    assert lines == ["ais: 2% done in 10 s, about 8 min in all; shorter with smaller eval.ais_steps"]
    clock.now = 20.0
    lap.progress(0.04)
    assert len(lines) == 1  # the next line only after PROGRESS_EVERY_S
    clock.now = 10.0 + estimates.PROGRESS_EVERY_S
    lap.progress(0.5)
    assert lines[1] == "ais: 50% done in 70 s, about 70 s left"
    lap.begin("quadrature")
    clock.now += 6.0
    lap.progress(0.9)
    assert lines[2] == "quadrature: 90% done in 6 s, about 7 s in all"  # short: no keys named


def test_the_evaluation_says_what_it_runs_and_how_long_each_estimator_takes(monkeypatch):
    monkeypatch.setattr(estimates, "ESTIMATE_AFTER_S", 0.0)
    torch.manual_seed(0)
    spec = mlp_spec(2, hidden=8, depth=1)
    model = build_model(spec).eval()
    x = torch.bernoulli(torch.full((4, 784), 0.3), generator=torch.Generator().manual_seed(0))
    lines: list[str] = []
    cfg_eval = EvalConfig(
        quadrature_points=64, prior_mc_samples=16, ais=True, ais_steps=8, ais_chains=2, bdmc_n_images=1
    )
    result, _ = evaluate(model, spec, images_of(x), cfg_eval, report=lines.append)
    started = [line for line in lines if line.startswith("evaluating: ")]
    planned = estimates.plan(spec, cfg_eval, torch.device("cpu"), 4)
    assert started == [f"evaluating: {p.name} on {p.n_images} test images" for p in planned]
    assert {"quadrature", "prior_mc", "ais"} <= {p.name for p in planned}
    assert any(line.startswith("ais: ") and "in all" in line for line in lines), lines
    assert any(line.startswith("BDMC: ") and "in all" in line for line in lines), lines
    # q* fits all four images in one pass: its progress comes from the optimizer's steps
    assert any(line.startswith("qstar: ") and "in all" in line for line in lines), lines
    # vae-eval's table: the distance to log_px in a column of its own, right after the estimate's stderr
    table = format_table(result).splitlines()
    assert table[0].split()[:4] == ["log", "p(x)", "stderr", "vs"]
    distance = result["estimates"]["prior_mc"]["minus_log_px"]
    row = next(line for line in table if line.startswith("prior_mc"))
    assert row.split()[3:5] == [f"{distance['value']:+.3f}", f"{distance['stderr']:.3f}"], row
