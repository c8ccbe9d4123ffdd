"""Annealed importance sampling and BDMC (vae_cli.maths.ais) on small models where a fine grid is the
truth, and AIS as the evaluation's log_px where K > 2."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from helpers import compose_config, evaluate_images, log_px_quadrature, mlp_spec
from omegaconf import OmegaConf

from vae_cli.maths import ais as ais_module
from vae_cli.maths.ais import AISSettings, ais, bdmc, max_step_size, sigmoid_schedule, simulate
from vae_cli.maths.likelihoods import likelihood_spec
from vae_cli.maths.models import build_model
from vae_cli.maths.spec import ModelSpec
from vae_cli.run.keys import EvalConfig
from vae_cli.stages import estimates
from vae_cli.stages.estimates import ais_settings, ais_sizes
from vae_cli.stages.evaluation import format_table

pytestmark = pytest.mark.slow  # make test-all only (docs/contributing.md, Tests)


def settings(steps: int = 500, chains: int = 16, leapfrog: int = 5, gradient_dtype=torch.float32) -> AISSettings:
    return AISSettings(steps, chains, leapfrog, step_size=None, seed=0, gradient_dtype=gradient_dtype)


FAST = settings(steps=200, chains=8, leapfrog=5)
BATCH = 100  # images per AIS pass


def sharp_model(K: int = 2, seed: int = 0):
    """A small decoder whose posteriors are far narrower than the prior (the hard case for AIS)."""
    torch.manual_seed(seed)
    model = build_model(mlp_spec(K))
    with torch.no_grad():
        model.decoder.net[0].weight.mul_(3)
    return model.eval()


def linear_model(K: int, sigma: float = 0.1, seed: int = 0):
    """pPCA with orthogonal columns of W (so H, -d^2 log p(x|z) / dz^2 = W^T W / sigma^2, is diagonal) whose
    posterior sd is 0.7 to 0.2 (as in the README's trained linear models): log p(x) exact at any K."""
    generator = torch.Generator().manual_seed(seed)
    model = build_model(ModelSpec(K, "linear", likelihood_spec("gaussian", sigma=sigma, sigma_min=1e-3)))
    columns, _ = torch.linalg.qr(torch.randn(784, K, generator=generator))
    with torch.no_grad():
        model.decoder.net.weight.copy_(columns * torch.linspace(0.1, 0.5, K))
        model.decoder.net.bias.uniform_(0.2, 0.8, generator=generator)
    return model.eval()


def test_the_sigmoid_schedule_runs_from_0_to_1_densest_at_the_ends():
    betas = sigmoid_schedule(100)
    assert betas[0] == 0 and betas[-1] == 1 and len(betas) == 101
    steps = betas.diff()
    assert (steps > 0).all() and steps[0] < steps[50] and steps[-1] < steps[50]


@pytest.mark.parametrize("gradient_dtype", [torch.float32, torch.bfloat16])
def test_ais_agrees_with_a_fine_grid_where_the_grid_is_the_truth(gradient_dtype):
    model = sharp_model()
    x, _ = simulate(model, 24, seed=1)
    truth = log_px_quadrature(model, x, points_per_dim=800)  # 800^2 points: converged to 1e-4 here
    assert (truth - log_px_quadrature(model, x, points_per_dim=400)).abs().max() < 1e-3
    estimate = ais(model, x, settings(steps=500, chains=8, gradient_dtype=gradient_dtype), BATCH).estimate()
    assert (estimate - truth).mean().abs() < 0.05  # the mean over images, as eval.json reports it
    assert (estimate - truth).abs().max() < 0.5


def test_bdmc_brackets_log_px_and_its_gap_is_small_at_the_default_schedule():
    model = sharp_model()
    result = bdmc(model, 16, settings(steps=500, chains=8), BATCH)
    x, _ = simulate(model, 16, seed=0)
    truth = log_px_quadrature(model, x, points_per_dim=800)
    gap = result.upper - result.lower
    assert gap.mean() < 0.2
    assert result.lower.mean() <= truth.mean() + 0.05 and result.upper.mean() >= truth.mean() - 0.05
    # eps at its cap (a quarter oscillation in the mass matrix's units) accepts more than the 0.65 it would be lowered at
    assert 0.4 < result.forward.acceptance.mean() <= 1 and 0.4 < result.reverse.acceptance.mean() <= 1


@pytest.mark.parametrize("gradient_dtype", [torch.float32, torch.bfloat16])
def test_no_result_depends_on_the_batch_size(gradient_dtype):
    model = sharp_model(K=3)
    x, _ = simulate(model, 10, seed=2)
    schedule = settings(steps=30, chains=4, leapfrog=3, gradient_dtype=gradient_dtype)
    a, b = ais(model, x, schedule, batch_size=10), ais(model, x, schedule, batch_size=3)
    assert torch.allclose(a.log_w, b.log_w, atol=1e-4)
    # an image's draws are its own: evaluated alone (at its index) it gets the same weights
    alone = ais(model, x[7:8], schedule, batch_size=1, first=7)
    assert torch.allclose(alone.log_w, a.log_w[7:8], atol=1e-4)


def test_a_decoder_that_ignores_z_gets_its_exact_likelihood_with_zero_spread():
    model = sharp_model()
    with torch.no_grad():
        model.decoder.net[0].weight.zero_()
        logits = model.decoder(torch.zeros(1, 2))[0]
    x, _ = simulate(model, 4, seed=3)
    exact = x @ logits - torch.nn.functional.softplus(logits).sum()
    result = ais(model, x, settings(steps=20, chains=4, leapfrog=2), BATCH)
    assert torch.allclose(result.estimate(), exact.double(), atol=1e-4)


def test_bf16_gradients_leave_the_weights_float32():
    """Only the leapfrog's force comes from the bf16 copy: where z does not matter, the estimate is the
    float32 likelihood to round-off, though the bf16 decoder's own likelihood is off by far more."""
    model = sharp_model()
    with torch.no_grad():
        model.decoder.net[0].weight.zero_()
        model.decoder.net[-1].bias.normal_(0, 3)  # logits of a few nats: bf16 rounds them by hundredths
        logits = model.decoder(torch.zeros(1, 2))[0]
    x, _ = simulate(model, 4, seed=3)
    exact = (x @ logits - torch.nn.functional.softplus(logits).sum()).double()
    in_bf16 = copy.deepcopy(model).to(torch.bfloat16).log_px_given_z(x, torch.zeros(4, 1, 2, dtype=torch.bfloat16))
    assert (in_bf16[:, 0].double() - exact).abs().max() > 0.01
    result = ais(model, x, settings(steps=20, chains=4, leapfrog=2, gradient_dtype=torch.bfloat16), BATCH)
    assert torch.allclose(result.estimate(), exact, atol=1e-4)


def test_the_gradient_dtype_is_bf16_where_the_device_has_it_unless_set(monkeypatch):
    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(estimates, "has_native_bf16", lambda device, native=native: native)
        assert ais_settings(EvalConfig(), cpu, False).gradient_dtype == (torch.bfloat16 if native else torch.float32)
        assert ais_settings(EvalConfig(ais_bf16_gradients=False), cpu, False).gradient_dtype == torch.float32
        assert ais_settings(EvalConfig(ais_bf16_gradients=True), cpu, False).gradient_dtype == torch.bfloat16


@pytest.mark.parametrize("objective", ["jensen", "elbo"])
def test_ais_is_log_px_where_k_exceeds_2_with_its_bdmc_gap(objective):
    cfg = compose_config([f"objective={objective}", "K=4", "eval.prior_mc_samples=2000", "eval.importance_k=256"])
    spec = mlp_spec(4, encoder=objective == "elbo")
    model = sharp_model(K=4) if objective == "jensen" else build_model(spec).eval()
    x, _ = simulate(model, 32, seed=4)
    cfg_eval = OmegaConf.merge(cfg.eval, {"ais_steps": 200, "ais_chains": 8, "bdmc_n_images": 8})
    result = evaluate_images(model, spec, x, cfg_eval)
    assert result["estimator"] == "ais" and list(result["estimates"])[0] == "ais"
    entry = result["estimates"]["ais"]
    assert entry["settings"]["steps"] == 200 and entry["settings"]["schedule"].startswith("sigmoid")
    assert entry["settings"]["gradients"] == str(ais_settings(cfg_eval, x.device, False).gradient_dtype).removeprefix(
        "torch."
    )
    assert 0.4 < entry["acceptance"] <= 1 and entry["step_size"] <= max_step_size(entry["settings"]["leapfrog"]) * (
        1 + 1e-6
    )  # float32
    assert set(entry["bdmc"]) >= {"lower", "upper", "gap", "acceptance", "n_images"}
    assert result["bdmc_gap"] == entry["bdmc"]["gap"]["value"] < 1.0
    # AIS is not below the other estimators beyond their paired stderr (they are stochastic lower bounds too)
    for name, other in result["estimates"].items():
        if name != "ais":
            assert other["minus_log_px"]["value"] <= 3 * other["minus_log_px"]["stderr"] + 0.01, name
    table = format_table(result)
    assert "ais *" in table and "BDMC gap" in table and "vs *" in table


def test_at_k_2_ais_runs_next_to_the_quadrature_only_when_asked():
    cfg = compose_config(["objective=jensen", "eval.quadrature_points=4096", "eval.prior_mc_samples=256"])
    model = sharp_model()
    x, _ = simulate(model, 16, seed=5)
    spec = mlp_spec(2)
    assert (
        "ais" not in evaluate_images(model, spec, x, cfg.eval)["estimates"]
    )  # vae-train's end of training: the grid alone
    cheap = OmegaConf.merge(cfg.eval, {"ais_steps": 20, "ais_chains": 2, "bdmc_n_images": 0})
    assert "ais" in evaluate_images(model, spec, x, cheap, ais_everywhere=True)["estimates"]  # vae-eval's
    cfg_eval = OmegaConf.merge(cfg.eval, {"ais": True, "ais_steps": 200, "bdmc_n_images": 4})
    result = evaluate_images(model, spec, x, cfg_eval)
    assert result["estimator"] == "quadrature"
    assert abs(result["estimates"]["ais"]["minus_log_px"]["value"]) < 0.05


def test_the_default_sizes_are_a_subset_on_the_cpu_and_everything_on_cuda():
    assert ais_sizes(EvalConfig(), torch.device("cpu"), 10_000) == (32, 8)
    assert ais_sizes(EvalConfig(), torch.device("cuda"), 10_000) == (10_000, 100)
    assert ais_sizes(EvalConfig(ais_n_images=0, bdmc_n_images=0), torch.device("cpu"), 10_000) == (10_000, 0)


def test_the_mass_matrix_is_for_linear_decoders_unless_set():
    cpu = torch.device("cpu")
    assert ais_settings(EvalConfig(), cpu, True).mass_matrix and not ais_settings(EvalConfig(), cpu, False).mass_matrix
    assert ais_settings(EvalConfig(ais_mass_matrix=True), cpu, False).mass_matrix
    assert not ais_settings(EvalConfig(ais_mass_matrix=False), cpu, True).mass_matrix


def test_without_the_mass_matrix_the_pilot_leaves_m_the_identity():
    model = linear_model(K=3)
    x, _ = simulate(model, 2, seed=6)
    schedule = dataclasses.replace(settings(steps=20, chains=2), mass_matrix=False)
    kernels = ais_module._pilot(ais_module._Likelihood(model, model, x), len(x), 0, schedule, model.K, x.device, "ais")
    assert (kernels.curvature == 0).all()


def test_the_pilot_measures_the_curvature_of_log_px_given_z():
    """For a quadratic log p(x|z) every leapfrog secant is exact: the pilot's H is W^T W / sigma^2's diagonal."""
    model = linear_model(K=6)
    x, _ = simulate(model, 3, seed=6)
    curvature = (model.decoder.net.weight**2).sum(0) / 0.1**2
    schedule = settings(steps=50, chains=4)
    likelihood = ais_module._Likelihood(model, model, x)
    kernels = ais_module._pilot(likelihood, len(x), 0, schedule, model.K, x.device, "ais")
    assert torch.allclose(kernels.curvature, curvature.expand_as(kernels.curvature), rtol=1e-3)
    assert (kernels.step_size <= max_step_size(schedule.leapfrog)).all() and (kernels.step_size > 0).all()


@pytest.mark.parametrize("K", [2, 20])
def test_ais_is_within_a_tenth_of_a_nat_of_the_closed_form_of_a_sharp_linear_model(K):
    """At the defaults (500 steps, 16 chains); AIS is a stochastic lower bound, so not above beyond its stderr."""
    model = linear_model(K)
    x, _ = simulate(model, 16, seed=7)
    truth = model.linear_gaussian().log_px(x)
    result = ais(model, x, settings(), BATCH)
    d = result.estimate() - truth
    assert d.mean().abs() < 0.1 and d.min() > -1, d
    assert d.mean() < 3 * d.std() / len(d) ** 0.5 + 0.01
    assert 0.6 < result.acceptance.mean() < 1.0


def test_bdmc_runs_the_reverse_pass_with_the_forward_pilots_kernels():
    """The pilot's draws are its own (seed, image), not the pass's: both passes get the same kernels."""
    model = linear_model(K=4)
    x, z = simulate(model, 5, seed=0)
    forward, reverse = ais(model, x, FAST, BATCH), ais(model, x, FAST, BATCH, start=z)
    assert torch.equal(forward.step_size, reverse.step_size)
    truth = model.linear_gaussian().log_px(x)
    assert forward.estimate().mean() <= truth.mean() + 0.05 <= reverse.estimate(reverse=True).mean() + 0.1
