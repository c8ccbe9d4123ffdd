# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Why the Jensen bound of prior samples gives the mean digit: a tour through vae-cli's Python API
#
# A decoder trained on the Jensen bound $\mathbb{E}_{z \sim p(z)} \log p(x|z)$ draws only from the prior.
# Its gap to $\log p(x)$ is $\mathrm{KL}(p(z) \,\|\, p(z|x))$, so the optimum makes $x$ and $z$
# independent: every $z$ decodes to the same mean digit. The log-mean-exp of the same prior samples,
# $\log \frac{1}{S} \sum_s p(x|z_s)$, is a tighter bound and learns digits.
#
# This notebook trains both briefly, loads the runs back, and looks at what the README's figures
# show: the means grid, the gap, the exact posteriors, samples next to means. Then the model whose
# $\log p(x)$ is known exactly at every $K$: a linear decoder with a Gaussian $p(x|z)$.
#
# `docs/tour.py` is the source (jupytext's percent format, paired with `docs/tour.ipynb`); CI runs
# it at tiny sizes (`VAE_CLI_TOUR=tiny`) and fails when a cell fails. The outputs below are from the
# small sizes on a 2-core CPU (a couple of minutes).

# %%
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

import vae_cli

TINY = os.environ.get("VAE_CLI_TOUR") == "tiny"  # CI: synthetic images, a few steps
runs = Path(tempfile.mkdtemp(prefix="vae-cli-tour-"))
if TINY:
    common = ["data=synthetic", "data.n_train=256", "data.n_test=64", "model.hidden=16", "model.depth=2",
              "n_train_iters=10", "batch_size=16", "eval.quadrature_points=256", "eval.prior_mc_samples=32"]  # fmt: skip
else:
    # The reference experiment's model, with one set of prior draws shared by each batch (about 100x
    # faster a step on a CPU; the same expectation: README, Speed) and fewer steps.
    common = ["n_train_iters=600", "eval.n_images=1000"]
common += ["objective.shared_samples=true", "progress=false", "device=cpu"]

# %% [markdown]
# ## Train the two objectives
#
# `vae_cli.train(overrides, run_dir)` is the run `vae-train OVERRIDES` makes, from Python. Each run
# directory then holds the same evidence as one the command makes: losses, checkpoint, figures,
# `eval.json` and every test image's $\log p(x)$.

# %%
summaries = {
    name: vae_cli.train([f"objective={name}", "n_samples=256", *common], runs / name)
    for name in ("jensen", "prior_iwae")
}
for name, s in summaries.items():
    print(f"{name:<11} final loss {s['final_loss']:.1f}, test log p(x) = {s['log_px']:.1f} ({s['log_px_estimator']})")

# %% [markdown]
# ## The means grid: one average digit for Jensen, digits for the log-mean-exp
#
# `run.model.decode(z)` gives the decoder's means $\mathbb{E}[x|z]$ (not samples) for the same 64
# prior draws $z$.

# %%
jensen, lme = (vae_cli.load_run(runs / name) for name in ("jensen", "prior_iwae"))
z = jensen.model.prior_sample(64, seed=0)


def grid(images: torch.Tensor, rows: int = 8) -> np.ndarray:
    tiles = images.detach().reshape(rows, -1, 28, 28).clamp(0, 1)
    return tiles.permute(0, 2, 1, 3).reshape(rows * 28, -1).numpy()


fig, axes = plt.subplots(1, 2, figsize=(9, 4.6))
for ax, run, title in ((axes[0], jensen, "Jensen bound"), (axes[1], lme, "log-mean-exp")):
    ax.imshow(grid(run.model.decode(z)), cmap="gray", vmin=0, vmax=1)
    ax.set_title(f"{title}: MEANS E[x|z] for 64 prior draws", fontsize=9)
    ax.axis("off")
plt.show()

spread = jensen.model.decode(z).std(0).mean().item()
print(f"Jensen: the means of 64 different z differ by {spread:.4f} per pixel on average: the same image")

