"""The fast paths compute what the plain formulas compute: the fused likelihood and its gradient,
the in-place activations, shared prior samples, and the speed options' config checks.
(No timings here: `make bench` measures them.)"""

from __future__ import annotations

import json
import platform
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Bernoulli

from vae_cli.errors import ConfigError
from vae_cli.maths.likelihoods.kernels import Bernoulli as BernoulliPixels
from vae_cli.maths.likelihoods.kernels import bernoulli_log_likelihood, bernoulli_log_likelihood_shared
from vae_cli.maths.models import Decoder, LatentVariableModel, build_model
from vae_cli.maths.objectives import OBJECTIVES
from vae_cli.run.config import model_spec, validate
from vae_cli.run.machine import check_machine, set_process_speed_settings
from vae_cli.stages.pipeline import train
from vae_cli.stages.training import micro_batch_size, train_step

OPTIONS = {"jensen": {"shared_samples": False}, "elbo": {}}


def plain_log_likelihood(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """sum_d x_d l_d - softplus(l_d) through autograd's own graph."""
    x = x.view(x.shape[0], *[1] * (logits.dim() - 2), x.shape[-1])
    return (x * logits - F.softplus(logits)).sum(-1)


def binary(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.bernoulli(torch.full(shape, 0.3, dtype=dtype), generator=torch.Generator().manual_seed(seed))


def normal(*shape: int, seed: int = 1, dtype=torch.float32, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(3, 784), (3, 5, 784), (2, 3, 4, 784), (3, 200, 784)])  # the last in 3 chunks
def test_fused_likelihood_values_match_torch_distributions(shape):
    x, logits = binary(shape[0], 784, dtype=torch.float64), normal(*shape, dtype=torch.float64)
    x_b = x.view(shape[0], *[1] * (len(shape) - 2), 784)
    expected = Bernoulli(logits=logits).log_prob(x_b.expand(shape)).sum(-1)
    torch.testing.assert_close(bernoulli_log_likelihood(x, logits), expected)


def test_fused_likelihood_is_finite_for_extreme_logits():
    x = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    logits = torch.tensor([[[-200.0, 200.0, 90.0, -90.0]]], requires_grad=True)
    value = bernoulli_log_likelihood(x, logits)
    value.sum().backward()
    torch.testing.assert_close(value, torch.tensor([[-180.0]]))
    torch.testing.assert_close(logits.grad, torch.tensor([[[0.0, 0.0, -1.0, 1.0]]]))


def test_fused_likelihood_gradcheck_float64():
    x = binary(2, 6, dtype=torch.float64).requires_grad_()
    logits = normal(2, 3, 6, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(bernoulli_log_likelihood, (x, logits))


@pytest.mark.parametrize("S", [16, 200])  # one chunk, several chunks
@pytest.mark.parametrize("overwrite", [False, True])
def test_fused_likelihood_gradient_matches_autograd_of_the_formula(S, overwrite):
    x, logits = binary(4, 784), normal(4, S, 784)
    upstream = torch.randn(4, S, generator=torch.Generator().manual_seed(2))
    grads, values = [], []
    for fn in (lambda x, lg: bernoulli_log_likelihood(x, lg * 1.0, overwrite=overwrite), plain_log_likelihood):
        leaf = logits.clone().requires_grad_()
        value = fn(x, leaf)
        (value * upstream).sum().backward()
        grads.append(leaf.grad)
        values.append(value.detach())
    torch.testing.assert_close(values[0], values[1])
    torch.testing.assert_close(grads[0], grads[1])


def test_overwriting_likelihood_refuses_a_second_backward():
    logits = normal(2, 3, 784).requires_grad_()
    value = bernoulli_log_likelihood(binary(2, 784), logits * 1.0, overwrite=True).sum()
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        value.backward()


def test_fused_likelihood_leaves_its_inputs_alone():
    x, logits = binary(2, 784), normal(2, 3, 784).requires_grad_()
    x0, l0 = x.clone(), logits.detach().clone()
    bernoulli_log_likelihood(x, logits).sum().backward()
    assert torch.equal(x, x0) and torch.equal(logits.detach(), l0)


def test_shared_likelihood_is_the_likelihood_of_expanded_logits():
    x, logits = binary(5, 784, dtype=torch.float64), normal(7, 784, dtype=torch.float64)
    expected = plain_log_likelihood(x, logits.expand(5, 7, 784))
    torch.testing.assert_close(bernoulli_log_likelihood_shared(x, logits), expected)


@pytest.mark.parametrize("activation", ["elu", "relu", "tanh"])
def test_in_place_activations_give_the_out_of_place_values_and_gradients(activation):
    torch.manual_seed(0)
    decoder = Decoder(2, 32, 3, activation)
    plain = {"elu": nn.ELU, "relu": nn.ReLU, "tanh": nn.Tanh}[activation]  # out of place
    ref_copy = Decoder(2, 32, 3, activation)
    ref_copy.load_state_dict(decoder.state_dict())
    reference = nn.Sequential(*[plain() if not isinstance(m, nn.Linear) else m for m in ref_copy.net])
    z = torch.randn(6, 5, 2)
    out, out_ref = decoder(z), reference(z)
    torch.testing.assert_close(out, out_ref)
    out.pow(2).sum().backward()
    out_ref.pow(2).sum().backward()
    for p, q in zip(decoder.parameters(), ref_copy.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


# --- shared prior samples ------------------------------------------------------------------------


def tiny_prior_model() -> LatentVariableModel:
    torch.manual_seed(0)
    return LatentVariableModel(2, Decoder(2, 16, 2, "elu"), BernoulliPixels())


@pytest.mark.parametrize("name", ["jensen", "prior_iwae"])
def test_shared_samples_use_one_set_of_draws_for_the_batch(name, make_cfg):
    options = True  # objective.shared_samples
    model, x, S = tiny_prior_model(), binary(5, 784), 7
    torch.manual_seed(3)
    out = OBJECTIVES[name](model, x, S, shared_samples=options)
    torch.manual_seed(3)
    z = model.prior_sample(S)  # the same draws, decoded once and expanded to every image
    log_px_z = plain_log_likelihood(x, model.decoder(z).expand(5, S, 784))
    if name == "jensen":
        expected = -log_px_z.mean()
    else:
        expected = -(torch.logsumexp(log_px_z, 1) - torch.log(torch.tensor(float(S)))).mean()
    torch.testing.assert_close(out.loss, expected)


def test_shared_samples_decode_n_samples_latents_only(make_cfg):
    model, x, rows = tiny_prior_model(), binary(6, 784), []
    model.decoder.register_forward_hook(lambda m, inputs, out: rows.append(inputs[0].shape))
    OBJECTIVES["jensen"](model, x, 4, shared_samples=True)
    OBJECTIVES["jensen"](model, x, 4, shared_samples=False)
    assert rows == [torch.Size([4, 2]), torch.Size([6, 4, 2])]


def test_shared_samples_have_the_expectation_of_independent_samples(make_cfg):
    """Both estimate E_z log p(x|z): their means over many draws agree within their noise."""
    model, x, options = tiny_prior_model(), binary(4, 784), True  # objective.shared_samples
    torch.manual_seed(4)
    with torch.no_grad():
        shared = torch.stack([OBJECTIVES["jensen"](model, x, 8, shared_samples=options).loss for _ in range(200)])
        independent = torch.stack([OBJECTIVES["jensen"](model, x, 8, shared_samples=False).loss for _ in range(200)])
    se = (shared.var() / 200 + independent.var() / 200).sqrt()
    assert abs(shared.mean() - independent.mean()) < 5 * se


def test_train_step_with_shared_samples_uses_the_whole_batch(make_cfg):
    cfg = make_cfg(["objective=prior_iwae", "objective.shared_samples=true", "n_samples=64", "batch_size=200"])
    assert micro_batch_size(cfg, torch.device("cpu")) == cfg.batch_size
    model = build_model(model_spec(cfg))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    row = train_step(
        model, optimizer, OBJECTIVES["prior_iwae"], binary(200, 784), 64, cfg.batch_size, {"shared_samples": True}
    )
    assert set(row) == {"loss", "jensen"} and all(torch.isfinite(torch.tensor(v)) for v in row.values())


# --- config -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["objective.shared_samples=true", "micro_batch=4"], "micro_batch=4"),
        (["cuda.tf32=true"], "cuda.tf32"),
        (["cuda.bf16=true"], "cuda.bf16"),
        (["objective=elbo", "+objective.shared_samples=true"], "objective.shared_samples"),
    ],
)
def test_speed_options_refused_where_they_do_not_apply(make_cfg, overrides, message):
    """Each refused in one line: by its rule (validate) or by what this machine allows (check_machine)."""
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        cfg = make_cfg(overrides)
        validate(cfg)
        check_machine(cfg)


def test_encoder_objectives_have_no_shared_samples_key(make_cfg):
    with pytest.raises(Exception, match="shared_samples"):
        make_cfg(["objective=iwae", "objective.shared_samples=true"])


@pytest.mark.slow
def test_speed_options_default_off_and_are_recorded(make_cfg, tmp_path):
    cfg = make_cfg(["objective.shared_samples=true", "n_train_iters=2", "eval.enabled=false"])
    validate(cfg)
    assert (cfg.compile, cfg.cuda.tf32, cfg.cuda.bf16) == (False, False, False)
    assert make_cfg([]).objective.shared_samples is False
    summary = train(cfg, run_dir=tmp_path / "run")
    recorded = json.loads((tmp_path / "run" / "summary.json").read_text())["speed_options"]
    assert (
        recorded == summary["speed_options"] == {"shared_samples": True, "compile": False, "tf32": False, "bf16": False}
    )
    settings = json.loads((tmp_path / "run" / "summary.json").read_text())["process_settings"]
    assert settings == summary["process_settings"] and settings["flush_denormal"] is True


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_process_settings_keep_freed_heap_memory_on_the_cpu_only():
    assert set_process_speed_settings(torch.device("cpu")) == {"flush_denormal": True, "heap_kept": True}
    assert set_process_speed_settings(torch.device("cpu"), heap=False)["heap_kept"] is False
    assert set_process_speed_settings(torch.device("cuda"))["heap_kept"] is False  # sets nothing on the GPU


@pytest.mark.slow
def test_compiled_likelihood_matches_eager():
    """torch.compile of the decoder and likelihood (compile=true): same values and gradients."""
    model, x, z = tiny_prior_model(), binary(3, 784), torch.randn(3, 4, 2)
    eager = model.log_px_given_z(x, z)
    eager.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.compile_likelihood()
    compiled = model.log_px_given_z(x, z)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-3)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-4)


