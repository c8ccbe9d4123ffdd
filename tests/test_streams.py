"""One random-stream scheme (vae_cli.maths.streams): every evaluation draw comes from a stream keyed by
(eval.seed, purpose, image index) that no other key reaches; eval.seed changes every estimator's draws."""

from __future__ import annotations

import torch

from vae_cli.maths import ais as ais_module
from vae_cli.maths import streams
from vae_cli.maths.ais import AISSettings, ais, simulate
from vae_cli.maths.estimators import importance_noise
from vae_cli.maths.likelihoods import likelihood_spec
from vae_cli.maths.models import build_model
from vae_cli.maths.spec import ModelSpec

K, CPU = 3, torch.device("cpu")


def settings(seed: int) -> AISSettings:
    return AISSettings(steps=6, chains=2, leapfrog=2, step_size=None, seed=seed, gradient_dtype=torch.float32)


def linear_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelSpec(K, "linear", likelihood_spec("gaussian", sigma=0.3))).eval()


def test_a_seed_past_32_bits_still_changes_the_stream():
    """torch's CPU generator keeps a seed's low 32 bits; the streams keep every bit of seed and key."""
    a = streams.normal(streams.stream(5, "x"), (4,))
    assert not torch.equal(a, streams.normal(streams.stream(5 + 2**32, "x"), (4,)))
    assert torch.equal(a, streams.normal(streams.stream(5, "x"), (4,)))


def test_eval_seed_changes_every_estimators_draws():
    model = linear_model()
    assert not torch.equal(
        importance_noise(2, 3, K, 0, 0, CPU, torch.float32), importance_noise(2, 3, K, 1, 0, CPU, torch.float32)
    )
    for purpose in ("ais", "ais.pilot", "bdmc", "bdmc.reverse"):
        a = ais_module._noise(2, 0, settings(0), K, CPU, 2, purpose)
        b = ais_module._noise(2, 0, settings(1), K, CPU, 2, purpose)
        assert all(not torch.equal(u, v) for u, v in zip(a, b)), purpose
    assert not torch.equal(simulate(model, 3, 0)[1], simulate(model, 3, 1)[1])
    x, _ = simulate(model, 2, 0)
    assert not torch.equal(ais(model, x, settings(0), 2).log_w, ais(model, x, settings(1), 2).log_w)


def test_ais_starts_the_pilot_importance_and_simulated_latents_are_distinct_streams():
    """Image 0 under seed 0: the AIS chains' starts, the pilot's, importance's draws and BDMC's simulated
    latents share no draw (before, the pilot ran on the chains' own draws and simulated image 0 started
    a chain at its own latent)."""
    starts = ais_module._noise(1, 0, settings(0), K, CPU, 2, "ais")[0].reshape(-1)
    pilot = ais_module._noise(1, 0, settings(0), K, CPU, 2, "ais.pilot")[0].reshape(-1)
    bdmc = ais_module._noise(1, 0, settings(0), K, CPU, 2, "bdmc")[0].reshape(-1)
    importance = importance_noise(1, 2, K, 0, 0, CPU, torch.float32).reshape(-1)
    simulated = simulate(linear_model(), 1, 0)[1].reshape(-1)
    draws = [starts, pilot, bdmc, importance, simulated]
    for i, a in enumerate(draws):
        for b in draws[i + 1 :]:
            assert not torch.isin(a, b).any()


def test_an_images_ais_draws_do_not_depend_on_its_batch():
    model = linear_model()
    x, _ = simulate(model, 4, 2)
    whole = ais(model, x, settings(0), batch_size=4).log_w
    # the same draws: equal up to the round-off of a decoder pass over another batch shape
    torch.testing.assert_close(ais(model, x, settings(0), batch_size=3).log_w, whole, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(
        ais(model, x[2:], settings(0), batch_size=2, first=2).log_w, whole[2:], rtol=1e-6, atol=1e-4
    )
