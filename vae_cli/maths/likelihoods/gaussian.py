"""Gaussian pixels: p(x|z) = N(x; f(z), sigma^2 I), for grey levels. sigma is fixed, or learned, one for
every pixel or one per pixel, never below sigma_min. With a linear decoder it is probabilistic PCA (or
factor analysis, per pixel), whose log p(x) is a closed form. Its implementation, with sigma as a
parameter of the model, is kernels.Gaussian."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vae_cli.maths import likelihoods
from vae_cli.maths.options import POSITIVE, key


@dataclass
class GaussianConfig:
    """p(x|z) = N(x; f(z), sigma^2 I), for grey-level images (data.binarization=none)."""

    sigma: float | None = key(None, "a fixed sigma; null = learned", POSITIVE)
    per_pixel: bool = key(False, "a learned sigma for each pixel instead of one shared (needs sigma=null)")
    sigma_min: float = key(1e-3, "the smallest sigma a learned one reaches (8-bit data's bin sd is 1.1e-3)", POSITIVE)
    allow_binary_data: bool = key(False, "allow binarized images (log p(x) is unbounded there as sigma shrinks)")


def _one_fixed_sigma(node: Any, binarization: str) -> str | None:
    if node.per_pixel and node.sigma is not None:
        return (
            f"invalid value likelihood.per_pixel=true with likelihood.sigma={node.sigma}: a fixed sigma "
            "is one value; allowed per_pixel=false, or sigma=null to learn one per pixel"
        )
    return None


def _describe(node: Any) -> str:
    if node.sigma is not None:
        return f"gaussian (sigma {node.sigma:g})"
    return "gaussian (learned sigma" + (" per pixel)" if node.per_pixel else ")")


UNIT = likelihoods.LikelihoodUnit(
    name="gaussian",
    help="N(f(z), sigma^2 I), for grey-level images (data.binarization=none)",
    config=GaussianConfig,
    pixels=likelihoods.GREY,
    implementation="vae_cli.maths.likelihoods.kernels:Gaussian",
    closed_form=True,
    rules=(_one_fixed_sigma,),
    waives_pixels=lambda node: node.allow_binary_data,
    waiver="likelihood.allow_binary_data=true to ask for it (a density of binary images grows without bound as sigma shrinks)",
    describe=_describe,
)
