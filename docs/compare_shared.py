"""Shared against independent prior samples at equal wall time (docs: Speed, "Shared prior samples").

For jensen and prior_iwae at the default config, time a few steps of each, train each for about
SECONDS of its own steps through the real vae-train pipeline, then compare the final loss and the
test log p(x) (quadrature) from each run's own summary.json and eval.json:

    .venv/bin/python docs/compare_shared.py 120 [--device cpu] [--eval-images N] [--out compare_shared.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ beside vae_cli

from benchmarks.bench import compose_config, load_batches, make_variant  # noqa: E402
from vae_cli.run.files import read_json, write_json  # noqa: E402
from vae_cli.run.machine import describe_device, set_process_speed_settings, synchronize  # noqa: E402
from vae_cli.run.rundir import EVAL  # noqa: E402
from vae_cli.stages import pipeline  # noqa: E402


def compare_shared(args) -> dict[str, Any]:
    device = torch.device(args.device)
    set_process_speed_settings(device)
    base = compose_config(args, [f"device={device.type}"])
    batches, images, source = load_batches(base, 4, device)
    out: dict[str, Any] = {
        "seconds_per_run": args.seconds,
        "data": source,
        "device": describe_device(device),
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="vae-cli-compare-") as tmp:
        for objective in ("jensen", "prior_iwae"):
            for kind in ("vae-cli", "vae-cli shared"):
                v = make_variant(kind, objective, args, device, images.pixel_means)
                v.step(batches[0])  # warm-up
                start = time.perf_counter()
                for x in batches[1:]:
                    v.step(x)
                synchronize(device)
                steps = max(1, int(args.seconds / ((time.perf_counter() - start) / 3)))
                overrides = [
                    f"objective={objective}",
                    f"objective.shared_samples={str(v.shared).lower()}",
                    f"n_train_iters={steps}",
                    f"checkpoint_every={steps}",
                    f"device={device.type}",
                    "progress=false",
                ]
                if args.eval_images:
                    overrides.append(f"eval.n_images={args.eval_images}")
                run_dir = Path(tmp) / f"{objective}-{'shared' if v.shared else 'independent'}"
                summary = pipeline.train(compose_config(args, overrides), run_dir)
                ev = read_json(run_dir / EVAL)
                run = {
                    "objective": objective,
                    "samples": "shared" if v.shared else "independent",
                    "steps": steps,
                    "seconds": summary["train_seconds"],
                    "final_loss": summary["final_loss"],
                    "final_loss_stderr": summary["final_loss_stderr"],
                    "test_log_px": ev["log_px"],
                    "test_log_px_stderr": ev["log_px_stderr"],
                    "estimator": ev["estimator"],
                    "n_test_images": ev["n_images"],
                }
                out["runs"].append(run)
                print(
                    f"{objective:<11} {run['samples']:<12} {steps:6d} steps in {run['seconds']:6.1f} s: final loss "
                    f"{run['final_loss']:7.2f} +- {run['final_loss_stderr']:.2f}, test log p(x) "
                    f"{run['test_log_px']:8.2f} +- {run['test_log_px_stderr']:.2f} ({run['estimator']})",
                    flush=True,
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seconds", type=float, help="wall time each run trains for")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--eval-images", type=int, default=None, help="test images (default: all)")
    parser.add_argument("--out", type=Path, default=Path("compare_shared.json"))
    args = parser.parse_args()
    args.set, args.tf32, args.bf16, args.compile = [], False, False, False  # what make_variant reads of bench's options
    result = compare_shared(args)
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