# --- bf16 autocast on the CPU (cpu.bf16) ------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True])
def test_under_bf16_autocast_the_likelihood_is_float32(shared):
    """The decoder's products may run in bf16; the likelihood upcasts its logits and leaves autocast."""
    x, logits = binary(3, 784), torch.randn(3, 5, 784).to(torch.bfloat16)
    if shared:
        logits = logits[0]
        plain = bernoulli_log_likelihood_shared(x, logits.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = bernoulli_log_likelihood_shared(x, logits)
    else:
        plain = bernoulli_log_likelihood(x, logits.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = bernoulli_log_likelihood(x, logits)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, plain)


@pytest.mark.parametrize("objective", ["jensen", "elbo"])
def test_a_bf16_step_is_the_float32_step_within_bf16_rounding(objective, make_cfg):
    cfg = make_cfg([f"objective={objective}"])
    x = binary(16, 784)
    losses, grads = [], []
    for autocast in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = build_model(model_spec(cfg))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        torch.manual_seed(1)
        losses.append(train_step(model, opt, OBJECTIVES[objective], x, 4, 16, OPTIONS[objective], autocast)["loss"])
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert losses[1] == pytest.approx(losses[0], rel=2e-3)  # bf16 keeps 8 bits of mantissa in the products
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


def test_cpu_bf16_is_refused_without_native_bf16(make_cfg, monkeypatch):
    monkeypatch.setattr("vae_cli.run.machine.cpu_has_bf16", lambda: False)
    with pytest.raises(ConfigError, match=r"cpu.bf16=true: this CPU has no native bf16 instructions"):
        check_machine(make_cfg(["cpu.bf16=true"]))
    monkeypatch.setattr("vae_cli.run.machine.cpu_has_bf16", lambda: True)
    check_machine(make_cfg(["cpu.bf16=true"]))


@pytest.mark.slow
def test_cpu_bf16_run_records_it(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr("vae_cli.run.machine.cpu_has_bf16", lambda: True)  # autocast runs (emulated) on any CPU
    summary = train(make_cfg(["cpu.bf16=true", "n_train_iters=3"]), run_dir=tmp_path / "run")
    assert summary["speed_options"]["bf16"] is True and summary["status"] == "completed"
