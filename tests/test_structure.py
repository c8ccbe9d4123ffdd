"""One source for every key, and start-up in proportion to the work: the README's key table is the
schema's, vae-eval's flags mirror the eval.* keys, the memory estimate counts what evaluation runs,
and the light paths (--help, a refusal, `import vae_cli`) import no torch. No timing is asserted:
the README states the measured seconds."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import compose_config, images_of, mlp_spec

from vae_cli.commands import evaluate as evaluate_command
from vae_cli.commands.readme import with_table
from vae_cli.maths.likelihoods import likelihood_spec
from vae_cli.maths.models import build_model
from vae_cli.maths.objectives import OBJECTIVES
from vae_cli.maths.spec import ModelSpec
from vae_cli.run import keys
from vae_cli.stages import estimates, evaluation, tracking

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "matplotlib", "tensorboard", "submitit")
LAUNCHERS = ("hydra_plugins",)  # Hydra's own plugin discovery finds them when the app runs; `import vae_cli` must not


def test_the_docs_key_table_is_the_schemas():
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert with_table(text) == text, "docs/configuration.md's key table is not the schema's: make keys-table"


def test_vae_eval_has_a_flag_for_every_eval_key_with_its_help():
    parser = evaluate_command.parser()
    flags = {a.dest: a for a in parser._actions}
    for k in evaluate_command.eval_keys():
        name = k.path.split(".")[1]
        assert name in flags and k.help in flags[name].help, k.path
    assert "enabled" not in flags


def test_the_registries_name_the_same_choices():
    """The schema's group options (torch-free, for the checks) and the maths' registries (the functions)."""
    assert set(keys.OBJECTIVES) == set(OBJECTIVES)
    assert tuple(tracking.TRACKERS) == keys.LOGGERS


SPECS = {
    "mlp K=2": mlp_spec(2),
    "mlp K=3 encoder": mlp_spec(3, encoder=True),
    "linear K=4 gaussian encoder": ModelSpec(
        4, "linear", likelihood_spec("gaussian", sigma_min=1e-3), encoder="linear"
    ),
}


@pytest.mark.parametrize("ais", [None, True, False])
@pytest.mark.parametrize("everywhere", [False, True])
@pytest.mark.parametrize("spec", list(SPECS))
def test_the_memory_estimate_counts_the_estimators_evaluation_runs(spec, ais, everywhere):
    spec = SPECS[spec]
    cfg = compose_config(["eval.quadrature_points=64", "eval.importance_k=4", "eval.iwae_k=2",
                          "eval.prior_mc_samples=8", "eval.ais_steps=3", "eval.ais_chains=2", "eval.bdmc_n_images=1",
                          f"eval.ais={'null' if ais is None else str(ais).lower()}"])  # fmt: skip
    planned = estimates.plan(spec, cfg.eval, torch.device("cpu"), 6, everywhere)
    counted = estimates.memory_parts(spec, cfg.eval, torch.device("cpu"), 6, everywhere)
    memory_of = {
        name: e.memory(spec, cfg.eval, p) for p in planned for name, e in estimates.ESTIMATORS.items() if name == p.name
    }
    assert counted == [part for p in planned for part in memory_of[p.name]]


def test_the_evaluation_runs_its_plan_in_order():
    """Once, on the spec whose plan has every kind of estimator: what is counted is what runs."""
    spec = SPECS["linear K=4 gaussian encoder"]
    cfg = compose_config(["eval.quadrature_points=64", "eval.importance_k=4", "eval.iwae_k=2", "eval.ais=true",
                          "eval.prior_mc_samples=8", "eval.ais_steps=3", "eval.ais_chains=2", "eval.bdmc_n_images=1"])  # fmt: skip
    torch.manual_seed(0)
    model = build_model(spec).eval()
    result, _ = evaluation.evaluate(model, spec, images_of(torch.rand(6, 784), "none"), cfg.eval, ais_everywhere=True)
    assert list(result["estimates"]) == [p.name for p in estimates.plan(spec, cfg.eval, torch.device("cpu"), 6, True)]


def modules_after(code: str, heavy: tuple[str, ...] = HEAVY) -> list[str]:
    """The heavy modules a fresh interpreter has imported after running `code`."""
    probe = f"import sys\n{code}\nprint(__import__('json').dumps(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _exits(call: str) -> str:
    return f"try:\n    {call}\nexcept SystemExit:\n    pass"


@pytest.mark.slow
@pytest.mark.parametrize(
    "what, code",
    [
        ("vae-train --help", "sys.argv = ['vae-train', '--help']\nfrom vae_cli.commands.train import main\n" + _exits("main()")),
        ("vae-train K=0", "sys.argv = ['vae-train', 'K=0']\nfrom vae_cli.commands.train import main\n" + _exits("main()")),
        ("vae-train n_sample=8", "sys.argv = ['vae-train', 'n_sample=8']\nfrom vae_cli.commands.train import main\n"
         + _exits("main()")),
        ("vae-train model.encoder_hidden=8", "sys.argv = ['vae-train', 'model.encoder_hidden=8']\n"
         "from vae_cli.commands.train import main\n" + _exits("main()")),
        ("vae-train --version", "sys.argv = ['vae-train', '--version']\nfrom vae_cli.commands.train import main\n"
         + _exits("main()")),
        ("vae-eval --version", "from vae_cli.commands.evaluate import main\n" + _exits("main(['--version'])")),
        ("vae-plot --version", "from vae_cli.commands.plot import main\n" + _exits("main(['--version'])")),
        ("vae-eval --help", "from vae_cli.commands.evaluate import main\n" + _exits("main(['--help'])")),
        ("vae-eval /nonexistent", "from vae_cli.commands.evaluate import main\n" + _exits("main(['/nonexistent'])")),
        ("vae-plot --help", "from vae_cli.commands.plot import main\n" + _exits("main(['--help'])")),
        ("vae-plot /nonexistent", "from vae_cli.commands.plot import main\n" + _exits("main(['/nonexistent'])")),
        ("vae-check --help", "from vae_cli.commands.check import main\n" + _exits("main(['--help'])")),
        ("vae-check --device tpu", "from vae_cli.commands.check import main\n" + _exits("main(['--device', 'tpu'])")),
    ],
)  # fmt: skip
def test_help_and_refusals_import_no_torch(what, code):
    assert modules_after(code) == [], what


@pytest.mark.slow
def test_import_vae_cli_loads_no_figures_launchers_or_tensorboard_until_used():
    assert modules_after("import vae_cli", HEAVY + LAUNCHERS) == []
    loaded = modules_after("import vae_cli\nvae_cli.load_run", HEAVY + LAUNCHERS)
    assert "torch" in loaded
    assert not [m for m in loaded if m.split(".")[0] in ("matplotlib", "tensorboard", "submitit", *LAUNCHERS)], loaded


def test_a_config_with_every_option_of_every_unit_pickles():
    """joblib and SLURM jobs pickle the config: each unit's option schema is importable by its name."""
    for group in ("objective", "likelihood"):
        for option in keys.GROUPS[group]:
            cfg = compose_config([f"{group}={option}"])  # composed, not validated: pickling is all that matters
            assert pickle.loads(pickle.dumps(cfg))[group] == cfg[group]
