"""vae-check: the console script passes on the CPU and writes check.json, and each kind of line fails
when what it checks is broken on purpose (a perturbed formula, a tightened tolerance, a corrupted
resume), the checks called in-process at their --quick sizes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers import TINY, compose_config, run_cli

import vae_cli.run.checkpoint
import vae_cli.stages.checking
from vae_cli.commands.check import RESUME_RUN, main
from vae_cli.maths.estimators import WeightedSums
from vae_cli.maths.models import LatentVariableModel
from vae_cli.maths.objectives import OBJECTIVES, Loss
from vae_cli.stages import checking
from vae_cli.stages.checking import PRECISIONS, QUICK, Line, Report

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def small_work(one_thread):
    """One thread, as vae-check runs these checks on the CPU."""


@pytest.fixture(scope="module")
def case():
    return checking.known_truth(CPU, QUICK.truth_images)


def by_name(lines: list[Line]) -> dict[str, Line]:
    return {line.name: line for line in lines}


# --- the console script --------------------------------------------------------------------------------


@pytest.mark.slow
def test_vae_check_quick_passes_on_the_cpu_and_writes_check_json(tmp_path):
    result = run_cli(["vae-check", "--quick", "--device", "cpu", "--out", "out"], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "out" / "check.json").read_text())
    assert report["ok"] and report["failed"] == [] and report["quick"]
    kinds = {line["kind"] for line in report["lines"]}
    assert kinds == {"environment", "objective", "truth", "resume", "floor"}
    for line in report["lines"]:  # every line is on stdout, in the table
        assert line["name"] in result.stdout
        assert line["status"] in ("ok", "info", "skip")
    checks = [line for line in report["lines"] if line["status"] == "ok"]
    assert {f"objective {name} float32: loss" for name in OBJECTIVES} <= {line["name"] for line in checks}
    assert f"{len(checks)} of {len(checks)} checks hold" in result.stdout
    assert "Traceback" not in result.stderr


def test_a_failed_line_exits_1_naming_it(tmp_path, monkeypatch, capsys):
    failing = Line("objective jensen float32: loss", 0.1, "<= 0.001 nats", False, kind="objective")
    monkeypatch.setattr(
        vae_cli.stages.checking,
        "run_checks",
        lambda *args, **kwargs: Report("cpu", True, [failing, Line("truth x", 0.0, "<= 1", True)]),
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--out", str(tmp_path)])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == "vae-check: FAILED 1: objective jensen float32: loss"
    report = json.loads((tmp_path / "check.json").read_text())
    assert not report["ok"] and report["failed"] == ["objective jensen float32: loss"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "tpu"], "argument --device: invalid choice"),
        (["--device", "cuda"], "CUDA is not available here"),
        (["--quick", "--out", "/proc/no"], "/proc/no"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and err.startswith("vae-check")
    assert not (tmp_path / "check.json").exists()


# --- objectives against their float64 copies -------------------------------------------------------------


def perturbed(name: str, change):
    """OBJECTIVES[name] with its float32 loss changed by change(model, loss); float64 is left alone, so
    only the precision under test differs."""
    objective = OBJECTIVES[name]

    def fn(model, x, n_samples, **options):
        out = objective.fn(model, x, n_samples, **options)
        return Loss(change(model, out.loss) if x.dtype == torch.float32 else out.loss, out.terms)

    return dataclasses.replace(objective, fn=fn)


def test_objectives_hold_in_float32():
    lines = checking.objective_lines(CPU, PRECISIONS["float32"], QUICK, only=("jensen", "elbo"))
    assert len(lines) == 6  # jensen, jensen shared, elbo: loss and gradient
    assert all(line.ok for line in lines), [line for line in lines if not line.ok]


def test_an_objective_off_by_a_tenth_of_a_nat_fails_its_loss_line(monkeypatch):
    monkeypatch.setitem(OBJECTIVES, "jensen", perturbed("jensen", lambda model, loss: loss + 0.1))
    lines = by_name(checking.objective_lines(CPU, PRECISIONS["float32"], QUICK, only=("jensen",)))
    line = lines["objective jensen float32: loss"]
    assert not line.ok and line.measured == pytest.approx(0.1, abs=1e-3)
    assert lines["objective jensen float32: gradient"].ok  # a constant: the gradient is the same


def test_a_wrong_gradient_fails_its_gradient_line(monkeypatch):
    def tilt(model, loss):  # the same value, a gradient 0.01 larger in every decoder weight
        total = sum(p.sum() for p in model.decoder.parameters())
        return loss + 0.01 * (total - total.detach())

    monkeypatch.setitem(OBJECTIVES, "elbo", perturbed("elbo", tilt))
    lines = by_name(checking.objective_lines(CPU, PRECISIONS["float32"], QUICK, only=("elbo",)))
    assert lines["objective elbo float32: loss"].ok
    assert not lines["objective elbo float32: gradient"].ok


def test_a_tightened_tolerance_fails_what_float32_rounding_leaves(monkeypatch):
    monkeypatch.setitem(PRECISIONS, "float32", dataclasses.replace(PRECISIONS["float32"], loss_nats=0.0, gradient=0.0))
    lines = checking.objective_lines(CPU, PRECISIONS["float32"], QUICK, only=("iwae",))
    assert [line.ok for line in lines] == [False, False]
    assert all(line.measured > 0 for line in lines)


def test_bf16_autocast_holds_its_tolerance_but_not_float32s():
    """cpu.bf16's lines, here through torch's bf16 autocast whatever this CPU's instructions."""
    bf16 = dataclasses.replace(PRECISIONS["cpu.bf16"], allowed=lambda device: None)
    assert all(line.ok for line in checking.objective_lines(CPU, bf16, QUICK, only=("prior_iwae",)))
    strict = dataclasses.replace(bf16, loss_nats=PRECISIONS["float32"].loss_nats / 100, gradient=1e-4)
    assert not any(line.ok for line in checking.objective_lines(CPU, strict, QUICK, only=("prior_iwae",)))


