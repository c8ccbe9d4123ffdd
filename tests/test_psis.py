"""vae_cli.maths.psis: k-hat against a known shape and against arviz-stats' PSIS; the estimators'
diagnostics from the same draws as their estimates (a running top for prior Monte Carlo)."""

import math

import numpy as np
import pytest
import torch
from arviz_stats.base import array_stats
from helpers import images_of, mlp_spec
from omegaconf import OmegaConf

from vae_cli.maths import streams
from vae_cli.maths.estimators import (
    importance_sums,
    weighted_sums,
)
from vae_cli.maths.models import build_model
from vae_cli.maths.psis import effective_sample_size, khat_from_top, merge_top, pareto_khat, tail_length
from vae_cli.run.keys import EvalConfig
from vae_cli.stages.evaluation import evaluate, format_table


def gpd_log_sample(shape: float, n_rows: int, S: int, seed: int = 0) -> torch.Tensor:
    """log of generalized Pareto draws of `shape` (scale 1), by inversion: the weights' true k is `shape`."""
    u = np.random.default_rng(seed).random((n_rows, S))
    return torch.from_numpy(np.log(np.expm1(-shape * np.log1p(-u)) / shape))


@pytest.mark.parametrize("shape", [0.3, 0.5, 0.9])
def test_khat_recovers_a_known_shape(shape):
    khat = pareto_khat(gpd_log_sample(shape, 200, 4000))
    assert abs(float(khat.mean()) - shape) < 0.05


@pytest.mark.parametrize("S", [100, 1000, 10000])
def test_khat_is_arviz_stats_psis(S):
    log_w = torch.cat([gpd_log_sample(0.6, 20, S), torch.randn(20, S, dtype=torch.float64)])
    # arviz-stats' psislw takes log-likelihoods: its weights are exp(-ary) (PSIS-LOO), so pass -log w
    _, expected = array_stats.psislw(-log_w.numpy(), r_eff=1)
    np.testing.assert_allclose(pareto_khat(log_w).numpy(), expected, rtol=1e-9, atol=1e-12)


def test_running_top_over_chunks_is_the_whole_top():
    log_w = gpd_log_sample(0.5, 7, 3000)
    size = tail_length(3000) + 1
    top = None
    for chunk in log_w.split(128, dim=-1):
        top = merge_top(top, chunk, size)
    np.testing.assert_allclose(khat_from_top(top).numpy(), pareto_khat(log_w).numpy())


def test_effective_sample_size():
    assert float(effective_sample_size(torch.zeros(50))) == pytest.approx(50)
    assert float(effective_sample_size(torch.tensor([0.0, -math.inf, -math.inf]))) == pytest.approx(1)


def test_estimators_diagnose_their_own_draws():
    torch.manual_seed(0)
    model = build_model(mlp_spec(2, hidden=16, depth=1, encoder=True))
    x = torch.rand(5, 784).round()
    sums = importance_sums(model, x, 200, 10, seed=3, batch_size=2, diagnose=True)
    diag = sums.diagnostics
    plain = importance_sums(model, x, 200, 10, seed=3, batch_size=5)
    torch.testing.assert_close(sums.log_px, plain.log_px)
    assert diag.khat.shape == (5,) and bool(((diag.ess >= 1) & (diag.ess <= 200)).all())

    S = 3000
    z = streams.normal(streams.stream(0, "prior_mc"), (S, 2))
    log_w = torch.full((S,), -math.log(S))
    mc = weighted_sums(model, x, z, log_w, batch_size=2, chunk_elements=784 * 100, diagnose=True)
    diag = mc.diagnostics
    torch.testing.assert_close(mc.log_px, weighted_sums(model, x, z, log_w, batch_size=5).log_px)
    with torch.no_grad():
        whole = model.log_px_given_shared_z(x, z).double()  # (5, S): every image's log-weights at once
    # the estimator's log-weights carry log(1/S), added in float32: the same weights to 1e-7 relative
    torch.testing.assert_close(diag.khat, pareto_khat(whole), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(diag.ess, effective_sample_size(whole), rtol=1e-4, atol=0)


def test_evaluation_reports_the_diagnostics_per_image_and_in_the_table():
    torch.manual_seed(0)
    spec = mlp_spec(2, hidden=16, depth=1, encoder=True)
    model = build_model(spec)
    x = torch.rand(12, 784).round()
    cfg_eval = OmegaConf.structured(
        EvalConfig(quadrature_points=1024, importance_k=64, iwae_k=16, prior_mc_samples=300, ais=False)
    )
    result, per_image = evaluate(model, spec, images_of(x), cfg_eval)
    for name, S in (("importance", 64), ("prior_mc", 300)):
        assert per_image[f"{name}.khat"].shape == (12,) and bool((per_image[f"{name}.ess"] <= S).all())
        psis = result["estimates"][name]["psis"]
        assert psis["flagged"] == int((per_image[f"{name}.khat"] > 0.7).sum())
        against = psis["vs_log_px"]  # the quadrature is log_px: the flag is checked against it
        assert against["low"] == int((per_image[name] - per_image["quadrature"] < -1).sum())
        assert f"k-hat > 0.7 on {100 * psis['flagged_share']:.1f}%" in format_table(result)
