"""evaluate(), eval.json, the end-of-training evaluation and vae-eval, on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import compose_config
from omegaconf import OmegaConf

from vae_cli.commands.evaluate import main as eval_main
from vae_cli.errors import ConfigError
from vae_cli.maths.estimators import importance_sums
from vae_cli.maths.models import build_model
from vae_cli.maths.objectives import OBJECTIVES
from vae_cli.run.config import data_config, model_spec, validate
from vae_cli.run.data import load_images
from vae_cli.run.keys import EvalConfig
from vae_cli.run.rundir import CHECKPOINT, EVAL, EVAL_IMAGES, LOSSES, SUMMARY
from vae_cli.stages.estimates import importance_sizes
from vae_cli.stages.evaluation import evaluate, format_table
from vae_cli.stages.pipeline import train

# Cheap settings (the defaults take seconds even for tiny models on the CPU).
CHEAP_EVAL = [
    "eval.enabled=true",
    "eval.quadrature_points=1024",
    "eval.importance_k=64",
    "eval.iwae_k=16",
    "eval.prior_mc_samples=256",
    "eval.ais_steps=50",
    "eval.ais_chains=4",
    "eval.bdmc_n_images=4",
]


def tiny_model(objective: str = "elbo", K: int = 2):
    cfg = compose_config([f"objective={objective}", f"K={K}", *CHEAP_EVAL])
    images = load_images(data_config(cfg), cfg.seed, torch.device("cpu"))
    torch.manual_seed(0)
    return cfg, build_model(model_spec(cfg), images.pixel_means), images


def run_eval(cfg, model, images, **eval_overrides):
    """evaluate() of the model of cfg on its test images with eval.* overridden: eval.json's dict."""
    return evaluate(model, model_spec(cfg), images, OmegaConf.merge(cfg.eval, eval_overrides))[0]


