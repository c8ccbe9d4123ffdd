"""The Python API: a run loaded from its directory, its model, its per-image log p(x) by the estimators
of vae-eval, the exact posterior, the images the runs use, and training from Python."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from helpers import TINY

import vae_cli
from vae_cli.errors import RunDirError, UserError
from vae_cli.run.rundir import CHECKPOINT, SUMMARY
from vae_cli.stages.estimates import points_per_dim

CHEAP = ["eval.quadrature_points=1024", "eval.importance_k=16", "eval.iwae_k=4", "eval.prior_mc_samples=64"]


@pytest.fixture(scope="module")
def elbo_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("api") / "elbo"
    summary = vae_cli.train([*TINY, "objective=elbo", "eval.enabled=true", *CHEAP], run_dir)
    assert summary["status"] == "completed"
    return run_dir


def test_load_a_run_and_draw_16_samples_in_three_lines(elbo_run):
    run = vae_cli.load_run(elbo_run)
    x = run.model.sample(16, seed=0)
    assert x.shape == (16, 784) and set(x.unique().tolist()) <= {0.0, 1.0}  # samples of Bernoulli pixels, not means
    assert torch.equal(x, run.model.sample(16, seed=0)) and not torch.equal(x, run.model.sample(16, seed=1))


def test_a_run_holds_its_files_read_once(elbo_run):
    run = vae_cli.load_run(elbo_run)
    assert run.config["objective"]["name"] == "elbo" and run.config["K"] == 2
    assert run.status == "completed" and run.summary["steps"] == run.step == 5
    assert run.eval["estimator"] == "quadrature"
    assert list(run.losses) == ["step", "loss", "recon", "kl"] and isinstance(run.losses["loss"], np.ndarray)
    assert run.per_image["quadrature"].shape == (run.eval["n_images"],)
    assert run.device == torch.device("cpu") and not run.model.training


def test_the_model_decodes_encodes_and_samples_the_prior(elbo_run):
    model = vae_cli.load_run(elbo_run).model
    z = model.prior_sample(7, seed=3)
    assert z.shape == (7, 2) and torch.equal(z, model.prior_sample(7, seed=3))
    means = model.decode(z)
    assert means.shape == (7, 784) and 0 <= means.min() and means.max() <= 1  # E[x|z], not logits
    mu, logvar = model.encode(vae_cli.test_images(vae_cli.load_run(elbo_run).config, n=4))
    assert mu.shape == logvar.shape == (4, 2)


@pytest.mark.slow
def test_log_px_per_image_by_the_estimators_of_vae_eval(elbo_run):
    run = vae_cli.load_run(elbo_run)
    x = vae_cli.test_images(run.config, n=run.eval["n_images"])
    auto = run.log_px(x)  # quadrature at K=2, the run's own eval settings: what eval_images.csv holds
    assert auto.shape == (len(x),) and auto.dtype == torch.float64
    np.testing.assert_allclose(auto.numpy(), run.per_image["quadrature"], atol=1e-5)
    importance = run.log_px(x[:8], "importance", importance_k=64)
    ais = run.log_px(x[:4], "ais", ais_steps=50, ais_chains=4)
    assert (importance - auto[:8]).mean() < 0.5 and (ais - auto[:4]).abs().mean() < 2.0
    with pytest.raises(UserError, match="invalid estimator 'exact'"):
        run.log_px(x, "exact")
    with pytest.raises(UserError, match="invalid estimator 'closed_form' for this run .*allowed auto, quadrature, ais"):
        run.log_px(x, "closed_form")  # an MLP decoder has no closed form


@pytest.mark.slow
def test_the_exact_posterior_on_a_grid(elbo_run):
    run = vae_cli.load_run(elbo_run)
    x = vae_cli.test_images(run.config, n=3)
    post = run.posterior(x, points=61)
    assert post.log_posterior.shape == (3, 61, 61)
    assert np.allclose(np.exp(post.log_posterior).sum(axis=(1, 2)), 1.0, atol=1e-4)
    exact = run.log_px(x, "quadrature", quadrature_points=points_per_dim(600**2, 2) ** 2)
    assert np.allclose(post.log_px, exact.numpy(), atol=0.2)  # the grid over [-3, 3]^2 holds the posterior


def test_the_images_the_runs_use(elbo_run):
    run = vae_cli.load_run(elbo_run)
    test = vae_cli.test_images(run.config)
    assert test.shape == (64, 784) and torch.equal(test[:5], vae_cli.test_images(run.config, n=5))
    train = vae_cli.train_images(run.config, n=10)
    assert train.shape == (10, 784) and set(train.unique().tolist()) <= {0.0, 1.0}


def test_a_broken_or_foreign_directory_raises_the_commands_one_line(elbo_run, tmp_path):
    with pytest.raises(RunDirError, match="does not exist"):
        vae_cli.load_run(tmp_path / "missing")
    broken = tmp_path / "broken"
    shutil.copytree(elbo_run, broken)
    (broken / SUMMARY).write_text("{not json")
    with pytest.raises(RunDirError, match=f"{SUMMARY} is not valid JSON") as info:
        vae_cli.load_run(broken)
    assert "\n" not in str(info.value)
    (broken / SUMMARY).unlink()
    (broken / CHECKPOINT).write_bytes(b"garbage")
    with pytest.raises(RunDirError, match="not a readable vae-cli checkpoint"):
        vae_cli.load_run(broken)


@pytest.mark.slow
def test_train_from_python_in_a_loop(tmp_path):
    summaries = [vae_cli.train([*TINY, f"seed={seed}"], tmp_path / str(seed)) for seed in (0, 1)]
    assert [s["seed"] for s in summaries] == [0, 1] and all(s["status"] == "completed" for s in summaries)
    with pytest.raises(UserError, match="did you mean n_samples"):
        vae_cli.train([*TINY, "n_sample=3"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
