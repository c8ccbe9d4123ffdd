"""likelihood=gaussian, data.binarization=none and model=linear: the Gaussian p(x|z) of grey-level
images, and the linear-Gaussian model whose log p(x), posterior and gaps are closed-form (the maths
itself is tested in test_linear_gaussian.py; here it is tested as vae-cli uses it)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import (
    TINY,
    Crash,
    assert_same_run,
    at_step,
    compose_config,
    crash,
    log_px_quadrature,
    skip_figures,
    vae_train,
)

from vae_cli.maths.likelihoods import likelihood_spec
from vae_cli.maths.likelihoods.kernels import Gaussian
from vae_cli.maths.models import build_model
from vae_cli.maths.spec import ModelSpec
from vae_cli.run.config import data_config, model_spec, validate
from vae_cli.run.data import DEQUANTIZATION_VARIANCE, LEVELS, load_images
from vae_cli.run.rundir import EVAL, EVAL_IMAGES, read_per_image
from vae_cli.stages.evaluation import evaluate
from vae_cli.stages.pipeline import train

GREY = ["likelihood=gaussian", "data.binarization=none"]
LINEAR = ["model=linear", *GREY]
CHEAP_EVAL = [
    "eval.enabled=true",
    "eval.quadrature_points=1024",
    "eval.importance_k=32",
    "eval.iwae_k=8",
    "eval.prior_mc_samples=256",
    "eval.ais=true",
    "eval.ais_steps=40",
    "eval.ais_chains=4",
    "eval.bdmc_n_images=2",
    "eval.ais_n_images=8",
]


def linear_model(K: int, sigma: float = 0.6, per_pixel: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    spec = ModelSpec(K, "linear", likelihood_spec("gaussian", sigma=None, per_pixel=per_pixel, sigma_min=1e-3))
    model = build_model(spec, pixel_sd=torch.full((784,), sigma))
    with torch.no_grad():
        model.decoder.net.weight.mul_(0.3)
    return model.double().eval(), spec


@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("per_pixel", [False, True])
def test_the_closed_form_is_the_quadrature_at_k_1_and_2(K, per_pixel):
    model, _ = linear_model(K, per_pixel=per_pixel)
    if per_pixel:
        with torch.no_grad():
            model.likelihood.raw_sigma.add_(0.3 * torch.randn(784, generator=torch.Generator().manual_seed(3)))
    x = torch.rand(5, 784, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = model.linear_gaussian().log_px(x)
    grid = log_px_quadrature(model, x, points_per_dim=4000 if K == 1 else 600, half_width=8.0)
    assert (exact - grid).abs().max() < 1e-4, exact - grid


def test_the_gaussian_likelihood_shared_and_per_image_agree_at_a_small_sigma():
    """|x - mu|^2 as one matrix product cancels ~1e8-sized terms at sigma 1e-3: computed in float64, it
    equals the direct float32 sum of squares to float32's precision, not to whole nats."""
    torch.manual_seed(0)
    lik = Gaussian(likelihood_spec("gaussian", sigma=0.002), 784)
    x = torch.rand(4, 784)
    mu = x[:1] + 0.001 * torch.randn(6, 784)
    shared = lik.log_prob_shared(x, mu)
    direct = lik.log_prob(x, mu.expand(4, 6, 784))
    assert torch.allclose(shared, direct, rtol=1e-5, atol=0.5)  # values of +-1e6 at x != mu: float32's own precision
    assert torch.allclose(shared[0], direct[0], rtol=0, atol=0.05)  # near x, where it matters, to hundredths of a nat


