"""Scores of a network's predictions: errors, NLL, Brier, ECE, the posterior predictive, and shifted inputs."""
