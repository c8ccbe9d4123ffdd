"""Bad input on the command line: every malformed override gets exit code 2 and one line
`vae-cli: error: ...`, never a traceback or a warning, and nothing is loaded or written.

The console script runs in-process (train_main with sys.argv set), so hypothesis can throw
many overrides at it cheaply; two subprocess runs check the same from the installed script.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TINY, Reached, run_cli, vae_train
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from vae_cli.maths.objectives import OBJECTIVES
from vae_cli.maths.spec import ACTIVATIONS
from vae_cli.run.keys import BINARIZATIONS, DATASETS, DEVICES


def assert_refused(args: list[str], *names: str) -> str:
    code, err, created = vae_train(args)
    assert code == 2, (args, code, err)
    assert err.count("\n") == 1 and err.startswith("vae-cli: error: "), (args, err)
    assert "Traceback" not in err
    assert created == [], (args, created)  # refused before Hydra made a run directory
    for name in names:
        assert name in err, (args, name, err)
    return err


# Each case of the issue: the key, the bad value and what is allowed appear in the one line.
CASES = [
    (["K=0"], "K", "0", ">= 1"),
    (["K=-3"], "K", "-3", ">= 1"),
    (["n_samples=0"], "n_samples", "0", ">= 1"),
    (["batch_size=0"], "batch_size", "0", ">= 1"),
    (["n_train_iters=0"], "n_train_iters", "0", ">= 1"),
    (["checkpoint_every=0"], "checkpoint_every", "0", ">= 1"),
    (["lr=0"], "lr", "0", "> 0"),
    (["lr=-1e-3"], "lr", "-0.001", "> 0"),
    (["lr=inf"], "lr", "inf", "finite"),
    (["lr=nan"], "lr", "nan", "> 0"),
    (["seed=-1"], "seed", "-1", "2^63"),
    (["objective=bogus"], "objective", "bogus", "elbo"),
    (["objective.name=bogus"], "objective.name", "bogus", "jensen"),
    (["data=bogus"], "data", "bogus", "synthetic"),
    (["data.name=bogus"], "data.name", "bogus", "fashion_mnist"),
    (["device=tpu"], "device", "tpu", "cpu"),
    (["data.binarization=sometimes"], "data.binarization", "sometimes", "dynamic"),
    (["model.activation=sigmoid"], "model.activation", "sigmoid", "elu"),
    (["model.encoder_hidden=8"], "model.encoder_hidden", "8", "elbo"),
    (["model.encoder_depth=2", "objective=prior_iwae"], "model.encoder_depth", "2", "iwae"),
    (["foo=1"], "foo", "1", "unknown key"),
    (["+foo=1"], "foo", "1", "unknown key"),
    (["++model.foo=1"], "model.foo", "1", "hidden"),
    (["n_sample=8"], "n_sample=8", "did you mean n_samples?", "unknown key"),
    (["model.hiden=128"], "model.hiden", "did you mean model.hidden", "depth"),
    (["objectiv=elbo"], "objectiv", "did you mean objective", "unknown key"),
    (["objective=elbos"], "elbos", "did you mean elbo?", "jensen"),
    (["+K=3"], "+K=3", "drop the +", ""),
    (["objective=elbo", "objective.shared_samples=true"], "objective.shared_samples", "jensen and prior_iwae", ""),
    # did-you-mean searches the chosen option's keys, and names the option a key of another one belongs to
    (
        ["objective=jensen", "objective.shared_sample=true"],
        "shared_sample",
        "did you mean objective.shared_samples?",
        "",
    ),
    (
        ["objective=exact", "objective.shared_sample=true"],
        "shared_sample",
        "objective.shared_samples is a key of objective=jensen and prior_iwae only, not of objective=exact",
        "the keys of objective=exact: grid_points, half_width",
    ),
    (["model=linear", "model.hiden=8"], "model.hiden", "model.hidden is a key of model=mlp only", "model=linear"),
    (["~K"], "K", "", "required"),
    (["K=abc"], "K", "abc", "Integer"),
    (["K="], "K", "", "Integer"),
    (["K=1.5"], "K", "1.5", "Integer"),
    (["K=${nope}"], "K", "nope", ""),
    (["data.root=${oc.env:VAE_CLI_NO_SUCH_VARIABLE}"], "data.root", "VAE_CLI_NO_SUCH_VARIABLE", ""),
    (["=3"], "=3", "", "key=value"),
    (["data=0"], "data=0", "", "synthetic"),
    (["~data=1"], "data=1", "", "mnist"),
    (["data=[1,2]"], "data=[1,2]", "", "mnist"),
    (["hydra/launcher=3"], "hydra/launcher=3", "", "config"),
    (["K=[1"], "[1", "", ""),
    (["a b"], "a b", "", ""),
    (["K=1,2"], "K=1,2", "", "multirun"),
    (["--bogus"], "--bogus", "", ""),
    (["--experimental-rerun=x.pickle"], "experimental-rerun", "", "resume="),
    (["resume="], "resume", "", "run directory"),
    (["resume=/nonexistent/run"], "/nonexistent/run", "", "no such directory"),
    (["-m", "K=1,0"], "K", "0", ">= 1"),
    (["-m", "resume=a,b"], "resume", "a", "one run at a time"),
]
if not torch.cuda.is_available():
    CASES.append((["device=cuda"], "device", "cuda", "CUDA is not available"))
    # every job of a multirun that runs here is checked against this machine before the first starts
    CASES.append((["-m", "K=2,3", "cuda.tf32=true"], "cuda.tf32", "CUDA-only", "false"))
# 10^8 prior samples a step: terabytes of activations, refused before the data is read, naming the keys
CASES.append(
    (["n_samples=100000000"], "too large for this machine", "n_samples=100000000", "smaller values of n_samples")
)
CASES.append((["-m", "n_samples=1,100000000"], "too large for this machine", "n_samples=100000000", "smaller values"))


@pytest.mark.parametrize("args, key, value, allowed", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_each_bad_value_is_one_line_naming_it(args, key, value, allowed):
    assert_refused(args, key, value, allowed)


# --- hypothesis ---------------------------------------------------------------------------------------

INT_KEYS = [
    "K",
    "n_samples",
    "batch_size",
    "n_train_iters",
    "checkpoint_every",
    "model.hidden",
    "model.depth",
    "data.n_train",
]
CHOICES = {
    "objective": tuple(OBJECTIVES),
    "data": tuple(DATASETS),
    "device": DEVICES if not torch.cuda.is_available() else DEVICES + ("cuda",),
    "data.binarization": BINARIZATIONS,
    "model.activation": tuple(ACTIVATIONS),
}
KNOWN = (
    set(INT_KEYS)
    | set(CHOICES)
    | {"lr", "seed", "micro_batch", "progress", "resume", "eval", "model", "data", "cuda", "compile"}
)
JUNK = st.text(alphabet="=[]{}()$,'\" ~+:@/\\%*?abK0123456789.-_", min_size=1, max_size=10)
not_an_int = st.one_of(
    st.integers(max_value=0).map(str),
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False)
    .filter(lambda f: not float(f).is_integer())
    .map(repr),
    st.sampled_from(["", "abc", "true", "null", "[]", "{}", "[1]", "1e400", "${K", "'5'x", "0x"]),
    JUNK,
)
bad_lr = st.one_of(
    st.floats(max_value=0.0, allow_subnormal=False).map(repr),
    st.sampled_from(["inf", "nan", "-inf", "0", "abc", "", "[]", "null"]),
    JUNK,
)
identifier = st.from_regex(r"[a-z][a-z_]{0,9}", fullmatch=True).filter(lambda k: k not in KNOWN)


@st.composite
def bad_override(draw) -> tuple[str, str]:
    """(override, the key the one line must name) for a value or key that is not allowed."""
    kind = draw(st.sampled_from(["int", "lr", "choice", "unknown"]))
    if kind == "int":
        key = draw(st.sampled_from(INT_KEYS))
        return f"{key}={draw(not_an_int)}", key
    if kind == "lr":
        return f"lr={draw(bad_lr)}", "lr"
    if kind == "choice":
        key = draw(st.sampled_from(sorted(CHOICES)))
        value = draw(
            st.one_of(st.from_regex(r"[a-z_]{1,10}", fullmatch=True), JUNK).filter(lambda v: v not in CHOICES[key])
        )
        return f"{key}={value}", key
    key = draw(st.sampled_from(["", "model.", "data.", "eval."])) + draw(identifier)
    return f"{draw(st.sampled_from(['', '+', '++']))}{key}={draw(st.integers(0, 9))}", key


# Overrides valid on their own: the synthetic sizes are keys of data=synthetic only.
GOOD = [o for o in TINY if not o.startswith(("data.n_train", "data.n_test"))]


def refused_or_accepted(args: list[str]) -> tuple[int | None, str, list[str]]:
    try:
        return vae_train(args)
    except Reached:  # the generated command line happens to be valid (e.g. K=5, data=synthetic)
        assume(False)
        raise


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(bad=bad_override(), good=st.lists(st.sampled_from(GOOD), max_size=3, unique=True))
@example(bad=("K=0", "K"), good=[])
@example(bad=("lr=-inf", "lr"), good=["data=synthetic"])
def test_hypothesis_bad_value_or_key_gets_one_line(bad, good):
    override, key = bad
    code, err, created = refused_or_accepted([*good, override])
    assert code == 2 and err.count("\n") == 1 and err.startswith("vae-cli: error: "), (override, code, err)
    assert "Traceback" not in err and created == [], (override, err, created)
    assert key.split(".")[-1] in err, (override, err)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(junk=st.lists(JUNK.filter(lambda s: not s.startswith("-")), min_size=1, max_size=3))
@example(junk=["=3"])
@example(junk=["K=[1"])
@example(junk=["K=${"])
@example(junk=["~"])
@example(junk=["+=1"])
@example(junk=["/=1"])
def test_hypothesis_malformed_syntax_gets_one_line(junk):
    code, err, created = refused_or_accepted(junk)
    assert code == 2 and err.count("\n") == 1 and err.startswith("vae-cli: error: "), (junk, code, err)
    assert "Traceback" not in err and created == [], (junk, err, created)


# --- the installed script --------------------------------------------------------------------------------


@pytest.mark.slow
def test_installed_script_prints_one_line_and_exits_2(tmp_path):
    result = run_cli(["vae-train", "model.encoder_hidden=4"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("vae-cli: error: "), result.stderr
    assert "model.encoder_hidden" in result.stderr and result.stdout == "" and list(tmp_path.iterdir()) == []
