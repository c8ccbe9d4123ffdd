"""One quadrature convention (densities.quadrature_grid: midpoints, log w = log p(z) + K log h): the
log p(x) that posterior.png prints and Run.posterior returns are eval_images.csv's quadrature values."""

from __future__ import annotations

import torch
from helpers import images_of, mlp_spec

from vae_cli.maths.grid_posterior import grid_posterior
from vae_cli.maths.models import build_model
from vae_cli.run.keys import EvalConfig
from vae_cli.stages.drawing import posterior_numbers
from vae_cli.stages.estimates import points_per_dim
from vae_cli.stages.evaluation import evaluate


def test_the_figure_and_the_posterior_grid_print_the_evaluations_log_px():
    torch.manual_seed(0)
    model = build_model(mlp_spec(2, hidden=16, depth=1)).eval()
    x = torch.bernoulli(torch.full((7, 784), 0.2), generator=torch.Generator().manual_seed(1))
    cfg_eval = EvalConfig(quadrature_points=1600, importance_k=8, prior_mc_samples=16, ais=False)
    _, per_image = evaluate(model, mlp_spec(2, hidden=16, depth=1), images_of(x), cfg_eval)
    evaluated = per_image["quadrature"]
    points, width = points_per_dim(cfg_eval.quadrature_points, 2), cfg_eval.quadrature_half_width
    picked = [1, 4, 6]
    printed = posterior_numbers(model, x[picked], points, width)
    torch.testing.assert_close(printed.log_px, evaluated[picked], rtol=0, atol=1e-4)
    torch.testing.assert_close(printed.jensen, per_image["quadrature.jensen"][picked], rtol=1e-6, atol=1e-4)
    posterior = grid_posterior(model, x[picked], n=points, limit=width)
    torch.testing.assert_close(torch.from_numpy(posterior.log_px).double(), evaluated[picked], rtol=0, atol=1e-3)


def test_a_grid_off_the_origin_sums_the_same_integral():
    """The prior is not renormalized to the box: a window around a sharp posterior gives the same log p(x)."""
    torch.manual_seed(0)
    model = build_model(mlp_spec(2, hidden=16, depth=1)).eval()
    x = torch.bernoulli(torch.full((1, 784), 0.2), generator=torch.Generator().manual_seed(1))
    whole = grid_posterior(model, x, n=400, limit=6.0)
    mean, sd = whole.moments(0)
    window = grid_posterior(model, x, n=200, limit=float(8 * sd.max()), center=(float(mean[0]), float(mean[1])))
    assert abs(float(window.log_px[0] - whole.log_px[0])) < 1e-3