def numbers(result: dict) -> dict[str, float]:
    """Every estimate and bound of an eval.json dict, flattened."""
    out = {key: result[key] for key in ("log_px", "gap_jensen", "gap_elbo") if result[key] is not None}
    out.update({f"estimate {name}": e["value"] for name, e in result["estimates"].items()})
    out.update({f"bound {name}": b["value"] for name, b in result["bounds"].items()})
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny elbo run trained with the end-of-training evaluation on: (run_dir, train's return value)."""
    run_dir = tmp_path_factory.mktemp("run") / "elbo"
    summary = train(compose_config(["objective=elbo", *CHEAP_EVAL]), run_dir=run_dir)
    return run_dir, summary


def test_training_writes_eval_json_and_the_headline_numbers(run):
    run_dir, summary = run
    result = json.loads((run_dir / EVAL).read_text())
    assert result["estimator"] == "quadrature" and result["n_images"] == 64 and result["objective"] == "elbo"
    assert list(result["estimates"]) == ["quadrature", "importance", "prior_mc", "qstar"]
    for entry in result["estimates"].values():
        assert {"value", "stderr", "seconds", "settings"} <= set(entry)
    assert result["estimates"]["importance"]["settings"]["k"] == 64
    assert abs(result["estimates"]["quadrature"]["halving"]["change"]) < 0.01
    assert set(result["bounds"]) == {"jensen", "elbo", "iwae_k"} and result["bounds"]["iwae_k"]["k"] == 16
    assert result["log_px"] == result["estimates"]["quadrature"]["value"]
    # A gap is the mean of per-image differences, so it is the difference of the means.
    assert result["gap_jensen"] == pytest.approx(result["log_px"] - result["bounds"]["jensen"]["value"], abs=1e-6)
    assert result["gap_elbo"] == pytest.approx(result["log_px"] - result["bounds"]["elbo"]["value"], abs=1e-6)
    assert result["gap_jensen"] >= -1e-3 and result["gap_elbo"] > 0
    assert result["gap_jensen_stderr"] < result["log_px_stderr"]  # paired differences
    assert 0 <= result["active_units"] <= 2 and len(result["kl_per_dim"]) == 2
    on_disk = json.loads((run_dir / SUMMARY).read_text())
    for key in ("log_px", "log_px_stderr", "log_px_estimator", "gap_jensen", "gap_elbo", "eval_n_images"):
        assert on_disk[key] == summary[key]
    assert on_disk["log_px"] == result["log_px"] and on_disk["final_loss"] == summary["final_loss"]


@pytest.mark.slow
def test_vae_eval_reproduces_the_evaluation_from_the_run_files(run, capsys):
    run_dir, _ = run
    before = json.loads((run_dir / EVAL).read_text())
    eval_main([str(run_dir)])
    out = capsys.readouterr().out
    assert "quadrature *" in out and "gap_elbo" in out and "bound iwae_16" in out
    assert "ais " in out and "BDMC gap" in out  # vae-eval checks AIS against the quadrature where K <= 2
    after = json.loads((run_dir / EVAL).read_text())
    assert "ais" not in before["estimates"]  # vae-train's evaluation: the grid alone
    assert {k: v for k, v in numbers(after).items() if k != "estimate ais"} == pytest.approx(numbers(before), abs=1e-5)
    assert "bdmc_gap" in json.loads((run_dir / SUMMARY).read_text())
    eval_main([str(run_dir), "--no-ais"])
    assert "ais" not in json.loads((run_dir / EVAL).read_text())["estimates"]
    assert "bdmc_gap" not in json.loads((run_dir / SUMMARY).read_text())  # no headline left from the older evaluation
    eval_main([str(run_dir), "--n-images", "10", "--importance-k", "32"])
    smaller = json.loads((run_dir / EVAL).read_text())
    assert smaller["n_images"] == 10 and smaller["estimates"]["importance"]["settings"]["k"] == 32
    assert json.loads((run_dir / SUMMARY).read_text())["eval_n_images"] == 10


@pytest.mark.slow
def test_a_run_trained_further_drops_the_evaluation_of_its_older_parameters(tmp_path):
    run_dir = tmp_path / "run"
    train(compose_config(["n_train_iters=4", *CHEAP_EVAL]), run_dir)
    assert (run_dir / EVAL).exists() and (run_dir / EVAL_IMAGES).exists()
    resume = [f"resume={run_dir}", "n_train_iters=6", "eval.enabled=false"]
    summary = train(compose_config(resume), run_dir, changed=["n_train_iters", "eval.enabled"])
    assert not (run_dir / EVAL).exists() and not (run_dir / EVAL_IMAGES).exists()
    assert summary["steps"] == 6 and "log_px" not in summary
    assert "log_px" not in json.loads((run_dir / SUMMARY).read_text())


@pytest.mark.parametrize(
    "edit, edited",
    [
        ({"checkpoint": "by hand"}, ["quadrature", "importance", "prior_mc", "qstar"]),
        ({"estimates": {"quadrature": "by hand", "importance": {"settings": None}}}, ["quadrature", "importance"]),
        ({"estimates": {"prior_mc": {"value": "x", "stderr": 1, "seconds": 1, "settings": {}}}}, ["prior_mc"]),
    ],
)
@pytest.mark.slow
def test_a_hand_edited_eval_json_is_computed_again(tmp_path, edit, edited, capsys):
    run_dir = tmp_path / "run"
    train(compose_config(["objective=elbo", "n_train_iters=2", *CHEAP_EVAL]), run_dir)
    result = json.loads((run_dir / EVAL).read_text())
    (run_dir / EVAL).write_text(json.dumps({**result, **edit}))
    eval_main([str(run_dir), "--no-ais"])
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert all("(reused)" not in rows[name] for name in edited), rows
    again = json.loads((run_dir / EVAL).read_text())
    assert again["log_px"] == pytest.approx(result["log_px"], abs=1e-6)


@pytest.mark.slow
def test_results_do_not_depend_on_the_batch_size():
    cfg, model, images = tiny_model()
    results = [run_eval(cfg, model, images, batch_size=b) for b in (64, 7)]
    assert numbers(results[1]) == pytest.approx(numbers(results[0]), abs=1e-4)


def test_a_decoder_that_ignores_z_evaluates_to_the_exact_likelihood():
    cfg, model, images = tiny_model()
    x = images.test
    with torch.no_grad():
        model.decoder.net[0].weight.zero_()  # the hidden layers, and so the logits, no longer depend on z
        model.encoder.net[-1].weight.zero_()  # q(z|x) = N(0, I) = p(z)
        model.encoder.net[-1].bias.zero_()
        logits = model.decoder(torch.zeros(1, cfg.K))[0]
        per_image = x @ logits - torch.nn.functional.softplus(logits).sum()
    result = run_eval(cfg, model, images)
    for name, value in numbers(result).items():
        n = result["estimates"].get(name.removeprefix("estimate "), {}).get("n_images") or len(x)  # its subset
        exact = per_image[:n].mean().item()
        assert value == pytest.approx(0.0 if name.startswith("gap") else exact, abs=2e-3), name
    assert result["active_units"] == 0
    assert result["estimates"]["quadrature"]["halving"]["change"] == pytest.approx(0, abs=1e-4)


@pytest.mark.slow
def test_evaluation_uses_full_float32_matmuls_after_tf32_training(monkeypatch):
    import vae_cli.stages.estimates as evaluate_module

    cfg, model, images = tiny_model("jensen")
    weighted_sums, seen = evaluate_module.weighted_sums, []

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return weighted_sums(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "weighted_sums", spy)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # as training with cuda.tf32=true leaves it
    try:
        run_eval(cfg, model, images, n_images=4)
        assert seen and not any(seen) and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize(
    "objective, K, estimator",
    [("jensen", 2, "quadrature"), ("jensen", 3, "ais"), ("elbo", 3, "ais"), ("iwae", 1, "quadrature")],
)
@pytest.mark.slow
def test_log_px_names_the_best_available_estimator(objective, K, estimator):
    cfg, model, images = tiny_model(objective, K)
    result = run_eval(cfg, model, images, n_images=8)
    assert result["estimator"] == estimator and result["n_images"] == 8
    uses_encoder = OBJECTIVES[objective].uses_encoder
    assert ("importance" in result["estimates"]) == uses_encoder
    assert ("quadrature" in result["estimates"]) == (K <= 2)
    assert (result["gap_elbo"] is None) == (not uses_encoder)
    assert result["bounds"]["jensen"]["method"].startswith("quadrature" if K <= 2 else "mean over")


def test_bad_eval_settings_are_refused_with_one_line(run, capsys):
    for override, key in (
        ("eval.batch_size=0", "eval.batch_size"),
        ("eval.importance_k=-5", "eval.importance_k"),
        ("eval.quadrature_points=4", "eval.quadrature_points"),
    ):
        with pytest.raises(ConfigError, match=key):
            validate(compose_config([override]))
    with pytest.raises(SystemExit) as exit_info:
        eval_main([str(run[0]), "--n-images", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "eval.n_images" in err


def test_broken_run_directories_get_one_line_each(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    running = tmp_path / "running"
    running.mkdir()
    (running / LOSSES).write_text("step,loss\n1,200.0\n")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        eval_main([str(p) for p in (tmp_path / "missing", empty, running, corrupt)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4 and all(line.startswith("vae-eval: error: ") for line in lines)
    assert "does not exist" in lines[0]
    assert "is neither a vae-train run directory" in lines[1]
    assert "training has not finished" in lines[2]
    assert "checkpoint" in lines[3] and "Traceback" not in "".join(lines)


def test_vae_eval_is_an_installed_console_script():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "vae-eval"]
    assert script.value == "vae_cli.commands.evaluate:main" and script.load() is eval_main


@pytest.mark.mnist
def test_the_mean_image_model_scores_205_8_nats_on_mnist(mnist_root):
    """The decoder starts at the mean-image model; with its weights zeroed it stays there, and every
    estimator must give the factorized Bernoulli likelihood of the binarized test set."""
    cfg = compose_config(
        [
            "objective=jensen",
            "data=mnist",
            f"data.root={mnist_root}",
            "model.hidden=8",
            "model.depth=1",
            "eval.quadrature_points=64",
            "eval.prior_mc_samples=16",
        ]
    )
    images = load_images(data_config(cfg), cfg.seed, torch.device("cpu"))
    model = build_model(model_spec(cfg), images.pixel_means)
    with torch.no_grad():
        model.decoder.net[-1].weight.zero_()
    result = run_eval(cfg, model, images)
    assert result["n_images"] == 10_000
    assert result["log_px"] == pytest.approx(-205.8, abs=0.05)
    for name, value in numbers(result).items():
        entry = result["estimates"].get(name.removeprefix("estimate "), {})
        if entry.get("n_images", result["n_images"]) < result["n_images"]:  # a subset: compared on its images
            assert entry["minus_log_px"]["value"] == pytest.approx(0.0, abs=1e-3), name
            continue
        assert value == pytest.approx(0.0 if name.startswith("gap") else result["log_px"], abs=1e-3), name


@pytest.mark.slow
def test_importance_on_a_subset_is_the_full_estimate_of_those_images():
    """eval.importance_n_images=16: importance, ELBO and IWAE-k on the first 16 images (draws seeded per
    image, so the same numbers as on those images alone); the gaps are paired on them; quadrature keeps all."""
    cfg, model, images = tiny_model("elbo")
    x = images.test
    result = run_eval(cfg, model, images, importance_n_images=16)
    assert result["estimates"]["quadrature"]["n_images"] == result["n_images"] == len(x) == 64
    assert result["estimates"]["importance"]["n_images"] == result["bounds"]["elbo"]["n_images"] == 16
    assert result["gap_elbo_n_images"] == 16 and result["gap_jensen_n_images"] == 64
    alone = importance_sums(model, x[:16], cfg.eval.importance_k, cfg.eval.iwae_k, cfg.eval.seed, cfg.eval.batch_size)
    assert result["estimates"]["importance"]["value"] == pytest.approx(alone.log_px.mean().item(), abs=1e-9)
    assert result["bounds"]["elbo"]["value"] == pytest.approx(alone.elbo.mean().item(), abs=1e-9)
    assert "on the first 16 test images only" in format_table(result)


@pytest.mark.slow
def test_the_cpu_default_subset_and_vae_eval_full(run, capsys):
    run_dir, _ = run
    assert importance_sizes(EvalConfig(), torch.device("cpu"), 10_000) == (1000, 1000)
    assert importance_sizes(EvalConfig(), torch.device("cuda"), 10_000) == (5000, 10_000)
    assert importance_sizes(EvalConfig(importance_n_images=0), torch.device("cpu"), 10_000) == (1000, 10_000)
    eval_main([str(run_dir), "--device=cpu", "--n-images=8", "--importance-k=8", "--full"])
    result = json.loads((run_dir / EVAL).read_text())
    assert result["estimates"]["importance"]["n_images"] == result["n_images"] == 64  # --full: every image
