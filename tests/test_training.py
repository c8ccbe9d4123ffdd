"""End-to-end training on tiny sizes, in-process: every artifact exists and parses."""

from __future__ import annotations

import json

import matplotlib.image
import pytest
import torch

from vae_cli.errors import RunDirError
from vae_cli.maths.likelihoods.kernels import Bernoulli
from vae_cli.maths.models import Decoder, LatentVariableModel, build_model
from vae_cli.maths.objectives import OBJECTIVES, Loss, Objective
from vae_cli.run.checkpoint import load_checkpoint
from vae_cli.run.config import data_config, model_spec
from vae_cli.run.data import load_images
from vae_cli.run.rundir import read_losses
from vae_cli.stages.pipeline import train
from vae_cli.stages.training import micro_batch_size, train_step

SUMMARY_KEYS = {
    "objective",
    "K",
    "n_samples",
    "batch_size",
    "steps",
    "final_loss",
    "final_loss_stderr",
    "train_seconds",
    "it_per_s",
    "device",
    "torch_version",
    "status",
}


def check_run_dir(run_dir, objective: str, steps: int) -> dict:
    losses = read_losses(run_dir / "losses.csv")
    assert list(losses) == ["step", "loss", *OBJECTIVES[objective].terms]
    assert losses["step"] == list(range(1, steps + 1))
    assert all(torch.isfinite(torch.tensor(losses["loss"])))
    for name in ("loss.png", "samples.png", "means.png"):
        image = matplotlib.image.imread(run_dir / name)
        assert image.ndim == 3 and min(image.shape[:2]) > 100, name
    state = load_checkpoint(run_dir / "checkpoint.pt")
    assert {"model", "optimizer", "step", "rng", "config"} <= set(state)
    assert state["step"] == steps and state["config"]["objective"]["name"] == objective
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["objective"] == objective and summary["steps"] == steps and summary["status"] == "completed"
    return summary


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_each_objective_trains_and_writes_every_artifact(make_cfg, tmp_path, objective):
    cfg = make_cfg([f"objective={objective}"])
    metrics = train(cfg, run_dir=tmp_path)
    summary = check_run_dir(tmp_path, objective, cfg.n_train_iters)
    assert metrics["final_loss"] == pytest.approx(summary["final_loss"])
    assert summary["device"].startswith("cpu")


@pytest.mark.parametrize("K", [1, 2, 5, 50])
@pytest.mark.slow
def test_every_layer_is_sized_from_K(make_cfg, tmp_path, K):
    cfg = make_cfg(["objective=elbo", f"K={K}", "n_train_iters=2"])
    train(cfg, run_dir=tmp_path)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["model"]["decoder.net.0.weight"].shape[1] == K
    assert state["model"]["encoder.net.4.weight"].shape[0] == 2 * K


@pytest.mark.slow
def test_decoder_starts_at_the_mean_image_model(make_cfg, tmp_path):
    cfg = make_cfg()
    data = load_images(data_config(cfg), cfg.seed, torch.device("cpu"))
    model = build_model(model_spec(cfg), data.pixel_means)
    last = model.decoder.net[-1]
    torch.testing.assert_close(torch.sigmoid(last.bias), data.pixel_means.clamp(1e-4, 1 - 1e-4))


@pytest.mark.slow
def test_dynamic_binarization_trains(make_cfg, tmp_path):
    train(make_cfg(["data.binarization=dynamic"]), run_dir=tmp_path)
    check_run_dir(tmp_path, "jensen", 5)


def test_a_run_directory_is_never_overwritten(make_cfg, tmp_path):
    cfg = make_cfg(["n_train_iters=1"])
    train(cfg, run_dir=tmp_path)
    before = (tmp_path / "losses.csv").read_bytes()
    with pytest.raises(RunDirError, match="already holds a run"):
        train(cfg, run_dir=tmp_path)
    assert (tmp_path / "losses.csv").read_bytes() == before


def test_micro_batches_accumulate_the_same_gradient():
    """A deterministic objective: the step with 4 micro-batches equals the whole-batch step."""
    torch.manual_seed(0)
    z = torch.randn(1, 3, 2)

    def fixed_z(model, x, n_samples, options=None):
        return Loss(-model.log_px_given_z(x, z.expand(len(x), -1, -1)).mean())

    objective = Objective("fixed", fixed_z, "a fixed z", {})
    x = torch.bernoulli(torch.full((12, 784), 0.2))
    grads = []
    for micro_batch in (12, 3):
        torch.manual_seed(1)
        model = LatentVariableModel(2, Decoder(2, 8, 2, "elu"), Bernoulli())
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        row = train_step(model, opt, objective, x, 3, micro_batch)
        grads.append((row["loss"], [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_automatic_micro_batch(make_cfg):
    cfg = make_cfg([], tiny=False)
    assert micro_batch_size(cfg, torch.device("cpu")) == 41  # logits of 41 x 128 x 784 floats < 16 MiB
    assert micro_batch_size(cfg, torch.device("cuda")) == 256
    assert micro_batch_size(make_cfg(["micro_batch=100"], tiny=False), torch.device("cpu")) == 100


@pytest.mark.mnist
def test_real_mnist_run(make_cfg, tmp_path, mnist_root):
    cfg = make_cfg(["data=mnist", f"data.root={mnist_root}", "n_train_iters=3"])
    summary = train(cfg, run_dir=tmp_path / "run")
    check_run_dir(tmp_path / "run", "jensen", 3)
    assert "mnist" in summary["data"]
    # The decoder starts at the mean-image model: about 206 nats on binarized MNIST, not ~544 (p=0.5).
    assert 150 < summary["final_loss"] < 260
