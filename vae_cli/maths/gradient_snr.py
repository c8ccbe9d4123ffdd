"""The signal-to-noise ratio of a gradient estimator (Rainforth et al. 2018, eq. 3): for each parameter j,

    SNR_j = |E g_j| / sd(g_j)

over R replicate estimates g of the gradient of a loss on a fixed batch, each from fresh draws. For the
IWAE bound with S samples the decoder's SNR grows as sqrt(S) and the encoder's falls as 1/sqrt(S)
(their Theorem 1); DReG's encoder SNR does not fall (Tucker et al. 2019). Summaries: the median over
parameters with its quartiles, per side (encoder, decoder) and per layer, and the log-log slope of the
median against the sample count, by least squares with its standard error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

QUANTILE_MAX = 2**24  # values torch.quantile takes
Groups = dict[str, dict[str, list[torch.Tensor]]]  # side -> layer -> its parameters


def layers(named: Iterable[tuple[str, nn.Parameter]], prefix: str = "") -> dict[str, list[torch.Tensor]]:
    """Parameters by layer: a parameter's name less its last part ("net.0.weight" -> "net.0")."""
    found: dict[str, list[torch.Tensor]] = {}
    for name, p in named:
        if p.requires_grad:
            found.setdefault(prefix + (name.rpartition(".")[0] or name), []).append(p)
    return found


def parameter_groups(model: nn.Module) -> Groups:
    """The encoder's parameters (q(z|x)) and the others, the decoder's and the likelihood's (p(x|z)), by layer."""
    encoder = getattr(model, "encoder", None)
    mine = {id(p) for p in encoder.parameters()} if encoder is not None else set()
    groups: Groups = {}
    if encoder is not None:
        groups["encoder"] = layers(encoder.named_parameters(), "encoder.")
    groups["decoder"] = layers((n, p) for n, p in model.named_parameters() if id(p) not in mine)
    return {side: layer for side, layer in groups.items() if layer}


def spread(snr: torch.Tensor) -> dict[str, Any]:
    """The median of per-parameter SNRs with its quartiles; parameters whose gradient never varies are left out."""
    snr = snr[torch.isfinite(snr)].double()
    if len(snr) == 0:
        return {"median": None, "q1": None, "q3": None, "n_parameters": 0}
    snr = snr[:: len(snr) // QUANTILE_MAX + 1]  # torch.quantile's limit: every k-th value beyond it
    q1, median, q3 = torch.quantile(snr, snr.new_tensor([0.25, 0.5, 0.75])).tolist()
    return {"median": median, "q1": q1, "q3": q3, "n_parameters": len(snr)}


def snr(total: torch.Tensor, square: torch.Tensor, replicates: int, debiased: bool = False) -> torch.Tensor:
    """|mean| / sd per parameter (flattened, on the CPU) from the sum and the sum of squares of `replicates`
    estimates; a parameter whose gradient never varies gives nan (0/0) and is left out of the summaries.

    The estimated |mean| is at least about sd / sqrt(R) however small the true one (the noise floor);
    debiased: sqrt(max(mean^2 - var / R, 0)) instead, mean^2's unbiased estimate (the toy's test)."""
    mean = total.double() / replicates
    variance = (square.double() - replicates * mean.square()).clamp_min(0) / max(replicates - 1, 1)
    signal = (mean.square() - variance / replicates).clamp_min(0).sqrt() if debiased else mean.abs()
    return (signal / variance.sqrt()).flatten().cpu()


def summarize(per_layer: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Each side's SNR spread over its parameters, and each of its layers'. per_layer: side -> layer -> SNRs."""
    return {
        side: {
            **spread(torch.cat(list(side_layers.values()))),
            "layers": {name: spread(values) for name, values in side_layers.items()},
        }
        for side, side_layers in per_layer.items()
    }


def snr_of_replicates(gradients: dict[str, dict[str, torch.Tensor]], debiased: bool = False) -> dict[str, Any]:
    """The summaries of replicate gradients given as side -> layer -> (R, parameters) tensors."""
    return summarize(
        {
            side: {name: snr(g.sum(0), g.double().square().sum(0), len(g), debiased) for name, g in side_layers.items()}
            for side, side_layers in gradients.items()
        }
    )


def gradient_snr(loss: Callable[[], torch.Tensor], groups: Groups, replicates: int) -> dict[str, Any]:
    """SNR of the gradient of loss() over `replicates` calls (each with fresh draws): per side, its median
    and quartiles over the side's parameters and the same per layer. Moments are running sums in
    float64, so memory is two copies of the parameters whatever the number of replicates."""
    params = [p for side in groups.values() for layer in side.values() for p in layer]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    square = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for _ in range(replicates):
        grads = torch.autograd.grad(loss(), params, allow_unused=True)
        for t, s, g in zip(total, square, grads):
            if g is not None:
                t.add_(g.double())
                s.add_(g.double().square())
    by_id = {id(p): snr(t, s, replicates) for p, t, s in zip(params, total, square)}
    return summarize(
        {
            side: {name: torch.cat([by_id[id(p)] for p in ps]) for name, ps in side_layers.items()}
            for side, side_layers in groups.items()
        }
    )


def loglog_slope(counts: list[int], values: list[float | None]) -> dict[str, Any]:
    """The least-squares slope of log(value) on log(count) and its standard error (None from fewer than
    three points: no residual to measure it by); values that are None or not positive are left out."""
    points = [(math.log(n), math.log(v)) for n, v in zip(counts, values) if v is not None and v > 0]
    if len(points) < 2:
        return {"slope": None, "stderr": None, "n_points": len(points)}
    x, y = torch.tensor(points, dtype=torch.float64).T
    dx = x - x.mean()
    sxx = float(dx.square().sum())
    slope = float((dx * (y - y.mean())).sum()) / sxx
    residuals = y - y.mean() - slope * dx
    stderr = math.sqrt(float(residuals.square().sum()) / (len(points) - 2) / sxx) if len(points) > 2 else None
    return {"slope": slope, "stderr": stderr, "n_points": len(points)}


def snr_by_sample_count(
    model: nn.Module,
    objective: Callable[..., Any],
    x: torch.Tensor,
    counts: list[int],
    replicates: int,
    options: dict[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """For each sample count, the SNR of objective(model, x, count, **options).loss's gradient over
    `replicates` estimates on the fixed batch x, then each side's log-log slope of the median SNR
    against the count. The draws come from `seed`; the caller's random state is left as it was."""
    groups = parameter_groups(model)
    by_count = {}
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        for n in counts:
            torch.manual_seed(seed + n)
            by_count[n] = gradient_snr(lambda n=n: objective(model, x, n, **(options or {})).loss, groups, replicates)
    slopes = {side: loglog_slope(counts, [by_count[n][side]["median"] for n in counts]) for side in groups}
    return {"counts": list(counts), "by_count": by_count, "slope": slopes}