def test_speed_options_the_device_lacks_are_skipped_lines():
    sizes = dataclasses.replace(QUICK, batch=2, n_samples=2)
    lines = by_name(checking.precision_lines(CPU, sizes))
    for name in ("cuda.tf32", "cuda.bf16", "compile"):
        assert lines[f"objective * {name}"].status == "skip"
    assert "--quick" in lines["objective * compile"].note


def test_a_speed_option_that_cannot_run_here_is_a_failed_line(monkeypatch):
    def no_compiler(self, **options):
        raise RuntimeError("InductorError: no C++ compiler found\nmore")

    monkeypatch.setattr(LatentVariableModel, "compile_likelihood", no_compiler)
    sizes = dataclasses.replace(QUICK, batch=2, n_samples=2, compile=True, compile_cpu_objectives=("jensen",))
    line = by_name(checking.precision_lines(CPU, sizes))["objective * compile"]
    assert line.ok is False and line.note == "raised RuntimeError: InductorError: no C++ compiler found"


# --- estimators against the closed form ------------------------------------------------------------------


def test_every_estimator_holds_against_the_closed_form(case):
    lines = checking.quadrature_lines(case) + checking.sampling_lines(case, QUICK)
    lines += checking.ais_lines(case, QUICK) + checking.bdmc_lines(case, QUICK)
    assert all(line.ok is not False for line in lines), [line for line in lines if line.ok is False]
    assert sum(line.ok is True for line in lines) >= 7


def test_a_shifted_quadrature_grid_fails_both_quadrature_lines(case, monkeypatch):
    grid = checking.quadrature_grid
    monkeypatch.setattr(checking, "quadrature_grid", lambda *a: (grid(*a)[0], grid(*a)[1] + 0.01))
    lines = checking.quadrature_lines(case)
    assert [line.ok for line in lines] == [False, False]


def test_prior_mc_a_tenth_of_a_nat_high_fails(case, monkeypatch):
    real = checking.weighted_sums

    def high(*args):
        sums = real(*args)
        return WeightedSums(sums.log_px + 0.1, sums.jensen)

    monkeypatch.setattr(checking, "weighted_sums", high)
    lines = by_name(checking.sampling_lines(case, QUICK))
    assert not lines["truth prior MC: log p(x)"].ok
    assert lines["truth importance: log p(x)"].ok


