"""Bayesian layers, the layer-kind and graph-op tables, the network that holds them, and bayesianize."""
