"""The console scripts vae-train, vae-eval and vae-plot, with Hydra and the error boundary."""
