#!/bin/sh
# Make every figure and table the documentation shows, from the current code (`make figures`):
#
#   sh docs/make_figures.sh [--size small|full] [RUNS]     # vae-train, vae-eval, vae-plot on PATH
#
# --size full (hours on a CPU) trains the runs each page describes into RUNS (default runs/):
#   demo/                    make demo's sweep: vae-train -m +experiment=demo        (Results, README)
#   full-<objective>         the five objectives at the defaults                    (Results)
#   sweep-n_samples/         vae-train -m +sweep=n_samples n_samples=1,8,32 n_train_iters=100
#   ksweep-prior/, ksweep-encoder/   the K sweep (K = 2, 4, 8, 16)                   (Results)
#   linear/{jensen,elbo}-K2  model=linear likelihood=gaussian data.binarization=none K=2,
#                            n_train_iters=4000 lr=0.01 n_samples=16             (Known truth)
# then draws them with vae-plot and copies what the pages show into docs/<set>/, with a made-by.md
# naming the command and the commit; docs/tensorboard/ comes from docs/tensorboard_screenshot.sh
# where chromium is installed. A finished run is kept and an unfinished one resumed, so the command
# can be run again after an interruption; a sweep directory that exists is kept (delete it to
# make it again).
# --size small (the default) runs the same commands at tiny sizes into RUNS and writes the figures
# into build/figures-small/<set>/ instead: a check that every step still runs (minutes), the docs'
# figures untouched. FIGURES_OUT=DIR sends either size's figures elsewhere.
set -eu
size=small
if [ "${1:-}" = "--size" ]; then size=$2; shift 2; fi
case $size in small|full) ;; *) echo "make_figures.sh: --size is small or full, not $size" >&2; exit 2 ;; esac
runs=${1:-runs}
docs=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$docs")
if [ "$size" = full ]; then out=${FIGURES_OUT:-$docs}; else out=${FIGURES_OUT:-$root/build/figures-small}; fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$runs" "$out"
commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ]; then commit="$commit with local changes"; fi

# The sizes: full is each page's own; small trains a few steps and evaluates a few images.
if [ "$size" = full ]; then
  tiny=""; shape=""; mlp=""; exact=""; n_samples=1,8,32; ks=2,4,8,16; kimages=32
  steps=""; sweep_steps=n_train_iters=100; lin_steps=n_train_iters=4000
else
  tiny="batch_size=32 checkpoint_every=10 progress=false eval.n_images=64 eval.importance_n_images=16
    eval.importance_k=16 eval.iwae_k=4 eval.quadrature_points=4096 eval.prior_mc_samples=256
    eval.ais_n_images=2 eval.ais_steps=10 eval.ais_chains=2 eval.bdmc_n_images=1"
  shape="model.hidden=32 model.depth=1"; mlp="$shape n_samples=8"; exact="objective.grid_points=16"
  n_samples=1,8; ks=2,4; kimages=8
  steps=n_train_iters=20; sweep_steps=$steps; lin_steps=$steps
fi

made_by() {  # made_by SET WHAT: the note each page shows under the set
  mkdir -p "$out/$1"
  echo "*Made by \`make figures FIGURES_SIZE=$size\` ($2) at commit $commit, $(date -u +%Y-%m-%d).*" >"$out/$1/made-by.md"
}

train() {  # train DIR OVERRIDES...: a finished run is kept, an unfinished one resumed
  dir=$1; shift
  if grep -qs '"status": "completed"' "$dir/summary.json"; then echo "make_figures.sh: kept $dir"
  elif [ -d "$dir" ]; then vae-train resume="$dir"
  else vae-train "$@" hydra.run.dir="$dir"; fi
}

sweep() {  # sweep DIR OVERRIDES...: a sweep directory that exists is kept
  dir=$1; shift
  if [ -d "$dir" ]; then echo "make_figures.sh: kept $dir"; else vae-train -m "$@" hydra.sweep.dir="$dir"; fi
}

