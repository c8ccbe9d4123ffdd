"""The maths: models, likelihoods, objectives, estimators. torch only (no Hydra, omegaconf or matplotlib)."""
