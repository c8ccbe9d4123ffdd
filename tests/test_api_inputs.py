"""The Python API as careful as the commands: every input is checked (shape, dtype, device, the
likelihood's support, sizes) with a one-line InputError naming what was given and what is expected,
and every output is a tensor without gradients; run.model.module's outputs carry them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TINY

import vae_cli
from vae_cli.errors import InputError, UserError


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A Bernoulli MLP with an encoder (elbo) and a Gaussian linear decoder on grey levels."""
    root = tmp_path_factory.mktemp("api_inputs")
    vae_cli.train([*TINY, "objective=elbo"], root / "bernoulli")
    gaussian = [o for o in TINY if not o.startswith("model.")]
    vae_cli.train(
        [*gaussian, "objective=jensen", "model=linear", "likelihood=gaussian", "data.binarization=none"],
        root / "gaussian",
    )
    return {name: vae_cli.load_run(root / name) for name in ("bernoulli", "gaussian")}


def refused(match: str, call, *args, **kwargs) -> str:
    with pytest.raises(InputError, match=match) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    return message


def test_outputs_carry_no_gradients_and_plot_as_numpy(runs):
    run = runs["bernoulli"]
    z = run.model.prior_sample(3, seed=0)
    x = vae_cli.test_images(run.config, n=3)
    outputs = [z, run.model.decode(z), *run.model.encode(x), run.model.sample(3, seed=0), run.log_px(x)]
    for out in outputs:
        assert not out.requires_grad
        out.numpy()  # what plt.imshow calls
    assert run.model.decode(z)[0].reshape(28, 28).numpy().shape == (28, 28)
    posterior = run.posterior(x, points=9)
    assert posterior.log_posterior.shape == (3, 9, 9)


def test_the_module_gives_gradients_to_a_user_who_differentiates(runs):
    run = runs["bernoulli"]
    z = run.model.prior_sample(2, seed=0).requires_grad_()
    out = run.model.module.decode(z)
    assert out.requires_grad
    out.sum().backward()
    assert z.grad is not None and z.grad.shape == (2, 2)
    assert run.model.K == 2 and not run.model.training  # the module's own attributes, through the Model


def test_shapes_are_named_with_what_is_expected(runs):
    run = runs["bernoulli"]
    message = refused(r"log_px: x has shape \(3, 10\), expected \(N, 784\)", run.log_px, torch.zeros(3, 10))
    assert "mat1" not in message
    refused(
        r"x has shape \(2, 28, 28\), expected \(N, 784\).*reshape\(-1, 784\)", run.model.encode, torch.zeros(2, 28, 28)
    )
    refused(
        r"decode: z has shape \(4, 3\), expected \(N, 2\): latent points of K=2", run.model.decode, torch.zeros(4, 3)
    )
    refused(r"decode: z has shape \(2,\)", run.model.decode, torch.zeros(2))
    refused(r"posterior: x has shape \(784,\)", run.posterior, torch.zeros(784))


def test_sizes_are_ints_of_at_least_zero(runs):
    model = runs["bernoulli"].model
    refused(r"sample: n=-1, expected an int >= 0", model.sample, -1)
    refused(r"sample: n=2.5 \(float\), expected an int >= 0", model.sample, 2.5)
    refused(r"prior_sample: shape\[1\]=-2, expected an int >= 0", model.prior_sample, 3, -2)
    refused(r"sample: seed='a' \(str\)", model.sample, 2, seed="a")
    refused(r"test_images: n=-5", vae_cli.test_images, runs["bernoulli"].config, n=-5)
    refused(r"posterior: points=1, expected an int >= 2", runs["bernoulli"].posterior, torch.zeros(1, 784), points=1)
    assert model.sample(0).shape == (0, 784) and model.prior_sample(0).shape == (0, 2)
    assert runs["bernoulli"].log_px(torch.zeros(0, 784)).shape == (0,)  # no image, no estimate


def test_dtype_and_device_are_named(runs):
    run = runs["bernoulli"]
    refused(
        r"x has dtype torch.uint8, expected floating point \(float32\) \(bytes 0..255: divide by 255\)",
        run.log_px,
        torch.zeros(2, 784, dtype=torch.uint8),
    )
    refused(r"z has dtype torch.int64", run.model.decode, torch.zeros(2, 2, dtype=torch.long))
    refused(r"z holds NaN or infinite values", run.model.decode, torch.full((1, 2), float("nan")))
    refused(r"x is a str, expected a tensor", run.log_px, "images")
    refused(r"z is on meta, the model on cpu: give z.to\('cpu'\)", run.model.decode, torch.zeros(1, 2, device="meta"))
    refused(r"load_run: device='tpu', expected cpu, cuda or cuda:N", vae_cli.load_run, run.path, device="tpu")
    assert run.model.decode(np.zeros((1, 2))).shape == (1, 784)  # numpy and float64 are taken as float32


def test_the_likelihoods_support_is_checked(runs):
    bernoulli, gaussian = runs["bernoulli"], runs["gaussian"]
    x = vae_cli.test_images(bernoulli.config, n=2)
    refused(r"values other than 0 and 1 \(e.g. 0.5\), expected binary pixels", bernoulli.log_px, x * 0 + 0.5)
    grey = vae_cli.test_images(gaussian.config, n=2)
    assert gaussian.log_px(grey).shape == (2,)
    refused(
        r"values in \[\d+, \d+\], expected grey levels in \[0, 1\].*divide bytes by 255",
        gaussian.log_px,
        (grey * 255).floor(),
    )
    refused(r"encode: this run's model has no encoder", gaussian.model.encode, grey)
