#!/bin/sh
# Remake docs/tensorboard/*.png: a small sweep with logger=tensorboard (jensen and the log-mean-exp,
# shared prior draws, 400 steps, K=2, about 30 s on 2 CPU cores), TensorBoard serving it, and
# Debian's headless Chromium photographing two of its pages:
#
#   apt-get install -y --no-install-recommends chromium    # Debian's package
#   . .venv/bin/activate && sh docs/tensorboard_screenshot.sh
#
# forceSVG=true draws the charts without WebGL, which a headless browser without a GPU lacks.
set -eu
docs=$(cd "$(dirname "$0")" && pwd)
scratch=$(mktemp -d)
port=${PORT:-6123}
trap 'kill "$tb" 2>/dev/null; rm -rf "$scratch"' EXIT

vae-train -m objective=jensen,prior_iwae objective.shared_samples=true n_train_iters=400 \
  checkpoint_every=100 eval.n_images=1000 logger=tensorboard progress=false hydra.sweep.dir="$scratch/sweep"
tensorboard --logdir "$scratch/sweep" --port "$port" >"$scratch/tensorboard.log" 2>&1 &
tb=$!
# until TensorBoard has read both runs' events (it loads them in the background)
for _ in $(seq 120); do
  curl -sf "http://localhost:$port/data/plugin/scalars/tags" | grep -q '"1".*train/loss' && break
  sleep 1
done
sleep 5

shoot() {  # shoot NAME WIDTH,HEIGHT QUERY PAGE
  chromium --headless --no-sandbox --hide-scrollbars --window-size="$2" --virtual-time-budget=20000 \
    --screenshot="$docs/tensorboard/$1.png" "http://localhost:$port/?darkMode=false&forceSVG=true$3#$4"
}
mkdir -p "$docs/tensorboard"
shoot curves-and-grids 1400,1300 "&tagFilter=train%2Floss%7Cgrids" timeseries
shoot hparams 2600,700 "" hparams
