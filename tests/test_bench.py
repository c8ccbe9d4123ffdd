"""benchmarks/bench.py at tiny sizes: its variants compute the step they claim to, and a short
run writes the fields the README's speed table is made from. (No timing is asserted.)"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY
from torch import nn

from benchmarks import bench as bench_module
from vae_cli.stages.training import mlp_flops

pytestmark = pytest.mark.slow  # make test-all only (docs/contributing.md, Tests)

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
SETTINGS = [o for o in TINY if not o.startswith(("progress", "device", "n_train_iters", "eval."))]


@pytest.fixture(scope="module")
def bench():
    return bench_module


def bench_args(**extra) -> argparse.Namespace:
    return argparse.Namespace(set=SETTINGS + extra.pop("set", []), tf32=False, bf16=False, compile=False, **extra)


def first_step(bench, kind: str, objective: str, overrides: list[str] | None = None):
    args = bench_args(set=overrides or [])
    cfg = bench.compose_config(args, ["device=cpu"])
    torch.manual_seed(0)  # the batch is drawn with torch's global generator
    batches, images, _ = bench.load_batches(cfg, 1, torch.device("cpu"))
    means = images.pixel_means
    v = bench.make_variant(kind, objective, args, torch.device("cpu"), means)
    torch.manual_seed(3)
    loss = v.step(batches[0])
    grads = [p.grad.clone() for p in v.model.decoder.parameters()]
    return v, loss, grads


@pytest.mark.parametrize("objective", ["jensen", "prior_iwae"])
@pytest.mark.parametrize("kind", ["reference", "w/o fused lik.", "w/o denormal flush", "w/o in-place ELU"])
def test_variants_take_the_same_step_as_vae_cli(bench, objective, kind, monkeypatch):
    """Same start (the mean image), same draws: the same loss and decoder gradients."""
    # the reference's prior draws, in the order vae-cli's sample_prior makes them
    monkeypatch.setattr(torch.distributions.Normal, "sample", lambda self, shape: torch.randn(*shape, *self.loc.shape))
    _, loss, grads = first_step(bench, "vae-cli", objective)
    _, other_loss, other_grads = first_step(bench, kind, objective)
    assert other_loss == pytest.approx(loss, rel=1e-5)
    for g, h in zip(grads, other_grads):
        torch.testing.assert_close(h, g, rtol=1e-4, atol=1e-5)


def test_ablations_take_back_what_they_name(bench):
    v, _, _ = first_step(bench, "w/o in-place ELU", "jensen")
    assert not any(m.inplace for m in v.model.modules() if isinstance(m, nn.ELU))
    v, _, _ = first_step(bench, "vae-cli", "jensen")
    assert all(m.inplace for m in v.model.modules() if isinstance(m, nn.ELU))
    v, _, _ = first_step(bench, "vae-cli", "jensen", ["micro_batch=4"])
    assert v.options["micro_batch"] == 4 and v.pass_rows == 4 * 4
    v, loss, _ = first_step(bench, "w/o micro-batches", "jensen", ["micro_batch=4"])
    assert v.options["micro_batch"] == 16 and math.isfinite(loss)


def test_flops_count_every_matmul_of_the_default_step(bench):
    sizes = [2, 512, 512, 512, 784]
    rows = 256 * 128
    per_row = 2 * (2 * 512 + 512 * 512 * 2 + 512 * 784)
    assert mlp_flops(rows, sizes) == rows * per_row


def test_short_run_writes_the_table_fields(bench, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(BENCH),
        "--rounds",
        "1",
        "--warmup",
        "1",
        "--objectives",
        "jensen,elbo",
        "--ablations",
        "--no-memory",
        "--eval-images",
        "16",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--set",
        *SETTINGS,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    variants = {(r["objective"], r["variant"]) for r in result["steps"]}
    assert {
        ("jensen", "reference"),
        ("jensen", "vae-cli"),
        ("jensen", "vae-cli shared"),
        ("elbo", "reference"),
        ("elbo", "vae-cli"),
    } <= variants
    assert {("jensen", kind) for kind in bench.ABLATIONS} <= variants
    for r in result["steps"]:
        assert r["s_per_step"] > 0 and r["flops_per_step"] > 0 and 0 < r["fraction_of_floor"]
        assert r["profile"]["matmul_s"] > 0
    assert result["process_settings"]["flush_denormal"] is True
    assert result["eval"]["n_images"] == 16 and result["eval"]["estimates"]["quadrature"]["seconds"] > 0
    assert result["eval"]["estimates"]["importance"]["n_images"] == 16
    assert result["machine_facts"]["blas"] and result["machine_facts"]["threads"] >= 1
    assert result["targets"] and all("default config" in t["note"] for t in result["targets"])
    assert "target " in proc.stdout and "buys" in proc.stdout


def test_memory_probe_reports_the_peak_of_a_step():
    cmd = [sys.executable, str(BENCH), "--memory-probe", "jensen", "vae-cli", "--device", "cpu", "--set", *SETTINGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    assert probe["peak_bytes"] > 0 and "VmHWM" in probe["measures"]
