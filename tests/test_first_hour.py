"""The first hour as a new user meets it: a hint on the CPU, errors that suggest, vae-eval that says
what it reuses and evaluates a sweep's runs, refused runs that leave nothing behind, and figures that
say what they show."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from helpers import TINY, compose_config, vae_train

import vae_cli.run.datafiles
from vae_cli.commands.evaluate import main as eval_main
from vae_cli.stages.pipeline import train
from vae_cli.stages.training import CpuHint, cpu_hint

pytestmark = pytest.mark.slow  # make test-all only (docs/contributing.md, Tests)

CHEAP = ["eval.enabled=true", "eval.quadrature_points=256", "eval.prior_mc_samples=32", "eval.ais_steps=10"]


def test_the_cpu_hint_estimates_the_run_and_names_the_faster_ways(monkeypatch):
    monkeypatch.setattr("vae_cli.stages.training.cpu_has_bf16", lambda: True)
    line = cpu_hint(compose_config([], tiny=False), seconds_left=1000 * 1.05)
    assert line.startswith("on the CPU this run needs about 18 min more for its 1000 steps")
    assert "sized for a GPU" in line and "objective.shared_samples=true" in line
    assert "cpu.bf16=true" in line and "+experiment=demo" in line
    elbo = cpu_hint(compose_config(["objective=elbo", "cpu.bf16=true"], tiny=False), seconds_left=600)
    assert "shared_samples" not in elbo and "cpu.bf16" not in elbo  # neither applies
    assert cpu_hint(compose_config([], tiny=False), seconds_left=60) is None  # a short run needs no hint


def test_the_hint_comes_once_after_the_first_steps_on_the_cpu(caplog):
    cfg = compose_config(["n_train_iters=1000"])
    hint = CpuHint(cfg, torch.device("cpu"), first_step=0)
    with caplog.at_level(logging.WARNING):
        for step, now in enumerate([10.0, 11.0, 12.0, 13.0, 14.0, 15.0], start=1):  # 1 s a step after the first
            hint.after(step, now)
    (record,) = [r for r in caplog.records if "on the CPU" in r.getMessage()]
    assert "about 17 min more" in record.getMessage()
    assert CpuHint(cfg, torch.device("cuda"), 0).done  # never on CUDA


def test_a_refused_run_leaves_nothing_behind(monkeypatch, tmp_path):
    monkeypatch.setattr(vae_cli.run.datafiles, "FASHION_DEBIAN_DIR", tmp_path / "no-such-package")
    code, err, created = vae_train([o for o in TINY if not o.startswith("data.n_")] + ["data=fashion_mnist"])
    assert code == 2 and "fashion_mnist files missing" in err and "dataset-fashion-mnist" in err
    assert created == []  # no train.log, no .hydra, no empty directory


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two tiny evaluated runs as the jobs of a multirun directory."""
    root = tmp_path_factory.mktemp("sweep")
    for number, objective in enumerate(("jensen", "elbo")):
        train(compose_config([f"objective={objective}", *CHEAP]), root / str(number))
    return root


def test_vae_eval_reuses_what_eval_json_holds_and_says_so(sweep, capsys):
    run = sweep / "1"
    before = json.loads((run / "eval.json").read_text())
    eval_main([str(run), "--no-ais"])
    out = capsys.readouterr().out
    after = json.loads((run / "eval.json").read_text())
    assert after["reused"] == ["quadrature", "importance", "prior_mc", "qstar"] and "quadrature * (reused)" in out
    assert "reused from eval.json (same checkpoint and settings)" in out and "--recompute" in out
    assert after["estimates"]["quadrature"]["value"] == before["estimates"]["quadrature"]["value"]
    eval_main([str(run), "--no-ais", "--prior-mc-samples", "64"])  # a setting that changes: that estimator again
    assert json.loads((run / "eval.json").read_text())["reused"] == ["quadrature", "importance", "qstar"]
    eval_main([str(run), "--no-ais", "--recompute"])
    assert json.loads((run / "eval.json").read_text())["reused"] == []
    capsys.readouterr()


def test_rows_on_fewer_images_get_their_own_block(sweep, capsys):
    eval_main([str(sweep / "1"), "--no-ais", "--importance-n-images", "16", "--recompute"])
    out = capsys.readouterr().out
    head, block = out.split("-- on the first 16 test images only (log_px's first 16 are the same images):")
    assert "importance" in block and "bound elbo" in block and "importance" not in head.split("\n", 2)[2]


def test_vae_eval_on_a_multirun_directory_evaluates_each_run(sweep, capsys):
    eval_main([str(sweep), "--no-ais"])
    out = capsys.readouterr().out
    assert f"vae-eval: {sweep / '0'} (jensen)" in out and f"vae-eval: {sweep / '1'} (elbo)" in out


def test_summary_and_titles_carry_the_models_shape(sweep):
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    assert summary["model"] == "mlp 2x16 elu, bernoulli"
    assert summary["experiment"]["model.hidden"] == "16" and "progress" not in summary["experiment"]
