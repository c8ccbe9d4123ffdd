"""vae-cli: see why the Jensen bound of prior samples fails, next to log-mean-exp and the ELBO."""

__version__ = "0.1.0"
