"""The gradient signal-to-noise maths (vae_cli.maths.gradient_snr), and the law it measures reproduced on
the Gaussian toy of Rainforth et al. (2018, sec. 4): with the standard IWAE gradient the encoder's SNR falls
as S^-1/2 and the decoder's rises as S^+1/2; DReG's encoder SNR does not fall (Tucker et al. 2019)."""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from helpers import compose_config

from vae_cli.commands.evaluate import main as eval_main
from vae_cli.maths.formulas import LOG_2PI
from vae_cli.maths.gradient_snr import gradient_snr, loglog_slope, snr_of_replicates
from vae_cli.maths.models import LatentVariableModel
from vae_cli.maths.objectives import OBJECTIVES
from vae_cli.maths.objectives.iwae import GRADIENTS
from vae_cli.run.rundir import EVAL
from vae_cli.stages.figures import plot
from vae_cli.stages.pipeline import train

D = 20  # the toy's dimension, of x and of z


class GaussianToy:
    """Rainforth et al.'s toy, z ~ N(theta, I), x|z ~ N(z, I), q(z|x) = N(A x + b, 2/3 I), in the coordinates
    z - theta where the prior is standard (the objectives' p(z)): x|z ~ N(z + theta, I), q's mean A x + b - theta
    (b is then b - theta: a parameter the same). Every image has its own copy of theta and of q's mean (leaves),
    so one batch holds R replicates and the gradient with respect to them is each replicate's own."""

    reparameterize = staticmethod(LatentVariableModel.reparameterize)

    def __init__(self, q_mean: torch.Tensor, theta: torch.Tensor):
        self.q_mean, self.theta = q_mean, theta

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_mean, torch.full_like(self.q_mean, math.log(2 / 3))

    def log_px_given_z(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return -0.5 * ((x.unsqueeze(1) - z - self.theta.unsqueeze(1)).square() + LOG_2PI).sum(-1)


def toy_parameters(perturbation: float = 0.01, q_perturbation: float = 0.02) -> tuple[torch.Tensor, ...]:
    """1024 points from the model, theta at its maximum-likelihood value and q at the posterior's mean
    (A = I/2, b = -theta/2 in these coordinates), each perturbed by N(0, perturbation^2)."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(D, generator=g) + math.sqrt(2) * torch.randn(1024, D, generator=g)  # x ~ N(theta*, 2 I)
    theta = data.mean(0)
    perturbed = [
        t + p * torch.randn(t.shape, generator=g)
        for t, p in ((torch.eye(D) / 2, q_perturbation), (-theta / 2, q_perturbation), (theta, perturbation))
    ]
    return data, *perturbed


def replicate_gradients(
    gradient: str, n_samples: int, R: int, M: int, chunk: int = 500, **perturbations
) -> dict[str, Any]:
    """Side -> layer -> (R, parameters): R replicate gradients of minus the IWAE bound on the first M points."""
    data, A, b, theta = toy_parameters(**perturbations)
    x = data[:M]
    parts: dict[str, list[torch.Tensor]] = {"A": [], "b": [], "theta": []}
    for start in range(0, R, chunk):
        r = min(chunk, R - start)
        xs = x.repeat(r, 1)
        q_mean = (xs @ A.T + b).requires_grad_()
        theta_each = theta.expand(len(xs), D).clone().requires_grad_()
        loss = OBJECTIVES["iwae"](GaussianToy(q_mean, theta_each), xs, n_samples, gradient=gradient).loss
        d_mean, d_theta = (g.view(r, M, D) for g in torch.autograd.grad(loss * r, (q_mean, theta_each)))
        # each replicate's gradient: d/dA = sum_m dL/d(mean_m) x_m^T, d/db and d/dtheta the sums over its points
        parts["A"].append(torch.einsum("rmd,me->rde", d_mean, x).flatten(1))
        parts["b"].append(d_mean.sum(1))
        parts["theta"].append(d_theta.sum(1))
    g = {name: torch.cat(p) for name, p in parts.items()}
    return {"encoder": {"A": g["A"], "b": g["b"]}, "decoder": {"theta": g["theta"]}}


COUNTS = [1, 4, 16, 64]
R, M = 3000, 8  # replicates and points: the noise floor sd/sqrt(R) is well below the encoder's SNR at S = 64


def slopes(gradient: str) -> dict[str, dict[str, Any]]:
    """Each side's log-log slope of the median SNR against S. The SNR is debiased: the encoder's falls
    towards the noise floor of R replicates, where the plain |mean| / sd would flatten the slope."""
    torch.manual_seed(0)
    by_count = {n: snr_of_replicates(replicate_gradients(gradient, n, R, M), debiased=True) for n in COUNTS}
    medians = {side: [by_count[n][side]["median"] for n in COUNTS] for side in ("encoder", "decoder")}
    print(gradient, medians)
    return {side: loglog_slope(COUNTS, values) for side, values in medians.items()}


def test_the_snr_law_on_the_gaussian_toy():
    standard, dreg = slopes("standard"), slopes("dreg")
    print(standard, dreg)
    assert abs(standard["encoder"]["slope"] + 0.5) < 0.15  # Rainforth et al. 2018, Theorem 1: sqrt(M / S)
    assert abs(standard["decoder"]["slope"] - 0.5) < 0.15  # sqrt(M S)
    assert dreg["encoder"]["slope"] > 0  # Tucker et al. 2019: the encoder's SNR no longer falls
    assert (
        abs(dreg["decoder"]["slope"] - standard["decoder"]["slope"]) < 1e-4
    )  # the same draws: the same decoder gradient


def test_snr_is_mean_over_sd_per_parameter_and_summarized_per_side_and_layer():
    torch.manual_seed(0)
    a, b = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    scale = torch.tensor([0.5, 1.0, 2.0])

    def loss() -> torch.Tensor:  # d/da = 1 + scale * noise: SNR 1 / scale; d/db = 0: never varies, left out
        return (a * (1 + scale * torch.randn(3))).sum() + 0 * b.sum()

    result = gradient_snr(loss, {"encoder": {"a": [a]}, "decoder": {"b": [b]}}, replicates=8000)
    enc = result["encoder"]
    assert enc["n_parameters"] == 3 and abs(enc["median"] - 1.0) < 0.05
    assert abs(enc["q1"] - 0.75) < 0.05 and abs(enc["q3"] - 1.5) < 0.1  # quartiles of 2, 1, 0.5
    assert enc["layers"]["a"]["median"] == enc["median"] and result["decoder"]["n_parameters"] == 0


def test_loglog_slope_and_its_standard_error():
    exact = loglog_slope([1, 4, 16, 64], [3 * n**0.5 for n in [1, 4, 16, 64]])
    assert abs(exact["slope"] - 0.5) < 1e-12 and exact["stderr"] < 1e-12
    noisy = loglog_slope([1, 2, 4, 8], [1.0, 0.8, 0.45, 0.4])
    assert -0.5 < noisy["slope"] < -0.3 and 0 < noisy["stderr"] < 0.2
    assert loglog_slope([1, 4], [1.0, 2.0])["stderr"] is None and loglog_slope([1], [1.0])["slope"] is None


SNR_EVAL = [
    "eval.enabled=true",
    "eval.n_images=8",
    "eval.quadrature_points=256",
    "eval.importance_k=16",
    "eval.iwae_k=4",
    "eval.prior_mc_samples=64",
    "eval.ais=false",
    "eval.gradient_snr=true",
    "eval.gradient_snr_max_count=4",
    "eval.gradient_snr_replicates=4",
    "eval.gradient_snr_images=4",
]


def test_training_and_vae_eval_report_the_gradient_snr(tmp_path, capsys):
    run_dir = tmp_path / "iwae"
    train(compose_config(["objective=iwae", "objective.gradient=dreg", "n_train_iters=2", *SNR_EVAL]), run_dir=run_dir)
    entry = json.loads((run_dir / EVAL).read_text())["gradient_snr"]
    assert (
        entry["counts"] == [1, 4] and entry["trained_with"] == "dreg" and list(entry["estimators"]) == list(GRADIENTS)
    )
    for measured in entry["estimators"].values():
        assert set(measured["slope"]) == {"encoder", "decoder"}
        side = measured["by_count"]["4"]["encoder"]
        assert side["q1"] <= side["median"] <= side["q3"] and side["layers"]
    assert (run_dir / "gradient_snr.png").stat().st_size > 0
    eval_main([str(run_dir), "--gradient-snr", "--gradient-snr-replicates", "3"])
    out = capsys.readouterr().out
    assert "gradient SNR of iwae (3 estimates" in out and "dreg encoder" in out and "standard decoder" in out
    # vae-plot redraws it from eval.json, wherever its figures go
    plot([run_dir], out=tmp_path / "plotted")
    assert (tmp_path / "plotted" / "gradient_snr.png").stat().st_size > 0


def test_a_prior_objective_has_a_decoder_side_only(tmp_path):
    run_dir = tmp_path / "jensen"
    train(compose_config(["objective=jensen", "n_train_iters=2", *SNR_EVAL]), run_dir=run_dir)
    entry = json.loads((run_dir / EVAL).read_text())["gradient_snr"]
    assert list(entry["estimators"]) == ["standard"] and set(entry["estimators"]["standard"]["slope"]) == {"decoder"}
