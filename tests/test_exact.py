"""objective=exact: training on log p(x) itself by quadrature where K <= 2 (issue 14)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import compose_config
from torch.distributions import Bernoulli

from vae_cli.errors import ConfigError
from vae_cli.maths.likelihoods.kernels import Bernoulli as BernoulliPixels
from vae_cli.maths.models import Decoder, Encoder, LatentVariableModel
from vae_cli.maths.objectives import OBJECTIVES
from vae_cli.run.config import validate
from vae_cli.run.rundir import LOSSES, read_losses
from vae_cli.stages.pipeline import train


def model(K: int = 2, encoder: bool = False, scale: float = 1.0) -> LatentVariableModel:
    torch.manual_seed(0)
    m = LatentVariableModel(K, Decoder(K, 8, 2, "elu"), BernoulliPixels(), Encoder(K, 8, 2, "elu") if encoder else None)
    with torch.no_grad():
        m.decoder.net[0].weight.mul_(scale)  # how strongly x depends on z
    return m.double()


def batch(B: int = 5) -> torch.Tensor:
    return torch.bernoulli(torch.full((B, 784), 0.3), generator=torch.Generator().manual_seed(1)).double()


def grid_marginal(m: LatentVariableModel, x: torch.Tensor, n: int, width: float) -> torch.Tensor:
    """log p(x) on the same midpoint grid, written independently: a loop over grid points, torch.distributions;
    the prior's weights normalized over the whole lattice of that spacing (densities.quadrature_grid)."""
    h = 2 * width / n
    axis = [-width + h * (i + 0.5) for i in range(n)]
    terms = []
    for a in axis:
        for b in axis:
            z = torch.tensor([[a, b]], dtype=torch.float64)
            log_prior = -0.5 * (a * a + b * b) - math.log(2 * math.pi) + 2 * math.log(h)
            terms.append((log_prior, Bernoulli(logits=m.decoder(z)).log_prob(x).sum(-1)))
    lattice = [-width + h * (i + 0.5) for i in range(-200, n + 200)]  # the prior's mass beyond is below 1e-300
    log_norm = 2 * torch.logsumexp(
        torch.tensor([-0.5 * a * a - 0.5 * math.log(2 * math.pi) + math.log(h) for a in lattice], dtype=torch.float64),
        0,
    )
    return torch.logsumexp(torch.stack([lp - log_norm + ll for lp, ll in terms], -1), -1)


def test_gradient_is_autograds_gradient_of_the_grid_marginal():
    m, x = model(), batch()
    loss = OBJECTIVES["exact"](m, x, 1, grid_points=12, half_width=4.0).loss
    grads = torch.autograd.grad(loss, list(m.parameters()))
    want = -grid_marginal(m, x, 12, 4.0).mean()
    want_grads = torch.autograd.grad(want, list(m.parameters()))
    assert loss.item() == pytest.approx(want.item(), abs=1e-9)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-10)


def test_a_decoder_that_ignores_z_gives_the_factorized_bernoulli_likelihood():
    m, x = model(), batch()
    with torch.no_grad():
        for p in m.decoder.net[:-1].parameters():
            p.zero_()
        m.decoder.net[-1].weight.zero_()
    out = OBJECTIVES["exact"](m, x, 1, grid_points=96, half_width=6.0)
    factorized = Bernoulli(logits=m.decoder.net[-1].bias).log_prob(x).sum(-1).mean()
    # the box [-6, 6]^2 holds all but 4e-9 of the prior's lattice mass
    assert out.loss.item() == pytest.approx(-factorized.item(), abs=1e-8)
    assert out.terms["jensen"].item() == pytest.approx(-factorized.item(), rel=1e-8)
    assert out.terms["halving"].item() == pytest.approx(0.0, abs=1e-9)


@pytest.mark.slow
def test_at_the_same_parameters_log_px_is_above_every_bound():
    """Images drawn from the model at z away from the prior's bulk, by a decoder that depends strongly on z:
    a sharp posterior, which prior samples and an untrained q(z|x) miss; every bound lies below log p(x)."""
    m = model(encoder=True, scale=6.0)
    with torch.no_grad():
        z = torch.tensor([[1.5, -1.0], [-2.0, 0.5], [0.5, 2.0]], dtype=torch.float64)
        x = torch.bernoulli(torch.sigmoid(m.decoder(z)), generator=torch.Generator().manual_seed(2))
    out = OBJECTIVES["exact"](m, x, 1, grid_points=512, half_width=6.0)
    exact = -out.loss.item()
    assert out.terms["halving"].item() < 0.05  # the grid resolves the posterior
    assert -out.terms["jensen"].item() < exact - 1  # E_p(z) log p(x|z) on the same grid: Jensen, exactly
    torch.manual_seed(3)
    for name in ("jensen", "prior_iwae", "elbo", "iwae"):  # stochastic bounds: below log p(x) in expectation
        values = torch.tensor(
            [
                -OBJECTIVES[name](
                    m, x, 64, **({"shared_samples": False} if name != "elbo" and name != "iwae" else {})
                ).loss.item()
                for _ in range(100)
            ],
            dtype=torch.float64,
        )
        assert values.mean() < exact + 3 * values.std() / 10, (name, values.mean().item(), exact)


def test_k_above_2_and_bad_grids_are_refused():
    with pytest.raises(ConfigError, match=r"invalid value K=3: allowed K <= 2 with objective=exact"):
        validate(compose_config(["objective=exact", "K=3"]))
    with pytest.raises(ConfigError, match=r"objective.grid_points=2: allowed an integer >= 4"):
        validate(compose_config(["objective=exact", "objective.grid_points=2"]))
    with pytest.raises(ConfigError, match=r"objective.half_width=0.0"):
        validate(compose_config(["objective=exact", "objective.half_width=0.0"]))


@pytest.mark.slow
def test_exact_trains_and_logs_the_grids_error(tmp_path):
    cfg = compose_config(
        [
            "objective=exact",
            "objective.grid_points=16",
            "n_train_iters=6",
            "eval.enabled=true",
            "eval.quadrature_points=256",
            "eval.prior_mc_samples=64",
        ]
    )
    summary = train(cfg, run_dir=tmp_path)
    losses = read_losses(tmp_path / LOSSES)
    assert list(losses) == ["step", "loss", "jensen", "halving"]
    assert all(j >= loss for j, loss in zip(losses["jensen"], losses["loss"]))  # -E log p(x|z) >= -log p(x)
    assert summary["status"] == "completed" and summary["log_px_estimator"] == "quadrature"