@pytest.mark.parametrize("field", ["log_px", "elbo"])
def test_importance_sampling_and_the_elbo_off_fail(case, monkeypatch, field):
    real = checking.importance_sums

    def shifted(*args):
        sums = real(*args)
        return dataclasses.replace(sums, **{field: getattr(sums, field) - 0.1})

    monkeypatch.setattr(checking, "importance_sums", shifted)
    lines = by_name(checking.sampling_lines(case, QUICK))
    name = {"log_px": "truth importance: log p(x)", "elbo": "truth importance: ELBO"}[field]
    assert not lines[name].ok
    assert lines["truth prior MC: log p(x)"].ok


def test_ais_two_tenths_low_fails(case, monkeypatch):
    real = checking.ais

    def low(*args):
        result = real(*args)
        return dataclasses.replace(result, log_w=result.log_w - 0.2)

    monkeypatch.setattr(checking, "ais", low)
    sizes = dataclasses.replace(QUICK, ais_images=4, ais_steps=20)
    line = checking.ais_lines(case, sizes)[0]
    assert line.name == "truth AIS: log p(x)" and not line.ok


def test_a_wide_bdmc_gap_and_a_truth_outside_the_bracket_fail(case, monkeypatch):
    sizes = dataclasses.replace(QUICK, bdmc_images=4, ais_steps=20)
    real = checking.bdmc

    def apart(*args):
        result = real(*args)
        return dataclasses.replace(result, upper=result.upper + 0.5)

    monkeypatch.setattr(checking, "bdmc", apart)
    [line] = checking.bdmc_lines(case, sizes)
    assert not line.ok and line.measured > checking.BDMC_GAP_NATS

    def above(*args):  # both bounds 0.5 nats above the truth: a small gap, but the lower one is not lower
        result = real(*args)
        return dataclasses.replace(result, lower=result.lower + 0.5, upper=result.upper + 0.5)

    monkeypatch.setattr(checking, "bdmc", above)
    [line] = checking.bdmc_lines(case, sizes)
    assert not line.ok and line.measured <= checking.BDMC_GAP_NATS and "outside" in line.note


# --- a checkpoint written and resumed --------------------------------------------------------------------


@pytest.fixture(scope="module")
def resume_cfg():
    return compose_config(RESUME_RUN, tiny=False)


def test_a_resume_is_bitwise_the_straight_run(resume_cfg, tmp_path):
    [line] = checking.resume_lines(resume_cfg, CPU, 4, tmp_path)
    assert line.ok and line.measured == 0.0 and "identical" in line.note


def test_a_resume_that_forgets_the_rng_state_fails(resume_cfg, tmp_path, monkeypatch):
    real = vae_cli.run.checkpoint.Checkpointer.restore

    def restore(self, state):
        step = real(self, state)
        torch.manual_seed(12345)  # the RNG state of the checkpoint, lost
        return step

    monkeypatch.setattr(vae_cli.run.checkpoint.Checkpointer, "restore", restore)
    [line] = checking.resume_lines(resume_cfg, CPU, 4, tmp_path)
    assert not line.ok and "DIFFERENT" in line.note


def test_a_corrupted_checkpoint_fails_the_resume_line(resume_cfg, tmp_path, monkeypatch):
    real = checking.load_checkpoint
    loads = iter(range(100))

    def load(path, *args):
        state = real(path, *args)
        if next(loads) == 0:  # the middle checkpoint the run resumes from: one parameter nudged
            name = next(iter(state["model"]))
            state["model"][name] = state["model"][name] + 1e-3
        return state

    monkeypatch.setattr(checking, "load_checkpoint", load)
    [line] = checking.resume_lines(resume_cfg, CPU, 4, tmp_path)
    assert not line.ok and line.measured > 0


# --- information: the environment and the floor ----------------------------------------------------------


def test_environment_and_floor_lines_are_information():
    env = checking.environment(CPU)
    assert env["vae-cli"] and env["torch"] == torch.__version__ and int(env["threads"]) >= 1 and env["BLAS"]
    cfg = compose_config([o for o in TINY if not o.startswith("device")])
    sizes = dataclasses.replace(QUICK, floor_batch=None, floor_steps=1, matmul_probes=1)
    lines = checking.floor_lines(cfg, CPU, sizes)
    assert [line.status for line in lines] == ["info"] * 3
    assert all(isinstance(line.measured, float) and line.measured > 0 for line in lines)
