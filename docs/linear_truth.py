"""Every estimator scored against the truth: linear-Gaussian models of grey-level MNIST, whose log p(x)
is closed-form at every K (docs: "Known truth at every K").

For each K, train `objective=elbo model=linear likelihood=gaussian data.binarization=none K=K` (and,
with --jensen, the same model on the Jensen bound), then score AIS, importance sampling with q and
prior Monte Carlo at their default settings against the closed form, image by image, and the
trained ELBO model against the maximum-likelihood pPCA at the same K (Lucas et al. 2019: the ELBO's
optimum for a linear VAE is that solution). Resumable: a K already in OUT/results.json is skipped.

    .venv/bin/python docs/linear_truth.py OUT [--K 2 10 50 100] [--images 1000] [--ais-images 200]
        [--steps 1000] [--jensen] [--extra lr=0.01 n_samples=16 ...]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import vae_cli
from vae_cli.maths.linear_gaussian import LinearGaussian
from vae_cli.run.config import data_config, typed_config
from vae_cli.run.data import load_images_here

LINEAR = ["model=linear", "likelihood=gaussian", "data.binarization=none", "progress=false", "eval.enabled=false"]


def score(run, x: torch.Tensor, truth: torch.Tensor, estimator: str, **settings) -> dict:
    start = time.perf_counter()
    values = run.log_px(x, estimator, **settings)
    seconds = time.perf_counter() - start
    d = values - truth[: len(values)]
    worst = int(d.argmin())
    return {
        "estimator": estimator,
        "n_images": len(values),
        "minus_truth": float(d.mean()),
        "stderr": float(d.std() / math.sqrt(len(d))),
        "sd": float(d.std()),
        "q01": float(d.quantile(0.01)),
        "q99": float(d.quantile(0.99)),
        "over_1_nat_low": int((d < -1).sum()),
        "worst_image": worst,
        "worst": float(d[worst]),
        "seconds": seconds,
        "seconds_per_image": seconds / len(values),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--K", type=int, nargs="+", default=[2, 10, 50, 100])
    parser.add_argument(
        "--images", type=int, default=1000, help="test images for the closed form, importance, prior MC"
    )
    parser.add_argument("--ais-images", type=int, default=200, help="the first N of them for AIS")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--jensen", action="store_true", help="also the Jensen bound's linear model at each K")
    parser.add_argument("--extra", nargs="*", default=[], help="more vae-train overrides for every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for K in args.K:
        if str(K) in results:
            continue
        run_dir = args.out / f"elbo-K{K}"
        if not (run_dir / "summary.json").exists():
            start = time.perf_counter()
            vae_cli.train(["objective=elbo", f"K={K}", f"n_train_iters={args.steps}", *LINEAR, *args.extra], run_dir)
            print(f"K={K}: trained in {time.perf_counter() - start:.0f} s", flush=True)
        run = vae_cli.load_run(run_dir)
        cfg = typed_config(run.config, run.path)
        images = load_images_here(data_config(cfg), cfg.seed, torch.device("cpu"))
        x = images.test[: args.images]
        truth = run.log_px(x, "closed_form")
        mean, cov = images.train_moments()
        ppca = LinearGaussian.from_moments(mean, cov, K).log_px(x)
        entry = {
            "K": K,
            "log_px": float(truth.mean()),
            "log_px_stderr": float(truth.std() / math.sqrt(len(truth))),
            "sigma": float(run.model.likelihood.sigma()),
            "ppca_minus_elbo_model": float((ppca - truth).mean()),
            "ppca_minus_elbo_model_stderr": float((ppca - truth).std() / math.sqrt(len(truth))),
            "estimators": [
                score(run, x[: args.ais_images], truth, "ais"),
                score(run, x, truth, "importance"),
                score(run, x, truth, "prior_mc"),
            ],
        }
        if args.jensen:
            jensen_dir = args.out / f"jensen-K{K}"
            if not (jensen_dir / "summary.json").exists():
                vae_cli.train(
                    ["objective=jensen", f"K={K}", f"n_train_iters={args.steps}", *LINEAR, *args.extra], jensen_dir
                )
            jensen = vae_cli.load_run(jensen_dir)
            entry["jensen_model"] = {
                "log_px": float(jensen.log_px(x, "closed_form").mean()),
                "W_frobenius": float(jensen.model.decoder.net.weight.norm()),
                "elbo_model_W_frobenius": float(run.model.decoder.net.weight.norm()),
            }
        results[str(K)] = entry
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(entry, indent=2), flush=True)
    print(
        "| K | log p(x), closed form | estimator | images | minus truth (paired stderr) | sd, 1% / 99% | over 1 nat low | worst | s/image |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for K, entry in sorted(results.items(), key=lambda kv: int(kv[0])):
        for e in entry["estimators"]:
            print(
                f"| {K} | {entry['log_px']:.2f} | {e['estimator']} | {e['n_images']} | {e['minus_truth']:+.3f} ({e['stderr']:.3f}) "
                f"| {e['sd']:.3f}, {e['q01']:+.2f} / {e['q99']:+.2f} | {e['over_1_nat_low']} | #{e['worst_image']}, {e['worst']:+.2f} "
                f"| {e['seconds_per_image']:.3f} |"
            )


if __name__ == "__main__":
    main()