def test_a_learned_sigma_never_goes_below_its_floor_and_starts_at_the_pixels_spread():
    lik = Gaussian(likelihood_spec("gaussian", sigma_min=0.01), 784, pixel_sd=torch.full((784,), 0.2))
    assert lik.sigma().item() == pytest.approx(0.2, rel=1e-5)
    with torch.no_grad():
        lik.raw_sigma.fill_(-1e4)
    assert lik.sigma().item() == pytest.approx(0.01)
    per_pixel = Gaussian(
        likelihood_spec("gaussian", per_pixel=True, sigma_min=0.01), 784, torch.linspace(0.05, 0.5, 784)
    )
    torch.testing.assert_close(per_pixel.sigma(), torch.linspace(0.05, 0.5, 784))


def test_grey_levels_are_dequantized_8_bit_values_the_test_set_once():
    cfg = compose_config(GREY)
    images = load_images(data_config(cfg), cfg.seed, torch.device("cpu"))
    assert images.test.min() >= 0 and images.test.max() < 1
    bins = torch.floor(images.test * LEVELS)
    assert torch.all((images.test * LEVELS - bins) > 0)  # each pixel inside its byte's bin of width 1/256
    again = load_images(data_config(cfg), cfg.seed + 1, torch.device("cpu"))
    assert torch.equal(images.test, again.test)  # the test set's own fixed seed
    torch.manual_seed(0)
    a, b = images.batch(8), images.batch(8)
    assert not torch.equal(a, b) and a.min() >= 0 and a.max() < 1
    mean, cov = images.train_moments()
    torch.testing.assert_close(mean.float(), images.pixel_means, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cov.diagonal().sqrt().float(), images.pixel_sd, rtol=1e-4, atol=1e-6)
    assert cov.diagonal().min() >= DEQUANTIZATION_VARIANCE


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.binarization=none"], "with likelihood=bernoulli: it models binary images"),
        (["likelihood=gaussian"], "likelihood.allow_binary_data=true"),
        ([*GREY, "likelihood.sigma=0.1", "likelihood.per_pixel=true"], "a fixed sigma is one value"),
        ([*GREY, "likelihood.sigma=0"], "likelihood.sigma=0"),
    ],
)
def test_likelihoods_that_do_not_fit_the_pixels_are_refused_in_one_line(overrides, message):
    code, err, created = vae_train([*TINY, *overrides])
    assert code == 2 and err.count("\n") == 1 and message in err and created == [], err
    validate(compose_config(["likelihood=gaussian", "likelihood.allow_binary_data=true"]))  # asked for: allowed


# exact's grid is the same for every decoder: its MLP run covers it
PAIRS = [(o, m) for o in ("jensen", "prior_iwae", "elbo", "iwae", "exact") for m in ("mlp", "linear")][:-1]


@pytest.mark.parametrize("objective, model", PAIRS)
@pytest.mark.slow
def test_every_objective_and_estimator_on_a_gaussian_likelihood(objective, model, tmp_path, monkeypatch):
    skip_figures(monkeypatch)
    overrides = [f"objective={objective}", f"model={model}", *GREY, *CHEAP_EVAL, "objective.grid_points=16"]
    overrides = [o for o in overrides if not (o.startswith("objective.grid") and objective != "exact")]
    summary = train(compose_config(overrides), tmp_path / "run")
    result = json.loads((tmp_path / "run" / EVAL).read_text())
    expected = ["closed_form"] * (model == "linear") + ["quadrature"]
    expected += ["importance"] * (objective in ("elbo", "iwae")) + ["prior_mc", "qstar", "ais"]
    assert list(result["estimates"]) == expected
    assert result["estimator"] == expected[0] and math.isfinite(result["log_px"])
    assert summary["bits_per_dim"] == result["bits_per_dim"] > 0
    assert result["reference"]["ppca"]["K"] == 2 and math.isfinite(result["reference"]["ppca"]["value"])
    for entry in result["estimates"].values():
        assert math.isfinite(entry["value"])
    per_image = read_per_image(tmp_path / "run" / EVAL_IMAGES)
    assert len(per_image[result["estimator"]]) == result["n_images"]