# %% [markdown]
# ## The gap: $\log p(x) - \mathbb{E}_{p(z)} \log p(x|z) = \mathrm{KL}(p(z) \,\|\, p(z|x))$
#
# `run.eval` is the run's `eval.json`; `run.per_image` holds every test image's value by each
# estimator. At $K=2$ the quadrature is exact up to its grid, so the gap per image is exact too.

# %%
for name, run in (("jensen", jensen), ("log-mean-exp", lme)):
    gap = run.per_image["quadrature"] - run.per_image["quadrature.jensen"]
    print(f"{name:<13} log p(x) {run.eval['log_px']:8.2f}   mean KL(p(z) || p(z|x)) = {gap.mean():7.3f} "
          f"(largest image: {gap.max():.3f})")  # fmt: skip

# %% [markdown]
# ## The exact posteriors $p(z|x)$ of four test digits
#
# `run.posterior(x)` computes $p(x|z)\,p(z)/p(x)$ on a grid over $[-3, 3]^2$. For the Jensen model it
# is the prior for every digit: the image tells nothing about $z$.

# %%
x = vae_cli.test_images(jensen.config, n=4)
fig, axes = plt.subplots(2, 5, figsize=(11, 4.6))
for row, (run, name) in enumerate(((jensen, "Jensen"), (lme, "log-mean-exp"))):
    post = run.posterior(x)
    axes[row, 0].imshow(np.exp(post.log_prior), origin="lower", extent=post.extent, cmap="viridis")
    axes[row, 0].set_title(f"{name}: prior p(z)", fontsize=8)
    for i in range(4):
        axes[row, i + 1].imshow(np.exp(post.log_posterior[i]), origin="lower", extent=post.extent, cmap="viridis")
        kl = post.log_px[i] - post.jensen[i]
        axes[row, i + 1].set_title(f"p(z|x), KL(p(z) || p(z|x)) = {kl:.2f}", fontsize=8)
for ax in axes.flat:
    ax.set_xlabel("z1", fontsize=7)
    ax.set_ylabel("z2", fontsize=7)
    ax.tick_params(labelsize=6)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Samples next to means
#
# `run.model.sample(n)` draws $x \sim p(x|z)$ with $z \sim p(z)$: binary images, noisy copies of the
# means above.

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 4.6))
axes[0].imshow(grid(lme.model.sample(64, seed=0)), cmap="gray", vmin=0, vmax=1)
axes[0].set_title("log-mean-exp: SAMPLES x ~ p(x|z)", fontsize=9)
axes[1].imshow(grid(lme.model.decode(lme.model.prior_sample(64, seed=0))), cmap="gray", vmin=0, vmax=1)
axes[1].set_title("the same model's MEANS E[x|z]", fontsize=9)
for ax in axes:
    ax.axis("off")
plt.show()

# %% [markdown]
# ## A model whose $\log p(x)$ is known at every $K$
#
# With a linear decoder $f(z) = Wz + b$ and a Gaussian $p(x|z) = N(f(z), \sigma^2 I)$ on grey-level
# images (`model=linear likelihood=gaussian data.binarization=none`), the model is probabilistic PCA:
# $p(x) = N(b, WW^\top + \sigma^2 I)$ and $p(z|x)$ are closed-form. vae-cli then reports the closed
# form as `log_px` and scores every estimator against it. Here at $K=8$, where no grid can help.

# %%
linear = ["model=linear", "likelihood=gaussian", "data.binarization=none", "K=8", "objective=elbo",
          "eval.ais=true", "eval.ais_n_images=16", "eval.bdmc_n_images=0"]  # fmt: skip
linear_common = [o for o in common if not o.startswith(("objective.shared", "model."))]
summary = vae_cli.train([*linear, *linear_common], runs / "linear")
run = vae_cli.load_run(runs / "linear")
for name, entry in run.eval["estimates"].items():
    vs = f"{entry['minus_log_px']['value']:+.3f} vs the closed form" if "minus_log_px" in entry else "the truth"
    print(f"{name:<12} {entry['value']:10.2f} nats over {entry['n_images']:5d} images   {vs}")
print(
    f"bits per dimension {run.eval['bits_per_dim']:.3f}; the ML pPCA at K=8: {run.eval['reference']['ppca']['value']:.2f}"
)
