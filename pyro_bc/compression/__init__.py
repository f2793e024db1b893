"""Posterior analysis to a compressed file: log alpha, the graph and its pruning, thresholds, bits, the fold, fine-tuning."""