# shellcheck disable=SC2086 # $tiny, $mlp, $exact are lists of overrides
{
  # make demo (Results, README)
  sweep "$runs/demo" +experiment=demo $steps $tiny $mlp
  vae-plot "$runs/demo" --out "$scratch/demo"
  mkdir -p "$out/demo"
  cp "$scratch/demo/0/means.png" "$out/demo/jensen-means.png"
  cp "$scratch/demo/1/means.png" "$out/demo/prior_iwae-means.png"
  cp "$scratch/demo/2/means.png" "$out/demo/elbo-means.png"
  cp "$scratch/demo/comparison.md" "$out/demo/"
  made_by demo "make demo's sweep"

  # the five objectives at the defaults (Results)
  for objective in jensen prior_iwae elbo iwae exact; do
    extra=$mlp; [ "$objective" = exact ] && extra="$mlp $exact"
    train "$runs/full-$objective" objective=$objective $steps $tiny $extra
  done
  vae-plot "$runs/full-jensen" "$runs/full-prior_iwae" "$runs/full-elbo" "$runs/full-iwae" "$runs/full-exact" \
    --out "$scratch/full"
  mkdir -p "$out/full"
  for objective in jensen prior_iwae elbo iwae exact; do
    for figure in samples means posterior; do
      cp "$scratch/full/full-$objective/$figure.png" "$out/full/$objective-$figure.png"
    done
  done
  cp "$scratch/full/full-elbo/encoded.png" "$out/full/elbo-encoded.png"
  cp "$scratch/full/loss_curves.png" "$scratch/full/comparison.md" "$scratch/full/comparison.csv" "$out/full/"
  made_by full "vae-train objective=... at the defaults, vae-plot of the five runs"

  # the sample count (Results)
  sweep "$runs/sweep-n_samples" +sweep=n_samples n_samples=$n_samples $sweep_steps $tiny $shape
  vae-plot "$runs/sweep-n_samples" --out "$scratch/sweep"
  mkdir -p "$out/sweep"
  cp "$scratch/sweep/vs_n_samples.png" "$scratch/sweep/comparison.md" "$scratch/sweep/comparison.csv" "$out/sweep/"
  made_by sweep "vae-train -m +sweep=n_samples n_samples=$n_samples $sweep_steps"

  # the K sweep (Results): K=2 evaluated again on the images AIS uses where K > 2, with AIS beside it
  sweep "$runs/ksweep-prior" objective=jensen,prior_iwae objective.shared_samples=true K=$ks $steps $tiny $shape
  sweep "$runs/ksweep-encoder" objective=elbo,iwae n_samples=8 K=$ks $steps $tiny $shape
  half=$(echo "$ks" | tr ',' '\n' | wc -l)
  vae-eval "$runs/ksweep-prior/0" "$runs/ksweep-prior/$half" "$runs/ksweep-encoder/0" "$runs/ksweep-encoder/$half" \
    --n-images $kimages
  vae-plot "$runs/ksweep-prior" "$runs/ksweep-encoder" --out "$scratch/ksweep"
  mkdir -p "$out/ksweep"
  cp "$scratch/ksweep/vs_K.png" "$scratch/ksweep/comparison.md" "$scratch/ksweep/comparison.csv" "$out/ksweep/"
  made_by ksweep "the K sweep: vae-train -m ... K=$ks, vae-eval of the K=2 runs on the first $kimages images"

  # known truth at every K: the linear-Gaussian model at K=2 on both objectives
  for objective in jensen elbo; do
    train "$runs/linear/$objective-K2" objective=$objective model=linear likelihood=gaussian \
      data.binarization=none K=2 $lin_steps lr=0.01 n_samples=16 $tiny
  done
  vae-plot "$runs/linear/jensen-K2" "$runs/linear/elbo-K2" --out "$scratch/linear"
  mkdir -p "$out/linear"
  for figure in means posterior; do cp "$scratch/linear/jensen-K2/$figure.png" "$out/linear/jensen-$figure.png"; done
  for figure in means samples posterior; do cp "$scratch/linear/elbo-K2/$figure.png" "$out/linear/elbo-$figure.png"; done
  made_by linear "the linear-Gaussian model at K=2, $lin_steps lr=0.01 n_samples=16"
}

if [ "$size" = full ]; then
  if command -v chromium >/dev/null; then
    sh "$docs/tensorboard_screenshot.sh"
    made_by tensorboard "docs/tensorboard_screenshot.sh"
  else
    echo "make_figures.sh: chromium is not installed: docs/tensorboard/ kept (apt-get install chromium)"
  fi
fi
echo "make_figures.sh: the figures are in $out (each set's made-by.md says how)"