@pytest.mark.slow
def test_a_linear_gaussian_run_is_scored_against_its_closed_form(tmp_path, monkeypatch):
    """K=3 (no grid): log_px is the closed form, the gaps are exact, and AIS, importance and prior MC each
    show their distance to the truth."""
    skip_figures(monkeypatch)
    train(compose_config(["objective=elbo", *LINEAR, "K=3", "n_train_iters=20", *CHEAP_EVAL]), tmp_path / "run")
    result = json.loads((tmp_path / "run" / EVAL).read_text())
    assert result["estimator"] == "closed_form" and list(result["estimates"]) == [
        "closed_form", "ais", "importance", "prior_mc", "qstar"
    ]  # fmt: skip
    assert result["bounds"]["jensen"]["from"] == result["bounds"]["elbo"]["from"] == "closed_form"
    for name in ("ais", "importance", "prior_mc"):
        assert (
            result["estimates"][name]["minus_log_px"]["value"]
            < 5 * result["estimates"][name]["minus_log_px"]["stderr"] + 0.5
        )
    assert result["gap_jensen"] > 0 and result["gap_elbo"] > 0
    for gap in ("gap_jensen_estimated", "gap_elbo_estimated"):
        assert result[gap]["log_px_by"] == "ais" and math.isfinite(result[gap]["value"])
    per_image = read_per_image(tmp_path / "run" / EVAL_IMAGES)
    exact_gap = torch.tensor(per_image["closed_form"], dtype=torch.float64) - torch.tensor(
        per_image["closed_form.jensen"], dtype=torch.float64
    )
    assert exact_gap.mean().item() == pytest.approx(result["gap_jensen"], rel=1e-9)


@pytest.mark.slow
def test_the_jensen_optimum_of_a_linear_model_is_the_mean_image(tmp_path, monkeypatch):
    """E_p(z) log N(x; W z + b, sigma^2 I) = log N(x; b, sigma^2 I) - ||W||_F^2 / (2 sigma^2): maximized by W = 0."""
    skip_figures(monkeypatch)
    cfg = compose_config(
        ["objective=jensen", *LINEAR, "n_train_iters=300", "batch_size=64", "lr=0.01", "eval.enabled=false"]
    )
    train(cfg, tmp_path / "run")
    from vae_cli.run.checkpoint import load_model

    _, model, _ = load_model(tmp_path / "run")
    assert model.decoder.net.weight.norm() < 0.05 * torch.ones(784, 2).norm()  # W shrinks towards 0


@pytest.mark.slow
def test_a_gaussian_run_resumes_bit_for_bit(tmp_path, monkeypatch):
    skip_figures(monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        overrides = [
            "objective=elbo",
            "model=linear",
            *GREY,
            "n_train_iters=10",
            "checkpoint_every=3",
            "eval.enabled=false",
        ]
        train(compose_config(overrides), tmp_path / "reference")
        with monkeypatch.context() as mp:
            at_step(mp, 7, crash)
            with pytest.raises(Crash):
                train(compose_config(overrides), tmp_path / "run")
        train(compose_config([*overrides, f"resume={tmp_path / 'run'}"]), tmp_path / "run", changed=[])
        assert_same_run(tmp_path / "run", tmp_path / "reference")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_the_sigma_of_a_gaussian_model_is_in_its_checkpoint(tmp_path, monkeypatch):
    skip_figures(monkeypatch)
    cfg = compose_config(["objective=jensen", *GREY, "likelihood.per_pixel=true", "eval.enabled=false"])
    train(cfg, tmp_path / "run")
    from vae_cli.run.checkpoint import load_checkpoint

    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["model"]["likelihood.raw_sigma"].shape == (784,)
    assert model_spec(cfg).likelihood.option("per_pixel")
    torch.manual_seed(0)
    images = load_images(data_config(cfg), cfg.seed, torch.device("cpu"))
    result, _ = evaluate(
        build_model(model_spec(cfg), images.pixel_means, images.pixel_sd), model_spec(cfg), images, cfg.eval
    )
    assert result["estimator"] == "quadrature" and "bits_per_dim" in result
