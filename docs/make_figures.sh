#!/bin/sh
# Remake the README's figures and tables with vae-plot, from the five full default runs and
# (when SWEEP names its multirun directory) the small n_samples sweep:
#
#   vae-train objective=jensen     hydra.run.dir=runs/full-jensen       # K=2, 128 samples,
#   vae-train objective=prior_iwae hydra.run.dir=runs/full-prior_iwae   # batch 256, 1000 steps
#   vae-train objective=elbo       hydra.run.dir=runs/full-elbo
#   vae-train objective=iwae       hydra.run.dir=runs/full-iwae
#   vae-train objective=exact      hydra.run.dir=runs/full-exact
#   vae-train -m +sweep=n_samples n_samples=1,8,32 n_train_iters=100 hydra.sweep.dir=runs/sweep-n_samples
#   SWEEP=runs/sweep-n_samples sh docs/make_figures.sh runs
#
# and (when KSWEEP names run or multirun directories) the K sweep: README, "A K sweep"; and (when
# LINEAR names a directory holding the runs jensen-K2 and elbo-K2, each `model=linear
# likelihood=gaussian data.binarization=none K=2 n_train_iters=4000 lr=0.01 n_samples=16`) the
# figures of README, "Known truth at every K".
# Each part is skipped when its directories are not given (the full runs: runs/full-jensen absent).
#
# vae-plot draws every figure into a scratch directory; the few the README shows are copied
# into docs/full, docs/sweep and docs/ksweep (small palette PNGs).
set -eu
runs=${1:-runs}
docs=$(cd "$(dirname "$0")" && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

if [ -d "$runs/full-jensen" ]; then
  vae-plot "$runs/full-jensen" "$runs/full-prior_iwae" "$runs/full-elbo" "$runs/full-iwae" "$runs/full-exact" \
    --out "$scratch/full"
  mkdir -p "$docs/full"
  for objective in jensen prior_iwae elbo iwae exact; do
    for figure in samples means posterior; do
      cp "$scratch/full/full-$objective/$figure.png" "$docs/full/$objective-$figure.png"
    done
  done
  cp "$scratch/full/full-elbo/encoded.png" "$docs/full/elbo-encoded.png"
  cp "$scratch/full/loss_curves.png" "$scratch/full/comparison.md" "$scratch/full/comparison.csv" "$docs/full/"
fi

if [ -n "${SWEEP:-}" ]; then
  vae-plot "$SWEEP" --out "$scratch/sweep"
  mkdir -p "$docs/sweep"
  cp "$scratch/sweep/vs_n_samples.png" "$scratch/sweep/comparison.md" "$scratch/sweep/comparison.csv" "$docs/sweep/"
fi
if [ -n "${KSWEEP:-}" ]; then
  # shellcheck disable=SC2086 # KSWEEP is a list of directories
  vae-plot $KSWEEP --out "$scratch/ksweep"
  mkdir -p "$docs/ksweep"
  cp "$scratch/ksweep/vs_K.png" "$scratch/ksweep/comparison.md" "$scratch/ksweep/comparison.csv" "$docs/ksweep/"
fi
if [ -n "${LINEAR:-}" ]; then
  vae-plot "$LINEAR/jensen-K2" "$LINEAR/elbo-K2" --out "$scratch/linear"
  mkdir -p "$docs/linear"
  for figure in means posterior; do
    cp "$scratch/linear/jensen-K2/$figure.png" "$docs/linear/jensen-$figure.png"
  done
  for figure in means samples posterior; do
    cp "$scratch/linear/elbo-K2/$figure.png" "$docs/linear/elbo-$figure.png"
  done
fi
du -ch "$docs"/full/* "$docs"/linear/* "$docs"/sweep/* "$docs"/ksweep/* 2>/dev/null | tail -1
